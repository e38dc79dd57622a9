"""Blob cache over real files (LocalFsBackend): the cache conformance suite, plus the pieces
(chunkmap format, metrics, mirror fallback, retries, factory, CacheManager)."""
from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from rafs.errors import BackendError, FormatError, IntegrityError, NotFound
from rafs.image.digests import normalize_blob_id
from rafs.storage.backend import (BlobBackend, LocalFsBackend, MirrorBackend, RetryPolicy,
                                  TransientBackendError)
from rafs.storage.cache import (BlobCache, CacheInUse, CacheManager, ChunkMap, ChunkMapError,
                                DemandGate)
from rafs.storage.cache.state import CHUNKMAP_HEADER_SIZE, file_size
from rafs.storage.factory import (BackendConfig, CacheConfig, MirrorConfig, StorageConfig,
                                  build_backend, build_storage)
from rafs.storage.metrics import LatencyReservoir, StorageMetrics

from tests.conformance import make_blob
from tests.conformance.cache_suite import CacheConformance, CacheEnv
from tests.fakes.backends import CountingBackend

_seed = iter(range(1000, 10**6))


def _store(directory: Path, blob) -> Path:
    path = directory / "blobs" / "sha256" / blob.blob_id
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob.data)
    return path


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture
def cache_env(tmp_path) -> CacheEnv:
    blob = make_blob(next(_seed))
    path = _store(tmp_path / "layout", blob)
    spy = CountingBackend(LocalFsBackend(tmp_path / "layout"))
    yield CacheEnv(blob, spy, tmp_path / "cache", lambda off: _flip(path, off))
    spy.close()


class TestCacheConformance(CacheConformance):
    """The cache suite over a local OCI layout."""


# --------------------------------------------------------------------------- chunkmap

