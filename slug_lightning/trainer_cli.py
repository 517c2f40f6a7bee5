"""The Trainer commands of the command line (``fit``, ``unlearn``, ``evaluate``): LightningCLI with SlugTrainer.

Imported only when one of them runs, so that ``--help``, ``--version`` and the plain commands start without
Lightning. :mod:`slug_lightning.cli` dispatches here.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from typing_extensions import override

from slug_lightning.errors import ConfigError, UsageError, UserError, first_cause
from slug_lightning.trainer import SlugTrainer, unlearn_dir
from slug_lightning.usage import condense, suggestion


class _SaveFitConfig(SaveConfigCallback):
    """Lightning's config record, for ``fit`` only: ``unlearn`` writes its resolved config into its own
    output directory, and without a logger the log directory is the working directory, which a run must
    not litter."""

    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


class SlugCLI(LightningCLI):
    """LightningCLI with the ``unlearn`` and ``evaluate`` subcommands of :class:`SlugTrainer`."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, prog: str = "slug-lightning") -> None:
        self.prog = prog
        super().__init__(
            trainer_class=SlugTrainer,
            save_config_callback=_SaveFitConfig,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": prog},
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``unlearn`` and ``evaluate``: Lightning's ``validate``, ``test`` and ``predict`` are left out, as
        no packaged module defines their steps."""
        return {
            "fit": LightningCLI.subcommands()["fit"],
            "unlearn": {"model", "datamodule"},
            "evaluate": {"model", "datamodule"},
        }

    @override
    def init_parser(self, **kwargs):
        """Lightning's parser, raising its errors (one line, by :func:`slug_lightning.cli.main`) instead of printing
        the usage and exiting."""
        return super().init_parser(**{**kwargs, "exit_on_error": False})

    @override
    def parse_arguments(self, parser, args) -> None:
        """Lightning's, with a parser error made one line and a close option name suggested."""
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as error:
            given = sys.argv[1:] if args is None else args
            command = next((a for a in given if a in self.subcommands()), None)
            message = condense(str(error))
            names = option_names(self._subcommand_parsers[command]) if command else []
            raise UsageError(message + suggestion(message, names), f"{self.prog} {command or ''}".strip()) from None

    @override
    def instantiate_classes(self) -> None:
        """Lightning's, with a setting a constructor refuses (a :class:`ConfigError`) named by its full option."""
        try:
            super().instantiate_classes()
        except Exception as error:
            refused = first_cause(error, ConfigError)
            config = self.config.get(self.subcommand) if self.subcommand else self.config
            path = _option_path(config, refused.option, refused.value) if refused and refused.option else None
            if path is None:
                raise
            raise UserError(f"--{path}: {refused}") from error

    @override
    def before_instantiate_classes(self) -> None:
        """Refuse a ``trainer.val_check_interval`` below 1 step as one line, before Lightning takes it apart."""
        if self.subcommand == "fit":
            from slug_lightning.datamodules.laion import check_val_check_interval

            check_val_check_interval(self.config["fit"]["trainer"]["val_check_interval"])

    def before_unlearn(self) -> None:
        """Refuse a finished output directory before any work, then record the resolved config in it (in its
        ``smoke`` subdirectory for a smoke run, ``--trainer.fast_dev_run``)."""
        config = self.config["unlearn"]
        output = unlearn_dir(
            Path(config["output_dir"]), config["overwrite"], bool(self.trainer.fast_dev_run), config["method"]
        )
        if self.trainer.is_global_zero:
            from slug_lightning.artifacts import write_text

            text = self._subcommand_parsers["unlearn"].dump(config, skip_none=False)
            write_text(output / "config.yaml", text)


def option_names(parser) -> list[str]:
    """The ``--options`` a subcommand parser takes, with the init arguments of the packaged default classes."""
    names = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    from slug_lightning.callbacks.step_search import StepSearch
    from slug_lightning.datamodules.laion import LaionDataModule
    from slug_lightning.gradients import GradientCollector

    for group, klass in (("search", StepSearch), ("data", LaionDataModule), ("model", GradientCollector)):
        names += [f"--{group}.init_args.{name}" for name in inspect.signature(klass).parameters if name[0] != "_"]
    return names


def _option_path(config, option: str, value) -> str | None:
    """The dotted option of ``config`` that a constructor parameter ``option`` given ``value`` came from.

    Among the settings named ``option`` that are not None, the one equal to ``value``, else the only one;
    None when that does not single one out (the message then names the parameter alone).
    """
    from jsonargparse import Namespace

    found: list[tuple[str, object]] = []

    def walk(node, prefix: str) -> None:
        if isinstance(node, (list, tuple)):
            for index, item in enumerate(node):
                walk(item, f"{prefix}[{index}]")
            return
        items = vars(node).items() if isinstance(node, Namespace) else node.items() if isinstance(node, dict) else ()
        for key, item in items:
            if not isinstance(key, str) or key.startswith("__"):
                continue
            path = f"{prefix}.{key}" if prefix else key
            if key == option and item is not None:
                found.append((path, item))
            walk(item, path)

    walk(config, "")

    def plain(item):  # a list and a tuple of the same items are the same setting
        return list(item) if isinstance(item, (list, tuple)) else item

    equal = [path for path, item in found if plain(item) == plain(value)]
    if len(equal) == 1:
        return equal[0]
    return found[0][0] if len(found) == 1 else None
