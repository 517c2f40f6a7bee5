"""Forget first and warm starts: probes that skip the test sets once the forget images fail the forget test, and
layer searches that start where an earlier layer of the tower forgot, make the same choices as the full search."""

from __future__ import annotations

import csv
import dataclasses
import importlib
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from slug_lightning.artifacts import write_csv
from slug_lightning.callbacks import StepSearch
from slug_lightning.datamodules import LabelledSet, ZeroShotDataModule
from slug_lightning.errors import ConfigError
from slug_lightning.evaluation import ZeroShotEvaluator
from slug_lightning.gradient_store import GradientStore
from slug_lightning.joint_search import JointSearch, SearchRule
from slug_lightning.layers import LayerStats, candidate_layers
from slug_lightning.plots import search_plot
from slug_lightning.report import search_rows
from slug_lightning.search import BinarySearch, Probe, choose, untested

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


# --- a scripted model: forget accuracy falls to 0 at each layer's own λ, test accuracy falls with λ ----------------


class ScriptedEditor:
    """Layer ``name`` forgets concept ``c`` once λ >= ``crossings[c][name]`` (never if absent); the test set's
    accuracy is ``1 / (1 + λ · cost[name])``. Counts the probes whose test sets were evaluated."""

    def __init__(self, crossings, cost, floor=0.0):
        self.crossings, self.cost, self.floor = crossings, cost, floor
        self.tested = 0

    def _summary(self, layer=None, step=0.0):
        forget = {}
        for concept, layers in self.crossings.items():
            crossing = layers.get(layer, math.inf)
            # Never forgetting layers still lower the accuracy a little with λ, to a floor: ties need utilities.
            value = 0.0 if step >= crossing else max(self.floor, 1.0 - abs(step) / 1000.0)
            forget[concept] = {"top1": value, "top5": value, "count": 4}
        test = 1.0 / (1.0 + abs(step) * self.cost.get(layer, 0.0))
        return {"forget": forget, "test": {"objects": {"top1": test, "top5": test, "count": 10}}}

    def evaluate(self):
        return self._summary()

    def probe(self, layer, step_size, direction, needs_tests=None):
        summary = self._summary(layer, step_size)
        if needs_tests is not None and not needs_tests({"forget": summary["forget"], "test": {}}):
            return {"forget": summary["forget"], "test": {}}
        self.tested += 1
        return summary

    def shift(self, changes):
        return self._summary()

    def reset(self, changes=()):
        return self._summary()


def _front(*names):
    # weight norm 10, gradient norm 1: each layer's first λ is 1
    return [LayerStats(name, "vision", 1.0, 0.1, 10.0, 1.0, front=1) for name in names]


def _search(editor, layers, **rule):
    fronts = {concept: _front(*layers) for concept in editor.crossings}
    gradients = {concept: {name: torch.ones(1) for name in layers} for concept in editor.crossings}
    return JointSearch(editor, fronts, gradients, SearchRule(metric="top1", **rule))


def _plain(probe):
    return dataclasses.replace(probe, seconds=0.0)


@pytest.mark.parametrize("floor", [0.0, 0.5])  # 0.5: no layer forgets and every forget accuracy ties at 0.5
def test_forget_first_chooses_as_the_full_search(floor):
    layers = ["a", "b", "c"]
    crossings = {"x": {"a": 37.0, "b": 5.5, "c": 80.0}} if not floor else {"x": {}}
    cost = {"a": 0.01, "b": 0.05, "c": 0.002}
    runs = {}
    for full in (True, False):
        editor = ScriptedEditor(crossings, cost, floor)
        search = _search(editor, layers, full_probes=full)
        runs[full] = (search.run(["x"]).chosen["x"], search.probes, editor.tested)
    (chosen_full, probes_full, tested_full), (chosen, probes, tested) = runs[True], runs[False]
    assert _plain(chosen) == _plain(chosen_full) and chosen.tested
    assert [(p.layer, p.step_size, p.forget_top1) for p in probes] == [
        (p.layer, p.step_size, p.forget_top1) for p in probes_full
    ]
    # the skipped probes are exactly those that did not forget (and were not needed to break a tie)
    skipped = [p for p in probes if not p.tested]
    assert skipped and all(p.forget_top1 > 0 and not p.test_top1 and math.isnan(p.utility) for p in skipped)
    assert tested == tested_full - len(skipped)
    for probe, full in zip(probes, probes_full):
        assert not probe.tested or probe.test_top1 == full.test_top1


def test_forget_first_keeps_every_concept_forgotten_in_the_rounds():
    # Two concepts, one layer each; the refinement keeps the other concept forgotten: a probe that brings it back
    # fails the forget test and skips its test sets, as it would count as not forgotten in the full search.
    crossings = {"x": {"a": 3.0, "b": 9.0}, "y": {"b": 2.0, "a": 50.0}}
    cost = {"a": 0.02, "b": 0.01}
    ends = {}
    for full in (True, False):
        search = _search(ScriptedEditor(crossings, cost), ["a", "b"], full_probes=full, refine_rounds=2)
        outcome = search.run(["x", "y"])
        ends[full] = ({c: _plain(p) for c, p in outcome.chosen.items()}, outcome.after, len(search.probes))
    assert ends[True] == ends[False]


