"""Several concepts in one search: the forget test that keeps earlier concepts forgotten, and the refinement
rounds that revisit each concept's step on the model carrying all the others' edits.

A scripted evaluator stands in for the model: its count tables are a fixed function of a few one-entry "layers",
so each rule of the search can be checked against answers worked out by hand.
"""

from __future__ import annotations

import copy
import csv
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from slug_lightning import config_path
from slug_lightning.callbacks import StepSearch
from slug_lightning.callbacks.step_search import OrderEnd
from slug_lightning.cli import main
from slug_lightning.datamodules import LabelledSet
from slug_lightning.evaluation import summarize
from slug_lightning.gradients import GradientStore
from slug_lightning.layers import LayerStats
from slug_lightning.search import Probe

NAMES = {"people": ["Ann", "Bob", "Cy"]}
FORGET_SETS = {"Ann": "people", "Bob": "people"}


def _search(**options) -> StepSearch:
    return StepSearch(sets=[LabelledSet("people", root="unused")], metric="top1", **options)


def test_keep_forgotten_makes_a_probe_count_the_earlier_concepts():
    """With keep_forgotten a probe of the second concept is only as forgotten as the worst of the first two."""
    # count table rows: [images, top-1 hits, top-5 hits] per class; Ann came back (3 of 10), Bob is forgotten
    counts = {"people": torch.tensor([[10.0, 3.0, 6.0], [10.0, 0.0, 2.0], [10.0, 9.0, 10.0]])}
    evaluator = SimpleNamespace(run=lambda edited=None: counts)
    layer = LayerStats("w", "vision", 1.0, 0.1, 2.0, 1.0, front=1)
    results = {}
    for keep in (False, True):
        search = _search(keep_forgotten=keep)
        search.chosen = {"Ann": None}  # Ann was searched first
        probe = search._probe(evaluator, torch.zeros(2), torch.ones(2), layer, "Bob", 1.0, NAMES, FORGET_SETS,
                              None, search._kept("Bob"))
        results[keep] = (probe.forget_top1, probe.forget_top5)
    assert results[False] == (0.0, 0.2)
    assert results[True] == (0.3, 0.6)


class World:
    """Two people, each edited along its own one-entry layer (``a`` for Ann, ``b`` for Bob, gradient 1):

    - Ann is forgotten once ``a >= 1 + b / 2``: Bob's edit brings her back unless hers grows;
    - Bob is forgotten once ``b + a / 4 >= 1``: Ann's edit helps forget him;
    - Cy, the test class, keeps ``10 - (a + b)`` of his 10 images: every step costs utility.
    """

    def __init__(self, a: float, b: float) -> None:
        self.parameters = {"a": torch.tensor([a]), "b": torch.tensor([b])}

    def run(self, edited=None):
        a, b = (float(self.parameters[n]) for n in "ab")
        ann = 0.0 if a >= 1 + b / 2 else 10.0
        bob = 0.0 if b + a / 4 >= 1 else 10.0
        cy = 10.0 - (a + b)
        return {"people": torch.tensor([[10.0, ann, ann], [10.0, bob, bob], [10.0, cy, cy]])}


def _refined(rounds: int, a: float = 1.0, b: float = 0.75):
    """The refinement of a first pass that chose λ_Ann = ``a`` (on θ⁰) and then λ_Bob = ``b``."""
    world = World(a, b)
    search = _search(refine_rounds=rounds)
    search.searched = {"Ann": [LayerStats("a", "vision", 1.0, 0.1, 1.0, 1.0, front=1)],
                       "Bob": [LayerStats("b", "vision", 1.0, 0.1, 1.0, 1.0, front=1)]}
    search.chosen = {"Ann": Probe("Ann", "a", 0, a, a, 0.0, 0.0), "Bob": Probe("Bob", "b", 0, b, b, 0.0, 0.0)}
    store = SimpleNamespace(concepts=["Ann", "Bob"], forget={"Ann": {"a": torch.ones(1)}, "Bob": {"b": torch.ones(1)}})
    counts = search._refine(world, world.parameters, store, NAMES, FORGET_SETS, world.run(), None, False, "cpu")
    return search, world, summarize(counts, NAMES, FORGET_SETS)


