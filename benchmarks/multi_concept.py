"""Forgetting several people in one run (METHOD §9): 2, 3 and 5 people of the demo world, each set searched
several ways side by side on the same gradients.

Three ways to draw the people (``--selections``):

- ``family``: the world's default target and the people after it in world order. World order keeps look-alike
  families together, so these people come from few look-alike groups and look like the same other people;
- ``unrelated``: the default target, then the first person of each other look-alike group in world order
  (``DemoWorld.look_alike_groups``): no one is a look-alike of another;
- ``random``: people drawn at random (``random.Random(seed)``, ``--seeds``, default 0), as a user would name
  them: neither chosen for look-alikes nor kept apart from them.

Each run is the demo's ``unlearn`` config with all of them as concepts (one retain gradient, one forget gradient
per person, all at θ⁰). The searches:

- ``section9``: METHOD §9 as written: person k is searched on the model carrying the edits of 1..k−1, and its
  forget test checks k only;
- ``keep``: ``StepSearch(keep_forgotten=True)``: a probe of person k must also keep 1..k−1 forgotten;
- ``refine``: ``StepSearch(refine_rounds=5)``: the §9 search, then rounds that search each person again over
  its Pareto front on the model carrying all the other edits, keeping the forgotten ones forgotten;
- ``refine_fronts2``: the same, over the first two Pareto fronts of each tower (``fronts=2``);
- ``refine_untangle``, ``refine_fronts2_untangle``: ``refine`` and ``refine_fronts2`` with ``untangle=True``: a
  visit also tries freeing an edit the other people lean on, keeping the move only if no one comes back and the
  utility rises;
- ``keep_fronts2_untangle``: ``refine_fronts2_untangle`` from the start of ``keep``, where no person brings back
  one searched before it;
- ``refine_fronts2_untangle_orders2``: ``refine_fronts2_untangle`` from the people's order and from its reverse
  (``orders=2``), keeping the end with the higher utility;
- ``independent``: ``StepSearch(sequential=False, refine_rounds=5)``: every person searched on θ⁰ (as separate
  runs would), all edits applied together, then the same refinement rounds;
- ``independent_fronts2``: the same, over the first two Pareto fronts of each tower (``fronts=2``).

Per person: the chosen layer and step size, forget top-1 before and after (the final evaluation, all edits
applied); per run: identity test top-1 (the other people's images) and object test top-1, before and after;
per search, over its sets of 5 people (several random draws with ``--seeds``): how many meet the target, and
the mean and worst drop. The target: forget top-1 0 for every person, and an identity test top-1 drop of at most
10 points for 5 people.

Run (on a finished demo directory, e.g. the one ``python -m slug_lightning demo --output_dir DIR`` wrote):

    python benchmarks/multi_concept.py --demo /work/assets/demo --runs RUNS --output benchmarks/results/multi_concept.md

Each run's artifacts go to ``RUNS/people_<n>_<search>`` (``unrelated_<n>_<search>``, ``random_<n>_<search>``;
default: a temporary directory). The first search of each set computes the gradients; the others reuse them, so
"search s" compares like with like. Gradients already at ``RUNS/people_<n>/gradients.safetensors`` (same people)
are reused by every search; with ``--reuse`` the report of a finished run is read instead of running it again, and
``--tables_only`` runs nothing and prints the tables of the finished runs, naming those not there.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
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
    "refine_fronts2": ["--search.init_args.refine_rounds", "5", "--search.init_args.fronts", "2"],
    "refine_untangle": ["--search.init_args.refine_rounds", "5", "--search.init_args.untangle", "true"],
    "refine_fronts2_untangle": ["--search.init_args.refine_rounds", "5", "--search.init_args.fronts", "2",
                                "--search.init_args.untangle", "true"],
    "keep_fronts2_untangle": ["--search.init_args.keep_forgotten", "true", "--search.init_args.refine_rounds", "5",
                              "--search.init_args.fronts", "2", "--search.init_args.untangle", "true"],
    "refine_fronts2_untangle_orders2": ["--search.init_args.refine_rounds", "5", "--search.init_args.fronts", "2",
                                        "--search.init_args.untangle", "true", "--search.init_args.orders", "2"],
    "independent": ["--search.init_args.sequential", "false", "--search.init_args.refine_rounds", "5"],
    "independent_fronts2": ["--search.init_args.sequential", "false", "--search.init_args.refine_rounds", "5",
                            "--search.init_args.fronts", "2"],
}


def people_to_forget(world, count: int) -> list[str]:
    """The default target and the ``count - 1`` people after it in world order (wrapping around).

    World order keeps look-alike families together, so these people come from few look-alike groups and look
    like the same other people: a hard set to forget without touching the rest.
    """
    start = world.people.index(world.default_target)
    return [world.people[(start + i) % len(world.people)] for i in range(count)]


def unrelated_people(world, count: int) -> list[str]:
    """The default target, then, in world order after it (wrapping around), the first person of each look-alike
    group (``DemoWorld.look_alike_groups``) not yet drawn from: no one is a look-alike of another, and no other
    person a look-alike of two of them.

    Raises:
        ValueError: if the world has fewer than ``count`` look-alike groups.
    """
    groups = world.look_alike_groups()
    if count > len(groups):
        raise ValueError(f"The world has {len(groups)} look-alike groups; {count} unrelated people do not exist.")
    start = world.people.index(world.default_target)
    chosen: list[str] = []
    for offset in range(len(world.people)):
        person = world.people[(start + offset) % len(world.people)]
        group = next(g for g in groups if person in g)
        if not any(other in group for other in chosen):
            chosen.append(person)
        if len(chosen) == count:
            break
    return chosen


def random_people(world, count: int, seed: int = 0) -> list[str]:
    """``count`` people drawn uniformly at random (``random.Random(seed)``): the usual case, neither chosen for
    look-alikes nor kept apart from them. A larger count of the same seed draws the smaller one's people first."""
    return random.Random(seed).sample(list(world.people), count)


