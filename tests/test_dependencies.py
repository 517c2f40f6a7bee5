"""What the package declares in pyproject.toml holds together with what it imports, what it ships and the Lightning
it runs on: every imported package is declared (optional ones in the extra their error names), every core
dependency is used, the private Lightning APIs the code uses exist in the admitted versions, and the wheel carries
LICENSE and py.typed."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning as L
import pytest
from conftest import one_line_error
from packaging.requirements import Requirement
from packaging.version import Version

from slug_lightning.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # the test extra installs it on 3.10

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# The package's code: slug_lightning/ and the folders installed under its name (tool.setuptools.package-dir).
SOURCE_DIRS = ["slug_lightning", *PYPROJECT["tool"]["setuptools"]["package-dir"].values()]
# Import names that differ from the distribution's name.
DISTRIBUTION = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "open_clip": "open_clip_torch",
    "typing_extensions": "typing-extensions",
}
# Core dependencies the code never imports, and why they are declared.
NOT_IMPORTED = {"torchvision": "open_clip needs it; bounded beside torch so that pip keeps a matching pair"}
# Functions that import an optional package named by a string: (package, extra).
REQUIRE_CALLS = {"require"}


def normalized(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(group: list[str]) -> dict[str, Requirement]:
    parsed = [Requirement(line) for line in group]
    return {normalized(r.name): r for r in parsed}


CORE = requirements(PYPROJECT["project"]["dependencies"])
EXTRAS = {extra: requirements(lines) for extra, lines in PYPROJECT["project"]["optional-dependencies"].items()}


def imports() -> list[tuple[str, str, bool, str | None]]:
    """``(file, top-level module, at module level, extra)`` for every import of a package outside the standard
    library and slug_lightning in the package's code; ``extra`` is set for ``require("module", "extra")`` calls."""
    found = []
    for directory in SOURCE_DIRS:
        for path in sorted((ROOT / directory).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            module_level = {id(node) for node in tree.body}
            for node in ast.walk(tree):
                names, extra = [], None
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "id", getattr(node.func, "attr", None)) in REQUIRE_CALLS
                    and len(node.args) == 2
                    and all(isinstance(arg, ast.Constant) for arg in node.args)
                ):
                    names, extra = [node.args[0].value], node.args[1].value
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "slug_lightning" and top != "__future__":
                        found.append((str(path.relative_to(ROOT)), top, id(node) in module_level, extra))
    return found


IMPORTS = imports()


def test_the_scan_finds_imports_of_every_kind():
    tops = {top for _, top, _, _ in IMPORTS}
    assert {"torch", "lightning", "open_clip", "PIL", "yaml"} <= tops  # module-level imports
    assert ("slug_lightning/labelled_sources.py", "datasets", False, "hf-datasets") in IMPORTS  # by require()
    assert any(top == "diffusers" and extra == "diffusion" for _, top, _, extra in IMPORTS)


def test_every_imported_package_is_declared_where_it_is_needed():
    """A module-level import is a core dependency; an import inside a function may be an optional extra's, and a
    ``require(module, extra)`` names an extra that installs the module."""
    optional = {name for extra, declared in EXTRAS.items() if extra != "test" for name in declared}
    wrong = []
    for path, top, module_level, extra in IMPORTS:
        name = normalized(DISTRIBUTION.get(top, top))
        if extra is not None:
            ok = name in EXTRAS.get(extra, {})
        elif module_level:
            ok = name in CORE
        else:
            ok = name in CORE or name in optional
        if not ok:
            wrong.append((path, top, "module level" if module_level else "in a function", extra))
    assert not wrong, wrong


def test_every_core_dependency_is_imported():
    imported = {normalized(DISTRIBUTION.get(top, top)) for _, top, _, _ in IMPORTS}
    unused = sorted(set(CORE) - imported - set(NOT_IMPORTED))
    assert not unused, f"declared in dependencies but never imported: {unused}"
    assert set(NOT_IMPORTED) <= set(CORE)


def test_nothing_lightning_s_pytorch_extra_brought_is_declared_or_imported():
    extra_only = {"hydra-core", "hydra", "omegaconf", "rich", "tensorboardx", "bitsandbytes", "jsonnet"}
    assert not extra_only & set(CORE)
    assert not [entry for entry in IMPORTS if normalized(entry[1]) in extra_only]
    assert not CORE["lightning"].extras and CORE["jsonargparse"].extras == {"signatures"}


# --- Lightning: its private APIs and the bound ------------------------------------------------------------


