"""Shared fixtures and the suite's rules.

- Nothing reaches the Hugging Face hub, and every test and child process computes on one thread: the README's
  test command runs two pytest-xdist workers on a 2-core machine.
- The session fixtures that build a fitted world (``small_demo``, ``small_run``) are built once for the whole
  run, whichever worker asks first, under a file lock, and are read-only afterwards (checked at the end): a test
  that needs to change one copies it. The README's full demo runs once, in its own test (test_end_to_end.py).
- Tests that use a fitted world are marked ``e2e`` here (``-m "not e2e"`` skips them); ``ddp`` tests run one
  after the other on one worker; the longest tests are scheduled first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning  # noqa: F401 - imported here, its log handlers hold the real stderr, not one test's captured stream
import pytest
import torch
from filelock import FileLock

import slug_lightning.models  # noqa: F401 - registers the package's model configs (slug-tiny) with open_clip

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# Child processes (the CLI in a subprocess, DDP ranks) inherit these: one thread each, like the workers.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# Fixtures that hold a fitted world: a test using one is an end-to-end run.
E2E_FIXTURES = {"small_demo", "small_run"}
# Scheduled first, longest first, so that no long test starts last on a worker (the rest keep file order).
FIRST = (
    "test_end_to_end.py::test_readme_demo",
    "test_multi_concept.py::test_three_people",
    "test_ddp_gradients.py",
    "test_end_to_end.py::test_two_process_ddp",
)


def pytest_configure(config: pytest.Config) -> None:
    # huggingface_hub and datasets read these when first imported, which happens while test modules are
    # collected, before any fixture runs; so they are set here too.
    os.environ.update(OFFLINE)
    os.environ.update(ONE_THREAD)
    # Input errors must be one line (what the tests check), even in a shell where a developer set SLUG_DEBUG.
    os.environ.pop("SLUG_DEBUG", None)
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("ddp"):
            item.add_marker(pytest.mark.xdist_group("ddp"))

    def rank(item: pytest.Item) -> int:
        return next((i for i, name in enumerate(FIRST) if name in item.nodeid), len(FIRST))

    items.sort(key=rank)


def shared_path(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A path every xdist worker of this run sees (the workers' common temporary root)."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent
    return root / name


# Each shared folder this worker used, with its files' sizes and times when it was handed out.
_SHARED: dict[Path, list[tuple[str, int, int]]] = {}


def _listing(path: Path) -> list[tuple[str, int, int]]:
    return sorted(
        (str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in path.rglob("*") if f.is_file()
    )


def build_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``build(path)`` once per run across workers; a build that failed or was interrupted is redone."""
    path = shared_path(tmp_path_factory, name)
    done = path / ".built"
    with FileLock(f"{path}.lock"):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            build(path)
            done.touch()
    _SHARED.setdefault(path, _listing(path))
    return path


@pytest.fixture(scope="session", autouse=True)
def shared_folders_stay_unchanged():
    """Fails the run if a test wrote into a shared folder (the other worker may be reading it)."""
    yield
    changed = [str(path) for path, listing in _SHARED.items() if _listing(path) != listing]
    assert not changed, f"a test changed the shared fixture folder(s) {changed}; copy one before changing it"


@pytest.fixture(scope="session", autouse=True)
def offline_hub():
    """Nothing in the tests may download weights or datasets."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in OFFLINE.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="session")
def tiny_clip():
    """The packaged ``slug-tiny`` CLIP, randomly initialised with a fixed seed, in eval mode.

    Session-scoped: tests must not modify its weights (or must restore them before returning).
    """
    import slug_lightning

    torch.manual_seed(0)
    return slug_lightning.load_clip("slug-tiny")


def one_line_error(capsys, args: list[str], *words: str) -> str:
    """Run the CLI in this process; assert exit 2 with exactly one ``error:`` line of at most 200 characters holding
    ``words``, no usage and no traceback; return the line."""
    from slug_lightning.cli import main

    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and "usage:" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    # At most 200 characters, not counting the paths it quotes (a user's path is as long as it is).
    assert len(re.sub(r"'[^']*/[^']*'", "''", lines[0])) <= 200, lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def run_cli(*args, cwd=None) -> str:
    """``python -m slug_lightning ARGS`` in a subprocess; asserts success and returns its output."""
    command = [sys.executable, "-m", "slug_lightning", *map(str, args)]
    # A bound, so that a run that hangs (a rank waiting for one that is gone) fails instead of stalling the suite.
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory, tiny_clip):
    """The session's ``tiny_clip`` weights as a safetensors checkpoint file (a ``pretrained`` to load them from)."""
    from slug_lightning.artifacts import save_state_dict

    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_state_dict(path, tiny_clip.model.state_dict())
    return path


