"""A one-line progress display for terminals; silent elsewhere."""
from __future__ import annotations

import sys
import threading
import time


class Progress:
    def __init__(self, total: int, *, enabled: bool, label: str, stream=sys.stderr):
        self.total, self.label, self.stream = total, label, stream
        self.enabled = enabled and stream.isatty()
        self.done_bytes = 0
        self._lock = threading.Lock()
        self._start = self._last = time.monotonic()

    def add(self, n: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.done_bytes += n
            now = time.monotonic()
            if now - self._last >= 0.2:
                self._last = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        mb = self.done_bytes / 1e6
        pct = f"{100 * self.done_bytes / self.total:5.1f}%" if self.total else ""
        rate = mb / max(now - self._start, 1e-6)
        self.stream.write(f"\r{self.label}: {mb:8.1f} MB {pct} {rate:6.1f} MB/s")
        self.stream.flush()

    def done(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
