"""Labelled image sets as data for zero-shot evaluation (METHOD §8): datasets, sampler and DataModule.

:class:`LabelledImages` reads one :class:`~slug_lightning.labelled_sets.LabelledSet` (its images and labels
read by :mod:`slug_lightning.labelled_sources`, its classes narrowed by
:func:`~slug_lightning.labelled_sets.select_classes`) as ``(image tensor, label)`` pairs after its seeded
``fraction`` subset (:func:`stratified_subset`); and :class:`ZeroShotDataModule` serves every set as a loader
sharded across ranks without padding (:class:`ShardSampler`), so per-class counts summed over ranks are exact.

Example::

    >>> spec = LabelledSet("identities", root="eval/identities", fraction=0.5)  # doctest: +SKIP
    >>> dataset = LabelledImages(spec, transform=preprocess, keep_classes=["Elon Musk"])  # doctest: +SKIP
    >>> dataset.class_index("Elon Musk")  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
import math
import random
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from typing_extensions import override

from slug_lightning.distributed import rank_and_world
from slug_lightning.errors import ConfigError, UserError
from slug_lightning.labelled_sets import LabelledSet, check_set_names, select_classes
from slug_lightning.labelled_sources import hf_class_labels, load_hf_split, scan_image_folder, scan_labels_file


def stratified_subset(labels: Sequence[int], fraction: float, seed: int, keep: Collection[int] = ()) -> list[int]:
    """A seeded subset of sample indices: ``fraction * n_c`` rounded half up (at least 1) of each class ``c``.

    Each class draws from its own generator, seeded by ``(seed, c)``, so the images picked for one class
    do not depend on which other classes are kept whole.

    Args:
        labels: Each sample's class.
        fraction: Share of each class kept, in (0, 1].
        seed: Seed of the draw.
        keep: Classes whose images are all kept (e.g. forget concepts).

    Returns:
        Sorted sample indices.
    """
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    chosen = []
    for label, indices in by_class.items():
        if label in keep or fraction >= 1.0:
            chosen += indices
            continue
        # Half up, not Python's half-to-even: 5% of ImageNet's 50 images per class is 3, not 2.
        count = max(1, math.floor(fraction * len(indices) + 0.5))
        chosen += random.Random(f"{seed}:{label}").sample(indices, count)
    return sorted(chosen)


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of ``range(n)``: ``indices[rank::world_size]``, without padding.

    Every index lands on exactly one rank, so per-rank counts sum to the exact totals.

    Example::

        >>> shard_indices(5, 1, 2)
        [1, 3]

    Raises:
        ValueError: If ``world_size < 1`` or ``rank`` is not in ``[0, world_size)``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
    return list(range(rank, n, world_size))


class LabelledImages(Dataset):
    """``(image, label)`` pairs of one :class:`LabelledSet` after its ``fraction`` subset.

    Args:
        spec: The set.
        transform: Applied to each RGB PIL image (e.g. OpenCLIP's ``preprocess``); None returns the image.
        keep_classes: Class names whose images are all kept by the subset (the forget concepts). Names
            that are not classes of this set are ignored: the set simply has no images of them.

    Attributes:
        class_names: Every class of the set that competes (its ``classes``) in label order, including classes
            without images.
        targets: The label of each sample.

    Raises:
        FileNotFoundError: If the set's folder, labels file or class list does not exist.
        ValueError: If the set is malformed, or a forget concept is a class of it but not among its
            ``classes``.
    """

    def __init__(self, spec: LabelledSet, transform: Callable | None = None, keep_classes: Sequence[str] = ()) -> None:
        self.spec = spec
        self.transform = transform
        self._paths: list[Path] | None = None
        self._hf = None
        if spec.labels_file is not None:
            class_names, self._paths, labels = scan_labels_file(spec)
        elif spec.root is not None:
            class_names, self._paths, labels = scan_image_folder(spec)
        else:
            self._hf = load_hf_split(spec)
            class_names, labels = hf_class_labels(self._hf, spec)
        competing, imaged = select_classes(spec, class_names, keep_classes)
        self.class_names: list[str] = [class_names[i] for i in competing]
        self._index = {name: i for i, name in enumerate(self.class_names)}
        concepts = set(keep_classes)
        keep = {i for i, name in enumerate(class_names) if name in concepts}
        # The subset draws on the full set's labels: a class keeps its images whatever `classes` leaves out.
        rows = [row for row, label in enumerate(labels) if label in imaged]
        picked = stratified_subset([labels[row] for row in rows], spec.fraction, spec.seed, keep)
        self._rows = [rows[i] for i in picked]
        label_of = {old: new for new, old in enumerate(competing)}
        self.targets: list[int] = [label_of[labels[row]] for row in self._rows]

    @property
    def image_files(self) -> list[Path] | None:
        """The image file of each sample, in sample order; None for a Hugging Face dataset."""
        return None if self._paths is None else [self._paths[row] for row in self._rows]

    @property
    def templates(self) -> list[str]:
        """The set's prompt templates."""
        return list(self.spec.templates)

    def class_index(self, name: str) -> int:
        """The label of class ``name`` (exact, case-sensitive).

        Raises:
            KeyError: If ``name`` is not a class of this set; the message lists near matches.
        """
        if name in self._index:
            return self._index[name]
        near = difflib.get_close_matches(name, self.class_names, n=5, cutoff=0.5)
        raise KeyError(
            f"{name!r} is not a class of labelled set {self.spec.name!r}; near matches: {near} "
            f"(of {len(self.class_names)} classes)."
        )

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        row = self._rows[index]
        if self._paths is not None:
            path = self._paths[row]
            try:
                with Image.open(path) as image:
                    image = image.convert("RGB")
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
                raise UserError(
                    f"Labelled set {self.spec.name!r}: image {str(path)!r} cannot be decoded ({error}); "
                    "remove or replace it."
                ) from None
        else:
            image = self._hf[row][self.spec.image_column].convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


class ShardSampler(DistributedSampler):
    """Yields one rank's :func:`shard_indices` in order: no shuffling, no padding.

    It subclasses ``DistributedSampler`` because that is how Lightning recognises a loader as already
    sharded; any other sampler it would wrap in its own, padding ``DistributedSampler``.
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        indices = shard_indices(len(dataset), rank, world_size)
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
        self.indices = indices
        self.num_samples = len(self.indices)
        self.total_size = len(dataset)

    @override
    def __iter__(self):
        return iter(self.indices)

    @override
    def __len__(self) -> int:
        return len(self.indices)


class ZeroShotDataModule(L.LightningDataModule):
    """Labelled sets for zero-shot evaluation, one loader per set, sharded across ranks without padding.

    Args:
        sets: The evaluation sets; names must be unique.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes.
        keep_classes: Class names whose images the ``fraction`` subsets always keep whole in
            ``val/test/predict_dataloader`` (the forget concepts).

    Attributes:
        transform: The image transform. If None at ``setup``, it is taken from the attached
            LightningModule's ``preprocess``.
    """

    def __init__(
        self, sets: list[LabelledSet], batch_size: int = 256, num_workers: int = 0, keep_classes: Sequence[str] = ()
    ) -> None:
        super().__init__()
        if not sets:
            raise ConfigError("ZeroShotDataModule needs at least one LabelledSet.", "sets", sets)
        check_set_names(sets)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}.", "batch_size", batch_size)
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}.", "num_workers", num_workers)
        self.sets = list(sets)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.keep_classes = tuple(keep_classes)
        self.transform: Callable | None = None
        self._datasets: dict[frozenset[str], dict[str, LabelledImages]] = {}

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.transform is not None:
            return
        module = self.trainer.lightning_module if self.trainer is not None else None
        preprocess = getattr(module, "preprocess", None)
        if preprocess is None:
            raise RuntimeError(
                "ZeroShotDataModule has no transform: set .transform, or attach it to a "
                "Trainer whose LightningModule has a `preprocess` attribute."
            )
        self.transform = preprocess

    def datasets(self, keep_classes: Sequence[str] = ()) -> dict[str, LabelledImages]:
        """Every set as a :class:`LabelledImages` by name, in ``sets`` order; built once per ``keep_classes``.

        Args:
            keep_classes: Class names whose images the ``fraction`` subsets keep whole.
        """
        key = frozenset(keep_classes)
        if key not in self._datasets:
            self._datasets[key] = {spec.name: LabelledImages(spec, self.transform, tuple(key)) for spec in self.sets}
        # The transform may be set after a first build (e.g. in setup); cached sets follow it.
        for dataset in self._datasets[key].values():
            dataset.transform = self.transform
        return self._datasets[key]

    def loader(self, name: str, rank: int = 0, world_size: int = 1, keep_classes: Sequence[str] = ()) -> DataLoader:
        """This rank's shard of set ``name``: batches of ``(images [b, C, H, W], labels [b])``, in order.

        Args:
            name: The set's name.
            rank: This process's rank.
            world_size: Number of processes; the shards of all ranks partition the set.
            keep_classes: Class names whose images the ``fraction`` subset keeps whole.

        Raises:
            KeyError: If no set is called ``name``.
            RuntimeError: If no transform is set (images could not be batched).
        """
        if self.transform is None:
            raise RuntimeError("ZeroShotDataModule.transform is not set; set it, or call setup() with a Trainer first.")
        datasets = self.datasets(keep_classes)
        if name not in datasets:
            raise KeyError(f"No labelled set {name!r}; sets: {list(datasets)}.")
        dataset = datasets[name]
        sampler = ShardSampler(dataset, rank, world_size)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def _loaders(self) -> list[DataLoader]:
        rank, world_size = rank_and_world(self.trainer) if self.trainer else (0, 1)
        return [self.loader(spec.name, rank, world_size, self.keep_classes) for spec in self.sets]

    @override
    def val_dataloader(self) -> list[DataLoader]:
        return self._loaders()

    @override
    def test_dataloader(self) -> list[DataLoader]:
        return self._loaders()

    @override
    def predict_dataloader(self) -> list[DataLoader]:
        return self._loaders()
