"""LAION-style image-caption shards: training pairs, forget sets and the retain set (METHOD §1).

Shards are webdataset tars as img2dataset writes them: per sample ``<key>.jpg`` (or ``.jpeg``, ``.png``,
``.webp``), ``<key>.txt`` with the caption and optionally ``<key>.json``, which is ignored here.

How a stream is split (it does not depend on the number of devices or workers):

- Every dataloader worker of every rank reads the same ordered sample stream: all shards in order (a
  permutation seeded by ``(seed, epoch)`` when shuffling) and applies the caption filter ``keep``.
- Kept samples get consecutive indices ``i``. ``batch_size`` is the global batch size ``B``: sample ``i``
  belongs to global batch ``g = i // B``; its position ``p = i % B`` goes to rank ``p % world_size``;
  global batch ``g`` is assembled by worker ``g % num_workers`` of every rank. The DataLoader visits its
  workers round-robin, so every rank's ``j``-th batch is its share of global batch ``j``, and every rank
  yields the same number of batches (zero-row ones where its share is empty).
- A worker decodes only the images it owns; captions are read by everyone because indexing needs them.

A tiny forget set (one tar with fewer samples than ranks x workers) is therefore seen exactly once.

Broken samples never stop a stream. A kept sample without an image, or whose image does not decode,
still holds its index; its owner skips it and counts it in the ``skipped`` field of that batch. A
sample without a readable caption, and a truncated or corrupt shard (read up to the damage, the rest
skipped, counted once and warned about), are seen by every worker alike and are counted once, by rank 0
in the batch that was being assembled when they were met (or in the final batch when they come after
it). So the sum of ``skipped`` over all batches of all ranks is the number of broken samples plus
broken shards.
"""

from __future__ import annotations

import glob
import io
import os
import random
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import chain
from typing import Any

import braceexpand  # webdataset's own brace expander, installed with it
import lightning
import PIL.Image
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from slug_lightning.concepts import Concept, as_concepts

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
_GLOB_CHARACTERS = frozenset("*?[")
# Compressions tarfile reads in stream mode. Their offsets count decompressed bytes, so the end-of-archive
# check below is left out for them and truncation shows up as tarfile's read errors.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_TAR_BLOCK = 512
# PIL raises these for undecodable images; SyntaxError is what its PNG reader uses for broken chunks.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError)


# --------------------------------------------------------------------------------------------------
# Shard patterns


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Expand shard patterns into the sorted list of local shard files they name.

    A pattern may use braces (``"dir/{00000..00011}.tar"``) and glob wildcards (``"dir/*.tar"``);
    several patterns are separated by ``"::"`` or given as a list.

    Args:
        shards: One pattern string (possibly ``"::"``-separated) or a sequence of patterns.

    Returns:
        The matching files, sorted and without duplicates.

    Raises:
        FileNotFoundError: A pattern matches no file, or a brace expansion names files that do not exist.
        ValueError: No pattern is given, or a pattern names a directory.

    Example::

        >>> expand_shards("shards/{00000..00001}.tar::extra/*.tar")  # doctest: +SKIP
        ['extra/a.tar', 'shards/00000.tar', 'shards/00001.tar']
    """
    patterns = shards.split("::") if isinstance(shards, str) else [p for s in shards for p in s.split("::")]
    patterns = [p.strip() for p in patterns if p.strip()]
    if not patterns:
        raise ValueError(f"No shard pattern given: {shards!r}. Example: 'shards/{{00000..00099}}.tar'.")
    paths: set[str] = set()
    for pattern in patterns:
        paths.update(_expand_pattern(pattern))
    return sorted(paths)


def _expand_pattern(pattern: str) -> list[str]:
    """The files one pattern (braces, then globs) names; raises when any part names nothing."""
    hint = " Only local files can be read." if "://" in pattern else ""
    found, missing = [], []
    for candidate in braceexpand.braceexpand(os.path.expanduser(pattern)):
        if _GLOB_CHARACTERS & set(candidate):
            matches = sorted(glob.glob(candidate))
            if not matches:
                raise FileNotFoundError(f"Shard pattern {pattern!r} matches no file ({candidate!r}).{hint}")
            found.extend(matches)
        elif os.path.exists(candidate):
            found.append(candidate)
        else:
            missing.append(candidate)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        if len(missing) > 5:
            shown += f" and {len(missing) - 5} more"
        raise FileNotFoundError(
            f"Shard pattern {pattern!r} names {len(missing)} missing file(s): {shown}.{hint}"
        )
    directories = [p for p in found if os.path.isdir(p)]
    if directories:
        raise ValueError(
            f"Shard pattern {pattern!r} names directories {directories[:5]}; name the tar files, "
            f"e.g. {os.path.join(directories[0], '*.tar')!r}."
        )
    return found


# --------------------------------------------------------------------------------------------------
# Reading shards


@dataclass(frozen=True)
class _Sample:
    """One sample as read from a shard: its key, caption (None if absent or unreadable) and image bytes."""

    key: str
    caption: str | None
    image: bytes | None


@dataclass(frozen=True)
class _BrokenShard:
    """Marks the point where a shard stopped being readable."""

    url: str
    reason: str


def _split_member_name(name: str) -> tuple[str | None, str]:
    """``"dir/000001.jpg"`` -> (``"dir/000001"``, ``"jpg"``): the key ends at the basename's first dot."""
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        return None, ""
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def _is_compressed(path: str) -> bool:
    with open(path, "rb") as file:
        head = file.read(6)
    return head.startswith(_COMPRESSED_MAGIC)


