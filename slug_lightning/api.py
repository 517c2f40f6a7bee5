"""The Python API: :func:`unlearn` does what ``python -m slug_lightning unlearn`` does, :func:`load_run` reads back
what a run left.

``unlearn`` parses a config with the command line's own parser, so a config means the same thing in both, and runs
:meth:`SlugTrainer.unlearn <slug_lightning.trainer.SlugTrainer.unlearn>`: the same output directory checks, the
same pre-flight check, artifacts and audit. Python objects (a ``GradientCollector``, a datamodule, a
``StepSearch``, a ``SlugTrainer``) may stand in for sections of the config, or for the whole of it.
See docs/python_api.md.

Example::

    result = unlearn("configs/demo/unlearn.yaml", output_dir="runs/demo/api")
    print(result.verdict, result.edits[0].layer)
    run = load_run("runs/demo/api")  # later, elsewhere: the unlearned open_clip model, preprocess, tokenizer
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from argparse import ArgumentError
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slug_lightning.errors import NotForgotten, UserError, first_cause

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Accuracy", "ChosenEdit", "LoadedRun", "UnlearnResult", "load_run", "unlearn"]

ConfigSource = str | os.PathLike | Mapping[str, Any]
# The artifacts of a run this module reads or points at (docs/report_format.md, the README's table).
REPORT = "report.json"
REPORT_MD = "report.md"
MODEL = "model.safetensors"
DELTA = "delta.safetensors"
CONFIG = "config.yaml"
# The parser requires ``model`` and ``search``: when an object stands in for one, the parser is given this stand-in
# first (a config's own section, given after it, wins); it is never built, as the object replaces the section
# before anything is instantiated.
STAND_INS = {
    "model": ["--model=slug_lightning.GradientCollector"],
    "search": ["--search=slug_lightning.callbacks.StepSearch", "--search.init_args.sets=[{name: stand-in, root: .}]"],
}


# --- what a run gives back ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accuracy:
    """Zero-shot top-1 and top-5, fractions in [0, 1] (NaN where a set had no images to score)."""

    top1: float
    top5: float

    @classmethod
    def of(cls, entry: Mapping[str, Any]) -> Accuracy:
        """From a report's ``{top1, top5}`` (``null`` in report.json, a set with no images, is NaN here).

        Example::

            >>> Accuracy.of({"top1": 0.25, "top5": None})
            Accuracy(top1=0.25, top5=nan)
        """
        return cls(*(math.nan if entry[k] is None else float(entry[k]) for k in ("top1", "top5")))


@dataclass(frozen=True)
class ChosenEdit:
    """One concept's outcome (``report.json``'s ``concepts[]``): the edit chosen for it and its forget accuracy
    before any edit and in the final evaluation, with every concept's edit applied.

    ``layer``, ``tower`` and ``step_size`` are None when there is no single-layer edit: nothing to forget, or a
    baseline method, which changes every weight it trains.
    """

    concept: str
    verdict: str
    layer: str | None
    tower: str | None
    step_size: float | None
    forget_before: Accuracy
    forget_after: Accuracy


def chosen_edits(report: Mapping[str, Any]) -> tuple[ChosenEdit, ...]:
    """The per-concept outcomes of a report, in the order the concepts were given."""
    return tuple(
        ChosenEdit(
            concept=c["name"],
            verdict=c["verdict"],
            layer=c["layer"],
            tower=c["tower"],
            step_size=c["step_size"],
            forget_before=Accuracy.of(report["before"]["forget"][c["name"]]),
            forget_after=Accuracy.of(report["after"]["forget"][c["name"]]),
        )
        for c in report["concepts"]
    )


def set_accuracies(report: Mapping[str, Any], when: str) -> dict[str, Accuracy]:
    """Each test set's accuracy ``before`` any edit or ``after`` every edit."""
    return {name: Accuracy.of(entry) for name, entry in report[when]["test"].items()}


