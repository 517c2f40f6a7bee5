"""Forgetting several people in one run (METHOD §9): 2, 3 and 5 people of the demo world, each set searched
five ways side by side on the same gradients.

The people are the world's default target and the people after it in world order. Each run is the demo's
``unlearn`` config with all of them as concepts (one retain gradient, one forget gradient per person, all at
θ⁰). The searches:

- ``section9``: METHOD §9 as written: person k is searched on the model carrying the edits of 1..k−1, and its
  forget test checks k only;
- ``keep``: ``StepSearch(keep_forgotten=True)``: a probe of person k must also keep 1..k−1 forgotten;
- ``refine``: ``StepSearch(refine_rounds=5)``: the §9 search, then rounds that search each person again over
  its Pareto front on the model carrying all the other edits, keeping the forgotten ones forgotten;
- ``independent``: ``StepSearch(sequential=False, refine_rounds=5)``: every person searched on θ⁰ (as separate
  runs would), all edits applied together, then the same refinement rounds;
- ``independent_fronts2``: the same, over the first two Pareto fronts of each tower (``fronts=2``).

Per person: the chosen layer and step size, forget top-1 before and after (the final evaluation, all edits
applied); per run: identity test top-1 (the other people's images) and object test top-1, before and after.
The target: forget top-1 0 for every person, and an identity test top-1 drop of at most 10 points for 5
people.

Run (on a finished demo directory, e.g. the one ``python -m slug_lightning demo --output_dir DIR`` wrote):

    python benchmarks/multi_concept.py --demo /work/assets/demo --runs RUNS --output benchmarks/results/multi_concept.md

Each run's artifacts go to ``RUNS/people_<n>_<search>`` (default: a temporary directory). The first search of
each set computes the gradients; the others reuse them, so "search s" compares like with like. Gradients
already at ``RUNS/people_<n>/gradients.safetensors`` (same people) are reused by every search; with
``--reuse`` the report of a finished run is read instead of running it again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from _common import machine, publish, world_and_fit

from slug_lightning import config_path
from slug_lightning.datamodules.demo_world import load_demo_world

COUNTS = (2, 3, 5)
MAX_DROP = 0.10  # identity test top-1, for 5 people
SEARCHES = {  # name -> unlearn overrides
    "section9": [],
    "keep": ["--search.init_args.keep_forgotten", "true"],
    "refine": ["--search.init_args.refine_rounds", "5"],
    "independent": ["--search.init_args.sequential", "false", "--search.init_args.refine_rounds", "5"],
    "independent_fronts2": ["--search.init_args.sequential", "false", "--search.init_args.refine_rounds", "5",
                            "--search.init_args.fronts", "2"],
}


def people_to_forget(world, count: int) -> list[str]:
    """The default target and the ``count - 1`` people after it in world order (wrapping around)."""
    start = world.people.index(world.default_target)
    return [world.people[(start + i) % len(world.people)] for i in range(count)]


def unlearn(demo: Path, output: Path, people: list[str], *overrides: str) -> dict:
    """One multi-concept ``unlearn`` on the demo world; returns its report."""
    world = demo / "world"
    paths = {
        "seed_everything": 0,
        "trainer": {"logger": False, "enable_progress_bar": False},
        "model": {"init_args": {"pretrained": str(demo / "fit" / "slug-tiny.safetensors")}},
        "data": {"init_args": {"shards": str(world / "shards" / "*.tar"), "concepts": [{"name": p} for p in people]}},
        "search": {"init_args": {"sets": [{"name": "identities", "root": str(world / "eval" / "identities")},
                                          {"name": "objects", "root": str(world / "eval" / "objects")}]}},
        "output_dir": str(output),
        "overwrite": True,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "paths.yaml").write_text(yaml.safe_dump(paths, sort_keys=False))
    command = [sys.executable, "-m", "slug_lightning", "unlearn", "--config", config_path("demo/unlearn.yaml"),
               "--config", str(output / "paths.yaml"), *overrides]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"unlearn of {people} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return json.loads((output / "report.json").read_text())


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def _forgotten(report: dict) -> bool:
    return all(c["forget_top1_after"] == 0.0 for c in report["concepts"])


def tables(results: list[tuple[list[str], str, dict]]) -> str:
    """The markdown of the closing note: a per-run summary, then every person's edit."""
    lines = ["| people | search | identity test top-1 before | after | Δ (points) | object test top-1 before | after | "
             "Δ (points) | all forgotten | probes | search s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for people, search, report in results:
        before, after = report["before"]["test"], report["after"]["test"]
        ids = 100 * (after["identities"]["top1"] - before["identities"]["top1"])
        objs = 100 * (after["objects"]["top1"] - before["objects"]["top1"])
        lines.append(f"| {len(people)} | {search} | {_pct(before['identities']['top1'])} | "
                     f"{_pct(after['identities']['top1'])} | {ids:+.1f} | {_pct(before['objects']['top1'])} | "
                     f"{_pct(after['objects']['top1'])} | {objs:+.1f} | {'yes' if _forgotten(report) else 'no'} | "
                     f"{report['timing']['probes']} | {report['timing']['search_s']:.1f} |")
    lines += ["", "| people | search | # | concept | layer | tower | λ | forget top-1 before | after |",
              "|---|---|---|---|---|---|---|---|---|"]
    for people, search, report in results:
        for index, concept in enumerate(report["concepts"], start=1):
            lines.append(f"| {len(people)} | {search} | {index} | {concept['name']} | `{concept['layer']}` | "
                         f"{concept['tower']} | {concept['step_size']:.4g} | {_pct(concept['forget_top1_before'])} | "
                         f"{_pct(concept['forget_top1_after'])} |")
    return "\n".join(lines)


def verdict(results: list[tuple[list[str], str, dict]]) -> str:
    """Per search: whether the target holds (every person forgotten; identity drop ≤ 10 points for 5 people)."""
    lines = []
    for search in dict.fromkeys(name for _, name, _ in results):
        notes = []
        for people, name, report in results:
            if name != search:
                continue
            missed = [c["name"] for c in report["concepts"] if c["forget_top1_after"] != 0.0]
            if missed:
                notes.append(f"{len(people)} people: not forgotten (top-1 > 0): {', '.join(missed)}")
            drop = report["before"]["test"]["identities"]["top1"] - report["after"]["test"]["identities"]["top1"]
            if len(people) == 5 and drop > MAX_DROP:
                notes.append(f"5 people: identity test top-1 drops {100 * drop:.1f} points (> {100 * MAX_DROP:.0f})")
        lines.append(f"- `{search}`: " + ("target met." if not notes else "target NOT met: " + "; ".join(notes) + "."))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="a finished demo directory (world/, fit/)")
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS), help="people per run")
    parser.add_argument("--searches", nargs="+", choices=list(SEARCHES), default=list(SEARCHES),
                        help="which searches to run for each set of people (the first computes the gradients)")
    parser.add_argument("--runs", default=None, help="keep each run's artifacts here (default: temporary)")
    parser.add_argument("--output", default=None, help="also write the markdown here")
    parser.add_argument("--reuse", action="store_true",
                        help="read the report of a finished run in --runs (same people) instead of running it again")
    args = parser.parse_args()
    demo = world_and_fit(args.demo)
    world = load_demo_world(demo / "world")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs).resolve() if args.runs else Path(tmp)
        for count in args.counts:
            people = people_to_forget(world, count)
            gradients = runs / f"people_{count}" / "gradients.safetensors"
            for search in args.searches:
                print(f"[multi_concept] forgetting {count} ({search}): {', '.join(people)}", file=sys.stderr)
                output = runs / f"people_{count}_{search}"
                finished = output / "report.json"
                if args.reuse and finished.is_file() and \
                        [c["name"] for c in json.loads(finished.read_text())["concepts"]] == people:
                    results.append((people, search, json.loads(finished.read_text())))
                    continue
                reused = ["--gradients", str(gradients)] if gradients.is_file() else []
                report = unlearn(demo, output, people, *SEARCHES[search], *reused)
                if not gradients.is_file():  # the later searches of these people reuse this run's gradients
                    gradients.parent.mkdir(parents=True, exist_ok=True)
                    (output / "gradients.safetensors").rename(gradients)
                results.append((people, search, report))
    text = "\n".join([
        "# Several people in one run (demo world)", "",
        f"`python benchmarks/multi_concept.py --demo {args.demo} --searches {' '.join(args.searches)}`: for each set "
        "of people, one multi-concept `unlearn` per search on the same gradients (demo config: slug-tiny, metric "
        "top-1, threshold 0, max_steps 10). `section9`: METHOD §9, the forget test of person k checks k only; "
        "`keep`: `keep_forgotten`, a probe of person k must also keep persons 1..k−1 forgotten; `refine`: "
        "`refine_rounds: 5`, the §9 search then rounds that search each person again over its Pareto front with "
        "all the other edits applied, keeping the forgotten ones forgotten; `independent`: `sequential: false` and "
        "`refine_rounds: 5`, every person searched on θ⁰ as separate runs would, all edits applied together, then "
        "the same rounds; `independent_fronts2`: the same with `fronts: 2`, searching the first two Pareto fronts "
        "of each tower. People = the default target and the "
        f"next ones in world order. Forget top-1 after = the final evaluation with every edit applied. Identity "
        f"test = the images of the other {len(world.people)} − n people. Machine: {machine()}.", "",
        tables(results), "", verdict(results), ""])
    publish(text, args.output)


if __name__ == "__main__":
    main()
