"""Reading LAION-style shards: shard patterns, and the samples of one shard in order (METHOD §1).

Shards are webdataset tars as img2dataset writes them: per sample ``<key>.jpg`` (or ``.jpeg``, ``.png``,
``.webp``), ``<key>.txt`` with the caption and optionally ``<key>.json``, which is ignored here. They may be local
files, ``pipe:`` commands, HTTP(S) or fsspec URLs (:mod:`slug_lightning.shard_sources` opens them).

This module is the only place a shard is read: the pair streams (:mod:`slug_lightning.datamodules.laion`) and the
caption scans (:mod:`slug_lightning.shard_scan`) read every shard through :func:`read_shard`, which runs webdataset's
tar stages. A truncated or corrupt shard, or one whose source fails, is read up to the damage and then marked by a
:class:`BrokenShard`, which says how many samples were lost when img2dataset's ``<shard>_stats.json`` or
``<shard>.parquet`` beside it says how many it holds (:func:`expected_samples`).
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
import zlib
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass

import braceexpand
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from slug_lightning.caption_index import IndexUnavailable, read_index
from slug_lightning.errors import UserError
from slug_lightning.shard_sources import (
    READ_TIMEOUT,
    ShardSourceError,
    ShardStream,
    fsspec_filesystem,
    local_path,
    open_shard,
    source_kind,
)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
_WANTED = frozenset((CAPTION_EXTENSION, *IMAGE_EXTENSIONS))
_GLOB_CHARACTERS = frozenset("*?[")
# What damage, or a failing source, raises while a shard is read; anything else is a bug and keeps its traceback.
_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, UserError)


# --------------------------------------------------------------------------------------------------
# Shard patterns


def expand_shards(shards: str | Sequence[str]) -> list[str]:
    """Expand shard patterns into the sorted list of shards they name.

    A pattern may use braces (``"dir/{00000..00011}.tar"``) and, for local files and fsspec URLs, glob wildcards
    (``"dir/*.tar"``, ``"s3://bucket/laion/*.tar"``); several patterns are separated by ``"::"`` or given as a list.
    ``pipe:`` commands and HTTP(S) URLs are taken as written (after braces): whether they answer is the pre-flight's
    check (:func:`~slug_lightning.shard_sources.probe_shards`) or their first read's.

    Args:
        shards: One pattern string (possibly ``"::"``-separated) or a sequence of patterns.

    Returns:
        The shards, sorted and without duplicates.

    Raises:
        FileNotFoundError: A pattern matches no file, or a brace expansion names local files that do not exist.
        ValueError: No pattern is given, or a pattern names a directory.
        UserError: An fsspec URL without fsspec or its backend installed (a ValueError too).

    Example::

        >>> expand_shards("shards/{00000..00001}.tar::extra/*.tar")  # doctest: +SKIP
        ['extra/a.tar', 'shards/00000.tar', 'shards/00001.tar']
        >>> expand_shards("pipe:aws s3 cp s3://bucket/laion/{00000..00001}.tar -")
        ['pipe:aws s3 cp s3://bucket/laion/00000.tar -', 'pipe:aws s3 cp s3://bucket/laion/00001.tar -']
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
    """The shards one pattern (braces, then globs) names; raises when any part names nothing."""
    candidates = list(braceexpand.braceexpand(pattern))
    kind = source_kind(candidates[0])
    if kind in ("pipe", "http"):
        return candidates
    if kind == "fsspec":
        return [url for candidate in candidates for url in _fsspec_glob(pattern, candidate)]
    found, missing = [], []
    for candidate in map(os.path.expanduser, map(local_path, candidates)):
        if _GLOB_CHARACTERS & set(candidate):
            matches = sorted(glob.glob(candidate))
            if not matches:
                raise FileNotFoundError(f"Shard pattern {pattern!r} matches no file ({candidate!r}).")
            found.extend(matches)
        elif os.path.exists(candidate):
            found.append(candidate)
        else:
            missing.append(candidate)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        if len(missing) > 5:
            shown += f" and {len(missing) - 5} more"
        raise FileNotFoundError(f"Shard pattern {pattern!r} names {len(missing)} missing file(s): {shown}.")
    directories = [p for p in found if os.path.isdir(p)]
    if directories:
        raise ValueError(
            f"Shard pattern {pattern!r} names directories {directories[:5]}; name the tar files, "
            f"e.g. {os.path.join(directories[0], '*.tar')!r}."
        )
    return found


