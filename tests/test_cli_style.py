"""The command line as a new user meets it: concepts as plain names, a help page that teaches, one-line errors with a
suggestion, one option style for every command, ``--version``, and start-up without torch or Lightning."""

from __future__ import annotations

import ast
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import one_line_error

import slug_lightning
from slug_lightning.cli import COMMANDS, PLAIN_COMMANDS, main
from slug_lightning.concepts import Concept
from slug_lightning.unlearn_help import GROUPS, group_options

DEMO_UNLEARN = Path(slug_lightning.__file__).resolve().parents[1] / "configs" / "demo" / "unlearn.yaml"
# The packaged demo config with a random tiny CLIP: builds in a second, reads no file.
UNLEARN = [
    "unlearn",
    "--config",
    str(DEMO_UNLEARN),
    "--model.init_args.pretrained",
    "null",
    "--trainer.logger",
    "false",
]


def _config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--print_config"])
    assert exit_.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _built_concepts(capsys, *args: str) -> list[Concept]:
    """The concepts of the datamodule the command line's config builds."""
    from slug_lightning.datamodules import LaionDataModule

    return LaionDataModule(**_config(capsys, *UNLEARN, *args)["data"]["init_args"]).concepts


# ---------------------------------------------------------------------------------------------------------------
# 1. Concepts as plain strings; one concepts option; --concept


def test_concepts_are_plain_names_with_aliases_still_possible(capsys):
    concepts = _built_concepts(
        capsys, "--data.init_args.concepts", '[Vesna Fairbank, "Ines Yardley", {name: Al, aliases: [Alo]}]'
    )
    assert concepts == [Concept("Vesna Fairbank"), Concept("Ines Yardley"), Concept("Al", ("Alo",))]


def test_concept_flag_is_the_short_form_and_replaces_the_configs_list(capsys):
    assert _built_concepts(capsys, "--concept", "Vesna Fairbank", "--concept=Ines Yardley") == [
        Concept("Vesna Fairbank"),
        Concept("Ines Yardley"),
    ]


def test_the_model_takes_no_concepts_of_its_own(capsys):
    one_line_error(capsys, [*UNLEARN, "--model.init_args.concepts", "[A]"], "concepts")
    assert "concepts" not in inspect.signature(slug_lightning.GradientCollector).parameters


# ---------------------------------------------------------------------------------------------------------------
# 2. Help that teaches


def test_unlearn_help_shows_the_method_first_with_an_example(capsys):
    assert main(["unlearn", "--help"]) == 0
    text = capsys.readouterr().out
    assert (
        text.startswith("usage: ") and "Example:\n" in text and "--concept" in text.split("Example:")[1].splitlines()[1]
    )
    first_40 = "\n".join(text.splitlines()[:40])
    for option in ("--search.init_args.metric", "--search.init_args.max_steps", "--config", "--concept"):
        assert option in first_40, option
    assert text.index("--search.init_args.") < text.index("--trainer.")
    assert "nn.Module" not in text and "torch.nn" not in text and len(text.splitlines()) < 200


@pytest.mark.parametrize("title, prefix, module, class_name, method", GROUPS)
def test_unlearn_help_lists_exactly_the_parameters_with_their_defaults(title, prefix, module, class_name, method):
    """The page is read from the source: it must name every public parameter of the real signature, and only those,
    with the real defaults."""
    import importlib

    target = getattr(importlib.import_module(module), class_name)
    signature = inspect.signature(getattr(target, method) if method else target)
    skipped = {"self", "model", "datamodule", "search", "baseline", "audit"}
    wanted = {n: p.default for n, p in signature.parameters.items() if n not in skipped and not n.startswith("_")}
    shown = {
        option.flag.removeprefix(prefix): option.default for option in group_options(prefix, module, class_name, method)
    }
    assert list(shown) == list(wanted)
    for name, default in wanted.items():
        if default is inspect.Parameter.empty:
            assert shown[name] is None, name
            continue
        value = yaml.safe_load(shown[name])
        expected = list(default) if isinstance(default, tuple) else default
        assert value == expected or str(value) == str(expected), (name, shown[name], default)