def test_choose_refuses_untested_probes_its_rule_would_read():
    tested = Probe("x", "a", 0, 1.0, 0.1, 0.5, 0.5, {"objects": 0.9}, {"objects": 0.9})
    skipped = Probe("x", "a", 1, 2.0, 0.2, 0.5, 0.5, tested=False)
    forgot = Probe("x", "a", 2, 4.0, 0.4, 0.0, 0.0, {"objects": 0.3}, {"objects": 0.3})
    assert untested([tested, skipped], "top1") == [1] and untested([tested, skipped, forgot], "top1") == []
    assert choose([tested, skipped, forgot], "top1") is forgot
    with pytest.raises(ValueError, match=r"cannot rank probes \[1\]"):
        choose([tested, skipped], "top1")


# --- warm starts -------------------------------------------------------------------------------------------------


def _walk(search, crossing):
    probes = []
    while not search.done:
        probes.append((search.step_size, search.step_size >= crossing))
        search.update(probes[-1][1])
    return probes


def test_a_warm_start_makes_the_plain_searchs_forgotten_probes():
    # Wherever forget is monotone in λ: the same forgotten probes up to the plain search's first forgotten
    # doubling, and the same final bracket, from any skip; never more probes than the plain search plus its skip.
    rng = random.Random(0)
    for _ in range(300):
        crossing, steps = 2 ** rng.uniform(-3, 11), rng.randint(1, 10)
        plain = BinarySearch(1.0, steps)
        plain_probes = _walk(plain, crossing)
        for skip in range(steps):
            warm = BinarySearch(1.0, steps, skip=skip)
            probes = _walk(warm, crossing)
            assert warm.crossed == plain.crossed and (warm.low, warm.high) == (plain.low, plain.high)
            kept = [p for p in probes if p[1] and p[0] <= (warm.crossed or math.inf)]
            assert kept == [p for p in plain_probes if p[1]]
            assert set(probes) - set(plain_probes) <= {p for p in probes if p[1]}  # only halvings above it are new


def test_warm_start_state_round_trips_and_rejects_a_bad_skip():
    search = BinarySearch(1.0, 6, skip=4)
    search.update(True)  # forgot at 16: halving
    assert search.descending and search.step_size == 8.0
    again = BinarySearch(1.0, 6)
    again.load_state_dict(search.state_dict())
    assert (again.step_size, again.descending, again.steps) == (8.0, True, 3)
    for skip in (-1, 6, 1.5):
        with pytest.raises(ValueError, match=rf"skip must be an integer in \[0, max_steps=6\), got {skip!r}"):
            BinarySearch(1.0, 6, skip=skip)


def test_warm_start_chooses_as_the_plain_search_with_fewer_probes():
    layers = ["a", "b", "c", "d"]
    crossings = {"x": {"a": 37.0, "b": 20.0, "c": 45.0, "d": 300.0}}
    cost = {"a": 0.01, "b": 0.05, "c": 0.002, "d": 0.001}
    runs = {}
    for warm in (False, True):
        search = _search(ScriptedEditor(crossings, cost), layers, warm_start=warm)
        chosen = search.run(["x"]).chosen["x"]
        forgotten = {(p.layer, p.step_size) for p in search.probes if p.forget_top1 == 0.0}
        runs[warm] = (_plain(dataclasses.replace(chosen, step=0)), forgotten, len(search.probes))
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] >= runs[False][1]  # every forgotten probe of the plain search (and the halvings above)
    assert runs[True][2] < runs[False][2]


def test_warm_start_stays_out_of_searches_that_keep_other_concepts_forgotten():
    # Alone, layer b's search starts warm; keeping y forgotten, it starts at its first λ, 1.
    crossings = {"x": {"a": 37.0, "b": 20.0}, "y": {"a": 40.0, "b": 25.0}}
    for kept, first in (((), 32.0), (("y",), 1.0)):  # a first forgets at 64: b starts one doubling below
        search = _search(ScriptedEditor(crossings, {"a": 0.01, "b": 0.02}), ["a", "b"], warm_start=True)
        probes = search._search_front("x", kept, round_=1 if kept else 0)
        assert next(p.step_size for p in probes if p.layer == "b") == first


# --- the real evaluator: a 10-class world ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ten_classes(tmp_path_factory):
    root = tmp_path_factory.mktemp("ten")
    generator = torch.Generator().manual_seed(3)
    for set_name, classes, per_class in (("digits", DIGITS, 3), ("things", ["cup", "hat", "kite"], 4)):
        for name in classes:
            folder = root / set_name / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return [LabelledSet("digits", root=str(root / "digits")), LabelledSet("things", root=str(root / "things"))]


def _known_digit(tiny_clip, sets):
    datamodule = ZeroShotDataModule(sets, batch_size=8)
    datamodule.transform = tiny_clip.preprocess
    evaluator = ZeroShotEvaluator(tiny_clip.model, tiny_clip.tokenizer, datamodule)
    counts = evaluator.run()["digits"]
    return next(name for name, row in zip(evaluator.class_names("digits"), counts) if row[1]), datamodule


