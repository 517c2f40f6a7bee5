"""The single gradient of SLUG (METHOD §2): ``GradientCollector`` and the ``GradientStore`` it produces.

One forward+backward per pair over each forget stream and the retain stream, at θ⁰, no optimiser step.
Gradients are kept only for candidate tensors, summed in fp32 per stream, and divided by the number of
pairs at the end: the mean over all pairs, independent of batch size and device count. Under DDP nothing
is synchronised per batch (the predict loop does not wrap the model); one bucketed all-reduce of the sums
and counts runs at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn
from typing_extensions import override

from slug_lightning.artifacts import atomic_path, fingerprint
from slug_lightning.errors import UserError
from slug_lightning.layers import candidate_layers
from slug_lightning.losses import forget_loss_sum, retain_loss_sum
from slug_lightning.memory import PeakMemory

RETAIN = "retain"
BUCKET_BYTES = 64 * 2**20


@dataclass
class GradientStore:
    """Mean forget gradients per concept and the mean retain gradient, for candidate tensors only.

    Saved as ``gradients.safetensors`` with keys ``forget/<concept>/<param>`` and ``retain/<param>``; the
    metadata holds the model, concepts, pair counts and skipped samples.
    """

    forget: dict[str, dict[str, Tensor]]
    retain: dict[str, Tensor]
    forget_samples: dict[str, int]
    retain_samples: int
    skipped_samples: int = 0
    model: dict = field(default_factory=dict)

    @property
    def concepts(self) -> list[str]:
        return list(self.forget)

    @property
    def layers(self) -> list[str]:
        return list(self.retain)

    def save(self, path: str | Path) -> None:
        """Write atomically to ``path`` (safetensors)."""
        from safetensors.torch import save_file

        tensors = {f"retain/{name}": g.contiguous() for name, g in self.retain.items()}
        for concept, grads in self.forget.items():
            tensors.update({f"forget/{concept}/{name}": g.contiguous() for name, g in grads.items()})
        metadata = {
            "format": "slug_lightning.gradients/1",
            "model": json.dumps(self.model),
            "concepts": json.dumps(self.concepts),
            "layers": json.dumps(self.layers),
            "forget_samples": json.dumps(self.forget_samples),
            "retain_samples": str(self.retain_samples),
            "skipped_samples": str(self.skipped_samples),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> "GradientStore":
        """Read a store written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != "slug_lightning.gradients/1":
                raise ValueError(f"{str(path)!r} is not a gradient store written by slug_lightning.")
            concepts = json.loads(metadata["concepts"])
            forget = {concept: {} for concept in concepts}
            retain = {}
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if key.startswith("retain/"):
                    retain[key[len("retain/"):]] = tensor
                    continue
                # Concept names may contain "/" and one may begin another ("AC", "AC/DC"): the longest known
                # concept that prefixes the key is the one it belongs to.
                concept = max((c for c in concepts if key.startswith(f"forget/{c}/")), key=len)
                forget[concept][key[len(f"forget/{concept}/"):]] = tensor
            if "layers" in metadata:  # safetensors sorts its keys; restore the order the store was made in
                layers = json.loads(metadata["layers"])
                retain = {name: retain[name] for name in layers}
                forget = {concept: {name: grads[name] for name in layers if name in grads}
                          for concept, grads in forget.items()}
        return cls(
            forget=forget,
            retain=retain,
            forget_samples=json.loads(metadata["forget_samples"]),
            retain_samples=int(metadata["retain_samples"]),
            skipped_samples=int(metadata["skipped_samples"]),
            model=json.loads(metadata["model"]),
        )


def _flat_all_reduce(tensors: list[Tensor]) -> None:
    """Sum ``tensors`` (all of one dtype) in place across ranks, in flat buckets of about ``BUCKET_BYTES``."""
    if len({t.dtype for t in tensors}) > 1:
        raise ValueError("_flat_all_reduce needs tensors of one dtype; concatenating would promote them.")
    bucket: list[Tensor] = []
    size = 0
    for tensor in [*tensors, None]:
        if tensor is not None:
            bucket.append(tensor)
            size += tensor.numel() * tensor.element_size()
        if bucket and (tensor is None or size >= BUCKET_BYTES):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat)
            for t, chunk in zip(bucket, flat.split([t.numel() for t in bucket])):
                t.copy_(chunk.view_as(t))
            bucket, size = [], 0


