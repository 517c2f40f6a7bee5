"""The relearning measure (issue 25): its target and step count on hand-made curves, the forget pairs it trains on,
and the fine-tuning itself on the tiny CLIP (a copy is trained, deterministically, and it does relearn)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from slug_lightning.concepts import Concept
from slug_lightning.datamodules import LaionDataModule
from slug_lightning.demo import make_demo_world
from slug_lightning.errors import ConfigError
from slug_lightning.relearn import (
    first_pairs,
    forget_pairs,
    pair_batches,
    relearn,
    relearn_target,
    relearning,
    steps_to_target,
)

K = 8  # forget pairs the tiny CLIP is fine-tuned on


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """14 pairs of each of 4 people (12 portraits, 2 with an object), a few object and scenery pairs, 2 shards."""
    return make_demo_world(
        tmp_path_factory.mktemp("world"),
        seed=0,
        people=4,
        objects=2,
        portraits_per_person=12,
        person_object_per_person=2,
        samples_per_object=4,
        scenery_samples=4,
        eval_per_person=1,
        eval_per_object=1,
        shards=2,
    )


def _datamodule(world, tiny_clip, batch_size: int) -> LaionDataModule:
    data = LaionDataModule(world.shards, concepts=[Concept(world.default_target)], batch_size=batch_size)
    data.transform, data.tokenizer = tiny_clip.preprocess, tiny_clip.tokenizer
    return data


@pytest.fixture(scope="module")
def pairs(world, tiny_clip):
    return forget_pairs(_datamodule(world, tiny_clip, batch_size=3), world.default_target, K)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _retrieval_top1(pairs):
    """A forget top-1 measured on the pairs themselves: how many images pick their own caption among the k."""

    def evaluate(model) -> float:
        images = F.normalize(model.encode_image(pairs["image"]), dim=-1)
        texts = F.normalize(model.encode_text(pairs["text"]), dim=-1)
        return ((images @ texts.T).argmax(dim=1) == torch.arange(len(images))).float().mean().item()

    return evaluate


def _scripted(values):
    """An evaluate_forget that ignores the model and reports ``values`` in turn; ``calls`` counts the calls."""
    script = iter(values)

    def evaluate(model) -> float:
        evaluate.calls += 1
        return next(script)

    evaluate.calls = 0
    return evaluate


# --------------------------------------------------------------------------------------------------
# Pure pieces


def test_the_target_is_half_the_base_forget_top1():
    assert relearn_target(1.0) == 0.5
    assert relearn_target(0.3) == pytest.approx(0.15)
    assert relearn_target(0.0) == 0.0  # a concept the base never knew is "relearned" at once


@pytest.mark.parametrize(
    ("curve", "target", "every", "expected"),
    [
        ([0.0, 0.1, 0.5, 0.9], 0.5, 1, 2),  # at the target counts
        ([0.0, 0.1, 0.49, 0.2], 0.5, 1, None),  # never reached within the curve (the budget)
        ([0.6, 0.0], 0.5, 1, 0),  # the model before fine-tuning already there
        ([0.0, 0.7, 0.1], 0.5, 1, 1),  # the first time, even if it falls back
        ([0.0, 0.2, 0.6], 0.5, 8, 16),  # one value every 8 steps
        ([math.nan, 0.6], 0.5, 1, 1),  # NaN (no images) never reaches it
        ([0.0, 1.0], None, 1, None),  # no target: never reached
        ([], 0.5, 1, None),
    ],
)
def test_steps_to_target_is_the_first_step_at_or_above_it(curve, target, every, expected):
    assert steps_to_target(curve, target, every) == expected


def test_first_pairs_takes_the_first_k_across_batches_in_order():
    batches = [{"image": torch.arange(n, n + 3.0)[:, None], "text": torch.arange(n, n + 3)[:, None]} for n in (0, 3, 6)]
    taken = first_pairs(iter(batches), 5)
    assert taken["text"].flatten().tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(taken["image"].flatten(), torch.arange(5.0))
    with pytest.raises(ValueError, match="holds 9 pair"):
        first_pairs(iter(batches), 10)


def test_each_pass_over_the_pairs_is_a_seeded_permutation_in_full_batches():
    batches = pair_batches(7, 3, seed=5)
    passes = [[next(batches) for _ in range(2)] for _ in range(4)]  # 2 batches of 3 per pass; one pair left out
    for one_pass in passes:
        rows = torch.cat(one_pass).tolist()
        assert len(rows) == len(set(rows)) == 6 and set(rows) <= set(range(7))
    again = pair_batches(7, 3, seed=5)
    assert all(torch.equal(b, next(again)) for one_pass in passes for b in one_pass)


# --------------------------------------------------------------------------------------------------
# The forget pairs


def test_forget_pairs_are_the_first_k_in_stream_order_whatever_the_batch_size(world, tiny_clip, pairs):
    data = _datamodule(world, tiny_clip, batch_size=64)
    everything = next(iter(data.forget_dataloader(data.concepts[0])))
    assert everything["image"].shape[0] == data.count_pairs(data.concepts[0]) > K
    assert torch.equal(pairs["image"], everything["image"][:K])
    assert torch.equal(pairs["text"], everything["text"][:K])
    by_name = forget_pairs(data, world.default_target, K)
    assert all(torch.equal(by_name[key], pairs[key]) for key in ("image", "text"))


# --------------------------------------------------------------------------------------------------
# relearn: the step count, the budget, the copy


def test_the_step_count_is_the_first_evaluation_at_or_above_the_target(tiny_clip, pairs):
    script = [0.0, 0.1, 0.3, 0.5, 0.9, 1.0]
    evaluate = _scripted(script)
    result = relearn(tiny_clip.model, pairs, evaluate, target=0.5, max_steps=10, lr=1e-4)
    assert result["steps"] == 3
    assert result["curve"] == script[:4]  # it stops at the target
    assert len(result["loss"]) == 3 and evaluate.calls == 4
    assert result | {"curve": None, "loss": None} == {
        "k": K,
        "steps": 3,
        "budget": 10,
        "every": 1,
        "batch_size": K,
        "target": 0.5,
        "curve": None,
        "loss": None,
    }


def test_the_step_count_counts_steps_when_evaluating_every_few_steps(tiny_clip, pairs):
    result = relearn(tiny_clip.model, pairs, _scripted([0.0, 0.2, 0.6]), target=0.5, max_steps=8, every=2, lr=1e-4)
    assert result["steps"] == 4
    assert result["curve"] == [0.0, 0.2, 0.6] and len(result["loss"]) == 4


def test_none_when_the_budget_runs_out(tiny_clip, pairs):
    evaluate = _scripted([0.0, 0.1, 0.2, 0.3, 0.9])
    result = relearn(tiny_clip.model, pairs, evaluate, target=0.5, max_steps=3, lr=1e-4)
    assert result["steps"] is None and result["budget"] == 3
    assert result["curve"] == [0.0, 0.1, 0.2, 0.3] and len(result["loss"]) == 3


def test_a_model_already_at_the_target_takes_no_step(tiny_clip, pairs):
    result = relearn(tiny_clip.model, pairs, _scripted([0.7]), target=0.5, max_steps=5, lr=1e-4)
    assert result["steps"] == 0 and result["curve"] == [0.7] and result["loss"] == []


def test_relearn_leaves_the_model_passed_in_untouched(tiny_clip, pairs):
    model = tiny_clip.model
    before, grads, training = _state(model), [p.requires_grad for p in model.parameters()], model.training
    seen = []
    result = relearn(model, pairs, lambda m: seen.append(m) or 0.0, target=1.0, max_steps=3, lr=1e-3, batch_size=4)
    assert result["steps"] is None and len(result["loss"]) == 3
    assert all(m is not model for m in seen)  # the copy is evaluated and trained
    after = model.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert [p.requires_grad for p in model.parameters()] == grads and model.training == training
    assert all(p.grad is None for p in model.parameters())
    tuned = seen[-1].state_dict()  # while the copy did move (all but the logit scale)
    assert not torch.equal(
        tuned["transformer.resblocks.0.mlp.c_fc.weight"], before["transformer.resblocks.0.mlp.c_fc.weight"]
    )
    assert torch.equal(tuned["logit_scale"], before["logit_scale"])


def test_the_same_seed_gives_the_same_curve(tiny_clip, pairs):
    settings = {"target": None, "max_steps": 4, "lr": 1e-3, "batch_size": 4, "seed": 3}
    first = relearn(tiny_clip.model, pairs, _retrieval_top1(pairs), **settings)
    second = relearn(tiny_clip.model, pairs, _retrieval_top1(pairs), **settings)
    assert first["curve"] == second["curve"] and first["loss"] == second["loss"]
    assert len(first["curve"]) == 5


@pytest.mark.parametrize(
    ("settings", "option"),
    [
        ({"batch_size": 1}, "batch_size"),
        ({"batch_size": K + 1}, "batch_size"),
        ({"max_steps": 5, "every": 2}, "every"),
        ({"every": 0}, "every"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_settings_that_make_the_count_meaningless_are_refused(tiny_clip, pairs, settings, option):
    with pytest.raises(ConfigError) as raised:
        relearn(tiny_clip.model, pairs, _scripted([0.0]), target=0.5, **{"max_steps": 4, **settings})
    assert raised.value.option == option


# --------------------------------------------------------------------------------------------------
# A real (tiny) case: a language layer wrecked by a large random edit, fine-tuned on the concept's pairs


def test_fine_tuning_on_the_forget_pairs_relearns_them(tiny_clip, pairs):
    edited = copy.deepcopy(tiny_clip.model)
    weight = dict(edited.named_parameters())["transformer.resblocks.1.mlp.c_proj.weight"]
    with torch.no_grad():
        weight.add_(10 * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    result = relearn(edited, pairs, _retrieval_top1(pairs), target=None, max_steps=20, lr=5e-4)
    # The contrastive loss on the pairs (all of them in every step) falls far below its start, log(8) or so (on three
    # edits it fell from 2.2-2.3 to 0.2-0.4), ...
    assert result["loss"][-1] < 0.5 * result["loss"][0]
    # ... and the images find their own captions again: from 1 of 8 to 7 of 8 on those edits.
    assert steps_to_target(result["curve"], 0.5) is not None and result["curve"][-1] > result["curve"][0]


# --------------------------------------------------------------------------------------------------
# relearning: both models, every k


def _by_role(base_values, unlearned_step):
    """An evaluate_forget for models tagged with a ``role``: the base reports ``base_values`` at its n-th evaluation,
    each copy of the unlearned model ``unlearned_step * n`` at its n-th, counted per model."""
    counts: dict[int, int] = {}
    held = []  # keeps every model alive, so that no two share an id

    def evaluate(model) -> float:
        held.append(model)
        n = counts[id(model)] = counts.get(id(model), -1) + 1
        return base_values[min(n, len(base_values) - 1)] if model.role == "base" else unlearned_step * n

    return evaluate


@pytest.mark.parametrize(("max_steps", "steps"), [(6, 4), (3, None)])
def test_relearning_counts_the_unlearned_steps_and_fine_tunes_the_base_as_long(tiny_clip, pairs, max_steps, steps):
    base, unlearned = copy.deepcopy(tiny_clip.model), copy.deepcopy(tiny_clip.model)
    base.role, unlearned.role = "base", "unlearned"
    before = _state(unlearned)
    result = relearning(
        base, unlearned, pairs, _by_role([0.8, 0.75], 0.125), ks=(4, K), max_steps=max_steps, lr=1e-4, batch_size=6
    )
    assert result["base_forget_top1"] == 0.8 and result["target"] == 0.4 and result["budget"] == max_steps
    assert [run["k"] for run in result["runs"]] == [4, K]
    assert [run["batch_size"] for run in result["runs"]] == [4, 6]  # capped at k
    ran = max_steps if steps is None else steps
    for run in result["runs"]:
        assert run["steps"] == steps and len(run["loss"]) == ran
        assert run["reference"] == {"steps": ran, "forget_top1_before": 0.8, "forget_top1_after": 0.75}
    assert all(torch.equal(unlearned.state_dict()[name], tensor) for name, tensor in before.items())


def test_relearning_needs_max_k_pairs(tiny_clip, pairs):
    with pytest.raises(ValueError, match="at least max"):
        relearning(tiny_clip.model, tiny_clip.model, pairs, _scripted([0.5]), ks=(4, K + 1))
