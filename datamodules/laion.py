"""LAION-style image-caption shards: training pairs, forget sets and the retain set (METHOD §1).

Shards are webdataset tars as img2dataset writes them, local or remote (``pipe:``, HTTP(S), fsspec URLs);
:mod:`slug_lightning.shards` expands shard patterns and reads shards through webdataset's tar stages,
:mod:`slug_lightning.shard_scan` reads their captions (from img2dataset's ``.parquet`` index where there is one). This
module turns what they read into streams of pairs: :class:`PairStream` reads shards whole and filters captions (the
training and retain streams); a concept's forget stream is a
:class:`~slug_lightning.datamodules.forget_stream.ForgetStream` of the pairs the caption scan found, which opens only
the shards that hold one. Both split a stream as follows; the rest of this docstring is about :class:`PairStream`.

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
still holds its index; its owner skips it and counts it in the ``skipped`` field of that batch (and warns
once per stream with the count). A sample without a readable caption, and a truncated or corrupt shard
(read up to the damage, the rest skipped and warned about), are seen by every worker alike and are counted
once, by rank 0 in the batch that was being assembled when they were met (or in the final batch when they
come after it). A damaged shard counts the samples it lost when img2dataset's ``<shard>_stats.json`` or
``<shard>.parquet`` beside it says how many it holds (:func:`~slug_lightning.shards.expected_samples`), else 1,
a lower bound. So the sum of ``skipped`` over all batches of all ranks is the number of broken samples plus what
the damaged shards lost.

The module is longer than the project's ~500 lines because the split above lives in two places that must agree:
the stream that indexes and owns samples, and the DataModule that builds its loaders (workers, epochs, ranks). What
both pair streams share (decoding, collation) is in :mod:`~slug_lightning.datamodules.pair_batches`.
"""

from __future__ import annotations

import random
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import chain
from typing import Any

import lightning
import PIL.Image
import torch
from torch import Tensor
from torch.utils.data import DataLoader, get_worker_info

from slug_lightning.caption_index import INDEX_MODES
from slug_lightning.concepts import Concept, as_concepts
from slug_lightning.datamodules.forget_stream import ForgetStream
from slug_lightning.datamodules.labelled import ZeroShotDataModule
from slug_lightning.datamodules.pair_batches import PairBatches, Share, warn_unreadable
from slug_lightning.distributed import rank_and_world
from slug_lightning.errors import ConfigError, UserError
from slug_lightning.labelled_sets import LabelledSet
from slug_lightning.shard_scan import ShardScan, count_kept, scan_shards
from slug_lightning.shard_sources import READ_TIMEOUT
from slug_lightning.shards import BrokenShard, Sample, expand_shards, read_shard

# --------------------------------------------------------------------------------------------------
# Shuffling


def _shuffle_buffer(
    records: Iterable[Sample | BrokenShard], rng: random.Random, size: int
) -> Iterator[Sample | BrokenShard]:
    """Shuffle samples within a bounded buffer; shard markers pass straight through."""
    buffer: list[Sample] = []
    for record in records:
        if isinstance(record, BrokenShard):
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


def _matches_no_concept(concepts: tuple[Concept, ...], caption: str) -> bool:
    return not any(concept.matches(caption) for concept in concepts)


# --------------------------------------------------------------------------------------------------
# The stream


