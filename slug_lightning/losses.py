"""The two losses of SLUG (METHOD §2), as sums over pairs so that any batching gives the same mean.

Both functions return the *sum* of per-pair losses over the pairs a process holds; the gradient collector
divides the reduced sums by the reduced pair counts at the end ("mean over all pairs").
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def forget_loss_sum(image_features: Tensor, text_features: Tensor) -> Tensor:
    """Σᵢ (1 − cos(vᵢ, tᵢ)) over the pairs of a batch. Features need not be normalised."""
    return (1.0 - F.cosine_similarity(image_features, text_features, dim=-1)).sum()


def gather_rows(features: Tensor) -> tuple[Tensor, int]:
    """Concatenate every rank's rows (sizes may differ, also zero), keeping gradients.

    Returns the gathered tensor and the offset of this rank's rows in it. Without an initialised process
    group it is the identity. The backward pass sends each rank the gradient of its own rows, summed over
    all ranks' losses, which is what makes the sum of per-rank gradients the gradient of the global loss.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = torch.zeros(world, dtype=torch.long, device=features.device)
    sizes[rank] = features.shape[0]
    dist.all_reduce(sizes)
    sizes = sizes.tolist()
    padded = F.pad(features, (0, 0, 0, max(sizes) - features.shape[0]))
    gathered = _AllGather.apply(padded)
    rows = torch.cat([chunk[:size] for chunk, size in zip(gathered, sizes)])
    return rows, sum(sizes[:rank])


class _AllGather(torch.autograd.Function):
    """``[world, rows, d]`` of every rank's equally shaped tensor; backward hands each rank the gradient
    of its own rows summed over all ranks' losses (one all-reduce of the features' size)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        chunks = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(chunks, tensor.contiguous())
        return torch.stack(chunks)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()]


def retain_loss_sum(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, gather: bool = True) -> Tensor:
    """Σᵢ over this rank's pairs of the symmetric CLIP InfoNCE loss, negatives from the global batch.

    Pair i's loss is ½·[CE(image i → all texts) + CE(text i → all images)] with the model's learned
    temperature, so the mean over a global batch equals open_clip's ``ClipLoss`` on that batch, however
    the batch is split across devices.

    Args:
        image_features: This rank's image embeddings ``[b, d]`` (``b`` may be 0).
        text_features: This rank's text embeddings ``[b, d]``.
        logit_scale: The model's logit scale parameter (log of the inverse temperature).
        gather: Take the negatives from every rank's batch; False keeps them to this rank's (a fine-tune of one
            process's own, e.g. the audit's relearning on rank 0 after a multi-device run).
    """
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    all_images, offset = gather_rows(image_features) if gather else (image_features, 0)
    all_texts, _ = gather_rows(text_features) if gather else (text_features, 0)
    scale = logit_scale.exp()
    targets = torch.arange(offset, offset + image_features.shape[0], device=image_features.device)
    image_to_text = scale * image_features @ all_texts.T
    text_to_image = scale * text_features @ all_images.T
    return 0.5 * (
        F.cross_entropy(image_to_text, targets, reduction="sum")
        + F.cross_entropy(text_to_image, targets, reduction="sum")
    )
