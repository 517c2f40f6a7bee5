"""README claims no other test checks (issue 23): ``evaluate --output``, ``SLUG_DEBUG=1``,
``--search.init_args.cache_on_cpu`` and a dead DDP rank.

Each test calls the CLI in this process, except the dead rank's, which needs a process to kill.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time
import traceback

import open_clip
import pytest
import torch
from conftest import one_line_error  # noqa: E402  (conftest.py is importable from the tests)
from test_probe_reuse import PEOPLE, _evaluator, _images  # noqa: E402

from slug_lightning import config_path
from slug_lightning.callbacks import StepSearch
from slug_lightning.cli import main
from slug_lightning.datamodules import LabelledSet, ZeroShotDataModule
from slug_lightning.demo import load_demo_world, make_demo_world
from slug_lightning.evaluation import ZeroShotEvaluator
from slug_lightning.gradient_store import GradientStore
from slug_lightning.layers import candidate_layers
from slug_lightning.zero_shot import accuracy

EVALUATE = [
    "evaluate",
    "--model",
    "slug_lightning.ZeroShotModule",
    "--data",
    "slug_lightning.datamodules.ZeroShotDataModule",
    "--trainer.logger",
    "false",
]


# --- `python -m slug_lightning evaluate --config configs/demo/evaluate.yaml    # a table, and JSON with --output`


def test_evaluate_prints_a_table_and_writes_the_accuracies_as_json(small_demo, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the config's relative paths must not be what is read or written
    world = load_demo_world(small_demo / "world")
    checkpoint = small_demo / "fit" / "slug-tiny.safetensors"
    sets = [
        LabelledSet("identities", root=str(world.identities_dir)),
        LabelledSet("objects", root=str(world.objects_dir)),
    ]
    output = tmp_path / "not" / "yet" / "accuracy.json"  # a missing directory is made
    assert (
        main(
            [
                "evaluate",
                "--config",
                config_path("demo/evaluate.yaml"),
                "--model.init_args.pretrained",
                str(checkpoint),
                "--data.init_args.sets",
                json.dumps([{"name": s.name, "root": s.root} for s in sets]),
                "--trainer.enable_progress_bar",
                "false",
                "--output",
                str(output),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    written = json.loads(output.read_text())
    assert list(written) == ["identities", "objects"]

    # The reference: the checkpoint loaded by open_clip itself, evaluated by the package's count tables.
    model, _, preprocess = open_clip.create_model_and_transforms("slug-tiny", pretrained=str(checkpoint))
    datamodule = ZeroShotDataModule(sets)
    datamodule.transform = preprocess
    counts = ZeroShotEvaluator(model.eval(), open_clip.get_tokenizer("slug-tiny"), datamodule).run()
    assert "zero-shot accuracy (%)" in printed
    rows = {line.split()[0]: line.split()[1:] for line in printed.splitlines() if line.split()}
    for name in ("identities", "objects"):
        expected = accuracy(counts[name])
        assert written[name]["count"] == expected["count"] == len(datamodule.datasets()[name]) > 0
        for key in ("top1", "top5"):
            assert written[name][key] == pytest.approx(expected[key], abs=1e-9), (name, key)
        # the table's row of the set: top-1 and top-5 in percent, then the image count
        assert rows[name] == [
            f"{100 * expected['top1']:.1f}",
            f"{100 * expected['top5']:.1f}",
            str(expected["count"]),
        ], printed


def test_evaluate_output_under_a_file_is_one_line_before_evaluating(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").write_text("")
    # The set's folder does not exist: only the check before the evaluation can answer first.
    one_line_error(
        capsys,
        [
            *EVALUATE,
            "--data.init_args.sets",
            "[{name: a, root: nowhere}]",
            "--output",
            str(tmp_path / "results" / "accuracy.json"),
        ],
        "--output",
        "lies under",
        "which is a file",
    )
    assert (tmp_path / "results").read_text() == ""


# --- "Input errors print one line (`error: ...`) and exit with status 2; `SLUG_DEBUG=1` shows the traceback."


def test_slug_debug_shows_the_traceback_of_an_input_error(capsys, tmp_path, monkeypatch):
    """``python -m slug_lightning`` run in this process (``runpy``), so the exit status is the one a shell sees:
    without the variable SystemExit(2) and one line; with it the error escapes ``main``, and the interpreter
    prints its traceback and exits with 1."""
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "missing.safetensors"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "slug_lightning",
            *EVALUATE,
            "--model.init_args.pretrained",
            str(missing),
            "--data.init_args.sets",
            "[{name: a, root: nowhere}]",
        ],
    )
    message = f"Checkpoint file '{missing}' does not exist."

    monkeypatch.delenv("SLUG_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("slug_lightning", run_name="__main__")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [f"error: {message}"]

    monkeypatch.setenv("SLUG_DEBUG", "1")
    with pytest.raises(Exception) as raised:  # not SystemExit: that would pass this by and fail the test
        runpy.run_module("slug_lightning", run_name="__main__")
    shown = "".join(traceback.format_exception(raised.value))
    assert shown.startswith("Traceback (most recent call last)")
    assert f"ModelLoadError: {message}" in shown  # the user's error, in the chain jsonargparse wrapped it in
    assert "error:" not in capsys.readouterr().err


# --- "`--search.init_args.cache_on_cpu true` keeps it [the probe cache] in host memory"


@pytest.fixture(scope="module")
def probe_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_on_cpu")
    return [
        LabelledSet("people", root=_images(root / "people", PEOPLE, 4, seed=0), templates=["a photo of {}."]),
        LabelledSet("things", root=_images(root / "things", ["cup", "hat", "kite"], 5, seed=1)),
    ]


def test_cache_on_cpu_keeps_the_probe_caches_on_the_cpu_and_changes_no_result(tiny_clip, probe_sets, monkeypatch):
    """On a GPU the point is where the stage caches live (host memory, not the accelerator's), which a CPU-only
    machine cannot show: here both settings compute on the CPU. What is checked is that the option reaches the
    search's evaluator as ``cache_device="cpu"`` (the default lets the cache follow the compute device), that the
    cached stage inputs are CPU tensors, and that the probes and the choice are those of the default."""
    model = tiny_clip.model
    generator = torch.Generator().manual_seed(5)
    parameters = dict(model.named_parameters())
    names = candidate_layers(model.named_parameters())
    forget, retain = ({n: torch.randn(parameters[n].shape, generator=generator) for n in names} for _ in range(2))
    # a person the random model places in its top 5 at least once, so that there is something to forget
    evaluator = _evaluator(tiny_clip, probe_sets)
    target = next(name for name, row in zip(evaluator.class_names("people"), evaluator.run()["people"]) if row[2])
    store = GradientStore(forget={target: forget}, retain=retain, forget_samples={target: 1}, retain_samples=1)

    built, cached = [], []

    class Recorded(ZeroShotEvaluator):
        """The search's evaluator, noting its arguments and every stage input it caches (the final evaluation
        drops the caches, so they are seen as they are stored)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append((kwargs, self))

        def _store(self, hidden):
            stored = super()._store(hidden)
            cached.append(stored.device)
            return stored

    monkeypatch.setattr(importlib.import_module(StepSearch.__module__), "ZeroShotEvaluator", Recorded)
    results = {}
    for cache_on_cpu in (False, True):
        built.clear()
        cached.clear()
        search = StepSearch(
            sets=probe_sets, metric="top5", max_steps=4, batch_size=7, apply=False, cache_on_cpu=cache_on_cpu
        )
        result = search.run(model, tiny_clip.tokenizer, tiny_clip.preprocess, store)
        assert built, "the search builds its evaluator through ZeroShotEvaluator"
        for kwargs, evaluator in built:
            assert kwargs["cache_device"] == ("cpu" if cache_on_cpu else None)
            assert evaluator.cache_device == torch.device("cpu")
        assert cached and all(device.type == "cpu" for device in cached)
        results[cache_on_cpu] = (
            [dataclasses.replace(p, seconds=0.0) for p in result.probes],
            result.chosen[target].layer,
            result.chosen[target].step_size,
            result.after,
        )
    assert results[False][0] and results[True] == results[False]


