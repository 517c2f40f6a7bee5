"""The single gradient of SLUG (METHOD §2): ``GradientCollector``, which produces a ``GradientStore``.

One forward+backward per pair over each forget stream and the retain stream, at θ⁰, no optimiser step.
Gradients are kept only for candidate tensors, summed in fp32 per stream, and divided by the number of
pairs at the end: the mean over all pairs, independent of batch size and device count. Under DDP nothing
is synchronised per batch (the predict loop does not wrap the model); one bucketed all-reduce of the sums
and counts runs at the end.

The store and its file format are in :mod:`slug_lightning.gradient_store`, the partial sums a killed pass resumes
from in :mod:`slug_lightning.partial_gradients`; where their files go is given by ``unlearn``
(:mod:`slug_lightning.trainer`), which owns the run directory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn
from typing_extensions import override

from slug_lightning.artifacts import fingerprint
from slug_lightning.errors import ConfigError, UserError
from slug_lightning.gradient_key import batch_limit, data_key, gradient_key
from slug_lightning.gradient_store import GradientStore
from slug_lightning.layers import candidate_layers
from slug_lightning.losses import forget_loss_sum, retain_loss_sum
from slug_lightning.memory import PeakMemory
from slug_lightning.partial_gradients import load_partial, rank_file, resume_key, save_partial
from slug_lightning.provenance import weights_source

RETAIN = "retain"
BUCKET_BYTES = 64 * 2**20


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
        model_name: OpenCLIP model name.
        pretrained: Pretrained tag or local checkpoint of that model.
        include: Extra parameter name patterns (fnmatch) to treat as candidate layers.
        exclude: Parameter name patterns to drop from the candidates.
        activation_checkpointing: Recompute block activations in the backward pass instead of keeping
            them (OpenCLIP's gradient checkpointing): less memory for large models and batches, about one
            more forward pass of time. The gradients are the same.
        max_skipped_fraction: Fail the pass (a UserError naming the counts) when broken samples, i.e.
            ``skipped / (pairs + skipped)`` over all streams, exceed this fraction. Default 0.05; 1.0 never
            fails.
        checkpoint_every: Save the partial sums and the position (batches done per stream) every this many
            batches to :attr:`partial_path` (``unlearn`` sets it to ``output_dir/gradients.partial.safetensors``,
            one file per rank under DDP), so that a killed run resumes where it stopped, with the same
            gradients as an uninterrupted one. 0 turns it off.

    A CLIP already in memory (the one inside a user's own LightningModule) goes through :meth:`from_clip`. The forget
    streams are named by the datamodule's ``concepts``, in loader order.

    The files of a run are named by whoever owns its directory (``unlearn`` does): :attr:`partial_path` for the
    partial sums (None: no checkpoints, no resume) and :attr:`store_path` for the finished store, saved by global
    rank 0 as soon as the pass ends (None: not saved); the partial files are removed then.

    A loss or gradient that is NaN or infinite stops the pass with a ``FloatingPointError`` naming the stream,
    the batch and its first sample keys.

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
        activation_checkpointing: bool = False,
        max_skipped_fraction: float = 0.05,
        checkpoint_every: int = 200,
        _clip: tuple[nn.Module, Callable, Callable] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= max_skipped_fraction <= 1.0:
            raise ConfigError(
                f"max_skipped_fraction must be in [0, 1], got {max_skipped_fraction}.",
                "max_skipped_fraction",
                max_skipped_fraction,
            )
        if checkpoint_every < 0:
            raise ConfigError(
                f"checkpoint_every must be >= 0 (0: no partial checkpoints), got {checkpoint_every}.",
                "checkpoint_every",
                checkpoint_every,
            )
        self.save_hyperparameters(ignore=["_clip"])
        # The training transform, for a datamodule whose retain stream is augmented (as in the paper); a model
        # given programmatically brings none.
        self.train_preprocess = None
        if _clip is None:
            from slug_lightning.models import load_clip

            loaded = load_clip(model_name, pretrained)
            model, preprocess, tokenizer = loaded.model, loaded.preprocess, loaded.tokenizer
            self.train_preprocess = loaded.train_preprocess
        else:
            model, preprocess, tokenizer = _clip
        for attribute in ("encode_image", "encode_text", "logit_scale"):
            if not hasattr(model, attribute):
                raise TypeError(f"The model must have `{attribute}`; {type(model).__name__} has not.")
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.include, self.exclude = tuple(include), tuple(exclude)
        self.concepts: list[str] | None = None  # the forget streams' names, from the datamodule at the pass's start
        self.activation_checkpointing = activation_checkpointing
        if activation_checkpointing and not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(
                f"activation_checkpointing needs a model with `set_grad_checkpointing` (OpenCLIP "
                f"models have it); {type(model).__name__} has not.",
                "activation_checkpointing",
                True,
            )
        self.max_skipped_fraction = max_skipped_fraction
        self.checkpoint_every = checkpoint_every
        self.partial_path: Path | None = None  # where partial sums go; None: no checkpoints (set by unlearn)
        self.store_path: Path | None = None  # where the finished store goes; None: not saved (set by unlearn)
        self.resumed_from: dict[str, int] | None = None  # batches per stream taken from a partial checkpoint
        self.gradients: GradientStore | None = None
        self.reused = False  # set when `gradients` was loaded from a store instead of computed
        # Fingerprint of θ⁰, taken when the predict run starts: a search that follows (StepSearch) leaves its edits
        # in the model, and the run's delta must name the model it was computed for.
        self.base_fingerprint: str | None = None
        self.key: dict | None = None  # the gradient key of the pass (see gradient_key)
        self.seconds = 0.0
        self.memory = PeakMemory()

    @classmethod
    def from_clip(cls, model: nn.Module, preprocess: Callable, tokenizer: Callable, **settings) -> GradientCollector:
        """A collector for a CLIP already in memory (any module with ``encode_image``, ``encode_text`` and
        ``logit_scale``, e.g. the one inside a user's own LightningModule), with its image transform and tokenizer.

        ``settings`` are the other arguments of the constructor; ``model_name`` names the architecture in the
        reports (default ``"slug-tiny"``).
        """
        return cls(**settings, _clip=(model, preprocess, tokenizer))

    def identity(self) -> dict:
        """What gradients of the model as it is now belong to: name, weights source, weights fingerprint.

        A local checkpoint is named by its content (``sha256:<hex>``) and base name, never its path
        (:func:`~slug_lightning.provenance.weights_source`): the identity goes into the files a run ships.
        """
        return {
            "name": self.hparams.model_name,
            **weights_source(self.hparams.pretrained),
            "fingerprint": fingerprint(self.model.state_dict()),
        }

    def gradient_key(
        self,
        datamodule=None,
        precision: str | None = None,
        weights: str | None = None,
        limit_predict_batches: int | float | None = None,
    ) -> dict:
        """What this collector's gradients depend on (:mod:`slug_lightning.gradient_key`): the model's architecture
        and weights, the concepts with their aliases, the data, the candidate layers, the precision and how many
        batches per stream the pass reads.

        Args:
            datamodule: The run's datamodule (default: the Trainer's).
            precision: The Trainer's precision (default: the attached Trainer's, else ``32-true``).
            weights: The fingerprint of the model's weights, when already taken (default: taken now).
            limit_predict_batches: The Trainer's ``limit_predict_batches`` (default: the attached Trainer's, else
                1.0, every batch); ``fast_dev_run`` sets it.
        """
        if datamodule is None and self._trainer is not None:
            datamodule = self.trainer.datamodule
        if precision is None:
            precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        if limit_predict_batches is None:
            limit_predict_batches = self.trainer.limit_predict_batches if self._trainer is not None else 1.0
        known = getattr(datamodule, "concepts", None) or []
        concepts = [{"name": c.name, "aliases": list(c.aliases)} for c in known]
        weights = weights or fingerprint(self.model.state_dict())
        return gradient_key(
            model_name=self.hparams.model_name,
            fingerprint=weights,
            concepts=concepts,
            layers=self.candidates(),
            precision=precision,
            data=data_key(datamodule, self.preprocess, self.tokenizer, self.train_preprocess),
            batch_limit=batch_limit(limit_predict_batches),
        )

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
            raise UserError(
                f"GradientCollector cannot run at precision {precision!r}; use '32-true' or "
                f"'bf16-mixed' (bf16 autocast with fp32 gradient sums)."
            )
        self.memory.start()
        if self.activation_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.concepts = [c.name for c in getattr(self.trainer.datamodule, "concepts", None) or []]
        self.streams = [*self.concepts, RETAIN]
        names = set(self.candidates())
        self.key = self.gradient_key(weights=self.base_fingerprint)
        self._requires_grad = {n: p.requires_grad for n, p in self.model.named_parameters()}
        self._parameters = {n: p for n, p in self.model.named_parameters() if n in names}
        self._specs = None  # of the embeddings, taken at the first empty share (see _encode)
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(name in names)
        self._sums = {
            stream: {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self._parameters.items()}
            for stream in self.streams
        }
        self._counts = torch.zeros(len(self.streams) + 1, dtype=torch.float64, device=self.device)  # + skipped
        self._done = [0] * len(self.streams)  # batches summed per stream (the position of the pass)
        self._seen = [0] * len(self.streams)  # batches met per stream in this process
        self._since_checkpoint = 0
        self.model.eval()  # dropout off: the gradient is taken at θ⁰ as the model is used
        self._resume()

    def _encode(self, batch: dict) -> tuple[Tensor, Tensor]:
        if batch["image"].shape[0] == 0:
            # Zero-row share of a global batch: no forward pass, but features shaped as a forward pass gives them
            # (width, dtype, and whether they carry gradient), so that this rank takes part in the retain loss's
            # feature gathering, backward included, exactly as the others do.
            return tuple(
                torch.zeros(0, width, dtype=dtype, device=self.device, requires_grad=grad)
                for width, dtype, grad in self._feature_specs(batch)
            )
        return self.model.encode_image(batch["image"]), self.model.encode_text(batch["text"])

    def _feature_specs(self, batch: dict) -> list[tuple[int, torch.dtype, bool]]:
        """Width, dtype and ``requires_grad`` of the image and text embeddings, from one blank image and caption
        (under the step's autocast, if any; once per pass)."""
        if getattr(self, "_specs", None) is None:
            image = batch["image"].new_zeros(1, *batch["image"].shape[1:])
            text = batch["text"].new_zeros(1, batch["text"].shape[1])
            self._specs = [
                (f.shape[-1], f.dtype, f.requires_grad)
                for f in (self.model.encode_image(image), self.model.encode_text(text))
            ]
        return self._specs

    @override
    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.reused:
            return
        stream = self.streams[dataloader_idx]
        self._seen[dataloader_idx] += 1
        if self._seen[dataloader_idx] <= self._done[dataloader_idx]:
            return  # summed before the run was interrupted: the partial checkpoint holds it
        pairs = batch["image"].shape[0]
        if pairs or stream == RETAIN:
            with torch.enable_grad():
                image_features, text_features = self._encode(batch)
                if stream == RETAIN:
                    loss = retain_loss_sum(image_features, text_features, self.model.logit_scale)
                else:
                    loss = forget_loss_sum(image_features, text_features)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"The {stream!r} loss is {loss.item()} at {_where(batch, batch_idx)}; "
                        "gradients would be meaningless. Check these samples and the model."
                    )
                # The features are inputs too: the backward of the retain loss's feature gathering is a collective,
                # and autograd runs only the part of the graph that leads to an input. A rank whose share is empty
                # has features that reach no parameter; without them its backward would skip the all-reduce the
                # other ranks wait in.
                features = [f for f in (image_features, text_features) if f.requires_grad]
                grads = torch.autograd.grad(loss, [*self._parameters.values(), *features], allow_unused=True)[
                    : len(self._parameters)
                ]
            # One device sync per batch: a single flag over every tensor, the names only when it trips.
            flags = [torch.isfinite(g).all() for g in grads if g is not None]
            if flags and not torch.stack(flags).all():
                bad = [
                    name
                    for name, grad in zip(self._parameters, grads)
                    if grad is not None and not torch.isfinite(grad).all()
                ]
                raise FloatingPointError(
                    f"The {stream!r} gradient of {bad[:3]}{' ...' if len(bad) > 3 else ''} is "
                    f"NaN or infinite at {_where(batch, batch_idx)} (loss {loss.item():.6g}). "
                    "Check these samples and the model."
                )
            for name, grad in zip(self._parameters, grads):
                if grad is not None:
                    self._sums[stream][name] += grad.float()
        self._counts[dataloader_idx] += pairs
        self._counts[-1] += int(batch.get("skipped", 0))
        self._done[dataloader_idx] += 1
        self._since_checkpoint += 1
        if self.checkpoint_every and self.partial_path is not None and self._since_checkpoint >= self.checkpoint_every:
            self._save_partial()

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
        _check_skipped(counts[:-1], counts[-1], self.max_skipped_fraction)
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
            key=self.key,
        )
        del self._sums
        # The finished store replaces the partial sums: saved now (it is the expensive part of a run),
        # so that a run that dies in the search reuses it.
        if self.store_path is not None and self.trainer.is_global_zero:
            self.gradients.save(self.store_path)
        if self.partial_path is not None:
            self._partial_file().unlink(missing_ok=True)
        self.seconds = time.perf_counter() - self._start
        self.memory.stop()

    # ----------------------------------------------------------------------------------------------
    # Partial checkpoints

    def _partial_file(self) -> Path:
        """This rank's partial checkpoint: ``partial_path``, or ``<stem>.rank<r>-of-<w>.safetensors`` under DDP
        (:func:`~slug_lightning.partial_gradients.rank_file`)."""
        world_size = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if world_size > 1 else 0
        return rank_file(self.partial_path, rank, world_size)

    def _resume_key(self) -> dict:
        """What partial sums must match to be resumed (:func:`~slug_lightning.partial_gradients.resume_key`)."""
        world_size = self.trainer.world_size if self._trainer is not None else 1
        return resume_key(self.key, self.streams, world_size)

    def _save_partial(self) -> None:
        """Write this rank's sums, counts and position atomically; the previous checkpoint stays until then."""
        save_partial(
            self._partial_file(),
            [self._sums[stream] for stream in self.streams],
            self._counts,
            self._done,
            self._resume_key(),
        )
        self._since_checkpoint = 0

    def _resume(self) -> None:
        """Load this rank's matching partial checkpoint, if any; under DDP only when every rank has one at the
        same position (otherwise all start over, so that the ranks stay in step)."""
        self.resumed_from = None
        if self.partial_path is None:
            return
        loaded = load_partial(self._partial_file(), self._resume_key(), len(self.streams))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            done = torch.tensor(
                loaded[2] if loaded else [-1] * len(self.streams), dtype=torch.float64, device=self.device
            )
            low, high = done.clone(), done.clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            if not torch.equal(low, high) or low.min() < 0:
                loaded = None
        if loaded is None:
            return
        sums, counts, done = loaded
        for i, stream in enumerate(self.streams):
            for name in self._sums[stream]:
                self._sums[stream][name].copy_(sums[i][name])
        self._counts.copy_(counts)
        self._done = list(done)
        self.resumed_from = dict(zip(self.streams, done))
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(
            f"Resuming the gradient pass from {self._partial_file()}: batches already done per stream "
            f"{self.resumed_from}."
        )


def _where(batch: dict, batch_idx: int) -> str:
    """``batch 3 (keys ['a1', 'a2', ...])``: where in the stream a problem happened."""
    keys = list(batch.get("key", []))
    shown = f", keys {keys[:8]}{' ...' if len(keys) > 8 else ''}" if keys else ""
    return f"batch {batch_idx}{shown}"


def _check_skipped(pairs: Sequence[float], skipped: float, max_fraction: float) -> None:
    """Raise when broken samples make up more than ``max_fraction`` of everything read.

    Raises:
        UserError: ``skipped / (sum(pairs) + skipped) > max_fraction``.

    Example::

        >>> _check_skipped([95, 3], 2, 0.05)
        >>> _check_skipped([90], 10, 0.05)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        slug_lightning.errors.UserError: 10 of 100 samples (10.0%) were broken and skipped ...
    """
    total = sum(pairs) + skipped
    if total and skipped / total > max_fraction:
        raise UserError(
            f"{int(skipped)} of {int(total)} samples ({skipped / total:.1%}) were broken and skipped (missing or "
            f"undecodable image or caption, damaged shards), more than max_skipped_fraction={max_fraction} "
            "(--model.init_args.max_skipped_fraction). Repair or drop the damaged shards, or raise the limit."
        )
