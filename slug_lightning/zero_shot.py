"""Zero-shot classification (METHOD §8): class-prompt classifiers, per-class hit counts, accuracies.

All accuracies of the package derive from one table per evaluation set: for every class, how many of its
images were seen and how many were right at top-1 and top-k. Forget accuracy reads the rows of the forget
concepts, test accuracy the other rows (micro-averaged over images, the CLIP convention, or macro-averaged over
classes). The table is a torchmetrics
state with ``dist_reduce_fx="sum"``, so counts reduce exactly across devices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

TOP_K = 5


def class_prompts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every class name, class-major (all templates of class 0 first)."""
    return [template.format(name) for name in class_names for template in templates]


@torch.no_grad()
def classifier_from_tokens(
    model: nn.Module,
    tokens: Tensor,
    num_templates: int,
    device: torch.device | str = "cpu",
    classes_per_batch: int = 64,
    per_template: bool = False,
) -> Tensor:
    """Class embeddings ``[embed_dim, num_classes]`` from the tokenized :func:`class_prompts`.

    For each class the normalised embeddings of its prompts are averaged and the mean normalised again
    (``per_template``: one classifier per template, ``[num_templates, embed_dim, num_classes]``).
    """
    rows_per_batch = classes_per_batch * num_templates
    prompt_features = [
        model.encode_text(tokens[start : start + rows_per_batch].to(device))
        for start in range(0, tokens.shape[0], rows_per_batch)
    ]
    return class_embeddings(torch.cat(prompt_features), num_templates, per_template)


def class_embeddings(prompt_features: Tensor, num_templates: int, per_template: bool = False) -> Tensor:
    """The classifier ``[embed_dim, num_classes]`` from the text features of the class-major prompts.

    Each prompt embedding is normalised, the templates of a class averaged, and the mean normalised again. With
    ``per_template`` each template keeps a classifier of its own: ``[num_templates, embed_dim, num_classes]``.

    Example::

        >>> class_embeddings(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [3.0, 0.0]]), 2).T
        tensor([[0.7071, 0.7071],
                [1.0000, 0.0000]])
        >>> class_embeddings(torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [3.0, 0.0]]), 2, per_template=True)[1].T
        tensor([[0., 1.],
                [1., 0.]])
    """
    embeddings = F.normalize(prompt_features.float(), dim=-1)
    embeddings = embeddings.reshape(-1, num_templates, embeddings.shape[-1])
    if per_template:
        return embeddings.permute(1, 2, 0)
    return F.normalize(embeddings.mean(dim=1), dim=-1).T


def zero_shot_classifier(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str = "cpu",
    classes_per_batch: int = 64,
) -> Tensor:
    """Class embeddings ``[embed_dim, num_classes]``, the OpenCLIP way.

    For each class every template is filled with the class name and embedded; the normalised embeddings
    are averaged and the mean normalised again.

    Args:
        model: Anything with ``encode_text(tokens)``.
        tokenizer: Maps a list of strings to a token tensor.
        class_names: The classes, in label order.
        templates: Format strings with one ``{}``, e.g. ``"a photo of {}."``.
        device: Where to run the text tower.
        classes_per_batch: Classes embedded per forward pass (memory vs. speed).
    """
    tokens = tokenizer(class_prompts(class_names, templates))
    return classifier_from_tokens(model, tokens, len(templates), device, classes_per_batch)


@torch.no_grad()
def image_features(model: nn.Module, images: Tensor) -> Tensor:
    """L2-normalised image embeddings in fp32."""
    return F.normalize(model.encode_image(images).float(), dim=-1)


def hits(logits: Tensor, labels: Tensor, k: int = TOP_K) -> tuple[Tensor, Tensor]:
    """Per-sample top-1 and top-k correctness (booleans), with k capped at the number of classes."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return top[:, 0] == labels, (top == labels[:, None]).any(dim=1)


class ZeroShotCounts(Metric):
    """Per-class counts of images, top-1 hits and top-5 hits for one evaluation set.

    Args:
        num_classes: Size of the set's class list.

    Example::

        >>> metric = ZeroShotCounts(num_classes=3)
        >>> metric.update(torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1]]), torch.tensor([0, 2]))
        >>> metric.compute().tolist()
        [[1, 1, 1], [0, 0, 0], [1, 0, 1]]
    """

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
        self.num_classes = num_classes
        self.add_state("counts", torch.zeros(num_classes, 3, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        top1, topk = hits(logits, labels)
        stacked = torch.stack([torch.ones_like(top1), top1, topk], dim=1).long()
        self.counts.index_add_(0, labels, stacked)

    def compute(self) -> Tensor:
        """``[num_classes, 3]``: images, top-1 hits, top-5 hits."""
        return self.counts


def accuracy(counts: Tensor, classes: Iterable[int] | None = None, averaging: str = "micro") -> dict[str, float]:
    """Top-1/top-5 over the rows ``classes`` (all rows when None) of a count table.

    Args:
        counts: ``[num_classes, 3]``: images, top-1 hits, top-5 hits.
        classes: The rows to average over.
        averaging: ``"micro"``: hits over images. ``"macro"``: the mean over the selected classes that have
            images of each class's hits over its images, so every class weighs the same.

    Returns:
        ``{"top1", "top5", "count"}``, ``count`` the number of images; NaN accuracies when there are none.

    Raises:
        ValueError: For an unknown ``averaging``.

    Example::

        >>> table = torch.tensor([[4, 4, 4], [1, 0, 1], [0, 0, 0]])
        >>> accuracy(table)["top1"], accuracy(table, averaging="macro")["top1"]
        (0.8, 0.5)
    """
    if averaging not in ("micro", "macro"):
        raise ValueError(f"averaging must be 'micro' or 'macro', got {averaging!r}.")
    rows = counts if classes is None else counts[list(classes)]
    total, top1, top5 = rows.sum(dim=0).tolist()
    if total == 0:
        return {"top1": float("nan"), "top5": float("nan"), "count": 0}
    if averaging == "macro":
        seen = rows[rows[:, 0] > 0].double()
        top1, top5 = (seen[:, 1:] / seen[:, :1]).mean(dim=0).tolist()
        return {"top1": top1, "top5": top5, "count": int(total)}
    return {"top1": top1 / total, "top5": top5 / total, "count": int(total)}
