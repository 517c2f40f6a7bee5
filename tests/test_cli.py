"""The command line: help of every command, config files and overrides, one-line errors, the console script.

Starting the CLI in a fresh interpreter costs several seconds of imports, so only ``python -m slug_lightning
--help`` runs as a process (it checks ``__main__``, the program name and argument reading from
``sys.argv``); everything else goes through :func:`slug_lightning.cli.main` in this process, which is
exactly what ``__main__`` and the console script call.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import one_line_error

import slug_lightning
from slug_lightning.cli import main

PACKAGED_CONFIGS = Path(slug_lightning.__file__).resolve().parents[1] / "configs"
DEMO_UNLEARN = PACKAGED_CONFIGS / "demo" / "unlearn.yaml"


def _help(capsys, *args: str) -> str:
    try:
        code = main([*args, "--help"])
    except SystemExit as exit_:  # argparse and LightningCLI exit after printing the help
        code = exit_.code
    assert code in (0, None)
    return capsys.readouterr().out


def _print_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_top_level_help(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "slug_lightning", "--help"], cwd=tmp_path, text=True, capture_output=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: python -m slug_lightning")
    for word in (
        "SLUG (Single Layer Unlearning Gradient)",
        "fit",
        "unlearn",
        "evaluate",
        "demo",
        "make-world",
        "--config",
        "SLUG_DEBUG=1",
    ):
        assert word in result.stdout
    assert "Traceback" not in result.stderr


def test_print_config_of_the_packaged_unlearn_config(capsys):
    config = _print_config(capsys, "unlearn", "--config", str(DEMO_UNLEARN))
    assert config["search"]["class_path"] == "slug_lightning.callbacks.StepSearch"
    assert config["model"]["class_path"] == "slug_lightning.GradientCollector"
    assert config["data"]["class_path"] == "slug_lightning.datamodules.LaionDataModule"
    assert config["search"]["init_args"]["max_steps"] == 10
    assert config["output_dir"] == "runs/demo/unlearn"


@pytest.mark.parametrize(
    "command, words",
    [
        ("fit", ["--trainer.max_steps", "--model", "--data", "--config"]),
        ("unlearn", ["--search.init_args.metric", "--output_dir", "--gradients", "--overwrite", "--trainer.devices"]),
        ("evaluate", ["--model", "--data", "--output", "--trainer.devices"]),
    ],
)
def test_trainer_subcommand_help(capsys, command, words):
    text = _help(capsys, command)
    assert f"{command} [-c CONFIG]" in text or command == "unlearn"  # unlearn's page is its own (test_cli_style)
    for word in words:
        assert word in text


def test_demo_help(capsys):
    text = _help(capsys, "demo")
    assert text.startswith("usage: python -m slug_lightning demo")
    for word in ("--output_dir", "--seed", "--concept", "--refit", "--devices"):
        assert word in text


def test_make_world_help(capsys):
    text = _help(capsys, "make-world")
    for word in ("root", "--seed", "--people", "--objects", "--overwrite"):
        assert word in text


def test_make_world_help_names_the_command_that_was_typed(capsys):
    assert _help(capsys, "make-world").startswith("usage: python -m slug_lightning make-world")


def test_later_config_overrides_earlier_one(capsys, tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("search:\n  init_args:\n    max_steps: 3\noutput_dir: elsewhere/out\n")
    config = _print_config(capsys, "unlearn", "--config", str(DEMO_UNLEARN), "--config", str(override))
    assert config["search"]["init_args"]["max_steps"] == 3
    assert config["output_dir"] == "elsewhere/out"
    # Values the second file does not mention keep the first file's.
    assert config["search"]["init_args"]["metric"] == "top1"
    assert config["model"]["init_args"]["model_name"] == "slug-tiny"


def test_dotted_override_after_the_config_wins(capsys):
    config = _print_config(
        capsys, "unlearn", "--config", str(DEMO_UNLEARN), "--search.init_args.max_steps", "4", "--trainer.devices", "2"
    )
    assert config["search"]["init_args"]["max_steps"] == 4
    assert str(config["trainer"]["devices"]) == "2"


def test_bad_model_name_is_aone_line_error(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sets = json.dumps([{"name": "x", "root": str(tmp_path)}])
    code = main(
        [
            "evaluate",
            "--model",
            "slug_lightning.ZeroShotModule",
            "--model.model_name",
            "ViT-B-33",
            "--data",
            "slug_lightning.datamodules.ZeroShotDataModule",
            "--data.sets",
            sets,
        ]
    )
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, captured.err
    assert "Unknown OpenCLIP model 'ViT-B-33'" in errors[0] and "'ViT-B-32'" in errors[0]


def test_missing_output_of_a_finished_run_is_refused_in_one_line(capsys, tmp_path, monkeypatch):
    """A UserError raised by the subcommand itself (not while building classes) also becomes one line."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "report.json").write_text("{}")
    code = main(
        [
            "unlearn",
            "--config",
            str(DEMO_UNLEARN),
            "--output_dir",
            str(tmp_path / "done"),
            "--model.init_args.pretrained",
            "null",
            "--trainer.logger",
            "false",
        ]
    )
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err
    assert captured.err.startswith("error: ") and "already holds a finished run" in captured.err


