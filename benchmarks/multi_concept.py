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
per person, all at θ⁰). The searches (``--searches``; "the rounds" are ``refine_rounds: 5``, which search each
person again over its front layers on the model carrying all the other edits, keeping the forgotten ones forgotten,
and try freeing an edit the other people lean on, the untangle move, kept only if no one comes back and the utility
rises):

- ``section9``: METHOD §9 as written: person k is searched on the model carrying the edits of 1..k−1, and its
  forget test checks k only;
- ``keep``: the same, except that a probe of person k must also keep 1..k−1 forgotten;
- ``refine``: ``section9``, then the rounds;
- ``refine_fronts2``: the same over the first two Pareto fronts of each tower (``fronts: 2``);
- ``refine_fronts2_orders2``: ``refine_fronts2`` from the people's order and from its reverse (``orders: 2``),
  keeping the end that forgets the most people, then has the higher utility;
- ``keep_refine_fronts2``: ``keep``, then the rounds, over two fronts;
- ``independent_refine``: every person searched on θ⁰ (as separate single-concept runs would, but with this run's
  gradients and test images), all edits applied together, then the rounds;
- ``independent_refine_fronts2``: the same over two fronts.

``StepSearch`` expresses ``section9`` and the ``refine*`` searches with its own settings (``refine_rounds``,
``fronts``, ``orders``). ``keep`` and ``independent`` are starts it no longer has (its ``keep_forgotten`` and
``sequential: false`` were removed): this benchmark keeps them as variants of its own, :class:`KeepForgottenSearch`
and :class:`IndependentSearch` below, ``StepSearch`` subclasses whose :class:`~slug_lightning.joint_search.JointSearch`
starts that way (each run's ``report.json`` records it as ``settings.start``).

Results made by the older code. ``benchmarks/results/multi_concept.md``, ``multi_concept_5_people.md`` and
``multi_concept_5_people_avx512.md`` were measured at git commit 1a40a97, when ``StepSearch`` still had the
switches ``keep_forgotten``, ``sequential`` and ``untangle`` and the rounds ran without the untangle move unless
``untangle: true``. Their variant names, and what each is called here (:data:`OLDER_NAMES`):

- ``section9``, ``keep``: the same names, the same searches;
- ``refine_untangle`` → ``refine``; ``refine_fronts2_untangle`` → ``refine_fronts2``;
  ``refine_fronts2_untangle_orders2`` → ``refine_fronts2_orders2``; ``keep_fronts2_untangle`` →
  ``keep_refine_fronts2``;
- ``refine``, ``refine_fronts2``, ``independent`` and ``independent_fronts2`` there ran the rounds WITHOUT the
  untangle move, which the rounds now always make: no search here repeats them. ``refine`` and ``refine_fronts2``
  here are their ``*_untangle`` rows; ``independent_refine*`` here the old ``independent*`` starts with the move.

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
``--tables_only`` runs nothing and prints the tables of the finished runs, naming those not there. A finished run
is taken only if its report's settings are those of the search asked for (a run of the older code under a name
that now means another search, such as ``refine``, is not). ``--smoke`` runs every search as a smoke run
(``--trainer.fast_dev_run``: one batch per gradient stream, at most 2 probes per layer): it checks that the
searches run, in minutes, and measures nothing.

One script for the whole comparison (its variants, runs, reuse rules and tables), so that every table it prints
comes from one definition of each search; hence its length.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from _common import machine, publish, world_and_fit

from slug_lightning import config_path
from slug_lightning.callbacks import StepSearch
from slug_lightning.demo import load_demo_world
from slug_lightning.joint_search import JointSearch
from slug_lightning.search import choose

COUNTS = (2, 3, 5)
MAX_DROP = 0.10  # identity test top-1, for 5 people
ROUNDS = 5  # refine_rounds of the searches with rounds
MODULE = Path(__file__).stem  # the name the unlearn subprocess imports this file under (it is on its PYTHONPATH)


# --- the starts StepSearch no longer has: variants of this benchmark ----------------------------------------------


