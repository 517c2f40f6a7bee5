"""``unlearn --help``: the method's options first, with an example, read from the source without importing it.

LightningCLI's own help of ``unlearn`` lists every Trainer flag first (about 500 lines) and shows the search's options
only under ``--search.help``; building it also costs the import of Lightning. This page is made from the signatures and
the ``Args:`` sections of the docstrings of the packaged classes (:class:`~slug_lightning.callbacks.StepSearch`,
:class:`~slug_lightning.datamodules.LaionDataModule`, :class:`~slug_lightning.GradientCollector` and
:meth:`~slug_lightning.trainer.SlugTrainer.unlearn`), parsed with :mod:`ast`, so it starts at once and cannot drift from
the code. ``--help_all`` gives LightningCLI's complete help.
"""

from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass
from importlib import util
from pathlib import Path

WIDTH = 100
# (title, option prefix, module, class, method or None): the groups of the page, in order.
GROUPS = (
    ("The method: the step-size search (StepSearch)", "--search.init_args.", "slug_lightning.callbacks.step_search",
     "StepSearch", None),
    ("The data: shards and concepts (LaionDataModule)", "--data.init_args.", "slug_lightning.datamodules.laion",
     "LaionDataModule", None),
    ("The model (GradientCollector)", "--model.init_args.", "slug_lightning.gradients", "GradientCollector", None),
    ("The run", "--", "slug_lightning.trainer", "SlugTrainer", "unlearn"),
)  # fmt: skip
# Parameters that the config file sets as objects, not as flags.
SKIPPED = {"self", "model", "datamodule", "search", "baseline", "audit"}
EXAMPLE = "unlearn --config configs/demo/unlearn.yaml --concept 'Vesna Fairbank' --output_dir runs/vesna"


@dataclass(frozen=True)
class Option:
    """One option of the page: its flag, the type as written, the default as written, and the help sentence."""

    flag: str
    kind: str
    default: str | None
    help: str


def _source(module: str) -> tuple[ast.Module, Path]:
    """The parsed source of a module of the package, found without running it (nor its package's ``__init__``)."""
    package, _, name = module.rpartition(".")
    folder = Path(util.find_spec(package).submodule_search_locations[0])
    path = folder / name / "__init__.py" if (folder / name).is_dir() else folder / f"{name}.py"
    return ast.parse(path.read_text(encoding="utf-8")), path


def _assignments(tree: ast.Module) -> dict[str, str]:
    """Module-level ``NAME = value`` (and ``A, B = a, b``) of a source file, the values as written."""
    values: dict[str, str] = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target, value = node.targets[0], node.value
        if isinstance(target, ast.Name):
            values[target.id] = ast.unparse(value)
        elif isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
            values.update({t.id: ast.unparse(v) for t, v in zip(target.elts, value.elts) if isinstance(t, ast.Name)})
    return values


def _constants(tree: ast.Module, depth: int = 2) -> dict[str, str]:
    """The constants a source file defines, and those it imports by name from the package's modules (and they from
    theirs, ``depth`` levels down)."""
    values = _assignments(tree)
    for node in tree.body if depth else ():
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slug_lightning."):
            found = _constants(_source(node.module)[0], depth - 1)
            values.update({alias.name: found[alias.name] for alias in node.names if alias.name in found})
    return values


def _resolve(text: str, constants: dict[str, str]) -> str:
    """``text`` with the names of literal constants replaced by their values."""
    return re.sub(r"\b[A-Z][A-Z0-9_]+\b", lambda m: constants.get(m.group(0), m.group(0)), text)