@dataclass(frozen=True)
class UnlearnResult:
    """What :func:`unlearn` gives back; everything in it is also in ``output_dir``.

    Attributes:
        output_dir: Where the artifacts are (``OUTPUT_DIR/smoke`` for a smoke run).
        method: ``slug`` or the baseline's name.
        verdict: ``forgotten``, ``partly forgotten``, ``not forgotten`` or ``nothing to forget``.
        edits: Per concept, the chosen edit and its forget accuracy (:class:`ChosenEdit`).
        test_before, test_after: Each test set's accuracy before any edit and with every edit applied.
        report: The whole ``report.json`` (docs/report_format.md), with ``audit`` when the run audited.
        model: The unlearned CLIP, in memory (θ⁰ when the search was told ``apply=False``).
    """

    output_dir: Path
    method: str
    verdict: str
    edits: tuple[ChosenEdit, ...]
    test_before: dict[str, Accuracy]
    test_after: dict[str, Accuracy]
    report: dict = field(repr=False)
    model: nn.Module = field(repr=False)

    @property
    def report_md(self) -> Path:
        """The report for people."""
        return self.output_dir / REPORT_MD

    @property
    def model_file(self) -> Path:
        """The unlearned weights, loadable by open_clip (``pretrained=``) or :func:`load_run`."""
        return self.output_dir / MODEL

    @property
    def delta_file(self) -> Path | None:
        """The per-concept updates (``delta`` command, :mod:`slug_lightning.deltas`); None for a baseline."""
        return self.output_dir / DELTA if (self.output_dir / DELTA).is_file() else None

    @property
    def config_file(self) -> Path:
        """The config the run was built from (see :func:`unlearn` for a run built from objects)."""
        return self.output_dir / CONFIG


@dataclass(frozen=True)
class LoadedRun:
    """A finished run read back by :func:`load_run`.

    Attributes:
        output_dir: The run's directory.
        report: Its ``report.json``.
        model: The unlearned open_clip model (from ``model.safetensors``), in eval mode on the CPU.
        preprocess: The model's evaluation image transform (PIL image → tensor).
        tokenizer: The model's tokenizer (list of texts → token tensor).
    """

    output_dir: Path
    report: dict = field(repr=False)
    model: nn.Module = field(repr=False)
    preprocess: Callable = field(repr=False)
    tokenizer: Callable = field(repr=False)

    @property
    def verdict(self) -> str:
        return self.report["verdict"]

    @property
    def edits(self) -> tuple[ChosenEdit, ...]:
        return chosen_edits(self.report)

    def base_model(self) -> nn.Module:
        """θ⁰: a copy of :attr:`model` with the run's edits taken back out (``delta.safetensors``; equal to the
        model the run started from up to float rounding in the edited layers).

        Raises:
            UserError: for a baseline run, which keeps no delta.
        """
        from slug_lightning.deltas import read_checkpoint, read_delta, remove_from_checkpoint
        from slug_lightning.models import load_into

        if self.report["method"] != "slug":
            raise UserError(
                f"{str(self.output_dir)!r} is a {self.report['method']} run: it keeps no delta to take out; its base "
                f"model is {self.report['model'].get('pretrained')!r}."
            )
        state, provenance, _ = read_checkpoint(self.output_dir / MODEL)
        if provenance.applied:
            delta = read_delta(_artifact(self.output_dir, DELTA, "the run's edits"))
            state, _ = remove_from_checkpoint(
                state, provenance, delta, provenance.concepts, checkpoint=str(self.output_dir / MODEL)
            )
        base = copy.deepcopy(self.model)
        load_into(base, state, str(self.output_dir / MODEL))
        return base.eval()


def load_run(path: str | os.PathLike) -> LoadedRun:
    """Read a finished ``unlearn`` run: its report and the unlearned open_clip model with its preprocess and tokenizer.

    The architecture is the one ``report.json`` records (``model.name``); the weights are ``model.safetensors``.

    Raises:
        UserError: (one line) when ``path`` is not a finished run: no directory, no ``report.json`` (a run that did
            not finish, or a smoke run's parent: its result is in ``smoke/``), a smoke run (it has no result), no
            ``model.safetensors``, or one that holds θ⁰ instead of the edit (a search told ``apply=False``).
    """
    from slug_lightning.models import load_clip

    output = Path(path)
    if not output.is_dir():
        raise UserError(f"{str(output)!r} is not a directory; give the --output_dir of a finished unlearn run.")
    if not (output / REPORT).is_file():
        smoke = " (its smoke/ holds a smoke run, which has no result)" if (output / "smoke" / REPORT).is_file() else ""
        raise UserError(f"{str(output)!r} holds no {REPORT}: it is not a finished unlearn run{smoke}.")
    report = json.loads((output / REPORT).read_text(encoding="utf-8"))
    if report.get("smoke_run"):
        raise UserError(
            f"{str(output)!r} holds a smoke run (--trainer.fast_dev_run): its model and numbers mean nothing."
        )
    weights = _artifact(output, MODEL, "the unlearned weights")
    if report["method"] == "slug" and any(c["layer"] for c in report["concepts"]) and _carries_no_edit(weights):
        raise UserError(
            f"{str(output)!r}: its {MODEL} holds θ⁰, not the edit (the search ran with apply=False); "
            f"`python -m slug_lightning delta apply` adds its {DELTA}."
        )
    loaded = load_clip(report["model"]["name"], str(weights))
    return LoadedRun(output, report, loaded.model, loaded.preprocess, loaded.tokenizer)


