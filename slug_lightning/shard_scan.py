"""Caption scans of LAION-style shards: how many pairs a stream would index, what a set of shards holds, and where a
concept's forget pairs are.

:func:`count_kept` reads captions through :func:`slug_lightning.shards.read_shard` for the length of a stream.
:func:`scan_shards`, the pre-flight check of ``unlearn`` (:mod:`slug_lightning.validation`) and the source of the
forget streams (:class:`~slug_lightning.datamodules.forget_stream.ForgetStream`), reads each shard's captions from
img2dataset's index beside it (:mod:`slug_lightning.caption_index`) or from the tar itself. Nothing is written to disk.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from slug_lightning.caption_index import INDEX_MODES, CaptionIndex, IndexUnavailable, matching_rows, read_index
from slug_lightning.concepts import Concept
from slug_lightning.errors import UserError
from slug_lightning.shard_sources import READ_TIMEOUT
from slug_lightning.shards import BrokenShard, Sample, counted_loss, read_shard


def count_kept(urls: Sequence[str], keep: Callable[[str], bool] | None = None, timeout: float = READ_TIMEOUT) -> int:
    """Count the samples a stream over ``urls`` would index, reading the tars.

    Pairs whose image later fails to decode are included (they hold an index in the stream).

    Args:
        urls: Shards.
        keep: Caption filter; None keeps every sample with a caption.
        timeout: Seconds a remote read may wait for data.

    Returns:
        The number of samples with a caption that ``keep`` accepts.
    """
    count = 0
    for url in urls:
        for record in read_shard(url, timeout=timeout):
            if isinstance(record, Sample) and record.caption is not None:
                count += keep is None or bool(keep(record.caption))
    return count


@dataclass
class ShardScan:
    """What a caption read of shards found (see :func:`scan_shards`).

    Attributes:
        shards: Number of shards read.
        captions: Samples with a readable caption (the ones a stream would index).
        matches: Per concept name, how many of those captions mention it.
        without_caption: Samples without a readable caption.
        without_image: Samples with a caption but no image member (seen only in tars, not in indexes).
        broken: ``(url, reason, samples read before the damage, samples lost)`` of every truncated or corrupt
            shard; the samples lost are None when no img2dataset file beside the shard says how many it holds.
            Seen only in tars: an index says nothing of its tar's damage, which the pass finds.
        words: Distinct caption words and capitalised word pairs (names), for near-match suggestions.
        pairs: Per concept name, ``(shard, key)`` of each pair that mentions it, in stream order: its forget set.
        skipped_at: Per concept name, the broken samples (no caption, what a damaged shard lost) met after ``n`` of
            its pairs, as ``{n: count}``: where its forget stream counts them.
        indexed: The shards whose captions came from their index.
        tars: The shards whose captions came from their tar.
        unindexed: ``(url, why)`` of the shards of :attr:`tars` whose index was looked for and could not be used.
    """

    shards: int = 0
    captions: int = 0
    matches: dict[str, int] = field(default_factory=dict)
    without_caption: int = 0
    without_image: int = 0
    broken: list[tuple[str, str, int, int | None]] = field(default_factory=list)
    words: set[str] = field(default_factory=set)
    pairs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    skipped_at: dict[str, Counter[int]] = field(default_factory=dict)
    indexed: list[str] = field(default_factory=list)
    tars: list[str] = field(default_factory=list)
    unindexed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def samples(self) -> int:
        """Every sample read, broken or not."""
        return self.captions + self.without_caption

    @property
    def lost(self) -> int:
        """Samples the damaged shards lost: as their img2dataset files say, else 1 per shard (a lower bound)."""
        return sum(counted_loss(lost) for *_, lost in self.broken)

    @property
    def lost_is_lower_bound(self) -> bool:
        """Whether some damaged shard's loss is unknown, so that :attr:`lost` is a lower bound."""
        return any(lost is None for *_, lost in self.broken)


_WORD = re.compile(r"[^\W\d_][\w'-]*")