class KeepForgottenJointSearch(JointSearch):
    """The search of METHOD §9 where a probe of person k counts as forgotten only if the people searched before it
    (in this order) stay forgotten too: its forget accuracy is the largest of theirs and its own. The rounds are
    :class:`JointSearch`'s."""

    def _search_front(self, concept, kept=(), round_=0, start=None):
        if not round_:  # the search of METHOD §9 (the rounds choose what they keep themselves)
            kept = [c for c in self.chosen if c != concept]  # the people searched before this one, in this order
        return super()._search_front(concept, kept, round_, start)


class IndependentJointSearch(JointSearch):
    """Every person searched on θ⁰, as separate single-concept runs would (but with this run's gradients and test
    images), then all the edits applied together and evaluated; then the rounds of :class:`JointSearch`."""

    def _search_order(self, order):
        for concept in order:  # the editor keeps θ⁰ as its reference: no edit is applied until all are chosen
            self.listener.begin(len(self.fronts[concept]) * self.rule.steps_per_layer)
            self.chosen[concept] = edit = choose(self._search_front(concept), self.rule.metric)
            self.listener.end()
            self.listener.info(
                f"{concept} (on θ⁰): layer {edit.layer}, λ={edit.step_size:.4g}, forget "
                f"{self.rule.metric} {edit.forget_accuracy(self.rule.metric):.3f}, utility "
                f"{edit.utility:.3f}"
            )
        summary = self.editor.shift([self._change(concept, self.chosen[concept]) for concept in order])
        return self.refine(self.chosen, summary) if len(order) > 1 else summary


class _StartSearch(StepSearch):
    """A ``StepSearch`` whose joint search is :attr:`joint_search`; its report records :attr:`start` in its
    settings."""

    start = "section9"

    @property
    def settings(self) -> dict:
        return {**super().settings, "start": self.start}


class KeepForgottenSearch(_StartSearch):
    """``StepSearch`` with the start of ``keep`` (:class:`KeepForgottenJointSearch`)."""

    start = "keep"
    joint_search = KeepForgottenJointSearch


class IndependentSearch(_StartSearch):
    """``StepSearch`` with the start of ``independent`` (:class:`IndependentJointSearch`)."""

    start = "independent"
    joint_search = IndependentJointSearch


STARTS = {"section9": StepSearch, "keep": KeepForgottenSearch, "independent": IndependentSearch}


@dataclass(frozen=True)
class Search:
    """One way to search: how the rounds start, and the ``StepSearch`` settings."""

    start: str = "section9"  # "section9", "keep" or "independent" (STARTS)
    refine_rounds: int = 0
    fronts: int = 1
    orders: int = 1

    def overrides(self) -> list[str]:
        """The ``unlearn`` command-line arguments that run this search."""
        arguments = (
            [] if self.start == "section9" else ["--search.class_path", f"{MODULE}.{STARTS[self.start].__name__}"]
        )
        for option in ("refine_rounds", "fronts", "orders"):
            if getattr(self, option) != getattr(Search, option):
                arguments += [f"--search.init_args.{option}", str(getattr(self, option))]
        return arguments