SELECTIONS = {  # name -> (how the people are drawn, the runs' directory prefix)
    "family": (people_to_forget, "people"),
    "unrelated": (unrelated_people, "unrelated"),
    "random": (random_people, "random"),
}


def draws(selections: list[str], seeds: list[int]):
    """``(selection, draw, runs' prefix)`` for each selection, with a random draw per seed; seed 0 keeps the plain
    name and prefix ("random"), seed s is "random (seed s)" in ``random_seed<s>``."""
    for selection in selections:
        draw, prefix = SELECTIONS[selection]
        for seed in seeds if draw is random_people else [0]:
            if seed:
                yield f"{selection} (seed {seed})", functools.partial(draw, seed=seed), f"{prefix}_seed{seed}"
            else:
                yield selection, draw, prefix


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


Result = tuple[list[str], str, str, dict]  # people, selection, search, report


def _drops(report: dict) -> tuple[float, float]:
    """Identity and object test top-1 change, in points."""
    before, after = report["before"]["test"], report["after"]["test"]
    return tuple(100 * (after[name]["top1"] - before[name]["top1"]) for name in ("identities", "objects"))


def look_alike_change(report: dict, world) -> float | None:
    """The part of the identity test top-1 change (points) that falls on the look-alikes of the forgotten people
    (``DemoWorld.look_alikes``, the forgotten themselves left out): each class's top-1 change weighted by its images,
    over all the set's images, so the parts of all the classes add up to the set's change. ``None`` for a report
    without per-class top-1 (``test_classes``)."""
    rows = (report.get("test_classes") or {}).get("identities")
    if not rows:
        return None
    forgotten = {c["name"] for c in report["concepts"]}
    look_alikes = {other for person in forgotten for other in world.look_alikes(person)} - forgotten
    images = sum(row["images"] for row in rows)
    return 100 * sum(row["images"] * (row["top1_after"] - row["top1_before"])
                     for row in rows if row["name"] in look_alikes) / images


def _within_target(identities: float) -> bool:
    """Whether an identity change (points) is a drop of at most ``MAX_DROP``: exactly 10 points (30 of 300 images)
    is within, though the difference of two accuracies may come out a float rounding above it."""
    return -identities <= 100 * MAX_DROP + 1e-9