def scan_shards(
    urls: Sequence[str],
    concepts: Sequence[Concept] = (),
    max_words: int = 200_000,
    enough: int | None = None,
    *,
    caption_index: str = "tar",
    timeout: float = READ_TIMEOUT,
) -> ShardScan:
    """Read the captions of shards and count and locate concept mentions.

    A shard's captions come from its img2dataset index (:func:`~slug_lightning.caption_index.read_index`) or from
    its tar (images are read past, nothing is written to disk), as ``caption_index`` says.

    Args:
        urls: Shards.
        concepts: Concepts whose caption matches are counted and located.
        max_words: Stop collecting vocabulary words beyond this many (bounds memory on large sets). From indexes,
            words are collected only when a concept has no match (they serve its near-match suggestions).
        enough: Stop after the shard in which every concept has reached this many matches (a smoke run's
            read); None reads every shard. :attr:`ShardScan.shards` counts the shards read.
        caption_index: ``"auto"`` (a shard's index where it has one, else its tar), ``"parquet"`` (every shard's
            index) or ``"tar"``.
        timeout: Seconds a remote read may wait for data.

    Returns:
        The counts, forget pairs, broken shards and caption vocabulary.

    Raises:
        UserError: With ``caption_index="parquet"``, a shard without a usable index.
        ValueError: An unknown ``caption_index``.

    Example::

        >>> scan = scan_shards(expand_shards("shards/*.tar"), [Concept("Elon Musk")])  # doctest: +SKIP
        >>> scan.captions, scan.matches  # doctest: +SKIP
        (12000, {'Elon Musk': 412})
    """
    if caption_index not in INDEX_MODES:
        raise ValueError(f"caption_index must be one of {INDEX_MODES}, got {caption_index!r}.")
    names = [c.name for c in concepts]
    scan = ShardScan(
        matches=dict.fromkeys(names, 0),
        pairs={name: [] for name in names},
        skipped_at={name: Counter() for name in names},
    )
    for url in urls:
        if enough is not None and concepts and all(count >= enough for count in scan.matches.values()):
            break
        scan.shards += 1
        index = _index_of(url, caption_index, timeout, scan)
        if index is None:
            _scan_tar(scan, url, concepts, max_words, timeout)
        else:
            _scan_index(scan, index, concepts)
    if scan.indexed and concepts and not all(scan.matches.values()):
        for url in scan.indexed:  # read again only now: a concept without a match needs near-match suggestions
            _add_words(scan, read_index(url, timeout).captions.drop_null().to_pylist(), max_words)
    return scan


def _index_of(url: str, mode: str, timeout: float, scan: ShardScan) -> CaptionIndex | None:
    """The shard's index when ``mode`` asks for it and it can be used, else None (its tar is read)."""
    if mode == "tar":
        return None
    try:
        return read_index(url, timeout)
    except IndexUnavailable as error:
        if mode == "parquet":
            raise UserError(
                f"caption_index='parquet' reads every shard's captions from img2dataset's .parquet beside it, but "
                f"shard {url!r} has none usable: {error.reason}. Use caption_index 'auto' to read the tars of such "
                "shards."
            ) from None
        scan.unindexed.append((url, error.reason))
        return None


def _scan_index(scan: ShardScan, index: CaptionIndex, concepts: Sequence[Concept]) -> None:
    scan.indexed.append(index.url)
    scan.captions += len(index) - index.without_caption
    scan.without_caption += index.without_caption
    uncaptioned = np.flatnonzero(index.captions.is_null().to_numpy(zero_copy_only=False))
    for concept in concepts:
        rows = matching_rows(index, concept)
        pairs = scan.pairs[concept.name]
        if len(uncaptioned):  # each counted after the pairs before it, as the tar's order has them
            scan.skipped_at[concept.name].update((np.searchsorted(rows, uncaptioned) + len(pairs)).tolist())
        pairs.extend((index.url, key) for key in index.keys.take(rows).to_pylist())
        scan.matches[concept.name] += len(rows)


def _scan_tar(scan: ShardScan, url: str, concepts: Sequence[Concept], max_words: int, timeout: float) -> None:
    scan.tars.append(url)
    read = 0
    for record in read_shard(url, timeout=timeout):
        if isinstance(record, BrokenShard):
            scan.broken.append((url, record.reason, read, record.lost))
            _skipped(scan, record.counted)
            continue
        read += 1
        if record.caption is None:
            scan.without_caption += 1
            _skipped(scan, 1)
            continue
        scan.captions += 1
        scan.without_image += record.image is None
        for concept in concepts:
            if concept.matches(record.caption):
                scan.matches[concept.name] += 1
                scan.pairs[concept.name].append((url, record.key))
        _add_words(scan, [record.caption], max_words)


def _skipped(scan: ShardScan, count: int) -> None:
    for name, pairs in scan.pairs.items():
        scan.skipped_at[name][len(pairs)] += count


def _add_words(scan: ShardScan, captions: Iterable[str], max_words: int) -> None:
    for caption in captions:
        if len(scan.words) >= max_words:
            return
        words = _WORD.findall(caption)
        scan.words.update(words)
        scan.words.update(f"{a} {b}" for a, b in zip(words, words[1:]) if a[:1].isupper() and b[:1].isupper())
