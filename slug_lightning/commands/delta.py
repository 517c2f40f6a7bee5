"""``python -m slug_lightning delta show|apply|remove|combine``: a run's edits as modular deltas.

The functions are in :mod:`slug_lightning.deltas`; this module only parses arguments, reads and writes
files, and prints. Every check happens before anything is written, so bad input leaves no output file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from slug_lightning.commands.parsing import CommandParser
from slug_lightning.errors import UserError

if TYPE_CHECKING:
    from slug_lightning.deltas import Delta


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=prog,
        description="Show, apply, remove and combine the per-concept edits of unlearn runs "
        "(delta.safetensors). Checkpoints are OpenCLIP state dicts (safetensors or weights-only torch files).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    show = commands.add_parser("show", help="list each delta's concepts, layers, step sizes and base model")
    show.add_argument("deltas", nargs="+", metavar="DELTA", help="delta.safetensors files")

    for name, verb in (("apply", "add"), ("remove", "subtract")):
        command = commands.add_parser(name, help=f"{verb} deltas to/from a checkpoint and write a new one")
        command.add_argument(
            "--model", required=True, help="the checkpoint (e.g. fit's export or a run's model.safetensors)"
        )
        command.add_argument("--delta", required=True, nargs="+", help="delta.safetensors file(s)")
        command.add_argument(
            "--concept", nargs="+", default=None, help="only these concepts of the deltas (default: all of them)"
        )
        command.add_argument(
            "--output", required=True, help="the new checkpoint (.safetensors, must differ from --model)"
        )

    combine = commands.add_parser("combine", help="merge deltas of separate runs on one base model into one")
    combine.add_argument("deltas", nargs="+", metavar="DELTA", help="delta.safetensors files")
    combine.add_argument(
        "--concept", nargs="+", default=None, help="only these concepts (each must be in one of the deltas)"
    )
    combine.add_argument("--output", required=True, help="the combined delta (.safetensors)")
    return parser


def _check_output(output: str, inputs: list[str]) -> Path:
    path = Path(output).expanduser()
    if path.suffix != ".safetensors":
        raise UserError(f"--output {output!r} must be a .safetensors file.")
    if any(path.resolve() == Path(p).expanduser().resolve() for p in inputs):
        raise UserError(f"--output {output!r} is one of the inputs; write to a new file.")
    return path


def _combined(paths: list[str], concepts: list[str] | None) -> Delta:
    from slug_lightning import deltas

    read = [deltas.read_delta(p) for p in paths]
    try:
        delta = deltas.combine(read) if len(read) > 1 else read[0]
        delta = deltas.select(delta, concepts)
        deltas.check_finite(delta)  # before anything is written
        return delta
    except ValueError as error:
        raise UserError(str(error)) from None


def show(paths: list[str]) -> str:
    """The table ``delta show`` prints: one row per concept and layer of every delta."""
    from slug_lightning import deltas

    rows = [("delta", "concept", "layer", "tower", "step size", "rel. change", "base model")]
    for path in paths:
        delta = deltas.read_delta(path)
        for entry in delta.entries:
            change = entry["relative_change"]
            rows.append(
                (
                    path,
                    entry["concept"],
                    entry["layer"],
                    entry["tower"] or "?",
                    f"{entry['step_size']:.4g}" if entry["step_size"] is not None else "?",
                    f"{change:.4f}" if change is not None else "?",
                    delta.base_fingerprint or "unknown",
                )
            )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str] | None = None, prog: str = "python -m slug_lightning delta") -> int:
    args = _parser(prog).parse_args(argv)
    from slug_lightning import deltas  # after parsing: --help and mistakes need no torch

    if args.command == "show":
        print(show(args.deltas))
        return 0
    if args.command == "combine":
        output = _check_output(args.output, args.deltas)
        delta = _combined(args.deltas, args.concept)
        deltas.write_delta(output, delta)
        print(f"wrote {output}: {', '.join(delta.concepts)} (base model {delta.base_fingerprint})")
        return 0
    output = _check_output(args.output, [args.model, *args.delta])
    delta = _combined(args.delta, args.concept)
    state_dict, provenance, metadata = deltas.read_checkpoint(args.model)
    change = deltas.apply_to_checkpoint if args.command == "apply" else deltas.remove_from_checkpoint
    state_dict, provenance = change(state_dict, provenance, delta, checkpoint=repr(args.model))
    deltas.write_checkpoint(output, state_dict, provenance, metadata)
    verb = "applied" if args.command == "apply" else "removed"
    print(
        f"wrote {output}: {verb} {', '.join(delta.concepts)}; it now carries "
        f"{', '.join(provenance.concepts) or 'no delta'} on base model {provenance.base_fingerprint}"
    )
    return 0