def _plain(text: str) -> str:
    """A Python literal as a user writes it on the command line (``None`` → null, ``("a", "b")`` → [a, b])."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_plain(repr(item)) for item in value) + "]"
    return str(value)


def _kind(annotation: ast.expr | None) -> str:
    """The type as the page shows it: choices in braces, switches as true|false."""
    if annotation is None:
        return ""
    text = ast.unparse(annotation)
    literal = re.search(r"Literal\[(.*?)\]", text)
    if literal:
        choices = "{" + ",".join(re.findall(r"['\"]([^'\"]*)['\"]", literal.group(1))) + "}"
        return f"[{choices}, ...]" if text.startswith(("Sequence", "list")) else choices
    return "true|false" if text == "bool" else text.replace("Sequence", "list")


def docstring_args(docstring: str) -> dict[str, str]:
    """The ``Args:`` section of a Google-style docstring: name → its text on one line."""
    args: dict[str, str] = {}
    lines = docstring.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if start is None:
        return args
    indent = None
    name = None
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        if depth < indent:
            break
        match = re.match(r"\s*(\w+)(?: \([^)]*\))?: (.*)", line) if depth == indent else None
        if match:
            name = match.group(1)
            args[name] = match.group(2).strip()
        elif name:
            args[name] += " " + line.strip()
    return args


def _first_sentence(text: str) -> str:
    text = re.sub(r":(?:class|func|meth|mod|data|attr):`~?([\w.]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    text = text.replace("``", "")
    match = re.match(r"(.+?\.)(\s+[A-Z(]|$)", text)
    return match.group(1) if match else text


def group_options(prefix: str, module: str, class_name: str, method: str | None) -> list[Option]:
    """The options one class (or one method of it) takes, in signature order."""
    tree, _ = _source(module)
    constants = _constants(tree)
    klass = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == class_name)
    function = next(n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == (method or "__init__"))
    documented = docstring_args(ast.get_docstring(function if method else klass) or "")
    arguments = function.args.args + function.args.kwonlyargs
    defaults = [None] * (len(function.args.args) - len(function.args.defaults)) + list(function.args.defaults)
    defaults += list(function.args.kw_defaults)
    options = []
    for argument, default in zip(arguments, defaults):
        if argument.arg in SKIPPED or argument.arg.startswith("_"):
            continue
        shown = None if default is None else _plain(_resolve(ast.unparse(default), constants))
        help_text = _first_sentence(documented.get(argument.arg, ""))
        options.append(Option(prefix + argument.arg, _kind(argument.annotation), shown, help_text))
    return options


def _format(option: Option) -> list[str]:
    head = f"  {option.flag}"
    if option.kind:
        head += f" {option.kind}"
    if option.default is not None:
        head += f"  (default: {option.default})"
    body = textwrap.wrap(option.help, WIDTH - 6, initial_indent="      ", subsequent_indent="      ")
    return [head, *body]


def unlearn_help(prog: str) -> str:
    """The text of ``unlearn --help``."""
    lines = [
        f"usage: {prog} unlearn --config FILE.yaml [--concept NAME ...] [options]",
        "",
        "Make a CLIP forget concepts: one gradient pass over forget and retain pairs, the layers ranked and their",
        "Pareto front taken, a step size searched per front layer; writes the report, the edited model and a delta.",
        "",
        "Example:",
        f"  {prog} {EXAMPLE}",
        "",
        "Essentials:",
        "  --config FILE.yaml",
        "      A config (model, data, search; see configs/demo/unlearn.yaml); several allowed, later ones win.",
        "  --concept NAME",
        "      A concept to forget (repeat for several); the same as --data.init_args.concepts '[NAME, ...]'.",
        "  --print_config",
        "      Print the resolved config and exit (what the run will record in its config.yaml).",
    ]
    for title, prefix, module, class_name, method in GROUPS:
        lines += ["", f"{title}:"]
        for option in group_options(prefix, module, class_name, method):
            lines += _format(option)
    lines += [
        "",
        "More:",
        "  --baseline.*  the baselines' settings (with --method ft|ga|gaft|salun|ssd); --audit.* the audit's.",
        "  --trainer.*   Lightning's Trainer: --trainer.devices, --trainer.accelerator, --trainer.strategy,",
        "                --trainer.precision, --trainer.logger, --trainer.fast_dev_run (a smoke run), ...",
        "  --help_all    every option with LightningCLI's help; --search.help, --data.help, --model.help CLASS",
        "                show one class's options.",
        "Options take underscores (dashes work too); switches are --flag or --flag true|false.",
    ]
    return "\n".join(lines)
