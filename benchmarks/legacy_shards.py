"""The shard reader this project used before webdataset's stages, kept as the baseline of ``streaming.py``.

A hand-written loop over ``tarfile`` on local files only, as ``slug_lightning/shards.py`` had it before shards could
be streamed (the same grouping of members by key, the same end-of-archive check by seeking into the file). Nothing
else uses it.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

from slug_lightning.shards import CAPTION_EXTENSION, IMAGE_EXTENSIONS, BrokenShard, Sample, expected_samples

_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_TAR_BLOCK = 512


def _broken_shard(url: str, reason: str, read: int) -> BrokenShard:
    expected = expected_samples(url)
    if expected is None:
        return BrokenShard(url, reason)
    count, source = expected
    return BrokenShard(url, reason, max(count - read, 0), source)


def _split_member_name(name: str) -> tuple[str | None, str]:
    directory, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    if not dot or not stem:
        return None, ""
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def _is_compressed(path: str) -> bool:
    with open(path, "rb") as file:
        return file.read(6).startswith(_COMPRESSED_MAGIC)


def _ends_cleanly(path: str, end_offset: int) -> bool:
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


def read_shard_before(url: str, *, with_images: bool = True, timeout: float | None = None) -> Iterator:
    """The earlier ``read_shard`` (``timeout`` is accepted and ignored: it read local files only)."""
    key, fields = None, {}
    read = 0
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
                    fields[extension] = b""
            end_offset = tar.offset
        if not _is_compressed(url) and not _ends_cleanly(url, end_offset):
            yield _broken_shard(url, "truncated: no end-of-archive block after the last member", read)
            return
    except (tarfile.TarError, OSError, EOFError) as error:
        yield _broken_shard(url, f"{type(error).__name__}: {error}", read)
        return
    if key is not None:
        yield _make_sample(key, fields)