class PairStream(PairBatches):
    """Image-caption pairs from shards, filtered by caption, in global batches shared by ranks and workers.

    Each item is this rank's share of one global batch: ``{"image": FloatTensor[b, C, H, W],
    "text": LongTensor[b, context_length], "key": list[str], "skipped": LongTensor[()]}``. Use it with
    ``DataLoader(stream, batch_size=None)``; see the module docstring for how samples are split.

    Args:
        urls: Shards (local files, ``pipe:`` commands, HTTP(S) or fsspec URLs), read in this order (see
            :func:`~slug_lightning.shards.expand_shards`).
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
        augmentation_seed: For a random ``transform`` (a training augmentation): run it on each image under
            torch's and Python's generators seeded by ``(augmentation_seed, sample key)``, so a pair gets the
            same augmentation in every run, on any number of ranks and workers. None calls ``transform`` as is.
        read_timeout: Seconds a remote shard's read may wait for data before the shard counts as broken there.

    Raises:
        ValueError: An empty shard list, or a non-positive size or timeout, or a rank outside ``[0, world_size)``.

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
        augmentation_seed: int | None = None,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        super().__init__(
            transform,
            tokenizer,
            batch_size,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
            augmentation_seed=augmentation_seed,
            read_timeout=read_timeout,
        )
        if isinstance(urls, str) or not urls:
            raise ValueError(f"PairStream needs a non-empty list of shard files, got {urls!r}; see expand_shards.")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be positive, got {buffer_size}.")
        self.urls = list(urls)
        self.keep = keep
        self.shuffle = shuffle
        self.seed = seed
        self.buffer_size = buffer_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with the seed, decides the shuffled order."""
        self.epoch = int(epoch)

    def _records(self) -> Iterator[Sample | BrokenShard]:
        """The ordered record stream every worker of every rank reads (before filtering and indexing)."""
        urls = list(self.urls)
        read = partial(read_shard, timeout=self.read_timeout)
        if not self.shuffle:
            return chain.from_iterable(map(read, urls))
        # A string seed hashes deterministically (unlike tuples), so all processes draw the same order.
        rng = random.Random(f"PairStream:{self.seed}:{self.epoch}")
        rng.shuffle(urls)
        return _shuffle_buffer(chain.from_iterable(map(read, urls)), rng, self.buffer_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self._batches(self._records(), worker, num_workers)

    def _batches(
        self, records: Iterable[Sample | BrokenShard], worker: int, num_workers: int
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
        shares: dict[int, Share] = {}  # owned global batches not yet yielded
        unreadable: list[str] = []  # keys of this worker's samples without a decodable image

        def release(g: int, final_batch: int) -> dict[str, Any]:
            share = shares.pop(g)
            if self.rank == 0:
                share.skipped += sum(c for b, c in events.items() if b == g or (b > g and g == final_batch))
            for b in [b for b in events if b <= g]:
                del events[b]
            return self._collate(share)

        for record in records:
            if isinstance(record, BrokenShard):
                if self.rank == 0 and worker == 0:
                    warnings.warn(
                        f"Shard {record.url!r} is truncated or corrupt ({record.reason}); the rest of it "
                        f"is skipped and counted in 'skipped': {record.describe()}.",
                        stacklevel=2,
                    )
                if record.counted:
                    events[indexed // size] += record.counted
                continue
            if record.caption is None:
                events[indexed // size] += 1
                continue
            if self.keep is not None and not self.keep(record.caption):
                continue
            g, position = divmod(indexed, size)
            indexed += 1
            if g % num_workers == worker:
                share = shares.setdefault(g, Share())
                if position % self.world_size == self.rank and not self._add(share, record):
                    unreadable.append(record.key)
            # A finished batch is not the final one once the batch after it is certain to be yielded.
            certain = self._batches_certain(indexed)
            for done in [d for d in shares if d + 2 <= certain]:
                yield release(done, final_batch=certain - 1)

        num_batches = self._batches_certain(indexed)
        final_batch = num_batches - 1
        for g in sorted(shares):
            if g <= final_batch:
                yield release(g, final_batch)
        warn_unreadable(unreadable)
        if events and num_batches == 0 and self.rank == 0 and worker == 0:
            warnings.warn(
                f"{sum(events.values())} broken sample(s) or shard(s) could not be counted: the stream "
                "has no batch to count them in.",
                stacklevel=2,
            )


# --------------------------------------------------------------------------------------------------
# The Lightning datamodule


def check_val_check_interval(interval: Any) -> None:
    """Refuse a ``trainer.val_check_interval`` of 0 steps or below: Lightning divides by 0 later, and refuses a
    negative one with a traceback.

    Raises:
        UserError: Naming the option and what is valid.
    """
    number = isinstance(interval, (int, float)) and not isinstance(interval, bool)
    if number and (interval < 0 or (isinstance(interval, int) and interval == 0)):
        raise UserError(
            f"trainer.val_check_interval must be a number of training steps >= 1 (an int) or a share of an "
            f"epoch in (0, 1] (a float), got {interval!r}."
        )


# Lightning warns that the length of an IterableDataset may be wrong under several workers. The training loader's
# is exact: every global batch is assembled by one worker, and each rank yields the same number of batches.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined", category=UserWarning)


class _EpochDataLoader(DataLoader):
    """A DataLoader that tells its stream the trainer's epoch each time an epoch starts iterating it.

    Lightning calls ``set_epoch`` only on samplers, which an IterableDataset does not have. With
    ``num_batches`` the loader has a length (the batches of one pass), from which Lightning knows the steps of
    a ``max_epochs`` run; without it, it has none, as a stream has none.
    """

    def __init__(
        self, dataset: PairStream, epoch_source: Callable[[], int], num_batches: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch_source = epoch_source
        self.num_batches = num_batches

    def __iter__(self):  # noqa: ANN204 - DataLoader's own iterator type is private
        self.dataset.set_epoch(self.epoch_source())
        batches = 0
        for batch in super().__iter__():
            batches += 1
            yield batch
        if not batches:  # else a run bounded by steps would go through empty epochs forever
            raise UserError(
                f"The training shards yield no batch: they hold fewer pairs than one global batch of "
                f"batch_size={self.dataset.batch_size} (a final partial batch is dropped). Lower "
                "--data.init_args.batch_size or add shards."
            )

    def __len__(self) -> int:
        if self.num_batches is None:
            return super().__len__()  # a TypeError: the stream has no length
        return self.num_batches


class LaionDataModule(lightning.LightningDataModule):
    """Image-caption pairs from LAION-style shards: training pairs, forget sets and the retain set.

    ``fit`` trains on every pair of ``shards``. For unlearning, ``predict_dataloader`` returns one forget
    stream per concept (pairs of ``forget_shards`` whose caption mentions it) followed by the retain
    stream (pairs of ``shards`` whose caption mentions no concept). Every stream is split across ranks
    and workers so that each pair is seen exactly once; see :class:`PairStream`. The forget pairs are found by one
    caption read of ``forget_shards`` (:meth:`caption_scan`, which ``unlearn``'s pre-flight check makes), from
    img2dataset's ``.parquet`` index beside each shard where there is one (``caption_index``).

    Shards may be local files or remote: ``pipe:`` commands (``pipe:aws s3 cp s3://bucket/laion/00000.tar -``),
    HTTP(S) URLs and fsspec URLs (``s3://``, ``gs://``, ``hf://``; ``pip install "slug-lightning[remote]"``), with
    brace patterns; see :mod:`slug_lightning.shard_sources`.

    ``transform`` and ``tokenizer`` are taken from the LightningModule (``preprocess`` and ``tokenizer``)
    in ``setup`` unless set on the datamodule beforehand; with ``retain_augmentation``, so is
    ``retain_transform`` (``train_preprocess``).

    ``fit`` validates on ``val_sets`` (labelled image sets, one validation loader each, sharded across ranks
    without padding) when given: ``CLIPContrastive`` logs their zero-shot top-1 as ``val/top1``. How often is
    Lightning's ``trainer.val_check_interval``: an integer N validates every N training steps, which needs
    ``trainer.check_val_every_n_epoch: null`` (a pass over the shards has no fixed length); left out, the sets are
    validated at the end of each pass. When the run is bounded by ``max_epochs`` instead of ``max_steps``, the
    training loader gets a length (the pairs are counted once, reading captions only), so that the learning rate
    schedule and the progress bar know where the run ends.

    Args:
        shards: Shard pattern(s) of the training pairs, also the source of the retain set: braces
            (``"shards/{00000..00099}.tar"``, ``"https://host/laion/{00000..00099}.tar"``), globs (local and fsspec
            URLs), several joined by ``"::"`` or given as a list.
        forget_shards: Shard pattern(s) the forget pairs are filtered from; default: ``shards``.
        concepts: Concepts to forget, matched on captions: names (``[Vesna Fairbank, "Ines Yardley"]``), or
            ``{name: ..., aliases: [...]}`` where other spellings must match too.
        batch_size: Global batch size, shared by all devices.
        num_workers: DataLoader worker processes per device.
        shuffle: Shuffle the training pairs, differently each epoch (forget and retain streams are never
            shuffled).
        seed: Seed of the training shuffle and of the retain augmentation.
        min_forget_pairs: Fewest forget pairs a concept may have (counted on captions before the gradient
            pass, by ``unlearn``'s pre-flight check): a gradient averaged over a handful of pairs is mostly
            noise. Default 8; 1 accepts any non-empty forget set.
        max_forget_share: Largest share of captions one concept may match, measured by ``unlearn``'s pre-flight
            check on the captions of ``shards`` (all of them when they are the forget shards, else the first
            few shards). A spelling that common (an alias such as "a") makes the forget set a slice of
            everything, and forgetting it damages the whole model. Above it the run is refused; above
            :data:`~slug_lightning.validation.WARN_FORGET_SHARE` it is warned about. Default 0.25 (a person of
            the demo world is 2.5 % of its captions); 1 turns the refusal off.
        retain_augmentation: Feed the retain stream through the model's training transform (OpenCLIP's random
            resized crop; ``retain_transform``), as the paper's code computes G_r, instead of the evaluation
            transform. Each pair's crop is drawn from a generator seeded by ``seed`` and the pair's key, so G_r is
            the same in every run and on any number of devices. The forget streams keep the evaluation
            transform, as in the paper's code. Default False.
        val_sets: Labelled image sets to validate ``fit`` on (zero-shot classification), e.g.
            ``[{name: holdout, root: eval/holdout}]`` for an image folder ``eval/holdout/<class>/*.jpg``; their
            images must not be in the shards. None: no validation.
        val_batch_size: Images per validation batch.
        caption_index: Where the captions of the forget shards are read to find each concept's forget pairs (by
            ``unlearn``'s pre-flight check, and for the forget streams): ``auto`` reads img2dataset's ``.parquet``
            beside a shard where there is one and the tar otherwise, ``parquet`` requires it beside every shard,
            ``tar`` always reads the tars. The forget pass then opens only the shards that hold a pair (see
            :mod:`slug_lightning.caption_index`). Default ``auto``.
        read_timeout: Seconds a read of a remote shard (``pipe:``, HTTP(S)) may wait for data; a source that stalls
            longer counts as a broken shard (skipped and counted against ``max_skipped_fraction``), or is refused by
            the pre-flight. Default 60.

    Raises:
        ConfigError: A non-positive ``batch_size``, ``min_forget_pairs``, ``val_batch_size`` or ``read_timeout``, a
            negative ``num_workers``, a ``max_forget_share`` outside (0, 1], an unknown ``caption_index`` (a
            ValueError).

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
        concepts: list[str | Concept] | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        min_forget_pairs: int = 8,
        max_forget_share: float = 0.25,
        retain_augmentation: bool = False,
        val_sets: list[LabelledSet] | None = None,
        val_batch_size: int = 256,
        caption_index: str = "auto",
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(
                f"batch_size must be a positive global batch size, got {batch_size}.", "batch_size", batch_size
            )
        if min_forget_pairs < 1:
            raise ConfigError(
                f"min_forget_pairs must be >= 1, got {min_forget_pairs}.", "min_forget_pairs", min_forget_pairs
            )
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}.", "num_workers", num_workers)
        if not 0.0 < max_forget_share <= 1.0:
            raise ConfigError(
                f"max_forget_share must be in (0, 1] (1 turns the check off), got {max_forget_share}.",
                "max_forget_share",
                max_forget_share,
            )
        if val_batch_size < 1:
            raise ConfigError(f"val_batch_size must be >= 1, got {val_batch_size}.", "val_batch_size", val_batch_size)
        if caption_index not in INDEX_MODES:
            raise ConfigError(
                f"caption_index must be one of {', '.join(INDEX_MODES)}, got {caption_index!r}.",
                "caption_index",
                caption_index,
            )
        if isinstance(read_timeout, bool) or not read_timeout > 0:
            raise ConfigError(
                f"read_timeout must be a positive number of seconds, got {read_timeout}.", "read_timeout", read_timeout
            )
        self.shards = shards
        self.forget_shards = shards if forget_shards is None else forget_shards
        self.concepts = as_concepts(list(concepts or []))
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.min_forget_pairs = min_forget_pairs
        self.max_forget_share = max_forget_share
        self.retain_augmentation = retain_augmentation
        self.val_sets = list(val_sets or [])
        self.caption_index = caption_index
        self.read_timeout = float(read_timeout)
        # the last caption scan of the forget shards, with what it was made for (see caption_scan)
        self._caption_scan: tuple[tuple, ShardScan] | None = None
        # Checks the sets' names now; their folders are read in setup.
        self._validation = ZeroShotDataModule(self.val_sets, val_batch_size, num_workers) if self.val_sets else None
        self._epoch_batches: int | None = None
        self.transform: Callable[[PIL.Image.Image], Tensor] | None = None
        self.retain_transform: Callable[[PIL.Image.Image], Tensor] | None = None
        self.tokenizer: Callable[[list[str]], Tensor] | None = None

    def setup(self, stage: str) -> None:
        """Check the shards exist and take ``transform``/``tokenizer`` from the model when not set.

        For ``fit`` and ``validate`` it also reads the folders of ``val_sets`` and checks that the trainer
        validates every N steps as asked (see the class docstring).

        Raises:
            FileNotFoundError: A shard pattern names missing files.
            RuntimeError: Neither the datamodule nor the LightningModule provides a transform or tokenizer.
            UserError: A validation set cannot be read, or ``trainer.val_check_interval`` is an integer below 1 or
                comes without ``trainer.check_val_every_n_epoch: null``.
        """
        expand_shards(self.shards)
        expand_shards(self.forget_shards)
        module = self.trainer.lightning_module if self.trainer is not None else None
        wanted = [("transform", "preprocess"), ("tokenizer", "tokenizer")]
        if self.retain_augmentation:
            wanted.append(("retain_transform", "train_preprocess"))
        for name, source in wanted:
            if getattr(self, name) is None:
                value = getattr(module, source, None)
                if value is None:
                    raise RuntimeError(
                        f"LaionDataModule has no {name}: set `datamodule.{name}` before running, or use a "
                        f"LightningModule that exposes `{source}` (as this project's CLIP modules do)."
                    )
                setattr(self, name, value)
        if self._validation is not None and stage in ("fit", "validate"):
            self._setup_validation(stage)

    def _setup_validation(self, stage: str) -> None:
        self._validation.transform = self.transform
        try:
            self._validation.datasets()
        except (OSError, ValueError) as error:
            raise UserError(f"LaionDataModule val_sets: {error}") from error
        if self.trainer is None or stage != "fit":
            return
        interval = self.trainer.val_check_interval
        check_val_check_interval(interval)
        if isinstance(interval, int) and self.trainer.check_val_every_n_epoch is not None:
            raise UserError(
                f"trainer.val_check_interval={interval} validates val_sets every {interval} training steps only with "
                "trainer.check_val_every_n_epoch: null; otherwise Lightning counts the steps of each pass over the "
                "shards anew, and a pass may be shorter. Set check_val_every_n_epoch to null."
            )

    def train_dataloader(self) -> DataLoader:
        """All pairs of ``shards``, reshuffled each epoch if ``shuffle``; a final partial batch is dropped.

        Without ``trainer.max_steps`` the loader has a length, the global batches of one pass (see
        :meth:`epoch_batches`), so that Lightning knows how many steps ``max_epochs`` makes.
        """
        stream = self._stream(self.shards, keep=None, shuffle=self.shuffle, drop_last=True)
        bounded_by_epochs = self.trainer is not None and self.trainer.max_steps == -1
        num_batches = self.epoch_batches() if bounded_by_epochs else None
        return _EpochDataLoader(stream, self._current_epoch, num_batches, **self._loader_kwargs())

    def epoch_batches(self) -> int:
        """Global training batches in one pass over ``shards`` (counted once on captions, then cached).

        Raises:
            UserError: The shards hold fewer pairs than one batch.
        """
        if self._epoch_batches is None:
            pairs = count_kept(expand_shards(self.shards), timeout=self.read_timeout)
            if pairs < self.batch_size:
                raise UserError(
                    f"The shards {self.shards!r} hold {pairs} pairs, fewer than one training batch of "
                    f"batch_size={self.batch_size} (a final partial batch is dropped); lower batch_size."
                )
            self._epoch_batches = pairs // self.batch_size
        return self._epoch_batches

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per set of ``val_sets``, this rank's share of it; none without them (then Lightning runs no
        validation loop, and does not warn that the model's ``validation_step`` goes unused)."""
        rank, world_size = rank_and_world(self.trainer) if self.trainer is not None else (0, 1)
        return [self._validation.loader(spec.name, rank, world_size) for spec in self.val_sets]

    def forget_dataloader(self, concept: Concept) -> DataLoader:
        """Pairs of ``forget_shards`` whose caption mentions ``concept``, in order, nothing dropped.

        They are the pairs :meth:`caption_scan` found; the stream opens only the shards that hold them
        (:class:`~slug_lightning.datamodules.forget_stream.ForgetStream`).
        """
        scan = self._scan_for(concept)
        self._check_ready()
        rank, world_size = rank_and_world(self.trainer) if self.trainer is not None else (0, 1)
        stream = ForgetStream(
            scan.pairs[concept.name],
            self.transform,
            self.tokenizer,
            self.batch_size,
            skipped_at=scan.skipped_at[concept.name],
            rank=rank,
            world_size=world_size,
            read_timeout=self.read_timeout,
        )
        return self._loader(stream)

    def caption_scan(self, enough: int | None = None) -> ShardScan:
        """The captions of ``forget_shards`` read for ``concepts`` (as ``caption_index`` says): pair counts and forget
        pairs. The forget streams take their pairs from the last scan, so that the pre-flight's read serves the
        gradient pass too; a complete scan is not repeated while the shards, concepts and settings stay the same.

        Args:
            enough: Stop after the shard in which every concept has this many pairs (a smoke run's pre-flight;
                its forget streams are then the pairs found so far). None reads every shard.

        Raises:
            UserError: As :func:`~slug_lightning.shard_scan.scan_shards`.
        """
        urls = expand_shards(self.forget_shards)
        key = (tuple(urls), tuple(self.concepts), self.caption_index)
        if enough is None and self._caption_scan is not None:
            scanned, scan = self._caption_scan
            if scanned == key and scan.shards == len(urls):
                return scan
        scan = scan_shards(
            urls, self.concepts, enough=enough, caption_index=self.caption_index, timeout=self.read_timeout
        )
        self._caption_scan = key, scan
        return scan

    def _scan_for(self, concept: Concept) -> ShardScan:
        """A scan that holds ``concept``'s pairs: the last one when it was made for these shards and concepts (the
        pre-flight's, or a smoke run's partial one), else a new one."""
        if concept not in self.concepts:
            urls = expand_shards(self.forget_shards)
            return scan_shards(urls, [concept], caption_index=self.caption_index, timeout=self.read_timeout)
        if self._caption_scan is not None:
            scanned, scan = self._caption_scan
            if scanned == (tuple(expand_shards(self.forget_shards)), tuple(self.concepts), self.caption_index):
                return scan
        return self.caption_scan()

    def retain_dataloader(self) -> DataLoader:
        """Pairs of ``shards`` whose caption mentions no concept, in order, nothing dropped; through
        ``retain_transform``, seeded per pair, with ``retain_augmentation``."""
        keep = partial(_matches_no_concept, tuple(self.concepts))
        if not self.retain_augmentation:
            return self._loader(self._stream(self.shards, keep=keep))
        if self.retain_transform is None:
            raise RuntimeError(
                "LaionDataModule(retain_augmentation=True) has no retain_transform: set "
                "`datamodule.retain_transform` (OpenCLIP's training transform), or use a "
                "LightningModule that exposes `train_preprocess` (a GradientCollector built from a "
                "model name does)."
            )
        stream = self._stream(self.shards, keep=keep)
        stream.transform, stream.augmentation_seed = self.retain_transform, self.seed
        return self._loader(stream)

    def predict_dataloader(self) -> list[DataLoader]:
        """One forget stream per concept (dataloader_idx k is concept k), then the retain stream (last).

        Raises:
            ValueError: No concepts are configured.
        """
        if not self.concepts:
            raise ValueError("LaionDataModule has no concepts: set `concepts` to the concepts to forget.")
        return [self.forget_dataloader(c) for c in self.concepts] + [self.retain_dataloader()]

    def predict_streams(self) -> list[tuple[str, int | None]]:
        """The name of each loader of :meth:`predict_dataloader` and the batches each rank reads from it, where the
        last caption scan (:meth:`caption_scan`) tells without reading more, else None; for progress bars.

        A forget stream reads the pairs the scan found; the retain stream the other captions of ``shards``, known
        when the scan read every one of them (``forget_shards`` are ``shards`` and the scan was not cut short).
        Every rank reads a share of each global batch, so its batches are the global ones.
        """
        names = [f"forget {concept.name}" for concept in self.concepts] + ["retain"]
        batches: list[int | None] = [None] * len(names)
        if self._caption_scan is not None:
            scanned, scan = self._caption_scan
            urls = expand_shards(self.forget_shards)
            if scanned == (tuple(urls), tuple(self.concepts), self.caption_index):
                found = [scan.pairs[concept.name] for concept in self.concepts]
                batches[:-1] = [-(-len(pairs) // self.batch_size) for pairs in found]
                if scan.shards == len(urls) and expand_shards(self.shards) == urls:
                    retain = scan.captions - len({pair for pairs in found for pair in pairs})
                    batches[-1] = -(-retain // self.batch_size)
        return list(zip(names, batches))

    def count_pairs(self, concept: Concept | None) -> int:
        """How many pairs the forget stream of ``concept`` (or, for None, the retain stream) indexes.

        Reads captions only, a concept's from :meth:`caption_scan`; pairs whose image turns out to be broken are
        included.
        """
        if concept is None:
            keep = partial(_matches_no_concept, tuple(self.concepts))
            return count_kept(expand_shards(self.shards), keep, timeout=self.read_timeout)
        return len(self._scan_for(concept).pairs[concept.name])

    def _current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def _stream(
        self,
        shards: str | list[str],
        keep: Callable[[str], bool] | None,
        shuffle: bool = False,
        drop_last: bool = False,
    ) -> PairStream:
        self._check_ready()
        rank, world_size = rank_and_world(self.trainer) if self.trainer is not None else (0, 1)
        return PairStream(
            expand_shards(shards),
            self.transform,
            self.tokenizer,
            self.batch_size,
            keep=keep,
            rank=rank,
            world_size=world_size,
            shuffle=shuffle,
            seed=self.seed,
            drop_last=drop_last,
            read_timeout=self.read_timeout,
        )

    def _check_ready(self) -> None:
        if self.transform is None or self.tokenizer is None:
            raise RuntimeError(
                "LaionDataModule has no transform/tokenizer yet: call setup() with a trainer whose module "
                "exposes `preprocess` and `tokenizer`, or set `datamodule.transform` and `.tokenizer`."
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
