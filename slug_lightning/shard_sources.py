"""Where a shard's bytes come from: a local file, a ``pipe:`` command, an HTTP(S) URL or an fsspec URL (METHOD §1).

:func:`open_shard` opens any of them as a :class:`ShardStream`, the byte stream that webdataset's tar stages read
(:func:`slug_lightning.shards.read_shard`). Local files and ``pipe:`` commands are opened by webdataset itself
(``gopen`` and its ``Pipe``); HTTP(S) by the standard library and ``s3://``, ``gs://``, ``hf://`` ... by fsspec
(the ``remote`` extra), because webdataset's own openers for them shell out to ``curl``/``gsutil`` with no read
timeout and no error message of their own.

Every remote read is bounded by ``timeout`` seconds without data (``LaionDataModule(read_timeout)``): a server that
stalls, or a command that writes nothing, fails with a :class:`ShardSourceError` instead of hanging; so do a 404, a
connection that drops before the announced length, and a command that exits non-zero. fsspec backends keep their
own timeouts (s3fs, gcsfs: their ``read_timeout``/``timeout`` settings).

:func:`probe_shards` is the cheap check the pre-flight runs before any compute: open each shard and read its first
block.
"""

from __future__ import annotations

import http.client
import os
import select
import signal
import subprocess
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

from webdataset import utils
from webdataset.gopen import Pipe, gopen

from slug_lightning.errors import UserError
from slug_lightning.extras import install_hint

# Seconds a remote read may wait for data before the shard counts as failed: pipe: commands such as `aws s3 cp`
# take seconds to start; a stalled server should not hold a gradient pass for longer than this.
READ_TIMEOUT = 60.0
REMOTE_EXTRA = install_hint("remote")
_BLOCK = 512
# What tarfile reads in stream mode besides plain tars (their end-of-archive check is tarfile's own).
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
# A whole shard ends with zero blocks padded to a 10 KiB record; more than this left after tarfile stopped means it
# stopped early, at a garbled header.
_MAX_TRAILER = 1 << 20
# How many pipe: shards the pre-flight runs (each is a command started); the others are checked at their first read.
PROBED_PIPES = 8
_PROBE_THREADS = 16