def _fsspec_glob(pattern: str, url: str) -> list[str]:
    """An fsspec URL as written, or what its wildcards match (listed through its filesystem)."""
    filesystem, path = fsspec_filesystem(url)  # also refuses a URL whose backend is not installed
    if not _GLOB_CHARACTERS & set(path):
        return [url]
    matches = sorted(filesystem.unstrip_protocol(match) for match in filesystem.glob(path))
    if not matches:
        raise FileNotFoundError(f"Shard pattern {pattern!r} matches no file ({url!r}).")
    return matches


# --------------------------------------------------------------------------------------------------
# Reading shards


@dataclass(frozen=True)
class Sample:
    """One sample as read from a shard: its key, caption (None if absent or unreadable) and image bytes."""

    key: str
    caption: str | None
    image: bytes | None


@dataclass(frozen=True)
class BrokenShard:
    """Marks the point where a shard stopped being readable.

    ``lost`` is how many samples the damage cost, when img2dataset's files beside the shard say how many it
    holds (``source`` names the file); None when unknown, and the shard then counts as one broken sample,
    a lower bound.
    """

    url: str
    reason: str
    lost: int | None = None
    source: str | None = None

    @property
    def counted(self) -> int:
        """The broken samples it stands for in counts of skipped samples."""
        return counted_loss(self.lost)

    def describe(self) -> str:
        """How much was lost, for warnings."""
        return describe_loss(self.lost, repr(self.source))


def counted_loss(lost: int | None) -> int:
    """The broken samples a damaged shard stands for: what it lost, or 1 when that is unknown (a lower bound)."""
    return 1 if lost is None else lost


def describe_loss(lost: int | None, source: str = "img2dataset's files beside it") -> str:
    """What a damaged shard lost, in words, for warnings: the count and the file that gave it, or that it is
    unknown and counted as 1."""
    if lost is not None:
        return f"{lost} sample(s) lost, per {source}"
    return (
        "how many samples were lost is unknown (no img2dataset _stats.json or .parquet beside it), counted as "
        "1: a lower bound"
    )


