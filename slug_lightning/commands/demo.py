"""The demo's commands: ``python -m slug_lightning demo`` (:func:`main`, which runs
:func:`slug_lightning.demo.run.run_demo`) and ``make-world`` (:func:`make_world_main`, which writes the demo
world alone with :func:`slug_lightning.demo.world.make_demo_world` and prints a summary).
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Sequence

from slug_lightning.commands.parsing import CommandParser
from slug_lightning.demo.run import run_demo


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = CommandParser(
        prog=prog,
        description="Make the demo world, fit the tiny CLIP (cached), unlearn one person, print the result.",
    )
    parser.add_argument("--output_dir", default="runs/demo", help="where everything goes (default: runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo world and of the runs (default: 0)")
    parser.add_argument(
        "--concept", default=None, help="person (or object kind) to forget (default: the world's default target)"
    )
    parser.add_argument("--refit", action="store_true", help="fit the tiny CLIP again even if a fit is cached")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes for unlearn (DDP when > 1)")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m slug_lightning demo") -> int:
    args = _parser(prog).parse_args(argv)
    run_demo(args.output_dir, seed=args.seed, concept=args.concept, refit=args.refit, devices=args.devices)
    return 0


def make_world_main(argv: Sequence[str] | None = None, prog: str = "python -m slug_lightning make-world") -> int:
    """Command line: write a demo world and print a summary.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).
        prog: The command shown in usage and help.
    """
    from slug_lightning.demo import world as generator
    from slug_lightning.demo.world import make_demo_world

    # The description is the first line of the generator's docstring.
    parser = CommandParser(prog=prog, description=generator.__doc__.split("\n")[0])
    parser.add_argument("root", help="output directory")
    # One integer flag per parameter of make_demo_world, with its default, so the two never disagree.
    counts = [
        p
        for p in inspect.signature(make_demo_world).parameters.values()
        if isinstance(p.default, int) and not isinstance(p.default, bool)
    ]
    for param in counts:
        parser.add_argument(f"--{param.name}", type=int, default=param.default, help=f"(default {param.default})")
    parser.add_argument("--overwrite", action="store_true", help="replace a world written with other parameters")
    args = vars(parser.parse_args(argv))
    world = make_demo_world(args.pop("root"), **args)
    print(f"demo world at {world.root}")
    print(f"  shards:     {world.shards} ({world.num_samples} samples)")
    print(f"  identities: {world.identities_dir} ({len(world.people)} people)")
    print(f"  objects:    {world.objects_dir} ({', '.join(world.objects)})")
    print(f"  target:     {world.default_target} (look-alikes: {', '.join(world.look_alikes(world.default_target))})")
    return 0