# --- "A dead DDP rank makes the others fail instead of hanging"

# The unlearn command, with rank 1 (the copy Lightning's "ddp" launcher starts, LOCAL_RANK=1) killing itself with
# SIGKILL right after its `KILL_AFTER`-th partial checkpoint, in the middle of the gradient pass. It notes the
# time of its death first, so that the test can tell how long rank 0 outlived it.
DYING_RANK = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from slug_lightning.gradients import GradientCollector
    from slug_lightning.cli import main

    save = GradientCollector._save_partial
    saves = []

    def save_then_die(self):
        save(self)
        saves.append(1)
        if os.environ.get("LOCAL_RANK") == "1" and len(saves) == int(os.environ["KILL_AFTER"]):
            Path(os.environ["DEATH_FILE"]).write_text(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)

    GradientCollector._save_partial = save_then_die
    sys.exit(main(sys.argv[1:]))
""")
# rank 0 must end well within this after rank 1's death; the configured collective timeout (10 minutes in
# configs/trainer/ddp_cpu.yaml) is the last resort, and a run that waited for it would count as hung here
SECONDS_TO_FAIL = 60
HUNG = 240  # the whole command, start-up included; below pytest-timeout's 300 s, so the group is cleaned up here


@pytest.mark.ddp
def test_a_dead_ddp_rank_fails_the_run_instead_of_hanging(tmp_path, tiny_weights):
    world = make_demo_world(
        tmp_path / "world",
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
    script, output, death = tmp_path / "dying_rank.py", tmp_path / "run", tmp_path / "rank1_died_at"
    script.write_text(DYING_RANK)  # a file: the launcher starts rank 1 as `python <sys.argv[0]> ...`
    sets = [{"name": "identities", "root": str(world.identities_dir)}]
    command = [
        sys.executable,
        str(script),
        "unlearn",
        "--config",
        config_path("demo/unlearn.yaml"),
        "--config",
        config_path("trainer/ddp_cpu.yaml"),
        "--search.init_args.audit=false",
        "--model.init_args.pretrained",
        str(tiny_weights),
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
        # 16 a global batch: the target's ~10 pairs in 1 batch, the 66 retain pairs in 5; the 3rd
        # checkpoint follows the 2nd retain batch, whose loss gathers features across the ranks
        "--data.init_args.batch_size",
        "16",
        "--search.init_args.sets",
        json.dumps(sets),
        "--search.init_args.metric",
        "top5",
        "--search.init_args.max_steps",
        "2",
        "--output_dir",
        str(output),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AFTER": "3", "DEATH_FILE": str(death)}
    env.pop("LOCAL_RANK", None)
    # A session of its own, so that a hung run's ranks can all be ended here (they share its process group).
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        log, _ = process.communicate(timeout=HUNG)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        pytest.fail(f"the run still ran {HUNG} s after it started (rank 1 died: {death.exists()}):\n{log[-3000:]}")
    ended = time.time()
    assert death.exists(), f"rank 1 did not reach its 3rd checkpoint:\n{log[-3000:]}"
    outlived = ended - float(death.read_text())
    print(f"rank 0 ended {outlived:.1f} s after rank 1 died, with status {process.returncode}")
    assert process.returncode != 0, log[-3000:]
    assert outlived < SECONDS_TO_FAIL, log[-3000:]
    # Nothing is left that looks finished: no gradients, no report, no model; rank 1's partial sums stay.
    for name in ("gradients.safetensors", "report.json", "model.safetensors"):
        assert not (output / name).exists(), name
    assert (output / "gradients.partial.rank1-of-2.safetensors").is_file()
