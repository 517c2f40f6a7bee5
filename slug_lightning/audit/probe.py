"""The image side: can a linear read-out of the image features still tell the concept from its look-alikes?

Zero-shot accuracy asks the text tower to name the concept; a linear probe asks whether the image features still
carry it, whatever the text side says. The probe is a multinomial logistic regression, fitted in float64 with
L-BFGS from zero weights (so the same features always give the same answer), scored on held-out folds of a
stratified k-fold split. An edit of a language-tower layer leaves every image feature bit-identical, so its probe
equals the base model's exactly: SLUG editing the text side removes the name, not what the images encode.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from slug_lightning.audit.prompts import AuditEvaluator

L2 = 1e-2
MAX_ITERATIONS = 200


def stratified_folds(labels: Tensor, folds: int, seed: int = 0) -> Tensor:
    """The fold (``0 .. folds - 1``) of every sample: each class's samples, in a seeded random order, are dealt to
    the folds in turn, continuing where the previous class stopped, so every fold gets its share of every class and
    the folds differ in size by at most one.

    Example::

        >>> labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
        >>> fold = stratified_folds(labels, 3)
        >>> torch.bincount(fold[labels == 0]).tolist(), torch.bincount(fold).tolist()
        ([1, 1, 1], [3, 2, 2])
    """
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    fold = torch.empty_like(labels)
    dealt = 0
    for label in labels.unique(sorted=True).tolist():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        fold[members] = (torch.arange(len(members)) + dealt) % folds
        dealt += len(members)
    return fold


def fit_logistic(
    features: Tensor, labels: Tensor, num_classes: int, l2: float = L2, max_iterations: int = MAX_ITERATIONS
) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression: weights ``[d, num_classes]`` and bias minimising the mean cross-entropy plus
    ``l2 / 2 · ‖weights‖²`` (the bias is not penalised), by L-BFGS in float64 from zeros.

    Args:
        features: ``[n, d]``, standardised by the caller.
        labels: ``[n]`` in ``0 .. num_classes - 1``.
        num_classes: The number of classes (a class without training samples is never predicted).
        l2: The weight penalty.
        max_iterations: L-BFGS iterations.
    """
    x, y = features.double(), labels.long()
    weights = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weights, bias],
        lr=1.0,
        max_iter=max_iterations,
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weights + bias, y) + 0.5 * l2 * weights.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weights.detach(), bias.detach()


def linear_probe_accuracy(features: Tensor, labels: Tensor, folds: int = 5, seed: int = 0, l2: float = L2) -> dict:
    """Cross-validated accuracy of a linear probe: each fold of :func:`stratified_folds` is predicted by a
    :func:`fit_logistic` fitted on the other folds, features standardised with the training folds' mean and
    standard deviation.

    Args:
        features: ``[n, d]``.
        labels: ``[n]`` integer class labels (any values).
        folds: The number of folds, at least 2 and at most ``n``.
        seed: Seed of the fold split.
        l2: The weight penalty of :func:`fit_logistic`.

    Returns:
        ``{"accuracy", "log_loss", "count", "folds", "per_class": {label: accuracy on its samples}}``: ``accuracy``
        over all ``count`` held-out predictions (every sample is held out once; a tie predicts the smallest label),
        ``log_loss`` their mean cross-entropy in nats (how sure the probe is, not only whether it is right).

    Raises:
        ValueError: For fewer than two classes, or ``folds`` outside ``[2, n]``.

    Example::

        >>> features = torch.tensor([[0.0], [0.1], [0.2], [1.0], [1.1], [1.2]])
        >>> linear_probe_accuracy(features, torch.tensor([0, 0, 0, 1, 1, 1]), folds=3)["accuracy"]
        1.0
    """
    labels = labels.to(features.device)
    classes, y = labels.unique(sorted=True, return_inverse=True)
    n = labels.numel()
    if classes.numel() < 2:
        raise ValueError(f"A linear probe needs at least two classes, got {classes.tolist()}.")
    if not 2 <= folds <= n:
        raise ValueError(f"folds must be in [2, {n}] for {n} samples, got {folds}.")
    fold = stratified_folds(y, folds, seed).to(features.device)
    x = features.double()
    predicted, losses = torch.empty_like(y), torch.empty_like(x[:, 0])
    for held in range(folds):
        train, test = fold != held, fold == held
        mean, scale = x[train].mean(dim=0), x[train].std(dim=0, unbiased=False).clamp_min(1e-12)
        weights, bias = fit_logistic((x[train] - mean) / scale, y[train], classes.numel(), l2)
        logits = ((x[test] - mean) / scale) @ weights + bias
        predicted[test] = logits.argmax(dim=1)
        losses[test] = F.cross_entropy(logits, y[test], reduction="none")
    right = predicted == y
    per_class = {label: right[y == i].double().mean().item() for i, label in enumerate(classes.tolist())}
    return {
        "accuracy": right.double().mean().item(),
        "log_loss": losses.mean().item(),
        "count": n,
        "folds": folds,
        "per_class": per_class,
    }


def image_probe(
    evaluator: AuditEvaluator,
    set_name: str,
    concept: str,
    lookalikes: Sequence[str],
    folds: int = 5,
    seed: int = 0,
    l2: float = L2,
) -> dict:
    """A linear probe on the model's own normalised image features: the concept's images against those of its
    look-alikes (e.g. the base model's ``ZeroShotEvaluator.nearest_classes``), each class its own label.

    Args:
        evaluator: A run :class:`~slug_lightning.audit.prompts.AuditEvaluator`.
        set_name: The set holding the images.
        concept: The concept's class name.
        lookalikes: Other classes of the set; give the same ones for every model compared.
        folds: As :func:`linear_probe_accuracy`.
        seed: As :func:`linear_probe_accuracy`.
        l2: As :func:`linear_probe_accuracy`.

    Returns:
        ``{"accuracy", "log_loss", "concept_accuracy", "chance", "count", "folds", "classes"}``: ``accuracy`` and
        ``log_loss`` over every probed image, ``concept_accuracy`` over the concept's (its recall), ``chance`` the
        concept's share of the images (the recall of a guess drawn at the classes' frequencies), ``classes`` the
        concept then the look-alikes.

    Raises:
        ValueError: If the concept is among the look-alikes, or a class has no images.
    """
    if concept in lookalikes or not lookalikes:
        raise ValueError(f"Give look-alikes of {concept!r} other than itself, got {list(lookalikes)}.")
    dataset = evaluator.datasets[set_name]
    classes = [concept, *lookalikes]
    indices = torch.tensor([dataset.class_index(name) for name in classes])
    features, labels = evaluator.reference_features(set_name)
    labels = labels.cpu()
    chosen = torch.isin(labels, indices)
    empty = [name for name, index in zip(classes, indices.tolist()) if not (labels == index).any()]
    if empty:
        raise ValueError(f"Classes {empty} have no images in evaluation set {set_name!r}.")
    probe_labels = (labels[chosen][:, None] == indices[None, :]).long().argmax(dim=1)  # 0 is the concept
    result = linear_probe_accuracy(features[chosen.to(features.device)].cpu(), probe_labels, folds, seed, l2)
    share = (probe_labels == 0).double().mean().item()
    return {
        "accuracy": result["accuracy"],
        "log_loss": result["log_loss"],
        "concept_accuracy": result["per_class"][0],
        "chance": share,
        "count": result["count"],
        "folds": folds,
        "classes": classes,
    }