def _ends_cleanly(path: str, end_offset: int) -> bool:
    """Whether a plain tar has an end-of-archive (zero) block where tarfile stopped reading.

    tarfile stops silently at a truncated or garbled header, so a tar cut at a member boundary would
    otherwise look complete.
    """
    with open(path, "rb") as file:
        file.seek(end_offset)
        block = file.read(_TAR_BLOCK)
    return len(block) == _TAR_BLOCK and not any(block)


def _make_sample(key: str, fields: dict[str, bytes]) -> _Sample:
    caption = None
    if CAPTION_EXTENSION in fields:
        try:
            caption = fields[CAPTION_EXTENSION].decode("utf-8")
        except UnicodeDecodeError:
            caption = None
    image = next((fields[ext] for ext in IMAGE_EXTENSIONS if ext in fields), None)
    return _Sample(key, caption, image)


def _read_shard(url: str, *, with_images: bool = True) -> Iterator[_Sample | _BrokenShard]:
    """Yield a shard's samples in order, then a ``_BrokenShard`` if it is truncated or corrupt.

    Members are grouped by key; a group is complete when the next key starts. After damage, the
    sample being read is dropped with the rest of the shard. Nothing is written to disk.

    Args:
        url: Path of the tar file.
        with_images: Read image bytes; False skips them (for caption-only scans): a sample that has an
            image member then carries ``b""`` as its image, one without carries None.
    """
    key, fields = None, {}
    wanted = {CAPTION_EXTENSION, *(IMAGE_EXTENSIONS if with_images else ())}
    try:
        with open(url, "rb") as file, tarfile.open(fileobj=file, mode="r|*") as tar:
            for member in tar:
                member_key, extension = _split_member_name(member.name)
                if not member.isreg() or member_key is None:
                    continue
                if member_key != key:
                    if key is not None:
                        yield _make_sample(key, fields)
                    key, fields = member_key, {}
                if extension in wanted and extension not in fields:
                    fields[extension] = tar.extractfile(member).read()
                elif extension in IMAGE_EXTENSIONS and extension not in fields:
                    fields[extension] = b""  # present, not read
            end_offset = tar.offset
        if not _is_compressed(url) and not _ends_cleanly(url, end_offset):
            yield _BrokenShard(url, "truncated: no end-of-archive block after the last member")
            return
    except (tarfile.TarError, OSError, EOFError) as error:
        yield _BrokenShard(url, f"{type(error).__name__}: {error}")
        return
    if key is not None:
        yield _make_sample(key, fields)


def _shuffle_buffer(
    records: Iterable[_Sample | _BrokenShard], rng: random.Random, size: int
) -> Iterator[_Sample | _BrokenShard]:
    """Shuffle samples within a bounded buffer; shard markers pass straight through."""
    buffer: list[_Sample] = []
    for record in records:
        if isinstance(record, _BrokenShard):
            yield record
            continue
        if len(buffer) < size:
            buffer.append(record)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = record
    rng.shuffle(buffer)
    yield from buffer


