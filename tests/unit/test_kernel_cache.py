"""The blob cache's side of "cached data at kernel speed": seals, pins, and the spans stored into the
kernel's page cache (rafs.storage.cache.kernel, BlobCache.kernel_device / present_spans)."""
from __future__ import annotations

import os
from pathlib import Path

from rafs.storage.backend import LocalFsBackend
from rafs.storage.cache import CacheManager
from rafs.storage.cache import kernel

from tests.conformance import make_blob

CHUNK = 64 << 10


def _store(directory: Path, blob) -> None:
    path = directory / "blobs" / "sha256" / blob.blob_id
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob.data)


def _mgr(tmp_path, **kw) -> CacheManager:
    return CacheManager(tmp_path / "cache", LocalFsBackend(tmp_path / "layout"), readahead=False, **kw)


def _pin_args(tmp_path, pids=()):
    return dict(mountpoint=str(tmp_path / "mnt"), image=str(tmp_path / "image.boot"), pids=list(pids))


def test_present_spans_are_whole_blocks_of_the_ready_chunks(tmp_path):
    blob = make_blob(8100, chunks=12, short_every=3)      # short chunks: padding after them
    _store(tmp_path / "layout", blob)
    e = blob.entries
    with _mgr(tmp_path) as mgr:
        c = mgr.open(blob.info)
        assert c.present_spans() == []
        for k in (0, 1, 2, 3, 7):
            c.read(e[k].uncompressed_offset, 1)
        spans = c.present_spans(max_run=3 * CHUNK)
        assert spans[0] == (0, e[2].uncompressed_offset + 40960)      # 0, 1, 2 (short: 40000 -> 10 blocks)
        assert spans[1] == (e[3].uncompressed_offset, CHUNK)          # the run limit cut it
        assert spans[2] == (e[7].uncompressed_offset, CHUNK)
        for off, size in spans:
            assert c.read_cached(off, size) == blob.view[off:off + size]


def test_read_cached_rechecks_on_the_bytes_read(tmp_path):
    blob = make_blob(8150, chunks=8, short_every=3)
    _store(tmp_path / "layout", blob)
    e = blob.entries
    with _mgr(tmp_path) as mgr:
        c = mgr.open(blob.info)
        c.read(0, len(blob.view))
        data = c.data_path
    with open(data, "r+b") as f:                 # chunk 5 changed behind the cache's back
        f.seek(e[5].uncompressed_offset + 7)
        f.write(b"X")
    with _mgr(tmp_path) as mgr:
        c = mgr.open(blob.info)
        for off, size in c.present_spans(max_run=2 * CHUNK):
            assert c.read_cached(off, size) == blob.view[off:off + size]
        m = mgr.stats()["metrics"]
        assert m["recheck_failures"] == 1 and m["chunks_fetched"] == 1


def test_incomplete_cache_is_no_device(tmp_path):
    blob = make_blob(8200, chunks=6)
    _store(tmp_path / "layout", blob)
    with _mgr(tmp_path) as mgr:
        c = mgr.open(blob.info)
        c.read(0, 10)
        assert c.kernel_device("t", **_pin_args(tmp_path)) is None
        assert not os.path.exists(kernel.pin_dir(c.data_path))


def test_complete_cache_is_sealed_once_and_then_trusted(tmp_path):
    blob = make_blob(8300, chunks=6)
    _store(tmp_path / "layout", blob)
    with _mgr(tmp_path) as mgr:
        c = mgr.open(blob.info)
        assert c.read(0, len(blob.view)) == blob.view
    with _mgr(tmp_path) as mgr:                  # a restart: the chunks are UNCHECKED
        c = mgr.open(blob.info)
        assert c.kernel_device("t", **_pin_args(tmp_path)) == c.data_path
        assert os.path.exists(kernel.seal_path(c.data_path))
        assert c.kernel_pinned and c.usage()["kernel_direct"]
        c.kernel_release("t")
    ident = os.stat(tmp_path / "cache" / f"{blob.blob_id}.seal")
    with _mgr(tmp_path) as mgr:                  # sealed: no re-check needed
        c = mgr.open(blob.info)
        assert c.kernel_device("t", **_pin_args(tmp_path)) == c.data_path
        assert mgr.stats()["metrics"]["recheck_failures"] == 0
        c.kernel_release("t")
    assert os.stat(tmp_path / "cache" / f"{blob.blob_id}.seal").st_mtime_ns == ident.st_mtime_ns