SEARCHES = {  # name -> search (docstring, "The searches")
    "section9": Search(),
    "keep": Search("keep"),
    "refine": Search(refine_rounds=ROUNDS),
    "refine_fronts2": Search(refine_rounds=ROUNDS, fronts=2),
    "refine_fronts2_orders2": Search(refine_rounds=ROUNDS, fronts=2, orders=2),
    "keep_refine_fronts2": Search("keep", refine_rounds=ROUNDS, fronts=2),
    "independent_refine": Search("independent", refine_rounds=ROUNDS),
    "independent_refine_fronts2": Search("independent", refine_rounds=ROUNDS, fronts=2),
}
DESCRIPTIONS = {  # name -> what the markdown says of it
    "section9": "METHOD §9, the forget test of person k checks k only",
    "keep": "the same, but a probe of person k must also keep persons 1..k−1 forgotten (a start of this benchmark's "
    "own, `KeepForgottenSearch`)",
    "refine": f"`refine_rounds: {ROUNDS}`, the §9 search then rounds that search each person again over its Pareto "
    "front with all the other edits applied, keeping the forgotten ones forgotten, and try freeing an edit "
    "the other people lean on (the untangle move, kept only if no one comes back and the utility rises)",
    "refine_fronts2": "`refine` with `fronts: 2`, searching the first two Pareto fronts of each tower",
    "refine_fronts2_orders2": "`refine_fronts2` from the people's order and from its reverse (`orders: 2`), keeping "
    "the end that forgets the most, then has the higher utility",
    "keep_refine_fronts2": "the start of `keep`, then the rounds of `refine_fronts2`",
    "independent_refine": "every person searched on θ⁰ as separate runs would (a start of this benchmark's own, "
    "`IndependentSearch`), all edits applied together, then the rounds of `refine`",
    "independent_refine_fronts2": "`independent_refine` with `fronts: 2`",
}
# The searches of the results made by the older code (benchmarks/results/multi_concept.md, multi_concept_5_people.md,
# multi_concept_5_people_avx512.md; git commit 1a40a97) -> the search here that runs the same search, or None where
# none does: their rounds ran without the untangle move, which the rounds now always make.
OLDER_NAMES = {
    "section9": "section9",
    "keep": "keep",
    "refine": None,
    "refine_fronts2": None,
    "refine_untangle": "refine",
    "refine_fronts2_untangle": "refine_fronts2",
    "keep_fronts2_untangle": "keep_refine_fronts2",
    "refine_fronts2_untangle_orders2": "refine_fronts2_orders2",
    "independent": None,
    "independent_fronts2": None,
}
OLDER_NOTE = (
    "The results in `benchmarks/results/multi_concept.md`, `multi_concept_5_people.md` and "
    "`multi_concept_5_people_avx512.md` were measured by the older code (git commit 1a40a97), whose StepSearch had "
    "`keep_forgotten`, `sequential` and `untangle`, and whose rounds made the untangle move only with `untangle: "
    "true`. Their search names, here: "
    + ", ".join(
        f"`{old}` → " + (f"`{new}`" if new else "none (rounds without the move)") for old, new in OLDER_NAMES.items()
    )
    + ". So `refine` and `refine_fronts2` there are NOT `refine` and `refine_fronts2` here (those are their "
    "`*_untangle` rows), and the old `independent*` rows are the start of `independent_refine*` without the move."
)


SMOKE_NOTE = (
    "**SMOKE RUN** (`--smoke`: `--trainer.fast_dev_run`, one gradient batch per stream, at most 2 probes per "
    "layer): it shows that the searches run; the numbers measure nothing."
)


def search_of(settings: dict) -> Search | None:
    """The search a report's settings record, from this code's reports or the older code's (with
    ``keep_forgotten``, ``sequential``, ``untangle``); None for rounds without the untangle move, which no search
    here runs."""
    start = settings.get("start", "section9")
    if settings.get("keep_forgotten"):
        start = "keep"
    if settings.get("sequential") is False:
        start = "independent"
    rounds = settings.get("refine_rounds", 0)
    if rounds and settings.get("untangle") is False:
        return None
    return Search(start, rounds, settings.get("fronts", 1), settings.get("orders", 1))


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


def unlearn(demo: Path, output: Path, people: list[str], *overrides: str, smoke: bool = False) -> dict:
    """One multi-concept ``unlearn`` on the demo world; returns its report. The benchmark's directory is on the
    subprocess's ``PYTHONPATH``, so ``--search.class_path multi_concept.IndependentSearch`` (and the like) resolve.
    ``smoke``: a smoke run (``--trainer.fast_dev_run``), whose artifacts go to ``output/smoke``."""
    world = demo / "world"
    paths = {
        "seed_everything": 0,
        "trainer": {"logger": False, "enable_progress_bar": False},
        "model": {"init_args": {"pretrained": str(demo / "fit" / "slug-tiny.safetensors")}},
        "data": {"init_args": {"shards": str(world / "shards" / "*.tar"), "concepts": [{"name": p} for p in people]}},
        "search": {
            "init_args": {
                "sets": [
                    {"name": "identities", "root": str(world / "eval" / "identities")},
                    {"name": "objects", "root": str(world / "eval" / "objects")},
                ]
            }
        },
        "output_dir": str(output),
        "overwrite": True,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "paths.yaml").write_text(yaml.safe_dump(paths, sort_keys=False))
    command = [
        sys.executable,
        "-m",
        "slug_lightning",
        "unlearn",
        "--config",
        config_path("demo/unlearn.yaml"),
        "--config",
        str(output / "paths.yaml"),
        *overrides,
    ]
    if smoke:
        command += ["--trainer.fast_dev_run", "true"]
    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"unlearn of {people} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return json.loads((artifacts(output, smoke) / "report.json").read_text())


