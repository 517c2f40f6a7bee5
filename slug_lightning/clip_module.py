"""``CLIPContrastive``: train or fine-tune any OpenCLIP model on image–caption shards (``fit``)."""

from __future__ import annotations

import math

import lightning as L
import torch
from typing_extensions import override

from slug_lightning.artifacts import save_state_dict
from slug_lightning.losses import retain_loss_sum
from slug_lightning.models import load_clip


class CLIPContrastive(L.LightningModule):
    """CLIP contrastive training: symmetric InfoNCE over the global batch, learned logit scale.

    This is how the demo's tiny CLIP is made, and it works on any img2dataset-style shards. The model is
    exposed as ``self.model`` with its ``preprocess`` and ``tokenizer``, which the datamodules pick up.

    Args:
        model_name: OpenCLIP model config name (e.g. ``"slug-tiny"``, ``"ViT-B-32"``).
        pretrained: Pretrained tag or local checkpoint to start from; None trains from scratch.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay, applied to matrices only (not to gains, biases, embeddings or
            the logit scale).
        warmup_steps: Linear warm-up steps before the cosine decay.
        betas: AdamW betas.
        max_logit_scale: Clamp of the learned logit scale (log of 100, as CLIP does).
        export_path: After training, write the CLIP's weights here as safetensors (rank 0), loadable with
            ``open_clip.create_model(model_name, pretrained=export_path)``.
    """

    def __init__(
        self,
        model_name: str = "slug-tiny",
        pretrained: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 50,
        betas: tuple[float, float] = (0.9, 0.98),
        max_logit_scale: float = math.log(100.0),
        export_path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        loaded = load_clip(model_name, pretrained)
        self.model = loaded.model.train()
        self.preprocess = loaded.preprocess
        self.tokenizer = loaded.tokenizer

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
    def on_train_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            save_state_dict(self.hparams.export_path, self.model.state_dict(),
                            metadata={"format": "pt", "model": self.hparams.model_name})

    @override
    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue
            is_matrix = parameter.ndim >= 2 and "embedding" not in name
            (decay if is_matrix else no_decay).append(parameter)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            betas=self.hparams.betas,
        )
        total = self.trainer.estimated_stepping_batches
        # Streams have no length: without max_steps the schedule cannot know where the cosine ends, so the
        # rate stays at its peak after warm-up.
        total = int(total) if math.isfinite(total) else None
        warmup = min(self.hparams.warmup_steps, total or self.hparams.warmup_steps)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if total is None:
                return 1.0
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
