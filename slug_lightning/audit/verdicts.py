"""Reading the audit's measures: how the concept's similarities moved, and one verdict line per concept.

Pure functions of numbers measured elsewhere (:mod:`slug_lightning.audit.measure`), so a report can recompute
them from its JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import Tensor

GONE = "gone under every probe tried"


def similarity_shift(
    before: Tensor,
    after: Tensor,
    names: Sequence[str],
    concepts: Sequence[str],
    lookalikes: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, dict]:
    """How each concept's text embedding moved against the images, from two similarity matrices.

    The matrices are ``ZeroShotEvaluator.similarity(set_name, names)`` of the model before and after the edit: row
    ``i`` is name ``i``'s text embedding, column ``j`` the normalised mean image embedding of class ``j``.

    Args:
        before: ``[n, n]`` cosines of the model before.
        after: ``[n, n]`` cosines of the model after.
        names: The rows' (and columns') class names.
        concepts: The forget concepts among ``names``.
        lookalikes: Concept → the names to average over (default: every name that is not a concept).

    Returns:
        ``{concept: {"own_before", "own_after", "lookalikes_before", "lookalikes_after", "lookalikes"}}``: the
        cosine of the concept's text with its own images, and the mean cosine of its text with each look-alike's
        images (NaN without look-alikes), before and after.

    Example::

        >>> import torch
        >>> before = torch.tensor([[0.9, 0.5, 0.3], [0.4, 0.8, 0.2], [0.1, 0.2, 0.7]])
        >>> after = torch.tensor([[0.2, 0.4, 0.0], [0.4, 0.8, 0.2], [0.1, 0.2, 0.7]])
        >>> shift = similarity_shift(before, after, ["Ann", "Bob", "Cy"], ["Ann"])["Ann"]
        >>> [round(shift[key], 2) for key in ("own_before", "own_after", "lookalikes_before", "lookalikes_after")]
        [0.9, 0.2, 0.4, 0.2]
    """
    names = list(names)
    if before.shape != (len(names), len(names)) or after.shape != before.shape:
        raise ValueError(
            f"Need two [{len(names)}, {len(names)}] matrices, got {tuple(before.shape)} and {tuple(after.shape)}."
        )
    result = {}
    for concept in concepts:
        row = names.index(concept)
        others = list(lookalikes[concept]) if lookalikes else [n for n in names if n not in concepts]
        columns = [names.index(name) for name in others]

        result[concept] = {
            "own_before": before[row, row].item(),
            "own_after": after[row, row].item(),
            "lookalikes_before": _mean(before, row, columns),
            "lookalikes_after": _mean(after, row, columns),
            "lookalikes": others,
        }
    return result


def _mean(matrix: Tensor, row: int, columns: list[int]) -> float:
    return matrix[row, columns].double().mean().item() if columns else math.nan


def _above(value: float, limit: float) -> bool:
    return not math.isnan(value) and value > limit


def recoveries(measures: Mapping, tolerance: float = 0.0, margin: float = 0.1, metric: str = "top1") -> list[str]:
    """Every probe under which a concept is back, one phrase each (empty: gone under all of them).

    Args:
        measures: One concept's measures, any of (a probe not measured is not tried):

            - ``"held_out"``: ``{top1, top5, count}``, forget accuracy under held-out templates;
            - ``"names"``: ``{name: {top1, top5, count}}``, forget accuracy with each alias or paraphrase;
            - ``"retrieval"``: ``{name: retrieval scores}``
              (:func:`~slug_lightning.audit.retrieval.retrieval_scores`);
            - ``"image_probe"``: :func:`~slug_lightning.audit.probe.image_probe`'s result.
        tolerance: The forget accuracy a concept may keep and still count as forgotten (the search's ``threshold``,
            METHOD §6).
        margin: How far above chance a search by name (its ``r_precision``) or the image probe (the concept's recall)
            may be before it counts as finding the concept; these measures sit at chance, not at zero, when the
            concept is gone.
        metric: ``"top1"`` or ``"top5"``, the forget accuracy compared with ``tolerance``.

    Returns:
        Phrases such as ``"recognised under held-out templates: forget top-1 0.25 (n=20)"``.
    """
    label = {"top1": "top-1", "top5": "top-5"}[metric]
    found = []
    held_out = measures.get("held_out")
    if held_out and _above(held_out[metric], tolerance):
        found.append(
            f"recognised under held-out templates: forget {label} {held_out[metric]:.2f} (n={held_out['count']})"
        )
    for name, result in measures.get("names", {}).items():
        if _above(result[metric], tolerance):
            found.append(f"recognised as {name!r}: forget {label} {result[metric]:.2f} (n={result['count']})")
    for name, scores in measures.get("retrieval", {}).items():
        if _above(scores["r_precision"] - scores["chance"], margin):
            found.append(
                f"found by searching {name!r}: R-precision {scores['r_precision']:.2f} vs chance "
                f"{scores['chance']:.2f} ({scores['n_relevant']} of {scores['n_images']} images)"
            )
    probe = measures.get("image_probe")
    if probe and _above(probe["concept_accuracy"] - probe["chance"], margin):
        found.append(
            f"told apart from {len(probe['classes']) - 1} look-alikes by a linear probe on image features: "
            f"recall {probe['concept_accuracy']:.2f} vs chance {probe['chance']:.2f} (n={probe['count']})"
        )
    return found


def probes_tried(measures: Mapping) -> list[str]:
    """The probes present in one concept's measures, as a verdict lists them."""
    tried = []
    if measures.get("held_out"):
        tried.append("held-out templates")
    if measures.get("names"):
        count = len(measures["names"])
        tried.append(f"{count} other name{'s' if count > 1 else ''}")
    if measures.get("retrieval"):
        tried.append("search by name")
    if measures.get("image_probe"):
        tried.append("image probe")
    return tried


def verdict(measures: Mapping, tolerance: float = 0.0, margin: float = 0.1, metric: str = "top1") -> str:
    """One line on whether a concept stays forgotten: :data:`GONE` and the probes tried, or every probe that brings
    it back (:func:`recoveries`, the same arguments).

    Example::

        >>> verdict({"held_out": {"top1": 0.0, "top5": 0.1, "count": 20}})
        'gone under every probe tried (held-out templates)'
        >>> verdict({"held_out": {"top1": 0.25, "top5": 0.5, "count": 20}})
        'recognised under held-out templates: forget top-1 0.25 (n=20)'
    """
    tried = probes_tried(measures)
    if not tried:
        return "no probe tried"
    found = recoveries(measures, tolerance, margin, metric)
    return "; ".join(found) if found else f"{GONE} ({', '.join(tried)})"
