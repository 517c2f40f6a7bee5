"""Faults in the gradient pass: a killed run resumes to the same gradients, NaN/Inf stops the pass naming
the batch, broken samples over the limit fail the run, and the same config gives the same report twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slug_lightning import GradientCollector, SlugTrainer, config_path
from slug_lightning.concepts import Concept
from slug_lightning.datamodules import LaionDataModule
from slug_lightning.demo import make_demo_world
from slug_lightning.errors import UserError
from slug_lightning.gradient_store import GradientStore

DEMO_UNLEARN = config_path("demo/unlearn.yaml")
PARTIAL = "gradients.partial.safetensors"


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


@pytest.fixture(scope="module")
def weights(tiny_weights):
    return tiny_weights


def cli_args(world, weights, output: Path, *extra: str) -> list[str]:
    sets = [
        {"name": "identities", "root": str(world.identities_dir)},
        {"name": "objects", "root": str(world.objects_dir)},
    ]
    return [
        "unlearn",
        "--config",
        str(DEMO_UNLEARN),
        "--search.init_args.audit=false",
        "--model.init_args.pretrained",
        str(weights),
        "--model.init_args.checkpoint_every",
        "1",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.shards",
        world.shards,
        "--data.init_args.concepts",
        json.dumps([{"name": world.default_target}]),
        "--data.init_args.batch_size",
        "16",
        "--search.init_args.sets",
        json.dumps(sets),
        # 4 people: every forget top-5 stays 1, so the random model's target is searched (not "nothing to forget")
        "--search.init_args.metric",
        "top5",
        "--search.init_args.max_steps",
        "2",
        "--output_dir",
        str(output),
        *extra,
    ]


# A real SIGKILL, sent by the process to itself right after its `kill_after`-th partial checkpoint is on disk.
KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from slug_lightning.gradients import GradientCollector
    from slug_lightning.cli import main

    kill_after = int(os.environ["KILL_AFTER"])
    save = GradientCollector._save_partial
    saves = []

    def save_then_die(self):
        save(self)
        saves.append(1)
        if len(saves) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    GradientCollector._save_partial = save_then_die
    sys.exit(main(sys.argv[1:]))
""")


