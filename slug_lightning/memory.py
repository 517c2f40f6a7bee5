"""Peak memory of one phase of a run (the gradient pass, the search), for ``report.json``'s ``memory``.

The process's resident set size only ever reports a lifetime peak (``ru_maxrss``), which cannot tell the
search's peak from the gradient pass's. :class:`PeakMemory` therefore samples the current RSS from a
background thread while a phase runs, and reads CUDA's own peak counter, reset when the phase starts.
"""

from __future__ import annotations

import os
import resource
import sys
import threading

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MIB = 2**20


def current_rss_mib() -> float | None:
    """This process's resident set size now, in MiB (None where ``/proc`` is not available)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE / MIB
    except (OSError, IndexError, ValueError):
        return None


def lifetime_peak_rss_mib() -> float:
    """The highest RSS this process has had so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """Measure the peak memory between :meth:`start` and :meth:`stop` (or as a context manager).

    Args:
        interval: Seconds between RSS samples.

    Example::

        >>> with PeakMemory() as phase:
        ...     block = bytearray(64 * 2**20)
        >>> phase.result["peak_rss_mib"] > 0
        True
    """

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.result: dict[str, float] = {}
        self._peak = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PeakMemory:
        self._peak = current_rss_mib() or 0.0
        self._stop.clear()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, name="slug-peak-memory", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, current_rss_mib() or 0.0)

    def stop(self) -> dict[str, float]:
        """End the phase; returns (and keeps in :attr:`result`) ``peak_rss_mib`` and, on CUDA, ``peak_cuda_mib``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = current_rss_mib()
        # Without /proc there are no samples: the lifetime peak is the honest upper bound.
        peak = max(self._peak, now) if now is not None else lifetime_peak_rss_mib()
        self.result = {"peak_rss_mib": round(peak, 1)}
        if torch.cuda.is_available():
            self.result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
        return self.result

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