def test_evaluator_counts_the_forget_images_first(tiny_clip, ten_classes):
    target, datamodule = _known_digit(tiny_clip, ten_classes)
    evaluator = ZeroShotEvaluator(tiny_clip.model, tiny_clip.tokenizer, datamodule, keep_classes=[target])
    evaluator.run()
    index = evaluator.class_names("digits").index(target)
    parameters = dict(tiny_clip.model.named_parameters())
    for layer in ("visual.transformer.resblocks.1.mlp.c_fc.weight", "transformer.resblocks.0.attn.out_proj.weight"):
        original = parameters[layer].detach().clone()
        with torch.no_grad():
            parameters[layer].add_(0.5 * torch.randn_like(original))
        try:
            full = evaluator.run(layer)
            asked = []
            early = evaluator.run(layer, lambda counts, asked=asked: asked.append(counts) or False)
            complete = evaluator.run(layer, lambda counts: True)
        finally:
            with torch.no_grad():
                parameters[layer].copy_(original)
        # the forget images alone: only the set that holds them, and only their class's row counted
        assert list(early) == ["digits"] and asked[0] is early
        assert torch.equal(early["digits"][index], full["digits"][index])
        assert early["digits"].sum() == full["digits"][index].sum()
        # asked for the rest, the result is the full probe's
        assert all(torch.equal(complete[name], full[name]) for name in full)


def test_ten_classes_same_choices_with_forget_first(tiny_clip, ten_classes):
    target, _ = _known_digit(tiny_clip, ten_classes)
    model = tiny_clip.model
    names = candidate_layers(model.named_parameters())
    generator = torch.Generator().manual_seed(11)
    parameters = dict(model.named_parameters())
    forget = {n: torch.randn(parameters[n].shape, generator=generator) for n in names}
    retain = {n: torch.randn(parameters[n].shape, generator=generator) for n in names}
    store = GradientStore(forget={target: forget}, retain=retain, forget_samples={target: 1}, retain_samples=1)
    results = {}
    for full in (True, False):
        search = StepSearch(sets=ten_classes, metric="top1", max_steps=4, batch_size=8, apply=False, full_probes=full)
        results[full] = search.run(model, tiny_clip.tokenizer, tiny_clip.preprocess, store)
    full, first = results[True], results[False]
    assert _plain(first.chosen[target]) == _plain(full.chosen[target]) and first.after == full.after
    assert [(p.layer, p.step_size, p.forget_top1) for p in first.probes] == [
        (p.layer, p.step_size, p.forget_top1) for p in full.probes
    ]
    skipped = [i for i, p in enumerate(first.probes) if not p.tested]
    assert skipped and all(first.probes[i].forget_top1 > 0.0 for i in skipped)
    assert all(p.test_top1 == f.test_top1 for p, f in zip(first.probes, full.probes) if p.tested)
    assert first.settings["full_probes"] is False and full.settings["full_probes"] is True


def test_search_plot_and_csv_show_untested_probes(tmp_path):
    skipped = Probe("x", "visual.proj", 0, 1.0, 0.1, 0.5, 0.5, tested=False)
    forgot = Probe("x", "visual.proj", 1, 2.0, 0.2, 0.0, 0.0, {"objects": 0.7}, {"objects": 0.9})
    search_plot(tmp_path / "search.png", "x", [skipped, forgot], forgot)  # the first probe has no test sets
    assert (tmp_path / "search.png").stat().st_size > 0
    write_csv(tmp_path / "search.csv", *search_rows([skipped, forgot]))
    with open(tmp_path / "search.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["tested"], r["test_top1[objects]"]) for r in rows] == [("False", ""), ("True", "0.7")]


@pytest.mark.parametrize("option", ["full_probes", "warm_start"])
def test_step_search_rejects_a_non_boolean(option, ten_classes):
    with pytest.raises(ConfigError, match=rf"{option} must be true or false, got 'yes'"):
        StepSearch(sets=ten_classes, **{option: "yes"})


def test_paper_scale_projects_each_probe_by_the_images_it_evaluates(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    paper_scale = importlib.import_module("paper_scale")
    sizes = paper_scale.Sizes(forget_pairs=10, retain_pairs=30, identities=(4, 5), objects=(10, 3))  # 50 images
    # the full mode: 10 probes of 50 images took 100 s, 0.2 s per probe-image; the gradient pass 4 s, 0.1 s per pair
    row = {"_tested": 4, "_untested": 6}
    projected = paper_scale.project(row, 4.0, sizes, 100.0, 10)
    paper = paper_scale.PAPER
    assert projected["images evaluated"] == 4 * 50 + 6 * 5
    assert projected["paper search s"] == pytest.approx(0.2 * (4 * paper.images + 6 * paper.identities[1]))
    assert projected["paper gradient s"] == pytest.approx(0.1 * (paper.forget_pairs + paper.retain_pairs))
