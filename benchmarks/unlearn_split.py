"""Where the time of a whole ``unlearn`` goes: gradients vs search, with probe reuse on and off.

Runs the demo's unlearn twice on a finished demo directory (made by ``python -m slug_lightning demo``),
once as configured and once with ``--search.init_args.reuse false``, each into a fresh output directory,
and prints the split from their ``report.json``.

Run:  python -m slug_lightning demo && python benchmarks/unlearn_split.py [--demo runs/demo]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import machine, table

from slug_lightning import config_path


def unlearn(demo: Path, output: Path, *overrides: str) -> dict:
    command = [
        sys.executable,
        "-m",
        "slug_lightning",
        "unlearn",
        "--config",
        config_path("demo/unlearn.yaml"),
        "--config",
        str(demo / "demo_paths.yaml"),
        "--output_dir",
        str(output),
        "--trainer.enable_progress_bar",
        "false",
        *overrides,
    ]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads((output / "report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="a finished demo directory (demo_paths.yaml, fit/)")
    args = parser.parse_args()
    demo = Path(args.demo).resolve()
    if not (demo / "demo_paths.yaml").is_file():
        sys.exit(f"error: {demo} holds no finished demo; run `python -m slug_lightning demo --output_dir {demo}`.")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides in (("reuse on", ()), ("reuse off", ("--search.init_args.reuse", "false"))):
            report = unlearn(demo, Path(tmp) / label.replace(" ", "_"), *overrides)
            timing = report["timing"]
            rows.append(
                {
                    "search": label,
                    "gradients s": timing["gradients_s"],
                    "search s": timing["search_s"],
                    "probes": timing["probes"],
                    "s per probe": timing["search_s"] / timing["probes"],
                    "total s": timing["total_s"],
                    "search share": timing["search_s"] / timing["total_s"],
                    "layer": report["concepts"][0]["layer"],
                    "λ": report["concepts"][0]["step_size"],
                }
            )
    print(f"# unlearn on the demo world ({demo}); {machine()}")
    print(
        table(
            rows,
            ["search", "gradients s", "search s", "probes", "s per probe", "total s", "search share", "layer", "λ"],
        )
    )
    print(
        f"\nsearch speed-up from reuse: {rows[1]['search s'] / rows[0]['search s']:.1f}x; "
        f"search / gradients with reuse: {rows[0]['search s'] / rows[0]['gradients s']:.2f}"
    )


if __name__ == "__main__":
    main()