def test_lightning_has_an_upper_bound_that_admits_the_installed_version():
    specifier = CORE["lightning"].specifier
    assert any(spec.operator == "<" for spec in specifier), "lightning needs an upper bound (private APIs are used)"
    assert specifier.contains(Version(L.__version__)), (L.__version__, str(specifier))


def test_the_private_lightning_apis_the_code_uses_exist(monkeypatch):
    """``LightningCLI._subcommand_parsers`` (trainer_cli.py dumps the unlearn config with it),
    ``LightningCLI._dump_config`` (api.py records hyperparameters before objects replace config sections) and
    ``LightningModule._trainer`` (None until a Trainer attaches it). A Lightning that renamed one fails here, before
    the bound is raised."""
    from slug_lightning.trainer_cli import SlugCLI

    class Parsed(Exception):
        pass

    def stop(cli):
        raise Parsed(cli)

    monkeypatch.setattr(SlugCLI, "instantiate_classes", stop)
    config = ROOT / "configs" / "demo" / "unlearn.yaml"
    with pytest.raises(Parsed) as parsed:
        SlugCLI(args=["unlearn", "--config", str(config), "--model.init_args.pretrained", "null"])
    cli = parsed.value.args[0]
    text = cli._subcommand_parsers["unlearn"].dump(cli.config["unlearn"], skip_none=False)
    assert "output_dir: runs/demo/unlearn" in text and "model_name: slug-tiny" in text
    assert callable(getattr(cli, "_dump_config", None))

    module = L.LightningModule()
    assert module._trainer is None
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    module.trainer = trainer
    assert module._trainer is trainer


# --- optional extras: a missing package is one line naming the extra --------------------------------------


def test_an_hf_dataset_set_without_datasets_names_the_extra(monkeypatch, capsys):
    from slug_lightning.labelled_sets import LabelledSet
    from slug_lightning.labelled_sources import load_hf_split

    spec = LabelledSet("people", hf_dataset="some/dataset")  # datasets is installed: accepted
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(UserError, match=r'pip install "slug-lightning\[hf-datasets\]"'):
        LabelledSet("people", hf_dataset="some/dataset")
    with pytest.raises(UserError, match=r'pip install "slug-lightning\[hf-datasets\]"'):
        load_hf_split(spec)
    data = "slug_lightning.datamodules.ZeroShotDataModule"
    sets = "[{name: people, hf_dataset: some/dataset}]"
    args = ["evaluate", "--model", "slug_lightning.ZeroShotModule", "--data", data, "--trainer.logger", "false"]
    line = one_line_error(capsys, [*args, "--data.init_args.sets", sets])
    assert "--data.init_args.sets[0].hf_dataset" in line and 'pip install "slug-lightning[hf-datasets]"' in line


@pytest.mark.parametrize(
    "command, blocked, extra",
    [
        (["eval-vlm", "--model", "m", "--identities", "ids"], "transformers", "vlm"),
        (["eval-diffusion", "--pipeline", "p", "--prompt", "a photo of X", "--class", "X"], "diffusers", "diffusion"),
    ],
)
def test_a_pipeline_command_without_its_extra_is_one_line(monkeypatch, capsys, command, blocked, extra):
    monkeypatch.setitem(sys.modules, blocked, None)
    one_line_error(capsys, [*command, "--target", "X"], f'pip install "slug-lightning[{extra}]"')


# --- what the wheel ships ---------------------------------------------------------------------------------


def test_the_license_matches_the_declared_one():
    assert PYPROJECT["project"]["license"] == "MIT" and PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "Copyright (c) 2026 the slug_lightning authors" in text
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["slug_lightning"]


def test_the_wheel_ships_license_and_py_typed(tmp_path):
    """Built from a copy of the sources (the build leaves build/ behind), with the installed setuptools."""
    setuptools = pytest.importorskip("setuptools")
    if Version(setuptools.__version__) < Version("77"):
        pytest.skip(f"setuptools {setuptools.__version__} cannot build this pyproject (the test extra brings 77+)")
    source = tmp_path / "source"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    for directory in SOURCE_DIRS:
        shutil.copytree(ROOT / directory, source / directory, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", "."]
    done = subprocess.run(command, cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wheel,) = (source / "dist").glob("slug_lightning-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "slug_lightning/py.typed" in names
    assert any(re.fullmatch(r"slug_lightning-[^/]+\.dist-info/licenses/LICENSE", n) for n in names), names
    assert "License-Expression: MIT" in metadata
    assert "slug_lightning/datamodules/laion.py" in names and "slug_lightning/configs/demo/unlearn.yaml" in names
