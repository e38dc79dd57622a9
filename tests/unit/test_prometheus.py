"""Prometheus metrics (rafs/prometheus.py, snapshotter/metrics.py): names, labels, values, the server.

What a real mount daemon and a real snapshotter serve is tested end to end in
tests/integration/test_metrics.py; here the pieces: the histogram the storage metrics keep, how
stats become metric families (read back with prometheus_client's own parser), the source kinds,
the address syntax, the HTTP server, the snapshotter's collector over a real metadata store and a
real daemon API socket.
"""
from __future__ import annotations

import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from rafs.api import ApiServer
from rafs.prometheus import MountCollector, mount_families, parse_address, serve_metrics, source_kind
from rafs.storage.metrics import LATENCY_BUCKETS, LatencyHistogram, SourceCounters, StorageMetrics
from snapshotter import metastore as ms
from snapshotter.config import load_config
from snapshotter.metrics import SnapshotterCollector


def scrape(*collectors) -> dict:
    """{family name: family} of what `collectors` expose, through the text format and its parser."""
    reg = CollectorRegistry()
    for c in collectors:
        reg.register(c)
    text = generate_latest(reg).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family, name: str | None = None, **labels) -> list:
    return [s for s in family.samples if (name is None or s.name == name)
            and all(s.labels.get(k) == v for k, v in labels.items())]


def value(family, name: str | None = None, **labels) -> float:
    found = samples(family, name, **labels)
    assert len(found) == 1, (name, labels, family.samples)
    return found[0].value


# ------------------------------------------------------------------------------- the histogram

def test_histogram_is_cumulative_with_inclusive_bounds():
    h = LatencyHistogram((0.01, 0.1, 1.0))
    for s in (0.001, 0.01, 0.05, 0.1, 3.0):
        h.add(s)
    snap = h.snapshot()
    assert snap["le"] == [0.01, 0.1, 1.0]
    assert snap["counts"] == [2, 4, 4] and snap["count"] == 5
    assert snap["sum"] == pytest.approx(3.161)
    with pytest.raises(ValueError):
        LatencyHistogram((0.1, 0.01))


def test_storage_metrics_snapshot_has_histogram_and_evictions():
    m = StorageMetrics()
    m.fetch_ok(100, 1, 0.002)
    m.fetch_ok(100, 1, 0.2)
    snap = m.snapshot()
    assert snap["evictions"] == 0
    h = snap["fetch_latency_histogram"]
    assert h["le"] == list(LATENCY_BUCKETS) and h["count"] == 2 == snap["fetch_latency_ms"]["count"]
    assert h["counts"][LATENCY_BUCKETS.index(0.0025)] == 1 and h["counts"][-1] == 2
    m.evicted(3)
    assert m.snapshot()["evictions"] == 3


# ------------------------------------------------------------------------------- stats -> families

def test_source_kinds():
    assert source_kind("registry 127.0.0.1:5000/app") == ("registry", "registry 127.0.0.1:5000/app")
    assert source_kind("origin registry r/app") == ("registry", "registry r/app")
    assert source_kind("mirror registry m:80/app") == ("mirror", "registry m:80/app")
    assert source_kind("p2p") == ("peer", "p2p")
    assert source_kind("localfs /blobs") == ("localfs", "localfs /blobs")
    assert source_kind("something else") == ("other", "something else")


def _stats(ref="reg:5000/app:v1", mode="fuse", pid=7, registry_bytes=4096, peer_bytes=1024):
    reg, mirror = SourceCounters(), SourceCounters()
    reg.ok(registry_bytes)
    mirror.ok(100)
    mirror.error()
    sources = {"origin registry reg:5000/app": reg.snapshot(), "mirror registry m:80/app": mirror.snapshot(),
               "p2p": {"bytes": peer_bytes, "requests": 2, "errors": 0, "uploads": {"bytes": 300, "requests": 3}}}
    m = StorageMetrics(lambda: sources)
    m.fetch_ok(registry_bytes + peer_bytes, 3, 0.004)
    m.fetch_ok(64, 1, 0.3, prefetch=True)
    m.fetch_error()
    m.read(5000, hits=4, misses=3)
    return {"ref": ref, "mode": mode, "pid": pid, "mountpoint": f"/mnt/{pid}", "started": 1000.0 + pid,
            "image_bytes": 1 << 20, "cache": {"disk_bytes": 8192},
            "requests_served": {"file_reads": 5, "blob_reads": 0, "bytes_requested": 6000},
            "storage": {"metrics": m.snapshot()}}