def test_changed_data_file_breaks_the_seal_and_is_repaired(tmp_path):
    blob = make_blob(8400, chunks=6)
    _store(tmp_path / "layout", blob)
    with _mgr(tmp_path) as mgr:
        c = mgr.open(blob.info)
        c.read(0, len(blob.view))
        assert c.kernel_device("t", **_pin_args(tmp_path)) == c.data_path
        c.kernel_release("t")
        data = c.data_path
    off = blob.entries[3].uncompressed_offset + 5
    with open(data, "r+b") as f:                 # a flipped byte, the chunkmap still vouching for it
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 1]))
    with _mgr(tmp_path) as mgr:
        c = mgr.open(blob.info)
        assert c.kernel_device("t", **_pin_args(tmp_path)) == c.data_path
        assert mgr.stats()["metrics"]["recheck_failures"] == 1      # found, fetched again
        c.kernel_release("t")
    assert Path(data).read_bytes() == bytes(blob.view)


def test_pinned_data_file_is_not_evicted_nor_discarded(tmp_path):
    """No process punches a data file a live mount reads directly: not the pinning cache, not another
    cache of the blob (a daemon that took over) that has no pin in memory; and a new cache whose chunk
    map is unusable does not discard it."""
    blob = make_blob(8500, chunks=4, short_every=0)
    _store(tmp_path / "layout", blob)
    with _mgr(tmp_path, max_size=64 * CHUNK) as mgr:
        c = mgr.open(blob.info)
        c.read(0, len(blob.view))
        assert c.kernel_device("t", **_pin_args(tmp_path, [os.getpid()])) == c.data_path
        assert c.evict(0) is None and c.chunk_ready(0)
    # closed with its mount gone, the cache dropped its pin; a daemon handing over a mount that stays
    # leaves it (its pids, the holder's, alive)
    assert not kernel.pinned(c.data_path)
    kernel.add_pin(c.data_path, "t", **_pin_args(tmp_path, [os.getpid()]))
    assert kernel.pinned(c.data_path)
    with _mgr(tmp_path, max_size=64 * CHUNK) as mgr:
        c = mgr.open(blob.info)
        assert c.evict(0) is None and c.chunk_ready(0)
    Path(c.map_path).write_bytes(b"garbage")      # an unusable chunk map: sole user, but pinned
    with _mgr(tmp_path, max_size=64 * CHUNK) as mgr:
        c = mgr.open(blob.info)
        assert os.stat(c.data_path).st_blocks > 0, "the pinned data file was discarded"
        kernel.remove_pin(c.data_path, "t")
        assert not kernel.pinned(c.data_path)
        assert c.read(0, len(blob.view)) == blob.view
        assert c.evict(0) is not None


def test_dead_pins_are_removed(tmp_path):
    data = str(tmp_path / "x.blob")
    Path(data).write_bytes(b"")
    kernel.add_pin(data, "dead", mountpoint=str(tmp_path / "nowhere"), image=str(tmp_path / "img"),
                   pids=[])
    assert os.path.isdir(kernel.pin_dir(data))
    assert not kernel.pinned(data)
    assert not os.path.exists(kernel.pin_dir(data))


def test_no_direct_device_on_a_stacked_filesystem(tmp_path):
    """A cache on overlayfs (a node inside a container): an EROFS over its file plus the container's
    overlay on top would pass the kernel's stacking limit, so it is read through FUSE."""
    import subprocess
    import pytest
    if os.geteuid() != 0:
        pytest.skip("mounting overlayfs needs root")
    for d in ("lower", "upper", "work", "merged"):
        (tmp_path / d).mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={tmp_path}/lower,upperdir={tmp_path}/upper,workdir={tmp_path}/work",
                    str(tmp_path / "merged")], check=True)
    try:
        assert kernel.stackable(str(tmp_path))
        assert not kernel.stackable(str(tmp_path / "merged"))
        blob = make_blob(8600, chunks=3)
        _store(tmp_path / "layout", blob)
        with CacheManager(tmp_path / "merged" / "cache", LocalFsBackend(tmp_path / "layout")) as mgr:
            c = mgr.open(blob.info)
            c.read(0, len(blob.view))
            assert c.kernel_device("t", **_pin_args(tmp_path)) is None
    finally:
        subprocess.run(["umount", str(tmp_path / "merged")], check=True)
