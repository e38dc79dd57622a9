"""Prometheus metrics of mount daemons: what `nydusify stats` shows, in Prometheus's text format.

Nothing is counted twice: `MountCollector` reads the live stats of the mounts at scrape time (each a
`MountDaemon.stats()` dict, in process or fetched from a daemon's API socket, `rafs.api`) and turns
them into metric families (`mount_families`). One server per process (`serve_metrics`) answers
`GET /metrics` on HOST:PORT: `nydusify mount --metrics-address` runs one in its mount daemon
(`rafs.launcher`), the snapshotter one for the node (`snapshotter.metrics`, all its mount daemons).

Names follow Prometheus's conventions (`pynydus_<subsystem>_<name>_<unit>`, counters end in `_total`,
base units: bytes, seconds). Every mount's series carry `image` (the reference mounted) and `mode`
(erofs or fuse):

    pynydus_cache_fetched_bytes_total         compressed chunk bytes the blob cache fetched (demand + prefetch)
    pynydus_cache_fetch_requests_total        backend range requests of the cache that succeeded
    pynydus_cache_fetch_errors_total          ... that failed (after the backend's retries)
    pynydus_cache_fetched_chunks_total        chunks fetched and verified
    pynydus_cache_fetch_duration_seconds      histogram of the cache's fetch latency
    pynydus_cache_hits_total                  chunks a read found ready in the cache
    pynydus_cache_misses_total                chunks a read had to wait for
    pynydus_cache_verify_failures_total       chunks that failed their digest (never served)
    pynydus_cache_recheck_failures_total      cached chunks whose checksum no longer matched
    pynydus_cache_prefetch_bytes_total        compressed bytes fetched by background prefetch
    pynydus_cache_prefetch_requests_total
    pynydus_cache_read_bytes_total            bytes the cache served to reads
    pynydus_cache_evictions_total             chunks evicted to stay under the cache's size limit
    pynydus_cache_disk_bytes                  gauge: disk use of the mount's open cache files
    pynydus_backend_read_bytes_total          bytes received per source (+ `source`: registry, mirror,
    pynydus_backend_requests_total              peer, localfs; `backend`: its name), requests and failed
    pynydus_backend_request_errors_total        requests
    pynydus_p2p_upload_bytes_total            bytes / requests this node's peer service served to others
    pynydus_p2p_upload_requests_total
    pynydus_fs_read_requests_total            read requests the filesystem served (+ `kind`: file, blob)
    pynydus_fs_read_bytes_total               bytes they asked for
    pynydus_image_blob_bytes                  gauge: compressed size of the image's blobs
    pynydus_daemon_info                       1, with `mountpoint` and `pid`
    pynydus_daemon_start_time_seconds         gauge: when the daemon started (unix time)

The same reference mounted twice (two mount daemons) is one series: the values are added.
"""
from __future__ import annotations

import logging
import math
import socket
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric)

log = logging.getLogger(__name__)

MOUNT_LABELS = ("image", "mode")

# name -> (help, key of the storage metrics)
_CACHE_COUNTERS = {
    "pynydus_cache_fetched_bytes": ("Compressed chunk bytes the blob cache fetched from its backend "
                                    "(on demand and prefetch).", "bytes_fetched"),
    "pynydus_cache_fetch_requests": ("Backend range requests of the blob cache that succeeded.", "requests"),
    "pynydus_cache_fetch_errors": ("Backend range requests of the blob cache that failed (after the "
                                   "backend's retries).", "request_errors"),
    "pynydus_cache_fetched_chunks": ("Chunks fetched and verified.", "chunks_fetched"),
    "pynydus_cache_hits": ("Chunks a read found ready in the cache.", "chunks_hit"),
    "pynydus_cache_misses": ("Chunks a read had to wait for (a fetch).", "chunks_missed"),
    "pynydus_cache_verify_failures": ("Chunks that failed their digest (never served, never cached).",
                                      "verify_failures"),
    "pynydus_cache_recheck_failures": ("Cached chunks whose checksum no longer matched after a restart.",
                                       "recheck_failures"),
    "pynydus_cache_prefetch_bytes": ("Compressed bytes fetched by background prefetch.", "prefetch_bytes"),
    "pynydus_cache_prefetch_requests": ("Backend requests made by background prefetch.", "prefetch_requests"),
    "pynydus_cache_read_bytes": ("Bytes the blob cache served to reads.", "bytes_read"),
    "pynydus_cache_evictions": ("Chunks evicted from the blob cache to stay under its size limit "
                                "(--cache-max-size, [cache] max_size).", "evictions"),
}


