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

from slug_lightning.errors import UserError
from slug_lightning.trainer import SlugTrainer, check_output_dir

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

Set SLUG_DEBUG=1 to see a traceback for input errors.
"""

# Commands that are not Trainer runs: name -> "module:function", the function taking (argv, prog) and
# returning an exit code. Imported only when used, so `--help` of the Trainer subcommands stays fast.
PLAIN_COMMANDS = {
    "demo": "slug_lightning.demo:main",
    "make-world": "slug_lightning.datamodules.demo_world:main",
    "export-diffusers": "slug_lightning.hf.export:export_diffusers_main",
    "export-llava": "slug_lightning.hf.export:export_llava_main",
    "eval-diffusion": "slug_lightning.hf.evaluate:diffusion_main",
    "eval-vlm": "slug_lightning.hf.evaluate:vlm_main",
    "compare": "slug_lightning.compare:main",
    "delta": "slug_lightning.delta_cli:main",
}

# Errors caused by what the user gave, shown as one line. Anything else is a bug and keeps its traceback.
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

    def before_unlearn(self) -> None:
        """Refuse a finished output directory before any work, then record the resolved config in it."""
        config = self.config["unlearn"]
        output = Path(config["output_dir"])
        check_output_dir(output, config["overwrite"])
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
        if argv[:1] and argv[0] in PLAIN_COMMANDS:
            module, function = PLAIN_COMMANDS[argv[0]].split(":")
            command = getattr(importlib.import_module(module), function)
            return command(argv[1:], prog=f"{_prog()} {argv[0]}")
        # With args=None LightningCLI reads sys.argv itself, which the DDP launcher re-runs in each child.
        SlugCLI(args=None if args is None else argv)
    except Exception as error:
        user_error = _user_error(error)
        if user_error is None or os.environ.get("SLUG_DEBUG"):
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return 2
    return 0


def _user_error(error: BaseException | None) -> BaseException | None:
    """``error`` or the first of its explicit causes that is a user error, else None.

    jsonargparse re-raises an exception of a class it instantiates (a ModelLoadError of ``--model``) as a
    plain ValueError ``from`` the original, so the cause chain is where the user's problem is.
    """
    while error is not None:
        if isinstance(error, USER_ERRORS):
            return error
        error = error.__cause__
    return None
