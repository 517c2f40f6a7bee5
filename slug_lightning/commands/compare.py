"""``python -m slug_lightning compare``: the command line of :func:`slug_lightning.compare.compare`.

It parses and checks the arguments, derives the SSD grid when none is given, and runs the comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slug_lightning.commands.audit import add_audit_arguments, settings_of
from slug_lightning.commands.parsing import CommandParser
from slug_lightning.compare import DEFAULT_LRS, compare
from slug_lightning.errors import UserError
from slug_lightning.methods import METHODS


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=prog,
        description="Run SLUG and the baselines (FT, GA, GAFT, SalUn, SSD) on one unlearn config and tabulate "
        "forget and test accuracy, wall time, peak memory and edit size.",
        epilog="Example: python -m slug_lightning compare --config configs/demo/unlearn.yaml --config paths.yaml "
        "--lrs 1e-5 1e-4 1e-3 --output_dir runs/compare",
    )
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="FILE",
        help="an unlearn config (several allowed, later ones override), as for `unlearn`",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        metavar="M",
        help=f"methods to run (default: all of {', '.join(METHODS)})",
    )
    parser.add_argument(
        "--lrs",
        nargs="+",
        type=float,
        default=list(DEFAULT_LRS),
        metavar="LR",
        help="learning rates tried for ft, ga, gaft, salun (default: 1e-6 1e-5 1e-4, the paper's "
        "1e-6 and two larger ones)",
    )
    parser.add_argument(
        "--ssd_alphas",
        nargs="+",
        type=float,
        default=None,
        metavar="A",
        help="SSD selection thresholds tried (default: as many as --lrs, from the paper's 10 up in "
        "half-decade steps: 10 31.6 100 ...; a larger alpha dampens fewer weights)",
    )
    parser.add_argument("--iterations", type=int, default=10, help="iterations of the iterative baselines (10)")
    parser.add_argument("--output_dir", default="runs/compare", help="where the runs and the table go")
    parser.add_argument("--overwrite", action="store_true", help="rerun methods whose run directory is finished")
    audit = parser.add_argument_group("audit of each method's kept setting (as for `audit`)")
    audit.add_argument("--no_audit", action="store_true", help="leave the kept settings unaudited")
    add_audit_arguments(audit)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m slug_lightning compare") -> int:
    args = _parser(prog).parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise UserError(f"--methods {unknown} unknown; choose from {list(METHODS)}.")
    if args.iterations < 1:
        raise UserError(f"--iterations must be >= 1, got {args.iterations}.")
    bad = [v for v in args.lrs + (args.ssd_alphas or []) if not v > 0]
    if bad:
        raise UserError(f"--lrs and --ssd_alphas must be > 0, got {bad}.")
    for config in args.config:
        if not Path(config).is_file():
            raise UserError(f"--config {config!r} does not exist.")
    audit = None if args.no_audit else settings_of(args)
    alphas = args.ssd_alphas or [round(10.0 * 10 ** (i / 2), 1) for i in range(len(args.lrs))]
    output = Path(args.output_dir)
    compare(args.config, args.methods, args.lrs, alphas, args.iterations, output, args.overwrite, audit)
    return 0
