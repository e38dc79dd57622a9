"""How far to widen a demand miss: the bandwidth-delay product of the backend, measured.

A lazy mount's misses come one at a time from one reader (an interpreter importing
modules, a loader faulting pages): each costs a round trip plus the bytes. Files read
together were usually packed together (the converter writes chunks in tree order), so
fetching the chunks that follow a miss in the blob saves later round trips. Widening a
request by `latency x bandwidth` bytes at most doubles its cost, while every neighbour it
brings that is read later saves a whole request; on the lazy-start benchmark's py-sci
workload (1,188 small misses) that turns 1,188 requests into ~110-290 depending on the link.

`FetchCostModel` fits `seconds = latency + bytes / bandwidth` (least squares) to the
recent fetches of one backend and answers `amplify_bytes()`. Until it has enough varied
samples, or when the fit is nonsense (noise can make either term negative), it answers
`default`.
"""
from __future__ import annotations

import threading
from collections import deque

AMPLIFY_MIN = 64 << 10
AMPLIFY_MAX = 4 << 20
AMPLIFY_DEFAULT = 256 << 10     # a fair guess from 100 Mbit/s to loopback until measured
MIN_SAMPLES = 8
WINDOW = 128                    # recent fetches the fit looks at (a link can change)


class FetchCostModel:
    """Thread-safe; `observe()` once per backend request (its bytes and wall time)."""

    def __init__(self, *, default: int = AMPLIFY_DEFAULT, lo: int = AMPLIFY_MIN, hi: int = AMPLIFY_MAX,
                 window: int = WINDOW):
        if not 0 < lo <= default <= hi:
            raise ValueError(f"need 0 < lo <= default <= hi, got {lo}, {default}, {hi}")
        self.default, self.lo, self.hi = default, lo, hi
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)
        self._lock = threading.Lock()
        self._fit: tuple[float, float] | None = None    # (latency s, bandwidth B/s), cached
        self._stale = False

    def observe(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            with self._lock:
                self._samples.append((nbytes, seconds))
                self._stale = True

    def fit(self) -> tuple[float, float] | None:
        """(latency seconds, bandwidth bytes/s) of the recent fetches, or None if unknown."""
        with self._lock:
            if self._stale:
                self._fit = _least_squares(list(self._samples))
                self._stale = False
            return self._fit

    def amplify_bytes(self) -> int:
        f = self.fit()
        if f is None:
            return self.default
        latency, bandwidth = f
        return int(min(self.hi, max(self.lo, latency * bandwidth)))

    def snapshot(self) -> dict:
        f = self.fit()
        return {"amplify_bytes": self.amplify_bytes(), "samples": len(self._samples),
                "latency_ms": round(f[0] * 1000, 3) if f else None,
                "bandwidth_mbit": round(f[1] * 8 / 1e6, 1) if f else None}


def _least_squares(samples: list[tuple[int, float]]) -> tuple[float, float] | None:
    if len(samples) < MIN_SAMPLES:
        return None
    n = len(samples)
    mx = sum(b for b, _ in samples) / n
    my = sum(s for _, s in samples) / n
    var = sum((b - mx) ** 2 for b, _ in samples)
    if var <= (0.25 * mx) ** 2 * n:       # sizes too alike to separate latency from bandwidth
        return None
    slope = sum((b - mx) * (s - my) for b, s in samples) / var
    latency = my - slope * mx
    if slope <= 0 or latency <= 0:
        return None
    return latency, 1.0 / slope
