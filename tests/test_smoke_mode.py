"""A smoke run of a user's config (``unlearn --trainer.fast_dev_run true``, or ``N``): every stage runs briefly (the
gradient pass reads N batches per stream, the search makes at most 2 probes per layer), the artifacts go to
``OUTPUT_DIR/smoke`` and say it is a smoke run, a finished run beside it is left untouched, and its gradients are
never taken by a real run.

Each case runs the real command line in this process on a small demo world with the randomly initialised tiny CLIP.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import one_line_error

from slug_lightning import config_path
from slug_lightning.callbacks.step_search import SMOKE_MAX_STEPS
from slug_lightning.cli import main
from slug_lightning.concepts import Concept
from slug_lightning.demo import make_demo_world
from slug_lightning.gradient_key import key_changes
from slug_lightning.gradient_store import GradientStore
from slug_lightning.shard_scan import count_kept, scan_shards
from slug_lightning.shards import expand_shards

DEMO_UNLEARN = config_path("demo/unlearn.yaml")
BATCH = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_demo_world(
        tmp_path_factory.mktemp("world"),
        seed=0,
        people=12,
        objects=6,
        portraits_per_person=8,
        person_object_per_person=2,
        samples_per_object=8,
        scenery_samples=8,
        eval_per_person=4,
        eval_per_object=4,
        shards=2,
    )


def unlearn_args(world, weights, output: Path, *extra: str, concept: str | None = None) -> list[str]:
    """The demo config (a CSV logger, ``max_steps: 10``) on the small world; top-5 so that the random model knows the
    concept (with top-1 it has nothing to forget, and nothing would be searched)."""
    sets = [
        {"name": "identities", "root": str(world.identities_dir)},
        {"name": "objects", "root": str(world.objects_dir)},
    ]
    return [
        "unlearn",
        "--config",
        str(DEMO_UNLEARN),
        "--model.init_args.pretrained",
        str(weights),
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.shards",
        world.shards,
        "--data.init_args.batch_size",
        str(BATCH),
        "--data.init_args.concepts",
        json.dumps([{"name": concept or world.default_target}]),
        "--search.init_args.sets",
        json.dumps(sets),
        "--search.init_args.metric",
        "top5",
        "--search.init_args.similarity_classes",
        "0",
        "--output_dir",
        str(output),
        *extra,
    ]


def real_run(world, weights, output: Path, *extra: str) -> list[str]:
    """A normal run, kept short: no logger, 1 probe per layer."""
    return unlearn_args(
        world, weights, output, "--trainer.logger", "false", "--search.init_args.max_steps", "1", *extra
    )


def report_of(output: Path) -> dict:
    return json.loads((output / "report.json").read_text())


def files_of(output: Path) -> dict[str, tuple[bytes, int]]:
    """Every file directly in ``output``: its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in output.iterdir() if p.is_file()}


@pytest.mark.parametrize("fast_dev_run, batches", [("true", 1), ("2", 2)])
def test_a_smoke_run_runs_every_stage_briefly_and_says_so(
    world, tiny_weights, tmp_path, monkeypatch, capsys, caplog, fast_dev_run, batches
):
    monkeypatch.chdir(tmp_path)  # the demo config's CSV logger writes under the working directory
    output = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        code = main(
            unlearn_args(
                world, tiny_weights, output, "--trainer.fast_dev_run", fast_dev_run, "--require_forgotten", "true"
            )
        )
    printed = capsys.readouterr().out
    assert code == 0
    # Everything is in OUTPUT_DIR/smoke; Lightning's fast_dev_run kept the config's logger from writing.
    assert [p.name for p in output.iterdir()] == ["smoke"]
    assert not (tmp_path / "runs").exists()
    smoke = output / "smoke"
    report = report_of(smoke)
    assert report["smoke_run"] is True
    assert report["smoke"] == {"batches_per_stream": batches, "probes_per_layer": SMOKE_MAX_STEPS}
    assert report["verdict"] in ("forgotten", "partly forgotten", "not forgotten")  # still computed
    # The gradient pass read `batches` batches per stream, of the many the shards hold.
    all_retain = count_kept(
        expand_shards(world.shards), lambda caption: not Concept(world.default_target).matches(caption)
    )
    assert 0 < report["retain_samples"] <= BATCH * batches < all_retain
    assert 0 < report["concepts"][0]["forget_samples"] <= BATCH * batches
    assert GradientStore.load(smoke / "gradients.safetensors").key["batch_limit"] == batches
    # The search: at most 2 probes per searched layer (the config says max_steps: 10), and it did search.
    probes = Counter((p["concept"], p["layer"], p["round"], p["order"]) for p in report["search"])
    assert probes and max(probes.values()) <= SMOKE_MAX_STEPS
    assert report["settings"]["max_steps"] == 10
    # Marked as a smoke run in report.md (before anything else), the terminal, and the resolved config.
    markdown = (smoke / "report.md").read_text().splitlines()
    assert markdown[2].startswith("> **Smoke run") and "mean nothing" in markdown[2]
    assert "SLUG result (SMOKE RUN, the numbers mean nothing)" in printed
    assert f"fast_dev_run: {fast_dev_run}" in (smoke / "config.yaml").read_text()
    # --require_forgotten does not apply: whatever the verdict, the status is 0, and the run says why.
    assert "--require_forgotten is not applied to a smoke run" in caplog.text


