"""All blob caches of a mount: one `BlobCache` per blob, over one backend, sharing metrics, the
demand gate and the fetch cost model."""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures

from rafs.image.digests import normalize_blob_id

from ..backend.base import BlobBackend
from ..metrics import StorageMetrics
from .amplify import FetchCostModel
from .blobcache import BlobCache
from .evict import CacheBudget, acquire_budget, release_budget, tree_bytes
from .files import CacheClosed, CacheInUse
from .prefetch import DemandGate

log = logging.getLogger(__name__)


class CacheManager:
    """One `BlobCache` per blob of a mount, over one backend, sharing metrics and the demand gate.

    Owns the backend (closed by `close()`) unless `owns_backend=False`. Options
    (`merge_size`, `max_inflight`, `readahead`, `amplify`, `flush_interval`,
    `flush_chunks`) are passed to every BlobCache; the blobs share one
    FetchCostModel (they share the backend and its link).

    `max_size` (bytes, 0 = none) limits what the files under `budget_root` (default: the cache
    directory) occupy on disk, with the least recently used chunks evicted to make room (`evict`); every
    process using that root shares the one limit.
    """

    def __init__(self, cache_dir: str | os.PathLike, backend: BlobBackend, *,
                 metrics: StorageMetrics | None = None, owns_backend: bool = True, max_size: int = 0,
                 budget_root: str | os.PathLike | None = None, **cache_options):
        self.dir = os.fspath(cache_dir)
        os.makedirs(self.dir, exist_ok=True)
        self.backend = backend
        self.metrics = metrics if metrics is not None else StorageMetrics(backend.source_stats)
        self.gate = DemandGate()
        self.cost_model = FetchCostModel()
        self._options = cache_options
        self.budget: CacheBudget | None = None
        if max_size:
            self.budget = acquire_budget(budget_root or self.dir, max_size)
        self._owns_backend = owns_backend
        self._lock = threading.Lock()
        self._caches: dict[str, BlobCache] = {}
        self._opening: dict[str, Future] = {}     # blob id -> the BlobCache being opened
        self._closed = False
        # the mount's filling of the kernel's page cache with cached chunks (erofs mode, set by the
        # daemon): "none", "running" or "done"
        self.kernel_fill = "none"

    def open(self, info) -> BlobCache:
        """The BlobCache of blob `info` (a BlobInfo), opened on first use (reads its chunkmap;
        nothing is fetched).

        Opening happens without holding the manager's lock: opening one blob never waits
        for another's. Concurrent opens of one blob share one BlobCache (or its error). A
        manager serves one bootstrap: a record of an open blob with chunks its cache does not
        serve raises CacheInUse.
        """
        blob_id = normalize_blob_id(info.blob_id)
        with self._lock:
            if self._closed:
                raise CacheClosed(f"cache manager of {self.dir} is closed")
            cache = self._caches.get(blob_id)
            if cache is not None:
                return self._same(cache, info)
            pending = self._opening.get(blob_id)
            mine = pending is None
            if mine:
                pending = self._opening[blob_id] = Future()
        if not mine:
            return self._same(pending.result(), info)   # the other opener's cache, or its error
        try:
            cache = BlobCache(self.dir, info, self.backend, metrics=self.metrics,
                              gate=self.gate, cost_model=self.cost_model, budget=self.budget,
                              **self._options)
        except BaseException as e:
            with self._lock:
                del self._opening[blob_id]
            pending.set_exception(e)
            raise
        with self._lock:
            del self._opening[blob_id]
            closed = self._closed
            if not closed:
                self._caches[blob_id] = cache
        if closed:                             # the manager closed while we opened it
            cache.close()
            err = CacheClosed(f"cache manager of {self.dir} is closed")
            pending.set_exception(err)
            raise err
        pending.set_result(cache)
        return cache

    @staticmethod
    def _same(cache: BlobCache, info) -> BlobCache:
        if not cache.covers(info):
            raise CacheInUse(f"{cache.name} is open for another bootstrap whose chunk table "
                             "lists other chunks of it; use one cache manager per image")
        return cache

    def get(self, blob_id: str) -> BlobCache | None:
        with self._lock:
            return self._caches.get(normalize_blob_id(blob_id))

    def caches(self) -> list[BlobCache]:
        with self._lock:
            return list(self._caches.values())

    def prefetch_all(self) -> list[Future]:
        """Background prefetch of every open blob (one low-priority request per blob at a time)."""
        return [c.prefetch_all() for c in self.caches()]

    def flush(self) -> None:
        for c in self.caches():
            c.flush()

    def stats(self) -> dict:
        """{"metrics": StorageMetrics snapshot (with per-source bytes), "blobs": usage per blob,
        "totals": the usage summed}; JSON-ready."""
        blobs = {c.blob_id: c.usage() for c in self.caches()}
        keys = ("disk_bytes", "view_size", "chunks_total", "chunks_ready", "bytes_total",
                "bytes_ready", "chunks_inflight")
        totals = {k: sum(u[k] for u in blobs.values()) for k in keys}
        totals["blobs"] = len(blobs)
        # cached data at kernel speed (erofs mode): blobs the kernel reads from the cache's data file
        # directly, and bytes of cached chunks stored into the kernel's page cache at mount
        totals["kernel_direct_blobs"] = sum(bool(u.get("kernel_direct")) for u in blobs.values())
        totals["kernel_stored_bytes"] = sum(u.get("kernel_stored_bytes", 0) for u in blobs.values())
        totals["kernel_fill"] = self.kernel_fill
        totals["evictions"] = self.metrics.snapshot()["evictions"]
        errors = [u["write_error"] for u in blobs.values() if u.get("write_error")]
        totals["write_error"] = errors[0] if errors else None
        if self.budget is not None:
            b = self.budget.snapshot()
            totals.update({"max_size": b["max_size"], "limit_root": b["root"],
                           "limit_root_bytes": tree_bytes(b["root"]),
                           "evicted_bytes": b["evicted_bytes"], "not_cached_for_room": b["not_cached_for_room"]})
        else:
            totals["max_size"] = 0
        return {"metrics": self.metrics.snapshot(), "blobs": blobs, "totals": totals,
                "link": self.cost_model.snapshot()}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            opening = list(self._opening.values())
        wait_futures(opening)                  # opens in progress finish (and close their cache)
        with self._lock:
            caches = list(self._caches.values())
        errors = []
        for c in caches:
            try:
                c.close()
            except Exception as e:          # close the others anyway
                errors.append(e)
                log.warning("closing %s: %s", c.name, e)
        if self.budget is not None:
            release_budget(self.budget)
        if self._owns_backend:
            self.backend.close()
        if errors:
            raise errors[0]

    def __enter__(self) -> "CacheManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
