"""The command line: ``python -m slug_lightning COMMAND`` (or ``slug-lightning COMMAND``).

``fit``, ``unlearn`` and ``evaluate`` are LightningCLI commands of :class:`~slug_lightning.trainer.SlugTrainer`
(:mod:`slug_lightning.trainer_cli`); the others are plain commands (:mod:`slug_lightning.commands`). Both families
share one style: options with underscores (dashes are accepted), ``--flag`` or ``--flag true|false`` for switches,
``--output`` for a file and ``--output_dir`` for a directory, and one-line errors (exit 2). This module imports
neither Lightning nor torch, so ``--help``, ``--version`` and each plain command's ``--help`` start at once.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from slug_lightning import __version__, console
from slug_lightning.commands.parsing import underscored
from slug_lightning.errors import NotForgotten, UsageError, UserError, first_cause
from slug_lightning.usage import error_line, suggestion

# Commands run by LightningCLI: name -> what it does.
TRAINER_COMMANDS = {
    "fit": "train or fine-tune a CLIP on image-caption shards (CLIPContrastive)",
    "unlearn": "make a CLIP forget concepts: gradients, Pareto layers, step-size search, artifacts",
    "evaluate": "zero-shot top-1/top-5 of a CLIP on labelled image sets",
}
# Commands that are not Trainer runs: name -> ("module:function", what it does). The function takes (argv, prog)
# and returns an exit code; it is imported only when its command runs.
PLAIN_COMMANDS = {
    "demo": ("slug_lightning.commands.demo:main", "make the demo world, fit the tiny CLIP, unlearn one person"),
    "make-world": ("slug_lightning.commands.demo:make_world_main", "write the demo world (shards + labelled sets)"),
    "audit": ("slug_lightning.commands.audit:main", "check that a run's forgetting holds (prompts, relearning)"),
    "compare": ("slug_lightning.commands.compare:main", "run SLUG and the baselines on one config; table and plot"),
    "delta": ("slug_lightning.commands.delta:main", "show, apply, remove or combine runs' per-concept edits"),
    "export-diffusers": (
        "slug_lightning.commands.export:export_diffusers_main",
        "put a run's edit into SD's text encoder",
    ),
    "export-llava": ("slug_lightning.commands.export:export_llava_main", "put a run's edit into a LLaVA vision tower"),
    "eval-diffusion": ("slug_lightning.commands.evaluate_hf:diffusion_main", "measure forgetting in an SD pipeline"),
    "eval-vlm": ("slug_lightning.commands.evaluate_hf:vlm_main", "measure forgetting in a LLaVA-style VLM"),
}
COMMANDS = [*TRAINER_COMMANDS, *PLAIN_COMMANDS]
# Options that are switches in no command, never given a value by --flag normalisation.
_NOT_SWITCHES = ("--help", "--print_config", "--config", "-c", "-h")


def prog() -> str:
    """How the user called the program: ``python -m slug_lightning`` or the console script's name."""
    name = Path(sys.argv[0]).name
    return "python -m slug_lightning" if name in ("__main__.py", "-c", "") else name


def top_help() -> str:
    """``--help`` of the program: the commands, and the conventions every command shares."""
    width = max(map(len, COMMANDS))
    trainer = [f"  {name:<{width}}  {text}" for name, text in TRAINER_COMMANDS.items()]
    plain = [f"  {name:<{width}}  {text}" for name, (_, text) in PLAIN_COMMANDS.items()]
    return "\n".join(
        [
            f"usage: {prog()} [--version] [--quiet | --verbose] COMMAND [options]",
            "",
            "SLUG (Single Layer Unlearning Gradient) for OpenCLIP models, on PyTorch Lightning.",
            "",
            "Trainer commands (--config FILE.yaml, several allowed, then dotted overrides such as",
            "--search.init_args.metric top1; --trainer.* are Lightning's Trainer options):",
            *trainer,
            "Other commands:",
            *plain,
            "",
            f"Example: {prog()} unlearn --config configs/demo/unlearn.yaml --concept 'Vesna Fairbank'",
            "Every command has --help. Options take underscores (dashes work too); switches are --flag or",
            "--flag true|false. --quiet shows only warnings and the result; --verbose shows third-party notices.",
            "Set SLUG_DEBUG=1 to see a traceback for input errors.",
        ]
    )


def normalise(command: str, argv: Sequence[str]) -> list[str]:
    """``argv`` in the one style every parser takes: option names with underscores; for the Trainer commands, a bare
    switch (``--overwrite``) given ``true``, and ``unlearn --concept NAME`` (repeatable) made the concept list."""
    result: list[str] = []
    concepts: list[str] = []
    tokens = list(argv)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token == "--":
            result += tokens[index:]
            break
        if token.startswith("--") and len(token) > 2:
            token = underscored(token)
            name, equals, value = token.partition("=")
            if command == "unlearn" and name in ("--concept",):
                if equals:
                    concepts.append(value)
                elif index + 1 < len(tokens):
                    concepts.append(tokens[index + 1])
                    index += 1
                else:
                    raise UsageError("--concept needs a name", f"{prog()} unlearn")
                index += 1
                continue
            following = tokens[index + 1] if index + 1 < len(tokens) else None
            bare = not equals and (following is None or following.startswith("--") or following in _NOT_SWITCHES)
            if command in TRAINER_COMMANDS and bare and not token.endswith("help") and token not in _NOT_SWITCHES:
                result += [token, "true"]
                index += 1
                continue
        result.append(token)
        index += 1
    if concepts:
        result.append(f"--data.init_args.concepts={json.dumps(concepts)}")
    return result


def main(args: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code. ``args`` defaults to ``sys.argv[1:]``."""
    argv = list(sys.argv[1:] if args is None else args)
    try:
        verbosity, argv = split_verbosity(argv)
        console.configure_output(verbosity or console.verbosity())  # none given: as it is (a command run by `demo`)
        return _run(argv)
    except NotForgotten as error:
        print(f"error: {error}", file=sys.stderr)
        return NotForgotten.exit_code
    except Exception as error:
        user_error = first_cause(error)
        if user_error is None or os.environ.get("SLUG_DEBUG"):
            raise
        if isinstance(user_error, UsageError):
            print(error_line(" ".join(str(user_error).split()), user_error.command), file=sys.stderr)
        else:
            print(f"error: {user_error}", file=sys.stderr)
        return 2


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(top_help())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"slug_lightning {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        known = ["--version", "--help", "--quiet", "--verbose"] if command.startswith("-") else COMMANDS
        what = "option" if command.startswith("-") else "command"
        raise UsageError(f"unknown {what} {command!r}" + suggestion(command, known, [command]), prog())
    rest = normalise(command, rest)
    if command == "unlearn" and {"-h", "--help"} & set(rest):
        from slug_lightning.unlearn_help import unlearn_help

        print(unlearn_help(prog()))
        return 0
    rest = ["--help" if token == "--help_all" else token for token in rest]
    if command in PLAIN_COMMANDS:
        module, function = PLAIN_COMMANDS[command][0].split(":")
        run = getattr(importlib.import_module(module), function)
        return run(rest, prog=f"{prog()} {command}")
    from slug_lightning.trainer_cli import SlugCLI

    # sys.argv stays as given: the DDP launcher re-runs it in each child, which reads its flags again.
    SlugCLI(args=[command, *rest], prog=prog())
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