def _carries_no_edit(weights: Path) -> bool:
    """Whether a run's weights record that they carry none of its edits (:class:`~slug_lightning.deltas.Provenance`
    in the safetensors metadata: a search told ``apply=False`` restores θ⁰)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return "base_fingerprint" in metadata and not json.loads(metadata.get("deltas") or "[]")


def _artifact(output: Path, name: str, what: str) -> Path:
    if not (output / name).is_file():
        raise UserError(f"{str(output)!r} holds no {name} ({what}); it is not a complete unlearn run.")
    return output / name


# --- running ----------------------------------------------------------------------------------------------------


def unlearn(
    config: ConfigSource | Sequence[ConfigSource] | None = None,
    *,
    output_dir: str | os.PathLike,
    model=None,
    data=None,
    search=None,
    trainer=None,
    overwrite: bool = False,
    method: str | None = None,
    gradients: str | os.PathLike | None = None,
    require_forgotten: bool | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> UnlearnResult | None:
    """Unlearn concepts as ``python -m slug_lightning unlearn`` does, and return the result.

    Args:
        config: A YAML config file (``configs/demo/unlearn.yaml``), a dict in the same shape, or a list of them,
            later ones overriding earlier ones as several ``--config`` do. Read by the command line's parser.
        output_dir: Where the artifacts go (``--output_dir``). A directory holding a finished run is refused.
        model: A ``GradientCollector`` to use instead of the config's ``model``.
        data: A ``LightningDataModule`` (``LaionDataModule``) to use instead of the config's ``data``.
        search: A ``StepSearch`` to use instead of the config's ``search``.
        trainer: A ``SlugTrainer`` to use as is, or a dict of ``SlugTrainer`` arguments applied on top of the
            config's ``trainer`` (plain values as ``trainer.*`` settings; loggers, callbacks and other objects
            are passed to the Trainer). A Trainer built here logs nowhere unless the config or this dict gives a
            logger, and its ``default_root_dir`` is ``output_dir``: nothing lands in the working directory.
        overwrite: Replace a finished run in ``output_dir`` (``--overwrite``).
        method: ``slug`` or a baseline (``--method``); default: the config's, else ``slug``.
        gradients: A gradient store to reuse (``--gradients``), e.g. an earlier run's ``gradients.safetensors``.
        require_forgotten: Raise :class:`~slug_lightning.errors.NotForgotten` after writing the artifacts unless
            every concept was forgotten (``--require_forgotten``); default: the config's.
        overrides: Any other setting, by its dotted command-line name without the dashes, e.g.
            ``{"search.init_args.max_steps": 4, "audit.relearn_ks": [4]}``; applied after ``config``.

    A run built partly from objects writes into ``config.yaml`` what it can record: the parsed config, with each
    section an object stood in for replaced by the object's class and, for a LightningModule or datamodule that
    keeps them (``hparams``), its arguments. Such a record reruns only once those sections are completed.

    Returns:
        The :class:`UnlearnResult` (None on the ranks other than 0 of a multi-process run).

    Raises:
        UserError: (one line, as the command line prints it) for a config, setting, object or output directory
            that cannot be used.
        NotForgotten: with ``require_forgotten``, when a concept was not forgotten (the artifacts are written).
    """
    from slug_lightning.trainer import SMOKE_DIR

    objects = _checked_objects(model=model, data=data, search=search, trainer=trainer)
    trainer_kwargs = dict(trainer) if isinstance(trainer, Mapping) else {}
    plain = {f"trainer.{key}": value for key, value in trainer_kwargs.items() if _is_plain(value)}
    # a list copied: the Trainer's builder appends its own callbacks to the list it is given
    trainer_objects = {
        key: list(value) if isinstance(value, list) else value
        for key, value in trainer_kwargs.items()
        if not _is_plain(value)
    }
    explicit = {
        "output_dir": output_dir,
        "overwrite": overwrite,
        "method": method,
        "gradients": gradients,
        "require_forgotten": require_forgotten,
    }
    args = [
        "unlearn",
        *(arg for section in objects if section in STAND_INS for arg in STAND_INS[section]),
        *_config_args(config),
        *_setting_args({**(overrides or {}), **plain}),
        *_setting_args({key: value for key, value in explicit.items() if value is not None}),
    ]
    cli = _run_cli(args, objects, trainer_objects)
    report = cli.report
    if report is None:
        return None
    output = Path(output_dir) / SMOKE_DIR if report["smoke_run"] else Path(output_dir)
    return UnlearnResult(
        output_dir=output,
        method=report["method"],
        verdict=report["verdict"],
        edits=chosen_edits(report),
        test_before=set_accuracies(report, "before"),
        test_after=set_accuracies(report, "after"),
        report=report,
        model=cli.model.model,
    )


def _checked_objects(**given) -> dict[str, Any]:
    """The objects given for config sections, each checked to be of the kind the section builds."""
    import lightning as L

    from slug_lightning.callbacks import StepSearch
    from slug_lightning.gradients import GradientCollector
    from slug_lightning.trainer import SlugTrainer

    kinds = {
        "model": (GradientCollector, "a GradientCollector"),
        "data": (L.LightningDataModule, "a LightningDataModule (e.g. LaionDataModule)"),
        "search": (StepSearch, "a StepSearch"),
        "trainer": ((SlugTrainer, Mapping), "a SlugTrainer (its unlearn runs the pass) or a dict of its arguments"),
    }
    for name, value in given.items():
        kind, wanted = kinds[name]
        if value is not None and not isinstance(value, kind):
            raise UserError(f"unlearn(): {name} must be {wanted}, got {type(value).__name__}.")
    return {name: value for name, value in given.items() if value is not None and not isinstance(value, Mapping)}


def _config_args(config) -> list[str]:
    """``--config`` arguments for a file, a dict or a list of them, in order."""
    if config is None:
        return []
    items = [config] if isinstance(config, (str, os.PathLike, Mapping)) else list(config)
    args = []
    for item in items:
        if isinstance(item, Mapping):
            args += ["--config", json.dumps(item, default=str)]  # the parser reads a config given as text too
        elif isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if not path.is_file():
                what = "is a directory, not a config file" if path.is_dir() else "does not exist"
                raise UserError(f"Config file {str(item)!r} {what}.")
            args += ["--config", str(path)]
        else:
            raise UserError(f"unlearn(): config must be a path, a dict or a list of them, got {type(item).__name__}.")
    return args


def _setting_args(settings: Mapping[str, Any]) -> list[str]:
    """``--key=value`` for each dotted setting, the value as the parser reads a command-line value (YAML)."""
    args = []
    for key, value in settings.items():
        if not isinstance(key, str) or not key.strip("-"):
            raise UserError(f"unlearn(): a setting's name must be a dotted option name, got {key!r}.")
        text = str(value) if isinstance(value, (str, os.PathLike)) else json.dumps(value, default=str)
        args.append(f"--{key.lstrip('-')}={text}")
    return args


def _is_plain(value) -> bool:
    """Whether ``value`` can be written in a config (YAML data), rather than being an object only Python holds."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(map(_is_plain, value))
    return isinstance(value, Mapping) and all(isinstance(k, str) and _is_plain(v) for k, v in value.items())


