"""How many Pareto fronts to search (``StepSearch(fronts=k)``): the cost of each person's edit to the other
people and the objects, against the probes it takes, for k = 1, 2, 3, ... side by side.

Every layer's binary search is independent of which other layers are searched, and the result of a search is
the rule of METHOD §7 over the probes of its layers. So one run that searches every front (``fronts`` larger than
any tower has) with each person searched on θ⁰ holds the search of every k: ``choose`` over the probes of the
layers on fronts 1..k. The benchmark runs that once and prints, per k, the layers and probes it takes and each
person's identity and object test drop. The identity test leaves out the images of every person of the run, so
each drop is on the same other people.

Each person on θ⁰: ``StepSearch`` searches several people one after the other, each on the model carrying the
edits of those before it (METHOD §9), and no longer has the ``sequential: false`` this benchmark used to set. The
run takes instead the ``independent`` start of ``benchmarks/multi_concept.py``
(``--search.class_path multi_concept.IndependentSearch``, no refinement rounds): every person searched on θ⁰ with
the run's gradients and test images, which is what ``sequential: false`` did, so ``benchmarks/results/fronts.md``
(measured with ``sequential: false`` by the older code, git commit 1a40a97) measures the same thing. Separate
single-concept runs would not: a run's retain gradient leaves out the pairs that mention any of its people, its
identity test their images, and a gradient store is reused only by a run of the same concepts (its gradient key).

Run (on a finished demo directory, e.g. the one ``python -m slug_lightning demo --output_dir DIR`` wrote):

    python benchmarks/fronts.py --demo /work/assets/demo --runs RUNS --output benchmarks/results/fronts.md

``--gradients`` reuses a gradient file of the same people (e.g. ``RUNS/people_5/gradients.safetensors`` of
``benchmarks/multi_concept.py``); ``--reuse`` reads a finished run in ``RUNS/fronts_all`` instead of running it
(one that searched every front with each person on θ⁰; the older code's ``sequential: false`` run counts).
``--smoke`` makes it a smoke run (``--trainer.fast_dev_run``: one batch per gradient stream, at most 2 probes per
layer), which shows that it runs and measures nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

from _common import machine, publish, world_and_fit
from multi_concept import SMOKE_NOTE, Search, artifacts, people_to_forget, search_of, unlearn

from slug_lightning.demo import load_demo_world
from slug_lightning.search import Probe, choose

ALL_FRONTS = 99  # more fronts than any tower of a CLIP has layers: every candidate layer is searched
# Each person searched on θ⁰ over every front, no refinement rounds (multi_concept.IndependentSearch)
EVERY_FRONT = Search("independent", fronts=ALL_FRONTS)


def probes_of(report: dict) -> list[Probe]:
    """The probes of a run's report (``report.json``'s ``search``)."""
    return [Probe(**entry) for entry in report["search"]]


def fronts_of(run: Path) -> dict[tuple[str, str], int]:
    """(concept, layer) → the Pareto front the layer is on for that concept (``layers.csv``)."""
    with (run / "layers.csv").open() as file:
        return {(row["concept"], row["layer"]): int(row["front"]) for row in csv.DictReader(file)}


def by_fronts(report: dict, fronts: dict[tuple[str, str], int], metric: str) -> list[dict]:
    """Per k: the layers and probes of fronts 1..k, and each concept's choice among them (METHOD §7) with its
    drop in each test set's top-1, in points."""
    probes = probes_of(report)
    before = report["before"]["test"]
    rows = []
    for k in range(1, max(fronts.values()) + 1):
        row = {"k": k, "layers": 0, "probes": 0, "edits": {}}
        for concept in dict.fromkeys(p.concept for p in probes):
            searched = [p for p in probes if p.concept == concept and fronts[(concept, p.layer)] <= k]
            row["layers"] += len({p.layer for p in searched})
            row["probes"] += len(searched)
            chosen = choose(searched, metric)
            row["edits"][concept] = (
                chosen,
                {name: 100 * (before[name]["top1"] - chosen.test_top1[name]) for name in chosen.test_top1},
            )
        rows.append(row)
        if row["layers"] == len({(p.concept, p.layer) for p in probes}):
            break  # every searched layer is in: larger k changes nothing
    return rows


