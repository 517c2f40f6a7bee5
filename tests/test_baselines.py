"""The baselines (METHOD §11): their update rules, the direction each one moves its loss, and what they change.

Runs on a small demo world with a random tiny CLIP; the end-to-end direction tests on the fitted demo CLIP
(forget accuracy falls, FT keeps it) are in test_end_to_end.py.
"""

import json
from pathlib import Path

import pytest
import torch

from slug_lightning import load_clip
from slug_lightning.baseline_unlearn import edit_size
from slug_lightning.baselines import BaselineSettings, dampen, run_baseline, saliency_mask, trained_parameters
from slug_lightning.compare import grid, select
from slug_lightning.concepts import Concept
from slug_lightning.datamodules import LaionDataModule
from slug_lightning.demo import make_demo_world
from slug_lightning.errors import UserError
from slug_lightning.losses import forget_loss_sum, retain_loss_sum


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_demo_world(
        tmp_path_factory.mktemp("world"),
        seed=0,
        portraits_per_person=6,
        person_object_per_person=2,
        samples_per_object=4,
        scenery_samples=10,
        eval_per_person=1,
        eval_per_object=1,
        shards=2,
    )


def _setup(world, batch_size=16):
    torch.manual_seed(0)
    clip = load_clip("slug-tiny")
    data = LaionDataModule(world.shards, concepts=[Concept(world.default_target)], batch_size=batch_size)
    data.transform, data.tokenizer = clip.preprocess, clip.tokenizer
    return clip.model, data


def _losses(model, data):
    """Mean forget loss (1 − cos) and mean retain CLIP loss over all pairs, at the model's current weights."""
    with torch.no_grad():
        forget = pairs = 0.0
        for batch in data.forget_dataloader(data.concepts[0]):
            forget += float(forget_loss_sum(model.encode_image(batch["image"]), model.encode_text(batch["text"])))
            pairs += batch["image"].shape[0]
        retain = count = 0.0
        for batch in data.retain_dataloader():
            if batch["image"].shape[0] > 1:
                retain += float(
                    retain_loss_sum(
                        model.encode_image(batch["image"]), model.encode_text(batch["text"]), model.logit_scale
                    )
                )
                count += batch["image"].shape[0]
    return forget / pairs, retain / count


def _run(method, world, **settings):
    model, data = _setup(world)
    before = _losses(model, data)
    base = {n: p.detach().clone() for n, p in model.state_dict().items()}
    result = run_baseline(
        method,
        model,
        lambda: {c.name: data.forget_dataloader(c) for c in data.concepts},
        data.retain_dataloader,
        BaselineSettings(**settings),
        torch.device("cpu"),
        evaluate=lambda: {"evaluated": True},
    )
    return model, data, base, before, _losses(model, data), result


@pytest.mark.parametrize("method", ["ga", "gaft"])
def test_gradient_ascent_raises_the_forget_loss(world, method):
    *_, before, after, result = _run(method, world, lr=1e-3, iterations=2)
    assert after[0] > before[0] + 0.05, (before, after)
    assert [row["iteration"] for row in result.iterations] == [1, 2]
    assert all(row["evaluated"] for row in result.iterations)


def test_fine_tuning_lowers_the_retain_loss_and_reads_no_forget_pair(world):
    model, data, _, before, after, result = _run("ft", world, lr=1e-3, iterations=2)
    assert after[1] < before[1], (before, after)
    assert result.retain_samples == data.count_pairs(None)
    assert result.forget_samples == {}


def test_salun_changes_only_the_salient_fraction(world):
    model, data, base, before, after, result = _run("salun", world, lr=1e-3, iterations=1, mask_fraction=0.1)
    trained = trained_parameters(model)
    changed = sum(int((p.detach() != base[n]).sum()) for n, p in trained.items())
    total = sum(p.numel() for p in trained.values())
    assert 0 < changed <= 0.1 * total + 1
    assert after[0] > before[0]
    assert result.forget_samples == {world.default_target: data.count_pairs(data.concepts[0])}


