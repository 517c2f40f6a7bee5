"""Reproducible records: the software and commit in report.json, weights named by content (never a local path) in
the files a run ships, and a reproduce command that runs when copied."""

from __future__ import annotations

import functools
import hashlib
import json
import shlex
import shutil
import subprocess
from pathlib import Path

import lightning
import pytest
import torch
from safetensors import safe_open

from slug_lightning import provenance
from slug_lightning.cli import main
from slug_lightning.deltas import Provenance, make_delta, write_checkpoint, write_delta
from slug_lightning.provenance import git_state, package_versions, public_identity, weights_source
from slug_lightning.report_render import render_markdown, reproduce_lines
from slug_lightning.reproduce import moved_settings, reproduce_command
from slug_lightning.trainer import SlugTrainer

DEMO_UNLEARN = Path(__file__).resolve().parents[1] / "configs" / "demo" / "unlearn.yaml"
GIT = shutil.which("git")


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- software ---------------------------------------------------------------------------------------------


def test_package_versions_are_the_imported_ones():
    versions = package_versions()
    assert set(versions) == {"torch", "lightning", "torchmetrics", "open_clip_torch", "webdataset", "safetensors"}
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert versions["lightning"] == lightning.__version__


def _git(root: Path, *args: str) -> str:
    command = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    return subprocess.run([*command, *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(GIT is None, reason="git is not installed")
def test_git_state_names_the_commit_and_a_modified_checkout(tmp_path):
    root = tmp_path / "checkout"
    (root / "slug_lightning").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\n")
    (root / "slug_lightning" / "__init__.py").write_text("")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "x")
    assert provenance.checkout_root(root / "slug_lightning") == root.resolve()
    assert git_state(root) == {"commit": _git(root, "rev-parse", "HEAD"), "dirty": False}
    (root / "notes.txt").write_text("untracked files are not changes to the code")
    assert git_state(root)["dirty"] is False
    (root / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert git_state(root)["dirty"] is True
    # A folder inside a repository is not a checkout of its own (an installed copy inside someone's project).
    (root / "site-packages").mkdir()
    assert git_state(root / "site-packages") is None


def test_no_commit_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
    (tmp_path / "slug_lightning").mkdir()
    assert provenance.checkout_root(tmp_path / "slug_lightning") is None  # no pyproject.toml, no .git
    assert git_state(tmp_path) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on the path: recorded as unknown, the run goes on
    assert git_state(Path(__file__).parent) is None
    record = provenance.software()
    assert record["commit"] is None and record["dirty"] is None
    assert record["slug_lightning"] and record["packages"]["torch"]


def test_report_md_shows_the_software_and_a_command_into_a_fresh_directory():
    software = {
        "python": "3.11.7",
        "slug_lightning": "0.1.0",
        "commit": "0123456789abcdef0123",
        "dirty": True,
        "packages": {"torch": "2.14.1", "webdataset": None},
    }
    command = "python -m slug_lightning unlearn --config run/config.yaml --output_dir run_reproduced"
    text = "\n".join(reproduce_lines({"software": software, "command": command}))
    assert "slug_lightning 0.1.0 (commit 0123456789ab, with uncommitted changes), Python 3.11.7, torch 2.14.1." in text
    assert f"```bash\n{command}\n```" in text and "webdataset" not in text
    assert reproduce_lines({}) == []  # a report of an older version: no section


# --- weights named by content -----------------------------------------------------------------------------


def test_weights_source_hashes_a_local_checkpoint_and_keeps_a_tag(tmp_path):
    checkpoint = tmp_path / "weights" / "fit.safetensors"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"some weights")
    named = weights_source(str(checkpoint))
    assert named == {"pretrained": f"sha256:{_sha256(checkpoint)}", "pretrained_file": "fit.safetensors"}
    assert weights_source(named["pretrained"]) == {"pretrained": named["pretrained"]}  # already public
    assert weights_source("laion400m_e32") == {"pretrained": "laion400m_e32"}
    assert weights_source(None) == {"pretrained": None}
    checkpoint.write_bytes(b"other weights")  # the same path, other content: another hash
    assert weights_source(str(checkpoint))["pretrained"] == f"sha256:{_sha256(checkpoint)}" != named["pretrained"]


def test_shipped_weights_carry_no_local_path(tmp_path, tiny_weights, tiny_clip):
    """The collector's identity, and any identity with a path (a gradient store of an older version), reach
    model.safetensors and delta.safetensors as a content hash and a base name."""
    from slug_lightning.gradients import GradientCollector

    collector = GradientCollector(model_name="slug-tiny", pretrained=str(tiny_weights))
    identity = collector.identity()
    digest = f"sha256:{_sha256(tiny_weights)}"
    assert identity["pretrained"] == digest and identity["pretrained_file"] == tiny_weights.name
    older = {**identity, "pretrained": str(tiny_weights)}  # what stores recorded before
    state = tiny_clip.model.state_dict()
    layer = "visual.proj"
    update = ({"concept": "Ann Lee", "layer": layer, "step_size": 1.0}, torch.zeros_like(state[layer]))
    write_delta(tmp_path / "delta.safetensors", make_delta([update], identity["fingerprint"], older))
    write_checkpoint(
        tmp_path / "model.safetensors", state, Provenance(identity["fingerprint"], []), {"model": json.dumps(older)}
    )
    for name in ("delta.safetensors", "model.safetensors"):
        metadata = _metadata(tmp_path / name)
        leaks = [k for k, v in metadata.items() if str(tiny_weights) in v or str(tiny_weights.parent) in v]
        assert not leaks, (name, leaks)
        model = json.loads(metadata["model"])
        assert model["pretrained"] == digest and model["pretrained_file"] == tiny_weights.name, name


def test_public_identity_names_a_pipeline_by_its_directory():
    identity = public_identity({"name": "ViT-H-14", "pretrained": None, "pipeline": "/home/me/models/sd-2-1"})
    assert identity["pipeline"] == "sd-2-1" and identity["name"] == "ViT-H-14"


# --- the reproduce command --------------------------------------------------------------------------------


def _fake_unlearn(seen: list):
    """SlugTrainer.unlearn with its signature (the command line is built from it), recording where it would write
    and its loggers' directories, instead of running."""

    @functools.wraps(SlugTrainer.unlearn)
    def unlearn(self, model, datamodule, search, output_dir="runs/unlearn", **kwargs):
        seen.append((output_dir, [logger.save_dir for logger in self.loggers]))
        return {}

    return unlearn


# The loggers' options of a run, and where the reproduction's loggers must write.
LOGGERS = {
    "one logger": (["--trainer.logger.init_args.save_dir", "run"], ["run_reproduced"]),
    "two loggers": (
        [
            "--trainer.logger",
            "[{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: run/csv}}, "
            "{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {save_dir: elsewhere}}]",
        ],
        ["run_reproduced/csv", "elsewhere"],
    ),
}


@pytest.mark.parametrize("loggers, moved", LOGGERS.values(), ids=LOGGERS.keys())
def test_the_reproduce_command_runs_against_the_finished_run(tmp_path, monkeypatch, capsys, loggers, moved):
    """The command a finished run's report shows passes the command line's checks and writes nowhere in the run."""
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(SlugTrainer, "unlearn", _fake_unlearn(seen))
    args = ["unlearn", "--config", str(DEMO_UNLEARN), "--model.init_args.pretrained", "null", *loggers]
    assert main([*args, "--output_dir", "run"]) == 0  # writes run/config.yaml, as a real run does
    (tmp_path / "run" / "report.json").write_text("{}")  # now a finished run
    assert main(["unlearn", "--config", "run/config.yaml"]) == 2  # the command reports used to show
    assert "already holds a finished run" in capsys.readouterr().err

    command = reproduce_command(Path("run") / "config.yaml")
    words = shlex.split(command)
    assert words[:4] == ["python", "-m", "slug_lightning", "unlearn"]
    assert main(words[3:]) == 0, capsys.readouterr().err
    fresh, logged = seen[-1]
    assert Path(fresh) == Path("run_reproduced") and [Path(d) for d in logged] == [Path(d) for d in moved]
    run = (tmp_path / "run").resolve()
    for directory in [fresh, *logged]:
        assert run != Path(directory).resolve() and run not in Path(directory).resolve().parents, directory
    assert (tmp_path / "run_reproduced" / "config.yaml").is_file()


def test_only_trainer_paths_under_the_run_move():
    trainer = {"accelerator": "cpu", "default_root_dir": "out", "logger": {"init_args": {"save_dir": "out/logs"}}}
    assert dict(moved_settings(trainer, "out", "out_reproduced")) == {
        "trainer.default_root_dir": "out_reproduced",
        "trainer.logger.init_args.save_dir": "out_reproduced/logs",
    }
    # Run in the working directory: `cpu` is not a path in it.
    assert dict(moved_settings({"accelerator": "cpu"}, ".", "/x/here_reproduced")) == {}


def test_a_finished_run_records_its_software_and_ships_no_local_path(small_run, small_demo):
    """End to end: the small demo's run read its weights from a local checkpoint."""
    output, report = small_run
    checkpoint = small_demo / "fit" / "slug-tiny.safetensors"
    assert report["software"]["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert report["model"]["pretrained"] == f"sha256:{_sha256(checkpoint)}"
    for name in ("model.safetensors", "delta.safetensors"):
        values = _metadata(output / name).values()
        assert not [v for v in values if str(checkpoint) in v or str(small_demo) in v], name
    assert report["command"].endswith(f"--output_dir {shlex.quote(str(output) + '_reproduced')}")
    assert report["command"] in render_markdown(report)