# --- worlds shared by the whole run -------------------------------------------------------------------------

# A fifth of the demo world: 12 people, 6 object kinds, 4 shards, 8 evaluation images per class.
SMALL_WORLD = {
    "people": 12,
    "objects": 6,
    "portraits_per_person": 60,
    "person_object_per_person": 10,
    "samples_per_object": 60,
    "scenery_samples": 60,
    "eval_per_person": 8,
    "eval_per_object": 8,
    "shards": 4,
}
# The demo's fit settings (configs/demo/fit.yaml), shorter and on smaller batches: about a minute on one thread.
SMALL_FIT = [
    "--trainer.max_steps=200",
    "--data.init_args.batch_size=64",
    "--data.init_args.num_workers=0",
    "--trainer.enable_progress_bar=false",
]


def _build_small_demo(path: Path) -> None:
    import yaml

    from slug_lightning import config_path
    from slug_lightning.cli import main
    from slug_lightning.demo import make_demo_world, unlearn_paths

    world = make_demo_world(path / "world", seed=0, **SMALL_WORLD)
    checkpoint = path / "fit" / "slug-tiny.safetensors"
    assert (
        main(
            [
                "fit",
                "--config",
                str(config_path("demo/fit.yaml")),
                "--seed_everything=0",
                *SMALL_FIT,
                f"--trainer.default_root_dir={path / 'fit'}",
                f"--model.init_args.export_path={checkpoint}",
                f"--data.init_args.shards={world.shards}",
            ]
        )
        == 0
    )
    # Runs made from this config must be given their own --output_dir; the default points at a folder that
    # does not exist, so one that forgets fails instead of writing here.
    paths = unlearn_paths(path / "no_output_dir_given" / "run", world, checkpoint, world.default_target)
    paths["trainer"]["logger"] = False
    # The audit at the end of a run is tested once, on small_run; the other runs of this world skip it.
    paths["search"]["init_args"]["audit"] = False
    (path / "demo_paths.yaml").write_text(yaml.safe_dump(paths, sort_keys=False))


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """The demo on a small world, fitted once per run: ``world/``, ``fit/slug-tiny.safetensors`` and
    ``demo_paths.yaml`` (the config layered after ``configs/demo/unlearn.yaml``; give ``--output_dir``)."""
    return build_once(tmp_path_factory, "small_demo", _build_small_demo)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, small_demo) -> tuple[Path, dict]:
    """One finished ``unlearn`` of the small demo's default target, audited at its end: (output dir, report)."""
    from slug_lightning import config_path
    from slug_lightning.cli import main

    def build(path: Path) -> None:
        assert (
            main(
                [
                    "unlearn",
                    "--config",
                    str(config_path("demo/unlearn.yaml")),
                    "--config",
                    str(small_demo / "demo_paths.yaml"),
                    "--trainer.enable_progress_bar=false",
                    # The audit at the end, with a relearning budget of seconds (tests/test_audit_command.py).
                    "--search.init_args.audit=true",
                    "--audit.relearn_ks=[4]",
                    "--audit.relearn_steps=4",
                    "--audit.relearn_every=2",
                    "--output_dir",
                    str(path),
                ]
            )
            == 0
        )

    output = build_once(tmp_path_factory, "small_run", build)
    return output, json.loads((output / "report.json").read_text())