def markdown(rows: list[dict], metric: str) -> str:
    concepts = list(rows[0]["edits"])
    lines = [
        "| fronts k | layers | probes | probes ÷ k=1 | " + " | ".join(concepts) + " | identity Δ summed | "
        "object Δ summed | all forgotten alone |",
        "|" + "---|" * (len(concepts) + 7),
    ]
    for row in rows:
        edits = row["edits"].values()
        cells = [f"{drops['identities']:.1f} (`{edit.layer}`)" for edit, drops in edits]
        forgotten = all(edit.forget_accuracy(metric) == 0.0 for edit, _ in edits)
        lines.append(
            f"| {row['k']} | {row['layers']} | {row['probes']} | {row['probes'] / rows[0]['probes']:.2f} | "
            + " | ".join(cells)
            + f" | {sum(drops['identities'] for _, drops in edits):.1f} | "
            f"{sum(drops['objects'] for _, drops in edits):.1f} | {'yes' if forgotten else 'no'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="a finished demo directory (world/, fit/)")
    parser.add_argument("--people", type=int, default=5, help="how many people (the default target and the next)")
    parser.add_argument("--gradients", default=None, help="a gradient file of the same people to reuse")
    parser.add_argument("--runs", default=None, help="keep the run's artifacts here (default: temporary)")
    parser.add_argument("--reuse", action="store_true", help="read a finished run in --runs instead of running it")
    parser.add_argument("--output", default=None, help="also write the markdown here")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a smoke run (--trainer.fast_dev_run: one gradient batch per stream, at most 2 probes "
        "per layer): shows that it runs; the table measures nothing",
    )
    args = parser.parse_args()
    if args.smoke and (args.reuse or args.gradients):
        parser.error("--smoke computes its own one-batch gradients afresh; leave out --reuse and --gradients.")
    demo = world_and_fit(args.demo)
    people = people_to_forget(load_demo_world(demo / "world"), args.people)
    with tempfile.TemporaryDirectory() as tmp:
        run = (Path(args.runs).resolve() if args.runs else Path(tmp)) / "fronts_all"
        finished = run / "report.json"
        stored = json.loads(finished.read_text()) if args.reuse and finished.is_file() else None
        if stored is not None and search_of(stored["settings"]) != EVERY_FRONT:
            sys.exit(
                f"error: {finished} is not a search of every front with each person on θ⁰ (settings "
                f"{stored['settings']}); leave out --reuse to run it again."
            )
        if stored is not None:
            report = stored
        else:
            print(f"[fronts] searching every front for {', '.join(people)}", file=sys.stderr)
            reused = ["--gradients", str(Path(args.gradients).resolve())] if args.gradients else []
            report = unlearn(
                demo,
                run,
                people,
                *EVERY_FRONT.overrides(),
                "--search.init_args.similarity_classes",
                "0",
                *reused,
                smoke=args.smoke,
            )
        if [c["name"] for c in report["concepts"]] != people:
            sys.exit(f"error: {finished} forgets {[c['name'] for c in report['concepts']]}, not {people}.")
        metric = report["settings"]["metric"]
        rows = by_fronts(report, fronts_of(artifacts(run, args.smoke)), metric)
    text = "\n".join(
        [
            "# How many Pareto fronts to search (demo world)",
            "",
            *([SMOKE_NOTE, ""] if args.smoke else []),
            f"`python benchmarks/fronts.py --demo {args.demo} --people {args.people}"
            f"{' --smoke' if args.smoke else ''}`: "
            f"each of {len(people)} people "
            "searched alone on θ⁰ over the layers of Pareto fronts 1..k (demo config: slug-tiny, metric "
            f"{metric}, max_steps {report['settings']['max_steps']}); one search of every front holds every k. Per "
            "person: the identity test drop of its chosen edit, in points, on the images of the people not in the run, "
            f"and its layer. Search of every front: {report['timing']['search_s']:.0f} s for "
            f"{report['timing']['probes']} probes. Each person on θ⁰: the `independent` start of "
            "`benchmarks/multi_concept.py` (`IndependentSearch`, no rounds), which searches as the older code's "
            "`sequential: false` did (git commit 1a40a97, with which `benchmarks/results/fronts.md` was measured). "
            f"Machine: {machine()}.",
            "",
            markdown(rows, metric),
            "",
        ]
    )
    publish(text, args.output)


if __name__ == "__main__":
    main()
