"""RafsFs, the mount's core without FUSE: names, attributes, reads through the blob cache, readahead."""
from __future__ import annotations

import stat

import pytest

from converter.convert import ConvertOptions, convert
from converter.nydus_image import open_nydus_image
from rafs.errors import IntegrityError, RafsError
from rafs.fs import RafsFs, Readahead
from rafs.storage.backend import LocalFsBackend
from rafs.storage.cache import CacheManager
from tests.fakes.backends import CountingBackend
from tests.helpers import images as im

KiB = 1024
CHUNK = 64 * KiB


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    d = tmp_path_factory.mktemp("fs")
    D, F, S = im.Entry.dir, im.Entry.file, im.Entry.symlink
    files = {"etc/hello": b"hello\n", "data/big": im.random(10 * CHUNK + 123, seed=1).read(),
             "data/zeros": bytes(3 * CHUNK), "data/tail": im.random(CHUNK // 2, seed=2).read()}
    layer = [D("etc"), D("data"), S("etc/link", "hello"),
             F("etc/attr", b"x", xattrs={b"user.k": b"v"}, uid=7, gid=8, mode=0o640)]
    layer += [F(p, b) for p, b in files.items()]
    src = im.build_oci_layout(d / "src", "t", [layer])
    convert(src.ref, f"oci:{d / 'nydus'}:t", ConvertOptions(chunk_size=CHUNK))
    with open_nydus_image(f"oci:{d / 'nydus'}:t") as img:
        return img.bootstrap, d / "nydus", files


@pytest.fixture
def fs(image, tmp_path):
    boot, layout, _ = image
    spy = CountingBackend(LocalFsBackend(layout))
    caches = CacheManager(tmp_path / "cache", spy, readahead=False)
    f = RafsFs(boot, caches)
    f.spy = spy
    yield f
    caches.close()


def test_names_and_attributes(fs, image):
    assert fs.resolve(b"/") == fs.boot.root_nid
    assert fs.resolve(b"/etc/nope") is None and fs.resolve(b"/etc/hello/x") is None
    nid = fs.resolve(b"/etc/attr")
    st = fs.stat(nid)
    assert stat.S_ISREG(st["st_mode"]) and st["st_mode"] & 0o777 == 0o640
    assert (st["st_uid"], st["st_gid"], st["st_size"], st["st_ino"]) == (7, 8, 1, nid)
    assert fs.xattrs(nid) == {b"user.k": b"v"}
    assert fs.readlink(fs.resolve(b"/etc/link")) == b"hello"
    names = {n: kind for n, _, kind in fs.readdir(fs.resolve(b"/etc"))}
    assert names == {b"attr": stat.S_IFREG, b"hello": stat.S_IFREG, b"link": stat.S_IFLNK}
    sfs = fs.statfs()
    assert sfs["f_bsize"] == 4096 and sfs["f_bavail"] == 0 and sfs["f_blocks"] > 0


def test_reads_are_exact_and_lazy(fs, image):
    files = image[2]
    big = fs.resolve(b"/data/big")
    assert fs.read(big, 5, 10) == files["data/big"][5:15]
    assert len(fs.spy.data_calls(10**12)) >= 1
    fs.spy.reset()
    assert fs.read(big, 5 * CHUNK + 7, 100) == files["data/big"][5 * CHUNK + 7:5 * CHUNK + 107]  # a jump
    assert len(fs.spy.calls) == 1 and fs.spy.calls[0][2] <= CHUNK + 512      # that one chunk only
    assert fs.read(big, len(files["data/big"]) - 3, 100) == files["data/big"][-3:]
    assert fs.read(big, len(files["data/big"]) + 1, 100) == b""
    fs.spy.reset()
    # RAFS v6 has no holes: the three zero chunks are one stored (deduplicated) chunk, fetched once
    assert fs.read(fs.resolve(b"/data/zeros"), 0, 3 * CHUNK) == bytes(3 * CHUNK)
    assert len(fs.spy.calls) == 1 and fs.spy.calls[0][2] < 1024
    fs.spy.reset()
    assert fs.read(fs.resolve(b"/data/zeros"), CHUNK, CHUNK) == bytes(CHUNK) and fs.spy.calls == []
    assert fs.read(fs.resolve(b"/etc/hello"), 0, 4096) == b"hello\n"


def test_bad_bytes_are_an_error_never_served(fs, image):
    files = image[2]
    tail = fs.resolve(b"/data/tail")
    ext = fs.boot.file_extents(tail, 0, 1)[0]
    cache = fs.blob_cache(ext.blob_index)
    entry = next(e for e in cache.entries if e.uncompressed_offset <= ext.blob_offset < e.uncompressed_end)
    fs.spy.corrupt(entry.compressed_offset + 3)
    with pytest.raises(IntegrityError):
        fs.read(tail, 0, 100)
    fs.spy.heal()
    assert fs.read(tail, 0, 100) == files["data/tail"][:100]
    assert isinstance(IntegrityError("x"), RafsError)


def test_sequential_reads_fetch_ahead_within_the_file(fs, image):
    files = image[2]
    big = fs.resolve(b"/data/big")
    out = b"".join(fs.read(big, off, 16 * KiB) for off in range(0, 2 * CHUNK, 16 * KiB))
    assert out == files["data/big"][:2 * CHUNK]
    cache = fs.blob_cache(fs.boot.file_extents(big, 0, 1)[0].blob_index)
    ext = fs.boot.file_extents(big, 0, len(files["data/big"]))[0]
    # the background readahead fetched chunks the reader has not asked for yet, not beyond the file
    deadline = __import__("time").monotonic() + 5
    ahead = lambda: [i for i, e in enumerate(cache.entries)  # noqa: E731
                     if ext.blob_offset + 2 * CHUNK <= e.uncompressed_offset < ext.blob_offset + ext.length
                     and cache.chunk_ready(i)]
    while not ahead() and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.01)
    assert ahead()
    assert fs.read(big, 0, len(files["data/big"])) == files["data/big"]


def test_prefetch_ranges_cover_the_files_below_a_directory(fs):
    ranges = fs.prefetch_ranges([b"/data", b"/nope"])
    total = sum(size for rs in ranges.values() for _, size in rs)
    assert total == 10 * CHUNK + 123 + CHUNK // 2 + CHUNK        # big + tail + the one zero chunk
    futures = fs.prefetch([b"/data/tail"])
    assert all(f.result(timeout=10) >= 1 for f in futures)


def test_readahead_detects_streams():
    ra = Readahead(min_window=100, max_window=400)
    assert ra.advance(("f", 1), 0, 10, 10_000) is None              # a first read: nothing
    assert ra.advance(("f", 1), 10, 10, 10_000) == (20, 100)        # in order: a window ahead
    assert ra.advance(("f", 1), 20, 10, 10_000) is None             # still far enough ahead
    assert ra.advance(("f", 1), 70, 10, 10_000) == (120, 160)       # half used: up to end + 2x window
    assert ra.advance(("f", 1), 10_000_000, 10, 20_000_000) is None  # a jump starts a new stream
    assert ra.advance(("f", 2), 0, 10, 15) is None
    assert ra.advance(("f", 2), 10, 5, 15) is None                  # the end of the file: nothing
    assert ra.advance(("b", 0), 0, 50, 10_000, min_run=200) is None
    assert ra.advance(("b", 0), 50, 100, 10_000, min_run=200) is None   # not a long run yet
    assert ra.advance(("b", 0), 150, 100, 10_000, min_run=200) == (250, 100)
