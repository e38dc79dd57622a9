"""Range-granular prefetch lists and the prefetch-first blob layout.

Parsing of --prefetch-patterns lines, their expansion against the merged tree,
and real conversions (OCI layout -> RAFS, through `convert`) with and without
a list: the prefetched chunks lead each blob in list order, the output is
deterministic, dedup is unchanged and the tree reads back byte-equal.
"""
from __future__ import annotations

import hashlib
import logging
import stat

import pytest

from converter.check import check
from converter.convert import ConvertOptions, convert
from converter.nydus_image import open_nydus_image
from converter.prefetch import Pattern, expand_prefetch, parse_pattern, prefetch_digests, read_patterns
from rafs import blob as rblob
from rafs import digest as rdigest
from rafs.bootstrap import PrefetchEntry
from rafs.fs import RafsFs
from rafs.storage.backend import LocalFsBackend
from rafs.storage.cache import CacheManager
from rafs.tree import ChunkRef, Inode, new_dir
from tests.fakes.backends import CountingBackend
from tests.helpers import images as im

KiB = 1024
CHUNK = 64 * KiB


# --------------------------------------------------------------------------- parsing

def test_parse_good_lines():
    assert parse_pattern("/usr/bin/node", "f:1") == Pattern("/usr/bin/node", None, "f:1")
    assert parse_pattern("  /etc/  \n", "f:2") == Pattern("/etc/", None, "f:2")
    assert parse_pattern("/usr/bin/node\t0+4096,1048576+65536\n", "f:3").ranges == ((0, 4096), (1048576, 65536))
    assert parse_pattern("/a b\t 10+1 , 5+2 ", "f:4") == Pattern("/a b", ((10, 1), (5, 2)), "f:4")


@pytest.mark.parametrize("line, match", [
    ("/f\tabc", "bad range 'abc'"),
    ("/f\t10", "bad range '10'"),
    ("/f\t-1+5", "bad range '-1\\+5'"),
    ("/f\t0x10+5", "bad range"),
    ("/f\t1.5+2", "bad range"),
    ("/f\t0+4096,", "bad range ''"),
    ("/f\t", "bad range ''"),
    ("/f\t5+0", "empty range"),
    ("\t0+1", "no path"),
])
def test_parse_bad_lines(line, match):
    with pytest.raises(ValueError, match=f"^list.txt:7: {match}"):
        parse_pattern(line, "list.txt:7")


def test_read_patterns_names_file_and_line(tmp_path):
    p = tmp_path / "list"
    p.write_text("# comment\n\n/etc\n/bin/sh\t0+4096\n")
    assert read_patterns(str(p)) == [Pattern("/etc", None, f"{p}:3"), Pattern("/bin/sh", ((0, 4096),), f"{p}:4")]
    p.write_text("/etc\n\n/bin/sh\t0+4k\n")
    with pytest.raises(ValueError, match=f"{p}:3: bad range '0\\+4k'"):
        read_patterns(str(p))


# --------------------------------------------------------------------------- expansion

