"""Shared fixtures: the packaged tiny CLIP, and a test session that can never reach the Hugging Face hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def pytest_configure(config: pytest.Config) -> None:
    # huggingface_hub and datasets read these when first imported, which happens while test modules are
    # collected, before any fixture runs; so they are set here too.
    os.environ.update(OFFLINE)


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


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread, restoring the setting after.

    On a busy 2-core machine, tiny convolutions on two OpenMP threads that wait for each other's core run
    many times slower (measured: 0.2 s → 10 s for one evaluator test).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_line_error(capsys, args: list[str], *words: str) -> str:
    """Run the CLI in this process; assert exit 2 with exactly one ``error:`` line holding ``words`` and no
    traceback; return the line."""
    from slug_lightning.cli import main

    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def run_cli(*args, cwd=None) -> str:
    """``python -m slug_lightning ARGS`` in a subprocess; asserts success and returns its output."""
    result = subprocess.run([sys.executable, "-m", "slug_lightning", *map(str, args)], capture_output=True,
                            text=True, cwd=cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory, tiny_clip):
    """The session's ``tiny_clip`` weights as a safetensors checkpoint file (a ``pretrained`` to load them from)."""
    from slug_lightning.artifacts import save_state_dict

    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_state_dict(path, tiny_clip.model.state_dict())
    return path


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The README's demo, run once per session as a subprocess: (output dir, report, log); shared by the
    end-to-end tests of several modules, which read its world and fit and write their own runs elsewhere."""
    output = tmp_path_factory.mktemp("demo")
    log = run_cli("demo", "--output_dir", output)
    return output, json.loads((output / "report.json").read_text()), log


@pytest.fixture(scope="session")
def demo_dir(request):
    """A finished demo directory (world/, fit/, demo_paths.yaml): ``$SLUG_DEMO_DIR`` if it holds one (to rerun
    the end-to-end tests without refitting), else the session's demo."""
    from pathlib import Path

    given = os.environ.get("SLUG_DEMO_DIR")
    if given and (Path(given) / "fit" / "slug-tiny.safetensors").is_file():
        return Path(given)
    return request.getfixturevalue("demo")[0]