def expected_samples(url: str) -> tuple[int, str] | None:
    """How many samples a shard holds according to the img2dataset files beside it, and the file that says so.

    img2dataset writes ``<shard>_stats.json``, whose ``successes`` are the samples written into the tar, and
    ``<shard>.parquet``, one row per sample it tried, those with ``status == "success"`` in the tar (pyarrow,
    which ``datasets`` brings, reads it; without pyarrow it is not used). Read only for damaged shards.

    A remote shard's ``.parquet`` is fetched (:func:`~slug_lightning.caption_index.read_index`).

    Returns:
        ``(samples, file)``, or None when neither file is there or readable.
    """
    if source_kind(url) != "local":
        try:
            index = read_index(url)
        except IndexUnavailable:
            return None
        return len(index), index.source
    if not url.endswith(".tar"):
        return None
    stem = url[: -len(".tar")]
    stats = f"{stem}_stats.json"
    if os.path.isfile(stats):
        try:
            with open(stats, encoding="utf-8") as file:
                successes = json.load(file).get("successes")
        except (OSError, ValueError, AttributeError):
            successes = None
        if isinstance(successes, int) and not isinstance(successes, bool) and successes >= 0:
            return successes, stats
    table = f"{stem}.parquet"
    if os.path.isfile(table):
        try:
            import pyarrow.parquet as parquet

            if "status" in parquet.read_schema(table).names:
                status = parquet.read_table(table, columns=["status"]).column("status").to_pylist()
                return sum(value == "success" for value in status), table
            return parquet.read_metadata(table).num_rows, table
        except (ImportError, OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
            return None
    return None


def _broken_shard(url: str, reason: str, read: int) -> BrokenShard:
    """The marker of a shard damaged after ``read`` samples, with what it lost when that is known."""
    expected = expected_samples(url)
    if expected is None:
        return BrokenShard(url, reason)
    count, source = expected
    return BrokenShard(url, reason, max(count - read, 0), source)


def _reason(error: BaseException, stream: ShardStream | None) -> str:
    """One line for a failure met while reading a shard (without what webdataset appends to error messages)."""
    if isinstance(error, ShardSourceError):
        return error.reason
    message = str(error.args[0]) if error.args else ""
    if stream is not None:
        message = message.replace(f" @ {stream!r}", "")
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _make_sample(group: dict) -> Sample:
    """A sample from webdataset's group of a key's members (extension -> bytes)."""
    caption = None
    if CAPTION_EXTENSION in group:
        try:
            caption = group[CAPTION_EXTENSION].decode("utf-8")
        except UnicodeDecodeError:
            caption = None
    image = next((group[ext] for ext in IMAGE_EXTENSIONS if ext in group), None)
    return Sample(group["__key__"], caption, image)


def read_shard(
    url: str, *, keys: Collection[str] | None = None, timeout: float = READ_TIMEOUT
) -> Iterator[Sample | BrokenShard]:
    """Yield a shard's samples in order, then a ``BrokenShard`` if it is truncated, corrupt or its source fails.

    The shard is read by webdataset's tar stages (``tar_file_expander``, ``group_by_keys``) from a
    :class:`~slug_lightning.shard_sources.ShardStream`; their error handler stops at the first failure, which this
    turns into the ``BrokenShard``. A sample is complete once a member of the next key is reached; at damage, the
    sample being read is dropped with the rest of the shard. A shard cut exactly at a member boundary reads as a
    shorter tar without error, so its end is checked for the end-of-archive block. Nothing is written to disk.

    Args:
        url: The shard: a local path, ``pipe:COMMAND``, an HTTP(S) or fsspec URL
            (:func:`~slug_lightning.shard_sources.source_kind`).
        keys: Read only the samples with these keys (the others' bytes are passed over, not kept); None reads all.
        timeout: Seconds a remote read may wait for data; longer and the shard counts as broken there.
    """
    failures: list[BaseException] = []
    streams: list[ShardStream] = []
    reached: list[str | None] = [None]  # the key of the last member tarfile came to, read or not

    def stop(error: BaseException) -> bool:  # webdataset's handler: note the failure, stop reading this shard
        if not isinstance(error, _READ_ERRORS):
            raise error  # a bug, not damage: keep its traceback
        failures.append(error)
        return False

    def keep_first_duplicate(error: BaseException) -> bool:  # a member name twice in a sample: the first one counts
        # (webdataset's grouping raises it as a ValueError; any other failure stops the shard)
        return "duplicate file name" in str(error) or stop(error)

    def select(name: str) -> bool:
        key, extension = base_plus_ext(name)
        reached[0] = key
        return key is not None and extension.lower() in _WANTED and (keys is None or key in keys)

    def opened(sources: Iterable[dict]) -> Iterator[dict]:  # webdataset's url_opener, with ours for the source
        for source in sources:
            try:
                streams.append(open_shard(source["url"], timeout))
            except _READ_ERRORS as error:
                failures.append(error)
                return
            yield {**source, "stream": streams[-1]}

    files = tar_file_expander(opened([{"url": url}]), handler=stop, select_files=select, eof_value=None)
    groups = group_by_keys(files, handler=keep_first_duplicate)
    pending: Sample | None = None  # held back until it is known to be complete
    read = 0
    try:
        for group in groups:
            if pending is not None:
                read += 1
                yield pending
            pending = _make_sample(group)
        if failures:
            reason = _reason(failures[0], streams[0] if streams else None)
        elif streams and not streams[0].ended_cleanly():
            reason = "truncated: no end-of-archive block after the last member"
        else:
            reason = None
    except _READ_ERRORS as error:  # met while reading the end: a command's exit status, a broken connection
        reason = _reason(error, streams[0] if streams else None)
    finally:
        for stream in streams:
            stream.close()
    if pending is not None and (reason is None or reached[0] != pending.key):
        read += 1
        yield pending
    if reason is not None:
        yield _broken_shard(url, reason, read)
