"""SLUG's losses as sums over pairs: values by hand and against open_clip, and exact gradients under DDP."""

from __future__ import annotations

import math
import socket

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from slug_lightning.losses import forget_loss_sum, gather_rows, retain_loss_sum


def _features(rows: int, width: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=generator), torch.randn(rows, width, generator=generator)


def test_forget_loss_is_the_sum_of_one_minus_cosine():
    images, texts = _features(6)
    images = images * torch.arange(1, 7)[:, None]  # unnormalised, of different lengths
    expected = 0.0
    for v, t in zip(images.tolist(), texts.tolist()):
        dot = sum(a * b for a, b in zip(v, t))
        expected += 1.0 - dot / (math.sqrt(sum(a * a for a in v)) * math.sqrt(sum(b * b for b in t)))
    assert forget_loss_sum(images, texts).item() == pytest.approx(expected, rel=1e-5)


def test_forget_loss_is_zero_for_aligned_pairs_and_empty_batches():
    images, _ = _features(4)
    assert forget_loss_sum(images, 3 * images).item() == pytest.approx(0.0, abs=1e-6)
    assert forget_loss_sum(images, -images).item() == pytest.approx(8.0, rel=1e-6)
    assert forget_loss_sum(torch.zeros(0, 8), torch.zeros(0, 8)).item() == 0.0


@pytest.mark.parametrize("rows", [1, 2, 17])
def test_retain_loss_mean_equals_open_clip_clip_loss(rows):
    images, texts = _features(rows, seed=rows)
    logit_scale = torch.tensor(math.log(1 / 0.07))
    ours = retain_loss_sum(images, texts, logit_scale) / rows
    normalized = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
    theirs = open_clip.loss.ClipLoss()(*normalized, logit_scale.exp())
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


def test_retain_loss_uses_the_temperature():
    images, texts = _features(5)
    cold = retain_loss_sum(images, texts, torch.tensor(0.0))
    hot = retain_loss_sum(images, texts, torch.tensor(math.log(100.0)))
    assert cold.item() != pytest.approx(hot.item(), rel=1e-3)


def test_gather_rows_is_the_identity_without_a_process_group():
    assert not dist.is_initialized()
    features = torch.randn(3, 4, requires_grad=True)
    gathered, offset = gather_rows(features)
    assert gathered is features and offset == 0


# ---------------------------------------------------------------------------------------------------------
# Two gloo processes: per-rank gradients summed over ranks equal the gradient of the global batch's loss.


class _Encoder(nn.Module):
    """A linear 'CLIP': one projection per tower and a learned temperature."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.image = nn.Parameter(torch.randn(6, 4, generator=generator))
        self.text = nn.Parameter(torch.randn(5, 4, generator=generator))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))


def _loss_and_gradients(images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    encoder = _Encoder()
    loss = retain_loss_sum(images @ encoder.image, texts @ encoder.text, encoder.logit_scale)
    grads = torch.autograd.grad(loss, list(encoder.parameters()))
    return loss.detach(), [g.detach().clone() for g in grads]


def _global_batch(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 6, generator=generator), torch.randn(rows, 5, generator=generator)


DDP_CASES = [(5, 3), (0, 2), (2, 0), (1, 1)]  # rows on rank 0 and rank 1


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results = []
        for seed, shares in enumerate(DDP_CASES):
            images, texts = _global_batch(sum(shares), seed)
            start = sum(shares[:rank])
            mine = slice(start, start + shares[rank])
            loss, grads = _loss_and_gradients(images[mine], texts[mine])
            for tensor in [loss, *grads]:
                dist.all_reduce(tensor)
            results.append((loss, grads))
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.ddp
def test_retain_gradients_summed_over_ranks_equal_the_global_gradient(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    results = torch.load(out)
    assert len(results) == len(DDP_CASES)
    for seed, (shares, (loss, grads)) in enumerate(zip(DDP_CASES, results)):
        expected_loss, expected_grads = _loss_and_gradients(*_global_batch(sum(shares), seed))
        torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5, msg=f"loss, shares {shares}")
        for name, grad, expected in zip(["image", "text", "logit_scale"], grads, expected_grads):
            assert expected.abs().max() > 1e-3  # a real gradient, not trivially zero
            torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5, msg=f"{name}, shares {shares}")
