"""Deltas as modular edits: the pure functions, the checkpoint provenance, the ``delta`` command, and (end to end)
two separate runs on the small demo whose deltas are applied together and removed one at a time.

One file for everything a delta does, so the end-to-end runs share the unit tests' fixtures; hence its length."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slug_lightning import deltas
from slug_lightning.artifacts import fingerprint
from slug_lightning.cli import main
from slug_lightning.deltas import (
    Provenance,
    apply,
    apply_to_checkpoint,
    combine,
    make_delta,
    provenance_of,
    read_delta,
    remove,
    remove_from_checkpoint,
    select,
    write_delta,
)
from slug_lightning.errors import UserError


def _base(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "visual.proj": torch.randn(8, 4, generator=generator),
        "transformer.resblocks.0.mlp.c_fc.weight": torch.randn(16, 8, generator=generator),
        "ln_final.weight": torch.randn(8, generator=generator),
    }


def _delta(
    base: dict, concepts=("Ann Lee", "Bob Roy"), layers=("visual.proj", "visual.proj"), source="d", seed: int = 1
) -> deltas.Delta:
    generator = torch.Generator().manual_seed(seed)
    updates = [
        (
            {"concept": c, "layer": layer, "step_size": 0.5 + i, "tower": "vision", "relative_change": 0.01},
            0.1 * torch.randn(base[layer].shape, generator=generator),
        )
        for i, (c, layer) in enumerate(zip(concepts, layers))
    ]
    return make_delta(updates, fingerprint(base), {"name": "slug-tiny", "fingerprint": fingerprint(base)}, source)


def test_apply_then_remove_gives_the_weights_back_and_touches_only_edited_layers():
    base = _base()
    delta = _delta(base, layers=("visual.proj", "transformer.resblocks.0.mlp.c_fc.weight"))
    edited = apply(base, delta)
    assert not torch.equal(edited["visual.proj"], base["visual.proj"])
    assert not torch.equal(
        edited["transformer.resblocks.0.mlp.c_fc.weight"], base["transformer.resblocks.0.mlp.c_fc.weight"]
    )
    assert edited["ln_final.weight"] is base["ln_final.weight"]
    assert torch.equal(base["visual.proj"], _base()["visual.proj"])  # the input is not modified
    restored = remove(edited, delta)
    for name in base:
        torch.testing.assert_close(restored[name], base[name], rtol=0, atol=1e-6)


def test_two_concepts_on_one_layer_add_and_one_can_be_removed_alone():
    base = _base()
    delta = _delta(base)  # both concepts chose visual.proj
    both = apply(base, delta)
    expected = base["visual.proj"] + delta.tensors["Ann Lee/visual.proj"] + delta.tensors["Bob Roy/visual.proj"]
    torch.testing.assert_close(both["visual.proj"], expected)
    only_bob = remove(both, delta, concepts=["Ann Lee"])
    torch.testing.assert_close(
        only_bob["visual.proj"], apply(base, delta, ["Bob Roy"])["visual.proj"], rtol=0, atol=1e-6
    )


def test_apply_keeps_the_weight_dtype():
    base = {name: t.half() for name, t in _base().items()}
    edited = apply(base, _delta(_base()))
    assert edited["visual.proj"].dtype == torch.float16


def test_unknown_concept_missing_layer_and_wrong_shape_are_refused():
    base = _base()
    delta = _delta(base)
    with pytest.raises(ValueError, match=r"no update for \['Cy Dunn'\].*holds \['Ann Lee', 'Bob Roy'\]"):
        select(delta, ["Cy Dunn"])
    with pytest.raises(ValueError, match="layers the model does not have: \\['visual.proj'\\]"):
        apply({"ln_final.weight": base["ln_final.weight"]}, delta)
    with pytest.raises(ValueError, match=r"visual.proj: update \(8, 4\) vs weight \(4, 8\)"):
        apply({**base, "visual.proj": torch.zeros(4, 8)}, delta)


def test_make_delta_refuses_two_updates_of_one_layer_for_one_concept():
    with pytest.raises(ValueError, match="'Ann' has two updates of layer 'w'"):
        make_delta([({"concept": "Ann", "layer": "w"}, torch.ones(1))] * 2, "f")


def test_write_then_read_keeps_tensors_entries_and_base(tmp_path):
    base = _base()
    delta = _delta(base, layers=("visual.proj", "ln_final.weight"))
    write_delta(tmp_path / "delta.safetensors", delta)
    back = read_delta(tmp_path / "delta.safetensors")
    assert back.entries == delta.entries
    assert back.base_fingerprint == fingerprint(base) and back.model == delta.model
    assert back.concepts == ["Ann Lee", "Bob Roy"]
    assert back.entries[1] == {
        "key": "Bob Roy/ln_final.weight",
        "concept": "Bob Roy",
        "layer": "ln_final.weight",
        "step_size": 1.5,
        "tower": "vision",
        "relative_change": 0.01,
    }
    for key, tensor in delta.tensors.items():
        assert torch.equal(back.tensors[key], tensor)


def test_read_refuses_what_is_not_a_delta(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_delta(tmp_path / "missing.safetensors")
    save_file({"w": torch.ones(1)}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="is not a delta written by slug_lightning .*'pt'"):
        read_delta(tmp_path / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="Cannot read delta"):
        read_delta(tmp_path / "junk.safetensors")
    entries = [{"key": "A/w", "concept": "A", "layer": "w"}]
    save_file(
        {"A/v": torch.ones(1)},
        str(tmp_path / "bad.safetensors"),
        metadata={"format": deltas.DELTA_FORMAT, "entries": json.dumps(entries)},
    )
    with pytest.raises(UserError, match="inconsistent"):
        read_delta(tmp_path / "bad.safetensors")


def test_combine_keeps_each_concept_and_refuses_another_base_or_a_concept_twice():
    base = _base()
    a = _delta(base, concepts=("Ann Lee",), layers=("visual.proj",), source="a.safetensors")
    b = _delta(base, concepts=("Bob Roy",), layers=("ln_final.weight",), source="b.safetensors", seed=2)
    both = combine([a, b])
    assert both.concepts == ["Ann Lee", "Bob Roy"] and both.base_fingerprint == fingerprint(base)
    torch.testing.assert_close(apply(base, both)["visual.proj"], apply(base, a)["visual.proj"])
    torch.testing.assert_close(apply(base, both)["ln_final.weight"], apply(base, b)["ln_final.weight"])
    other = _delta(_base(seed=5), concepts=("Cy Dunn",), layers=("visual.proj",), source="c.safetensors")
    with pytest.raises(
        ValueError,
        match=f"c.safetensors was made for base model {fingerprint(_base(seed=5))}, "
        f"a.safetensors for {fingerprint(base)}",
    ):
        combine([a, other])
    with pytest.raises(ValueError, match="'Ann Lee' is in both a.safetensors and a.safetensors"):
        combine([a, a])
    with pytest.raises(ValueError, match="at least one"):
        combine([])


def test_checkpoint_provenance_guards_apply_and_remove():
    base = _base()
    delta = _delta(base)
    plain = provenance_of(base, {})
    assert plain == Provenance(fingerprint(base), [])
    edited, carried = apply_to_checkpoint(base, plain, delta, ["Ann Lee"], checkpoint="base.safetensors")
    assert carried.base_fingerprint == fingerprint(base) and carried.concepts == ["Ann Lee"]
    assert carried.applied == [{"concept": "Ann Lee", "layer": "visual.proj", "step_size": 0.5}]
    with pytest.raises(UserError, match=r"already carries \['Ann Lee'\]"):
        apply_to_checkpoint(edited, carried, delta, ["Ann Lee"])
    with pytest.raises(UserError, match=r"does not carry \['Bob Roy'\] \(it carries \['Ann Lee'\]\)"):
        remove_from_checkpoint(edited, carried, delta, ["Bob Roy"])
    restored, none = remove_from_checkpoint(edited, carried, delta, ["Ann Lee"])
    assert none.applied == [] and none.base_fingerprint == fingerprint(base)
    torch.testing.assert_close(restored["visual.proj"], base["visual.proj"], rtol=0, atol=1e-6)
    other = _base(seed=7)
    with pytest.raises(
        UserError,
        match=f"made for base model {fingerprint(base)}, but other.safetensors has base model {fingerprint(other)}",
    ):
        apply_to_checkpoint(other, provenance_of(other, {}), delta, checkpoint="other.safetensors")
    unchecked = deltas.Delta(delta.tensors, delta.entries, None, source="old.safetensors")
    with pytest.raises(UserError, match="old.safetensors records no base-model fingerprint"):
        apply_to_checkpoint(base, plain, unchecked)


def test_provenance_of_a_recorded_checkpoint_and_of_an_older_unlearned_model():
    recorded = Provenance("abc", [{"concept": "Ann Lee", "layer": "visual.proj", "step_size": 0.5}])
    assert provenance_of({}, recorded.metadata()) == recorded
    older = {
        "format": "pt",
        "model": json.dumps({"name": "slug-tiny", "fingerprint": "f00"}),
        "unlearned": json.dumps(["Ann Lee"]),
    }
    assert provenance_of(_base(), older) == Provenance("f00", [{"concept": "Ann Lee"}])
    exported = {"format": "pt", "model": "slug-tiny"}  # fit's export: a plain name, no record
    assert provenance_of(_base(), exported) == Provenance(fingerprint(_base()), [])


def test_run_delta_names_the_base_the_gradients_were_taken_at():
    """The model carries the edit when the artifacts are written; the delta still names θ⁰."""
    from types import SimpleNamespace

    from slug_lightning.gradient_store import GradientStore
    from slug_lightning.layers import LayerStats
    from slug_lightning.report import run_delta
    from slug_lightning.results import SearchResult
    from slug_lightning.search import Probe

    gradient = torch.ones(8, 4)
    store = GradientStore(
        forget={"Ann Lee": {"visual.proj": gradient}},
        retain={"visual.proj": gradient},
        forget_samples={"Ann Lee": 3},
        retain_samples=9,
        model={"name": "slug-tiny", "fingerprint": "f0"},
    )
    probe = Probe("Ann Lee", "visual.proj", 2, 0.25, 0.05, 0.0, 0.5, {"people": 0.9}, {"people": 1.0})
    result = SearchResult(
        ["Ann Lee"],
        {},
        before={},
        after={},
        chosen={"Ann Lee": probe},
        layers={"Ann Lee": [LayerStats("visual.proj", "vision", 1.0, 0.1, 2.0, 1.0, front=1)]},
    )
    collector = SimpleNamespace(gradients=store, base_fingerprint="f0")
    delta = run_delta(collector, result)
    assert delta.base_fingerprint == "f0" and delta.model == store.model
    assert delta.entries == [
        {
            "key": "Ann Lee/visual.proj",
            "concept": "Ann Lee",
            "layer": "visual.proj",
            "step_size": 0.25,
            "tower": "vision",
            "relative_change": 0.05,
        }
    ]
    torch.testing.assert_close(delta.tensors["Ann Lee/visual.proj"], 0.25 * gradient)


# --- the `delta` command --------------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    """A base checkpoint and two single-concept deltas for it (as two separate runs would write them)."""
    base = _base()
    save_file(base, str(tmp_path / "base.safetensors"), metadata={"format": "pt", "model": "slug-tiny"})
    write_delta(tmp_path / "a.safetensors", _delta(base, concepts=("Ann Lee",), layers=("visual.proj",)))
    write_delta(tmp_path / "b.safetensors", _delta(base, concepts=("Bob Roy",), layers=("visual.proj",), seed=2))
    return tmp_path, base


def _metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_cli_show_lists_concepts_layers_steps_and_base(files, capsys):
    tmp_path, base = files
    assert main(["delta", "show", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["delta", "concept", "layer", "tower", "step", "size", "rel.", "change", "base", "model"]
    assert "Ann Lee" in lines[1] and "visual.proj" in lines[1] and "0.5" in lines[1]
    assert "Bob Roy" in lines[2] and fingerprint(base) in lines[2]


def test_cli_apply_remove_round_trip_with_provenance(files, capsys):
    tmp_path, base = files
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    assert (
        main(
            [
                "delta",
                "apply",
                "--model",
                str(tmp_path / "base.safetensors"),
                "--delta",
                a,
                b,
                "--output",
                str(tmp_path / "both.safetensors"),
            ]
        )
        == 0
    )
    both = load_file(str(tmp_path / "both.safetensors"))
    expected = (
        base["visual.proj"]
        + read_delta(a).tensors["Ann Lee/visual.proj"]
        + read_delta(b).tensors["Bob Roy/visual.proj"]
    )
    torch.testing.assert_close(both["visual.proj"], expected)
    meta = _metadata(tmp_path / "both.safetensors")
    assert meta["base_fingerprint"] == fingerprint(base) and meta["model"] == "slug-tiny"
    assert [e["concept"] for e in json.loads(meta["deltas"])] == ["Ann Lee", "Bob Roy"]
    # applying a concept again, or removing one it does not carry, is refused without writing anything
    assert (
        main(
            [
                "delta",
                "apply",
                "--model",
                str(tmp_path / "both.safetensors"),
                "--delta",
                a,
                "--output",
                str(tmp_path / "twice.safetensors"),
            ]
        )
        == 2
    )
    assert "already carries ['Ann Lee']" in capsys.readouterr().err
    assert not (tmp_path / "twice.safetensors").exists()
    assert (
        main(
            [
                "delta",
                "remove",
                "--model",
                str(tmp_path / "both.safetensors"),
                "--delta",
                a,
                b,
                "--concept",
                "Ann Lee",
                "--output",
                str(tmp_path / "bob.safetensors"),
            ]
        )
        == 0
    )
    bob = load_file(str(tmp_path / "bob.safetensors"))
    torch.testing.assert_close(
        bob["visual.proj"], base["visual.proj"] + read_delta(b).tensors["Bob Roy/visual.proj"], rtol=0, atol=1e-6
    )
    assert json.loads(_metadata(tmp_path / "bob.safetensors")["deltas"])[0]["concept"] == "Bob Roy"
    assert (
        main(
            [
                "delta",
                "remove",
                "--model",
                str(tmp_path / "bob.safetensors"),
                "--delta",
                a,
                "--output",
                str(tmp_path / "none.safetensors"),
            ]
        )
        == 2
    )
    assert "does not carry ['Ann Lee'] (it carries ['Bob Roy'])" in capsys.readouterr().err
    assert (
        main(
            [
                "delta",
                "remove",
                "--model",
                str(tmp_path / "bob.safetensors"),
                "--delta",
                b,
                "--output",
                str(tmp_path / "none.safetensors"),
            ]
        )
        == 0
    )
    none = load_file(str(tmp_path / "none.safetensors"))
    for name in base:
        torch.testing.assert_close(none[name], base[name], rtol=0, atol=1e-6)


def test_cli_refuses_another_base_with_one_line_and_no_output(files, capsys):
    tmp_path, base = files
    other = _base(seed=3)
    save_file(other, str(tmp_path / "other.safetensors"))
    code = main(
        [
            "delta",
            "apply",
            "--model",
            str(tmp_path / "other.safetensors"),
            "--delta",
            str(tmp_path / "a.safetensors"),
            "--output",
            str(tmp_path / "out.safetensors"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert fingerprint(base) in err and fingerprint(other) in err
    assert not (tmp_path / "out.safetensors").exists()
    write_delta(tmp_path / "c.safetensors", _delta(other, concepts=("Cy Dunn",), layers=("visual.proj",)))
    code = main(
        [
            "delta",
            "combine",
            str(tmp_path / "a.safetensors"),
            str(tmp_path / "c.safetensors"),
            "--output",
            str(tmp_path / "ac.safetensors"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "cannot be combined" in err and fingerprint(other) in err
    assert not (tmp_path / "ac.safetensors").exists()


def test_cli_combine_and_bad_arguments(files, capsys):
    tmp_path, base = files
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    assert main(["delta", "combine", a, b, "--output", str(tmp_path / "ab.safetensors")]) == 0
    combined = read_delta(tmp_path / "ab.safetensors")
    assert combined.concepts == ["Ann Lee", "Bob Roy"] and combined.base_fingerprint == fingerprint(base)
    assert (
        main(["delta", "combine", a, str(tmp_path / "ab.safetensors"), "--output", str(tmp_path / "x.safetensors")])
        == 2
    )
    assert "'Ann Lee' is in both" in capsys.readouterr().err
    assert main(["delta", "combine", a, b, "--concept", "Dee Fox", "--output", str(tmp_path / "x.safetensors")]) == 2
    assert "no update for ['Dee Fox']" in capsys.readouterr().err
    assert (
        main(
            [
                "delta",
                "apply",
                "--model",
                str(tmp_path / "base.safetensors"),
                "--delta",
                a,
                "--output",
                str(tmp_path / "base.safetensors"),
            ]
        )
        == 2
    )
    assert "is one of the inputs" in capsys.readouterr().err
    assert (
        main(
            [
                "delta",
                "apply",
                "--model",
                str(tmp_path / "base.safetensors"),
                "--delta",
                a,
                "--output",
                str(tmp_path / "out.pt"),
            ]
        )
        == 2
    )
    assert "must be a .safetensors file" in capsys.readouterr().err
    assert (
        main(
            [
                "delta",
                "apply",
                "--model",
                str(tmp_path / "nope.safetensors"),
                "--delta",
                a,
                "--output",
                str(tmp_path / "out.safetensors"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "out.safetensors").exists()
    assert main(["delta", "frobnicate"]) == 2  # one line, no usage
    err = capsys.readouterr().err
    assert err.startswith("error: argument COMMAND: invalid choice: 'frobnicate'") and "usage" not in err


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("command", ["apply", "combine", "remove"])
def test_cli_refuses_a_non_finite_delta_in_one_line_writing_nothing(files, capsys, bad, command):
    tmp_path, base = files
    poisoned = _delta(base, concepts=("Ann Lee",), layers=("visual.proj",), source="nan")
    poisoned.tensors["Ann Lee/visual.proj"][0, 0] = bad
    write_delta(tmp_path / "nan.safetensors", poisoned)
    output = tmp_path / "out.safetensors"
    if command == "combine":
        args = ["combine", str(tmp_path / "nan.safetensors"), str(tmp_path / "b.safetensors")]
    else:
        args = [command, "--model", str(tmp_path / "base.safetensors"), "--delta", str(tmp_path / "nan.safetensors")]
    code = main(["delta", *args, "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "nan.safetensors holds NaN or infinite values in 1 update(s) (Ann Lee/visual.proj)" in err
    assert not output.exists()


def test_apply_refuses_an_update_that_overflows_the_weights():
    base = {"w": torch.full((2,), 3e38)}
    delta = make_delta([({"concept": "A", "layer": "w"}, torch.full((2,), 3e38))], fingerprint(base), source="big")
    with pytest.raises(ValueError, match=r"big makes \['w'\] non-finite"):
        apply(base, delta)


def test_a_safetensors_checkpoint_named_pt_keeps_its_provenance(files):
    tmp_path, base = files
    save_file(base, str(tmp_path / "carrying.pt"), metadata={"base_fingerprint": "f0", "deltas": "[]"})
    _, provenance, metadata = deltas.read_checkpoint(tmp_path / "carrying.pt")
    assert provenance.base_fingerprint == "f0" and metadata["base_fingerprint"] == "f0"


# --- end to end on the small demo -------------------------------------------------------------------------------


def _unlearn(small_demo, output, people, similarity_classes=0):
    from slug_lightning import GradientCollector, SlugTrainer
    from slug_lightning.callbacks import StepSearch
    from slug_lightning.concepts import Concept
    from slug_lightning.datamodules import LaionDataModule
    from slug_lightning.demo import load_demo_world

    world = load_demo_world(small_demo / "world")
    trainer = SlugTrainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    search = StepSearch(
        sets=_sets(world), metric="top1", max_steps=8, similarity_classes=similarity_classes, audit=False
    )
    # The retain gradient from 2 of the 4 shards (the gradient pass is most of a run's time); forget pairs from all.
    retain = str(small_demo / "world" / "shards" / "{00000..00001}.tar")
    report = trainer.unlearn(
        GradientCollector("slug-tiny", str(small_demo / "fit" / "slug-tiny.safetensors")),
        LaionDataModule(retain, forget_shards=world.shards, concepts=[Concept(p) for p in people], batch_size=128),
        search,
        output_dir=str(output),
    )
    return report, search


def _sets(world):
    from slug_lightning.datamodules import LabelledSet

    return [
        LabelledSet("identities", root=str(world.identities_dir)),
        LabelledSet("objects", root=str(world.objects_dir)),
    ]


def _forget_top1(small_demo, checkpoint, people) -> dict[str, float]:
    """Forget top-1 of each person (among all identities) for a checkpoint file."""
    from slug_lightning import load_clip
    from slug_lightning.datamodules import ZeroShotDataModule
    from slug_lightning.demo import load_demo_world
    from slug_lightning.evaluation import ZeroShotEvaluator, summarize

    loaded = load_clip("slug-tiny", str(checkpoint))
    datamodule = ZeroShotDataModule(_sets(load_demo_world(small_demo / "world"))[:1])
    datamodule.transform = loaded.preprocess
    evaluator = ZeroShotEvaluator(loaded.model, loaded.tokenizer, datamodule, keep_classes=people)
    names = {s: evaluator.class_names(s) for s in evaluator.datasets}
    summary = summarize(evaluator.run(), names, {p: "identities" for p in people})
    return {p: summary["forget"][p]["top1"] for p in people}


def _two_people(small_demo):
    from slug_lightning.demo import load_demo_world

    world = load_demo_world(small_demo / "world")
    target = world.default_target
    # not a look-alike: what each person's edit does to the other is then no part of the test
    other = next(p for p in world.people if p != target and p not in world.look_alikes(target))
    return target, other


def test_deltas_of_two_separate_runs_apply_together_and_remove_one_at_a_time(small_demo, tmp_path):
    from slug_lightning.models import read_state_dict

    base_path = small_demo / "fit" / "slug-tiny.safetensors"
    base = read_state_dict(base_path)
    a, b = _two_people(small_demo)
    reports = {p: _unlearn(small_demo, tmp_path / f"run_{i}", [p])[0] for i, p in enumerate((a, b))}
    run_a, run_b = tmp_path / "run_0", tmp_path / "run_1"
    for person, run in ((a, run_a), (b, run_b)):
        delta = read_delta(run / "delta.safetensors")
        (concept,) = reports[person]["concepts"]
        # the delta is complete and made for θ⁰, though the model in memory carried the edit when it was written
        assert delta.base_fingerprint == fingerprint(base)
        assert delta.entries == [
            {
                "key": f"{person}/{concept['layer']}",
                "concept": person,
                "layer": concept["layer"],
                "step_size": concept["step_size"],
                "tower": concept["tower"],
                "relative_change": concept["relative_change"],
            }
        ]
        assert concept["forget_top1_before"] >= 0.5 and concept["forget_top1_after"] == 0.0
        meta = _metadata(run / "model.safetensors")
        assert meta["base_fingerprint"] == fingerprint(base) and json.loads(meta["unlearned"]) == [person]

    def delta_cli(*args):
        assert main(["delta", *map(str, args)]) == 0

    delta_cli(
        "apply",
        "--model",
        base_path,
        "--delta",
        run_a / "delta.safetensors",
        run_b / "delta.safetensors",
        "--output",
        tmp_path / "both.safetensors",
    )
    # both updates, each on its own layer or added on a shared one, and nothing else. (Each was searched alone on θ⁰,
    # so together they need not forget both: a multi-concept run searches each person on the model carrying the
    # earlier edits instead, the next test.)
    both, model_a = load_file(str(tmp_path / "both.safetensors")), load_file(str(run_a / "model.safetensors"))
    model_b = load_file(str(run_b / "model.safetensors"))
    for name in base:
        torch.testing.assert_close(both[name], model_a[name] + model_b[name] - base[name], rtol=0, atol=1e-6)
    delta_cli(
        "remove",
        "--model",
        tmp_path / "both.safetensors",
        "--delta",
        run_a / "delta.safetensors",
        "--output",
        tmp_path / "only_b.safetensors",
    )
    # what removing a's delta gives is what run b reported: b forgotten, a as b's edit leaves it
    back = _forget_top1(small_demo, tmp_path / "only_b.safetensors", [a, b])
    assert back[b] == 0.0
    (row,) = [row for row in reports[b]["test_classes"]["identities"] if row["name"] == a]
    assert back[a] == pytest.approx(row["top1_after"], abs=1e-9)
    # the same weights as run b's own unlearned model, which never carried a's edit, up to float rounding
    only_b = load_file(str(tmp_path / "only_b.safetensors"))
    assert only_b.keys() == model_b.keys()
    for name in model_b:
        torch.testing.assert_close(only_b[name], model_b[name], rtol=0, atol=1e-6)
    # and a run's own model.safetensors knows its base: removing its delta gives the fitted model back
    delta_cli(
        "remove",
        "--model",
        run_a / "model.safetensors",
        "--delta",
        run_a / "delta.safetensors",
        "--output",
        tmp_path / "base_again.safetensors",
    )
    again = load_file(str(tmp_path / "base_again.safetensors"))
    for name in base:
        torch.testing.assert_close(again[name], base[name], rtol=0, atol=1e-6)


def test_multi_concept_run_reports_every_concept_draws_them_and_keeps_updates_apart(small_demo, tmp_path):
    from slug_lightning.models import read_state_dict

    people = list(_two_people(small_demo))
    report, search = _unlearn(small_demo, tmp_path / "run", people, similarity_classes=3)
    assert [c["name"] for c in report["concepts"]] == people
    for concept in report["concepts"]:
        name = concept["name"]
        assert concept["forget_top1_before"] == report["before"]["forget"][name]["top1"] >= 0.5
        assert concept["forget_top1_after"] == report["after"]["forget"][name]["top1"]
        assert concept["forget_top5_after"] == report["after"]["forget"][name]["top5"]
    # the last person is searched on the model carrying every other edit, and nothing comes after it
    assert report["concepts"][-1]["forget_top1_after"] == 0.0
    assert "similarity_identities.png" in report["plots"]
    assert (tmp_path / "run" / "similarity_identities.png").is_file()
    # one matrix for the set both people are in (paper Fig. 8): both people, then 3 look-alikes, before and after
    names, concepts, before, after = search.result.similarity["identities"]
    assert concepts == people and names[:2] == people and len(names) == 5 and before.shape == after.shape == (5, 5)
    delta = read_delta(tmp_path / "run" / "delta.safetensors")
    assert delta.concepts == people
    assert delta.base_fingerprint == fingerprint(read_state_dict(small_demo / "fit" / "slug-tiny.safetensors"))
    # the run's delta on the base model is the run's unlearned model
    assert (
        main(
            [
                "delta",
                "apply",
                "--model",
                str(small_demo / "fit" / "slug-tiny.safetensors"),
                "--delta",
                str(tmp_path / "run" / "delta.safetensors"),
                "--output",
                str(tmp_path / "applied.safetensors"),
            ]
        )
        == 0
    )
    applied = load_file(str(tmp_path / "applied.safetensors"))
    unlearned = load_file(str(tmp_path / "run" / "model.safetensors"))
    for name in unlearned:
        torch.testing.assert_close(applied[name], unlearned[name], rtol=0, atol=1e-6)
    assert (
        main(
            [
                "delta",
                "remove",
                "--model",
                str(tmp_path / "run" / "model.safetensors"),
                "--delta",
                str(tmp_path / "run" / "delta.safetensors"),
                "--concept",
                people[0],
                "--output",
                str(tmp_path / "second_only.safetensors"),
            ]
        )
        == 0
    )
    back = _forget_top1(small_demo, tmp_path / "second_only.safetensors", people)
    # the report's leave-one-out, measured in the search over its cached stages, is what the removal gives
    assert {p: report["leave_one_out"][people[0]]["forget"][p]["top1"] for p in people} == back
