"""The methods SLUG is compared with (METHOD §11, the paper's Table 1), on the same data and evaluation.

- **FT**: fine-tune on the retain set (the CLIP loss).
- **GA**: gradient ascent on the forget set (raise the forget loss 1 − cos, as SLUG's G_f does).
- **GAFT**: per iteration, one GA pass over the forget set, then one FT pass over the retain set.
- **SalUn**: GAFT restricted to the salient weights: the ``mask_fraction`` of entries with the largest
  ``|G_f|`` at θ⁰ (over all trained tensors together); every other entry keeps its θ⁰ value.
- **SSD** (selective synaptic dampening): no training. The diagonal Fisher information of the CLIP loss is
  estimated on the forget and on the retain pairs; every weight whose forget importance exceeds ``alpha``
  times its retain importance is multiplied by ``min(dampening · I_r / I_f, 1)``.

An *iteration* is one pass over the data (an epoch), as in the paper's research code (10 epochs, batch 32,
AdamW, weight decay 0.1, learning rates 1e-6 and 1e-7 for OpenCLIP ViT-B-32). Every trained method updates
all parameters except the logit scale. Baselines run on one device (the trainer's root device).

The update rules are small pure functions (:func:`saliency_mask`, :func:`dampen`); :func:`run_baseline`
runs one method and returns its model and an iteration log; ``SlugTrainer.unlearn(method=...)`` writes the
same artifacts as SLUG from it.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from slug_lightning.errors import ConfigError
from slug_lightning.losses import forget_loss_sum, retain_loss_sum
from slug_lightning.methods import METHODS


@dataclass(frozen=True)
class BaselineSettings:
    """Hyperparameters of the baselines (paper defaults; the tiny demo CLIP needs larger learning rates).

    Args:
        lr: AdamW learning rate (FT, GA, GAFT, SalUn).
        iterations: Passes over the data (FT, GA, GAFT, SalUn).
        batch_size: Pairs per optimizer step.
        weight_decay: AdamW weight decay of matrices (biases, norms, embeddings: none).
        mask_fraction: SalUn: share of weight entries that may change, by largest |G_f|.
        alpha: SSD: a weight is dampened when its forget importance exceeds alpha × its retain importance.
        dampening: SSD: λ in the factor min(λ·I_r/I_f, 1).
    """

    lr: float = 1e-6
    iterations: int = 10
    batch_size: int = 32
    weight_decay: float = 0.1
    mask_fraction: float = 0.5
    alpha: float = 10.0
    dampening: float = 1.0

    def __post_init__(self) -> None:
        checks = [
            ("lr", self.lr > 0),
            ("iterations", self.iterations >= 1),
            ("batch_size", self.batch_size >= 1),
            ("weight_decay", self.weight_decay >= 0),
            ("mask_fraction", 0 < self.mask_fraction <= 1),
            ("alpha", self.alpha > 0),
            ("dampening", self.dampening > 0),
        ]
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise ConfigError(
                f"Invalid baseline settings {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}: "
                "lr, alpha and dampening must be > 0, iterations and batch_size >= 1, "
                "weight_decay >= 0, mask_fraction in (0, 1].",
                bad[0],
                getattr(self, bad[0]),
            )


_TRAINING = ("lr", "iterations", "batch_size", "weight_decay")
SETTINGS_USED = {
    "ft": _TRAINING,
    "ga": _TRAINING,
    "gaft": _TRAINING,
    "salun": (*_TRAINING, "mask_fraction"),
    "ssd": ("batch_size", "alpha", "dampening"),
}


def settings_used(method: str, settings: BaselineSettings) -> dict:
    """The hyperparameters ``method`` reads, by name (what its report records).

    Example::

        >>> settings_used("ssd", BaselineSettings())
        {'batch_size': 32, 'alpha': 10.0, 'dampening': 1.0}
    """
    return {name: getattr(settings, name) for name in SETTINGS_USED[method]}


def saliency_mask(forget_gradients: Mapping[str, Tensor], fraction: float) -> dict[str, Tensor]:
    """SalUn's weight saliency: True for the ``fraction`` of entries with the largest ``|G_f|``, ranked over
    all tensors together (ties at the threshold are kept). An entry whose forget gradient is exactly zero is
    never salient: in a CLIP most token-embedding rows have none, and counting them as ties would make the
    mask keep everything whenever more than ``1 − fraction`` of the entries are zero.

    Example::

        >>> mask = saliency_mask({"a": torch.tensor([0.1, -3.0]), "b": torch.tensor([2.0, 0.0])}, 0.5)
        >>> mask["a"].tolist(), mask["b"].tolist()
        ([False, True], [True, False])
    """
    magnitudes = torch.cat([g.detach().abs().flatten().float() for g in forget_gradients.values()])
    keep = max(1, math.ceil(fraction * magnitudes.numel()))
    threshold = magnitudes.kthvalue(magnitudes.numel() - keep + 1).values
    threshold = threshold.clamp_min(torch.finfo(torch.float32).tiny)
    return {name: g.detach().abs().float() >= threshold for name, g in forget_gradients.items()}


def dampen(
    weight: Tensor, forget_importance: Tensor, retain_importance: Tensor, alpha: float, dampening: float
) -> Tensor:
    """SSD's update of one tensor: where ``I_f > alpha · I_r`` the weight is scaled by ``min(λ·I_r/I_f, 1)``.

    Example::

        >>> dampen(torch.tensor([1.0, 1.0]), torch.tensor([100.0, 1.0]), torch.tensor([2.0, 1.0]), 10.0, 1.0)
        tensor([0.0200, 1.0000])
    """
    selected = forget_importance > alpha * retain_importance
    factor = torch.clamp(dampening * retain_importance / forget_importance.clamp_min(1e-30), max=1.0)
    return torch.where(selected, weight * factor, weight)


def trained_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """What the iterative baselines train: every parameter but the contrastive temperature and bias."""
    return {name: p for name, p in model.named_parameters() if name not in ("logit_scale", "logit_bias")}


def _optimizer(parameters: Mapping[str, nn.Parameter], settings: BaselineSettings) -> torch.optim.Optimizer:
    # OpenCLIP's convention: weight decay on matrices only, not on gains, biases, embeddings or scalars.
    decay = [p for n, p in parameters.items() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in parameters.items() if not (p.ndim >= 2 and "embedding" not in n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=settings.lr,
    )


def _batch_loss(model: nn.Module, batch: dict, stream: str, device: torch.device) -> tuple[Tensor, int]:
    images, texts = batch["image"].to(device), batch["text"].to(device)
    image_features, text_features = model.encode_image(images), model.encode_text(texts)
    pairs = images.shape[0]
    if stream == "forget":
        # Gradient *ascent*: minimise the negative forget loss.
        return -forget_loss_sum(image_features, text_features) / pairs, pairs
    return retain_loss_sum(image_features, text_features, model.logit_scale) / pairs, pairs


def _gradient_sums(
    model: nn.Module,
    batches: Iterable,
    parameters: Mapping[str, nn.Parameter],
    device: torch.device,
    loss_of: str,
    squared: bool,
) -> tuple[dict[str, Tensor], int, int]:
    """Σ over ``batches`` of each parameter's gradient of the ``loss_of`` loss (``"retain"``: the CLIP loss,
    batch mean; ``"forget"``: 1 − cos, summed over pairs), or of its square; also the batch and pair counts."""
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in parameters.items()}
    used = pairs = 0
    for batch in batches:
        if batch["image"].shape[0] < (2 if loss_of == "retain" else 1):  # a contrastive loss needs negatives
            continue
        loss, count = _batch_loss(model, batch, loss_of, device)
        if loss_of == "forget":
            loss = -loss * count  # _batch_loss gives GA's objective, the negated mean
        grads = torch.autograd.grad(loss, list(parameters.values()), allow_unused=True)
        for name, grad in zip(parameters, grads):
            if grad is not None:
                sums[name] += grad.float() ** 2 if squared else grad.float()
        used, pairs = used + 1, pairs + count
    return sums, used, pairs


def _fisher_diagonal(
    model: nn.Module, batches: Iterable, parameters: Mapping[str, nn.Parameter], device: torch.device
) -> dict[str, Tensor]:
    """SSD's importance: the mean over batches of the squared gradient of the CLIP loss."""
    sums, used, _ = _gradient_sums(model, batches, parameters, device, "retain", squared=True)
    if used == 0:
        raise ValueError("SSD found no batch of at least two pairs to estimate the Fisher information from.")
    return {n: s / used for n, s in sums.items()}