def source_kind(name: str) -> tuple[str, str]:
    """(kind, backend name) of a `source_stats()` key: kind is registry, mirror, peer, localfs or other.

    Keys: "<backend name>" (e.g. "registry HOST/REPO", "localfs DIR"), "mirror <name>" and
    "origin <name>" (a MirrorBackend), "p2p" (the peers of a P2PBackend)."""
    if name == "p2p":
        return "peer", name
    if name.startswith("mirror "):
        return "mirror", name[len("mirror "):]
    if name.startswith("origin "):
        name = name[len("origin "):]
    for kind in ("registry", "localfs", "mirror"):
        if name.split(" ", 1)[0] == kind:
            return kind, name
    return "other", name


class _Family:
    """Samples of one metric, summed over equal label values."""

    def __init__(self, kind: str, name: str, help: str, labels: tuple[str, ...]):
        self.kind, self.name, self.help, self.labels = kind, name, help, labels
        self.values: dict[tuple[str, ...], object] = {}

    def add(self, labels: tuple[str, ...], value) -> None:
        if value is None:
            return
        old = self.values.get(labels)
        if self.kind == "histogram":
            le, counts, total = value
            if old is not None and old[0] == le:
                value = (le, [a + b for a, b in zip(old[1], counts)], old[2] + total)
            elif old is not None:                       # other buckets (another version): keep the first
                return
        elif old is not None:
            value = max(old, value) if self.kind == "max" else old + value
        self.values[labels] = value

    def metric(self) -> Metric:
        if self.kind == "counter":
            m = CounterMetricFamily(self.name, self.help, labels=self.labels)
            for lv, v in self.values.items():
                m.add_metric(list(lv), v)
        elif self.kind == "histogram":
            m = HistogramMetricFamily(self.name, self.help, labels=self.labels, unit="")
            for lv, (le, counts, total) in self.values.items():
                cum = counts[:-1]
                buckets = [(_le(b), float(c)) for b, c in zip(le, cum)] + [("+Inf", float(counts[-1]))]
                m.add_metric(list(lv), buckets, total)
        else:
            m = GaugeMetricFamily(self.name, self.help, labels=self.labels)
            for lv, v in self.values.items():
                m.add_metric(list(lv), v)
        return m


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class Families:
    """Metric families being built; `metrics()` yields them for a collector."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def family(self, kind: str, name: str, help: str, labels: tuple[str, ...]) -> _Family:
        f = self._families.get(name)
        if f is None:
            f = self._families[name] = _Family(kind, name, help, labels)
        return f

    def add(self, kind: str, name: str, help: str, labels: dict[str, str], value) -> None:
        """`kind`: counter, gauge (summed), max (a gauge: the largest value) or histogram (value:
        (bucket bounds, cumulative counts incl. +Inf, sum))."""
        self.family(kind, name, help, tuple(labels)).add(tuple(labels.values()), value)

    def metrics(self) -> Iterable[Metric]:
        for f in self._families.values():
            yield f.metric()


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def add_mount(fam: Families, st: dict) -> None:
    """Add the series of one mount daemon's stats (`MountDaemon.stats()`, the stats API's answer)."""
    base = {"image": str(st.get("ref") or ""), "mode": str(st.get("mode") or "")}
    m = (st.get("storage") or {}).get("metrics") or st      # the full storage metrics, else the summary
    for name, (help, key) in _CACHE_COUNTERS.items():
        fam.add("counter", name, help, base, _num(m.get(key, 0)))
    h = m.get("fetch_latency_histogram")
    if h:
        fam.add("histogram", "pynydus_cache_fetch_duration_seconds",
                "Latency of the blob cache's backend fetches.", base,
                ([*h["le"], math.inf], [*h["counts"], h["count"]], float(h["sum"])))
    fam.add("gauge", "pynydus_cache_disk_bytes", "Disk use of the mount's open blob cache files.", base,
            _num((st.get("cache") or {}).get("disk_bytes")))
    fam.add("gauge", "pynydus_image_blob_bytes", "Compressed size of the mounted image's blobs.", base,
            _num(st.get("image_bytes")))
    for key, src in sorted((m.get("sources") or {}).items()):
        kind, backend = source_kind(key)
        labels = {**base, "source": kind, "backend": backend}
        fam.add("counter", "pynydus_backend_read_bytes", "Bytes received from each source of blob data.",
                labels, _num(src.get("bytes")))
        fam.add("counter", "pynydus_backend_requests", "Requests to each source of blob data (failed ones "
                "too).", labels, _num(src.get("requests")))
        fam.add("counter", "pynydus_backend_request_errors", "Failed requests to each source of blob data.",
                labels, _num(src.get("errors")))
        uploads = src.get("uploads") if kind == "peer" else None
        if uploads:
            fam.add("counter", "pynydus_p2p_upload_bytes", "Bytes this node's peer service served to peers.",
                    base, _num(uploads.get("bytes")))
            fam.add("counter", "pynydus_p2p_upload_requests", "Requests this node's peer service served.",
                    base, _num(uploads.get("requests")))
    served = st.get("requests_served") or {}
    for kind, key in (("file", "file_reads"), ("blob", "blob_reads")):
        fam.add("counter", "pynydus_fs_read_requests",
                "Read requests the mount's filesystem served (file: a FUSE tree read; blob: a read of "
                "a blob file under kernel EROFS).", {**base, "kind": kind}, _num(served.get(key)))
    fam.add("counter", "pynydus_fs_read_bytes", "Bytes the filesystem's read requests asked for.", base,
            _num(served.get("bytes_requested")))
    fam.add("max", "pynydus_daemon_info", "A mount daemon serving the image (always 1).",
            {**base, "mountpoint": str(st.get("mountpoint") or ""), "pid": str(st.get("pid") or "")}, 1.0)
    fam.add("max", "pynydus_daemon_start_time_seconds", "When the mount daemon started (unix time).", base,
            _num(st.get("started")))


def mount_families(stats: Iterable[dict]) -> Families:
    fam = Families()
    for st in stats:
        add_mount(fam, st)
    return fam


class MountCollector:
    """Reads the mounts' stats when scraped: `stats()` -> the stats dicts of the mounts to show."""

    def __init__(self, stats: Callable[[], Iterable[dict]]):
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        try:
            stats = list(self._stats())
        except Exception:                       # a scrape must not take the daemon down
            log.exception("collecting mount stats for /metrics")
            stats = []
        return mount_families(stats).metrics()


