"""Do two versions of the code make the same choices? The demo's unlearn, the people config and ``compare``.

A refactoring that keeps the behaviour must give the same layers, step sizes and accuracies (to float rounding) on
the same fitted model and world. This script runs the three on a finished demo directory and writes what each
chose to a JSON file; given ``--against`` an earlier file, it prints the differences and exits 1 if there are any.

Reproduce (the world and fit of a finished ``python -m slug_lightning demo`` are reused, so both runs see the same
model; run the "before" with the older checkout first on the import path)::

    python benchmarks/same_choices.py --demo runs/demo --work /tmp/before_runs --output before.json
    python benchmarks/same_choices.py --demo runs/demo --work /tmp/after_runs --output after.json --against before.json

``--config FILE`` adds a config to every run (e.g. one holding ``search: {init_args: {warm_start: true}}``), to check
that an option keeps the choices. The probes per searched layer are printed, and kept in the JSON file, but not
compared: they measure the search, they are not a choice (the total ``probes`` is compared).

One thread is used so that the float rounding is the same in both runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from _common import world_and_fit

# Relative tolerance of a step size and absolute tolerance of an accuracy: float rounding, not a behaviour change.
STEP_RTOL, ACCURACY_ATOL = 1e-6, 1e-9
MEASURED = {"probes_per_layer"}  # kept and printed, not compared


def _run(arguments: list[str], work: Path, log: str) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SLUG_DEBUG": ""}
    with open(work / log, "w") as out:
        completed = subprocess.run(
            [sys.executable, "-m", "slug_lightning", *arguments],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=work,
        )
    if completed.returncode:
        sys.exit(f"error: `{' '.join(arguments[:3])} ...` failed; see {work / log}")


def _choices(report: dict) -> dict:
    """What a run chose: each concept's layer and step size, the accuracies before and after, the probe count."""
    return {
        "edits": {c["name"]: {"layer": c.get("layer"), "step_size": c.get("step_size")} for c in report["concepts"]},
        "before": report["before"],
        "after": report["after"],
        "probes": report.get("timing", {}).get("probes"),
        "probes_per_layer": probes_per_layer(report.get("search", [])),
    }


def probes_per_layer(rows: list[dict]) -> float | None:
    """The mean number of probes of one layer's search (a concept's layer in one round of one order); None for a
    baseline, whose rows are iterations."""
    rows = [r for r in rows if "concept" in r and "layer" in r]
    searches = {(r["concept"], r["layer"], r.get("round", 0), r.get("order", 0)) for r in rows}
    return len(rows) / len(searches) if searches else None


def collect(demo: Path, work: Path, configs: list[str] = ()) -> dict:
    """Run the demo's unlearn, the people config and ``compare`` on ``demo``'s world and fit; return their choices."""
    from slug_lightning import config_path

    work.mkdir(parents=True, exist_ok=True)
    paths = demo / "demo_paths.yaml"
    overrides = [a for config in configs for a in ("--config", str(Path(config).resolve()))]
    unlearn = [
        "unlearn",
        "--config",
        config_path("demo/unlearn.yaml"),
        "--config",
        str(paths),
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=false",
        *overrides,
    ]
    results = {}
    for name, extra in (("demo", []), ("people", ["--config", config_path("demo/unlearn_people.yaml")])):
        _run([*unlearn, *extra, f"--output_dir={work / name}"], work, f"{name}.log")
        results[name] = _choices(json.loads((work / name / "report.json").read_text()))
    shards = [str(demo / "world" / "shards" / f"{i:05d}.tar") for i in (0, 1)]
    compare_config = work / "compare.yaml"
    compare_config.write_text(
        json.dumps(
            {"data": {"init_args": {"shards": shards}}, "trainer": {"logger": False, "enable_progress_bar": False}}
        )
    )
    _run(
        [
            "compare",
            "--config",
            config_path("demo/unlearn.yaml"),
            "--config",
            str(paths),
            "--config",
            str(compare_config),
            "--lrs",
            "1e-5",
            "1e-4",
            "--output_dir",
            str(work / "compare"),
            *overrides,
        ],
        work,
        "compare.log",
    )
    for report in sorted((work / "compare").glob("*/*/report.json")):
        results[f"compare/{report.parent.parent.name}/{report.parent.name}"] = _choices(json.loads(report.read_text()))
    with open(work / "compare" / "comparison.csv", newline="") as file:  # which setting each method kept
        results["compare/selected"] = sorted(
            f"{row['method']} {row['setting']}" for row in csv.DictReader(file) if row["selected"] == "True"
        )
    return results


def differences(before, after, where: str = "") -> list[str]:
    """Every place where ``after`` differs from ``before`` beyond float rounding."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = [f"{where}/{key}: only in one" for key in sorted(set(before) ^ set(after) - MEASURED)]
        for key in sorted(set(before) & set(after) - MEASURED):
            out += differences(before[key], after[key], f"{where}/{key}")
        return out
    if isinstance(before, float) and isinstance(after, float):
        tolerance = STEP_RTOL * abs(before) if where.endswith("step_size") else ACCURACY_ATOL
        same = math.isclose(before, after, abs_tol=tolerance) or (math.isnan(before) and math.isnan(after))
        return [] if same else [f"{where}: {before!r} → {after!r}"]
    return [] if before == after else [f"{where}: {before!r} → {after!r}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="a finished demo directory (default: runs/demo)")
    parser.add_argument("--work", required=True, help="where the runs go")
    parser.add_argument("--output", required=True, help="the JSON file of the choices")
    parser.add_argument("--against", help="an earlier output to compare with")
    parser.add_argument("--config", action="append", default=[], help="a config added to every run (repeatable)")
    args = parser.parse_args()
    results = collect(world_and_fit(args.demo), Path(args.work).resolve(), args.config)
    Path(args.output).write_text(json.dumps(results, indent=1, sort_keys=True))
    for name, result in results.items():
        if name == "compare/selected":
            print(f"compare kept: {', '.join(result)}")
            continue
        edits = ", ".join(
            f"{c}: {e['layer']} λ={e['step_size']:.6g}" for c, e in result["edits"].items() if e["layer"] is not None
        )
        per_layer = result.get("probes_per_layer")
        per_layer = f" ({per_layer:.2f} per layer)" if per_layer else ""
        print(f"{name}: {edits or 'no single-layer edit'}; probes {result['probes']}{per_layer}")
    if args.against:
        found = differences(json.loads(Path(args.against).read_text()), results)
        print("\n".join(found) if found else f"same choices as {args.against}")
        return 1 if found else 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
