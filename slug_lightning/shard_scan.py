"""Caption-only scans of LAION-style shards: how many pairs a stream would index, and what a set of shards holds.

They read captions through :func:`slug_lightning.shards.read_shard` (never images, nothing written to disk):
:func:`count_kept` for the length of a stream, :func:`scan_shards` for the pre-flight check of ``unlearn``
(:mod:`slug_lightning.validation`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from slug_lightning.concepts import Concept
from slug_lightning.shards import BrokenShard, Sample, counted_loss, read_shard


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
        for record in read_shard(url, with_images=False):
            if isinstance(record, Sample) and record.caption is not None:
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
        broken: ``(url, reason, samples read before the damage, samples lost)`` of every truncated or corrupt
            shard; the samples lost are None when no img2dataset file beside the shard says how many it holds.
        words: Distinct caption words and capitalised word pairs (names), for near-match suggestions.
    """

    shards: int = 0
    captions: int = 0
    matches: dict[str, int] = field(default_factory=dict)
    without_caption: int = 0
    without_image: int = 0
    broken: list[tuple[str, str, int, int | None]] = field(default_factory=list)
    words: set[str] = field(default_factory=set)

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
    urls: Sequence[str], concepts: Sequence[Concept] = (), max_words: int = 200_000, enough: int | None = None
) -> ShardScan:
    """Read the captions of shards (never their images, nothing written to disk) and count concept mentions.

    Args:
        urls: Shard files.
        concepts: Concepts whose caption matches are counted.
        max_words: Stop collecting vocabulary words beyond this many (bounds memory on large sets).
        enough: Stop after the shard in which every concept has reached this many matches (a smoke run's
            read); None reads every shard. :attr:`ShardScan.shards` counts the shards read.

    Returns:
        The counts, broken shards and caption vocabulary.

    Example::

        >>> scan = scan_shards(expand_shards("shards/*.tar"), [Concept("Elon Musk")])  # doctest: +SKIP
        >>> scan.captions, scan.matches  # doctest: +SKIP
        (12000, {'Elon Musk': 412})
    """
    scan = ShardScan(matches={c.name: 0 for c in concepts})
    for url in urls:
        if enough is not None and concepts and all(count >= enough for count in scan.matches.values()):
            break
        scan.shards += 1
        read = 0
        for record in read_shard(url, with_images=False):
            if isinstance(record, BrokenShard):
                scan.broken.append((url, record.reason, read, record.lost))
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