def test_first_pass_leaves_the_earlier_concept_brought_back():
    """The premise of the refinement test: METHOD §9 alone ends with Ann back (1 < 1 + 0.75 / 2)."""
    search, world, summary = _refined(rounds=0)
    assert summary["forget"]["Ann"]["top1"] == 1.0 and summary["forget"]["Bob"]["top1"] == 0.0
    assert [float(world.parameters[n]) for n in "ab"] == [1.0, 0.75] and not search.probes


def test_refinement_pushes_the_concept_brought_back_and_shrinks_the_one_helped():
    search, world, summary = _refined(rounds=3)
    ann, bob = search.chosen["Ann"], search.chosen["Bob"]
    # Ann needs a >= 1 + b/2; Bob, with a = 1.375, needs only b >= 0.65625 < 0.75 (and Ann then needs b <= 0.75)
    assert ann.step_size == pytest.approx(1.375) and ann.round == 1
    assert 0.65625 <= bob.step_size < 0.75 and bob.round == 1
    # the model carries exactly the chosen steps, both people are forgotten, and Cy kept more than before
    assert float(world.parameters["a"]) == ann.step_size and float(world.parameters["b"]) == bob.step_size
    assert summary["forget"]["Ann"]["top1"] == 0.0 and summary["forget"]["Bob"]["top1"] == 0.0
    assert summary["test"]["people"]["top1"] == pytest.approx(1 - (ann.step_size + bob.step_size) / 10)
    # every refinement probe is recorded with its round; a round that changed nothing ended the refinement
    rounds = sorted({p.round for p in search.probes})
    assert rounds[0] == 1 and len(rounds) < 3
    assert all(p.concept in ("Ann", "Bob") and p.layer == {"Ann": "a", "Bob": "b"}[p.concept] for p in search.probes)


