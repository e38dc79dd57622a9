"""The bounded blob cache (rafs/storage/cache/evict.py): sizes, LRU eviction under a limit with the right
bytes, the disk bound measured in blocks, pinned chunks, shared data files, a full filesystem, P2P payload
files under the same limit."""
from __future__ import annotations

import os
import random
import subprocess
import threading
from pathlib import Path

import pytest

from rafs.storage.backend import LocalFsBackend
from rafs.storage.cache import CacheManager
from rafs.storage.cache.evict import (CacheBudget, acquire_budget, budget_covering, parse_size,
                                      release_budget, tree_bytes)
from rafs.storage.factory import CacheConfig

from tests.conformance import make_blob

CHUNK = 64 << 10


def _store(directory: Path, blob) -> None:
    path = directory / "blobs" / "sha256" / blob.blob_id
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob.data)


def _blocks(root: Path) -> int:
    return tree_bytes(str(root))


@pytest.mark.parametrize("text, n", [("64M", 64 << 20), ("2G", 2 << 30), ("4096", 4096), ("512k", 512 << 10),
                                     ("1.5G", int(1.5 * (1 << 30))), ("10MiB", 10 << 20), ("3GB", 3 << 30),
                                     (0, 0), ("0", 0)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "M", "-1", "1X", "1.2.3", True, -5])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_cache_config_parses_max_size():
    assert CacheConfig(dir="/x", max_size="64M").max_size == 64 << 20