def _decode_image(data: bytes | None) -> PIL.Image.Image | None:
    """Decode image bytes to RGB, or None when they are absent or not a readable image."""
    if data is None:
        return None
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except _DECODE_ERRORS:
        return None


def _matches_no_concept(concepts: tuple[Concept, ...], caption: str) -> bool:
    return not any(concept.matches(caption) for concept in concepts)


# --------------------------------------------------------------------------------------------------
# The stream


@dataclass
class _Share:
    """This rank's share of one global batch, as one worker assembles it."""

    keys: list[str] = field(default_factory=list)
    images: list[Tensor] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    skipped: int = 0


class PairStream(IterableDataset):
    """Image-caption pairs from shards, filtered by caption, in global batches shared by ranks and workers.

    Each item is this rank's share of one global batch: ``{"image": FloatTensor[b, C, H, W],
    "text": LongTensor[b, context_length], "key": list[str], "skipped": LongTensor[()]}``. Use it with
    ``DataLoader(stream, batch_size=None)``; see the module docstring for how samples are split.

    Args:
        urls: Shard files, read in this order (see :func:`expand_shards`).
        transform: Turns a PIL RGB image into a ``[C, H, W]`` tensor (e.g. open_clip's ``preprocess``).
        tokenizer: Turns a list of captions into a ``[n, context_length]`` tensor of token ids.
        batch_size: The global batch size, shared by all ranks.
        keep: Caption filter; None keeps every sample.
        rank: This process's rank.
        world_size: Number of ranks.
        shuffle: Permute shard order per epoch and shuffle samples in a bounded buffer, identically on
            all ranks and workers (for training).
        seed: Seed of the shuffling; combined with the epoch.
        drop_last: Drop the final global batch when it is smaller than ``batch_size``.
        buffer_size: Number of samples in the shuffle buffer (each worker holds their bytes).

    Raises:
        ValueError: An empty shard list, or a non-positive size, or a rank outside ``[0, world_size)``.

    Example::

        >>> stream = PairStream(expand_shards("shards/*.tar"), preprocess, tokenizer, 256)  # doctest: +SKIP
        >>> loader = DataLoader(stream, batch_size=None, num_workers=4)                     # doctest: +SKIP
    """

    def __init__(
        self,
        urls: list[str],
        transform: Callable[[PIL.Image.Image], Tensor],
        tokenizer: Callable[[list[str]], Tensor],
        batch_size: int,
        *,
        keep: Callable[[str], bool] | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        buffer_size: int = 1000,
    ) -> None:
        super().__init__()
        if isinstance(urls, str) or not urls:
            raise ValueError(
                f"PairStream needs a non-empty list of shard files, got {urls!r}; see expand_shards."
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive global batch size, got {batch_size}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in [0, world_size) with world_size >= 1, got {rank=}, {world_size=}."
            )
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be positive, got {buffer_size}.")
        self.urls = list(urls)
        self.transform = transform
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.buffer_size = buffer_size
        self.epoch = 0
        self._empty_shapes: tuple[tuple[int, ...], int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with the seed, decides the shuffled order."""
        self.epoch = int(epoch)

    def _records(self) -> Iterator[_Sample | _BrokenShard]:
        """The ordered record stream every worker of every rank reads (before filtering and indexing)."""
        urls = list(self.urls)
        if not self.shuffle:
            return chain.from_iterable(map(_read_shard, urls))
        # A string seed hashes deterministically (unlike tuples), so all processes draw the same order.
        rng = random.Random(f"PairStream:{self.seed}:{self.epoch}")
        rng.shuffle(urls)
        return _shuffle_buffer(chain.from_iterable(map(_read_shard, urls)), rng, self.buffer_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self._batches(self._records(), worker, num_workers)

    def _batches(
        self, records: Iterable[_Sample | _BrokenShard], worker: int, num_workers: int
    ) -> Iterator[dict[str, Any]]:
        """Index kept samples and yield, in order, the shares of the global batches this worker owns.

        A finished batch is held back until the next global batch is certain to be yielded too: stream
        events (caption-less samples, broken shards) met after it may still have to be counted in it
        if it turns out to be the final batch.
        """
        size = self.batch_size
        indexed = 0  # kept samples so far; the next one gets this index
        # Stream events (caption-less samples, broken shards) that rank 0 counts, by the global batch
        # being assembled when they were met.
        events: Counter[int] = Counter()
        shares: dict[int, _Share] = {}  # owned global batches not yet yielded

        def release(g: int, final_batch: int) -> dict[str, Any]:
            share = shares.pop(g)
            if self.rank == 0:
                share.skipped += sum(c for b, c in events.items() if b == g or (b > g and g == final_batch))
            for b in [b for b in events if b <= g]:
                del events[b]
            return self._collate(share)

        for record in records:
            if isinstance(record, _BrokenShard):
                if self.rank == 0 and worker == 0:
                    warnings.warn(
                        f"Shard {record.url!r} is truncated or corrupt ({record.reason}); the rest of it "
                        "is skipped and counted once in 'skipped'.",
                        stacklevel=2,
                    )
                events[indexed // size] += 1
                continue
            if record.caption is None:
                events[indexed // size] += 1
                continue
            if self.keep is not None and not self.keep(record.caption):
                continue
            g, position = divmod(indexed, size)
            indexed += 1
            if g % num_workers == worker:
                share = shares.setdefault(g, _Share())
                if position % self.world_size == self.rank:
                    self._add(share, record)
            # A finished batch is not the final one once the batch after it is certain to be yielded.
            certain = self._batches_certain(indexed)
            for done in [d for d in shares if d + 2 <= certain]:
                yield release(done, final_batch=certain - 1)

        num_batches = self._batches_certain(indexed)
        final_batch = num_batches - 1
        for g in sorted(shares):
            if g <= final_batch:
                yield release(g, final_batch)
        if events and num_batches == 0 and self.rank == 0 and worker == 0:
            warnings.warn(
                f"{sum(events.values())} broken sample(s) or shard(s) could not be counted: the stream "
                "has no batch to count them in.",
                stacklevel=2,
            )

    def _batches_certain(self, indexed: int) -> int:
        """How many global batches are certain to be yielded once ``indexed`` samples are indexed."""
        return indexed // self.batch_size if self.drop_last else -(-indexed // self.batch_size)

    def _add(self, share: _Share, sample: _Sample) -> None:
        image = _decode_image(sample.image)
        if image is None:
            share.skipped += 1
            return
        share.keys.append(sample.key)
        share.images.append(self.transform(image))
        share.captions.append(sample.caption)

    def _collate(self, share: _Share) -> dict[str, Any]:
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


def count_kept(urls: Sequence[str], keep: Callable[[str], bool] | None = None) -> int:
    """Count the samples a stream over ``urls`` would index, reading captions only.

    Pairs whose image later fails to decode are included (they hold an index in the stream).

    Args:
        urls: Shard files.
        keep: Caption filter; None keeps every sample with a caption.

    Returns:
        The number of samples with a caption that ``keep`` accepts.
    """
    count = 0
    for url in urls:
        for record in _read_shard(url, with_images=False):
            if isinstance(record, _Sample) and record.caption is not None:
                count += keep is None or bool(keep(record.caption))
    return count


@dataclass
class ShardScan:
    """What a caption-only read of shards found (see :func:`scan_shards`).

    Attributes:
        shards: Number of shard files read.
        captions: Samples with a readable caption (the ones a stream would index).
        matches: Per concept name, how many of those captions mention it.
        without_caption: Samples without a readable caption.
        without_image: Samples with a caption but no image member.
        broken: ``(url, reason, samples read before the damage)`` of every truncated or corrupt shard.
        words: Distinct caption words and capitalised word pairs (names), for near-match suggestions.
    """

    shards: int = 0
    captions: int = 0
    matches: dict[str, int] = field(default_factory=dict)
    without_caption: int = 0
    without_image: int = 0
    broken: list[tuple[str, str, int]] = field(default_factory=list)
    words: set[str] = field(default_factory=set)

    @property
    def samples(self) -> int:
        """Every sample read, broken or not."""
        return self.captions + self.without_caption


_WORD = re.compile(r"[^\W\d_][\w'-]*")


def scan_shards(urls: Sequence[str], concepts: Sequence[Concept] = (), max_words: int = 200_000) -> ShardScan:
    """Read the captions of shards (never their images, nothing written to disk) and count concept mentions.

    Args:
        urls: Shard files.
        concepts: Concepts whose caption matches are counted.
        max_words: Stop collecting vocabulary words beyond this many (bounds memory on large sets).

    Returns:
        The counts, broken shards and caption vocabulary.

    Example::

        >>> scan = scan_shards(expand_shards("shards/*.tar"), [Concept("Elon Musk")])  # doctest: +SKIP
        >>> scan.captions, scan.matches  # doctest: +SKIP
        (12000, {'Elon Musk': 412})
    """
    scan = ShardScan(shards=len(urls), matches={c.name: 0 for c in concepts})
    for url in urls:
        read = 0
        for record in _read_shard(url, with_images=False):
            if isinstance(record, _BrokenShard):
                scan.broken.append((url, record.reason, read))
                continue
            read += 1
            if record.caption is None:
                scan.without_caption += 1
                continue
            scan.captions += 1
            scan.without_image += record.image is None
            for concept in concepts:
                scan.matches[concept.name] += concept.matches(record.caption)
            if len(scan.words) < max_words:
                words = _WORD.findall(record.caption)
                scan.words.update(words)
                scan.words.update(f"{a} {b}" for a, b in zip(words, words[1:]) if a[:1].isupper() and b[:1].isupper())
    return scan


# --------------------------------------------------------------------------------------------------
# The Lightning datamodule


class _EpochDataLoader(DataLoader):
    """A DataLoader that tells its stream the trainer's epoch each time an epoch starts iterating it.

    Lightning calls ``set_epoch`` only on samplers, which an IterableDataset does not have.
    """

    def __init__(self, dataset: PairStream, epoch_source: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch_source = epoch_source

    def __iter__(self):  # noqa: ANN204 - DataLoader's own iterator type is private
        self.dataset.set_epoch(self.epoch_source())
        return super().__iter__()


class LaionDataModule(lightning.LightningDataModule):
    """Image-caption pairs from LAION-style shards: training pairs, forget sets and the retain set.

    ``fit`` trains on every pair of ``shards``. For unlearning, ``predict_dataloader`` returns one forget
    stream per concept (pairs of ``forget_shards`` whose caption mentions it) followed by the retain
    stream (pairs of ``shards`` whose caption mentions no concept). Every stream is split across ranks
    and workers so that each pair is seen exactly once; see :class:`PairStream`.

    ``transform`` and ``tokenizer`` are taken from the LightningModule (``preprocess`` and ``tokenizer``)
    in ``setup`` unless set on the datamodule beforehand.

    Args:
        shards: Shard pattern(s) of the training pairs, also the source of the retain set: braces
            (``"shards/{00000..00099}.tar"``), globs, several joined by ``"::"`` or given as a list.
        forget_shards: Shard pattern(s) the forget pairs are filtered from; default: ``shards``.
        concepts: Concepts to forget (name and aliases), matched on captions.
        batch_size: Global batch size, shared by all devices.
        num_workers: DataLoader worker processes per device.
        shuffle: Shuffle the training pairs, differently each epoch (forget and retain streams are never
            shuffled).
        seed: Seed of the training shuffle.
        min_forget_pairs: Fewest forget pairs a concept may have (counted on captions before the gradient
            pass, by ``unlearn``'s pre-flight check): a gradient averaged over a handful of pairs is mostly
            noise. Default 8; 1 accepts any non-empty forget set.

    Raises:
        ValueError: A non-positive ``batch_size`` or ``min_forget_pairs``, or a negative ``num_workers``.

    Example::

        >>> musk = Concept("Elon Musk", aliases=("Musk",))
        >>> data = LaionDataModule("shards/{00000..00009}.tar", concepts=[musk])  # doctest: +SKIP
        >>> data.count_pairs(data.concepts[0])  # doctest: +SKIP
        412
    """

    def __init__(
        self,
        shards: str | list[str],
        forget_shards: str | list[str] | None = None,
        concepts: list[Concept] | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        min_forget_pairs: int = 8,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive global batch size, got {batch_size}.")
        if min_forget_pairs < 1:
            raise ValueError(f"min_forget_pairs must be >= 1, got {min_forget_pairs}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}.")
        self.shards = shards
        self.forget_shards = shards if forget_shards is None else forget_shards
        self.concepts = as_concepts(list(concepts or []))
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.min_forget_pairs = min_forget_pairs
        self.transform: Callable[[PIL.Image.Image], Tensor] | None = None
        self.tokenizer: Callable[[list[str]], Tensor] | None = None

    def setup(self, stage: str) -> None:
        """Check the shards exist and take ``transform``/``tokenizer`` from the model when not set.

        Raises:
            FileNotFoundError: A shard pattern names missing files.
            RuntimeError: Neither the datamodule nor the LightningModule provides a transform or tokenizer.
        """
        expand_shards(self.shards)
        expand_shards(self.forget_shards)
        module = self.trainer.lightning_module if self.trainer is not None else None
        for name, source in (("transform", "preprocess"), ("tokenizer", "tokenizer")):
            if getattr(self, name) is None:
                value = getattr(module, source, None)
                if value is None:
                    raise RuntimeError(
                        f"LaionDataModule has no {name}: set `datamodule.{name}` before running, or use a "
                        f"LightningModule that exposes `{source}` (as this project's CLIP modules do)."
                    )
                setattr(self, name, value)

    def train_dataloader(self) -> DataLoader:
        """All pairs of ``shards``, reshuffled each epoch if ``shuffle``; a final partial batch is dropped."""
        stream = self._stream(self.shards, keep=None, shuffle=self.shuffle, drop_last=True)
        return _EpochDataLoader(stream, self._current_epoch, **self._loader_kwargs())

    def forget_dataloader(self, concept: Concept) -> DataLoader:
        """Pairs of ``forget_shards`` whose caption mentions ``concept``, in order, nothing dropped."""
        return self._loader(self._stream(self.forget_shards, keep=concept.matches))

    def retain_dataloader(self) -> DataLoader:
        """Pairs of ``shards`` whose caption mentions no concept, in order, nothing dropped."""
        keep = partial(_matches_no_concept, tuple(self.concepts))
        return self._loader(self._stream(self.shards, keep=keep))

    def predict_dataloader(self) -> list[DataLoader]:
        """One forget stream per concept (dataloader_idx k is concept k), then the retain stream (last).

        Raises:
            ValueError: No concepts are configured.
        """
        if not self.concepts:
            raise ValueError("LaionDataModule has no concepts: set `concepts` to the concepts to forget.")
        return [self.forget_dataloader(c) for c in self.concepts] + [self.retain_dataloader()]

    def count_pairs(self, concept: Concept | None) -> int:
        """How many pairs the forget stream of ``concept`` (or, for None, the retain stream) indexes.

        Reads captions only; pairs whose image turns out to be broken are included.
        """
        if concept is None:
            return count_kept(expand_shards(self.shards), partial(_matches_no_concept, tuple(self.concepts)))
        return count_kept(expand_shards(self.forget_shards), concept.matches)

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _stream(
        self,
        shards: str | list[str],
        keep: Callable[[str], bool] | None,
        shuffle: bool = False,
        drop_last: bool = False,
    ) -> PairStream:
        if self.transform is None or self.tokenizer is None:
            raise RuntimeError(
                "LaionDataModule has no transform/tokenizer yet: call setup() with a trainer whose module "
                "exposes `preprocess` and `tokenizer`, or set `datamodule.transform` and `.tokenizer`."
            )
        rank, world_size = self._rank_and_world_size()
        return PairStream(
            expand_shards(shards), self.transform, self.tokenizer, self.batch_size, keep=keep,
            rank=rank, world_size=world_size, shuffle=shuffle, seed=self.seed, drop_last=drop_last,
        )

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "batch_size": None,  # the stream yields whole batches, built in the workers
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": False,  # fresh workers each epoch pick up the new epoch's order
        }

    def _loader(self, stream: PairStream) -> DataLoader:
        return DataLoader(stream, **self._loader_kwargs())