def test_the_models_help_lists_no_module_classes(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--model.help", "GradientCollector"])
    text = capsys.readouterr().out
    assert "--model.init_args.model_name" in text or "--model.model_name" in text
    assert "torch.nn" not in text and "subclass of Module" not in text and len(text.splitlines()) < 80


def test_help_all_is_lightnings_complete_help(capsys):
    with pytest.raises(SystemExit):
        main(["unlearn", "--help_all"])
    assert "--trainer.max_steps" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# 2. Errors: one line, a suggestion, exit 2


@pytest.mark.parametrize(
    "args, words",
    [
        (["unlearnn"], ["unknown command 'unlearnn'", "did you mean unlearn?"]),
        (["--verison"], ["did you mean --version?"]),
        (["validate"], ["unknown command 'validate'"]),
        ([*UNLEARN, "--outptu_dir", "x"], ["--outptu_dir", "did you mean --output_dir?"]),
        ([*UNLEARN, "--search.init_args.metrc", "top1"], ["metrc", "did you mean --search.init_args.metric?"]),
        ([*UNLEARN, "--search.init_args.max_steps", "ten"], ["--search.init_args.max_steps", "ten"]),
        ([*UNLEARN, "--model.init_args.model_name", "zzzz"], ["Unknown OpenCLIP model 'zzzz'"]),
        ([*UNLEARN, "--concept"], ["--concept needs a name"]),
        (["make-world", "w", "--shards", "0"], ["shards=0 is out of range"]),
        (["make-world", "w", "--peeple", "3"], ["did you mean --people?"]),
        (["delta", "show"], ["DELTA"]),
        (["compare", "--config", "x.yaml", "--methods", "slug", "magic"], ["'magic'"]),
    ],
)
def test_mistakes_are_one_short_line_with_exit_2(capsys, tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, args, *words)
    assert not (tmp_path / "w").exists()


def test_make_world_with_other_counts_in_an_existing_world_is_one_line(capsys, tmp_path):
    world = str(tmp_path / "w")
    small = ["--people", "2", "--objects", "1", "--portraits_per_person", "2", "--person_object_per_person", "1"]
    small += ["--samples_per_object", "2", "--scenery_samples", "2", "--eval_per_person", "1", "--eval_per_object", "1"]
    small += ["--shards", "1", "--image_size", "16"]
    assert main(["make-world", world, *small]) == 0
    capsys.readouterr()
    one_line_error(capsys, ["make-world", world, *small, "--seed", "3"], "other parameters", "--overwrite")


# ---------------------------------------------------------------------------------------------------------------
# 5. One style for every command; --version; only commands that work


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"slug_lightning {slug_lightning.__version__}"


def test_only_working_commands_are_offered(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert not re.search(r"^\s+(validate|test|predict)\s", text, re.M)
    assert set(COMMANDS) == {"fit", "unlearn", "evaluate", *PLAIN_COMMANDS}


def test_dashes_and_bare_switches_mean_what_the_documented_form_means(capsys):
    documented = _config(
        capsys, *UNLEARN, "--output_dir", "a/b", "--overwrite", "true", "--trainer.fast_dev_run", "true"
    )
    other = _config(capsys, *UNLEARN, "--output-dir", "a/b", "--overwrite", "--trainer.fast-dev-run")
    assert documented == other and documented["overwrite"] is True


def test_plain_commands_take_the_same_switch_and_option_forms():
    from slug_lightning.commands.compare import _parser

    parser = _parser("compare")
    bare = parser.parse_args(["--config", "c.yaml", "--overwrite", "--output-dir", "x"])
    valued = parser.parse_args(["--config", "c.yaml", "--overwrite", "true", "--output_dir", "x"])
    off = parser.parse_args(["--config", "c.yaml", "--overwrite", "false", "--output_dir", "x"])
    assert vars(bare) == vars(valued) and bare.overwrite and not off.overwrite


def test_every_command_names_a_directory_output_dir_and_a_file_output(capsys):
    for command in PLAIN_COMMANDS:
        try:
            main([command, "--help"])
        except SystemExit:
            pass
        text = capsys.readouterr().out
        for line in re.findall(r"--output\b[^_\n]*\n?[^\n]*", text):
            assert "director" not in line, (command, line)
        assert not re.search(r"--[a-z]+-[a-z]", text), (command, re.findall(r"--[a-z]+-[a-z-]+", text))


# ---------------------------------------------------------------------------------------------------------------
# 3. Start-up: the help pages and --version import neither torch nor Lightning (the time is in benchmarks/startup.py)


def test_help_and_version_import_neither_torch_nor_lightning():
    calls = [["--help"], ["--version"], ["unlearn", "--help"], *([c, "--help"] for c in PLAIN_COMMANDS)]
    script = f"""
import sys
from slug_lightning.cli import main
for args in {json.dumps(calls)}:
    try:
        main(args)
    except SystemExit:
        pass
heavy = sorted(m for m in ("torch", "lightning", "open_clip", "torchvision") if m in sys.modules)
print("HEAVY", heavy, file=sys.stderr)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HEAVY []" in result.stderr, result.stderr[-500:]


def test_package_import_is_lazy_and_names_resolve():
    script = (
        "import sys, slug_lightning; assert 'torch' not in sys.modules; "
        "assert slug_lightning.GradientCollector.__name__ == 'GradientCollector'; "
        "slug_lightning.register_model_configs(); import open_clip; assert 'slug-tiny' in open_clip.list_models()"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    tree = ast.parse(Path(slug_lightning.__file__).read_text())
    assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) and "torch" in ast.unparse(n)]