def _run_cli(args: list[str], objects: dict[str, Any], trainer_objects: dict[str, Any]):
    """The finished unlearn CLI; the user's mistakes as one-line :class:`UserError`\\ s."""
    try:
        with warnings.catch_warnings():
            # LightningCLI warns when a program given `args` has command-line arguments of its own: this one has.
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter")
            return _api_cli()(args, objects, trainer_objects)
    except (NotForgotten, UserError):
        raise
    except ArgumentError as error:  # the parser's: a bad setting, key or config file
        raise UserError(" ".join(line.strip() for line in str(error).splitlines())) from error
    except Exception as error:
        cause = first_cause(error)
        if cause is None:
            raise
        raise UserError(str(cause)) from error


@cache
def _api_cli() -> type:
    """The command line's ``SlugCLI``, running ``unlearn`` for the API (built on first use: it imports Lightning)."""
    from typing_extensions import override

    from slug_lightning.trainer_cli import SlugCLI  # the one import of the command line's parser here

    class ApiCLI(SlugCLI):
        """``SlugCLI`` for ``unlearn``, with Python objects standing in for config sections, parser errors raised
        rather than printed with the usage, and the report kept (:attr:`report`)."""

        def __init__(self, args: list[str], objects: dict[str, Any], trainer_objects: dict[str, Any]) -> None:
            self.objects, self.trainer_objects = objects, trainer_objects
            self.replaced: dict[str, Any] = {}  # the parsed sections that objects stand in for, kept for the record
            self.report: dict | None = None
            super().__init__(args=args, run=True)

        @override
        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            config = self.config["unlearn"]
            if "trainer" not in self.objects:  # a Trainer built here writes nothing where the program runs
                if config["trainer"]["logger"] is None:
                    config["trainer"]["logger"] = False
                if config["trainer"]["default_root_dir"] is None:
                    config["trainer"]["default_root_dir"] = config["output_dir"]
            # LightningCLI records a module's hyperparameters from a dump of the whole config, which must still
            # hold every section the parser requires when the config's model or datamodule is built: taken now.
            self._dump_config()
            for section in ("model", "data", "search"):
                if section in self.objects:  # nothing to build: the object replaces it
                    self.replaced[section] = config[section]
                    config[section] = None

        @override
        def instantiate_classes(self) -> None:
            super().instantiate_classes()
            for section, parsed in self.replaced.items():  # back, for the record in config.yaml
                self.config["unlearn"][section] = parsed
            self.model = self.objects.get("model", self.model)
            self.datamodule = self.objects.get("data", self.datamodule)
            if "search" in self.objects:
                self.config_init["unlearn"]["search"] = self.objects["search"]

        @override
        def instantiate_trainer(self, **kwargs):
            if "trainer" in self.objects:
                return self.objects["trainer"]
            return super().instantiate_trainer(**{**self.trainer_objects, **kwargs})

        @override
        def before_unlearn(self) -> None:
            if self.datamodule is None:
                raise UserError("unlearn(): no data: give `data` (a LightningDataModule) or a config with `data`.")
            if not (self.objects or self.trainer_objects):
                super().before_unlearn()  # the command line's check and config.yaml, as they are
                return
            import yaml

            from slug_lightning.artifacts import write_text
            from slug_lightning.trainer import unlearn_dir

            config = self.config["unlearn"]
            smoke = bool(self.trainer.fast_dev_run)
            output = unlearn_dir(Path(config["output_dir"]), config["overwrite"], smoke, config["method"])
            if not self.trainer.is_global_zero:
                return
            record = yaml.safe_load(self._subcommand_parsers["unlearn"].dump(config, skip_none=False))
            for section, value in self.objects.items():
                record[section] = _record_of(value)
            for key, value in self.trainer_objects.items():
                record["trainer"][key] = _record_of(value)
            given = [*self.objects, *(f"trainer.{key}" for key in self.trainer_objects)]
            header = (
                "# Written by slug_lightning.unlearn(). Given as Python objects, recorded by their class (and the\n"
                f"# arguments they keep): {', '.join(given)}. Rerunning it needs those sections completed.\n"
            )
            write_text(output / CONFIG, header + yaml.safe_dump(record, sort_keys=False))

        def unlearn(self, **kwargs) -> None:
            """What ``_run_subcommand`` calls for ``unlearn`` (LightningCLI looks for a method of the subcommand's
            name on the CLI first): the Trainer's, its report kept."""
            self.report = self.trainer.unlearn(**kwargs)

    return ApiCLI


def _record_of(value) -> Any:
    """What a config file can say of an object given in Python: its class, and the arguments it keeps."""
    if isinstance(value, (list, tuple)):
        return [_record_of(item) for item in value]
    kind = type(value)
    record: dict[str, Any] = {"class_path": f"{kind.__module__}.{kind.__qualname__}"}
    hparams = getattr(value, "hparams", None)
    if isinstance(hparams, Mapping) and hparams:
        record["init_args"] = json.loads(json.dumps(dict(hparams), default=str))
    return record
