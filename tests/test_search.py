"""The step-size search (METHOD §6) and the choice of the result (METHOD §7)."""

from __future__ import annotations

import copy
import math
import pickle

import pytest

from slug_lightning.search import (
    BinarySearch,
    Probe,
    choose,
    initial_step_size,
    is_forgotten,
    relative_change,
)


def run(search: BinarySearch, forgotten) -> list[float]:
    """Drive a search to the end with an oracle ``forgotten(λ) -> bool``; return the λ it proposed."""
    proposed = []
    while not search.done:
        proposed.append(search.step_size)
        search.update(forgotten(proposed[-1]))
    return proposed


def threshold_oracle(critical: float):
    """A model that forgets exactly when λ >= λ*."""
    return lambda step_size: step_size >= critical


# --- the search rule --------------------------------------------------------------------------------


def test_doubling_then_bisection_step_by_step():
    search = BinarySearch(initial=1.0, max_steps=10, tolerance=0.05)
    proposed = run(search, threshold_oracle(3.0))
    # 1 ✗ 2 ✗ 4 ✓ 3 ✓ 2.5 ✗ 2.75 ✗ 2.875 ✗ → bracket (2.875, 3], width 0.125/3 < 0.05: stop.
    assert proposed == [1.0, 2.0, 4.0, 3.0, 2.5, 2.75, 2.875]
    assert (search.low, search.high, search.steps) == (2.875, 3.0, 7)
    assert search.converged


@pytest.mark.parametrize("critical", [0.013, 0.7, 1.0, 3.3, 47.0, 1234.5])
@pytest.mark.parametrize("tolerance", [0.05, 0.2])
def test_search_brackets_the_critical_step_size(critical, tolerance):
    search = BinarySearch(initial=1.0, max_steps=100, tolerance=tolerance)
    run(search, threshold_oracle(critical))
    assert search.low < critical <= search.high
    assert (search.high - search.low) / search.high < tolerance
    assert search.converged and search.done


def test_max_steps_is_respected():
    search = BinarySearch(initial=1.0, max_steps=3, tolerance=0.01)
    assert run(search, threshold_oracle(3.0)) == [1.0, 2.0, 4.0]
    assert search.steps == 3 and search.done and not search.converged
    with pytest.raises(RuntimeError, match="done"):
        _ = search.step_size
    with pytest.raises(RuntimeError, match="done"):
        search.update(True)


def test_never_forgotten_keeps_doubling():
    search = BinarySearch(initial=0.5, max_steps=6)
    assert run(search, lambda _: False) == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert search.low == 16.0 and math.isinf(search.high)


def test_always_forgotten_keeps_halving():
    search = BinarySearch(initial=8.0, max_steps=5)
    assert run(search, lambda _: True) == [8.0, 4.0, 2.0, 1.0, 0.5]
    # The bracket stays [0, high]: its relative width is 1, so it never stops early.
    assert search.low == 0.0 and search.high == 0.5 and search.steps == 5


def test_non_monotone_answers_are_followed_not_assumed():
    answers = iter([False, True, False, True, False])
    search = BinarySearch(initial=1.0, max_steps=5, tolerance=0.01)
    assert run(search, lambda _: next(answers)) == [1.0, 2.0, 1.5, 1.75, 1.625]
    assert (search.low, search.high) == (1.625, 1.75)


def test_one_step_search():
    search = BinarySearch(initial=2.0, max_steps=1)
    assert run(search, lambda _: False) == [2.0]


def test_state_dict_round_trip_resumes_the_same_search():
    oracle = threshold_oracle(5.3)
    original = BinarySearch(initial=1.0, max_steps=12, tolerance=0.02)
    for _ in range(4):
        original.update(oracle(original.step_size))
    state = pickle.loads(pickle.dumps(original.state_dict()))  # as a checkpoint would carry it
    resumed = BinarySearch(initial=99.0, max_steps=2, tolerance=0.5)
    resumed.load_state_dict(copy.deepcopy(state))
    assert resumed.state_dict() == original.state_dict()
    assert run(resumed, oracle) == run(original, oracle)
    assert (resumed.low, resumed.high, resumed.steps) == (original.low, original.high, original.steps)


def test_state_dict_of_a_fresh_search_has_an_unbounded_bracket():
    state = BinarySearch(initial=1.0).state_dict()
    assert state["low"] == 0.0 and math.isinf(state["high"]) and state["steps"] == 0


def test_load_state_dict_rejects_bad_states():
    search = BinarySearch(initial=1.0)
    with pytest.raises(ValueError, match="lacks"):
        search.load_state_dict({"low": 0.0})
    bad = {**search.state_dict(), "low": 2.0, "high": 1.0}
    with pytest.raises(ValueError, match="Inconsistent"):
        search.load_state_dict(bad)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"initial": 0.0}, "initial step size .* got 0.0"),
        ({"initial": -1.0}, "initial step size .* got -1.0"),
        ({"initial": math.nan}, "initial step size .* got nan"),
        ({"initial": math.inf}, "initial step size .* got inf"),
        ({"initial": 1.0, "max_steps": 0}, "max_steps must be an integer >= 1, got 0"),
        ({"initial": 1.0, "max_steps": 2.5}, "max_steps must be an integer >= 1, got 2.5"),
        ({"initial": 1.0, "tolerance": 0.0}, r"tolerance must be in the open interval \(0, 1\), got 0.0"),
        ({"initial": 1.0, "tolerance": 1.0}, r"tolerance .* got 1.0"),
    ],
)
def test_invalid_search_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BinarySearch(**kwargs)


