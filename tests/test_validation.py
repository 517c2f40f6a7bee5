"""Bad input to ``unlearn``: every case is refused before the gradient pass, as one line and exit status 2.

Each case runs the real command line in this process (``slug_lightning.cli.main``) on a tiny demo world
with a randomly initialised tiny CLIP, and checks the exit code, the words of the one-line message, and
that no gradient was computed (``gradients.safetensors`` absent). Every refusal of ``unlearn`` is in this one file,
so the cases share one world; hence its length.
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import one_line_error
from safetensors.torch import save_file

from slug_lightning import config_path
from slug_lightning.cli import main
from slug_lightning.concepts import Concept
from slug_lightning.demo import make_demo_world
from slug_lightning.errors import UserError
from slug_lightning.shard_scan import ShardScan, scan_shards
from slug_lightning.shards import expand_shards
from slug_lightning.validation import (
    WARN_FORGET_SHARE,
    check_concept_pairs,
    check_forget_share,
    check_shards_readable,
    check_skipped,
    near_matches,
)

DEMO_UNLEARN = config_path("demo/unlearn.yaml")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_demo_world(
        tmp_path_factory.mktemp("world"),
        seed=0,
        people=4,
        objects=2,
        portraits_per_person=8,
        person_object_per_person=2,
        samples_per_object=8,
        scenery_samples=20,
        eval_per_person=2,
        eval_per_object=2,
        shards=3,
    )


def sets_of(world) -> list[dict]:
    return [
        {"name": "identities", "root": str(world.identities_dir)},
        {"name": "objects", "root": str(world.objects_dir)},
    ]


def unlearn_args(
    world,
    output: Path,
    *extra: str,
    shards: str | None = None,
    concepts: list | None = None,
    sets: list | None = None,
    pretrained: str = "null",
) -> list[str]:
    return [
        "unlearn",
        "--config",
        str(DEMO_UNLEARN),
        "--search.init_args.audit=false",
        "--model.init_args.pretrained",
        pretrained,
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.shards",
        shards or world.shards,
        "--data.init_args.concepts",
        json.dumps(concepts or [{"name": world.default_target}]),
        "--data.init_args.batch_size",
        "16",
        "--search.init_args.sets",
        json.dumps(sets or sets_of(world)),
        "--search.init_args.max_steps",
        "2",
        "--output_dir",
        str(output),
        *extra,
    ]


def refused(capsys, args: list[str], *words: str) -> str:
    """Run the CLI; assert exit 2, exactly one ``error:`` line holding ``words``, no traceback, and no gradient pass;
    return the line."""
    line = one_line_error(capsys, args, *words)
    output = Path(args[args.index("--output_dir") + 1])
    assert not (output / "gradients.safetensors").exists(), "the gradient pass ran"
    return line


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# ----------------------------------------------------------------------------------------------------
# Shards


def test_shard_pattern_matching_no_file(capsys, world, tmp_path):
    refused(
        capsys,
        unlearn_args(world, tmp_path / "out", shards=str(tmp_path / "nowhere" / "*.tar")),
        "data.init_args.shards",
        "matches no file",
        "nowhere",
    )


def test_brace_pattern_naming_missing_shards(capsys, world, tmp_path):
    pattern = str(Path(world.shards).parent / "{00000..00009}.tar")
    refused(capsys, unlearn_args(world, tmp_path / "out", shards=pattern), "names 7 missing file(s)", "00003.tar")


def test_unreadable_shard(capsys, world, tmp_path):
    shards = copy_tree(Path(world.shards).parent, tmp_path / "shards")
    (shards / "00001.tar").write_bytes(b"not a tar archive at all " * 40)
    refused(
        capsys,
        unlearn_args(world, tmp_path / "out", shards=str(shards / "*.tar")),
        "cannot be read as tar archives",
        "00001.tar",
        "Remove them",
    )


def write_captionless_shard(path: Path, count: int, image: bytes) -> None:
    with wds.TarWriter(str(path)) as writer:
        for i in range(count):
            writer.write({"__key__": f"broken{i:04d}", "png": image})  # an image, no caption
        writer.write({"__key__": "noimage", "txt": "a caption without an image"})


def test_samples_without_caption_or_image_over_the_limit(capsys, world, tmp_path):
    shards = copy_tree(Path(world.shards).parent, tmp_path / "shards")
    image = next(iter(wds.WebDataset(str(shards / "00000.tar"), shardshuffle=False)))
    image = next(v for k, v in image.items() if k in ("png", "jpg"))
    write_captionless_shard(shards / "00003.tar", 20, image)
    args = unlearn_args(world, tmp_path / "out", shards=str(shards / "*.tar"))
    refused(
        capsys,
        args,
        "are broken",
        "20 without caption",
        "1 without image",
        "max_skipped_fraction=0.05",
        "--model.init_args.max_skipped_fraction",
    )


# ----------------------------------------------------------------------------------------------------
# Concepts


def test_concept_no_caption_mentions_suggests_near_matches(capsys, world, tmp_path):
    typo = world.default_target[:-2] + world.default_target[-1] + world.default_target[-2]  # swap the last two
    # The evaluation set knows the misspelt class (its check comes first); only the captions do not.
    root = copy_tree(Path(world.identities_dir), tmp_path / "identities")
    source = next(p for p in root.iterdir() if p.is_dir())
    shutil.copytree(source, root / typo)
    sets = sets_of(world)
    sets[0]["root"] = str(root)
    line = refused(
        capsys,
        unlearn_args(world, tmp_path / "out", concepts=[{"name": typo}], sets=sets),
        f"No caption mentions {typo!r}",
        "data.init_args.forget_shards",
        "near matches",
        world.default_target,
    )
    scanned = int(line.split("scanned ")[1].split(" ")[0])
    assert scanned == scan_shards(expand_shards(world.shards)).captions > 0


def test_concept_with_too_few_forget_pairs(capsys, world, tmp_path):
    pairs = scan_shards(expand_shards(world.shards), [Concept(world.default_target)]).matches[world.default_target]
    args = unlearn_args(world, tmp_path / "out", "--data.init_args.min_forget_pairs", str(pairs + 1))
    refused(capsys, args, f"has {pairs} forget pairs", f"min_forget_pairs={pairs + 1}")


def test_forget_concept_missing_from_the_forget_set(capsys, world, tmp_path):
    # Captions mention it (through the alias), but no evaluation set has a class of that name.
    concepts = [{"name": "Somebody Else", "aliases": [world.default_target]}]
    refused(
        capsys,
        unlearn_args(world, tmp_path / "out", concepts=concepts),
        "'Somebody Else' is not a class of the evaluation sets",
        "identities",
        "search.init_args.sets",
    )


def test_forget_concept_with_no_images_in_the_forget_set(capsys, world, tmp_path):
    sets = sets_of(world)
    names = sorted(p.name for p in Path(world.identities_dir).iterdir())
    sets[0]["class_names"] = [n.replace("_", " ") for n in names]
    sets[0]["allow_missing_classes"] = True
    root = copy_tree(Path(world.identities_dir), tmp_path / "identities")
    shutil.rmtree(root / world.default_target.replace(" ", "_"), ignore_errors=True)
    shutil.rmtree(root / world.default_target, ignore_errors=True)
    sets[0]["root"] = str(root)
    refused(capsys, unlearn_args(world, tmp_path / "out", sets=sets), "has no images in evaluation set 'identities'")


def test_no_concept_at_all(capsys, world, tmp_path):
    args = unlearn_args(world, tmp_path / "out")
    args[args.index("--data.init_args.concepts") + 1] = "[]"
    refused(capsys, args, "No concept to forget", "data.init_args.concepts")


# ----------------------------------------------------------------------------------------------------
# Evaluation sets


def test_evaluation_folder_missing(capsys, world, tmp_path):
    sets = sets_of(world)
    sets[1]["root"] = str(tmp_path / "no_such_folder")
    refused(
        capsys,
        unlearn_args(world, tmp_path / "out", sets=sets),
        "search.init_args.sets[1] ('objects')",
        "does not exist",
        "no_such_folder",
    )


def test_evaluation_folder_empty(capsys, world, tmp_path):
    sets = sets_of(world)
    (tmp_path / "empty").mkdir()
    sets[1]["root"] = str(tmp_path / "empty")
    refused(
        capsys, unlearn_args(world, tmp_path / "out", sets=sets), "search.init_args.sets[1]", "holds no class folders"
    )


def test_evaluation_class_folder_without_images(capsys, world, tmp_path):
    root = copy_tree(Path(world.objects_dir), tmp_path / "objects")
    (root / "an empty class").mkdir()
    sets = sets_of(world)
    sets[1]["root"] = str(root)
    refused(
        capsys,
        unlearn_args(world, tmp_path / "out", sets=sets),
        "search.init_args.sets[1]",
        "holds no images",
        "an empty class",
    )


def test_evaluation_classes_disagree_with_class_names(capsys, world, tmp_path):
    sets = sets_of(world)
    sets[1]["class_names"] = ["teapot", "unicorn"]
    refused(
        capsys,
        unlearn_args(world, tmp_path / "out", sets=sets),
        "search.init_args.sets[1]",
        "class_names differ",
        "unicorn",
    )


# ----------------------------------------------------------------------------------------------------
# Search settings


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--search.init_args.threshold", "2"], ["threshold must be in [0, 1), got 2.0"]),
        (["--search.init_args.max_steps", "0"], ["max_steps must be an integer >= 1, got 0"]),
        (["--search.init_args.refine_rounds", "-1"], ["refine_rounds must be an integer >= 0, got -1"]),
        (["--search.init_args.fronts", "0"], ["fronts must be an integer >= 1, got 0"]),
        (["--search.init_args.orders", "0"], ["orders must be an integer >= 1, got 0"]),
    ],
)
def test_bad_search_settings(capsys, world, tmp_path, extra, words):
    refused(capsys, unlearn_args(world, tmp_path / "out", *extra), *words)


# ----------------------------------------------------------------------------------------------------
# Models and checkpoints


def test_unknown_model_name(capsys, world, tmp_path):
    refused(
        capsys,
        unlearn_args(world, tmp_path / "out", "--model.init_args.model_name", "ViT-B-33"),
        "Unknown OpenCLIP model 'ViT-B-33'",
        "Did you mean",
    )


def test_unknown_pretrained_tag(capsys, world, tmp_path):
    refused(
        capsys,
        unlearn_args(world, tmp_path / "out", pretrained="openai"),
        "'openai' is neither a pretrained tag of 'slug-tiny'",
        "no published weights",
    )


def test_missing_checkpoint(capsys, world, tmp_path):
    refused(
        capsys,
        unlearn_args(world, tmp_path / "out", pretrained=str(tmp_path / "missing.safetensors")),
        "missing.safetensors",
        "does not exist",
    )


def test_mismatched_checkpoint(capsys, world, tmp_path, tiny_clip):
    state = {k: v.clone() for k, v in tiny_clip.model.state_dict().items() if k != "visual.proj"}
    save_file(state, str(tmp_path / "partial.safetensors"))
    refused(
        capsys,
        unlearn_args(world, tmp_path / "out", pretrained=str(tmp_path / "partial.safetensors")),
        "missing keys",
        "visual.proj",
    )


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_malicious_pickle_checkpoint_is_refused_without_running_it(capsys, world, tmp_path, tiny_clip):
    marker = tmp_path / "pwned"
    state = dict(tiny_clip.model.state_dict())
    state["logit_scale"] = _Payload(marker)
    torch.save(state, tmp_path / "evil.pt")
    refused(
        capsys,
        unlearn_args(world, tmp_path / "out", pretrained=str(tmp_path / "evil.pt")),
        "Refusing to load",
        "evil.pt",
    )
    assert not marker.exists(), "unpickling ran the payload"


# ----------------------------------------------------------------------------------------------------
# Output directory and configs


def test_output_directory_with_a_finished_run(capsys, world, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.json").write_text("{}")
    refused(capsys, unlearn_args(world, tmp_path / "out"), "already holds a finished run", "--overwrite")


@pytest.mark.parametrize(
    "section, class_path",
    [("model", "os.system"), ("model", "subprocess.Popen"), ("data", "subprocess.run"), ("search", "subprocess.Popen")],
)
def test_config_cannot_instantiate_arbitrary_callables(capsys, world, tmp_path, section, class_path):
    """jsonargparse instantiates only subclasses of the declared type: nothing of the payload runs."""
    marker = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(json.dumps({section: {"class_path": class_path, "init_args": {"args": ["touch", str(marker)]}}}))
    args = unlearn_args(world, tmp_path / "out")
    args[3:3] = ["--config", str(config)]
    line = one_line_error(capsys, args, section)
    assert class_path in line
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------
# The pieces


def test_near_matches_finds_names_and_single_words():
    words = {"Vesna Fairbank", "Ines Yardley", "portrait", "Vesna", "Fairbank"}
    assert near_matches("Vesna Fairbanks", words)[0] == "Vesna Fairbank"
    assert "Fairbank" in near_matches("Jon Fairbank", words)
    assert near_matches("zzzz", words) == []


def test_min_forget_pairs_boundary(world):
    concept = Concept(world.default_target)
    scan = scan_shards(expand_shards(world.shards), [concept])
    found = scan.matches[concept.name]
    check_concept_pairs(scan, [concept], found)  # exactly the minimum passes
    with pytest.raises(UserError, match=f"has {found} forget pair"):
        check_concept_pairs(scan, [concept], found + 1)


def test_a_valid_run_passes_preflight_and_computes(capsys, caplog, world, tmp_path):
    """The same arguments without the fault run to the end (so the refusals above are the faults'), and the pre-flight
    says what its caption read cost: here every caption came from img2dataset's index beside the demo's shards."""
    with caplog.at_level(logging.INFO):
        assert main(unlearn_args(world, tmp_path / "out")) == 0
    assert (tmp_path / "out" / "report.json").is_file()
    assert not (tmp_path / "out" / "gradients.partial.safetensors").exists()
    assert "pre-flight: the captions of 3 forget shard(s) read in" in caplog.text
    assert "3 from img2dataset's .parquet index" in caplog.text


# ----------------------------------------------------------------------------------------------------
# Settings a constructor refuses: one line naming the full option, for every class the command builds


def _sets_with(world, **changes) -> str:
    sets = sets_of(world)
    sets[1].update(changes)
    return json.dumps(sets)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--data.init_args.batch_size", "0"], ["--data.init_args.batch_size", "got 0"]),
        (["--data.init_args.batch_size", "-4"], ["--data.init_args.batch_size", "got -4"]),
        (["--data.init_args.min_forget_pairs", "-1"], ["--data.init_args.min_forget_pairs", "got -1"]),
        (["--data.init_args.max_forget_share", "0"], ["--data.init_args.max_forget_share", "(0, 1]"]),
        (["--data.init_args.caption_index", "sql"], ["--data.init_args.caption_index", "auto, parquet, tar", "'sql'"]),
        (["--data.init_args.read_timeout", "0"], ["--data.init_args.read_timeout", "got 0.0"]),
        (["--model.init_args.checkpoint_every", "-5"], ["--model.init_args.checkpoint_every", "got -5"]),
        (["--model.init_args.max_skipped_fraction", "2"], ["--model.init_args.max_skipped_fraction", "got 2.0"]),
        (["--search.init_args.batch_size", "0"], ["--search.init_args.batch_size", "got 0"]),
        (["--search.init_args.threshold", "2"], ["--search.init_args.threshold", "[0, 1)"]),
        (["--baseline.lr", "-1", "--method", "ga"], ["--baseline.lr", "lr=-1.0"]),
    ],
)
def test_constructor_refusals_are_one_line_naming_the_option(capsys, world, tmp_path, extra, words):
    refused(capsys, unlearn_args(world, tmp_path / "out", *extra), *words)


def test_duplicate_concept_is_one_line(capsys, world, tmp_path):
    concepts = [{"name": world.default_target}, {"name": world.default_target.upper()}]
    refused(
        capsys, unlearn_args(world, tmp_path / "out", concepts=concepts), "--data.init_args.concepts", "listed twice"
    )


@pytest.mark.parametrize(
    "change, words",
    [
        ({"templates": ["a photo of a person"]}, ["--search.init_args.sets[1].templates", "exactly one '{}'"]),
        ({"fraction": 0}, ["--search.init_args.sets[1].fraction", "fraction must be in (0, 1]"]),
        (
            {"name": "identities"},
            ["--search.init_args.sets", "must be unique", "'identities' is the name of sets [0, 1]"],
        ),
    ],
)
def test_bad_evaluation_set_settings_are_one_line(capsys, world, tmp_path, change, words):
    args = unlearn_args(world, tmp_path / "out")
    args[args.index("--search.init_args.sets") + 1] = _sets_with(world, **change)
    refused(capsys, args, *words)


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_output_dir_that_is_a_file(capsys, world, tmp_path, where):
    (tmp_path / "taken").write_text("not a directory")
    output = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "run"
    refused(capsys, unlearn_args(world, output), "--output_dir", "an existing file, not a directory")
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_a_bug_in_a_constructor_keeps_its_traceback(capsys, world, tmp_path, monkeypatch):
    """Only ConfigError (and other UserErrors) are the user's: a plain ValueError raised while a class is built
    is a bug, and reaches the caller with its traceback."""
    from slug_lightning.datamodules import laion

    def broken(*args, **kwargs):
        raise ValueError("an internal computation went wrong")

    monkeypatch.setattr(laion, "as_concepts", broken)
    with pytest.raises(ValueError) as error:
        main(unlearn_args(world, tmp_path / "out"))
    chain = []
    cause = error.value
    while cause is not None:
        chain.append(str(cause))
        cause = cause.__cause__
    assert any("an internal computation went wrong" in text for text in chain)


# ----------------------------------------------------------------------------------------------------
# Evaluation images are opened and verified before the gradient pass


@pytest.mark.parametrize("damage", ["garbage", "truncated png"])
def test_undecodable_evaluation_image_is_refused_naming_file_and_set(capsys, world, tmp_path, damage):
    root = copy_tree(Path(world.objects_dir), tmp_path / "objects")
    victim = sorted(p for p in root.rglob("*") if p.is_file())[0]
    data = victim.read_bytes()
    victim.write_bytes(b"this is not an image at all" * 8 if damage == "garbage" else data[: len(data) // 2])
    sets = sets_of(world)
    sets[1]["root"] = str(root)
    refused(
        capsys,
        unlearn_args(world, tmp_path / "out", sets=sets),
        "search.init_args.sets[1] ('objects')",
        str(victim),
        "cannot be read",
    )


def test_undecodable_image_met_while_evaluating_is_a_user_error_naming_it(world, tmp_path):
    """A JPEG cut short passes verify(); decoding it then fails as one UserError naming the file and the set."""
    from PIL import Image

    from slug_lightning.datamodules.labelled import LabelledImages
    from slug_lightning.labelled_sets import LabelledSet

    root = copy_tree(Path(world.objects_dir), tmp_path / "objects")
    victim = sorted(p for p in root.rglob("*") if p.is_file())[0]
    jpeg = victim.with_suffix(".jpg")
    with Image.open(victim) as image:
        image.convert("RGB").resize((64, 64)).save(jpeg, format="JPEG")
    victim.unlink()
    jpeg.write_bytes(jpeg.read_bytes()[:-200])
    dataset = LabelledImages(LabelledSet("objects", root=str(root)))
    index = dataset.image_files.index(jpeg)
    with pytest.raises(UserError, match=rf"Labelled set 'objects': image '{jpeg}' cannot be decoded"):
        dataset[index]


# ----------------------------------------------------------------------------------------------------
# What a damaged shard loses


def _truncate_after(shard: Path, samples: int) -> int:
    """Cut a tar after its first ``samples`` samples (2 members each); returns how many samples it held."""
    import tarfile

    members = [m for m in tarfile.open(shard).getmembers() if m.isreg()]
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    cut = next(m for m in members if m.name.split(".")[0] == keys[samples])
    data = shard.read_bytes()
    shard.write_bytes(data[: cut.offset_data + 10])
    return len(keys)


def test_truncated_shard_counts_the_samples_its_stats_file_says_it_held(capsys, world, tmp_path):
    shards = copy_tree(Path(world.shards).parent, tmp_path / "shards")
    held = _truncate_after(shards / "00001.tar", 2)
    (shards / "00001_stats.json").write_text(json.dumps({"count": held + 3, "successes": held}))
    # Counted as one broken sample, the shard's loss (about a third of the world) stayed under the 5 % limit.
    # The captions are read from the tars: img2dataset's .parquet beside a tar knows nothing of the tar's damage
    # (the gradient pass finds it there, when it reads the shard).
    args = unlearn_args(
        world,
        tmp_path / "out",
        "--data.init_args.min_forget_pairs",
        "1",
        "--data.init_args.caption_index",
        "tar",
        shards=str(shards / "*.tar"),
    )
    refused(capsys, args, f"{held - 2} lost in 1 damaged shard(s)", "max_skipped_fraction=0.05")


def test_truncated_shard_without_img2dataset_files_is_a_lower_bound(world, tmp_path):
    shards = copy_tree(Path(world.shards).parent, tmp_path / "shards")
    _truncate_after(shards / "00001.tar", 2)
    (shards / "00001.parquet").unlink()  # the demo world writes img2dataset's index beside each shard
    scan = scan_shards(expand_shards(str(shards / "*.tar")))
    assert scan.lost == 1 and scan.lost_is_lower_bound
    with pytest.warns(UserWarning, match="counted as 1: a lower bound"):
        check_shards_readable(scan)
    with pytest.raises(UserError, match="are at least broken"):
        check_skipped(scan, 0.0)


# ----------------------------------------------------------------------------------------------------
# A concept that matches a large share of all captions


def test_alias_matching_most_captions_is_refused_unless_the_share_is_raised(capsys, world, tmp_path):
    concepts = [{"name": world.default_target, "aliases": ["a"]}]
    refused(
        capsys,
        unlearn_args(world, tmp_path / "out", concepts=concepts),
        f"{world.default_target!r} or 'a'",
        "above --data.init_args.max_forget_share=0.25",
        "--data.init_args.max_forget_share",
    )


def test_forget_share_warns_above_five_percent_and_refuses_above_the_limit(world):
    concept = Concept(world.default_target)
    scan = scan_shards(expand_shards(world.shards), [concept])
    assert WARN_FORGET_SHARE < scan.matches[concept.name] / scan.captions < 0.25  # one of the tiny world's 4 people
    with pytest.warns(UserWarning, match=r"match \d+ of \d+ captions of the shards .*, more than 5%"):
        check_forget_share(scan, [concept], 0.25, "the shards")
    with pytest.raises(UserError, match="above --data.init_args.max_forget_share=0.1"):
        check_forget_share(scan, [concept], 0.1, "the shards")
    rare = ShardScan(captions=1000, matches={concept.name: 25})  # 2.5 %, a person of the demo world
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_forget_share(rare, [concept], 0.25, "the shards")