class ShardSourceError(OSError):
    """A shard's source failed: not found, an HTTP error, a command that exited non-zero, no data in time.

    ``str()`` is one line naming the URL; :attr:`reason` is the part after it. (webdataset appends its own objects
    to the ``args`` of errors that pass through it, so the message is kept apart.)
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(reason)
        self.url = url
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.url!r}: {self.reason}"


# --------------------------------------------------------------------------------------------------
# Kinds of source


def source_kind(url: str) -> str:
    """``"local"``, ``"pipe"``, ``"http"`` or ``"fsspec"``: how a shard URL is opened.

    Example::

        >>> [source_kind(u) for u in ("a/b.tar", "file:///a.tar", "pipe:cat a.tar", "https://h/a.tar", "s3://b/a.tar")]
        ['local', 'local', 'pipe', 'http', 'fsspec']
    """
    if url.startswith("pipe:"):
        return "pipe"
    scheme, separator, _ = url.partition("://")
    if not separator or scheme == "file":
        return "local"
    return "http" if scheme.lower() in ("http", "https") else "fsspec"


def local_path(url: str) -> str:
    """The file path of a local shard URL (``file://`` stripped)."""
    return url[len("file://") :] if url.startswith("file://") else url


def fsspec_filesystem(url: str) -> tuple[Any, str]:
    """fsspec's filesystem and path for an fsspec URL.

    Raises:
        UserError: fsspec, or the backend of the URL's scheme (s3fs, gcsfs, ...), is not installed, or fsspec does not
            know the scheme; the message names the extra to install.
    """
    scheme = url.partition("://")[0]
    try:
        import fsspec.core
    except ImportError:
        raise UserError(
            f"Shard URL {url!r} needs fsspec to be read ({scheme}://); install it with {REMOTE_EXTRA}."
        ) from None
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as error:  # fsspec knows the scheme but its backend package is missing
        raise UserError(
            f"Shard URL {url!r} needs fsspec's {scheme}:// backend ({error}); install it with {REMOTE_EXTRA}."
        ) from None
    except ValueError as error:  # "Protocol not known"
        raise UserError(
            f"Shard URL {url!r}: {error}. Valid shard sources are local paths, pipe:COMMAND, http(s):// URLs and "
            f"fsspec URLs such as s3://, gs://, hf:// ({REMOTE_EXTRA})."
        ) from None


# --------------------------------------------------------------------------------------------------
# Readers: read(n) returns up to n bytes, b"" at the end, and raises ShardSourceError when the source fails


class _PipeReader:
    """A ``pipe:`` command's output, through webdataset's ``Pipe``, each read bounded by ``timeout``.

    The command runs in its own session so that a stalled one is killed with its children (``sh -c`` may leave the
    real command as a child); its exit status is checked at the end of its output.
    """

    def __init__(self, url: str, timeout: float) -> None:
        self.url, self.timeout = url, timeout
        if utils.enforce_security:  # webdataset's own rule for pipe: URLs
            raise ShardSourceError(url, "webdataset refuses pipe: URLs when WDS_SECURE=1")
        # unbuffered: select() below sees exactly what the command has written
        self.pipe = Pipe(url[len("pipe:") :], mode="rb", shell=True, bufsize=0, start_new_session=True)
        self.fd = self.pipe.stream.fileno()

    def read(self, size: int) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], self.timeout)
        if not ready:
            self.close()
            raise ShardSourceError(self.url, f"the command wrote nothing for {self.timeout:g} s (read_timeout)")
        data = os.read(self.fd, size)
        if not data:
            self._check_exit()
        return data

    def _check_exit(self) -> None:
        try:
            status = self.pipe.proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise ShardSourceError(
                self.url, f"the command closed its output but did not exit within {self.timeout:g} s (read_timeout)"
            ) from None
        if status not in (0, 141):  # 141: killed by SIGPIPE, the reader having stopped (webdataset's rule)
            raise ShardSourceError(self.url, f"the command exited with status {status}")

    def close(self) -> None:
        if self.pipe.proc.poll() is None:
            try:
                os.killpg(self.pipe.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not self.pipe.stream.closed:
            self.pipe.stream.close()
        self.pipe.proc.wait()


class _HttpReader:
    """An HTTP(S) response; ``timeout`` bounds the connection and every read."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url, self.timeout = url, timeout
        request = urllib.request.Request(url, headers={"User-Agent": "slug-lightning"})
        try:
            self.response = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as error:
            error.close()
            raise ShardSourceError(url, f"the server answered HTTP {error.code} {error.reason}") from None
        except urllib.error.URLError as error:
            raise ShardSourceError(url, f"the server does not answer ({_describe(error.reason, timeout)})") from None
        except (OSError, http.client.HTTPException) as error:
            raise ShardSourceError(url, f"the server does not answer ({_describe(error, timeout)})") from None
        self.expected = self.response.length  # the Content-Length, None when not announced

    def read(self, size: int) -> bytes:
        try:
            data = self.response.read(size)
        except (OSError, http.client.HTTPException) as error:
            raise ShardSourceError(self.url, f"the connection broke ({_describe(error, self.timeout)})") from None
        if not data and self.response.length:  # http.client returns b"" when the connection closes early
            raise ShardSourceError(
                self.url,
                f"the connection closed {self.response.length} bytes before the end of the {self.expected} the server "
                "announced",
            )
        return data

    def close(self) -> None:
        self.response.close()


def _describe(error: BaseException, timeout: float) -> str:
    if isinstance(error, TimeoutError):
        return f"no data for {timeout:g} s, read_timeout"
    return f"{type(error).__name__}: {error}" if not isinstance(error, str) else error


class _FileReader:
    """A local file (opened by webdataset's ``gopen``) or an fsspec file object."""

    def __init__(self, file: BinaryIO, url: str) -> None:
        self.file, self.url = file, url

    def read(self, size: int) -> bytes:
        return self.file.read(size)

    def close(self) -> None:
        self.file.close()


def _open_fsspec(url: str) -> _FileReader:
    filesystem, path = fsspec_filesystem(url)
    try:
        return _FileReader(filesystem.open(path, "rb"), url)
    except FileNotFoundError:
        raise ShardSourceError(url, "not found") from None
    except OSError as error:
        raise ShardSourceError(url, f"cannot be opened ({type(error).__name__}: {error})") from None


def _reader(url: str, timeout: float) -> _PipeReader | _HttpReader | _FileReader:
    kind = source_kind(url)
    if kind == "local":
        return _FileReader(gopen(local_path(url), "rb"), url)
    if kind == "pipe":
        return _PipeReader(url, timeout)
    if kind == "http":
        return _HttpReader(url, timeout)
    return _open_fsspec(url)


# --------------------------------------------------------------------------------------------------
# The stream tarfile reads


class ShardStream:
    """The bytes of one shard, read in order, for webdataset's tar stages.

    It remembers the stream's first bytes (is it compressed?) and its last block, so that :meth:`ended_cleanly` can
    tell a whole tar from one cut at a member boundary, which tarfile reads as a shorter archive without complaint.

    Args:
        url: Where the bytes come from (:func:`source_kind`).
        timeout: Seconds a remote read may wait for data.
    """

    def __init__(self, url: str, timeout: float = READ_TIMEOUT) -> None:
        self.url = url
        self._reader = _reader(url, timeout)
        self._head = b""
        self._tail = b""
        self.closed = False

    def __repr__(self) -> str:  # webdataset appends it to the messages of errors it passes on
        return f"<shard {self.url}>"

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        if size == 0:  # not a question for the source: b"" from it means its end
            return b""
        data = self._reader.read(size)
        if len(self._head) < 6:
            self._head += data[: 6 - len(self._head)]
        self._tail = data[-_BLOCK:] if len(data) >= _BLOCK else (self._tail + data)[-_BLOCK:]
        return data

    def ended_cleanly(self) -> bool:
        """After tarfile stopped reading: whether the stream ends with an end-of-archive (zero) block.

        Reads what tarfile left (a whole shard's zero padding, under 10 KiB). Compressed streams are not checked
        here: their truncation is a read error of tarfile's own.

        Raises:
            ShardSourceError: The source failed while the rest was read (a command's exit status is checked at its
                end).
        """
        if self._head.startswith(_COMPRESSED_MAGIC):
            return True
        left = 0
        while chunk := self.read(65536):
            left += len(chunk)
            if left > _MAX_TRAILER:
                return False
        return len(self._tail) == _BLOCK and not any(self._tail)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._reader.close()


def open_shard(url: str, timeout: float = READ_TIMEOUT) -> ShardStream:
    """Open a shard URL for reading (see the module docstring for the kinds of source).

    Raises:
        ShardSourceError: A remote source that cannot be opened (HTTP error, no answer within ``timeout``, not
            found).
        UserError: An fsspec URL without fsspec or its backend installed.
        OSError: A local file that cannot be opened.
    """
    return ShardStream(url, timeout)


def fetch(url: str, timeout: float = READ_TIMEOUT) -> bytes:
    """All bytes of a (small) file at ``url``, any kind of source: img2dataset's ``.parquet`` beside a shard.

    Raises:
        As :func:`open_shard`, and ShardSourceError for a read that fails.
    """
    stream = open_shard(url, timeout)
    try:
        return stream.read()
    finally:
        stream.close()


# --------------------------------------------------------------------------------------------------
# The pre-flight's probe


def _looks_like_tar(block: bytes) -> bool:
    """Whether the first block of a shard is a tar header (valid checksum) or the start of a compressed stream."""
    if block.startswith(_COMPRESSED_MAGIC):
        return True
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.EOFHeaderError:  # a zero block: an archive without members, which reads as no samples
        return True
    except tarfile.HeaderError:
        return False
    return True


def probe_shard(url: str, timeout: float = READ_TIMEOUT) -> tuple[str, str] | None:
    """Open a shard and read its first block: what the pre-flight can check of it without reading it.

    Returns:
        None when it opens and starts like a tar; else ``(kind, reason)``: ``"source"`` when the source fails (not
        found, HTTP error, no answer, a command that exits non-zero before writing anything), ``"tar"`` when what it
        holds is not a tar archive.
    """
    try:
        stream = open_shard(url, timeout)
    except (OSError, UserError) as error:
        return "source", getattr(error, "reason", None) or f"{type(error).__name__}: {error}"
    try:
        block = b""
        while len(block) < _BLOCK and (data := stream.read(_BLOCK - len(block))):
            block += data
    except OSError as error:
        return "source", getattr(error, "reason", None) or f"{type(error).__name__}: {error}"
    finally:
        stream.close()
    if not block:
        return "tar", "empty"
    if not _looks_like_tar(block):
        return "tar", "not a tar archive: its first block is not a tar header"
    return None


def probe_shards(
    urls: Sequence[str], timeout: float = READ_TIMEOUT, probe: Callable[[str, float], Any] = probe_shard
) -> list[tuple[str, str, str]]:
    """:func:`probe_shard` every shard, in parallel; ``pipe:`` shards beyond the first :data:`PROBED_PIPES` are left
    to their first read (each probe starts the command).

    Returns:
        ``(url, kind, reason)`` of every shard that failed, in the order of ``urls``.
    """
    pipes = [url for url in urls if source_kind(url) == "pipe"][:PROBED_PIPES]
    chosen = [url for url in urls if source_kind(url) != "pipe" or url in pipes]
    with ThreadPoolExecutor(min(_PROBE_THREADS, max(len(chosen), 1))) as pool:
        results = list(pool.map(lambda url: probe(url, timeout), chosen))
    return [(url, *result) for url, result in zip(chosen, results) if result is not None]