def run_cli(args: list[str], kill_after: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_after is None:
        command = [sys.executable, "-m", "slug_lightning", *args]
    else:
        command = [sys.executable, "-c", KILLED_RUN, *args]
        env["KILL_AFTER"] = str(kill_after)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(world, weights, tmp_path_factory) -> Path:
    """The output directory of one uninterrupted run of the command the tests below kill and repeat."""
    output = tmp_path_factory.mktemp("uninterrupted")
    done = run_cli(cli_args(world, weights, output))
    assert done.returncode == 0, done.stderr[-3000:]
    return output


@pytest.mark.e2e
@pytest.mark.parametrize("kill_after", [1, 3])  # in the forget stream's only batch; in the retain stream
def test_killed_gradient_pass_resumes_to_the_same_gradients(world, weights, tmp_path, kill_after, uninterrupted):
    reference = uninterrupted

    output = tmp_path / "killed"
    killed = run_cli(cli_args(world, weights, output), kill_after=kill_after)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (output / PARTIAL).is_file() and not (output / "gradients.safetensors").exists()

    resumed = run_cli(cli_args(world, weights, output))  # the same command again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming the gradient pass" in resumed.stdout + resumed.stderr
    assert not (output / PARTIAL).exists()

    expected = load_file(str(reference / "gradients.safetensors"))
    got = load_file(str(output / "gradients.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    a, b = GradientStore.load(reference / "gradients.safetensors"), GradientStore.load(output / "gradients.safetensors")
    assert (a.forget_samples, a.retain_samples, a.skipped_samples) == (
        b.forget_samples,
        b.retain_samples,
        b.skipped_samples,
    )
    report_a = json.loads((reference / "report.json").read_text())
    report_b = json.loads((output / "report.json").read_text())
    assert [c["layer"] for c in report_a["concepts"]] == [c["layer"] for c in report_b["concepts"]]


class _Crash(Exception):
    pass


def _crash_after_first_checkpoint(collector: GradientCollector) -> GradientCollector:
    save = collector._save_partial

    def save_then_crash():
        save()
        raise _Crash

    collector._save_partial = save_then_crash
    return collector


def _collector(seed: int, partial: Path | None, checkpoint_every: int = 1) -> GradientCollector:
    torch.manual_seed(seed)  # the random weights of the tiny CLIP
    collector = GradientCollector("slug-tiny", checkpoint_every=checkpoint_every)
    collector.partial_path = partial
    collector.store_path = None if partial is None else partial.parent / "gradients.safetensors"  # as unlearn does
    return collector


def test_in_process_resume_and_a_partial_of_another_run_is_ignored(world, tmp_path):
    reference = _collector(0, None)
    _trainer().predict(reference, datamodule=_laion(world), return_predictions=False)

    partial = tmp_path / PARTIAL
    with pytest.raises(_Crash):
        _trainer().predict(
            _crash_after_first_checkpoint(_collector(0, partial)), datamodule=_laion(world), return_predictions=False
        )
    assert partial.is_file()

    # Other weights: the partial sums are not theirs, so the pass starts over (and matches a fresh run).
    other_reference = _collector(1, None)
    _trainer().predict(other_reference, datamodule=_laion(world), return_predictions=False)
    other = _collector(1, partial, checkpoint_every=0)
    with pytest.warns(UserWarning, match="belong to another run"):
        _trainer().predict(other, datamodule=_laion(world), return_predictions=False)
    assert other.resumed_from is None
    for name, grad in other_reference.gradients.retain.items():
        assert torch.equal(grad, other.gradients.retain[name]), name

    # `other` finished with partial_path and store_path set: it wrote its store and removed the partial file.
    assert not partial.exists() and (tmp_path / "gradients.safetensors").is_file()
    with pytest.raises(_Crash):
        _trainer().predict(
            _crash_after_first_checkpoint(_collector(0, partial)), datamodule=_laion(world), return_predictions=False
        )
    resumed = _collector(0, partial)
    _trainer().predict(resumed, datamodule=_laion(world), return_predictions=False)
    assert resumed.resumed_from == {world.default_target: 1, "retain": 0}
    for stream in (world.default_target,):
        for name, grad in reference.gradients.forget[stream].items():
            assert torch.equal(grad, resumed.gradients.forget[stream][name]), name
    for name, grad in reference.gradients.retain.items():
        assert torch.equal(grad, resumed.gradients.retain[name]), name
    assert resumed.gradients.forget_samples == reference.gradients.forget_samples
    assert resumed.gradients.retain_samples == reference.gradients.retain_samples


def _trainer():
    return SlugTrainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )


def _laion(world, **kwargs):
    return LaionDataModule(world.shards, concepts=[Concept(world.default_target)], batch_size=16, **kwargs)


# ----------------------------------------------------------------------------------------------------
# NaN / Inf


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nan_stops_the_pass_naming_the_batch(world, where):
    torch.manual_seed(0)
    collector = GradientCollector("slug-tiny")
    layer = collector.candidates()[0]
    if where == "loss":
        with torch.no_grad():
            collector.model.visual.proj[0, 0] = float("nan")  # NaN image features: the forget loss is NaN
    else:
        # a finite loss whose gradient of one candidate tensor is not: the hook makes it inf/NaN
        dict(collector.model.named_parameters())[layer].register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(FloatingPointError) as error:
        _trainer().predict(collector, datamodule=_laion(world), return_predictions=False)
    message = str(error.value)
    assert f"'{world.default_target}'" in message and "batch 0" in message and "keys [" in message
    assert ("loss is nan" in message) if where == "loss" else ("NaN or infinite" in message and layer in message)


# ----------------------------------------------------------------------------------------------------
# Broken samples over the limit


def test_undecodable_images_over_the_limit_fail_after_the_pass(world, tmp_path):
    """Images that only decoding finds broken are counted in the pass and checked against the limit."""
    import shutil

    import webdataset as wds

    shards = tmp_path / "shards"
    shutil.copytree(Path(world.shards).parent, shards)
    with wds.TarWriter(str(shards / "00003.tar")) as writer:
        for i in range(6):
            writer.write({"__key__": f"bad{i}", "png": b"not a png", "txt": "scenery, a broken picture"})
    laion = LaionDataModule(str(shards / "*.tar"), concepts=[Concept(world.default_target)], batch_size=16)
    torch.manual_seed(0)
    with pytest.raises(UserError, match=r"6 of \d+ samples .* max_skipped_fraction=0.05"):
        _trainer().predict(GradientCollector("slug-tiny"), datamodule=laion, return_predictions=False)
    torch.manual_seed(0)
    lenient = GradientCollector("slug-tiny", max_skipped_fraction=0.5)
    _trainer().predict(lenient, datamodule=laion, return_predictions=False)
    assert lenient.gradients.skipped_samples == 6


# ----------------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.e2e
def test_same_config_gives_the_same_report(world, weights, tmp_path, uninterrupted):
    result = run_cli(cli_args(world, weights, tmp_path / "again"))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (json.loads((path / "report.json").read_text()) for path in (uninterrupted, tmp_path / "again"))
    assert a["concepts"] == b["concepts"]
    assert a["before"] == b["before"] and a["after"] == b["after"]
    assert a["concepts"][0]["step_size"] > 0
    strip = [{k: v for k, v in probe.items() if k != "seconds"} for probe in a["search"]]
    assert strip and strip == [{k: v for k, v in probe.items() if k != "seconds"} for probe in b["search"]]


# ----------------------------------------------------------------------------------------------------
# Atomic partial checkpoints


def test_a_checkpoint_that_fails_midway_leaves_the_previous_one_intact(world, tmp_path, monkeypatch):
    import safetensors.torch

    partial = tmp_path / PARTIAL
    collector = _collector(0, partial)
    with pytest.raises(_Crash):
        _trainer().predict(_crash_after_first_checkpoint(collector), datamodule=_laion(world), return_predictions=False)
    before = partial.read_bytes()

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        collector._save_partial()
    assert partial.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [PARTIAL]  # no temporary file left behind