FIT = ["fit", "--config", str(PACKAGED_CONFIGS / "demo" / "fit.yaml"), "--trainer.max_steps", "1"]
EVALUATE = [
    "evaluate",
    "--model",
    "slug_lightning.ZeroShotModule",
    "--data",
    "slug_lightning.datamodules.ZeroShotDataModule",
    "--trainer.logger",
    "false",
]


@pytest.mark.parametrize(
    "args, words",
    [
        ([*FIT, "--data.init_args.batch_size", "0"], ["--data.init_args.batch_size", "got 0"]),
        ([*FIT, "--data.init_args.concepts", "[{name: Ann}, {name: ann}]"], ["--data.init_args.concepts", "twice"]),
        ([*FIT, "--model.init_args.warmup_steps", "-3"], ["--model.init_args.warmup_steps", "-3"]),
        (
            [*EVALUATE, "--data.init_args.sets", "[{name: a, root: x, fraction: 0}]"],
            ["--data.init_args.sets[0].fraction", "fraction must be in (0, 1]"],
        ),
        (
            [*EVALUATE, "--data.init_args.sets", "[{name: a, root: x, templates: [a photo]}]"],
            ["--data.init_args.sets[0].templates", "exactly one '{}'"],
        ),
        (
            [*EVALUATE, "--data.init_args.sets", "[{name: a, root: x}, {name: a, root: y}]"],
            ["--data.init_args.sets", "must be unique"],
        ),
        (
            [*EVALUATE, "--data.init_args.sets", "[{name: a, root: x}]", "--data.init_args.batch_size", "0"],
            ["--data.init_args.batch_size", "got 0"],
        ),
    ],
)
def test_fit_and_evaluate_settings_a_constructor_refuses_are_one_line(capsys, tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, args)
    for word in words:
        assert word in line, (word, line)


@pytest.mark.parametrize("option", ["--output", "--similarity"])
def test_evaluate_output_that_is_a_directory_is_refused_before_evaluating(capsys, tmp_path, monkeypatch, option):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").mkdir()
    # The set's folder does not exist: only a check before the evaluation can answer first.
    line = one_line_error(
        capsys, [*EVALUATE, "--data.init_args.sets", "[{name: a, root: nowhere}]", option, str(tmp_path / "results")]
    )
    assert f"{option} '{tmp_path / 'results'}' is a directory" in line


def test_option_path_finds_the_option_a_constructor_names():
    from jsonargparse import Namespace

    from slug_lightning.trainer_cli import _option_path

    config = Namespace(
        model=Namespace(class_path="m", init_args=Namespace(batch_size=None, concepts=None)),
        data=Namespace(init_args=Namespace(batch_size=0, concepts=[Namespace(name="Ann")])),
        search=Namespace(
            init_args=Namespace(
                batch_size=256, sets=[Namespace(name="a", fraction=1.0), Namespace(name="b", fraction=0.0)]
            )
        ),
    )
    assert _option_path(config, "batch_size", 0) == "data.init_args.batch_size"
    assert _option_path(config, "batch_size", 256) == "search.init_args.batch_size"
    assert _option_path(config, "concepts", ["Ann", "ann"]) == "data.init_args.concepts"  # the only one set
    assert _option_path(config, "fraction", 0) == "search.init_args.sets[1].fraction"
    assert _option_path(config, "batch_size", 7) is None  # neither equal nor the only one
    assert _option_path(config, "nowhere", 1) is None


def test_packaged_configs_are_found():
    """``config_path`` (used by ``demo``) finds the YAML files shipped in ``slug_lightning.configs``."""
    path = Path(slug_lightning.config_path("demo/unlearn.yaml"))
    assert path.is_file() and path.samefile(DEMO_UNLEARN)
    with pytest.raises(FileNotFoundError, match="No packaged config 'demo/nope.yaml'"):
        slug_lightning.config_path("demo/nope.yaml")


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "slug-lightning"
    assert script.is_file()
    text = script.read_text()
    assert "slug_lightning.cli" in text and "main" in text
