"""Reading LAION-style shards: shard patterns, and the samples of one shard in order (METHOD §1).

Shards are webdataset tars as img2dataset writes them: per sample ``<key>.jpg`` (or ``.jpeg``, ``.png``,
``.webp``), ``<key>.txt`` with the caption and optionally ``<key>.json``, which is ignored here.

This module is the only place a shard is opened: the pair stream
(:class:`~slug_lightning.datamodules.laion.PairStream`) and the caption scans (:mod:`slug_lightning.shard_scan`)
read every shard through :func:`read_shard`. A truncated or corrupt shard is read up to the damage and then
marked by a :class:`BrokenShard`, which says how many samples were lost when img2dataset's
``<shard>_stats.json`` or ``<shard>.parquet`` beside it says how many it holds (:func:`expected_samples`).
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import braceexpand  # webdataset's own brace expander, installed with it

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
_GLOB_CHARACTERS = frozenset("*?[")
# Compressions tarfile reads in stream mode. Their offsets count decompressed bytes, so the end-of-archive
# check below is left out for them and truncation shows up as tarfile's read errors.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_TAR_BLOCK = 512


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
        raise FileNotFoundError(f"Shard pattern {pattern!r} names {len(missing)} missing file(s): {shown}.{hint}")
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

    Returns:
        ``(samples, file)``, or None when neither file is there or readable.
    """
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


def _make_sample(key: str, fields: dict[str, bytes]) -> Sample:
    caption = None
    if CAPTION_EXTENSION in fields:
        try:
            caption = fields[CAPTION_EXTENSION].decode("utf-8")
        except UnicodeDecodeError:
            caption = None
    image = next((fields[ext] for ext in IMAGE_EXTENSIONS if ext in fields), None)
    return Sample(key, caption, image)


def read_shard(url: str, *, with_images: bool = True) -> Iterator[Sample | BrokenShard]:
    """Yield a shard's samples in order, then a ``BrokenShard`` if it is truncated or corrupt.

    Members are grouped by key; a group is complete when the next key starts. After damage, the
    sample being read is dropped with the rest of the shard. Nothing is written to disk.

    Args:
        url: Path of the tar file.
        with_images: Read image bytes; False skips them (for caption-only scans): a sample that has an
            image member then carries ``b""`` as its image, one without carries None.
    """
    key, fields = None, {}
    read = 0  # samples yielded
    wanted = {CAPTION_EXTENSION, *(IMAGE_EXTENSIONS if with_images else ())}
    try:
        with open(url, "rb") as file, tarfile.open(fileobj=file, mode="r|*") as tar:
            for member in tar:
                member_key, extension = _split_member_name(member.name)
                if not member.isreg() or member_key is None:
                    continue
                if member_key != key:
                    if key is not None:
                        read += 1
                        yield _make_sample(key, fields)
                    key, fields = member_key, {}
                if extension in wanted and extension not in fields:
                    fields[extension] = tar.extractfile(member).read()
                elif extension in IMAGE_EXTENSIONS and extension not in fields:
                    fields[extension] = b""  # present, not read
            end_offset = tar.offset
        if not _is_compressed(url) and not _ends_cleanly(url, end_offset):
            yield _broken_shard(url, "truncated: no end-of-archive block after the last member", read)
            return
    except (tarfile.TarError, OSError, EOFError) as error:
        yield _broken_shard(url, f"{type(error).__name__}: {error}", read)
        return
    if key is not None:
        yield _make_sample(key, fields)
