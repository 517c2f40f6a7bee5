"""The relearning measure of an audit: how few forget pairs and fine-tuning steps bring a concept back.

:func:`~slug_lightning.relearn.relearning` does the fine-tuning; this module gives it the concept's images and the
forget top-1 the search reads (:func:`forget_top1`), keeps the ``k`` a concept's pairs allow (:func:`fitting_ks`),
and words the verdict's relearning phrase (:func:`relearn_clause`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from slug_lightning.audit.prompts import AuditEvaluator
from slug_lightning.relearn import relearning
from slug_lightning.zero_shot import image_features, zero_shot_classifier


def concept_images(evaluator: AuditEvaluator, set_name: str, index: int) -> Tensor:
    """The preprocessed images ``[n, C, H, W]`` of class ``index`` of a set, on the CPU, in the set's order."""
    dataset = evaluator.datasets[set_name]
    chosen = [i for i, target in enumerate(dataset.targets) if target == index]
    return torch.stack([dataset[i][0] for i in chosen]) if chosen else torch.empty(0)


def forget_top1(
    images: Tensor, index: int, class_names: Sequence[str], templates: Sequence[str], tokenizer, device, chunk=256
) -> Callable[[nn.Module], float]:
    """A ``model -> forget top-1`` of one concept, as the search reads it: the share of the concept's ``images``
    whose best class, among the set's ``class_names`` under its ``templates``, is the concept (``index``). Both
    towers run on every call (the model is being fine-tuned)."""

    def evaluate(model: nn.Module) -> float:
        if images.shape[0] == 0:
            return math.nan
        classifier = zero_shot_classifier(model, tokenizer, class_names, templates, device)
        hits = 0
        for start in range(0, images.shape[0], chunk):
            features = image_features(model, images[start : start + chunk].to(device))
            hits += int(((features @ classifier).argmax(dim=1) == index).sum())
        return hits / images.shape[0]

    return evaluate


def fitting_ks(ks: Sequence[int], available: int) -> tuple[list[int], list[int]]:
    """The ``ks`` a concept's forget pairs allow (2 to ``available``: a contrastive step needs two pairs), and the
    rest.

    Example::

        >>> fitting_ks([4, 16, 64], 20)
        ([4, 16], [64])
    """
    kept = [k for k in ks if 2 <= k <= available]
    return kept, [k for k in ks if k not in kept]


def relearning_measure(
    base: nn.Module,
    unlearned: nn.Module,
    pairs: Mapping[str, Tensor],
    evaluate: Callable[[nn.Module], float],
    ks: Sequence[int],
    steps: int,
    lr: float,
    every: int,
    count: int,
) -> dict:
    """:func:`~slug_lightning.relearn.relearning` on the ``ks`` the pairs allow, with what was left out said.

    Returns:
        ``relearning``'s result plus ``"count"`` (the concept's images the forget top-1 is measured on),
        ``"pairs"`` (forget pairs available, up to ``max(ks)``), ``"lr"``, and ``"left_out"`` with a ``"note"``
        when some ``k`` did not fit; ``{"skipped": reason, ...}`` when none did.
    """
    available = int(pairs["image"].shape[0])
    kept, left_out = fitting_ks(ks, available)
    every = max(1, min(every, steps)) if steps else 1
    steps = steps - steps % every
    facts = {"count": count, "pairs": available, "lr": lr, "every": every}
    if not kept:
        return {**facts, "skipped": f"only {available} forget pair(s); relearning needs k >= 2", "runs": []}
    result = relearning(base, unlearned, pairs, evaluate, kept, max_steps=steps, lr=lr, every=every)
    result.update(facts)
    if left_out:
        result["left_out"] = left_out
        result["note"] = (
            f"only {available} forget pairs: relearned on k = {', '.join(map(str, kept))}, "
            f"left out k = {', '.join(map(str, left_out))}"
        )
    return result


def relearn_clause(measure: Mapping) -> str | None:
    """The verdict's relearning phrase: the fewest pairs whose fine-tuning brought the concept back to half its
    base forget top-1, and in how many steps; None when no run got there (or none ran)."""
    reached = [run for run in measure.get("runs", []) if run.get("steps") is not None]
    if not reached:
        return None
    run = min(reached, key=lambda r: (r["k"], r["steps"]))
    if run["steps"] == 0:
        return f"at half its base forget top-1 ({measure['target']:.2f}, n={measure['count']}) before any relearning"
    return (
        f"relearned to half its base forget top-1 ({measure['target']:.2f}, n={measure['count']}) "
        f"in {run['steps']} step(s) of fine-tuning on {run['k']} forget pairs"
    )