def test_mount_families_names_labels_values():
    st = _stats()
    fams = scrape(MountCollector(lambda: [st]))
    lab = {"image": "reg:5000/app:v1", "mode": "fuse"}
    assert value(fams["pynydus_cache_fetched_bytes"], **lab) == 4096 + 1024 + 64
    assert fams["pynydus_cache_fetched_bytes"].type == "counter"
    assert value(fams["pynydus_cache_fetch_requests"], **lab) == 2
    assert value(fams["pynydus_cache_fetch_errors"], **lab) == 1
    assert value(fams["pynydus_cache_hits"], **lab) == 4 and value(fams["pynydus_cache_misses"], **lab) == 3
    assert value(fams["pynydus_cache_prefetch_bytes"], **lab) == 64
    assert value(fams["pynydus_cache_read_bytes"], **lab) == 5000
    assert value(fams["pynydus_cache_evictions"], **lab) == 0
    assert value(fams["pynydus_cache_disk_bytes"], **lab) == 8192
    assert value(fams["pynydus_image_blob_bytes"], **lab) == 1 << 20
    h = fams["pynydus_cache_fetch_duration_seconds"]
    assert h.type == "histogram"
    assert value(h, "pynydus_cache_fetch_duration_seconds_count", **lab) == 2
    assert value(h, "pynydus_cache_fetch_duration_seconds_sum", **lab) == pytest.approx(0.304)
    assert value(h, "pynydus_cache_fetch_duration_seconds_bucket", le="0.005", **lab) == 1
    assert value(h, "pynydus_cache_fetch_duration_seconds_bucket", le="0.25", **lab) == 1
    assert value(h, "pynydus_cache_fetch_duration_seconds_bucket", le="+Inf", **lab) == 2
    b = fams["pynydus_backend_read_bytes"]
    assert value(b, source="registry", backend="registry reg:5000/app", **lab) == 4096
    assert value(b, source="mirror", backend="registry m:80/app", **lab) == 100
    assert value(b, source="peer", **lab) == 1024
    assert value(fams["pynydus_backend_requests"], source="mirror", **lab) == 2
    assert value(fams["pynydus_backend_request_errors"], source="mirror", **lab) == 1
    assert value(fams["pynydus_p2p_upload_bytes"], **lab) == 300
    assert value(fams["pynydus_fs_read_requests"], kind="file", **lab) == 5
    assert value(fams["pynydus_fs_read_bytes"], **lab) == 6000
    assert value(fams["pynydus_daemon_info"], mountpoint="/mnt/7", pid="7", **lab) == 1
    assert value(fams["pynydus_daemon_start_time_seconds"], **lab) == 1007.0
    for name in fams:                                   # Prometheus's conventions
        assert name.startswith("pynydus_")
        if fams[name].type == "counter":
            assert any(s.name == name + "_total" for s in fams[name].samples)


def test_two_daemons_of_one_image_add_up_and_other_images_stay_apart():
    a, b, c = _stats(pid=1), _stats(pid=2, registry_bytes=100), _stats(ref="other/img:v2", mode="erofs", pid=3)
    fams = scrape(MountCollector(lambda: [a, b, c]))
    f = fams["pynydus_backend_read_bytes"]
    assert value(f, image="reg:5000/app:v1", source="registry") == 4096 + 100
    assert value(f, image="other/img:v2", mode="erofs", source="registry") == 4096
    h = fams["pynydus_cache_fetch_duration_seconds"]
    assert value(h, "pynydus_cache_fetch_duration_seconds_count", image="reg:5000/app:v1") == 4
    assert len(samples(fams["pynydus_daemon_info"])) == 3
    assert value(fams["pynydus_daemon_start_time_seconds"], image="reg:5000/app:v1") == 1002.0


def test_a_failing_stats_source_scrapes_empty():
    def boom():
        raise OSError("daemon gone")
    assert scrape(MountCollector(boom)) == {}
    assert list(mount_families([]).metrics()) == []


# ------------------------------------------------------------------------------- address and server

def test_parse_address():
    assert parse_address("127.0.0.1:9110") == ("127.0.0.1", 9110)
    assert parse_address(":9110") == ("0.0.0.0", 9110)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("localhost:80") == ("localhost", 80)
    for bad in ("9110", "host:", "host:port", "::1:80", "h:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_server_serves_metrics_and_closes():
    st = _stats()
    server = serve_metrics("127.0.0.1:0", MountCollector(lambda: [st]))
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(server.url, timeout=10) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = r.read().decode()
        names = {f.name for f in text_string_to_metric_families(text)}
        assert {"pynydus_cache_fetched_bytes", "process_cpu_seconds"} <= names
        with pytest.raises(OSError, match="cannot serve metrics on 127.0.0.1:"):
            serve_metrics(f"127.0.0.1:{server.port}")
    finally:
        server.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=5)


