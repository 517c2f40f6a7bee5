"""``python -m slug_lightning demo``: the whole pipeline on the demo world, offline, on a laptop CPU.

1. write the demo world (LAION-style shards + labelled identity and object sets), unless present;
2. fit the packaged tiny CLIP on it with ``fit`` (cached: a second run skips this);
3. ``unlearn`` one invented person with the packaged config plus a generated one holding this run's paths;
4. print the before/after summary and where the artifacts are.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import yaml

from slug_lightning.errors import UserError

FIT_CONFIG = "demo/fit.yaml"
UNLEARN_CONFIG = "demo/unlearn.yaml"


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Make the demo world, fit the tiny CLIP (cached), unlearn one person, print the result.",
    )
    parser.add_argument("--output_dir", default="runs/demo", help="where everything goes (default: runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo world and of the runs (default: 0)")
    parser.add_argument("--concept", default=None,
                        help="person (or object kind) to forget (default: the world's default target)")
    parser.add_argument("--refit", action="store_true", help="fit the tiny CLIP again even if a fit is cached")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes for unlearn (DDP when > 1)")
    return parser


def run_demo(output_dir: str | Path = "runs/demo", seed: int = 0, concept: str | None = None,
             refit: bool = False, devices: int = 1) -> dict:
    """Run the demo and return the unlearn report."""
    from slug_lightning import config_path
    from slug_lightning.cli import main
    from slug_lightning.datamodules.demo_world import make_demo_world

    output = Path(output_dir).resolve()
    started = time.perf_counter()
    print(f"[demo] 1/3 demo world in {output / 'world'}")
    world = make_demo_world(output / "world", seed=seed)
    concept = concept or world.default_target
    if concept not in world.people and concept not in world.objects:
        raise UserError(f"--concept {concept!r} is neither a person nor an object of the demo world. People: "
                        f"{', '.join(world.people)}. Objects: {', '.join(world.objects)}.")

    checkpoint = output / "fit" / "slug-tiny.safetensors"
    if refit or not checkpoint.exists():
        print("[demo] 2/3 fitting the tiny CLIP (a few minutes on 2 CPU cores; cached afterwards)")
        _run(main, ["fit", "--config", config_path(FIT_CONFIG), f"--seed_everything={seed}",
                    f"--trainer.default_root_dir={output / 'fit'}", f"--model.init_args.export_path={checkpoint}",
                    f"--data.init_args.shards={world.shards}"])
    else:
        print(f"[demo] 2/3 using the cached fit {checkpoint} (--refit to redo it)")

    print(f"[demo] 3/3 unlearning {concept!r}")
    paths_file = output / "demo_paths.yaml"
    paths_file.write_text(yaml.safe_dump(unlearn_paths(output, world, checkpoint, concept, seed, devices),
                                         sort_keys=False))
    _run(main, ["unlearn", "--config", config_path(UNLEARN_CONFIG), "--config", str(paths_file)])

    report = json.loads((output / "report.json").read_text())
    print(f"[demo] done in {time.perf_counter() - started:.0f} s; read {output / 'report.md'}")
    return report


def unlearn_paths(output: Path, world, checkpoint: Path, concept: str, seed: int = 0, devices: int = 1) -> dict:
    """The settings ``configs/demo/unlearn.yaml`` leaves to the demo: this world's shards and sets, the fitted
    checkpoint, the concept, the output directory (a config layered after the packaged one)."""
    return {
        "seed_everything": seed,
        "trainer": {"devices": devices, "strategy": "ddp" if devices > 1 else "auto",
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(output), "name": "logs"}}},
        "model": {"init_args": {"pretrained": str(checkpoint)}},
        "data": {"init_args": {"shards": world.shards, "concepts": [{"name": concept}]}},
        "search": {"init_args": {"sets": [{"name": "identities", "root": str(world.identities_dir)},
                                          {"name": "objects", "root": str(world.objects_dir)}]}},
        "output_dir": str(output),
        "overwrite": True,
    }


def _run(main, args: list[str]) -> None:
    with warnings.catch_warnings():
        # LightningCLI warns when given args while sys.argv also has some; here that is intended.
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
        code = main(args)
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None, prog: str = "python -m slug_lightning demo") -> int:
    args = _parser(prog).parse_args(argv)
    run_demo(args.output_dir, seed=args.seed, concept=args.concept, refit=args.refit, devices=args.devices)
    return 0
