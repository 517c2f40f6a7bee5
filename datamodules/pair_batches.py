"""This rank's share of global batches of image-caption pairs: decoding, augmentation and collation, shared by the two
pair streams (:class:`~slug_lightning.datamodules.laion.PairStream`, which reads shards whole and filters captions,
and :class:`~slug_lightning.datamodules.forget_stream.ForgetStream`, which reads a forget set found beforehand).

Both split a stream the same way, whatever the number of devices and workers (the module docstring of
:mod:`slug_lightning.datamodules.laion` has the whole of it): kept pair ``i`` belongs to global batch
``g = i // batch_size``, which worker ``g % num_workers`` of every rank assembles; its position ``p = i % batch_size``
goes to rank ``p % world_size``.
"""

from __future__ import annotations

import io
import random
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from slug_lightning.shard_sources import READ_TIMEOUT
from slug_lightning.shards import Sample

# PIL raises these for undecodable images; SyntaxError is what its PNG reader uses for broken chunks.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError)


def decode_image(data: bytes | None) -> PIL.Image.Image | None:
    """Decode image bytes to RGB, or None when they are absent or not a readable image."""
    if data is None:
        return None
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except _DECODE_ERRORS:
        return None


@dataclass
class Share:
    """This rank's share of one global batch, as one worker assembles it."""

    keys: list[str] = field(default_factory=list)
    images: list[Tensor] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    skipped: int = 0


class PairBatches(IterableDataset):
    """What the pair streams share: their split settings, and turning samples into this rank's batch shares.

    Args:
        transform: Turns a PIL RGB image into a ``[C, H, W]`` tensor (e.g. open_clip's ``preprocess``).
        tokenizer: Turns a list of captions into a ``[n, context_length]`` tensor of token ids.
        batch_size: The global batch size, shared by all ranks.
        rank: This process's rank.
        world_size: Number of ranks.
        drop_last: Drop the final global batch when it is smaller than ``batch_size``.
        augmentation_seed: For a random ``transform`` (a training augmentation): run it on each image under
            torch's and Python's generators seeded by ``(augmentation_seed, sample key)``, so a pair gets the
            same augmentation in every run, on any number of ranks and workers. None calls ``transform`` as is.
        read_timeout: Seconds a remote shard's read may wait for data before the shard counts as broken there.

    Raises:
        ValueError: A non-positive size or timeout, or a rank outside ``[0, world_size)``.
    """

    def __init__(
        self,
        transform: Callable[[PIL.Image.Image], Tensor],
        tokenizer: Callable[[list[str]], Tensor],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        augmentation_seed: int | None = None,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive global batch size, got {batch_size}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got {rank=}, {world_size=}.")
        if not read_timeout > 0:
            raise ValueError(f"read_timeout must be a positive number of seconds, got {read_timeout}.")
        self.transform = transform
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.augmentation_seed = augmentation_seed
        self.read_timeout = read_timeout
        self._empty_shapes: tuple[tuple[int, ...], int] | None = None

    def _batches_certain(self, indexed: int) -> int:
        """How many global batches are certain to be yielded once ``indexed`` samples are indexed."""
        return indexed // self.batch_size if self.drop_last else -(-indexed // self.batch_size)

    def _add(self, share: Share, sample: Sample) -> bool:
        """Decode and add a sample to ``share``; False (and counted as skipped) when it has no readable image."""
        image = decode_image(sample.image)
        if image is None:
            share.skipped += 1
            return False
        share.keys.append(sample.key)
        share.images.append(self._transform(image, sample.key))
        share.captions.append(sample.caption)
        return True

    def _transform(self, image: PIL.Image.Image, key: str) -> Tensor:
        if self.augmentation_seed is None:
            return self.transform(image)
        # The sample's own generator: its augmentation does not depend on which worker or rank decodes it, nor on
        # what was decoded before. torchvision's random transforms draw from torch, some of open_clip's from
        # Python's random; both are restored afterwards.
        seed = zlib.crc32(f"{self.augmentation_seed}:{key}".encode())
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.transform(image)
            finally:
                random.setstate(state)

    def _collate(self, share: Share) -> dict[str, Any]:
        if share.images:
            image = torch.stack(share.images)
            text = torch.as_tensor(self.tokenizer(share.captions), dtype=torch.long)
        else:
            image_shape, context_length = self._shapes()
            image = torch.empty((0, *image_shape))
            text = torch.empty((0, context_length), dtype=torch.long)
        return {"image": image, "text": text, "key": share.keys, "skipped": torch.tensor(share.skipped)}

    def _shapes(self) -> tuple[tuple[int, ...], int]:
        """Image shape and context length for zero-row batches, probed once on a blank image and caption."""
        if self._empty_shapes is None:
            image = self.transform(PIL.Image.new("RGB", (64, 64)))
            text = self.tokenizer([""])
            self._empty_shapes = (tuple(image.shape), int(text.shape[-1]))
        return self._empty_shapes


def warn_unreadable(keys: Sequence[str]) -> None:
    """One warning per stream (and worker), not one per image, for the samples skipped for want of an image."""
    if keys:
        warnings.warn(
            f"{len(keys)} sample(s) of this stream have no image or one that does not decode (e.g. keys "
            f"{list(keys[:3])}); they were skipped and counted in 'skipped'.",
            stacklevel=3,
        )
