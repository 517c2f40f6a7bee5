"""Search by name: does a text query with the concept's name still find its images?

The text→image direction of CLIP retrieval. The query is the concept's name filled into templates and embedded as
a zero-shot class vector (METHOD §8: prompts normalised, averaged, normalised again); it ranks every evaluation
image of the concept's set by cosine, and the scores say where the concept's own images land.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from slug_lightning.audit.prompts import AuditEvaluator, held_out_templates
from slug_lightning.zero_shot import zero_shot_classifier

RECALL_AT = (1, 5, 10)


def retrieval_scores(query: Tensor, features: Tensor, relevant: Tensor, ks: Sequence[int] = RECALL_AT) -> dict:
    """How one text query ranks a set of images, the relevant ones against the rest.

    The images are ranked by ``features @ query``, best first; equal scores keep the images' order. Ranks are
    1-based. With ``n = n_images`` and ``r = n_relevant``:

    - ``recall@k``: 1.0 if any relevant image is among the first ``min(k, n)`` results, else 0.0 (one query, so
      this is the hit rate of the standard text→image recall@k);
    - ``precision@k``: the share of the first ``min(k, n)`` results that are relevant;
    - ``r_precision``: the share of the first ``r`` results that are relevant (1.0 when they are exactly the
      relevant images);
    - ``mean_rank``: the mean rank of the relevant images ((n + 1) / 2 in expectation for a random ranking);
    - ``chance``: r / n, the expected ``precision@k`` and ``r_precision`` of a random ranking.

    Args:
        query: The query's embedding ``[d]``.
        features: The images' embeddings ``[n, d]`` (normalised, so the scores are cosines).
        relevant: ``[n]`` booleans, the concept's images.
        ks: The cut-offs of ``recall@k`` and ``precision@k``.

    Returns:
        ``{"recall@k", "precision@k" for each k, "r_precision", "mean_rank", "chance", "n_images",
        "n_relevant"}``.

    Raises:
        ValueError: If the shapes disagree or no image is relevant.

    Example::

        >>> features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
        >>> scores = retrieval_scores(torch.tensor([1.0, 0.0]), features, torch.tensor([False, True, True, False]),
        ...                           ks=(1, 2))
        >>> scores["recall@1"], scores["recall@2"], scores["precision@2"], scores["mean_rank"]
        (0.0, 1.0, 0.5, 2.5)
    """
    relevant = relevant.to(dtype=torch.bool, device=features.device)
    if features.ndim != 2 or query.shape != features.shape[1:] or relevant.shape != features.shape[:1]:
        raise ValueError(
            f"Need query [d], features [n, d] and relevant [n]; got {tuple(query.shape)}, {tuple(features.shape)} "
            f"and {tuple(relevant.shape)}."
        )
    n_images, n_relevant = features.shape[0], int(relevant.sum())
    if n_relevant == 0:
        raise ValueError("No image is relevant to the query: there is nothing to find.")
    order = torch.sort(features.float() @ query.float().to(features.device), descending=True, stable=True).indices
    ranks = torch.empty(n_images, dtype=torch.long, device=features.device)
    ranks[order] = torch.arange(1, n_images + 1, device=features.device)
    found = ranks[relevant]
    scores = {}
    for k in ks:
        cut = min(k, n_images)
        hits = int((found <= cut).sum())
        scores[f"recall@{k}"] = 1.0 if hits else 0.0
        scores[f"precision@{k}"] = hits / cut
    scores["r_precision"] = int((found <= n_relevant).sum()) / n_relevant
    scores["mean_rank"] = found.double().mean().item()
    scores["chance"] = n_relevant / n_images
    scores["n_images"] = n_images
    scores["n_relevant"] = n_relevant
    return scores


def query_embedding(
    model, tokenizer, name: str, templates: Sequence[str], device: torch.device | str = "cpu"
) -> Tensor:
    """The query ``[d]`` for ``name``: each template filled with it, embedded and normalised, the mean normalised
    again (a one-class :func:`~slug_lightning.zero_shot.zero_shot_classifier`)."""
    return zero_shot_classifier(model, tokenizer, [name], list(templates), device)[:, 0]


def search_by_name(
    evaluator: AuditEvaluator,
    set_name: str,
    concept: str,
    names: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    ks: Sequence[int] = RECALL_AT,
) -> dict[str, dict]:
    """Search every image of a set by each name of a concept; the concept's images are the relevant ones.

    Args:
        evaluator: A run :class:`~slug_lightning.audit.prompts.AuditEvaluator` (its image features are reused).
        set_name: The set holding the concept's images.
        concept: The concept's class name in the set.
        names: The names to search for (default: ``[concept]``); aliases and paraphrases search for the same images.
        templates: The query's templates (default: :func:`~slug_lightning.audit.prompts.held_out_templates` less the
            set's own).
        ks: As :func:`retrieval_scores`.

    Returns:
        ``{name: retrieval_scores(...)}``.
    """
    if templates is None:
        templates = held_out_templates(seen=evaluator.templates[set_name])
    features, labels = evaluator.reference_features(set_name)
    relevant = labels == evaluator.datasets[set_name].class_index(concept)
    return {
        name: retrieval_scores(
            query_embedding(evaluator.model, evaluator.tokenizer, name, templates, evaluator.device),
            features,
            relevant,
            ks,
        )
        for name in (names if names is not None else [concept])
    }
