"""``CLIPContrastive``: train or fine-tune any OpenCLIP model on image–caption shards (``fit``).

The learning rate follows :func:`warmup_cosine` over the run's optimizer steps (known from ``max_steps``, or from
``max_epochs`` and the training loader's length), at a peak :func:`scaled_lr` gives for the global batch. With
validation sets on the datamodule (``LaionDataModule(val_sets=...)``) it logs zero-shot top-1 on them as
``val/top1``, which Lightning's ``ModelCheckpoint`` can monitor; the weights exported at the end are then the best
checkpoint's or the last ones, as ``export`` says.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from slug_lightning.artifacts import save_state_dict
from slug_lightning.errors import ConfigError, UserError
from slug_lightning.losses import retain_loss_sum
from slug_lightning.models import load_clip, read_state_dict
from slug_lightning.zero_shot import ZeroShotCounts, accuracy, image_features, zero_shot_classifier

if TYPE_CHECKING:
    from slug_lightning.labelled_sets import LabelledSet

VAL_METRIC = "val/top1"


def warmup_cosine(step: int, warmup_steps: int, total_steps: int | None) -> float:
    """The learning-rate factor at optimizer step ``step`` (counted from 0).

    A linear warm-up reaches 1 at step ``warmup_steps``, then a cosine falls to 0 at ``total_steps``. The
    warm-up is cut to ``total_steps`` when the run is shorter. With ``total_steps=None`` (a run whose length is
    unknown) the factor stays at 1 after the warm-up.

    Example::

        >>> [round(warmup_cosine(s, 2, 6), 3) for s in range(6)]
        [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
    """
    warmup = warmup_steps if total_steps is None else min(warmup_steps, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if total_steps is None:
        return 1.0
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def scaled_lr(lr: float, batch_size: int, base_batch_size: int | None) -> float:
    """The peak learning rate for a global batch of ``batch_size`` pairs: the linear scaling rule.

    ``lr`` is the rate for ``base_batch_size`` pairs and is scaled by ``batch_size / base_batch_size``;
    ``base_batch_size=None`` means ``lr`` is already the rate to use.

    Example::

        >>> scaled_lr(4e-3, 64, 256), scaled_lr(4e-3, 64, None)
        (0.001, 0.004)
    """
    return lr if base_batch_size is None else lr * batch_size / base_batch_size


class CLIPContrastive(L.LightningModule):
    """CLIP contrastive training: symmetric InfoNCE over the global batch, learned logit scale.

    This is how the demo's tiny CLIP is made, and it works on any img2dataset-style shards. The model is
    exposed as ``self.model`` with its ``preprocess`` and ``tokenizer``, which the datamodules pick up.

    The learning rate warms up linearly for ``warmup_steps`` optimizer steps, then follows a cosine to 0 at
    the end of the run: ``trainer.max_steps``, or ``trainer.max_epochs`` times the batches of an epoch (see
    :func:`warmup_cosine`). Validation, when the datamodule has validation loaders of labelled sets (such
    as ``LaionDataModule(val_sets=...)``), is zero-shot classification of each set: ``val/<set>/top1`` per
    set and their mean ``val/top1`` (in the progress bar) are logged, for ``ModelCheckpoint`` to monitor.

    Args:
        model_name: OpenCLIP model config name (e.g. ``"slug-tiny"``, ``"ViT-B-32"``).
        pretrained: Pretrained tag or local checkpoint to start from; None trains from scratch.
        lr: Peak learning rate of AdamW for a global batch of ``base_batch_size`` pairs, scaled linearly to the
            run's global batch (:func:`scaled_lr`). The default, 8e-3 per 256 pairs, is 1e-3 at batch 32 and
            the demo's 4e-3 at 128: on a 10-class world that is not the demo's, 12 epochs at batch 128 reached
            84 % zero-shot top-1 with it and 70.5 % with the old 1e-3 at any batch, which at batch 32 it equals
            (``benchmarks/results/fit_defaults.md``). Fine-tuning a pretrained CLIP needs far less (e.g. 1e-5).
        weight_decay: AdamW weight decay, applied to matrices only (not to gains, biases, embeddings or
            the logit scale).
        warmup_steps: Linear warm-up steps before the cosine decay.
        betas: AdamW betas.
        max_logit_scale: Clamp of the learned logit scale (log of 100, as CLIP does).
        export_path: After training, write the CLIP's weights here as safetensors (rank 0), loadable with
            ``open_clip.create_model(model_name, pretrained=export_path)``.
        base_batch_size: The global batch ``lr`` is given for. The run's global batch is the datamodule's
            ``batch_size`` (LaionDataModule's is global) times ``trainer.accumulate_grad_batches``. None:
            ``lr`` is the rate used, whatever the batch.
        export: Which weights ``export_path`` gets: ``"best"``, those of the best checkpoint of the
            ``ModelCheckpoint`` that monitors a metric (e.g. ``monitor: val/top1, mode: max``), or the last
            weights when there is no such checkpoint; ``"last"``, those at the end of training. The log says
            which were written. In ``benchmarks/results/fit_defaults.md`` the best checkpoint's weights were up to
            5 points below the last ones on held-out images in well-sized runs (the best of a few validations on
            a small set is partly noise) but 13 points above them in a run that over-trained (the demo's 500 steps
            on a smaller world), hence ``"best"``.

    Raises:
        ConfigError: A non-positive ``lr`` or ``base_batch_size``, a negative ``warmup_steps``, or an unknown
            ``export`` (a ValueError).

    Example::

        >>> module = CLIPContrastive("slug-tiny", export_path="slug-tiny.safetensors")  # doctest: +SKIP
        >>> data = LaionDataModule("shards/*.tar", batch_size=64,  # peak rate 8e-3 * 64 / 256  # doctest: +SKIP
        ...                        val_sets=[LabelledSet("holdout", root="eval")])
        >>> L.Trainer(max_epochs=12, val_check_interval=50, check_val_every_n_epoch=None,  # doctest: +SKIP
        ...           callbacks=[ModelCheckpoint(monitor="val/top1", mode="max")]).fit(module, data)
    """

    def __init__(
        self,
        model_name: str = "slug-tiny",
        pretrained: str | None = None,
        lr: float = 8e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        betas: tuple[float, float] = (0.9, 0.98),
        max_logit_scale: float = math.log(100.0),
        export_path: str | None = None,
        base_batch_size: int | None = 256,
        export: Literal["best", "last"] = "best",
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ConfigError(f"lr must be a positive learning rate, got {lr!r}.", "lr", lr)
        if base_batch_size is not None and base_batch_size < 1:
            raise ConfigError(
                f"base_batch_size must be a number of pairs >= 1, or null, got {base_batch_size!r}.",
                "base_batch_size",
                base_batch_size,
            )
        if warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {warmup_steps!r}.", "warmup_steps", warmup_steps)
        if export not in ("best", "last"):
            raise ConfigError(f"export must be 'best' or 'last', got {export!r}.", "export", export)
        self.save_hyperparameters()
        loaded = load_clip(model_name, pretrained)
        self.model = loaded.model.train()
        self.preprocess = loaded.preprocess
        self.tokenizer = loaded.tokenizer
        # One (LabelledSet, classifier, counts) per validation loader, rebuilt at each validation: the text tower
        # that makes the classifiers is being trained. A plain list keeps the metrics out of the checkpoints.
        self._val_sets: list[tuple[LabelledSet, torch.Tensor, ZeroShotCounts]] = []

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image_features = self.model.encode_image(batch["image"])
        text_features = self.model.encode_text(batch["text"])
        pairs = torch.tensor(float(batch["image"].shape[0]), device=self.device)
        global_pairs = self.trainer.strategy.reduce(pairs, reduce_op="sum")
        # Each rank holds the losses of its own pairs; scaled by the global count so that DDP's gradient
        # averaging yields the gradient of the global-batch mean loss.
        loss_sum = retain_loss_sum(image_features, text_features, self.model.logit_scale)
        loss = loss_sum * self.trainer.world_size / global_pairs.clamp(min=1)
        self.log("train/loss", loss_sum / pairs.clamp(min=1), prog_bar=True, batch_size=int(pairs))
        self.log("train/logit_scale", self.model.logit_scale.exp(), batch_size=int(pairs))
        return loss

    @override
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, self.hparams.max_logit_scale)

    @override
    def on_validation_start(self) -> None:
        loaders = self.trainer.val_dataloaders
        loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        self._val_sets = []
        for loader in loaders:
            dataset = loader.dataset
            if not all(hasattr(dataset, name) for name in ("spec", "class_names", "templates")):
                raise TypeError(
                    f"CLIPContrastive validates by zero-shot classification and needs loaders of "
                    f"LabelledImages (e.g. LaionDataModule(val_sets=...)), got a {type(dataset).__name__}."
                )
            classifier = zero_shot_classifier(
                self.model, self.tokenizer, dataset.class_names, dataset.templates, self.device
            )
            counts = ZeroShotCounts(len(dataset.class_names)).to(self.device)
            self._val_sets.append((dataset.spec, classifier, counts))

    @override
    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        _, classifier, counts = self._val_sets[dataloader_idx]
        counts.update(image_features(self.model, images) @ classifier, labels)

    @override
    def on_validation_epoch_end(self) -> None:
        top1 = []
        for spec, _, counts in self._val_sets:
            # summed over ranks: exact on any number of devices
            result = accuracy(counts.compute().cpu(), averaging=spec.averaging)
            counts.reset()
            self.log(f"val/{spec.name}/top1", result["top1"], add_dataloader_idx=False)
            top1.append(result["top1"])
        if top1:
            self.log(VAL_METRIC, sum(top1) / len(top1), prog_bar=True, add_dataloader_idx=False)

    @override
    def on_train_end(self) -> None:
        if not self.hparams.export_path or not self.trainer.is_global_zero:
            return
        state_dict, which = self._weights_to_export()
        save_state_dict(
            self.hparams.export_path, state_dict, metadata={"format": "pt", "model": self.hparams.model_name}
        )
        rank_zero_info(f"[fit] exported the {which} to {self.hparams.export_path}")

    def _weights_to_export(self) -> tuple[dict[str, torch.Tensor], str]:
        """The CLIP state dict that ``export`` asks for, and words saying which it is."""
        last = f"last weights (step {self.trainer.global_step}"
        if self.hparams.export == "last":
            return self.model.state_dict(), f"{last})"
        monitoring = [c for c in self.trainer.checkpoint_callbacks if getattr(c, "monitor", None)]
        if not monitoring:
            return self.model.state_dict(), f"{last}; export=best, but no ModelCheckpoint monitors a metric)"
        checkpoint = monitoring[0]
        if not checkpoint.best_model_path:
            return self.model.state_dict(), f"{last}; export=best, but no best checkpoint was saved)"
        best = (
            f"best weights ({checkpoint.monitor} = {float(checkpoint.best_model_score):.4f}, "
            f"{checkpoint.best_model_path})"
        )
        return read_state_dict(checkpoint.best_model_path), best

    @override
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue
            is_matrix = parameter.ndim >= 2 and "embedding" not in name
            (decay if is_matrix else no_decay).append(parameter)
        peak = self._peak_lr()
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=peak,
            betas=self.hparams.betas,
        )
        # Lightning knows the number of optimizer steps from max_steps, or from max_epochs and the length of the
        # training loader (LaionDataModule gives its loader one when max_steps is not set).
        total = self.trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) and total > 0 else None
        warmup = self.hparams.warmup_steps
        if total is None:
            rank_zero_warn(
                "CLIPContrastive: the number of training steps is unknown (no trainer.max_steps, and the "
                "training loader has no length), so the learning rate stays at its peak after warm-up; "
                "set trainer.max_steps for the cosine decay."
            )
            rank_zero_info(f"[fit] learning rate: peak {peak:.3g}, warm-up {warmup} steps, no decay")
        else:
            rank_zero_info(
                f"[fit] learning rate: peak {peak:.3g}, warm-up {min(warmup, total)} steps, cosine to 0 at step {total}"
            )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _peak_lr(self) -> float:
        base = self.hparams.base_batch_size
        if base is None:
            return self.hparams.lr
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if not isinstance(batch_size, int):
            raise UserError(
                f"CLIPContrastive(base_batch_size={base}) scales lr to the global batch, read from the datamodule's "
                f"batch_size (as LaionDataModule has); this run's datamodule has none. Set base_batch_size to null "
                "and give lr for your batch."
            )
        return scaled_lr(self.hparams.lr, batch_size * self.trainer.accumulate_grad_batches, base)
