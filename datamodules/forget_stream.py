"""A concept's forget stream, from the forget set a caption scan found beforehand (METHOD §1).

The caption scan (:func:`slug_lightning.shard_scan.scan_shards`, the pre-flight's; from img2dataset's index or the
tars) lists the forget set as ``(shard, key)`` pairs in stream order. Knowing them up front, every worker of every
rank knows which pairs are its own without reading anything, so it opens only the shards that hold one of them and
reads only those samples: a forget set of a few thousand pairs among millions costs a few shards, not all of them.

The split is :class:`PairStream`'s (:mod:`slug_lightning.datamodules.laion`): pair ``i`` belongs to global batch
``i // batch_size``, assembled by worker ``g % num_workers`` of every rank, its position going to rank
``position % world_size``. So a forget set smaller than ranks x workers is still seen exactly once, every rank
yields the same number of batches, and the batches (and gradients) are the same as a :class:`PairStream` filtering
the same shards by the concept would give. webdataset's own ``split_by_node``/``split_by_worker`` hand out whole
shards instead, which would make the global batches, and the gradients, depend on the number of devices.

Broken samples: a pair whose sample is missing from its shard (damaged, or changed since the scan), has no image or
one that does not decode is skipped by its owner and counted in that batch's ``skipped``. The broken samples the
scan met between pairs (no caption, what a damaged shard lost) are counted by rank 0, in the batch that was being
assembled when they were met, as :class:`PairStream` counts them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import PIL.Image
from torch import Tensor
from torch.utils.data import get_worker_info

from slug_lightning.datamodules.pair_batches import PairBatches, Share, warn_unreadable
from slug_lightning.shard_sources import READ_TIMEOUT
from slug_lightning.shards import BrokenShard, Sample, read_shard


def owned_positions(
    num_pairs: int, batch_size: int, num_batches: int, rank: int, world_size: int, worker: int, num_workers: int
) -> dict[int, range]:
    """The pairs one worker of one rank assembles: for each of its global batches, the indices of its rank's share.

    Example::

        >>> {g: list(r) for g, r in owned_positions(7, 3, 3, rank=1, world_size=2, worker=0, num_workers=2).items()}
        {0: [1], 2: []}
    """
    return {
        g: range(g * batch_size + rank, min((g + 1) * batch_size, num_pairs), world_size)
        for g in range(worker, num_batches, num_workers)
    }


class ForgetStream(PairBatches):
    """The pairs of a forget set listed beforehand, in global batches shared by ranks and workers.

    Each item is this rank's share of one global batch, as :class:`~slug_lightning.datamodules.laion.PairStream`
    yields them. Use it with ``DataLoader(stream, batch_size=None)``.

    Args:
        pairs: ``(shard, key)`` of each pair, in stream order (shards in the order they are read, each shard's pairs
            together): :attr:`ShardScan.pairs <slug_lightning.shard_scan.ShardScan.pairs>` of a concept.
        transform: Turns a PIL RGB image into a ``[C, H, W]`` tensor.
        tokenizer: Turns a list of captions into a ``[n, context_length]`` tensor of token ids.
        batch_size: The global batch size, shared by all ranks.
        skipped_at: Broken samples met between pairs, ``{pairs before them: count}``
            (:attr:`ShardScan.skipped_at <slug_lightning.shard_scan.ShardScan.skipped_at>`); rank 0 counts them.
        rank: This process's rank.
        world_size: Number of ranks.
        drop_last: Drop the final global batch when it is smaller than ``batch_size``.
        read_timeout: Seconds a remote shard's read may wait for data before the shard counts as broken there.

    Raises:
        ValueError: A non-positive size or timeout, or a rank outside ``[0, world_size)``.

    Example::

        >>> scan = scan_shards(expand_shards("shards/*.tar"), [musk], caption_index="auto")   # doctest: +SKIP
        >>> stream = ForgetStream(scan.pairs[musk.name], preprocess, tokenizer, 256,           # doctest: +SKIP
        ...                       skipped_at=scan.skipped_at[musk.name])
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        transform: Callable[[PIL.Image.Image], Tensor],
        tokenizer: Callable[[list[str]], Tensor],
        batch_size: int,
        *,
        skipped_at: Mapping[int, int] | None = None,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        super().__init__(
            transform,
            tokenizer,
            batch_size,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
            read_timeout=read_timeout,
        )
        self.pairs = list(pairs)
        self.skipped_at = {int(n): int(c) for n, c in (skipped_at or {}).items() if c}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self._batches(worker, num_workers)

    def _batches(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """Read this worker's pairs shard by shard and yield its global batches' shares in order."""
        num_batches = self._batches_certain(len(self.pairs))
        owned = owned_positions(
            len(self.pairs), self.batch_size, num_batches, self.rank, self.world_size, worker, num_workers
        )
        wanted: dict[str, set[str]] = {}  # shard -> keys of this worker's pairs in it, in the order they are read
        for positions in owned.values():
            for i in positions:
                shard, key = self.pairs[i]
                wanted.setdefault(shard, set()).add(key)
        skipped = self._skipped_per_batch(num_batches)
        unreadable: list[str] = []
        shard, samples = None, {}
        for g, positions in owned.items():
            share = Share(skipped=skipped.get(g, 0) if self.rank == 0 else 0)
            for i in positions:
                if self.pairs[i][0] != shard:  # a shard's pairs are together: the previous one is done
                    shard = self.pairs[i][0]
                    samples = self._read(shard, wanted[shard])
                sample = samples.get(self.pairs[i][1])
                if sample is None:  # warned about with its shard
                    share.skipped += 1
                elif not self._add(share, sample):
                    unreadable.append(sample.key)
            yield self._collate(share)
        warn_unreadable(unreadable)
        if self.skipped_at and num_batches == 0 and self.rank == 0 and worker == 0:
            warnings.warn(
                f"{sum(self.skipped_at.values())} broken sample(s) or shard(s) could not be counted: the stream "
                "has no batch to count them in.",
                stacklevel=2,
            )

    def _skipped_per_batch(self, num_batches: int) -> dict[int, int]:
        """The scan's broken samples by the global batch that counts them: the one being assembled when they were
        met, or the final one for those met after it."""
        per_batch: dict[int, int] = {}
        for before, count in self.skipped_at.items():
            g = min(before // self.batch_size, num_batches - 1)
            if g >= 0:
                per_batch[g] = per_batch.get(g, 0) + count
        return per_batch

    def _read(self, shard: str, keys: Collection[str]) -> dict[str, Sample]:
        """The samples of ``shard`` with these keys (the first of each key); warns about those it does not hold."""
        samples: dict[str, Sample] = {}
        damage = None
        for record in read_shard(shard, keys=keys, timeout=self.read_timeout):
            if isinstance(record, BrokenShard):
                damage = f"is truncated or corrupt ({record.reason})"
            else:
                samples.setdefault(record.key, record)
        missing = len(set(keys) - samples.keys())
        if missing:
            warnings.warn(
                f"Shard {shard!r} {damage or 'does not hold every pair the caption scan listed in it'}: {missing} of "
                "this stream's pair(s) in it were not read; they are skipped and counted in 'skipped'.",
                stacklevel=2,
            )
        return samples
