"""``python -m slug_lightning audit --run RUN_DIR``: does the run's concept stay forgotten?

The work is :func:`slug_lightning.audit.run.audit_run` (the measures) and :func:`~slug_lightning.audit.run.write_audit`
(``audit.json``, the ``audit`` block of ``report.json``, the ``## Audit`` section of ``report.md``); this module parses
the arguments, checks the run directory before anything is loaded or written, and prints one verdict line per
concept.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slug_lightning.audit.settings import DEFAULT_KS, RELEARN_EVERY, RELEARN_LR, RELEARN_STEPS, AuditSettings
from slug_lightning.commands.parsing import CommandParser
from slug_lightning.errors import ConfigError, UserError


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :class:`~slug_lightning.audit.settings.AuditSettings` (``audit`` and ``compare`` share them)."""
    parser.add_argument(
        "--templates",
        default=None,
        metavar="FILE",
        help="held-out templates, one per line, each with one {} (default: the shipped list less the search's own)",
    )
    parser.add_argument(
        "--paraphrases",
        nargs="+",
        default=[],
        metavar="NAME",
        help="other names to try for every concept, besides its aliases (e.g. 'the CEO of Tesla')",
    )
    relearn = parser.add_mutually_exclusive_group()
    relearn.add_argument(
        "--relearn_ks",
        nargs="+",
        type=int,
        default=list(DEFAULT_KS),
        metavar="K",
        help=f"forget pairs to fine-tune on, per relearning run (default: {' '.join(map(str, DEFAULT_KS))})",
    )
    relearn.add_argument("--no_relearn", action="store_true", help="skip the relearning measure")
    parser.add_argument(
        "--relearn_steps",
        type=int,
        default=RELEARN_STEPS,
        help=f"relearning budget in optimizer steps (default: {RELEARN_STEPS})",
    )
    parser.add_argument(
        "--relearn_lr", type=float, default=RELEARN_LR, help=f"relearning learning rate (default: {RELEARN_LR:g})"
    )
    parser.add_argument(
        "--relearn_every",
        type=int,
        default=RELEARN_EVERY,
        help=f"steps between two forget evaluations while relearning (default: {RELEARN_EVERY})",
    )


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=prog,
        description=(
            "Audit a finished unlearn run (SLUG or a baseline): the base model against the unlearned one, for each "
            "forgotten concept, under prompts the run never tried (held-out templates, aliases, paraphrases), "
            "searching the images by name, a linear probe on image features, the image-text similarity shift, "
            "and relearning from a few forget pairs. Writes RUN_DIR/audit.json and adds an audit block to "
            "report.json and an '## Audit' section to report.md."
        ),
    )
    parser.add_argument("--run", required=True, help="output directory of a finished unlearn run (report.json)")
    add_audit_arguments(parser)
    parser.add_argument("--device", default="cpu", help="where to compute (default: cpu)")
    parser.add_argument("--output", default=None, help="the audit's JSON file (default: RUN_DIR/audit.json)")
    return parser


def _read_templates(path: str | None) -> list[str]:
    """The non-empty lines of a templates file (none without one)."""
    if path is None:
        return []
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise UserError(f"--templates {path!r} cannot be read ({error.strerror or error}).") from None
    templates = [line.strip() for line in lines if line.strip()]
    if not templates:
        raise UserError(f"--templates {path!r} holds no template; give one per line, e.g. 'a photo of {{}}.'.")
    return templates


def settings_of(args: argparse.Namespace) -> AuditSettings:
    """The :class:`~slug_lightning.audit.settings.AuditSettings` the arguments give; a refused one as one line
    naming the option."""
    try:
        return AuditSettings(
            templates=_read_templates(args.templates),
            paraphrases=args.paraphrases,
            relearn_ks=() if args.no_relearn else args.relearn_ks,
            relearn_steps=args.relearn_steps,
            relearn_lr=args.relearn_lr,
            relearn_every=args.relearn_every,
        )
    except ConfigError as error:
        raise UserError(f"--{error}") from None


def main(argv: list[str] | None = None, prog: str = "python -m slug_lightning audit") -> int:
    args = _parser(prog).parse_args(argv)
    settings = settings_of(args)
    from slug_lightning.audit.render import terminal_lines
    from slug_lightning.audit.run import audit_run, check_run_dir, write_audit

    check_run_dir(args.run)  # before any model is loaded: nothing is written for a bad run directory
    audit = audit_run(args.run, settings, args.device)
    path = write_audit(audit, args.output)
    print("\n".join(terminal_lines(audit)))
    print(f"  wrote {path}; added the audit to report.json and report.md")
    return 0
