"""Storage metrics: what the lazy mount fetched, from where, how fast, and how the cache did.

Everything here is thread-safe (one small lock per object; the counters are
touched once per backend request or per read, never per byte) and
`snapshot()` returns plain dicts of ints/floats/strs, ready for `json.dumps`
(`nydusify stats` prints them).

Two kinds of objects:

* `SourceCounters`: bytes / requests / errors of one source (a registry, a
  mirror, a directory, a peer). Each `BlobBackend` owns one and reports it
  through `BlobBackend.source_stats()`; a `MirrorBackend` reports one per
  mirror and one for the origin.
* `StorageMetrics`: one per mount (shared by the `CacheManager` and all its
  `BlobCache`s): compressed bytes fetched, requests, chunks hit / missed,
  verification failures, prefetch bytes, fetch latency percentiles and a
  fetch latency histogram with fixed buckets (`LATENCY_BUCKETS`; Prometheus
  scrapes it, `rafs.prometheus`). A cache learns where the chunks are from
  the bootstrap, so every request it makes is for chunk data. Given a
  `sources` callable (normally `backend.source_stats`) its snapshot
  includes the per-source counters too.
"""
from __future__ import annotations

import bisect
import random
import threading
from typing import Callable

RESERVOIR_SIZE = 1024        # latency samples kept (uniform sample of all requests, Vitter's R)
# upper bounds (seconds) of the fetch latency histogram's buckets (+Inf is implied): a local mirror or
# peer answers in a millisecond or two, a remote registry in tens to hundreds, a throttled link in seconds
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _nearest_rank(ordered: list[float], p: float) -> float:
    """The p-th percentile (0..100) of a sorted list by the nearest-rank method; 0.0 when empty."""
    if not ordered:
        return 0.0
    rank = max(0, min(len(ordered) - 1, -(-int(p * len(ordered)) // 100) - 1))
    return ordered[rank]


class LatencyReservoir:
    """A bounded uniform sample of latencies (seconds) with percentiles; not locked (callers lock)."""

    def __init__(self, size: int = RESERVOIR_SIZE, seed: int | None = None):
        if size < 1:
            raise ValueError(f"reservoir size must be >= 1, got {size}")
        self._size = size
        self._samples: list[float] = []
        self._seen = 0
        self._max = 0.0
        self._total = 0.0
        self._rng = random.Random(seed)

    def add(self, seconds: float) -> None:
        self._seen += 1
        self._total += seconds
        if seconds > self._max:
            self._max = seconds
        if len(self._samples) < self._size:
            self._samples.append(seconds)
        else:
            j = self._rng.randrange(self._seen)
            if j < self._size:
                self._samples[j] = seconds

    def percentile(self, p: float) -> float:
        """The p-th percentile (0..100, nearest rank) of the sample; 0.0 when empty."""
        return _nearest_rank(sorted(self._samples), p)

    def snapshot_ms(self) -> dict:
        ordered = sorted(self._samples)

        def pct(p: float) -> float:
            return round(_nearest_rank(ordered, p) * 1000.0, 3)

        return {
            "count": self._seen,
            "mean": round(self._total / self._seen * 1000.0, 3) if self._seen else 0.0,
            "p50": pct(50), "p90": pct(90), "p99": pct(99),
            "max": round(self._max * 1000.0, 3),
        }


class LatencyHistogram:
    """Counts of latencies (seconds) per bucket of fixed upper `bounds`; not locked (callers lock).

    `snapshot()` is cumulative, as Prometheus histograms are: {"le": bounds, "counts": [requests taking
    at most le seconds], "count": all requests, "sum": their seconds}."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS):
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"histogram bounds must be increasing and distinct, got {bounds}")
        self.bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(bounds) + 1)     # the last one: above every bound
        self._sum = 0.0

    def add(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self._sum += seconds

    def snapshot(self) -> dict:
        cumulative, total = [], 0
        for c in self._counts[:-1]:
            total += c
            cumulative.append(total)
        return {"le": list(self.bounds), "counts": cumulative, "count": total + self._counts[-1],
                "sum": self._sum}


class SourceCounters:
    """Bytes, requests and errors of one source; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.requests = 0
        self.errors = 0

    def ok(self, nbytes: int) -> None:
        with self._lock:
            self.bytes += nbytes
            self.requests += 1

    def error(self) -> None:
        with self._lock:
            self.requests += 1
            self.errors += 1

    def snapshot(self) -> dict:
        with self._lock:
            return {"bytes": self.bytes, "requests": self.requests, "errors": self.errors}


class StorageMetrics:
    """Counters of one mount's storage layer; thread-safe; `snapshot()` is JSON-ready.

    `sources`: a callable returning per-source counters (`backend.source_stats`),
    included in the snapshot under "sources".
    """

    def __init__(self, sources: Callable[[], dict] | None = None,
                 reservoir_size: int = RESERVOIR_SIZE):
        self._lock = threading.Lock()
        self._sources = sources
        self.bytes_fetched = 0         # compressed bytes received from the backend
        self.requests = 0              # backend range requests that succeeded
        self.request_errors = 0        # backend range requests that failed (after the backend's retries)
        self.chunks_fetched = 0        # chunks fetched and verified (on demand + prefetch)
        self.chunks_hit = 0            # chunks a read found ready in the cache
        self.chunks_missed = 0         # chunks a read had to wait for (fetch or another reader's fetch)
        self.verify_failures = 0       # chunks that failed their digest (never served, never cached)
        self.recheck_failures = 0      # cached chunks whose xxh64 no longer matched after a restart
        self.prefetch_bytes = 0        # compressed bytes fetched by background prefetch
        self.prefetch_requests = 0
        self.bytes_read = 0            # bytes returned by BlobCache.read
        self.evictions = 0             # chunks evicted from the cache to stay under its size limit
        self._latency = LatencyReservoir(reservoir_size)
        self._histogram = LatencyHistogram()

    def set_sources(self, sources: Callable[[], dict] | None) -> None:
        self._sources = sources

    # -- recording
    def fetch_ok(self, nbytes: int, chunks: int, seconds: float, *, prefetch: bool = False) -> None:
        with self._lock:
            self.bytes_fetched += nbytes
            self.requests += 1
            self.chunks_fetched += chunks
            self._latency.add(seconds)
            self._histogram.add(seconds)
            if prefetch:
                self.prefetch_bytes += nbytes
                self.prefetch_requests += 1

    def fetch_error(self) -> None:
        with self._lock:
            self.request_errors += 1

    def read(self, nbytes: int, hits: int, misses: int) -> None:
        with self._lock:
            self.bytes_read += nbytes
            self.chunks_hit += hits
            self.chunks_missed += misses

    def verify_failure(self) -> None:
        with self._lock:
            self.verify_failures += 1

    def recheck_failure(self) -> None:
        with self._lock:
            self.recheck_failures += 1

    def evicted(self, chunks: int = 1) -> None:
        """Chunks dropped from the cache to make room under its size limit (cache/evict.py)."""
        with self._lock:
            self.evictions += chunks

    # -- reporting
    def latency_percentile(self, p: float) -> float:
        """Fetch latency percentile in seconds (from the bounded sample)."""
        with self._lock:
            return self._latency.percentile(p)

    def snapshot(self) -> dict:
        with self._lock:
            out = {
                "bytes_fetched": self.bytes_fetched,
                "requests": self.requests,
                "request_errors": self.request_errors,
                "chunks_fetched": self.chunks_fetched,
                "chunks_hit": self.chunks_hit,
                "chunks_missed": self.chunks_missed,
                "verify_failures": self.verify_failures,
                "recheck_failures": self.recheck_failures,
                "prefetch_bytes": self.prefetch_bytes,
                "prefetch_requests": self.prefetch_requests,
                "bytes_read": self.bytes_read,
                "evictions": self.evictions,
                "fetch_latency_ms": self._latency.snapshot_ms(),
                "fetch_latency_histogram": self._histogram.snapshot(),
            }
        out["sources"] = self._sources() if self._sources is not None else {}
        return out
