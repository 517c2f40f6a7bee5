"""Relearning (part of the audit, "does it stay forgotten?"): fine-tune an unlearned model on a few forget pairs.

Starting from the unlearned model, :func:`relearn` fine-tunes a copy with the contrastive loss of ``fit``
(:func:`~slug_lightning.losses.retain_loss_sum`) on the first ``k`` forget pairs of a concept, evaluates the forget
top-1 as it goes, and counts the optimizer steps until it is back at half the base model's value
(:func:`relearn_target`). :func:`relearning` does so for several ``k`` (4, 16, 64 by default, the same small budget
for every method) and puts the base model beside it as the reference. The fine-tuning is plain: AdamW at a fixed
learning rate, no schedule, every parameter but the logit scale trained, the model in eval mode (no dropout), as the
baselines train (:func:`~slug_lightning.baselines.trained_parameters`).

The step count and the target are pure functions (:func:`relearn_target`, :func:`steps_to_target`); the forget
evaluation is the caller's ``evaluate_forget(model) -> float`` (e.g. a zero-shot forget top-1 from
:mod:`slug_lightning.evaluation`), and the pairs come from a ``LaionDataModule`` (:func:`forget_pairs`).
Everything runs in one process, on the device the model is on.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from slug_lightning.audit.settings import DEFAULT_KS
from slug_lightning.baselines import trained_parameters
from slug_lightning.concepts import Concept
from slug_lightning.errors import ConfigError
from slug_lightning.losses import retain_loss_sum

if TYPE_CHECKING:
    from slug_lightning.datamodules import LaionDataModule


def relearn_target(base_forget_top1: float) -> float:
    """The forget top-1 at which a concept counts as relearned: half the base model's.

    Example::

        >>> relearn_target(0.9)
        0.45
    """
    return base_forget_top1 / 2


def steps_to_target(curve: Sequence[float], target: float | None, every: int = 1) -> int | None:
    """The first step count at which the forget top-1 is at or above ``target``.

    Args:
        curve: Forget top-1 values; ``curve[i]`` is measured after ``i * every`` optimizer steps, so ``curve[0]`` is
            the model before any fine-tuning.
        target: The value to reach (:func:`relearn_target`); None is never reached.
        every: Optimizer steps between two values of ``curve``.

    Returns:
        ``i * every`` for the first ``i`` with ``curve[i] >= target``; None when no value reaches it (the budget,
        the length of the curve, ran out). NaN never reaches it.

    Example::

        >>> steps_to_target([0.0, 0.1, 0.5, 0.9], 0.45), steps_to_target([0.0, 0.1, 0.5], 0.45, every=4)
        (2, 8)
        >>> steps_to_target([0.0, 0.2], 0.45) is None
        True
    """
    if target is None:
        return None
    return next((i * every for i, value in enumerate(curve) if value >= target), None)


def first_pairs(batches: Iterable[Mapping[str, Tensor]], k: int, exact: bool = True) -> dict[str, Tensor]:
    """The first ``k`` pairs of a stream of batches, in stream order: ``{"image": [k, C, H, W], "text": [k, L]}``.

    Args:
        batches: Batches with ``"image"`` and ``"text"`` rows, as ``LaionDataModule``'s loaders yield them. Reading
            stops at the batch that completes ``k`` pairs.
        k: How many pairs.
        exact: Refuse a stream with fewer than ``k`` pairs; otherwise return all it holds (none: empty tensors).

    Raises:
        ValueError: ``k < 1``, or (``exact``) the stream holds fewer than ``k`` pairs.

    Example::

        >>> batches = [{"image": torch.arange(3.0), "text": torch.arange(3)}, {"image": torch.arange(3.0, 6.0),
        ...            "text": torch.arange(3, 6)}]
        >>> first_pairs(batches, 4)["text"].tolist()
        [0, 1, 2, 3]
    """
    if k < 1:
        raise ValueError(f"k must be a number of pairs >= 1, got {k}.")
    images, texts, held = [], [], 0
    for batch in batches:
        take = min(k - held, batch["image"].shape[0])
        images.append(batch["image"][:take])
        texts.append(batch["text"][:take])
        held += take
        if held == k:
            break
    if held < k and exact:
        raise ValueError(f"The forget stream holds {held} pair(s), fewer than the k={k} asked for.")
    if not images:
        return {"image": torch.empty(0), "text": torch.empty(0, dtype=torch.long)}
    return {"image": torch.cat(images), "text": torch.cat(texts)}


def forget_pairs(datamodule: LaionDataModule, concept: Concept | str, k: int) -> dict[str, Tensor]:
    """The first ``k`` forget pairs of ``concept`` in the stream order of ``datamodule.forget_dataloader``.

    Forget streams are never shuffled, so these are the same pairs in every run, whatever the batch size. The
    datamodule needs its ``transform`` and ``tokenizer`` (the model's ``preprocess`` and ``tokenizer``) and no
    multi-process trainer (each rank would get only its share of the stream).

    Args:
        datamodule: The run's ``LaionDataModule``.
        concept: The concept, or its name (looked up in ``datamodule.concepts`` for its aliases).
        k: How many pairs.

    Returns:
        ``{"image": FloatTensor[k, C, H, W], "text": LongTensor[k, context_length]}`` on the CPU.

    Raises:
        ValueError: The concept has fewer than ``k`` forget pairs.
    """
    if isinstance(concept, str):
        concept = next((c for c in datamodule.concepts if c.name == concept), None) or Concept(concept)
    return first_pairs(datamodule.forget_dataloader(concept), k)


def pair_batches(k: int, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Indices of the pairs each optimizer step trains on, without end: every pass over the ``k`` pairs is a fresh
    permutation drawn from ``seed``, cut into ``k // batch_size`` batches (the rest of a pass is left out, so no
    batch is short or holds a pair twice).

    Example::

        >>> batches = pair_batches(5, 2, seed=0)
        >>> [sorted(next(batches).tolist()) for _ in range(4)]  # two batches per pass of 5 pairs
        [[0, 4], [1, 3], [3, 4], [0, 1]]
    """
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(k, generator=generator)
        for start in range(0, k - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _check(k: int, batch_size: int, max_steps: int, every: int, lr: float) -> None:
    """Refuse settings under which the step count means nothing."""
    if not 2 <= batch_size <= k:
        raise ConfigError(
            f"batch_size must be between 2 (a contrastive loss needs negatives) and k={k}, got {batch_size}.",
            "batch_size",
            batch_size,
        )
    if every < 1 or max_steps < 0 or max_steps % every:
        raise ConfigError(
            f"max_steps must be a multiple of every >= 1 (evaluations at 0, every, 2*every, ... max_steps), got "
            f"max_steps={max_steps}, every={every}.",
            "max_steps" if max_steps < 0 else "every",
            max_steps if max_steps < 0 else every,
        )
    if not lr > 0:
        raise ConfigError(f"lr must be a positive learning rate, got {lr!r}.", "lr", lr)


def _optimizer(parameters: Mapping[str, nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW as ``fit`` builds it: weight decay on matrices only (not gains, biases or embeddings)."""
    is_matrix = {name: p.ndim >= 2 and "embedding" not in name for name, p in parameters.items()}
    groups = [
        {"params": [p for n, p in parameters.items() if is_matrix[n]], "weight_decay": weight_decay},
        {"params": [p for n, p in parameters.items() if not is_matrix[n]], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


def relearn(
    model: nn.Module,
    pairs: Mapping[str, Tensor],
    evaluate_forget: Callable[[nn.Module], float],
    *,
    target: float | None,
    max_steps: int = 64,
    lr: float = 1e-5,
    batch_size: int | None = None,
    seed: int = 0,
    every: int = 1,
    weight_decay: float = 0.1,
) -> dict:
    """Fine-tune a copy of ``model`` on ``pairs`` with the contrastive loss of ``fit`` until its forget top-1 reaches
    ``target`` or ``max_steps`` optimizer steps are spent.

    ``model`` itself is never changed: a deep copy is trained (the model's memory twice over). The copy is
    evaluated before the first step and after every ``every`` steps; a step trains on ``batch_size`` of the pairs
    (:func:`pair_batches`), the CLIP loss averaged over them, negatives from the same batch. The run is
    deterministic given ``seed`` (it decides the batches when ``batch_size < k``) on the same hardware.

    Args:
        model: A CLIP (``encode_image``, ``encode_text``, ``logit_scale``); it is trained where it is.
        pairs: ``{"image": [k, C, H, W], "text": [k, L]}``, preprocessed and tokenized (:func:`forget_pairs`).
        evaluate_forget: The forget top-1 of a model, e.g. a zero-shot accuracy on the concept's images; called
            under ``torch.no_grad`` with the copy being trained.
        target: Stop once the forget top-1 is at or above this (:func:`relearn_target`); None runs the whole budget.
        max_steps: The budget of optimizer steps (0: only evaluate); a multiple of ``every``.
        lr: AdamW's learning rate, fixed. The default suits a pretrained CLIP; the demo's tiny one (``runs/demo``)
            relearned its forgotten person in 4 (k=64) and 9 (k=16) steps at 1e-4.
        batch_size: Pairs per step, 2 to k; None: all k pairs in every step.
        seed: Seed of the batch order.
        every: Optimizer steps between two evaluations.
        weight_decay: AdamW's weight decay of matrices.

    Returns:
        ``{"k", "steps", "budget", "every", "batch_size", "target", "curve", "loss"}``: ``steps`` is
        :func:`steps_to_target` of ``curve`` (None: not reached within ``budget = max_steps``); ``curve[i]`` the
        forget top-1 after ``i * every`` steps; ``loss[s]`` the training loss of step ``s + 1``, on its batch
        before the update.

    Raises:
        ConfigError: ``batch_size`` outside [2, k], ``max_steps`` not a multiple of ``every``, or ``lr <= 0``.
        FloatingPointError: The loss is not finite (lower the learning rate).
    """
    k = pairs["image"].shape[0]
    batch_size = k if batch_size is None else batch_size
    _check(k, batch_size, max_steps, every, lr)
    tuned = copy.deepcopy(model).eval()
    parameters = trained_parameters(tuned)
    for name, parameter in tuned.named_parameters():
        parameter.requires_grad_(name in parameters)
    device = next(iter(parameters.values())).device
    images, texts = pairs["image"].to(device), pairs["text"].to(device)
    optimizer = _optimizer(parameters, lr, weight_decay)
    batches = pair_batches(k, batch_size, seed)

    def measure() -> float:
        with torch.no_grad():
            return float(evaluate_forget(tuned))

    curve, losses = [measure()], []
    for step in range(1, max_steps + 1):
        if steps_to_target(curve[-1:], target) is not None:  # reached at the last evaluation
            break
        rows = next(batches).to(device)
        with torch.enable_grad():
            features = tuned.encode_image(images[rows]), tuned.encode_text(texts[rows])
            loss = retain_loss_sum(*features, tuned.logit_scale, gather=False) / len(rows)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"relearn: the loss is {loss.item()} at step {step}; lower the learning rate.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % every == 0:
            curve.append(measure())
    return {
        "k": k,
        "steps": steps_to_target(curve, target, every),
        "budget": max_steps,
        "every": every,
        "batch_size": batch_size,
        "target": target,
        "curve": curve,
        "loss": losses,
    }


def relearning(
    base: nn.Module,
    unlearned: nn.Module,
    pairs: Mapping[str, Tensor],
    evaluate_forget: Callable[[nn.Module], float],
    ks: Sequence[int] = DEFAULT_KS,
    *,
    max_steps: int = 64,
    lr: float = 1e-5,
    batch_size: int | None = None,
    seed: int = 0,
    every: int = 1,
    weight_decay: float = 0.1,
) -> dict:
    """The relearning measure: for each ``k``, the steps :func:`relearn` needs to bring the unlearned model's forget
    top-1 back to half the base model's, on the first ``k`` of ``pairs``.

    The reference is the base model under the same fine-tuning: a step count of its own would be 0 (it already
    knows the concept), so it is fine-tuned on the same ``k`` pairs for as many steps as the unlearned model ran
    (its count, or the whole budget when it did not get there), and its forget top-1 before and after is reported,
    which shows how much the fine-tuning itself moves a concept the model knows. (It can move it a lot: with only one
    concept's pairs in a batch the contrastive loss pushes them apart; on ``runs/demo`` at lr 1e-4, 20 steps on 4
    pairs took the base model's forget top-1 from 1.0 to 0.0.)

    Args:
        base: The model before unlearning; not changed.
        unlearned: The model after unlearning; not changed.
        pairs: At least ``max(ks)`` forget pairs, in stream order (:func:`forget_pairs`); run ``k`` uses the first k.
        evaluate_forget: The forget top-1 of a model (as for :func:`relearn`).
        ks: The numbers of pairs to fine-tune on.
        max_steps, lr, batch_size, seed, every, weight_decay: As for :func:`relearn`, the same for every ``k`` and
            both models; ``batch_size`` is capped at ``k`` (None: all k pairs in every step).

    Returns:
        ``{"base_forget_top1", "target", "budget", "runs"}`` with one run per ``k``: :func:`relearn`'s result for
        the unlearned model plus ``"reference": {"steps", "forget_top1_before", "forget_top1_after"}`` for the base.

    Raises:
        ValueError: ``pairs`` holds fewer than ``max(ks)`` pairs; settings :func:`relearn` refuses.
    """
    available = pairs["image"].shape[0]
    if not ks or max(ks) > available:
        raise ValueError(f"relearning needs at least max(ks) forget pairs; ks={list(ks)}, pairs: {available}.")
    with torch.no_grad():
        base_top1 = float(evaluate_forget(base))
    target = relearn_target(base_top1)
    settings = {"lr": lr, "seed": seed, "weight_decay": weight_decay}
    runs = []
    for k in ks:
        subset = {"image": pairs["image"][:k], "text": pairs["text"][:k]}
        settings["batch_size"] = k if batch_size is None else min(batch_size, k)
        run = relearn(unlearned, subset, evaluate_forget, target=target, max_steps=max_steps, every=every, **settings)
        ran = max_steps if run["steps"] is None else run["steps"]
        reference = relearn(base, subset, evaluate_forget, target=None, max_steps=ran, every=ran or 1, **settings)
        run["reference"] = {
            "steps": ran,
            "forget_top1_before": reference["curve"][0],
            "forget_top1_after": reference["curve"][-1],
        }
        runs.append(run)
    return {"base_forget_top1": base_top1, "target": target, "budget": max_steps, "runs": runs}