def tables(results: list[Result], world) -> str:
    """The markdown of the closing note: a per-run summary, then every person's edit."""
    lines = ["| people | selection | search | identity test top-1 before | after | Δ (points) | of which look-alikes | "
             "object test top-1 before | after | Δ (points) | all forgotten | probes | search s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for people, selection, search, report in results:
        before, after = report["before"]["test"], report["after"]["test"]
        ids, objs = _drops(report)
        share = look_alike_change(report, world)
        lines.append(f"| {len(people)} | {selection} | {search} | {_pct(before['identities']['top1'])} | "
                     f"{_pct(after['identities']['top1'])} | {ids:+.1f} | "
                     f"{'n/a' if share is None else f'{share:+.1f}'} | {_pct(before['objects']['top1'])} | "
                     f"{_pct(after['objects']['top1'])} | {objs:+.1f} | {'yes' if _forgotten(report) else 'no'} | "
                     f"{report['timing']['probes']} | {report['timing']['search_s']:.1f} |")
    lines += ["", "| people | selection | search | # | concept | layer | tower | λ | forget top-1 before | after |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for people, selection, search, report in results:
        for index, concept in enumerate(report["concepts"], start=1):
            lines.append(f"| {len(people)} | {selection} | {search} | {index} | {concept['name']} | "
                         f"`{concept['layer']}` | {concept['tower']} | {concept['step_size']:.4g} | "
                         f"{_pct(concept['forget_top1_before'])} | {_pct(concept['forget_top1_after'])} |")
    return "\n".join(lines)


def across_draws(results: list[Result]) -> str:
    """Per search, over its 5-person runs (one per set of people): how many forget everyone and meet the target,
    the mean and worst identity change, the mean object change and the mean probe count."""
    lines = ["| search | 5-person runs | all forgotten | target met | identity Δ mean | worst | object Δ mean | "
             "probes mean |", "|---|---|---|---|---|---|---|---|"]
    for search in SEARCHES:
        reports = [report for people, _, name, report in results if name == search and len(people) == 5]
        if not reports:
            continue
        identities, objects = zip(*map(_drops, reports))
        forgotten = [_forgotten(report) for report in reports]
        met = sum(ok and _within_target(drop) for ok, drop in zip(forgotten, identities))
        lines.append(f"| {search} | {len(reports)} | {sum(forgotten)} | {met} | {statistics.mean(identities):+.1f} | "
                     f"{min(identities):+.1f} | {statistics.mean(objects):+.1f} | "
                     f"{statistics.mean(r['timing']['probes'] for r in reports):.0f} |")
    return "\n".join(lines)


def verdict(results: list[Result]) -> str:
    """Per selection and search: whether the target holds (every person forgotten; identity drop ≤ 10 points for
    5 people)."""
    lines = []
    order = list(SEARCHES)
    pairs = dict.fromkeys((selection, search) for _, selection, search, _ in results)
    selections = list(dict.fromkeys(selection for selection, _ in pairs))  # in the order they were run
    for selection, search in sorted(pairs, key=lambda pair: (selections.index(pair[0]), order.index(pair[1]))):
        notes, counts = [], []
        for people, _, _, report in (r for r in results if r[1:3] == (selection, search)):
            counts.append(len(people))
            missed = [c["name"] for c in report["concepts"] if c["forget_top1_after"] != 0.0]
            if missed:
                notes.append(f"{len(people)} people: not forgotten (top-1 > 0): {', '.join(missed)}")
            identities, _ = _drops(report)
            if len(people) == 5 and not _within_target(identities):
                notes.append(f"5 people: identity test top-1 drops {-identities:.1f} points (> {100 * MAX_DROP:.0f})")
        measured = f"no 5-person run (runs of {', '.join(map(str, counts))} people)."
        outcome = "target NOT met: " + "; ".join(notes) + "." if notes else "target met." if 5 in counts else measured
        lines.append(f"- {selection} `{search}`: {outcome}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--demo", default="runs/demo", help="a finished demo directory (world/, fit/)")
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS), help="people per run")
    parser.add_argument("--selections", nargs="+", choices=list(SELECTIONS), default=list(SELECTIONS),
                        help="which people: 'family', the default target and the people after it in world order "
                             "(from few look-alike groups); 'unrelated', one person from each look-alike group; "
                             "'random', drawn at random (see --seeds)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="the seeds of the random draws, one set of people per seed (seed 0's runs go to "
                             "RUNS/random_<n>_<search>, seed s's to RUNS/random_seed<s>_<n>_<search>)")
    parser.add_argument("--searches", nargs="+", choices=list(SEARCHES), default=list(SEARCHES),
                        help="which searches to run for each set of people (the first computes the gradients)")
    parser.add_argument("--runs", default=None, help="keep each run's artifacts here (default: temporary)")
    parser.add_argument("--output", default=None, help="also write the markdown here")
    parser.add_argument("--reuse", action="store_true",
                        help="read the report of a finished run in --runs (same people) instead of running it again")
    parser.add_argument("--tables_only", action="store_true",
                        help="run nothing: the tables of the finished runs in --runs, naming the runs not there")
    args = parser.parse_args()
    demo = world_and_fit(args.demo)
    world = load_demo_world(demo / "world")
    results, missing = [], []
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs).resolve() if args.runs else Path(tmp)
        for selection, draw, prefix in draws(args.selections, args.seeds):
            for count in args.counts:
                people = draw(world, count)
                gradients = runs / f"{prefix}_{count}" / "gradients.safetensors"
                for search in args.searches:
                    print(f"[multi_concept] forgetting {count} {selection} ({search}): {', '.join(people)}",
                          file=sys.stderr)
                    output = runs / f"{prefix}_{count}_{search}"
                    finished = output / "report.json"
                    stored = json.loads(finished.read_text()) if finished.is_file() else None
                    if (args.reuse or args.tables_only) and stored and \
                            [c["name"] for c in stored["concepts"]] == people:
                        results.append((people, selection, search, stored))
                        continue
                    if args.tables_only:
                        missing.append(f"{count} {selection} `{search}`")
                        continue
                    reused = ["--gradients", str(gradients)] if gradients.is_file() else []
                    report = unlearn(demo, output, people, *SEARCHES[search], *reused)
                    if not gradients.is_file():  # the later searches of these people reuse this run's gradients
                        gradients.parent.mkdir(parents=True, exist_ok=True)
                        (output / "gradients.safetensors").rename(gradients)
                    results.append((people, selection, search, report))
    text = "\n".join([
        "# Several people in one run (demo world)", "",
        f"`python benchmarks/multi_concept.py --demo {args.demo} --selections {' '.join(args.selections)} "
        + (f"--counts {' '.join(map(str, args.counts))} " if args.counts != list(COUNTS) else "")
        + (f"--seeds {' '.join(map(str, args.seeds))} " if args.seeds != [0] else "")
        + f"--searches {' '.join(args.searches)}`: for each set "
        "of people, one multi-concept `unlearn` per search on the same gradients (demo config: slug-tiny, metric "
        "top-1, threshold 0, max_steps 10). `section9`: METHOD §9, the forget test of person k checks k only; "
        "`keep`: `keep_forgotten`, a probe of person k must also keep persons 1..k−1 forgotten; `refine`: "
        "`refine_rounds: 5`, the §9 search then rounds that search each person again over its Pareto front with "
        "all the other edits applied, keeping the forgotten ones forgotten; `refine_fronts2`: the same with "
        "`fronts: 2`, searching the first two Pareto fronts of each tower; `independent`: `sequential: false` and "
        "`refine_rounds: 5`, every person searched on θ⁰ as separate runs would, all edits applied together, then "
        "the same rounds; `independent_fronts2`: the same with `fronts: 2`; `refine_untangle`, "
        "`refine_fronts2_untangle`: `refine` and `refine_fronts2` with `untangle: true`, a visit also tries freeing "
        "an edit the other people lean on, kept only if no one comes back and the utility rises; "
        "`keep_fronts2_untangle`: `refine_fronts2_untangle` from the start of `keep`; "
        "`refine_fronts2_untangle_orders2`: `refine_fronts2_untangle` from the people's order and from its reverse "
        "(`orders: 2`), keeping the end with the higher utility. People: "
        "`family`, the default target and the next ones in world order, which keeps look-alike families together "
        "(from few look-alike groups, and other people look-alikes of several of them); `unrelated`, the "
        "default target and then the first person of each other look-alike group in world order (no one a "
        "look-alike of another, no other person a look-alike of two of them); `random`, drawn at random with seed 0 "
        "(`random (seed s)`: with seed s; a larger set holds the smaller ones' people). Forget top-1 after = the "
        f"final evaluation with every edit applied. Identity test = the images of the other {len(world.people)} − n "
        "people; of which look-alikes = the part of its Δ on the people who look like a forgotten one "
        "(`DemoWorld.look_alikes`; n/a for a report without per-class top-1). search s = the wall time of the "
        "run's search (runs that shared the machine with another took longer). "
        f"Machine: {machine()}.", "",
        tables(results, world), "",
        "Each search over the sets of 5 people it ran on (compare searches over the same sets):", "",
        across_draws(results), "", verdict(results), ""]
        + ([f"Not run: {', '.join(missing)}.", ""] if missing else []))
    publish(text, args.output)


if __name__ == "__main__":
    main()
