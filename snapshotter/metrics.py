"""Prometheus metrics of the node (`[metrics] address = "HOST:PORT"`): every mount daemon + the snapshotter.

At each scrape `SnapshotterCollector` reads the snapshotter's metadata (lazy mounts and their restarts,
images by status) and asks every live mount daemon for its stats over its API socket (in parallel, a
short timeout each), then turns them into metric families: the mount daemons' series
(`rafs.prometheus`: bytes and requests per source, cache hits and misses, fetch latency histograms, ...,
labelled `image` and `mode`) and the snapshotter's own:

    pynydus_snapshotter_mounts                   gauge: lazy mounts by `state` (mounted, failed, full)
    pynydus_snapshotter_images                   gauge: images by `status` (lazy, full, failed)
    pynydus_snapshotter_daemon_up                gauge per `image`: 1 if its mount daemon answered the scrape
    pynydus_snapshotter_daemon_restarts_total    per `image`: mount daemons replaced after they died
    pynydus_snapshotter_scrape_duration_seconds  gauge: how long reading the daemons took

Nothing is counted here: the numbers live in the daemons and the metadata store.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

from rafs.prometheus import Families, add_mount, serve_metrics

from . import metastore as ms

log = logging.getLogger("nydus-snapshotter")

DAEMON_TIMEOUT = 3.0          # seconds for one mount daemon's stats
MAX_PARALLEL = 8
MOUNT_STATES = ("mounted", "failed", "full")
IMAGE_STATUSES = ("lazy", "full", "failed")


class SnapshotterCollector:
    """`store`: the snapshotter's MetaStore; `lazy`: its RafsMounts (None: no lazy mounts)."""

    def __init__(self, store: ms.MetaStore, lazy=None, timeout: float = DAEMON_TIMEOUT):
        self.store = store
        self.lazy = lazy
        self.timeout = timeout

    def _daemon_stats(self, key: str) -> dict | None:
        from rafs.api import ApiClient, ApiError
        if self.lazy.daemon_info(key) is None:
            return None
        try:
            return ApiClient(self.lazy.state_paths(key).api_sock, timeout=self.timeout).stats()
        except ApiError as e:
            log.debug("metrics: mount %s: %s", key, e)
            return None

    def _failovers(self, key: str) -> int:
        """Daemons the mount's holder (rafs.holder) started after one died; 0 without a holder."""
        if self.lazy is None:
            return 0
        from rafs.mounttab import read_holder
        held = read_holder(self.lazy.state_paths(key)) or {}
        n = held.get("restarts", 0)
        return n if isinstance(n, int) else 0

    def collect(self) -> Iterable:
        t0 = time.monotonic()
        fam = Families()
        try:
            with self.store.transaction() as tx:
                rows = ms.list_rafs_mounts(tx)
                images = ms.list_images(tx)
        except Exception:                       # a scrape must not take the snapshotter down
            log.exception("metrics: reading the metadata")
            rows, images = [], []
        states = {s: 0 for s in MOUNT_STATES}
        for r in rows:
            states[r.state] = states.get(r.state, 0) + 1
        for state, n in states.items():
            fam.add("gauge", "pynydus_snapshotter_mounts", "Lazy mounts of the snapshotter by state.",
                    {"state": state}, float(n))
        statuses = {s: 0 for s in IMAGE_STATUSES}
        for _ref, status, _detail, _updated in images:
            statuses[status] = statuses.get(status, 0) + 1
        for status, n in statuses.items():
            fam.add("gauge", "pynydus_snapshotter_images", "Images the snapshotter served, by status.",
                    {"status": status}, float(n))
        mounted = [r for r in rows if r.state == "mounted"]
        stats: list[dict | None] = []
        if mounted and self.lazy is not None:
            with ThreadPoolExecutor(min(MAX_PARALLEL, len(mounted)), thread_name_prefix="metrics") as pool:
                stats = list(pool.map(lambda r: self._safe_stats(r.key), mounted))
        for i, r in enumerate(mounted):
            st = stats[i] if i < len(stats) else None
            fam.add("max", "pynydus_snapshotter_daemon_up",
                    "1 if the image's mount daemon answered this scrape, else 0.", {"image": r.image_ref},
                    1.0 if st else 0.0)
            if st:
                add_mount(fam, st)
        for r in rows:
            fam.add("counter", "pynydus_snapshotter_daemon_restarts",
                    "Mount daemons replaced after they died (per image): by their holder (failover) "
                    "or by the snapshotter.",
                    {"image": r.image_ref}, float(r.restarts + self._failovers(r.key)))
        fam.add("gauge", "pynydus_snapshotter_scrape_duration_seconds",
                "Seconds this scrape took to read the metadata and the mount daemons.", {},
                time.monotonic() - t0)
        return fam.metrics()

    def _safe_stats(self, key: str) -> dict | None:
        try:
            return self._daemon_stats(key)
        except Exception as e:
            log.debug("metrics: mount %s: %s", key, e)
            return None


def serve(address: str, store: ms.MetaStore, lazy=None):
    """Serve the node's metrics on `address`; returns the server (`.url`, `.close()`)."""
    return serve_metrics(address, SnapshotterCollector(store, lazy))
