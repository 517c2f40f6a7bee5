"""The demo: :func:`run_demo`, behind ``python -m slug_lightning demo``.

``demo`` runs the whole pipeline on the demo world, offline, on a laptop CPU:

1. write the demo world (LAION-style shards + labelled identity and object sets), unless present;
2. fit the packaged tiny CLIP on it with ``fit`` (cached: a second run skips this);
3. ``unlearn`` one invented person with the packaged config plus a generated one holding this run's paths;
4. print the before/after summary and where the artifacts are.

The command lines of ``demo`` and ``make-world`` (which writes the demo world alone,
:func:`slug_lightning.demo.world.make_demo_world`, and prints a summary) are in
:mod:`slug_lightning.commands.demo`.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import yaml

from slug_lightning.errors import UserError

FIT_CONFIG = "demo/fit.yaml"
UNLEARN_CONFIG = "demo/unlearn.yaml"


def run_demo(
    output_dir: str | Path = "runs/demo",
    seed: int = 0,
    concept: str | None = None,
    refit: bool = False,
    devices: int = 1,
) -> dict:
    """Run the demo and return the unlearn report."""
    from slug_lightning import config_path
    from slug_lightning.cli import main
    from slug_lightning.demo.world import make_demo_world

    output = Path(output_dir).resolve()
    started = time.perf_counter()
    print(f"[demo] 1/3 demo world in {output / 'world'}")
    world = make_demo_world(output / "world", seed=seed)
    concept = concept or world.default_target
    if concept not in world.people and concept not in world.objects:
        raise UserError(
            f"--concept {concept!r} is neither a person nor an object of the demo world. People: "
            f"{', '.join(world.people)}. Objects: {', '.join(world.objects)}."
        )

    checkpoint = output / "fit" / "slug-tiny.safetensors"
    if refit or not checkpoint.exists():
        print("[demo] 2/3 fitting the tiny CLIP (a few minutes on 2 CPU cores; cached afterwards)")
        _run(
            main,
            [
                "fit",
                "--config",
                config_path(FIT_CONFIG),
                f"--seed_everything={seed}",
                f"--trainer.default_root_dir={output / 'fit'}",
                f"--model.init_args.export_path={checkpoint}",
                f"--data.init_args.shards={world.shards}",
            ],
        )
    else:
        print(f"[demo] 2/3 using the cached fit {checkpoint} (--refit to redo it)")

    print(f"[demo] 3/3 unlearning {concept!r}")
    paths_file = output / "demo_paths.yaml"
    paths_file.write_text(
        yaml.safe_dump(unlearn_paths(output, world, checkpoint, concept, seed, devices), sort_keys=False)
    )
    _run(main, ["unlearn", "--config", config_path(UNLEARN_CONFIG), "--config", str(paths_file)])

    report = json.loads((output / "report.json").read_text())
    print(f"[demo] done in {time.perf_counter() - started:.0f} s; read {output / 'report.md'}")
    return report


def unlearn_paths(output: Path, world, checkpoint: Path, concept: str, seed: int = 0, devices: int = 1) -> dict:
    """The settings ``configs/demo/unlearn.yaml`` leaves to the demo: this world's shards and sets, the fitted
    checkpoint, the concept, the output directory (a config layered after the packaged one)."""
    return {
        "seed_everything": seed,
        "trainer": {
            "devices": devices,
            "strategy": "ddp" if devices > 1 else "auto",
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(output), "name": "logs"},
            },
        },
        "model": {"init_args": {"pretrained": str(checkpoint)}},
        "data": {"init_args": {"shards": world.shards, "concepts": [concept]}},
        "search": {
            "init_args": {
                "sets": [
                    {"name": "identities", "root": str(world.identities_dir)},
                    {"name": "objects", "root": str(world.objects_dir)},
                ]
            }
        },
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
