"""The command line: ``python -m slug_lightning fit|validate|test|predict|unlearn|evaluate|demo|make-world``.

The Trainer subcommands are LightningCLI's (``--help``, ``--print_config``, several ``--config`` files,
dotted overrides); ``unlearn`` and ``evaluate`` are methods of :class:`~slug_lightning.trainer.SlugTrainer`.
``demo`` and ``make-world`` are plain commands: they are not Trainer runs.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from typing_extensions import override

from slug_lightning import console
from slug_lightning.errors import ConfigError, NotForgotten, UserError
from slug_lightning.trainer import SlugTrainer, unlearn_dir

DESCRIPTION = """\
SLUG (Single Layer Unlearning Gradient) for OpenCLIP models.

Trainer subcommands (configure with --config FILE.yaml, several allowed, and dotted overrides):
  fit        train or fine-tune a CLIP on image-caption shards (CLIPContrastive)
  unlearn    make a CLIP forget concepts: gradients, Pareto layers, step-size search, artifacts
  evaluate   zero-shot top-1/top-5 of a CLIP on labelled image sets
Other commands:
  demo       make the demo world, fit the tiny CLIP, unlearn one person, print the result
  make-world write the demo world (LAION-style shards + labelled sets)
  export-diffusers / export-llava   put a run's edit into a diffusers text encoder / a LLaVA vision tower
  eval-diffusion / eval-vlm         measure forgetting in a diffusion pipeline / a LLaVA-style VLM
  compare    run SLUG and the baselines (FT, GA, GAFT, SalUn, SSD) on one config; table and plot
  delta      show, apply, remove or combine the per-concept edits of runs (delta.safetensors)

--quiet (anywhere): only warnings, errors and the result; --verbose: every library message and tip.
Set SLUG_DEBUG=1 to see a traceback for input errors.
"""

# Commands that are not Trainer runs (slug_lightning.commands): name -> "module:function", the function taking
# (argv, prog) and returning an exit code. Imported only when used, so `--help` of the Trainer subcommands stays
# fast.
PLAIN_COMMANDS = {
    "demo": "slug_lightning.commands.demo:main",
    "make-world": "slug_lightning.commands.demo:make_world_main",
    "export-diffusers": "slug_lightning.commands.export:export_diffusers_main",
    "export-llava": "slug_lightning.commands.export:export_llava_main",
    "eval-diffusion": "slug_lightning.commands.evaluate_hf:diffusion_main",
    "eval-vlm": "slug_lightning.commands.evaluate_hf:vlm_main",
    "compare": "slug_lightning.commands.compare:main",
    "delta": "slug_lightning.commands.delta:main",
    "audit": "slug_lightning.commands.audit:main",
}

# Errors caused by what the user gave, shown as one line. Anything else is a bug and keeps its traceback: the
# constructors of the classes built from the config raise ConfigError (a UserError) for the settings they refuse,
# so a plain ValueError from inside one (a computation gone wrong) is not mistaken for the user's.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, PermissionError)


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

    def __init__(self, args: Sequence[str] | None = None, run: bool = True) -> None:
        super().__init__(
            trainer_class=SlugTrainer,
            save_config_callback=_SaveFitConfig,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": _prog(), "description": DESCRIPTION, "formatter_class": _RawHelp},
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {
            **LightningCLI.subcommands(),
            "unlearn": {"model", "datamodule"},
            "evaluate": {"model", "datamodule"},
        }

    @override
    def instantiate_classes(self) -> None:
        """Lightning's, with a setting a constructor refuses (a :class:`ConfigError`) named by its full option."""
        try:
            super().instantiate_classes()
        except Exception as error:
            refused = _first_cause(error, ConfigError)
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


def _prog() -> str:
    name = Path(sys.argv[0]).name
    return "python -m slug_lightning" if name in ("__main__.py", "-c", "") else name


def _raw_help():
    from jsonargparse import DefaultHelpFormatter

    class RawHelp(DefaultHelpFormatter):
        """Keeps the line breaks of the description."""

        def _fill_text(self, text, width, indent):
            return "".join(indent + line for line in text.splitlines(keepends=True))

    return RawHelp


_RawHelp = _raw_help()


def main(args: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code. ``args`` defaults to ``sys.argv[1:]``."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        verbosity, rest = split_verbosity(argv)
        console.configure_output(verbosity or console.verbosity())  # none given: as it is (a command run by `demo`)
        if rest[:1] and rest[0] in PLAIN_COMMANDS:
            module, function = PLAIN_COMMANDS[rest[0]].split(":")
            command = getattr(importlib.import_module(module), function)
            return command(rest[1:], prog=f"{_prog()} {rest[0]}")
        # With args=None LightningCLI reads sys.argv itself, which the DDP launcher re-runs in each child (flags
        # included, parsed again there); given a verbosity flag, LightningCLI gets the arguments without it.
        SlugCLI(args=None if args is None and rest == argv else rest)
    except NotForgotten as error:
        print(f"error: {error}", file=sys.stderr)
        return NotForgotten.exit_code
    except Exception as error:
        user_error = _user_error(error)
        if user_error is None or os.environ.get("SLUG_DEBUG"):
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return 2
    return 0


def split_verbosity(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The verbosity that ``--quiet`` or ``--verbose`` (anywhere in ``argv``) asks for, None without either, and
    the other arguments.

    Raises:
        UserError: Both flags.
    """
    flags = {"--quiet": "quiet", "--verbose": "verbose"}
    given = {flags[arg] for arg in argv if arg in flags}
    if len(given) > 1:
        raise UserError("--quiet and --verbose contradict each other; give one of them.")
    return (given.pop() if given else None), [arg for arg in argv if arg not in flags]


def _first_cause(
    error: BaseException | None, kind: type[BaseException] | tuple[type[BaseException], ...]
) -> BaseException | None:
    """``error`` or the first of its explicit causes that is a ``kind``, else None."""
    while error is not None and not isinstance(error, kind):
        error = error.__cause__
    return error


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


def _user_error(error: BaseException | None) -> BaseException | None:
    """``error`` or the first of its explicit causes that is a user error, else None.

    jsonargparse re-raises an exception of a class it instantiates (a ModelLoadError of ``--model``) as a
    plain ValueError ``from`` the original, so the cause chain is where the user's problem is.
    """
    return _first_cause(error, USER_ERRORS)