# --- step sizes -------------------------------------------------------------------------------------


def test_initial_step_size_moves_the_layer_by_ten_percent():
    step_size = initial_step_size(weight_norm=12.0, grad_norm=0.03)
    assert step_size == pytest.approx(40.0)
    assert relative_change(step_size, grad_norm=0.03, weight_norm=12.0) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "weight_norm, grad_norm, bad", [(1.0, 0.0, "grad_norm"), (0.0, 1.0, "weight_norm"), (1.0, math.nan, "grad_norm")]
)
def test_initial_step_size_needs_positive_norms(weight_norm, grad_norm, bad):
    with pytest.raises(ValueError, match=bad):
        initial_step_size(weight_norm, grad_norm)


# --- probes, the forget test and the choice -----------------------------------------------------------


def probe(layer="visual.proj", step=0, fa1=0.0, fa5=0.0, tests=(0.5,), change=0.1, concept="Elon Musk"):
    top1 = {f"set{i}": value for i, value in enumerate(tests)}
    return Probe(
        concept,
        layer,
        step,
        step_size=1.0,
        relative_change=change,
        forget_top1=fa1,
        forget_top5=fa5,
        test_top1=top1,
        test_top5={k: min(1.0, v + 0.2) for k, v in top1.items()},
    )


def test_probe_utility_and_forget_accuracy():
    p = probe(fa1=0.1, fa5=0.3, tests=(0.2, 0.4, 0.9))
    assert p.utility == pytest.approx(0.5)
    assert (p.forget_accuracy("top1"), p.forget_accuracy("top5")) == (0.1, 0.3)
    assert math.isnan(probe(tests=()).utility)
    with pytest.raises(ValueError, match="'top3'"):
        p.forget_accuracy("top3")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fa1": 1.5}, "forget_top1 .* got 1.5"),
        ({"fa5": math.nan}, "forget_top5 .* got nan"),
        ({"tests": (-0.1,)}, r"test_top1\['set0'\] .* got -0.1"),
        ({"change": -1.0}, "relative_change .* got -1.0"),
        ({"step": -1}, "step must be an integer >= 0, got -1"),
    ],
)
def test_probe_rejects_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        probe(**kwargs)


def test_is_forgotten():
    assert is_forgotten(0.0) and not is_forgotten(0.01)
    assert is_forgotten(0.05, threshold=0.05) and not is_forgotten(0.06, threshold=0.05)
    p = probe(fa1=0.0, fa5=0.2)
    assert is_forgotten(p, metric="top1") and not is_forgotten(p, metric="top5")
    with pytest.raises(ValueError, match="nan"):
        is_forgotten(math.nan)
    with pytest.raises(ValueError, match="threshold"):
        is_forgotten(0.0, threshold=2.0)


def test_choose_lowest_forget_accuracy_wins_over_utility():
    probes = [probe(fa5=0.2, tests=(0.9,)), probe(fa5=0.0, tests=(0.1,)), probe(fa5=0.1, tests=(0.8,))]
    assert choose(probes) is probes[1]


def test_choose_ties_in_forget_accuracy_go_to_utility():
    probes = [probe(layer="a", tests=(0.5, 0.5)), probe(layer="b", tests=(0.9, 0.3)), probe(layer="c", tests=(0.55,))]
    assert choose(probes) is probes[1]  # mean 0.6 beats 0.55 and 0.5


def test_choose_ties_in_utility_go_to_smaller_relative_change():
    probes = [probe(step=0, change=0.4), probe(step=1, change=0.2), probe(step=2, change=0.3)]
    assert choose(probes) is probes[1]


def test_choose_complete_ties_go_to_the_first():
    probes = [probe(layer="a"), probe(layer="b"), probe(layer="c")]
    assert choose(probes) is probes[0]


def test_choose_by_top1_or_top5():
    # a forgets by top-1 but not top-5; b forgets by top-5 (and so top-1) with lower utility.
    a = probe(layer="a", fa1=0.0, fa5=0.4, tests=(0.8,))
    b = probe(layer="b", fa1=0.0, fa5=0.0, tests=(0.6,))
    assert choose([a, b], metric="top5") is b
    assert choose([a, b], metric="top1") is a


def test_choose_ranks_unmeasured_utility_last():
    unmeasured, measured = probe(layer="a", tests=(), change=0.01), probe(layer="b", tests=(0.0,), change=0.5)
    assert choose([unmeasured, measured]) is measured
    assert choose([probe(tests=(), change=0.3), only := probe(tests=(), change=0.2)]) is only


def test_choose_errors():
    with pytest.raises(ValueError, match="none"):
        choose([])
    with pytest.raises(ValueError, match="'top10'"):
        choose([probe()], metric="top10")
    with pytest.raises(ValueError, match="several"):
        choose([probe(concept="a"), probe(concept="b")])