class TestChunkMap:
    def _map(self, n=70):
        return ChunkMap(n, blob_id="sha256:" + "ab" * 32, view_size=n * 4096)

    def test_round_trip(self):
        m = self._map()
        for i in (0, 7, 8, 63, 64, 69):
            m.mark_ready(i, 1000 + i)
        m.clear(7)
        data = m.encode()
        assert len(data) == file_size(70)
        back = ChunkMap.decode(data, chunk_count=70, blob_id="ab" * 32, view_size=70 * 4096)
        assert back.ready_indices() == [0, 8, 63, 64, 69]
        assert back.xxh64(64) == 1064 and back.xxh64(7) == 0 and back.ready_count == 5

    @pytest.mark.parametrize("damage, reason", [
        (lambda d: d[:-1], "checksum"),
        (lambda d: b"", "too short"),
        (lambda d: d[:CHUNKMAP_HEADER_SIZE // 2] + b"x" + d[CHUNKMAP_HEADER_SIZE // 2 + 1:], "checksum"),
    ])
    def test_damage_is_detected(self, damage, reason):
        data = damage(self._map().encode())
        with pytest.raises(ChunkMapError, match=reason):
            ChunkMap.decode(data, chunk_count=70, blob_id="ab" * 32, view_size=70 * 4096)

    @pytest.mark.parametrize("other", [dict(blob_id="ef" * 32), dict(chunk_count=71),
                                       dict(view_size=71 * 4096)])
    def test_another_blob_is_refused(self, other):
        data = self._map().encode()
        kw = {"chunk_count": 70, "blob_id": "ab" * 32, "view_size": 70 * 4096, **other}
        with pytest.raises(ChunkMapError, match="another blob"):
            ChunkMap.decode(data, **kw)

    def test_load_missing_file_is_empty_with_reason(self, tmp_path):
        m, reason = ChunkMap.load(tmp_path / "x.chunkmap", chunk_count=3, blob_id="ab" * 32,
                                  view_size=3 * 4096)
        assert m.ready_count == 0 and reason

    def test_save_is_atomic_replace(self, tmp_path):
        m = self._map()
        m.mark_ready(3, 42)
        p = tmp_path / "a.chunkmap"
        m.save(p)
        assert not (tmp_path / "a.chunkmap.tmp").exists() and not list(tmp_path.glob("*.tmp"))
        m2, reason = ChunkMap.load(p, chunk_count=70, blob_id="ab" * 32, view_size=70 * 4096)
        assert reason is None and m2.ready_indices() == [3]


# --------------------------------------------------------------------------- metrics

def test_latency_reservoir_is_bounded_and_percentiles_are_sane():
    r = LatencyReservoir(size=100, seed=1)
    for i in range(1, 10001):
        r.add(i / 1000.0)
    snap = r.snapshot_ms()
    assert snap["count"] == 10000 and snap["max"] == 10000.0
    assert len(r._samples) == 100
    assert 3000 < snap["p50"] < 7000 and snap["p50"] <= snap["p90"] <= snap["p99"]


def test_metrics_snapshot_is_json_ready_and_thread_safe():
    m = StorageMetrics(sources=lambda: {"src": {"bytes": 1}})

    def work():
        for _ in range(1000):
            m.fetch_ok(10, 1, 0.001, prefetch=True)
            m.read(5, 1, 1)

    ts = [threading.Thread(target=work) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    snap = json.loads(json.dumps(m.snapshot()))
    assert snap["bytes_fetched"] == 80000 and snap["requests"] == 8000
    assert snap["prefetch_bytes"] == 80000 and snap["chunks_hit"] == 8000
    assert snap["fetch_latency_ms"]["p99"] == 1.0 and snap["sources"] == {"src": {"bytes": 1}}


# --------------------------------------------------------------------------- backends

def test_blob_ids_are_validated():
    h = "ab" * 32
    assert normalize_blob_id("sha256:" + h.upper()) == h
    for bad in ("../x", "sha512:" + h, h + "0", 5):
        with pytest.raises(ValueError):
            normalize_blob_id(bad)


def test_localfs_finds_plain_directory_layout(tmp_path):
    blob = make_blob(1, chunks=3)
    (tmp_path / blob.blob_id).write_bytes(blob.data)
    with LocalFsBackend(tmp_path) as b:
        assert b.read_range(blob.blob_id, 5, 10) == blob.data[5:15]
    with pytest.raises(BackendError, match="not a directory"):
        LocalFsBackend(tmp_path / "nope")


class _Flaky(BlobBackend):
    """Fails transiently `n` times, then answers zeros."""
    retry = RetryPolicy(retries=3, backoff=0.01, deadline=5)

    def __init__(self, n):
        super().__init__()
        self.n = n
        self.attempts = 0

    @property
    def name(self):
        return "flaky"

    def _read_range(self, blob_id, offset, size):
        self.attempts += 1
        if self.attempts <= self.n:
            raise TransientBackendError("flaky: hiccup")
        return bytes(size)

    def _blob_size(self, blob_id):
        raise NotFound("flaky: none")


def test_transient_errors_are_retried_with_backoff():
    b = _Flaky(2)
    assert b.read_range("ab" * 32, 0, 3) == bytes(3) and b.attempts == 3
    b = _Flaky(10)
    with pytest.raises(BackendError, match="gave up after 4 attempts"):
        b.read_range("ab" * 32, 0, 3)
    assert b.source_stats()["flaky"]["errors"] == 1


def test_not_found_is_not_retried():
    b = _Flaky(0)
    with pytest.raises(NotFound):
        b.blob_size("ab" * 32)


def _mirror_setup(tmp_path, mirror_kind):
    blob = make_blob(5, chunks=12)
    _store(tmp_path / "origin", blob)
    origin = LocalFsBackend(tmp_path / "origin")
    if mirror_kind == "empty":
        (tmp_path / "mirror").mkdir()
        mirror = CountingBackend(LocalFsBackend(tmp_path / "mirror"))
    else:
        _store(tmp_path / "mirror", blob)
        mirror = CountingBackend(LocalFsBackend(tmp_path / "mirror"))
    return blob, mirror, origin


def test_mirror_failure_falls_back_and_penalizes(tmp_path):
    blob, mirror, origin = _mirror_setup(tmp_path, "copy")
    now = [0.0]
    m = MirrorBackend([mirror], origin, penalty=5, clock=lambda: now[0])
    assert m.read_range(blob.blob_id, 0, 100) == blob.data[:100]
    mirror.fail_next(1)
    assert m.read_range(blob.blob_id, 100, 100) == blob.data[100:200]
    calls = len(mirror.calls)
    m.read_range(blob.blob_id, 0, 10)                 # penalized: straight to the origin
    assert len(mirror.calls) == calls
    now[0] = 6.0
    m.read_range(blob.blob_id, 0, 10)                 # penalty over: mirror again
    assert len(mirror.calls) == calls + 1
    stats = m.source_stats()
    assert stats[f"mirror {mirror.name}"]["bytes"] == 110
    assert stats[f"origin {origin.name}"]["bytes"] == 110
    assert stats[f"origin {origin.name}"]["fallbacks"] == 2


def test_mirror_without_the_blob_falls_back(tmp_path):
    blob, mirror, origin = _mirror_setup(tmp_path, "empty")
    m = MirrorBackend([mirror], origin)
    assert m.read_range(blob.blob_id, 0, 100) == blob.data[:100]
    assert m.blob_size(blob.blob_id) == len(blob.data)


def test_corrupt_bytes_from_a_mirror_are_replaced_by_the_origins(tmp_path, caplog):
    blob, mirror, origin = _mirror_setup(tmp_path, "copy")
    e = blob.entries[3]
    mirror.corrupt(e.compressed_offset + 7)
    with BlobCache(tmp_path / "cache", blob.info, MirrorBackend([mirror], origin)) as c:
        assert c.read(0, len(blob.view)) == blob.view
        snap = c.metrics.snapshot()
        assert snap["verify_failures"] == 1
    assert any("mirror served corrupt bytes" in r.getMessage() for r in caplog.records)


def test_corrupt_bytes_without_another_source_are_an_integrity_error(tmp_path):
    blob, mirror, _ = _mirror_setup(tmp_path, "copy")
    mirror.corrupt(blob.entries[0].compressed_offset + 1)
    with BlobCache(tmp_path / "cache", blob.info, mirror) as c:
        with pytest.raises(IntegrityError):
            c.read(0, 10)


# --------------------------------------------------------------------------- manager, factory

def test_cache_manager_shares_caches_and_aggregates_stats(tmp_path):
    blobs = [make_blob(20 + k, chunks=6) for k in range(3)]
    for b in blobs:
        _store(tmp_path / "layout", b)
    with CacheManager(tmp_path / "cache", LocalFsBackend(tmp_path / "layout")) as mgr:
        caches = [mgr.open(b.info) for b in blobs]
        assert mgr.open(blobs[0].info) is caches[0]
        assert mgr.get("sha256:" + blobs[1].blob_id) is caches[1]
        for c, b in zip(caches, blobs):
            assert c.read(0, 1000) == b.view[:1000]
        for f in mgr.prefetch_all():
            f.result(10)
        st = json.loads(json.dumps(mgr.stats()))
        assert st["totals"]["blobs"] == 3
        assert st["totals"]["chunks_ready"] == st["totals"]["chunks_total"] == 18
        assert st["totals"]["disk_bytes"] >= st["totals"]["bytes_ready"]
        assert st["metrics"]["bytes_fetched"] == sum(b.data_end for b in blobs)
        assert list(st["metrics"]["sources"]) == [f"localfs {tmp_path / 'layout'}"]
        with pytest.raises(CacheInUse):                # a second BlobCache of a blob in one process
            BlobCache(tmp_path / "cache", blobs[0].info, LocalFsBackend(tmp_path / "layout"))


def test_chunks_are_decoded_with_the_blob_tables_compressor(tmp_path):
    import dataclasses
    blob = make_blob(30, chunks=4)
    _store(tmp_path / "layout", blob)
    bad = dataclasses.replace(blob.info, compressor="lz4")     # the record is what counts
    with BlobCache(tmp_path / "cache", bad, LocalFsBackend(tmp_path / "layout")) as c:
        e = blob.entries[1]                                     # compressed (0 is stored plain)
        with pytest.raises(IntegrityError, match="chunk #1"):
            c.read(e.uncompressed_offset, 10)
    unknown = dataclasses.replace(blob.info, compressor="brotli")
    with pytest.raises(FormatError, match="not supported"):
        BlobCache(tmp_path / "cache", unknown, LocalFsBackend(tmp_path / "layout"))


def test_factory_builds_localfs_storage(tmp_path):
    blob = make_blob(31, chunks=5)
    _store(tmp_path / "layout", blob)
    cfg = StorageConfig(BackendConfig(kind="localfs", dir=str(tmp_path / "layout")),
                        CacheConfig(dir=str(tmp_path / "cache"), merge_size=128 << 10))
    with build_storage(cfg) as mgr:
        assert isinstance(mgr.backend, LocalFsBackend)
        c = mgr.open(blob.info)
        assert c.merge_size == 128 << 10
        assert c.read(0, len(blob.view)) == blob.view


def test_factory_builds_mirror_chain_and_validates():
    b = build_backend(BackendConfig(host="127.0.0.1:1", repo="r", plain_http=True,
                                    mirrors=[MirrorConfig("http://127.0.0.1:2"),
                                             MirrorConfig("http://127.0.0.1:3", kind="proxy")]))
    try:
        assert isinstance(b, MirrorBackend) and len(b.mirrors) == 2
        assert b.mirrors[0].client.retries == 0 and b.origin.client.retries == 3
        assert b.origin.client.timeout == (3.0, 3.0)
    finally:
        b.close()
    for bad in (dict(kind="s3"), dict(kind="registry", host=""), dict(kind="localfs"),
                dict(host="h", repo="r", read_timeout=0)):
        with pytest.raises(ValueError):
            BackendConfig(**bad)
    with pytest.raises(ValueError):
        CacheConfig(dir="/x", merge_size=1)


def test_demand_gate_blocks_background_until_idle():
    g = DemandGate()
    stop = threading.Event()
    released = []
    with g.demand():
        t = threading.Thread(target=lambda: released.append(g.wait_idle(stop)))
        t.start()
        time.sleep(0.1)
        assert not released
    t.join(2)
    assert released == [True]
    stop.set()
    with g.demand():
        assert g.wait_idle(stop) is False


@pytest.mark.parametrize("compressor, digester", [("lz4", "blake3"), ("none", "blake3"),
                                                  ("zstd", "sha256")])
def test_other_compressors_and_digesters(tmp_path, compressor, digester):
    blob = make_blob(40, chunks=6, compressor=compressor, digester=digester)
    _store(tmp_path / "layout", blob)
    with BlobCache(tmp_path / "cache", blob.info, LocalFsBackend(tmp_path / "layout")) as c:
        assert c.read(0, len(blob.view)) == blob.view


def test_unwritable_cache_still_serves_verified_bytes(tmp_path, monkeypatch, caplog):
    import errno
    import os as _os
    from rafs.storage.cache import files
    blob = make_blob(41, chunks=6)
    _store(tmp_path / "layout", blob)
    real_pwrite = _os.pwrite

    def full(fd, data, off):
        raise OSError(errno.ENOSPC, "No space left on device")

    with BlobCache(tmp_path / "cache", blob.info, LocalFsBackend(tmp_path / "layout")) as c:
        monkeypatch.setattr(files.os, "pwrite", full)
        assert c.read(100, len(blob.view) - 200) == blob.view[100:-100]
        assert c.usage()["chunks_ready"] == 0
        monkeypatch.setattr(files.os, "pwrite", real_pwrite)
        assert c.read(0, len(blob.view)) == blob.view
        assert c.usage()["complete"]
    assert any("cannot write chunk" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- open

class _SlowFor(CountingBackend):
    """Reads of blob `slow` wait for `release`; other blobs answer at once."""

    def __init__(self, inner, slow: str):
        super().__init__(inner)
        self.slow = slow
        self.release = threading.Event()

    def _read_range(self, blob_id, offset, size):
        if blob_id == self.slow:
            self.release.wait(10)
        return super()._read_range(blob_id, offset, size)


def test_a_stalled_blob_does_not_hold_up_another(tmp_path):
    a, b = make_blob(60, chunks=4), make_blob(61, chunks=4)
    for blob in (a, b):
        _store(tmp_path / "layout", blob)
    spy = _SlowFor(LocalFsBackend(tmp_path / "layout"), a.blob_id)
    with CacheManager(tmp_path / "cache", spy) as mgr:
        got: list = []
        readers = [threading.Thread(target=lambda: got.append(mgr.open(a.info).read(0, 100)))
                   for _ in range(3)]
        for t in readers:
            t.start()
        time.sleep(0.1)                                 # blob A's fetch is stalled
        t0 = time.monotonic()
        cb = mgr.open(b.info)                           # ... and does not hold up blob B
        assert cb.read(0, 100) == b.view[:100]
        assert time.monotonic() - t0 < 0.5
        assert not got
        spy.release.set()
        for t in readers:
            t.join(10)
        assert got == [a.view[:100]] * 3
        assert sum(1 for bid, _, _ in spy.calls if bid == a.blob_id) == 1   # one fetch, shared


def test_manager_open_shares_one_cache_between_threads(tmp_path):
    a = make_blob(62, chunks=4)
    _store(tmp_path / "layout", a)
    spy = CountingBackend(LocalFsBackend(tmp_path / "layout"))
    with CacheManager(tmp_path / "cache", spy) as mgr:
        got: list = []
        ts = [threading.Thread(target=lambda: got.append(mgr.open(a.info))) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(10)
        assert len(got) == 8 and all(c is got[0] for c in got)
        assert spy.calls == [] and spy.size_calls == 0  # opening fetches nothing
        spy.fail_next(1)
        with pytest.raises(BackendError):
            got[0].read(0, 10)
        assert got[0].read(0, 10) == a.view[:10]


def test_only_chunk_data_is_fetched_and_counted(tmp_path):
    blob = make_blob(63, chunks=20)
    _store(tmp_path / "layout", blob)
    backend = LocalFsBackend(tmp_path / "layout")
    with BlobCache(tmp_path / "cache", blob.info, backend) as c:
        snap = c.metrics.snapshot()
        assert snap["bytes_fetched"] == 0 and snap["requests"] == 0
        assert not any(k.startswith("toc") for k in snap)
        c.read(0, len(blob.view))
        snap = json.loads(json.dumps(c.metrics.snapshot()))
        assert snap["bytes_fetched"] == blob.data_end < len(blob.data)
        assert snap["sources"][backend.name]["bytes"] == blob.data_end
    # .seal: every chunk was verified here, so a later mount may let the kernel read the data file
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".blob", ".chunkmap",
                                                                          ".lock", ".seal"]


# --------------------------------------------------------------------------- shared cache dir

def _shared_reader(cache_dir, layout, seed, chunks, opts, barrier, results):
    """Child process: open the blob's cache, read `chunks` (after `barrier`), report."""
    try:
        blob = make_blob(seed)
        spy = CountingBackend(LocalFsBackend(layout))
        spy.delay = 0.003
        with BlobCache(cache_dir, blob.info, spy, **opts) as c:
            spy.reset()
            if barrier is not None:
                barrier.wait(20)
            bad = [i for i in chunks
                   if c.read(blob.entries[i].uncompressed_offset, blob.entries[i].uncompressed_size)
                   != blob.view[blob.entries[i].uncompressed_offset:blob.entries[i].uncompressed_end]]
            results.put(("ok", bad, len(spy.data_calls(blob.data_end))))
    except BaseException as e:                          # reported to the test
        results.put(("error", repr(e), 0))


def _run_readers(tmp_path, seed, chunk_lists, opts, *, barrier=True):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    bar = ctx.Barrier(len(chunk_lists)) if barrier else None
    procs = [ctx.Process(target=_shared_reader,
                         args=(str(tmp_path / "cache"), str(tmp_path / "layout"), seed, chunks,
                               opts, bar, results)) for chunks in chunk_lists]
    for p in procs:
        p.start()
    out = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    return out


def test_two_processes_share_one_cache_dir(tmp_path):
    seed = 70
    blob = make_blob(seed)
    _store(tmp_path / "layout", blob)
    n = len(blob.entries)
    first = list(range(0, 20)) + list(range(0, n, 3))
    second = list(range(35, 12, -1)) + list(range(1, n, 5))
    opts = dict(readahead=False, merge_size=64 << 10, flush_interval=0.02, flush_chunks=2)
    out = _run_readers(tmp_path, seed, [first, second], opts)
    for status, bad, _ in out:
        assert status == "ok", bad
        assert bad == [], f"wrong bytes served for chunks {bad}"
    union = sorted(set(first) | set(second))
    spy = CountingBackend(LocalFsBackend(tmp_path / "layout"))
    with BlobCache(tmp_path / "cache", blob.info, spy, readahead=False) as c:
        ready = [i for i in range(n) if c.chunk_ready(i)]
        assert ready == union                           # no chunk map update was lost
        spy.reset()
        for i in union:
            e = blob.entries[i]
            assert c.read(e.uncompressed_offset, e.uncompressed_size) == \
                blob.view[e.uncompressed_offset:e.uncompressed_end]
        assert spy.calls == []


def test_a_process_uses_chunks_another_one_fetched(tmp_path):
    seed = 71
    blob = make_blob(seed)
    _store(tmp_path / "layout", blob)
    spy = CountingBackend(LocalFsBackend(tmp_path / "layout"))
    with BlobCache(tmp_path / "cache", blob.info, spy, readahead=False) as mine:
        out = _run_readers(tmp_path, seed, [list(range(10, 20))],
                           dict(readahead=False, merge_size=64 << 10), barrier=False)
        assert out[0][:2] == ("ok", []) and out[0][2] > 0
        spy.reset()
        e0, e1 = blob.entries[10], blob.entries[19]
        assert mine.read(e0.uncompressed_offset, e1.uncompressed_end - e0.uncompressed_offset) == \
            blob.view[e0.uncompressed_offset:e1.uncompressed_end]
        assert spy.data_calls(blob.data_end) == []   # re-read the map, xxh64-checked


def test_a_second_process_never_discards_a_live_users_chunks(tmp_path):
    seed = 72
    blob = make_blob(seed)
    _store(tmp_path / "layout", blob)
    spy = CountingBackend(LocalFsBackend(tmp_path / "layout"))
    with BlobCache(tmp_path / "cache", blob.info, spy, flush_interval=3600,
                   flush_chunks=10**6) as mine:
        assert mine.read(0, len(blob.view)) == blob.view      # ready here, no chunkmap file yet
        assert not os.path.exists(mine.map_path)
        out = _run_readers(tmp_path, seed, [[0, 5]], dict(readahead=False), barrier=False)
        assert out[0][:2] == ("ok", [])
        spy.reset()
        assert mine.read(0, len(blob.view)) == blob.view      # the data file was not truncated
        assert spy.calls == []
    with BlobCache(tmp_path / "cache", blob.info, spy) as again:
        assert again.usage()["complete"]                       # both maps merged


def test_chunkmap_merge_ors_ready_bits():
    kw = dict(blob_id="ab" * 32, view_size=70 * 4096)
    a, b = ChunkMap(70, **kw), ChunkMap(70, **kw)
    a.mark_ready(1, 11)
    a.mark_ready(64, 640)
    b.mark_ready(1, 11)
    b.mark_ready(2, 22)
    b.mark_ready(69, 690)
    b.mark_ready(5, 55)
    assert a.merge_from(b, skip={5: 55, 69: 1}) == [2, 69]
    assert a.ready_indices() == [1, 2, 64, 69] and a.xxh64(69) == 690 and a.ready_count == 4
