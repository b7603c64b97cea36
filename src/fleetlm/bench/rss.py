"""Peak resident memory of this process over a block of code, sampled from a thread.

The kernel's own high-water mark (``ru_maxrss``) only ever grows over the life of the
process, so it cannot tell one benchmark phase from the next; sampling RSS every ~20 ms
can, at the cost of missing spikes shorter than the interval. This module knows nothing
about what is being measured.
"""

from __future__ import annotations

import threading
from types import TracebackType

import psutil


def rss_bytes() -> int:
    """Resident set size of this process now, in bytes."""
    return int(psutil.Process().memory_info().rss)


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.peak_bytes`` (the largest sample, the first
    and last included) and ``m.start_bytes`` (RSS when the block was entered)."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        rss = int(self._proc.memory_info().rss)
        if rss > self.peak_bytes:  # one writer (the sampler, or the owner once it has joined)
            self.peak_bytes = rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self.start_bytes = int(self._proc.memory_info().rss)
        self.peak_bytes = self.start_bytes
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20