class GradientCollector(L.LightningModule):
    """Accumulates G_f (per concept) and G_r for the candidate tensors of a CLIP, in a predict run.

    Run it with ``trainer.predict(collector, datamodule=...)`` on a trainer built with
    ``inference_mode=False``; the datamodule's ``predict_dataloader`` gives one loader per forget concept,
    then the retain loader (``LaionDataModule`` does). Afterwards ``collector.gradients`` holds the store.

    Args:
        model_name: OpenCLIP model name (ignored when ``model`` is given).
        pretrained: Pretrained tag or local checkpoint of that model.
        include: Extra parameter name patterns (fnmatch) to treat as candidate layers.
        exclude: Parameter name patterns to drop from the candidates.
        model: A ready model (any module with ``encode_image``, ``encode_text`` and ``logit_scale``), e.g.
            the CLIP inside a user's own LightningModule. Programmatic use only.
        preprocess: The image transform for ``model`` (programmatic use with ``model``).
        tokenizer: The tokenizer for ``model`` (programmatic use with ``model``).
        concepts: Names of the forget streams in loader order; default: the datamodule's ``concepts``.
        activation_checkpointing: Recompute block activations in the backward pass instead of keeping
            them (OpenCLIP's gradient checkpointing): less memory for large models and batches, about one
            more forward pass of time. The gradients are the same.

    The pass runs at the Trainer's precision: ``32-true`` (default) or ``bf16-mixed`` (bf16 autocast of
    the forward and backward; the per-tensor sums stay fp32). fp16 precisions are refused: their loss
    scaling and narrow range are meant for optimiser steps, not for a gradient that is kept.
    """

    def __init__(
        self,
        model_name: str = "slug-tiny",
        pretrained: str | None = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        model: nn.Module | None = None,
        preprocess=None,
        tokenizer=None,
        concepts: Sequence[str] | None = None,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "preprocess", "tokenizer"])
        if model is None:
            from slug_lightning.models import load_clip

            loaded = load_clip(model_name, pretrained)
            model, preprocess, tokenizer = loaded.model, loaded.preprocess, loaded.tokenizer
        for attribute in ("encode_image", "encode_text", "logit_scale"):
            if not hasattr(model, attribute):
                raise TypeError(f"The model must have `{attribute}`; {type(model).__name__} has not.")
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.include, self.exclude = tuple(include), tuple(exclude)
        self.concepts = list(concepts) if concepts is not None else None
        self.activation_checkpointing = activation_checkpointing
        if activation_checkpointing and not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"activation_checkpointing needs a model with `set_grad_checkpointing` (OpenCLIP "
                             f"models have it); {type(model).__name__} has not.")
        self.gradients: GradientStore | None = None
        self.reused = False  # set when `gradients` was loaded from a store instead of computed
        # Fingerprint of θ⁰, taken when the predict run starts: a search that follows (StepSearch) leaves its edits
        # in the model, and the run's delta must name the model it was computed for.
        self.base_fingerprint: str | None = None
        self.seconds = 0.0
        self.memory = PeakMemory()

    def identity(self) -> dict:
        """What gradients of the model as it is now belong to: name, weights source, weights fingerprint."""
        return {"name": self.hparams.model_name, "pretrained": self.hparams.pretrained,
                "fingerprint": fingerprint(self.model.state_dict())}

    def candidates(self) -> list[str]:
        """Candidate layer names (METHOD §3) after the include/exclude patterns."""
        return candidate_layers(self.model.named_parameters(), self.include, self.exclude)

    @override
    def on_predict_start(self) -> None:
        self._start = time.perf_counter()
        self.base_fingerprint = fingerprint(self.model.state_dict())
        if self.reused:
            return
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        if precision.startswith("16") or precision == "transformer-engine":
            raise UserError(f"GradientCollector cannot run at precision {precision!r}; use '32-true' or "
                            f"'bf16-mixed' (bf16 autocast with fp32 gradient sums).")
        self.memory.start()
        if self.activation_checkpointing:
            self.model.set_grad_checkpointing(True)
        if self.concepts is None:
            datamodule = self.trainer.datamodule
            self.concepts = [c.name for c in getattr(datamodule, "concepts", None) or []]
        self.streams = [*self.concepts, RETAIN]
        names = set(self.candidates())
        self._requires_grad = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self._parameters = {n: p for n, p in self.model.named_parameters() if n in names}
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(name in names)
        self._sums = {
            stream: {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self._parameters.items()}
            for stream in self.streams
        }
        self._counts = torch.zeros(len(self.streams) + 1, dtype=torch.float64, device=self.device)  # + skipped
        self.model.eval()  # dropout off: the gradient is taken at θ⁰ as the model is used

    def _encode(self, batch: dict) -> tuple[Tensor, Tensor]:
        if batch["image"].shape[0] == 0:
            # Zero-row share of a global batch: no forward pass, but correctly shaped features so this rank
            # still takes part in the retain loss's feature gathering.
            width = self._embed_dim(batch)
            empty = torch.zeros(0, width, device=self.device, requires_grad=True)
            return empty, empty
        return self.model.encode_image(batch["image"]), self.model.encode_text(batch["text"])

    def _embed_dim(self, batch: dict) -> int:
        if not hasattr(self, "_width"):
            with torch.no_grad():
                self._width = self.model.encode_text(batch["text"].new_zeros(1, batch["text"].shape[1])).shape[-1]
        return self._width

    @override
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.reused:
            return
        stream = self.streams[dataloader_idx]
        pairs = batch["image"].shape[0]
        self._counts[dataloader_idx] += pairs
        self._counts[-1] += int(batch.get("skipped", 0))
        if pairs == 0 and stream != RETAIN:
            return
        with torch.enable_grad():
            image_features, text_features = self._encode(batch)
            if stream == RETAIN:
                loss = retain_loss_sum(image_features, text_features, self.model.logit_scale)
            else:
                loss = forget_loss_sum(image_features, text_features)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"The {stream!r} loss is {loss.item()} at batch {batch_idx}; gradients would be meaningless."
                )
            grads = torch.autograd.grad(loss, list(self._parameters.values()), allow_unused=True)
        for (name, _), grad in zip(self._parameters.items(), grads):
            if grad is not None:
                self._sums[stream][name] += grad.float()

    @override
    def on_predict_epoch_end(self) -> None:
        # An epoch-end hook, so that callbacks' ``on_predict_end`` (StepSearch) already see the result.
        if self.reused:
            return
        sums = [s for stream in self.streams for s in self._sums[stream].values()]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            _flat_all_reduce(sums)
            dist.all_reduce(self._counts)  # fp64, apart: in one bucket it would promote the fp32 sums to fp64
        counts = self._counts.tolist()
        for index, stream in enumerate(self.streams):
            if counts[index] == 0:
                what = "retain set" if stream == RETAIN else f"forget set of {stream!r}"
                raise ValueError(f"The {what} is empty: no caption in the shards selected any pair for it.")
            for grad in self._sums[stream].values():
                grad /= counts[index]
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(self._requires_grad[name])
        if self.activation_checkpointing:
            self.model.set_grad_checkpointing(False)
        self.gradients = GradientStore(
            forget={c: {n: g.cpu() for n, g in self._sums[c].items()} for c in self.concepts},
            retain={n: g.cpu() for n, g in self._sums[RETAIN].items()},
            forget_samples={c: int(counts[i]) for i, c in enumerate(self.concepts)},
            retain_samples=int(counts[len(self.concepts)]),
            skipped_samples=int(counts[-1]),
            model=self.identity(),
        )
        del self._sums
        self.seconds = time.perf_counter() - self._start
        self.memory.stop()
