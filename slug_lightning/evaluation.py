"""Zero-shot evaluation of a CLIP on labelled sets: a reusable evaluator for search probes, and
``ZeroShotModule``, the LightningModule behind ``python -m slug_lightning evaluate``.

Both count per-class hits with :class:`~slug_lightning.zero_shot.ZeroShotCounts` over each rank's shard of
every set; the counts are summed across ranks, so accuracies are exact on any number of devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from typing_extensions import override

from slug_lightning.zero_shot import (
    ZeroShotCounts,
    accuracy,
    class_prompts,
    classifier_from_tokens,
    image_features,
    zero_shot_classifier,
)


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ZeroShotEvaluator:
    """Evaluates a model on every set of a ``ZeroShotDataModule``, reusing what an edit leaves unchanged.

    A full run keeps the image features and class classifiers as a reference; a probe that edits one
    tower recomputes only that tower's side and reuses the other's reference.

    Args:
        model: Anything with ``encode_image``/``encode_text``.
        tokenizer: The model's tokenizer.
        datamodule: A set-up ``ZeroShotDataModule`` (its ``transform`` set).
        keep_classes: Class names whose images are always fully kept by subsetting (forget concepts).
        device: Where to compute.
    """

    def __init__(self, model: nn.Module, tokenizer, datamodule, keep_classes: Sequence[str] = (),
                 device: torch.device | str = "cpu") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.rank, self.world_size = _rank_and_world()
        self.datasets = datamodule.datasets(keep_classes=tuple(keep_classes))
        self.templates = {spec.name: list(spec.templates) for spec in datamodule.sets}
        self.loaders = {
            name: datamodule.loader(name, self.rank, self.world_size, keep_classes=tuple(keep_classes))
            for name in self.datasets
        }
        self._features: dict[str, tuple[Tensor, Tensor]] = {}
        self._classifiers: dict[str, Tensor] = {}
        self._tokens: dict[str, Tensor] = {}

    def class_names(self, set_name: str) -> list[str]:
        return list(self.datasets[set_name].class_names)

    def _image_features(self, name: str) -> tuple[Tensor, Tensor]:
        features, labels = [], []
        for images, targets in self.loaders[name]:
            features.append(image_features(self.model, images.to(self.device)))
            labels.append(targets.to(self.device))
        if not features:  # this rank's shard is empty
            return torch.zeros(0, 1, device=self.device), torch.zeros(0, dtype=torch.long, device=self.device)
        return torch.cat(features), torch.cat(labels)

    @torch.no_grad()
    def run(self, edited_tower: str | None = None) -> dict[str, Tensor]:
        """Per-set count tables ``[num_classes, 3]`` (images, top-1 hits, top-5 hits), summed over ranks.

        Args:
            edited_tower: None evaluates everything and keeps the image features and classifiers as the
                reference for later probes. ``"vision"`` recomputes only the image features (the reference
                classifiers still hold, a vision edit cannot change them); ``"language"`` only the
                classifiers. Probe results never replace the reference.
        """
        was_training = self.model.training
        self.model.eval()
        counts = {}
        for name, dataset in self.datasets.items():
            if edited_tower in (None, "language") or name not in self._classifiers:
                if name not in self._tokens:  # prompts never change; tokenizing them is not free
                    self._tokens[name] = self.tokenizer(class_prompts(dataset.class_names, self.templates[name]))
                classifier = classifier_from_tokens(self.model, self._tokens[name], len(self.templates[name]),
                                                    self.device)
                if edited_tower is None:
                    self._classifiers[name] = classifier
            else:
                classifier = self._classifiers[name]
            if edited_tower in (None, "vision") or name not in self._features:
                features, labels = self._image_features(name)
                if edited_tower is None:
                    self._features[name] = features, labels
            else:
                features, labels = self._features[name]
            metric = ZeroShotCounts(len(dataset.class_names), sync_on_compute=self.world_size > 1).to(self.device)
            if labels.numel():
                metric.update(features @ classifier, labels)
            counts[name] = metric.compute().cpu()
        self.model.train(was_training)
        return counts


def summarize(counts: Mapping[str, Tensor], class_names: Mapping[str, Sequence[str]],
              forget: Mapping[str, str]) -> dict:
    """Forget and test accuracies from per-set count tables.

    Args:
        counts: Per-set count tables.
        class_names: Per-set class lists (label order).
        forget: Forget concept name → the set whose images of that class measure its forget accuracy.

    Returns:
        ``{"forget": {concept: {top1, top5, count}}, "test": {set: {top1, top5, count}}}`` where a set's
        test accuracy covers all its images except those of any forget concept.
    """
    excluded = {name: set() for name in counts}
    result = {"forget": {}, "test": {}}
    for concept, set_name in forget.items():
        index = list(class_names[set_name]).index(concept)
        excluded[set_name].add(index)
        result["forget"][concept] = accuracy(counts[set_name], [index])
    for name, table in counts.items():
        rows = [i for i in range(table.shape[0]) if i not in excluded[name]]
        result["test"][name] = accuracy(table, rows)
    return result


class ZeroShotModule(L.LightningModule):
    """Zero-shot top-1/top-5 of a CLIP on the sets of a ``ZeroShotDataModule`` (one dataloader per set).

    Args:
        model_name: OpenCLIP model name.
        pretrained: Pretrained tag or local checkpoint file (None: random initialisation).
    """

    def __init__(self, model_name: str = "slug-tiny", pretrained: str | None = None) -> None:
        super().__init__()
        from slug_lightning.models import load_clip

        loaded = load_clip(model_name, pretrained)
        self.model, self.preprocess, self.tokenizer = loaded.model, loaded.preprocess, loaded.tokenizer
        self.metrics = nn.ModuleList()
        self.results: dict[str, dict[str, float]] = {}

    @classmethod
    def wrap(cls, module: nn.Module) -> "ZeroShotModule":
        """Evaluate the CLIP held by another module (its ``model``, ``preprocess`` and ``tokenizer``)."""
        for attribute in ("model", "preprocess", "tokenizer"):
            if not hasattr(module, attribute):
                raise TypeError(f"{type(module).__name__} has no `{attribute}` to evaluate.")
        wrapper = cls.__new__(cls)
        L.LightningModule.__init__(wrapper)
        wrapper.model, wrapper.preprocess, wrapper.tokenizer = module.model, module.preprocess, module.tokenizer
        wrapper.metrics = nn.ModuleList()
        wrapper.results = {}
        return wrapper

    @override
    def on_validation_start(self) -> None:
        datamodule = self.trainer.datamodule
        datasets = datamodule.datasets()
        self.set_names = list(datasets)
        self.classifiers = [
            zero_shot_classifier(self.model, self.tokenizer, datasets[name].class_names,
                                 list(spec.templates), self.device)
            for name, spec in zip(self.set_names, datamodule.sets)
        ]
        self.metrics = nn.ModuleList(ZeroShotCounts(len(datasets[name].class_names)) for name in self.set_names)
        self.metrics.to(self.device)

    @override
    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        logits = image_features(self.model, images) @ self.classifiers[dataloader_idx]
        self.metrics[dataloader_idx].update(logits, labels)

    @override
    def on_validation_epoch_end(self) -> None:
        for name, metric in zip(self.set_names, self.metrics):
            self.results[name] = accuracy(metric.compute().cpu())
            metric.reset()
            for key in ("top1", "top5"):
                self.log(f"{name}/{key}", self.results[name][key], add_dataloader_idx=False)

    # `test` is the same evaluation on the datamodule's test loaders.
    on_test_start = on_validation_start
    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end