def artifacts(output: Path, smoke: bool = False) -> Path:
    """Where the ``unlearn`` of ``output`` wrote its artifacts: ``output``, ``output/smoke`` for a smoke run."""
    return output / "smoke" if smoke else output


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
    return (
        100
        * sum(row["images"] * (row["top1_after"] - row["top1_before"]) for row in rows if row["name"] in look_alikes)
        / images
    )


def _within_target(identities: float) -> bool:
    """Whether an identity change (points) is a drop of at most ``MAX_DROP``: exactly 10 points (30 of 300 images)
    is within, though the difference of two accuracies may come out a float rounding above it."""
    return -identities <= 100 * MAX_DROP + 1e-9


def tables(results: list[Result], world) -> str:
    """The markdown of the closing note: a per-run summary, then every person's edit."""
    lines = [
        "| people | selection | search | identity test top-1 before | after | Δ (points) | of which look-alikes | "
        "object test top-1 before | after | Δ (points) | all forgotten | probes | search s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for people, selection, search, report in results:
        before, after = report["before"]["test"], report["after"]["test"]
        ids, objs = _drops(report)
        share = look_alike_change(report, world)
        lines.append(
            f"| {len(people)} | {selection} | {search} | {_pct(before['identities']['top1'])} | "
            f"{_pct(after['identities']['top1'])} | {ids:+.1f} | "
            f"{'n/a' if share is None else f'{share:+.1f}'} | {_pct(before['objects']['top1'])} | "
            f"{_pct(after['objects']['top1'])} | {objs:+.1f} | {'yes' if _forgotten(report) else 'no'} | "
            f"{report['timing']['probes']} | {report['timing']['search_s']:.1f} |"
        )
    lines += [
        "",
        "| people | selection | search | # | concept | layer | tower | λ | forget top-1 before | after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for people, selection, search, report in results:
        for index, concept in enumerate(report["concepts"], start=1):
            lines.append(
                f"| {len(people)} | {selection} | {search} | {index} | {concept['name']} | "
                f"`{concept['layer']}` | {concept['tower']} | {concept['step_size']:.4g} | "
                f"{_pct(concept['forget_top1_before'])} | {_pct(concept['forget_top1_after'])} |"
            )
    return "\n".join(lines)


def across_draws(results: list[Result]) -> str:
    """Per search, over its 5-person runs (one per set of people): how many forget everyone and meet the target,
    the mean and worst identity change, the mean object change and the mean probe count."""
    lines = [
        "| search | 5-person runs | all forgotten | target met | identity Δ mean | worst | object Δ mean | "
        "probes mean |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for search in SEARCHES:
        reports = [report for people, _, name, report in results if name == search and len(people) == 5]
        if not reports:
            continue
        identities, objects = zip(*map(_drops, reports))
        forgotten = [_forgotten(report) for report in reports]
        met = sum(ok and _within_target(drop) for ok, drop in zip(forgotten, identities))
        lines.append(
            f"| {search} | {len(reports)} | {sum(forgotten)} | {met} | {statistics.mean(identities):+.1f} | "
            f"{min(identities):+.1f} | {statistics.mean(objects):+.1f} | "
            f"{statistics.mean(r['timing']['probes'] for r in reports):.0f} |"
        )
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
    parser.add_argument(
        "--selections",
        nargs="+",
        choices=list(SELECTIONS),
        default=list(SELECTIONS),
        help="which people: 'family', the default target and the people after it in world order "
        "(from few look-alike groups); 'unrelated', one person from each look-alike group; "
        "'random', drawn at random (see --seeds)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="the seeds of the random draws, one set of people per seed (seed 0's runs go to "
        "RUNS/random_<n>_<search>, seed s's to RUNS/random_seed<s>_<n>_<search>)",
    )
    parser.add_argument(
        "--searches",
        nargs="+",
        choices=list(SEARCHES),
        default=list(SEARCHES),
        help="which searches to run for each set of people (the first computes the gradients); "
        "results made by the older code name some of them otherwise (see the docstring)",
    )
    parser.add_argument("--runs", default=None, help="keep each run's artifacts here (default: temporary)")
    parser.add_argument("--output", default=None, help="also write the markdown here")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="read the report of a finished run in --runs (same people, same search) instead of running it again",
    )
    parser.add_argument(
        "--tables_only",
        action="store_true",
        help="run nothing: the tables of the finished runs in --runs, naming the runs not there",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="smoke runs (--trainer.fast_dev_run: one batch per gradient stream, at most 2 probes "
        "per layer, each computing its own gradients): checks that every search runs; the "
        "tables measure nothing",
    )
    args = parser.parse_args()
    if args.smoke and (args.reuse or args.tables_only):
        parser.error("--smoke runs every search afresh; leave out --reuse and --tables_only.")
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
                    print(
                        f"[multi_concept] forgetting {count} {selection} ({search}): {', '.join(people)}",
                        file=sys.stderr,
                    )
                    output = runs / f"{prefix}_{count}_{search}"
                    finished = output / "report.json"
                    stored = json.loads(finished.read_text()) if finished.is_file() else None
                    # A finished run counts only for the same people and the same search: a run of the older code
                    # under a name that now means another search is not taken.
                    if (
                        (args.reuse or args.tables_only)
                        and stored
                        and [c["name"] for c in stored["concepts"]] == people
                        and search_of(stored["settings"]) == SEARCHES[search]
                    ):
                        results.append((people, selection, search, stored))
                        continue
                    if args.tables_only:
                        missing.append(
                            f"{count} {selection} `{search}`" + (" (a run of another search there)" if stored else "")
                        )
                        continue
                    # A smoke run's gradients (one batch per stream) are neither kept nor taken by --gradients.
                    reused = ["--gradients", str(gradients)] if gradients.is_file() and not args.smoke else []
                    report = unlearn(demo, output, people, *SEARCHES[search].overrides(), *reused, smoke=args.smoke)
                    if not args.smoke and not gradients.is_file():  # the later searches reuse this run's gradients
                        gradients.parent.mkdir(parents=True, exist_ok=True)
                        (output / "gradients.safetensors").rename(gradients)
                    results.append((people, selection, search, report))
    searches = list(dict.fromkeys(search for _, _, search, _ in results)) or args.searches
    text = "\n".join(
        ["# Several people in one run (demo world)", ""]
        + ([SMOKE_NOTE, ""] if args.smoke else [])
        + [
            f"`python benchmarks/multi_concept.py --demo {args.demo} --selections {' '.join(args.selections)} "
            + (f"--counts {' '.join(map(str, args.counts))} " if args.counts != list(COUNTS) else "")
            + (f"--seeds {' '.join(map(str, args.seeds))} " if args.seeds != [0] else "")
            + ("--smoke " if args.smoke else "")
            + f"--searches {' '.join(args.searches)}`: for each set of people, one multi-concept `unlearn` per search "
            "on the same gradients (demo config: slug-tiny, metric top-1, threshold 0, max_steps 10). "
            + " ".join(f"`{name}`: {DESCRIPTIONS[name]}." for name in searches)
            + " People: `family`, the default target and the next ones in world order, which keeps look-alike families "
            "together (from few look-alike groups, and other people look-alikes of several of them); `unrelated`, "
            "the default target and then the first person of each other look-alike group in world order (no one a "
            "look-alike of another, no other person a look-alike of two of them); `random`, drawn at random with "
            "seed 0 (`random (seed s)`: with seed s; a larger set holds the smaller ones' people). Forget top-1 "
            f"after = the final evaluation with every edit applied. Identity test = the images of the other "
            f"{len(world.people)} − n people; of which look-alikes = the part of its Δ on the people who look like a "
            "forgotten one (`DemoWorld.look_alikes`; n/a for a report without per-class top-1). search s = the wall "
            "time of the run's search (runs that shared the machine with another took longer). "
            f"Machine: {machine()}.",
            "",
            OLDER_NOTE,
            "",
            tables(results, world),
            "",
            "Each search over the sets of 5 people it ran on (compare searches over the same sets):",
            "",
            across_draws(results),
            "",
            verdict(results),
            "",
        ]
        + ([f"Not run: {', '.join(missing)}.", ""] if missing else [])
    )
    publish(text, args.output)


if __name__ == "__main__":
    main()
