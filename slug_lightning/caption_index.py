"""img2dataset's ``.parquet`` beside each shard, read as a caption index (METHOD §1).

img2dataset writes, beside every ``<shard>.tar``, a ``<shard>.parquet`` with one row per sample it tried: ``key``,
``caption``, ``status`` (``"success"`` for the samples in the tar, in the tar's order), ``url``, sizes, ... Its
``key`` and ``caption`` columns (and ``status``, to leave out failed downloads) are all a caption scan needs: they
are a few percent of the shard's bytes, read by pyarrow in C++. So at LAION scale (a concept's 1k–6k pairs among
400M) the pre-flight counts a concept's pairs from the indexes, and its forget pass opens only the shards that hold
one (:class:`~slug_lightning.datamodules.forget_stream.ForgetStream`).

``LaionDataModule(caption_index=...)`` chooses: ``"auto"`` reads a shard's index where it has one and its tar
otherwise, ``"parquet"`` requires an index for every shard, ``"tar"`` always reads the tars
(:func:`slug_lightning.shard_scan.scan_shards`).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np

from slug_lightning.concepts import Concept, name_key
from slug_lightning.shard_sources import READ_TIMEOUT, ShardSourceError, fetch, local_path, source_kind

INDEX_MODES = ("auto", "parquet", "tar")
KEY, CAPTION, STATUS = "key", "caption", "status"


class IndexUnavailable(Exception):
    """A shard has no usable index: no ``.parquet`` beside it, or one that cannot be read or is not img2dataset's.

    ``reason`` says which, in a few words.
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url!r}: {reason}")
        self.url = url
        self.reason = reason


def index_url(url: str) -> str | None:
    """Where img2dataset's ``.parquet`` of a ``.tar`` shard is: beside it, under the same name; for a ``pipe:``
    command, the same command with the shard's last ``.tar`` name changed. None for a shard not named ``.tar``.

    Example::

        >>> index_url("s3://bucket/laion/00001.tar"), index_url("pipe:aws s3 cp s3://b/00001.tar -")
        ('s3://bucket/laion/00001.parquet', 'pipe:aws s3 cp s3://b/00001.parquet -')
        >>> index_url("shards/00001.tar.gz") is None
        True
    """
    if source_kind(url) == "pipe":
        # the last ".tar" that ends a word (followed by a quote, a space or the end)
        changed, count = re.subn(r"\.tar(?=['\"\s]|$)(?!.*\.tar(?:['\"\s]|$))", ".parquet", url)
        return changed if count else None
    return url[: -len(".tar")] + ".parquet" if url.endswith(".tar") else None


@dataclass(frozen=True)
class CaptionIndex:
    """The samples of one shard as its index lists them, in the tar's order.

    Attributes:
        url: The shard.
        source: The ``.parquet`` it was read from.
        keys: The samples' keys (pyarrow string array).
        captions: Their captions, null where a sample has none (pyarrow string array).
    """

    url: str
    source: str
    keys: object
    captions: object

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def without_caption(self) -> int:
        """Samples without a caption (no ``.txt`` in the tar)."""
        return self.captions.null_count


def read_index(url: str, timeout: float = READ_TIMEOUT) -> CaptionIndex:
    """Read the index of a shard: its ``.parquet``'s ``key`` and ``caption`` columns, of the rows whose ``status``
    is ``"success"`` (all rows when there is no ``status`` column).

    A local ``.parquet`` is read column by column; a remote one is fetched whole (through the same kind of source
    as the shard, with the same ``timeout``), which is still a few percent of the shard.

    Raises:
        IndexUnavailable: No ``.parquet`` beside the shard, or one that cannot be fetched or read, or that lacks the
            ``key`` or ``caption`` column.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    location = index_url(url)
    if location is None:
        raise IndexUnavailable(url, "its name does not end in .tar, so no .parquet is looked for beside it")
    try:
        if source_kind(location) == "local":
            path = local_path(location)
            source = pq.ParquetFile(path)
        else:
            source = pq.ParquetFile(io.BytesIO(fetch(location, timeout)))
        names = source.schema_arrow.names
        missing = [name for name in (KEY, CAPTION) if name not in names]
        if missing:
            raise IndexUnavailable(url, f"{location!r} has no {' or '.join(missing)} column: not img2dataset's index")
        table = source.read(columns=[KEY, CAPTION, *([STATUS] if STATUS in names else [])])
    except FileNotFoundError:
        raise IndexUnavailable(url, f"no {location!r} beside it") from None
    except ShardSourceError as error:
        raise IndexUnavailable(url, f"{location!r} cannot be fetched: {error.reason}") from None
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError; fetch's errors are OSErrors
        raise IndexUnavailable(url, f"{location!r} cannot be read ({error})") from None
    if STATUS in names:
        table = table.filter(pc.equal(table[STATUS], "success"))
    keys = pc.cast(table[KEY].combine_chunks(), pa.string())
    captions = pc.cast(table[CAPTION].combine_chunks(), pa.string())
    return CaptionIndex(url, location, keys, captions)


def matching_rows(index: CaptionIndex, concept: Concept) -> np.ndarray:
    """The rows of ``index`` whose caption mentions ``concept`` (:meth:`Concept.matches`), in order.

    Most captions are ruled out in C++: an ASCII caption can match an ASCII spelling only if it holds the spelling's
    longest word (case-insensitively), and never a spelling that is not ASCII once case-folded. The rest, and every
    caption with other characters, are checked by :meth:`Concept.matches` itself, so the result is exactly its.
    """
    import pyarrow.compute as pc

    captions = index.captions
    if len(captions) == 0:
        return np.zeros(0, dtype=np.int64)
    candidates = pc.invert(pc.string_is_ascii(captions))
    for spelling in concept.spellings:
        key = name_key(spelling)
        if key.isascii():
            word = max(key.split(), key=len)
            candidates = pc.or_(candidates, pc.match_substring(captions, word, ignore_case=True))
    rows = np.flatnonzero(candidates.fill_null(False).to_numpy(zero_copy_only=False))
    exact = [concept.matches(text) for text in captions.take(rows).to_pylist()]
    return rows[np.array(exact, dtype=bool)]