def test_ssd_dampens_without_training_and_changes_few_weights(world):
    model, data, base, before, after, result = _run("ssd", world, alpha=10.0)
    state = model.state_dict()
    shrunk = sum(int((state[n].abs() < base[n].abs()).sum()) for n in base)
    grown = sum(int((state[n].abs() > base[n].abs()).sum()) for n in base)
    assert shrunk > 0 and grown == 0  # dampening only ever scales weights down
    assert shrunk < 0.5 * sum(t.numel() for t in base.values())
    assert len(result.iterations) == 1


def test_logit_scale_is_never_trained(world):
    model, *_ = _run("ft", world, lr=1e-2, iterations=1)
    torch.manual_seed(0)
    assert torch.equal(model.logit_scale, load_clip("slug-tiny").model.logit_scale)


def test_saliency_mask_keeps_the_requested_share_across_tensors():
    torch.manual_seed(0)
    grads = {"a": torch.randn(100), "b": torch.randn(10, 30)}
    mask = saliency_mask(grads, 0.25)
    assert sum(int(m.sum()) for m in mask.values()) == 100
    kept = torch.cat([g.abs().flatten()[m.flatten()] for g, m in zip(grads.values(), mask.values())])
    dropped = torch.cat([g.abs().flatten()[~m.flatten()] for g, m in zip(grads.values(), mask.values())])
    assert kept.min() >= dropped.max()


def test_zero_gradient_entries_are_never_salient():
    grads = {"embedding": torch.zeros(90), "weight": torch.arange(1.0, 11.0)}
    mask = saliency_mask(grads, 0.5)  # half of 100 entries is 50, but only 10 have a gradient
    assert not mask["embedding"].any() and mask["weight"].all()


def test_dampen_leaves_unselected_weights_and_caps_the_factor_at_one():
    weight = torch.tensor([2.0, 2.0, 2.0])
    out = dampen(weight, torch.tensor([50.0, 5.0, 20.0]), torch.tensor([1.0, 1.0, 1.0]), alpha=10.0, dampening=30.0)
    assert out.tolist() == [pytest.approx(1.2), 2.0, 2.0]  # 30·1/50 = 0.6; 20 > 10 selected but 30/20 caps at 1


def test_edit_size_counts_changed_tensors_whole():
    base = {"w": torch.zeros(3, 4), "b": torch.zeros(4, dtype=torch.float16)}
    edited = {"w": torch.zeros(3, 4), "b": torch.tensor([0, 1, 1, 0], dtype=torch.float16)}
    assert edit_size(base, edited) == {"tensors": 1, "entries": 2, "parameters": 4, "bytes": 8}


@pytest.mark.parametrize("bad", [{"lr": 0.0}, {"iterations": 0}, {"mask_fraction": 1.5}, {"alpha": -1.0}])
def test_invalid_settings_name_the_value(bad):
    ((name, value),) = bad.items()
    with pytest.raises(UserError, match=f"{name}={value!r}"):
        BaselineSettings(**bad)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="Unknown baseline 'sgd'"):
        run_baseline("sgd", None, dict, list, BaselineSettings(), torch.device("cpu"))


def test_compare_tunes_every_baseline_with_the_same_budget_and_keeps_slugs_rule():
    lrs, alphas = [1e-5, 1e-4, 1e-3], [10.0, 3.0, 1.0]
    sizes = {m: len(grid(m, lrs, alphas)) for m in ("ft", "ga", "gaft", "salun", "ssd")}
    assert set(sizes.values()) == {3}
    assert grid("slug", lrs, alphas) == [{}]
    rows = [
        {"forget_top1": 0.1, "utility": 0.9},
        {"forget_top1": 0.0, "utility": 0.2},
        {"forget_top1": 0.0, "utility": 0.6},
    ]
    assert select(rows) is rows[2]