@pytest.mark.e2e
def test_a_smoke_run_leaves_a_finished_run_alone_and_its_gradients_feed_no_real_run(
    world, tiny_weights, tmp_path, capsys, caplog
):
    output = tmp_path / "run"
    assert main(real_run(world, tiny_weights, output)) == 0
    finished = files_of(output)
    assert report_of(output)["smoke_run"] is False
    # A smoke run in the finished run's directory writes beside it (no --overwrite needed), twice: a smoke run
    # replaces an earlier one.
    for _ in range(2):
        assert (
            main(
                unlearn_args(world, tiny_weights, output, "--trainer.logger", "false", "--trainer.fast_dev_run", "true")
            )
            == 0
        )
        assert report_of(output / "smoke")["smoke_run"] is True
    assert files_of(output) == finished  # not a byte, not a timestamp changed
    smoke_store = output / "smoke" / "gradients.safetensors"
    capsys.readouterr()
    # A real run never takes the smoke run's gradients: given by --gradients they are refused ...
    one_line_error(
        capsys,
        real_run(world, tiny_weights, tmp_path / "other", "--gradients", str(smoke_store)),
        "was computed for other inputs",
        "batches read per stream the first 1",
        "→ all",
    )
    # ... and found where a real run keeps its own, they are recomputed, with one line saying why.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(smoke_store, fresh / "gradients.safetensors")
    with caplog.at_level(logging.INFO):
        assert main(real_run(world, tiny_weights, fresh)) == 0
    lines = [r.getMessage() for r in caplog.records if "recomputing the gradients" in r.getMessage()]
    assert len(lines) == 1 and "batches read per stream the first 1" in lines[0], caplog.text
    report = report_of(fresh)
    assert report["timing"]["reused_gradients"] is False
    assert report["retain_samples"] == report_of(output)["retain_samples"] > BATCH
    assert GradientStore.load(fresh / "gradients.safetensors").key["batch_limit"] is None
    # A real run's store given by --gradients is checked as a real run checks it, and a smoke run uses it.
    given = tmp_path / "given"
    assert (
        main(
            unlearn_args(
                world,
                tiny_weights,
                given,
                "--trainer.logger",
                "false",
                "--trainer.fast_dev_run",
                "true",
                "--gradients",
                str(fresh / "gradients.safetensors"),
            )
        )
        == 0
    )
    report = report_of(given / "smoke")
    assert report["timing"]["reused_gradients"] is True and report["smoke"]["batches_per_stream"] is None
    assert "reused gradients" in (given / "smoke" / "report.md").read_text()


def test_the_gradient_key_records_the_batch_limit():
    full = {"model": "slug-tiny", "fingerprint": "f", "batch_limit": None}
    assert key_changes(full, {**full, "batch_limit": 1}) == [
        "batches read per stream all → the first 1 (a smoke run or limit_predict_batches)"
    ]
    assert key_changes({"model": "slug-tiny", "fingerprint": "f"}, full) == []  # keys written before it: full passes


def test_what_a_smoke_run_refuses(world, tiny_weights, tmp_path, capsys):
    # A real run's report where the smoke run would write.
    taken = tmp_path / "taken"
    (taken / "smoke").mkdir(parents=True)
    (taken / "smoke" / "report.json").write_text(json.dumps({"smoke_run": False}))
    one_line_error(
        capsys,
        unlearn_args(world, tiny_weights, taken, "--trainer.fast_dev_run", "true"),
        "smoke",
        "already holds a finished run",
    )
    # A baseline method: its iterations read all the data whatever the Trainer's limits.
    one_line_error(
        capsys,
        unlearn_args(world, tiny_weights, tmp_path / "gaft", "--trainer.fast_dev_run", "true", "--method", "gaft"),
        "--trainer.fast_dev_run",
        "--method gaft",
    )
    assert not (tmp_path / "gaft").exists()
    # Too few forget pairs: the smoke run's pre-flight reads captions until there are enough, here every one of
    # them, and says so in one line, as a real run does.
    captions = count_kept(expand_shards(world.shards))
    one_line_error(
        capsys,
        unlearn_args(
            world,
            tiny_weights,
            tmp_path / "few",
            "--trainer.fast_dev_run",
            "true",
            "--data.init_args.min_forget_pairs",
            "1000",
        ),
        f"in {captions} captions",
        "min_forget_pairs=1000",
    )
    assert not (tmp_path / "few" / "smoke" / "gradients.safetensors").exists()


def test_the_smoke_pre_flight_reads_captions_only_until_every_concept_has_enough(world):
    urls = expand_shards(world.shards)
    concept = Concept(world.default_target)
    first = scan_shards(urls[:1], [concept]).matches[concept.name]
    assert first >= 1
    assert scan_shards(urls, [concept], enough=first).shards == 1
    assert scan_shards(urls, [concept], enough=first + 10**6).shards == len(urls) == 2
    assert scan_shards(urls, [concept]).shards == 2