def test_refinement_records_the_model_each_visit_leaves_and_plots_it(tmp_path):
    from slug_lightning.plots import refinement_plot

    search, _, summary = _refined(rounds=3)
    # the start (Ann back), then Ann and Bob in rounds 1 and 2; the last visit left the final model
    assert [(r, c) for r, c, _ in search.visits] == [(0, None), (1, "Ann"), (1, "Bob"), (2, "Ann"), (2, "Bob")]
    assert search.visits[0][2]["forget"]["Ann"]["top1"] == 1.0 and search.visits[-1][2] == summary
    after_ann = 1 - (search.chosen["Ann"].step_size + 0.75) / 10  # Ann's visit of round 1, Bob still at 0.75
    assert search.visits[1][2]["test"]["people"]["top1"] == pytest.approx(after_ann)
    refinement_plot(tmp_path / "refinement.png", [("", search.visits)], "top1")
    assert (tmp_path / "refinement.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refinement_never_brings_back_a_concept_forgotten_before():
    """In round 2 Ann alone would be forgotten from a = 1 + b/2 = 1.328 on, but below a = 1.375 Bob (at
    b = 0.65625) comes back, so those probes do not count as forgotten."""
    search, _, _ = _refined(rounds=3)
    probes = [p for p in search.probes if p.concept == "Ann" and p.round == 2]
    assert any(1.328125 <= p.step_size < 1.375 for p in probes)  # the probes that tell the two rules apart
    for probe in probes:
        assert (probe.forget_top1 == 0.0) == (probe.step_size >= 1.375)


def test_leave_one_out_evaluates_the_final_model_without_each_edit_and_restores_it():
    world = World(1.375, 0.75)  # both forgotten: 1.375 >= 1 + 0.375 and 0.75 + 0.34375 >= 1
    search = _search()
    search.chosen = {"Ann": Probe("Ann", "a", 0, 1.375, 1.375, 0.0, 0.0),
                     "Bob": Probe("Bob", "b", 0, 0.75, 0.75, 0.0, 0.0)}
    store = SimpleNamespace(concepts=["Ann", "Bob"], forget={"Ann": {"a": torch.ones(1)}, "Bob": {"b": torch.ones(1)}})
    left_out = search._leave_one_out(world, world.parameters, store, NAMES, FORGET_SETS, "cpu")
    # without Ann's edit, Bob (0.75 < 1) comes back too, and Cy keeps 10 - 0.75 of 10
    assert {c: left_out["Ann"]["forget"][c]["top1"] for c in ("Ann", "Bob")} == {"Ann": 1.0, "Bob": 1.0}
    assert left_out["Ann"]["test"]["people"]["top1"] == pytest.approx(0.925)
    # without Bob's edit, Ann (1.375 >= 1) stays forgotten
    assert {c: left_out["Bob"]["forget"][c]["top1"] for c in ("Ann", "Bob")} == {"Ann": 0.0, "Bob": 1.0}
    assert left_out["Bob"]["test"]["people"]["top1"] == pytest.approx(0.8625)
    assert [float(world.parameters[n]) for n in "ab"] == [1.375, 0.75]  # every edit back in place


class Detour(World):
    """Ann can also be forgotten on a second layer ``c`` (once ``c >= 1``), which on θ⁰ costs Cy more than ``a``
    (1.2 per unit) but, once Bob's edit is in, less (``1.2 (1 - b/2)``); Bob is forgotten once ``b >= 1``."""

    def __init__(self) -> None:
        self.parameters = {"a": torch.tensor([1.0]), "b": torch.tensor([1.0]), "c": torch.tensor([0.0])}

    def run(self, edited=None):
        a, b, c = (float(self.parameters[n]) for n in "abc")
        ann = 0.0 if a >= 1 + b / 2 or c >= 1 else 10.0
        bob = 0.0 if b >= 1 else 10.0
        cy = 10.0 - a - b - 1.2 * c * (1 - b / 2)
        return {"people": torch.tensor([[10.0, ann, ann], [10.0, bob, bob], [10.0, cy, cy]])}


def test_refinement_may_move_a_concept_to_another_front_layer():
    world = Detour()
    search = _search(refine_rounds=2)
    front = {n: LayerStats(n, "vision", 1.0, 0.1, 10.0, 1.0, front=1) for n in "abc"}  # first λ = 10/1/10 = 1
    search.searched = {"Ann": [front["a"], front["c"]], "Bob": [front["b"]]}
    search.chosen = {"Ann": Probe("Ann", "a", 0, 1.0, 0.1, 0.0, 0.0), "Bob": Probe("Bob", "b", 0, 1.0, 0.1, 0.0, 0.0)}
    store = SimpleNamespace(concepts=["Ann", "Bob"],
                            forget={"Ann": {"a": torch.ones(1), "c": torch.ones(1)}, "Bob": {"b": torch.ones(1)}})
    counts = search._refine(world, world.parameters, store, NAMES, FORGET_SETS, world.run(), None, False, "cpu")
    ann = search.chosen["Ann"]
    assert (ann.layer, ann.step_size, ann.round) == ("c", 1.0, 1)
    # Ann's old edit is gone from ``a``: each concept keeps a single layer
    assert [float(world.parameters[n]) for n in "abc"] == [0.0, 1.0, 1.0]
    summary = summarize(counts, NAMES, FORGET_SETS)
    assert summary["forget"]["Ann"]["top1"] == summary["forget"]["Bob"]["top1"] == 0.0
    assert summary["test"]["people"]["top1"] == pytest.approx((10 - 1 - 0.6) / 10)


class Tangle(World):
    """Ann can be forgotten on her own layer ``a`` (once ``a >= 1``) or on a wide layer ``w`` (once ``w >= 1``)
    that forgets Bob too but costs Cy 4 images per unit; Bob is forgotten once ``b + w >= 1``."""

    def __init__(self) -> None:
        self.parameters = {"a": torch.tensor([0.0]), "b": torch.tensor([0.25]), "w": torch.tensor([1.0])}

    def run(self, edited=None):
        a, b, w = (float(self.parameters[n]) for n in "abw")
        ann = 0.0 if a >= 1 or w >= 1 else 10.0
        bob = 0.0 if b + w >= 1 else 10.0
        cy = max(0.0, 10.0 - a - b - 4 * w)
        return {"people": torch.tensor([[10.0, ann, ann], [10.0, bob, bob], [10.0, cy, cy]])}


def _tangle_search(world: Tangle, **options):
    """The search and store of a :class:`Tangle`: Ann's edit is on the wide layer, and Bob's small edit leans on it
    (without it he comes back)."""
    search = _search(**options)
    front = {n: LayerStats(n, "vision", 1.0, 0.1, 10.0, 1.0, front=1) for n in "abw"}  # first λ = 1
    search.searched = {"Ann": [front["a"], front["w"]], "Bob": [front["b"]]}
    search.chosen = {"Ann": Probe("Ann", "w", 0, 1.0, 0.1, 0.0, 0.0),
                     "Bob": Probe("Bob", "b", 0, 0.25, 0.025, 0.0, 0.0)}
    store = SimpleNamespace(concepts=["Ann", "Bob"],
                            forget={"Ann": {"a": torch.ones(1), "w": torch.ones(1)}, "Bob": {"b": torch.ones(1)}})
    return search, store


def _tangled(untangle: bool):
    world = Tangle()
    search, store = _tangle_search(world, refine_rounds=3, untangle=untangle)
    counts = search._refine(world, world.parameters, store, NAMES, FORGET_SETS, world.run(), None, False, "cpu")
    return search, world, summarize(counts, NAMES, FORGET_SETS)


def test_refinement_alone_keeps_an_edit_others_lean_on():
    """Each visit must keep the other person forgotten: Ann cannot leave ``w`` (Bob would come back), and Bob,
    helped by ``w``, shrinks his own step instead."""
    search, world, summary = _tangled(untangle=False)
    assert search.chosen["Ann"].layer == "w" and float(world.parameters["w"]) == 1.0
    assert search.chosen["Bob"].step_size < 0.25
    assert summary["test"]["people"]["top1"] == pytest.approx(0.6, abs=0.01)  # 10 - 4 w of Cy's 10 images


def test_untangle_frees_the_edit_and_searches_the_leaning_concept_again():
    search, world, summary = _tangled(untangle=True)
    ann, bob = search.chosen["Ann"], search.chosen["Bob"]
    # Ann moves to her own layer; Bob, back without ``w``, grows his own step until he is forgotten again
    assert (ann.layer, ann.step_size) == ("a", 1.0) and 1.0 <= bob.step_size < 1.05
    assert [float(world.parameters[n]) for n in "aw"] == [1.0, 0.0] and float(world.parameters["b"]) == bob.step_size
    assert summary["forget"]["Ann"]["top1"] == summary["forget"]["Bob"]["top1"] == 0.0
    assert summary["test"]["people"]["top1"] == pytest.approx((10 - 1 - bob.step_size) / 10)


class Spoiler(Tangle):
    """As :class:`Tangle`, but Bob is forgotten on ``b`` only when the wide edit is in: freeing Ann brings him
    back for good, so the move is undone."""

    def run(self, edited=None):
        counts = super().run(edited)
        if float(self.parameters["w"]) < 1:
            counts["people"][1, 1:] = 10.0
        return counts


def test_untangle_restores_every_edit_when_a_concept_would_come_back():
    world = Spoiler()
    search, store = _tangle_search(world, refine_rounds=1, untangle=True)
    start = dict(search.chosen)
    progress = SimpleNamespace(set_description=lambda text: None, update=lambda n: None, set_postfix=lambda d: None)
    counts = search._untangle(world, world.parameters, store, "Ann", NAMES, FORGET_SETS, world.run(), None, progress,
                              "cpu", 1)
    assert search.chosen == start
    assert [float(world.parameters[n]) for n in "abw"] == [0.0, 0.25, 1.0]
    summary = summarize(counts, NAMES, FORGET_SETS)
    assert summary["forget"]["Ann"]["top1"] == summary["forget"]["Bob"]["top1"] == 0.0
    assert any(p.concept == "Bob" and p.round == 1 for p in search.probes)  # Bob's search was tried, and failed


def _ordered(given: list[str], orders: int):
    """The whole search of the :class:`World` from θ⁰ (first λ = 1), the people given in ``given``, from ``orders``
    concept orders, with up to 3 refinement rounds."""
    world = World(0.0, 0.0)
    search = _search(refine_rounds=3, orders=orders)
    layers = {"Ann": "a", "Bob": "b"}
    search.searched = {c: [LayerStats(layers[c], "vision", 1.0, 0.1, 10.0, 1.0, front=1)] for c in given}
    store = GradientStore(forget={c: {layers[c]: torch.ones(1)} for c in given},
                          retain={n: torch.zeros(1) for n in "ab"}, forget_samples={c: 1 for c in given},
                          retain_samples=1)
    base = {name: weight.clone() for name, weight in world.parameters.items()}
    world.run()
    counts = search._search_orders(world, world.parameters, base, store, NAMES, FORGET_SETS, None, False, "cpu")
    return search, world, summarize(counts, NAMES, FORGET_SETS)


def _edits(chosen: dict[str, Probe]) -> dict[str, tuple[str, float]]:
    return {concept: (probe.layer, probe.step_size) for concept, probe in chosen.items()}


def test_each_order_ends_where_a_run_given_that_order_ends():
    """Ann first: a = 1, Bob b = 0.75, then the rounds (a = 1.375, b just under 0.75). Bob first: b = 1, Ann needs
    a = 1.5, then Bob shrinks to 0.625 and Ann cannot follow (Bob needs a >= 4 (1 - b)): 2.125 against 2.03."""
    search, world, summary = _ordered(["Ann", "Bob"], orders=2)
    assert [end.order for end in search.ends] == [["Ann", "Bob"], ["Bob", "Ann"]]
    for index, given in enumerate((["Ann", "Bob"], ["Bob", "Ann"])):
        alone, _, after = _ordered(given, orders=1)
        assert _edits(search.ends[index].chosen) == _edits(alone.chosen)
        assert search.ends[index].after == after
        assert search.ends[index].probes == len(alone.probes)
        assert [(r, c) for r, c, _ in search.ends[index].visits] == [(r, c) for r, c, _ in alone.visits]
    assert search.ends[1].chosen["Ann"].step_size == 1.5 and search.ends[1].chosen["Bob"].step_size == 0.625
    assert summary["forget"]["Ann"]["top1"] == summary["forget"]["Bob"]["top1"] == 0.0
    # every probe says which order it belongs to; each order's layer searches count their probes from 0
    assert [p.order for p in search.probes] == sorted(p.order for p in search.probes)
    assert sum(p.order == 0 for p in search.probes) == search.ends[0].probes
    assert [p.step for p in search.probes if (p.order, p.round, p.concept) == (1, 0, "Bob")][0] == 0


def test_the_search_state_round_trips_with_every_order():
    search, _, _ = _ordered(["Bob", "Ann"], orders=2)
    resumed = _search(refine_rounds=3, orders=2)
    resumed.load_state_dict(copy.deepcopy(search.state_dict()))
    assert resumed.ends == search.ends and resumed.kept_order == search.kept_order == 1
    assert resumed.probes == search.probes and resumed.chosen == search.chosen


def test_the_refinement_plot_draws_one_panel_per_order(tmp_path):
    from test_report import assert_readable_png

    from slug_lightning.plots import unlearn_plots

    search, _, _ = _ordered(["Ann", "Bob"], orders=2)
    assert unlearn_plots(tmp_path, search) == ["refinement.png"]  # so report.md links it
    assert_readable_png(tmp_path / "refinement.png", min_height=2 * 350)


def test_orders_keep_the_end_with_the_higher_utility_and_leave_the_model_carrying_it():
    for given, kept in ((["Ann", "Bob"], 0), (["Bob", "Ann"], 1)):
        search, world, summary = _ordered(given, orders=2)
        assert search.kept_order == kept and search.ends[kept].order == ["Ann", "Bob"]
        # the edits (in the order given) and the model are those of the kept end, also when another order came last
        assert list(search.chosen) == given and _edits(search.chosen) == _edits(search.ends[kept].chosen)
        assert [float(world.parameters[n]) for n in "ab"] == [search.chosen[c].step_size for c in ("Ann", "Bob")]
        assert summary == search.ends[kept].after and search.visits is search.ends[kept].visits
        assert summary["test"]["people"]["top1"] > search.ends[1 - kept].after["test"]["people"]["top1"]


def test_orders_rank_forgotten_concepts_before_utility_and_keep_the_first_of_equals():
    def end(ann: float, cy: float) -> OrderEnd:  # Ann's forget top-1 and Cy's test top-1; Bob forgotten
        table = torch.tensor([[10.0, 10 * ann, 10 * ann], [10.0, 0.0, 0.0], [10.0, 10 * cy, 10 * cy]])
        return OrderEnd(["Ann", "Bob"], {}, summarize({"people": table}, NAMES, FORGET_SETS), [], 0)

    search = _search(orders=3)
    search.ends = [end(ann=0.1, cy=0.9), end(ann=0.0, cy=0.6), end(ann=0.0, cy=0.6)]
    assert search._kept_end() == 1


def test_refine_rounds_keep_forgotten_without_sequential_and_untangle_without_rounds_are_refused():
    with pytest.raises(ValueError, match="refine_rounds must be an integer >= 0, got -1"):
        _search(refine_rounds=-1)
    with pytest.raises(ValueError, match="keep_forgotten needs sequential"):
        _search(keep_forgotten=True, sequential=False)
    with pytest.raises(ValueError, match="untangle works in the refinement rounds; set refine_rounds >= 1"):
        _search(untangle=True)
    for orders in (0, True, 1.5):
        with pytest.raises(ValueError, match=f"orders must be an integer >= 1, got {orders!r}"):
            _search(orders=orders)


# --- end to end on the small demo -------------------------------------------------------------------------------


def test_three_people_with_refinement_are_all_forgotten_and_no_worse_than_searched_apart(small_demo, tmp_path):
    """The README's several-people command, on the small demo (the same three people): METHOD §9 alone lets a later
    edit bring an earlier person back on the demo world (benchmarks/results/multi_concept.md); the §9 search and the refinement rounds of
    configs/demo/unlearn_people.yaml, with `untangle` over two fronts, end with all three forgotten, and no worse
    than the same people searched apart on θ⁰ (each as its own run would) with their edits applied together.

    How much the other people lose is a measurement of one fit, which follows the CPU's kernels: it is in the
    benchmark, not here."""
    output = tmp_path / "people"
    common = ["--config", config_path("demo/unlearn.yaml"), "--config", small_demo / "demo_paths.yaml",
              "--config", config_path("demo/unlearn_people.yaml"), "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false",
              # 5 probes per layer, not 10: the rounds' moves are what is tested, for half the probes
              "--search.init_args.max_steps", "5",
              # the retain gradient from 2 of the 4 shards (the gradient pass is most of the time); forget pairs from all
              "--data.init_args.shards", small_demo / "world" / "shards" / "{00000..00001}.tar",
              "--data.init_args.forget_shards", small_demo / "world" / "shards" / "*.tar"]
    _unlearn(*common, "--output_dir", output)
    report = json.loads((output / "report.json").read_text())
    people = [c["name"] for c in report["concepts"]]
    assert len(people) == 3 and report["settings"]["refine_rounds"] >= 1
    for concept in report["concepts"]:
        assert concept["forget_top1_before"] >= 0.5 and concept["forget_top1_after"] == 0.0, concept
    settings = report["settings"]
    assert settings["untangle"] and settings["sequential"] and settings["fronts"] == 2
    # the same people and gradients, each searched on θ⁰ over the same layers, the three edits then applied together
    apart = tmp_path / "apart"
    _unlearn(*common, "--output_dir", apart, "--gradients", output / "gradients.safetensors",
            "--search.init_args.sequential", "false", "--search.init_args.refine_rounds", "0",
            "--search.init_args.untangle", "false")
    separate = json.loads((apart / "report.json").read_text())
    assert [c["name"] for c in separate["concepts"]] == people
    assert _end_rank(report) >= _end_rank(separate), (report["after"], separate["after"])
    # the refinement probes are in the report and in search.csv with their round
    rounds = {p["round"] for p in report["search"]}
    assert 0 in rounds and 1 in rounds and "refinement.png" in report["plots"]
    with open(output / "search.csv", newline="") as file:
        assert {int(row["round"]) for row in csv.DictReader(file)} == rounds
    # the run's delta on the base model is the run's unlearned model: each person keeps one update
    assert main(["delta", "apply", "--model", str(small_demo / "fit" / "slug-tiny.safetensors"), "--delta",
                 str(output / "delta.safetensors"), "--output", str(tmp_path / "applied.safetensors")]) == 0
    applied, unlearned = load_file(str(tmp_path / "applied.safetensors")), load_file(str(output / "model.safetensors"))
    for name in unlearned:
        torch.testing.assert_close(applied[name], unlearned[name], rtol=0, atol=1e-6)


def _unlearn(*args) -> None:
    assert main(["unlearn", *map(str, args)]) == 0


def _end_rank(report: dict) -> tuple[int, float]:
    """How the search of several concepts ranks the model a run ends with: the concepts forgotten (forget accuracy
    by the search's metric at most its threshold), then the utility, the mean test top-1 over the sets (METHOD §7)."""
    settings, after = report["settings"], report["after"]
    forgotten = sum(value[settings["metric"]] <= settings["threshold"] for value in after["forget"].values())
    tests = [value["top1"] for value in after["test"].values()]
    return forgotten, sum(tests) / len(tests)