def _file(size: int, seed: int, chunk: int = CHUNK) -> Inode:
    refs = [ChunkRef(hashlib.sha256(b"%d-%d" % (seed, i)).digest(), min(chunk, size - i * chunk))
            for i in range(-(-size // chunk))]
    return Inode(stat.S_IFREG | 0o644, size=size, chunks=refs)


@pytest.fixture
def tree() -> Inode:
    root = new_dir()
    root.entries[b"bin"] = new_dir()
    root.entries[b"bin"].entries[b"big"] = _file(10 * CHUNK + 100, 1)
    root.entries[b"bin"].entries[b"small"] = _file(100, 2)
    root.entries[b"bin"].entries[b"link"] = Inode(stat.S_IFLNK | 0o777, symlink=b"big", size=3)
    root.entries[b"empty"] = _file(0, 3)
    return root


def test_expand_ranges_in_order_clamped_and_merged(tree, caplog):
    pats = [parse_pattern(line, f"l:{n}") for n, line in enumerate([
        "/bin/small\t50+1000",                    # past EOF: clamped to 50+50
        f"/bin/big\t{3 * CHUNK}+10,0+100,{20 * CHUNK}+5",   # sorted; the range past EOF goes
        "/nope\t0+1",                              # not in the image: skipped
        "bin/big\t100+50",                         # again: joins its first entry
        "/empty\t0+10",                            # nothing left after clamping: dropped
    ], 1)]
    with caplog.at_level(logging.DEBUG, logger="converter.prefetch"):
        out = expand_prefetch(tree, pats)
    assert out == [PrefetchEntry(b"/bin/small", ((50, 50),)),
                   PrefetchEntry(b"/bin/big", ((0, 150), (3 * CHUNK, 10)))]
    assert "l:1: range 50+1000 of /bin/small ends past its size 100: clamped" in caplog.text


def test_expand_whole_files_and_directories(tree):
    out = expand_prefetch(tree, ["/bin/small\t0+100", "/bin", "/bin/big\t0+5", "/empty", "/bin/link"])
    # a range covering the file is the file; a later whole mention makes a ranged entry whole;
    # directories expand in name order; symlinks are not files
    assert out == [PrefetchEntry(b"/bin/small"), PrefetchEntry(b"/bin/big"), PrefetchEntry(b"/empty")]


@pytest.mark.parametrize("line, what", [("/bin\t0+1", "a directory"), ("/bin/link\t0+1", "not a regular file")])
def test_ranges_need_a_regular_file(tree, line, what):
    with pytest.raises(ValueError, match=f"^prefetch pattern 2: byte ranges need a regular file, but .* is {what}"):
        expand_prefetch(tree, ["/empty", line])


def test_prefetch_digests_follow_the_list(tree):
    big, small = tree.entries[b"bin"].entries[b"big"], tree.entries[b"bin"].entries[b"small"]
    entries = [PrefetchEntry(b"/bin/small"), PrefetchEntry(b"/bin/big", ((5 * CHUNK - 1, 2), (9 * CHUNK, 2 * CHUNK)))]
    d = prefetch_digests(tree, entries + [PrefetchEntry(b"/bin/big", ((0, 1),))], CHUNK)
    assert d == [small.chunks[0].digest] + [big.chunks[k].digest for k in (4, 5, 9, 10, 0)]


# --------------------------------------------------------------------------- conversions

def _layers():
    """Two layers; layer 1 repeats a chunk of layer 0 (dedup) and overrides a file."""
    D, F = im.Entry.dir, im.Entry.file
    a = im.random(6 * CHUNK, seed=1).read()
    b = im.random(5 * CHUNK + 7, seed=2).read()
    c = im.random(4 * CHUNK, seed=3).read()
    l0 = [D("usr"), F("usr/a", a), F("usr/b", b), F("usr/old", b"old\n")]
    l1 = [D("usr"), F("usr/c", c + a[2 * CHUNK:3 * CHUNK]), F("usr/old", im.random(3 * CHUNK, seed=4).read())]
    return [l0, l1], {"usr/a": a, "usr/b": b, "usr/c": c + a[2 * CHUNK:3 * CHUNK]}


PATTERNS = ["/usr/c\t65536+10,4096+4", f"/usr/b\t{4 * CHUNK}+{CHUNK + 7}", "/usr/a\t139264+1", "/usr/old"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("pf-layout")
    layers, files = _layers()
    src = im.build_oci_layout(d / "src", "t", layers)
    refs = {}
    for name, pats in (("plain", []), ("pf", PATTERNS), ("pf-again", PATTERNS)):
        refs[name] = f"oci:{d / name}:t"
        convert(src.ref, refs[name], ConvertOptions(chunk_size=CHUNK, prefetch_patterns=pats, workers=2))
    return src, refs, files, d


def _blobs(ref: str):
    """[(blob id, [chunk digest in blob order])] as each blob lists its chunks (ci array and
    blob.digest), the bootstrap."""
    with open_nydus_image(ref) as img:
        boot = img.bootstrap
        out = []
        for i, b in enumerate(boot.meta.blobs):
            own = rblob.read_blob_meta(*img.blob_source(i), b).entries
            out.append((b.blob_id, [e.digest for e in sorted(own, key=lambda e: e.compressed_offset)]))
        return out, boot


def test_prefetched_chunks_lead_each_blob_in_list_order(converted):
    src, refs, files, _ = converted
    blobs, boot = _blobs(refs["pf"])
    a, b, c = files["usr/a"], files["usr/b"], files["usr/c"]
    dig = lambda data, k: rdigest.digest("blake3", data[k * CHUNK:(k + 1) * CHUNK])  # noqa: E731
    # list order: c's chunks 0 and 1 (c's chunk 4 = a's chunk 2 lives in blob 0), b's 4 and 5, a's 2, old's 0..2
    head0 = [dig(b, 4), dig(b, 5), dig(a, 2)]
    head1 = [dig(c, 0), dig(c, 1)] + [dig(im.random(3 * CHUNK, seed=4).read(), k) for k in range(3)]
    assert blobs[0][1][:3] == head0 and blobs[1][1][:5] == head1
    assert boot.meta.prefetch == [PrefetchEntry(b"/usr/c", ((4096, 4), (65536, 10))),
                                  PrefetchEntry(b"/usr/b", ((4 * CHUNK, CHUNK + 7),)),
                                  PrefetchEntry(b"/usr/a", ((139264, 1),)), PrefetchEntry(b"/usr/old")]


def test_layout_keeps_dedup_and_the_tree(converted):
    src, refs, files, _ = converted
    plain, _ = _blobs(refs["plain"])
    pf, boot = _blobs(refs["pf"])
    # each blob stores the same chunks as without a list (once, in the lowest layer), only reordered
    assert [sorted(t) for _, t in plain] == [sorted(t) for _, t in pf]
    assert all(len(set(t)) == len(t) for _, t in pf)
    assert [t for _, t in plain] != [t for _, t in pf]
    for ref in refs.values():
        problems, stats = check(src.ref, ref)
        assert problems == [] and stats["chunks_verified"] > 0


def test_conversion_with_a_list_is_deterministic(converted):
    _, refs, _, d = converted
    one, _ = _blobs(refs["pf"])
    two, _ = _blobs(refs["pf-again"])
    assert one == two
    for blob_id, _ in one:
        assert (d / "pf" / "blobs" / "sha256" / blob_id).read_bytes() == \
            (d / "pf-again" / "blobs" / "sha256" / blob_id).read_bytes()


def test_chunk_dict_chunks_stay_in_the_dict(converted, tmp_path):
    src, refs, files, d = converted
    convert(src.ref, f"oci:{tmp_path}:t",
            ConvertOptions(chunk_size=CHUNK, chunk_dict=refs["plain"], prefetch_patterns=PATTERNS, workers=2))
    blobs, boot = _blobs(f"oci:{tmp_path}:t")
    plain, _ = _blobs(refs["plain"])
    assert [i for i, _ in blobs] == [i for i, _ in plain]          # every chunk is in the dict: no new blob
    assert boot.meta.prefetch[0].path == b"/usr/c"


def test_fs_prefetches_only_the_ranged_chunks(converted, tmp_path):
    _, refs, files, d = converted
    with open_nydus_image(refs["pf"]) as img:
        boot = img.bootstrap
    spy = CountingBackend(LocalFsBackend(d / "pf"))
    caches = CacheManager(tmp_path / "cache", spy, readahead=False)
    try:
        fs = RafsFs(boot, caches)
        ranges = fs.prefetch_ranges(boot.meta.prefetch)
        # blob 0 holds b's chunks 4, 5 and a's chunk 2 at its head, blob 1 c's chunks 0, 1 then old's
        assert list(ranges) == [1, 0]                         # blobs in first-use order
        # b's chunks 4 and 5 touch in the view (0 and 64 KiB); a's chunk 2 is next, 4 KiB aligned
        assert ranges[0] == [(0, CHUNK + 7), (CHUNK + 4 * KiB + 8 * KiB, 1)]
        assert ranges[1] == [(4 * KiB, 4), (CHUNK, 10), (2 * CHUNK, 3 * CHUNK)]
        for f in fs.prefetch(boot.meta.prefetch):
            f.result(timeout=20)
        ready = {i: [k for k in range(len(fs.blob_cache(i).entries)) if fs.blob_cache(i).chunk_ready(k)]
                 for i in (0, 1)}
        assert ready == {0: [0, 1, 2], 1: [0, 1, 2, 3, 4]}     # the heads, nothing else
        # bad entries in an accepted bootstrap never fail the prefetch
        odd = [PrefetchEntry(b"/usr", ((0, 1),)), PrefetchEntry(b"/nope", ((0, 1),)),
               PrefetchEntry(b"/usr/a", ((1 << 40, 1),))]
        assert fs.prefetch_ranges(odd) == {}
    finally:
        caches.close()


def test_blob_readahead_stops_at_the_prefetched_head(converted, tmp_path, monkeypatch):
    # erofs mode reads the head in list order, which looks like a stream: reading ahead past the
    # head would fetch chunks the list did not ask for
    import time
    import rafs.fs
    monkeypatch.setattr(rafs.fs, "BLOB_STREAM_RUN", 64 * KiB)
    _, refs, _, d = converted
    with open_nydus_image(refs["pf"]) as img:
        boot = img.bootstrap
    caches = CacheManager(tmp_path / "cache", LocalFsBackend(d / "pf"), readahead=False)
    try:
        fs = RafsFs(boot, caches)
        for f in fs.prefetch(boot.meta.prefetch):
            f.result(timeout=20)
        cache = fs.blob_cache(1)
        head = cache.entries[4].uncompressed_offset + cache.entries[4].uncompressed_size
        for off in range(0, head, 16 * KiB):
            fs.read_blob(1, off, 16 * KiB)
        time.sleep(0.3)                                   # a background read-ahead would land by now
        assert [k for k in range(len(cache.entries)) if cache.chunk_ready(k)] == [0, 1, 2, 3, 4]
        fs.read_blob(1, head, 16 * KiB)                   # past the head: read on demand as usual
        assert cache.chunk_ready(5)
    finally:
        caches.close()


def test_recorded_pages_become_pattern_lines():
    from benchmarks.prepare import PAGE, prefetch_line
    assert prefetch_line("/lib/a.so", 3 * PAGE - 5, [0, 1, 2]) == "/lib/a.so"           # every page: the file
    line = prefetch_line("/lib/b.so", 100_000, [6, 0, 1, 5, 24])
    assert line == f"/lib/b.so\t0+{2 * PAGE},{5 * PAGE}+{2 * PAGE},{24 * PAGE}+{100_000 - 24 * PAGE}"
    assert parse_pattern(line, "rec:1").ranges == ((0, 8192), (20480, 8192), (98304, 1696))
    assert prefetch_line("/odd\tname", 10, [0]) is None