# ------------------------------------------------------------------------------- snapshotter

def test_snapshotter_config_metrics_address(tmp_path):
    p = tmp_path / "config.toml"
    p.write_text('[metrics]\naddress = "127.0.0.1:9110"\n')
    assert load_config(str(p)).metrics.address == "127.0.0.1:9110"
    assert load_config(None).metrics.address == ""
    p.write_text('[metrics]\naddress = "9110"\n')
    with pytest.raises(ValueError, match="HOST:PORT"):
        load_config(str(p))
    p.write_text('[metrics]\nport = 9110\n')
    with pytest.raises(ValueError, match="unknown key 'port'"):
        load_config(str(p))


def test_snapshotter_collector_reads_metadata_and_daemon_sockets(tmp_path):
    """Rows in a real metadata store; one mount's daemon answers on a real API socket, one is dead."""
    store = ms.MetaStore(tmp_path / "meta.db")
    st = _stats(ref="reg:5000/app:v1")
    api = ApiServer(str(tmp_path / "api.sock"), {("GET", "/stats"): lambda: (200, st)}).start()
    try:
        with store.transaction(write=True) as tx:
            ms.put_rafs_mount(tx, ms.RafsMountRow("k1", "reg:5000/app:v1", "/m1", "fuse", 7, "mounted",
                                                  restarts=2))
            ms.put_rafs_mount(tx, ms.RafsMountRow("k2", "reg:5000/dead:v1", "/m2", "fuse", 8, "mounted"))
            ms.put_rafs_mount(tx, ms.RafsMountRow("k3", "reg:5000/bad:v1", "", "", 0, "failed"))
            ms.set_image_status(tx, "reg:5000/app:v1", "lazy")
            ms.set_image_status(tx, "reg:5000/dead:v1", "lazy")
            ms.set_image_status(tx, "reg:5000/bad:v1", "failed")
        lazy = SimpleNamespace(
            daemon_info=lambda key: {"pid": 7} if key == "k1" else None,
            state_paths=lambda key: SimpleNamespace(api_sock=str(tmp_path / "api.sock"), dir=str(tmp_path / key)))
        fams = scrape(SnapshotterCollector(store, lazy))
    finally:
        api.close()
        store.close()
    assert value(fams["pynydus_snapshotter_mounts"], state="mounted") == 2
    assert value(fams["pynydus_snapshotter_mounts"], state="failed") == 1
    assert value(fams["pynydus_snapshotter_mounts"], state="full") == 0
    assert value(fams["pynydus_snapshotter_images"], status="lazy") == 2
    assert value(fams["pynydus_snapshotter_images"], status="failed") == 1
    assert value(fams["pynydus_snapshotter_daemon_up"], image="reg:5000/app:v1") == 1
    assert value(fams["pynydus_snapshotter_daemon_up"], image="reg:5000/dead:v1") == 0
    assert value(fams["pynydus_snapshotter_daemon_restarts"], image="reg:5000/app:v1") == 2
    assert fams["pynydus_snapshotter_daemon_restarts"].type == "counter"
    assert value(fams["pynydus_backend_read_bytes"], image="reg:5000/app:v1", source="registry") == 4096
    assert not samples(fams["pynydus_backend_read_bytes"], image="reg:5000/dead:v1")
    assert value(fams["pynydus_snapshotter_scrape_duration_seconds"]) >= 0


def test_real_backends_sources_are_classified(tmp_path):
    """The keys a real MirrorBackend (mirror + origin) reports become source="mirror" / "localfs"."""
    import hashlib

    from rafs.storage.backend import LocalFsBackend, MirrorBackend
    data = bytes(range(256)) * 64
    blob_id = hashlib.sha256(data).hexdigest()
    (tmp_path / "mirror").mkdir()
    (tmp_path / "origin").mkdir()
    (tmp_path / "mirror" / blob_id).write_bytes(data)
    (tmp_path / "origin" / blob_id).write_bytes(data)
    backend = MirrorBackend([LocalFsBackend(str(tmp_path / "mirror"))], LocalFsBackend(str(tmp_path / "origin")))
    try:
        assert backend.read_range(blob_id, 0, 1000) == data[:1000]
        st = {"ref": "r/i:v1", "mode": "fuse", "storage": {"metrics": StorageMetrics(backend.source_stats).snapshot()}}
        fams = scrape(MountCollector(lambda: [st]))
    finally:
        backend.close()
    b = fams["pynydus_backend_read_bytes"]
    assert value(b, source="mirror", backend=f"localfs {tmp_path / 'mirror'}") == 1000
    assert value(b, source="localfs", backend=f"localfs {tmp_path / 'origin'}") == 0