def test_whole_image_twice_under_a_small_limit_right_bytes_and_bounded(tmp_path):
    """Two blobs of 40 chunks (~2.4 MiB of view each), limit 1 MiB: read everything twice, in 4 threads;
    the bytes are right and the cache directory never takes more than the limit + one chunk."""
    blobs = [make_blob(7100 + k, chunks=40) for k in range(2)]
    for b in blobs:
        _store(tmp_path / "layout", b)
    limit = 1 << 20
    cache_dir = tmp_path / "cache"
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _blocks(cache_dir))
            stop.wait(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with CacheManager(cache_dir, LocalFsBackend(tmp_path / "layout"), max_size=limit) as mgr:
            caches = [mgr.open(b.info) for b in blobs]
            errors = []

            def reader(seed):
                rng = random.Random(seed)
                try:
                    for _ in range(2):
                        for c, b in zip(caches, blobs):
                            pos = 0
                            while pos < len(b.view):
                                n = rng.choice((4096, 50000, 131072))
                                got = c.read(pos, n)
                                if got != b.view[pos:pos + n]:
                                    errors.append((b.blob_id, pos, n))
                                pos += n
                except Exception as e:       # pragma: no cover - reported below
                    errors.append(e)

            threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors
            st = mgr.stats()
            assert st["totals"]["max_size"] == limit
            assert st["totals"]["evictions"] > 0 and st["metrics"]["evictions"] == st["totals"]["evictions"]
            assert st["totals"]["limit_root_bytes"] <= limit + CHUNK
    finally:
        stop.set()
        sampler.join()
    assert 0 < peak[0] <= limit + CHUNK, (peak[0], limit)


def test_lru_keeps_the_recently_read_chunks(tmp_path):
    blob = make_blob(7200, chunks=20)
    _store(tmp_path / "layout", blob)
    e = blob.entries
    with CacheManager(tmp_path / "cache", LocalFsBackend(tmp_path / "layout"), max_size=8 * CHUNK + 16384,
                      readahead=False) as mgr:
        c = mgr.open(blob.info)
        for k in range(6):
            assert c.read(e[k].uncompressed_offset, 10) == blob.view[e[k].uncompressed_offset:][:10]
        c.read(e[0].uncompressed_offset, 10)          # chunk 0 is now the most recently used
        for k in range(6, 12):
            c.read(e[k].uncompressed_offset, 10)
        assert c.chunk_ready(0)
        assert not c.chunk_ready(1)                   # the least recently used went first
        assert c.chunk_ready(11)


def test_evicted_chunks_are_fetched_again_after_a_restart(tmp_path):
    """The chunk map on disk forgets evicted chunks: a new cache never trusts the holes."""
    blob = make_blob(7300, chunks=20)
    _store(tmp_path / "layout", blob)
    backend = LocalFsBackend(tmp_path / "layout")
    with CacheManager(tmp_path / "cache", backend, max_size=6 * CHUNK, readahead=False) as mgr:
        c = mgr.open(blob.info)
        assert c.read(0, len(blob.view)) == blob.view
        assert c.usage()["chunks_ready"] < 20
    with CacheManager(tmp_path / "cache", LocalFsBackend(tmp_path / "layout")) as mgr:
        c = mgr.open(blob.info)
        ready = c.usage()["chunks_ready"]
        assert 0 < ready <= 6
        assert c.read(0, len(blob.view)) == blob.view
        assert mgr.stats()["metrics"]["recheck_failures"] == 0


def test_pinned_chunks_are_not_evicted(tmp_path):
    blob = make_blob(7400, chunks=4, short_every=0)
    _store(tmp_path / "layout", blob)
    with CacheManager(tmp_path / "cache", LocalFsBackend(tmp_path / "layout"), max_size=8 * CHUNK,
                      readahead=False) as mgr:
        c = mgr.open(blob.info)
        c.read(0, 10)
        c._reader.pins[0] = 1                          # a read between ensure and pread
        assert c.evict(0) is None and c.chunk_ready(0)
        del c._reader.pins[0]
        assert c.evict(0) is not None and not c.chunk_ready(0)
        assert c.read(0, CHUNK) == blob.view[:CHUNK]


def test_a_data_file_another_process_shares_is_not_punched(tmp_path):
    blob = make_blob(7500, chunks=4, short_every=0)
    _store(tmp_path / "layout", blob)
    with CacheManager(tmp_path / "cache", LocalFsBackend(tmp_path / "layout"), max_size=8 * CHUNK) as mgr:
        c = mgr.open(blob.info)
        c.read(0, 10)
        # another process holds a shared lock on the data file
        holder = subprocess.Popen(["python3", "-c", "import fcntl,os,sys,time; fd=os.open(sys.argv[1],os.O_RDONLY);"
                                   "fcntl.flock(fd,fcntl.LOCK_SH); print('x',flush=True); time.sleep(30)",
                                   c.data_path], stdout=subprocess.PIPE)
        try:
            holder.stdout.readline()
            assert c.evict(0) is None and c.chunk_ready(0)
        finally:
            holder.kill()
            holder.wait()
        assert c.evict(0) is not None


def test_no_room_at_all_still_serves_from_memory(tmp_path):
    blob = make_blob(7600, chunks=6)
    _store(tmp_path / "layout", blob)
    with CacheManager(tmp_path / "cache", LocalFsBackend(tmp_path / "layout"), max_size=4096) as mgr:
        c = mgr.open(blob.info)
        assert c.read(0, len(blob.view)) == blob.view
        assert c.read(0, len(blob.view)) == blob.view
        assert mgr.stats()["totals"]["not_cached_for_room"] > 0
        assert _blocks(tmp_path / "cache") <= 4096 + CHUNK


def test_two_processes_share_one_limit(tmp_path):
    """Two managers on two dirs under one root (two daemons of a snapshotter): one limit for both."""
    blobs = [make_blob(7700 + k, chunks=30) for k in range(2)]
    for b in blobs:
        _store(tmp_path / "layout", b)
    root = tmp_path / "cacheroot"
    limit = 1 << 20
    script = (
        "import sys; from pathlib import Path\n"
        "from rafs.storage.backend import LocalFsBackend\n"
        "from rafs.storage.cache import CacheManager\n"
        "from tests.conformance import make_blob\n"
        "seed, d, layout, root, limit = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])\n"
        "b = make_blob(seed, chunks=30)\n"
        "with CacheManager(d, LocalFsBackend(layout), max_size=limit, budget_root=root) as m:\n"
        "    c = m.open(b.info)\n"
        "    for _ in range(3):\n"
        "        assert c.read(0, len(b.view)) == b.view\n"
        "print('ok')\n")
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _blocks(root))
            stop.wait(0.001)

    root.mkdir()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        procs = [subprocess.Popen(["python3", "-c", script, str(7700 + k), str(root / f"img{k}"),
                                   str(tmp_path / "layout"), str(root), str(limit)],
                                  cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for k in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        stop.set()
        sampler.join()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.strip() == "ok", err
    assert 0 < peak[0] <= limit + CHUNK, peak[0]


def test_budget_gc_answers_another_process_pressure(tmp_path):
    blob = make_blob(7800, chunks=10, short_every=0)
    _store(tmp_path / "layout", blob)
    with CacheManager(tmp_path / "root" / "a", LocalFsBackend(tmp_path / "layout"), max_size=1 << 30,
                      budget_root=tmp_path / "root") as mgr:
        c = mgr.open(blob.info)
        assert c.read(0, len(blob.view)) == blob.view
        before = c.usage()["chunks_ready"]
        b = mgr.budget
        import json
        import time
        (tmp_path / "root" / ".budget.pressure").write_text(json.dumps(
            {"pid": os.getpid() + 1, "bytes": 3 * CHUNK, "time": time.time()}))
        b.gc_once()
        assert c.usage()["chunks_ready"] == before - 3
        assert c.read(0, len(blob.view)) == blob.view


def test_budget_registry_is_shared_and_released(tmp_path):
    a = acquire_budget(tmp_path, 1000)
    b = acquire_budget(tmp_path, 2000)
    assert a is b and a.limit == 2000
    assert budget_covering(tmp_path / "x" / "p2p" / "f.payload") is a
    release_budget(a)
    assert budget_covering(tmp_path / "y") is a
    release_budget(a)
    assert budget_covering(tmp_path / "y") is None
    with pytest.raises(ValueError):
        CacheBudget(tmp_path, 0)


def test_p2p_payload_files_count_against_the_limit(tmp_path):
    from p2p.store import PayloadFile
    budget = acquire_budget(tmp_path, 64 << 10)
    try:
        f = PayloadFile(tmp_path / "img" / "p2p", "ab" * 32, 1 << 20)
        for k in range(8):
            assert f.write(k * 16384, os.urandom(16384))
            assert tree_bytes(str(tmp_path)) <= (64 << 10) + 16384
        assert budget.evictions >= 4
        assert f.read(0, 16384) is None               # evicted: never a hole's zeros
        assert f.read(7 * 16384, 16384) is not None
        f.close()
    finally:
        release_budget(budget)


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("limit", [0, 8 << 20])
def test_a_cache_on_a_full_filesystem_still_serves_reads(tmp_path, small_fs, limit, caplog):
    """The cache's filesystem fills up (ENOSPC) before the limit does: reads are served from memory."""
    blob = make_blob(7900, chunks=40)                  # ~2.4 MiB of view on a 1 MiB filesystem
    _store(tmp_path / "layout", blob)
    with CacheManager(small_fs / "cache", LocalFsBackend(tmp_path / "layout"), max_size=limit) as mgr:
        c = mgr.open(blob.info)
        for _ in range(2):
            assert c.read(0, len(blob.view)) == blob.view
        st = mgr.stats()["totals"]
        assert st["write_error"]                       # visible in stats
    assert sum("cannot write chunk" in r.getMessage() for r in caplog.records) == 1   # logged once


def test_snapshotter_cache_section(tmp_path):
    from snapshotter.config import load_config
    p = tmp_path / "c.toml"
    p.write_text('root = "/r"\n[cache]\nmax_size = "512M"\ngc_interval = 5\n')
    cfg = load_config(str(p))
    assert cfg.cache.max_bytes == 512 << 20
    assert cfg.cache.daemon_args(cfg.cache_dir) == ["--cache-max-size", str(512 << 20),
                                                    "--cache-limit-root", "/r/cache"]
    assert load_config().cache.daemon_args("/x") == []
    p.write_text('[cache]\nmax_size = "lots"\n')
    with pytest.raises(ValueError, match="cache.max_size"):
        load_config(str(p))


def test_status_renders_limit_and_evictions():
    from snapshotter.status import render
    st = {"root": "/r", "address": "/s", "serving": True, "cache_dir": "/r/cache", "cache_bytes": 10_000_000,
          "cache_max_size": 20_000_000, "cache_evictions": 7, "snapshots": {}, "images": [], "mounts": []}
    assert "10.00 MB on disk of 20.00 MB limit, 7 chunks evicted" in render(st)


def test_orphan_cache_dirs_are_removed_unless_in_use(tmp_path):
    from rafs.storage.cache.evict import remove_orphans
    for d in ("keep", "gone", "busy"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.blob").write_bytes(b"1")
    import fcntl
    fd = os.open(tmp_path / "busy" / "x.blob", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        assert remove_orphans(tmp_path, {"keep"}) == ["gone"]
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "keep"]