def _unlearn_config(world, path):
    import yaml

    config = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {"class_path": "slug_lightning.GradientCollector", "init_args": {"model_name": "slug-tiny"}},
        "data": {
            "class_path": "slug_lightning.datamodules.LaionDataModule",
            "init_args": {"shards": world.shards, "concepts": [{"name": world.default_target}], "batch_size": 32},
        },
        "search": {
            "class_path": "slug_lightning.callbacks.StepSearch",
            "init_args": {
                "sets": [{"name": "identities", "root": str(world.identities_dir)}],
                "metric": "top1",
                "max_steps": 2,
                "towers": ["vision"],
                "audit": False,
            },
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.e2e
def test_compare_runs_every_method_and_writes_table_csv_and_plot(world, tmp_path, capsys):
    import csv

    from slug_lightning.cli import main

    config = _unlearn_config(world, tmp_path / "unlearn.yaml")
    output = tmp_path / "compare"
    code = main(
        [
            "compare",
            "--config",
            str(config),
            "--methods",
            "slug",
            "ga",
            "ssd",
            "--lrs",
            "1e-4",
            "1e-3",
            "--iterations",
            "1",
            "--relearn_ks",
            "4",
            "--relearn_steps",
            "2",
            "--relearn_every",
            "2",
            "--output_dir",
            str(output),
        ]
    )
    assert code == 0
    rows = list(csv.DictReader((output / "comparison.csv").open()))
    # Each method's kept run, and only it, was audited: its audit.json, and the audit columns of its row.
    for row in rows:
        audited = (Path(row["run"]) / "audit.json").is_file()
        assert audited == (row["selected"] == "True")
        if audited:
            audit = json.loads((Path(row["run"]) / "audit.json").read_text())
            held_out = audit["concepts"][world.default_target]["unlearned"]["held_out"]["top1"]
            assert float(row["held_out_forget_top1"]) == pytest.approx(held_out)
            assert row["relearn_steps"].startswith("4: ")
        else:
            assert row["held_out_forget_top1"] == ""
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("slug", "-"),
        ("ga", "lr=0.0001"),
        ("ga", "lr=0.001"),
        ("ssd", "alpha=10"),
        ("ssd", "alpha=31.6"),
    ]
    assert sorted(r["method"] for r in rows if r["selected"] == "True") == ["ga", "slug", "ssd"]
    for row in rows:  # each row is its run's report, not made up
        report = json.loads((Path(row["run"]) / "report.json").read_text())
        assert float(row["forget_top1"]) == pytest.approx(report["after"]["forget"][world.default_target]["top1"])
        assert report["method"] == row["method"]
    table = (output / "comparison.md").read_text()
    assert "Tuning budget: FT, GA, GAFT and SalUn ran lr in 0.0001, 0.001" in table and "comparison.png" in table
    assert table.count("## Audit of the kept settings") == 1 and table.count("- **ssd**: ") == 1
    assert (output / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    # a second compare reuses the finished runs instead of repeating them
    capsys.readouterr()
    assert (
        main(
            [
                "compare",
                "--config",
                str(config),
                "--methods",
                "ga",
                "--lrs",
                "1e-4",
                "--iterations",
                "1",
                "--output_dir",
                str(output),
            ]
        )
        == 0
    )
    assert "reusing the finished run" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, words",
    [
        (["--methods", "slug", "sgd"], "--methods ['sgd'] unknown"),
        (["--lrs", "0"], "--lrs and --ssd_alphas must be > 0"),
        (["--iterations", "0"], "--iterations must be >= 1"),
    ],
)
def test_compare_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, words):
    from slug_lightning.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("{}")
    assert main(["compare", "--config", str(config), *args, "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_compare_names_a_missing_config(tmp_path, capsys):
    from slug_lightning.cli import main

    assert main(["compare", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml' does not exist" in capsys.readouterr().err