def _mean_forget_gradient(
    model: nn.Module, batches: Iterable, parameters: Mapping[str, nn.Parameter], device: torch.device
) -> dict[str, Tensor]:
    """G_f over all trained tensors (SalUn's saliency), as a mean over all forget pairs."""
    sums, _, pairs = _gradient_sums(model, batches, parameters, device, "forget", squared=False)
    return {n: s / max(pairs, 1) for n, s in sums.items()}


@dataclass
class BaselineResult:
    """What a baseline run leaves: the pair counts, the per-iteration log and the time of the method alone
    (evaluations excluded)."""

    forget_samples: dict[str, int]
    retain_samples: int
    iterations: list[dict]
    method_seconds: float


def run_baseline(
    method: str,
    model: nn.Module,
    forget_loaders: Callable[[], dict[str, Iterable]],
    retain_loader: Callable[[], Iterable],
    settings: BaselineSettings,
    device: torch.device,
    evaluate: Callable[[], dict] | None = None,
) -> BaselineResult:
    """Unlearn with one baseline, in place on ``model``.

    Args:
        method: One of ``ft``, ``ga``, ``gaft``, ``salun``, ``ssd``.
        model: The CLIP (``encode_image``, ``encode_text``, ``logit_scale``), on ``device``.
        forget_loaders: Returns fresh forget loaders by concept (batches as ``LaionDataModule`` yields).
        retain_loader: Returns a fresh retain loader.
        settings: The hyperparameters.
        device: Where to compute.
        evaluate: Called after each iteration (and once for SSD); its result joins the iteration log.

    Raises:
        ValueError: for an unknown method.
    """
    if method not in METHODS[1:]:
        raise ValueError(f"Unknown baseline {method!r}; choose one of {list(METHODS[1:])}.")
    model.eval()  # as SLUG's gradient: dropout off, the model as it is used
    parameters = trained_parameters(model)
    tally = {"forget": Counter(), "retain": 0}  # pairs read since the last reset
    log: list[dict] = []

    def forget_batches():
        for concept, loader in forget_loaders().items():
            for batch in loader:
                tally["forget"][concept] += batch["image"].shape[0]
                yield batch

    def retain_batches():
        for batch in retain_loader():
            tally["retain"] += batch["image"].shape[0]
            yield batch

    start = time.perf_counter()
    if method == "ssd":
        with torch.enable_grad():
            forget = _fisher_diagonal(model, forget_batches(), parameters, device)
            retain = _fisher_diagonal(model, retain_batches(), parameters, device)
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(dampen(parameter, forget[name], retain[name], settings.alpha, settings.dampening))
        seconds = time.perf_counter() - start
        log.append({"iteration": 1, "seconds": seconds, **(evaluate() if evaluate else {})})
        return BaselineResult(dict(tally["forget"]), tally["retain"], log, seconds)

    mask = original = None
    if method == "salun":
        with torch.enable_grad():
            mask = saliency_mask(
                _mean_forget_gradient(model, forget_batches(), parameters, device), settings.mask_fraction
            )
        original = {n: p.detach().clone() for n, p in parameters.items()}
    seconds = time.perf_counter() - start
    optimizer = _optimizer(parameters, settings)
    phases = {"ft": ("retain",), "ga": ("forget",), "gaft": ("forget", "retain"), "salun": ("forget", "retain")}
    for iteration in range(1, settings.iterations + 1):
        tally = {"forget": Counter(), "retain": 0}
        start = time.perf_counter()
        for phase in phases[method]:
            for batch in forget_batches() if phase == "forget" else retain_batches():
                if batch["image"].shape[0] < (2 if phase == "retain" else 1):
                    continue
                with torch.enable_grad():
                    loss, _ = _batch_loss(model, batch, phase, device)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"{method}: the {phase} loss is {loss.item()} in iteration "
                            f"{iteration}; lower the learning rate."
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                if mask is not None:  # SalUn: only the salient entries move
                    with torch.no_grad():
                        for name, parameter in parameters.items():
                            parameter.copy_(torch.where(mask[name], parameter, original[name]))
        elapsed = time.perf_counter() - start
        seconds += elapsed
        log.append({"iteration": iteration, "seconds": elapsed, **(evaluate() if evaluate else {})})
    # Every pass reads the same pairs; the last pass's tally is the count.
    return BaselineResult(dict(tally["forget"]), tally["retain"], log, seconds)