def parse_address(address: str) -> tuple[str, int]:
    """"HOST:PORT", "[V6]:PORT" or ":PORT" (every interface) -> (host, port); ValueError otherwise."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics address {address!r}: want HOST:PORT (e.g. 127.0.0.1:9110)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"metrics address {address!r}: write an IPv6 host in brackets, [::1]:9110")
    return host or "0.0.0.0", int(port)


def check_address_free(address: str) -> None:
    """OSError naming `address` if it cannot be listened on now (taken, not ours): checked before a mount
    starts, so the user gets this line rather than a daemon that dies after mounting."""
    host, port = parse_address(address)
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(e.errno, f"cannot serve metrics on {address}: {e.strerror}") from None


class MetricsServer:
    """`GET /metrics` of `registry` on HOST:PORT (port 0: a free one; `address` tells which)."""

    def __init__(self, address: str, registry: CollectorRegistry):
        from prometheus_client import start_http_server
        host, port = parse_address(address)
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise OSError(e.errno, f"cannot serve metrics on {address}: {e.strerror or e}") from None
        self.host, self.port = host, self._server.server_port

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve_metrics(address: str, *collectors, process: bool = True) -> MetricsServer:
    """Serve `collectors` (+ this process's `process_*` metrics) on `address`."""
    from prometheus_client import ProcessCollector
    registry = CollectorRegistry()
    for c in collectors:
        registry.register(c)
    if process:
        ProcessCollector(registry=registry)
    return MetricsServer(address, registry)
