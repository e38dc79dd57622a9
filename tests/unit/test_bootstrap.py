"""The RAFS v6 bootstrap: round trips, nydusd's load-time rules, real Nydus images, and damage.

Oracles that are not this module's reader: a rule checker written here from nydusd's
`validate()` functions (raw offsets, no pynydus parsing), `fsck.erofs --extract`, the
kernel, and the bootstraps nydus-image itself wrote (../shared/fixtures/nydus).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import stat
import struct
import tarfile
from pathlib import Path

import pytest

from rafs import blob as B
from rafs.blob import ChunkEntry
from rafs.bootstrap import (PLACEHOLDER_BLOB_ID, BlobInfo, Bootstrap, ChunkAddr, Extent, PrefetchEntry,
                            RafsMeta, decode_record, write_bootstrap)
from rafs.errors import FormatError
from rafs.erofs import layout as L
from rafs.erofs.reader import ErofsImage
from rafs.tree import ChunkRef, Inode, new_dir, walk
from tests.unit.test_erofs import Blobs, awkward_tree, check_reader, mounts, rnd, run  # noqa: F401

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "nydus"
CS = 4096


def fixture(*parts: str) -> Path:
    p = FIXTURES.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs the real Nydus images in {FIXTURES} (../shared/fixtures/nydus), absent here")
    return p


def blob_infos(blobs: Blobs, features: int = B.WRITER_FEATURES) -> list[BlobInfo]:
    out = []
    for i, ((tag, _), view, es, base) in enumerate(zip(blobs.devices(), blobs.views, blobs.entries,
                                                      blobs.ci_base)):
        count = base + len(es)
        data_end = es[-1].compressed_offset + es[-1].compressed_size if es else 0
        out.append(BlobInfo(blob_id=tag.decode(), compressed_size=data_end + 8192 + 16 * count,
                            uncompressed_size=len(view), chunk_count=count, compressor="none",
                            digester="sha256", chunk_size=blobs.chunk_size, features=features,
                            ci_offset=data_end + 512, ci_compressed_size=16 * count,
                            ci_uncompressed_size=16 * count, blob_toc_size=640,
                            blob_toc_digest=hashlib.sha256(b"toc%d" % i).hexdigest(), entries=list(es)))
    return out


PREFETCH = [b"/files/size-1", b"/names/caf\xe9", b"/"]


def make(root: Inode, blobs: Blobs, prefetch=PREFETCH, **kw) -> tuple[bytes, RafsMeta]:
    meta = RafsMeta(chunk_size=blobs.chunk_size, compressor="zstd", digester="sha256",
                    blobs=blob_infos(blobs), prefetch=list(prefetch), **kw)
    out = io.BytesIO()
    write_bootstrap(root, meta, out)
    return out.getvalue(), meta


def awkward(ci_base=(0, 0xFFF0)) -> tuple[Inode, Blobs]:
    # blob 1's ci indexes cross 65535: bits 16-23 go into the high byte of device_id
    blobs = Blobs(2, CS, holes=False, ci_base=list(ci_base))
    return awkward_tree(blobs), blobs


@pytest.fixture(scope="module")
def boot():
    root, blobs = awkward()
    data, meta = make(root, blobs)
    return root, blobs, data, meta


# --- an independent check of nydusd's load-time rules (v6.rs validate(), md_v6.rs, direct_v6.rs) -----


def nydusd_problems(data: bytes, *, mapped_align: int | None = 512 << 10, builder: bool = True) -> list[str]:
    """What nydusd would object to, and (`builder`) where the layout differs from what nydus-image
    writes today: s_blocks = the blobs' blocks, chunk table in (digest, blob) order, mapped_blkaddr
    after the bootstrap aligned to `mapped_align` (512 KiB since nydus 2.2.x, 2 MiB before; old
    images 0: None skips). [] if nothing."""
    p: list[str] = []
    n = len(data)
    if n < 4096 or n % 4096:
        return [f"size {n} is not a non-zero multiple of 4096"]
    magic, cksum, compat, bbits, extslots, root_nid, inos = struct.unpack_from("<IIIBBHQ", data, 1024)
    blocks, meta_blkaddr, xattr_blkaddr = struct.unpack_from("<III", data, 1024 + 36)
    incompat, s_u, extra, slotoff = struct.unpack_from("<IHHH", data, 1024 + 80)
    for bad, what in [(magic != 0xE0F5E1E2, "magic"), (cksum != 0, "checksum"), (compat & 0x4000_0000 == 0, "compat"),
                      (bbits != 12, "blkszbits"), (extslots != 0, "extslots"), (inos == 0, "inos"),
                      (s_u != 0, "s_u"), (xattr_blkaddr != 0, "xattr_blkaddr"), (slotoff != 11, "devt_slotoff"),
                      (incompat != 0xC, "incompat"), (meta_blkaddr * 4096 > n, "meta_blkaddr"),
                      (extra == 0 and blocks not in (0, 4096), "blocks without devices")]:
        if bad:
            p.append(f"superblock {what}")
    flags, bto, bts, cs, cto, cts, pto, pts, pad = struct.unpack_from("<QQIIQQQII", data, 1152)
    if bin(flags & (0x1 | 0x2 | 0x40 | 0x80)).count("1") != 1:
        p.append("not exactly one compression flag")
    if bin(flags & (0x4 | 0x8)).count("1") != 1:
        p.append("not exactly one digest flag")
    if flags & ~(0x3FF | 0x0300_0000 | 0xFC00_0000):
        p.append("unknown RAFS flags")
    if cs < 4096 or cs > 16 << 20 or cs & (cs - 1):
        p.append("chunk size")
    if bto % 4096 or bto < 4096 or bto < 1408 or bts % 256 or bto + bts > n:
        p.append("blob table range")
    if cts and (cto % 4096 or cto < 4096 or cts % 80 or cto + cts > n or bto < cto + cts and cto < bto + bts):
        p.append("chunk table range")
    if pts and pto and (pto < 4096 or pts % 4 or pto + pts > n or bto < pto + pts and pto < bto + bts
                        or cts and cto < pto + pts and pto < cto + cts):
        p.append("prefetch table range")
    devs, ids = [], set()
    for i in range(extra):
        tag, dblocks, mapped = struct.unpack_from("<64sII", data, 1408 + 128 * i)
        try:
            if len(tag.decode("utf-8")) != 64:
                p.append(f"device {i} id length")
        except UnicodeDecodeError:
            p.append(f"device {i} id not UTF-8")
        if dblocks == 0:
            p.append(f"device {i} has 0 blocks")
        if tag in ids:
            p.append(f"device {i} duplicate id")
        ids.add(tag)
        devs.append((tag, dblocks, mapped))
    if builder and extra and blocks != sum(d[1] for d in devs):
        p.append(f"s_blocks {blocks} != sum of device blocks")
    pos = n                                         # blobs mapped after the bootstrap, one after the other
    for i, (_, dblocks, mapped) in enumerate(devs if mapped_align else []):
        want = -(-pos // mapped_align) * mapped_align // 4096
        if mapped != want:
            p.append(f"device {i} mapped_blkaddr {mapped}, nydus-image writes {want}")
        pos = (want + dblocks) * 4096
    counts = []
    for i in range(bts // 256):
        f = struct.unpack_from("<64sIIIIIIQQIIQQQ32s32sQ8sI", data, bto + 256 * i)
        (bid, index, bcs, count, comp, dig, feat, csize, usize, _toc, cicomp, cioff, cics, cius) = f[:14]
        cipher = f[18]
        counts.append(count)
        if i < len(devs) and (bid != devs[i][0] or usize // 4096 != devs[i][1]):
            p.append(f"blob {i} disagrees with device {i}")
        for bad, what in [(index != i, "blob_index"), (bcs != cs, "chunk_size"), (count > 1 << 24, "chunk_count"),
                          (comp > 3 or cicomp > 3, "compressor"), (dig > 1, "digester"), (cipher > 1, "cipher"),
                          (usize > 1 << 44 or csize > 1 << 40, "sizes"),
                          (feat & 0xF000 or feat & 0x8000_0000, "feature bits"),
                          (not feat & 0x1, "ALIGNED"), (cics > cius, "ci sizes"),
                          (not feat & 0x4 and not feat & 0x200 and cius != 16 * count, "v1 ci size")]:
            if bad:
                p.append(f"blob {i} {what}")
    if bts // 256 != extra:
        p.append("blob table and device table differ in length")
    ents = [struct.unpack_from("<32sIIIIQQQII", data, cto + 80 * k) for k in range(cts // 80)]
    if builder and [(e[0], e[1]) for e in ents] != sorted((e[0], e[1]) for e in ents):
        p.append("chunk table not in (digest, blob) order")
    if cts and (any(data[cto + cts:]) or n - (cto + cts) >= 4096):
        p.append("something after the chunk table")
    addrs = set()
    for k, e in enumerate(ents):
        if e[1] >= len(counts) or e[8] >= counts[e[1]] or e[6] % 4096:
            p.append(f"chunk table entry {k}")
        addrs.add((e[1], e[8], e[6] // 4096))
    # nydusd resolves a chunk index (blob, ci, block) through the chunk table (direct_v6.rs load_chunk_map)
    img = ErofsImage(data)
    for _, nid in img.walk():
        info = img.inode(nid)
        if info.is_reg() and info.size:
            for lo, hi, blk in img.raw_chunk_indexes(nid):
                if hi & 0xFF == 0 or ((hi & 0xFF) - 1, (hi >> 8) << 16 | lo, blk) not in addrs:
                    p.append(f"nid {nid}: chunk index ({lo}, {hi}, {blk}) has no chunk table entry")
    return p


# --- round trips -----------------------------------------------------------------------------


def test_round_trip(boot, tmp_path):
    root, blobs, data, meta = boot
    b = Bootstrap.from_bytes(data)
    assert b.meta == meta
    check_reader(b.erofs, root, blobs)
    for got, want in zip(b.meta.blobs, meta.blobs):
        assert got.entries == sorted(got.entries, key=lambda e: e.uncompressed_offset)
        assert set(got.entries) <= set(want.entries)
    referenced = {(c.blob_index, c.ci_index) for _, n in walk(root) if n.is_reg() for c in n.chunks}
    assert referenced == {(i, e.index) for i, bl in enumerate(b.meta.blobs) for e in bl.entries}
    p = tmp_path / "image.boot"
    p.write_bytes(data)
    again = Bootstrap.open(p)
    assert again.meta == meta and again.erofs.sb == b.erofs.sb
    nid = b.resolve(b"/symlinks/abs")
    assert b.readlink(nid) == b"/etc/passwd" and b.getattr(nid).is_symlink()
    assert b.lookup(b.root_nid, b"files") == b.resolve(b"/files")
    assert [n for n, _, _ in b.readdir(b.resolve(b"/dev"))] == [b"fifo", b"maxdev", b"null", b"nvme", b"socket"]
    assert b.xattrs(b.root_nid) == root.xattrs
    assert b.resolve(b"/files/size-1/not-a-dir") is None and b.resolve(b"/nope") is None
    assert make(*awkward())[0] == data, "bootstraps must be deterministic"


def test_chunk_indexes_carry_the_ci_index(boot):
    root, blobs, data, _ = boot
    b = Bootstrap.from_bytes(data)
    high = 0
    for path, node in walk(root):
        if not node.is_reg():
            continue
        nid = b.resolve(path)
        want = [ChunkAddr(c.blob_index, c.ci_index, c.offset) for c in node.chunks]
        assert b.chunk_addrs(nid) == want, path
        for a, c in zip(want, node.chunks):
            e = b.chunk_entry(a)
            assert (e.uncompressed_offset, e.uncompressed_size, e.digest) == (c.offset, c.size, c.digest)
        high += sum(c.ci_index > 0xFFFF for c in node.chunks)
        # the kernel's view of the same indexes: device = blob + 1, ci bits masked away
        assert b.erofs.chunk_indexes(nid) == [(c.blob_index + 1, c.offset // 4096) for c in node.chunks]
    assert high > 10, "the fixture must exercise ci indexes above 65535"


def test_extreme_ci_index_round_trips_and_2_pow_24_does_not():
    blobs = Blobs(1, CS, holes=False, ci_base=[0xFFFFFE])
    root = new_dir()
    root.entries[b"a"] = blobs.file(rnd(1, 2 * CS))
    data, meta = make(root, blobs, prefetch=[])
    b = Bootstrap.from_bytes(data)
    assert [a.ci_index for a in b.chunk_addrs(b.resolve(b"/a"))] == [0xFFFFFE, 0xFFFFFF]
    assert not nydusd_problems(data)
    root.entries[b"a"].chunks[1].ci_index = 1 << 24
    meta.blobs[0].entries[1] = dataclasses.replace(meta.blobs[0].entries[1], index=1 << 24)
    with pytest.raises(FormatError, match="ci index"):
        write_bootstrap(root, meta, io.BytesIO())


def test_nydusd_load_rules_hold(boot):
    root, blobs, data, meta = boot
    assert nydusd_problems(data) == []
    assert len(data) % 4096 == 0
    flags, bto, bts, cs, cto, cts, pto, pts, _ = struct.unpack_from("<QQIIQQQII", data, 1152)
    assert flags == 0x80 | 0x8 | 0x10 | 0x20 | 0x100     # zstd, sha256, explicit uid/gid, xattrs, inlined digests
    assert (bto, bts, cs) == (4096, 512, CS)
    assert (pto, pts) == (4096 + 512, 4 * len(PREFETCH))
    assert cto % 4096 == 0 and cts % 80 == 0 and len(data) - cto - cts < 4096
    assert struct.unpack_from("<I", data, 1024 + 36)[0] == sum(len(v) // 4096 for v in blobs.views)
    b = Bootstrap.from_bytes(data)
    assert list(struct.unpack_from("<3I", data, pto)) == [b.resolve(p) for p in PREFETCH]
    f = struct.unpack_from("<64sIIIIIIQQIIQQQ32s32sQ8sI", data, 4096 + 256)
    bl = meta.blobs[1]
    assert f[:14] == (bl.blob_id.encode(), 1, CS, bl.chunk_count, 0, 1, B.WRITER_FEATURES, bl.compressed_size,
                      bl.uncompressed_size, 640, 0, bl.ci_offset, bl.ci_compressed_size, bl.ci_uncompressed_size)
    assert f[14].hex() == bl.blob_toc_digest and f[15] == bytes(32) and f[16:] == (0, bytes(8), 0)


def test_nydusd_rules_checker_can_fail(boot):
    _, _, data, _ = boot
    def patch(off, fmt, value):
        bad = bytearray(data)
        struct.pack_into(fmt, bad, off, value)
        return bytes(bad)
    assert nydusd_problems(data[:-1])
    assert "superblock incompat" in nydusd_problems(patch(1024 + 80, "<I", 0x4))
    assert "superblock devt_slotoff" in nydusd_problems(patch(1024 + 88, "<H", 9))
    assert any("s_blocks" in x for x in nydusd_problems(patch(1024 + 36, "<I", 7)))
    assert any("mapped_blkaddr" in x for x in nydusd_problems(patch(1408 + 68, "<I", 0)))
    assert "chunk table not in (digest, blob) order" in nydusd_problems(
        data[:struct.unpack_from("<Q", data, 1152 + 24)[0]]
        + bytes(reversed(data[struct.unpack_from("<Q", data, 1152 + 24)[0]:])))
    off = struct.unpack_from("<Q", data, 1152 + 24)[0]
    assert any("no chunk table entry" in x for x in nydusd_problems(patch(off + 72, "<I", 9999)))


def test_empty_image_without_blobs():
    out = io.BytesIO()
    meta = RafsMeta(chunk_size=1 << 20, compressor="none", digester="blake3", blobs=[])
    root = new_dir()
    root.entries[b"empty"] = Inode(stat.S_IFREG | 0o644)
    write_bootstrap(root, meta, out)
    data = out.getvalue()
    assert nydusd_problems(data) == []
    b = Bootstrap.from_bytes(data)
    assert b.meta == meta and b.erofs.devices == []
    assert b.file_extents(b.resolve(b"/empty"), 0, 100) == [] and b.chunk_addrs(b.resolve(b"/empty")) == []
    incompat, _, extra, slotoff = struct.unpack_from("<IHHH", data, 1024 + 80)
    assert (incompat, extra, slotoff, struct.unpack_from("<I", data, 1024 + 36)[0]) == (0xC, 0, 11, 0)
    flags, bto, bts, _, _, cts, pto, pts, _ = struct.unpack_from("<QQIIQQQII", data, 1152)
    assert flags == 0x1 | 0x4 | 0x10 | 0x100 and (bto, bts, cts, pto, pts) == (4096, 0, 0, 0, 0)
    # a prefetch list with no blobs travels in the pynydus record only (as nydus: no table without blobs)
    meta.prefetch = [PrefetchEntry(b"/empty")]
    out = io.BytesIO()
    write_bootstrap(root, meta, out)
    assert Bootstrap.from_bytes(out.getvalue()).meta.prefetch == [PrefetchEntry(b"/empty")]
    assert nydusd_problems(out.getvalue()) == []


def test_end_to_end_with_real_blobs(tmp_path):
    """BlobWriter blobs -> BlobInfo.from_summary -> bootstrap -> reader; the bootstrap inlined in a blob
    with the placeholder id reads back from the blob's ToC."""
    files = {b"a": rnd(1, 3 * CS + 5), b"b": bytes(2 * CS), b"c": rnd(1, 3 * CS + 5)[:CS] + rnd(2, 10)}
    root = new_dir()
    buf = io.BytesIO()
    w = B.BlobWriter(buf, compressor="zstd", digester="blake3")
    seen: dict[bytes, ChunkEntry] = {}
    for name, content in files.items():
        chunks = []
        for i in range(0, len(content), CS):
            piece = content[i:i + CS]
            d = B.prepare_chunk(piece, "zstd", "blake3").digest
            if d not in seen:
                seen[d] = w.add_chunk(piece, d)
            e = seen[d]
            chunks.append(ChunkRef(d, len(piece), 0, e.uncompressed_offset, e.index))
        root.entries[name] = Inode(stat.S_IFREG | 0o644, size=len(content), chunks=chunks)
    summary = w.finish()
    info = BlobInfo.from_summary(summary, CS)
    assert info.entries == list(summary.entries) and info.entry(2) == summary.entries[2]
    meta = RafsMeta(chunk_size=CS, compressor="zstd", digester="blake3", blobs=[info], prefetch=[b"/a"])
    out = io.BytesIO()
    write_bootstrap(root, meta, out)
    data = out.getvalue()
    assert nydusd_problems(data) == []
    b = Bootstrap.from_bytes(data)
    assert b.meta == meta and b.meta.blobs[0].entries == list(summary.entries)
    reader = B.BlobReader.from_bytes(buf.getvalue(), b.meta.blobs[0])
    for name, content in files.items():
        nid = b.resolve(b"/" + name)
        got = b"".join(reader.read_range(x.blob_offset, x.length) for x in b.file_extents(nid, 0, len(content)))
        assert got == content, name
    # a per-layer blob that inlines its own bootstrap names itself "x" * 64 (nydus-image --blob-inline-meta)
    placeholder = dataclasses.replace(info, blob_id=PLACEHOLDER_BLOB_ID)
    out = io.BytesIO()
    write_bootstrap(root, dataclasses.replace(meta, blobs=[placeholder]), out)
    layer = io.BytesIO()
    w2 = B.BlobWriter(layer, compressor="zstd", digester="blake3")
    for e in summary.entries:
        w2.add_compressed(buf.getvalue()[e.compressed_offset:e.compressed_offset + e.compressed_size],
                          e.uncompressed_size, e.digest, e.flags)
    w2.finish(bootstrap=out.getvalue())
    blob = layer.getvalue()
    inner = extract_toc_bootstrap(blob)
    assert inner == out.getvalue()
    assert Bootstrap.from_bytes(inner).meta.blobs[0].blob_id == PLACEHOLDER_BLOB_ID


def _read_through(b: Bootstrap, blobs: Blobs, nid: int, offset: int, size: int) -> bytes:
    out = bytearray()
    expect = offset
    for e in b.file_extents(nid, offset, size):
        assert e.file_offset == expect and e.length > 0
        expect += e.length
        if e.blob_index < 0:
            assert e.blob_offset == -1
            out += bytes(e.length)
        else:
            out += blobs.views[e.blob_index][e.blob_offset:e.blob_offset + e.length]
    return bytes(out)


def test_file_extents_give_back_every_byte(boot):
    root, blobs, data, _ = boot
    b = Bootstrap.from_bytes(data)
    rng = random.Random(3)
    for path, node in walk(root):
        if not node.is_reg() or path.startswith(b"/big/"):
            continue
        nid = b.resolve(path)
        content = blobs.content[id(node)]
        assert _read_through(b, blobs, nid, 0, node.size) == content, path
        for _ in range(5):
            off = rng.randrange(0, node.size + 10)
            size = rng.randrange(0, 3 * blobs.chunk_size)
            assert _read_through(b, blobs, nid, off, size) == content[off:off + size], (path, off, size)


def _index_offset(b: Bootstrap, nid: int, k: int) -> int:
    info = b.getattr(nid)
    return ((b.erofs.iloc(nid) + info.inode_isize + info.xattr_isize + 7) & ~7) + 8 * k


def test_file_extents_merge_zero_chunks_and_null_addresses():
    blobs = Blobs(1, CS, holes=False)
    root = new_dir()
    root.entries[b"seq"] = blobs.file(rnd(1, 3 * CS + 5))                  # three chunks back to back
    sparse = bytearray(6 * CS)
    sparse[4 * CS:] = rnd(2, 2 * CS)
    root.entries[b"sparse"] = blobs.file(bytes(sparse))                     # zero chunks: stored once, no holes
    data, _ = make(root, blobs, prefetch=[])
    b = Bootstrap.from_bytes(data)
    seq = b.resolve(b"/seq")
    assert b.file_extents(seq, 0, 1 << 30) == [Extent(0, 3 * CS + 5, 0, 0)]
    assert b.file_extents(seq, 5000, 100) == [Extent(5000, 100, 0, 5000)]
    assert b.file_extents(seq, 3 * CS + 5, 10) == [] and b.file_extents(seq, 10, 0) == []
    sp = b.resolve(b"/sparse")
    zero = 4 * CS                                                             # the zero chunk's view offset
    assert b.file_extents(sp, 100, 6 * CS)[:2] == [Extent(100, CS - 100, 0, zero + 100), Extent(CS, CS, 0, zero)]
    with pytest.raises(OSError):
        b.file_extents(b.root_nid, 0, 10)
    # Nydus writes no holes, but an EROFS null address still reads as zeros
    bad = bytearray(data)
    struct.pack_into("<HHI", bad, _index_offset(b, sp, 1), 0, 0, L.NULL_ADDR)
    b2 = Bootstrap.from_bytes(bytes(bad))
    assert b2.file_extents(sp, 0, 3 * CS) == [Extent(0, CS, 0, zero), Extent(CS, CS, -1, -1),
                                              Extent(2 * CS, CS, 0, zero)]
    assert b2.chunk_addrs(sp, 1, 1) == [ChunkAddr(-1, -1, -1)]


def test_contiguous_file_declaring_a_bigger_chunk_reads_by_the_superblock_chunk_size(tmp_path, mounts):
    """nydus-image declares next_pow2(size) in i_u for a file whose chunks lie back to back, yet writes
    one index per superblock chunk (builder v6.rs): the kernel uses index 0, nydusd all of them."""
    blobs = Blobs(1, CS, holes=False)
    root = new_dir()
    content = rnd(5, 3 * CS + 100)
    root.entries[b"f"] = blobs.file(content)
    data, _ = make(root, blobs, prefetch=[])
    b = Bootstrap.from_bytes(data)
    nid = b.resolve(b"/f")
    bad = bytearray(data)
    struct.pack_into("<I", bad, b.erofs.iloc(nid) + 16, L.CHUNK_FORMAT_INDEXES | 2)     # 16 KiB chunks
    b2 = Bootstrap.from_bytes(bytes(bad))
    assert ErofsImage(bytes(bad)).inode(nid).chunk_size == 4 * CS                   # what the inode says
    assert b2.getattr(nid).chunk_size == CS and len(b2.chunk_addrs(nid)) == 4
    assert _read_through(b2, blobs, nid, 0, len(content)) == content
    assert _read_through(b2, blobs, nid, CS + 7, 2 * CS) == content[CS + 7:3 * CS + 7]
    (tmp_path / "boot").write_bytes(bad)
    mnt = mounts(tmp_path / "boot", blobs.write(tmp_path))
    assert (mnt / "f").read_bytes() == content


def test_fsck_and_kernel_read_the_bootstrap_file(tmp_path, mounts):
    root, blobs = awkward(ci_base=(0, 0))
    data, _ = make(root, blobs)
    p = tmp_path / "image.boot"
    p.write_bytes(data)
    devs = blobs.write(tmp_path)
    # erofs-utils 1.5 does not mask device ids, so it only reads ci indexes below 65536
    run("fsck.erofs", *[f"--device={d}" for d in devs], f"--extract={tmp_path / 'x'}", p)
    for path, node in walk(root):
        if node.is_reg():
            assert (tmp_path / "x").joinpath(os.fsdecode(path[1:])).read_bytes() == blobs.content[id(node)], path
    mnt = mounts(p, devs)
    node = root.entries[b"files"].entries[b"size-%d" % (3 * CS + 7)]
    assert (mnt / "files" / ("size-%d" % (3 * CS + 7))).read_bytes() == blobs.content[id(node)]


def test_kernel_reads_chunks_whose_ci_index_passes_65535(boot, tmp_path, mounts):
    root, blobs, data, _ = boot
    p = tmp_path / "image.boot"
    p.write_bytes(data)
    mnt = os.fsencode(mounts(p, blobs.write(tmp_path)))
    checked = 0
    for path, node in walk(root):
        if node.is_reg() and any(c.ci_index > 0xFFFF for c in node.chunks):
            with open(mnt + path, "rb") as f:
                assert f.read() == blobs.content[id(node)], path
            checked += 1
    assert checked > 10


# --- prefetch ------------------------------------------------------------------------------


RANGED = [PrefetchEntry(b"/files/size-1", ((0, 4096), (8192, 1))), PrefetchEntry(b"/names/caf\xe9", ((7, 3),)),
          PrefetchEntry(b"/")]


def _record(data: bytes) -> tuple[int, dict]:
    bto, bts = struct.unpack_from("<QI", data, 1152 + 8)
    pto, pts = struct.unpack_from("<QI", data, 1152 + 40)
    off = -(-max(bto + bts, pto + pts) // 8) * 8
    magic, version, size = struct.unpack_from("<8sII", data, off)
    assert (magic, version) == (b"PYNYDUS\0", 1)
    return off, json.loads(data[off + 16:off + 16 + size])


def test_ranged_prefetch_round_trip(boot):
    root, blobs, _, meta = boot
    ranged = dataclasses.replace(meta, prefetch=RANGED)
    out = io.BytesIO()
    write_bootstrap(root, ranged, out)
    data = out.getvalue()
    b = Bootstrap.from_bytes(data)
    assert b.meta == ranged and b.meta.prefetch == RANGED
    assert nydusd_problems(data) == []
    off, doc = _record(data)
    # whole files stay bare paths; ranged entries are {"path", "ranges": [[offset, length]]}
    assert doc == {"prefetch": [{"path": "/files/size-1", "ranges": [[0, 4096], [8192, 1]]},
                                {"path": {"base64": "L25hbWVzL2NhZuk="}, "ranges": [[7, 3]]}, "/"]}
    assert off + 16 + len(json.dumps(doc, separators=(",", ":"))) <= b.erofs.sb.meta_blkaddr * 4096
    pto, pts = struct.unpack_from("<QI", data, 1152 + 40)
    assert list(struct.unpack_from("<3I", data, pto)) == [b.resolve(e.path) for e in RANGED]


def _without_record(data: bytes) -> bytes:
    off, _ = _record(data)
    bad = bytearray(data)
    bad[off:off + 8] = bytes(8)
    return bytes(bad)


def test_prefetch_table_alone_gives_paths(boot):
    # what Nydus writes: nids only; the reader turns them into paths (the root's nid is "/")
    _, _, data, _ = boot
    assert Bootstrap.from_bytes(_without_record(data)).meta.prefetch == [PrefetchEntry(p) for p in PREFETCH]


@pytest.mark.parametrize("entry", [
    '{"path":"/a","ranges":[]}', '{"path":"/a","ranges":[[0,0]]}', '{"path":"/a","ranges":[[-1,5]]}',
    '{"path":"/a","ranges":[[0,1.5]]}', '{"path":"/a","ranges":[[0,true]]}', '{"path":"/a","ranges":[[0]]}',
    '{"path":"/a","ranges":[[0,1,2]]}', '{"path":"/a","ranges":[[10,1],[0,1]]}',
    '{"path":"/a","ranges":[[0,10],[5,1]]}', '{"path":"/a","ranges":[[9223372036854775807,2]]}',
    '{"path":"/a","ranges":"0+1"}', '{"path":"a","ranges":[[0,1]]}', '{"path":"/a"}',
    '{"path":"/a","ranges":[[0,1]],"x":1}', '{"path":3,"ranges":[[0,1]]}', '7', '"relative"',
])
def test_bad_ranged_prefetch_entries_are_rejected(boot, entry):
    root, _, data, meta = boot
    out = io.BytesIO()
    write_bootstrap(root, dataclasses.replace(meta, prefetch=[PrefetchEntry(b"/files/size-1", ((0, 1),))]
                    + meta.prefetch[1:]), out)
    data = out.getvalue()
    off, doc = _record(data)
    doc["prefetch"][0] = json.loads(entry)
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    bad = bytearray(data)
    bad[off:off + 16 + len(payload)] = struct.pack("<8sII", b"PYNYDUS\0", 1, len(payload)) + payload
    with pytest.raises(FormatError, match="prefetch|record"):
        Bootstrap.from_bytes(bytes(bad))


def test_prefetch_record_damage(boot):
    _, _, data, _ = boot
    off, _ = _record(data)

    def patch(fmt, *values, at=0):
        bad = bytearray(data)
        struct.pack_into(fmt, bad, off + at, *values)
        return bytes(bad)
    size = struct.unpack_from("<I", data, off + 12)[0]
    for bad, match in [(patch("<I", 2, at=8), "version 2"), (patch("<I", 1 << 20, at=12), "runs into"),
                       (patch("<B", ord("{"), at=16 + size - 1), "not JSON"),
                       (patch("<8s", b"{\"x\":1} ", at=16), "not JSON|no prefetch")]:
        with pytest.raises(FormatError, match=match):
            Bootstrap.from_bytes(bad)
    deep = b"[" * 100_000 + b"]" * 100_000           # too deep for json: a FormatError, not a RecursionError
    record = struct.pack("<8sII", b"PYNYDUS\0", 1, len(deep)) + deep
    with pytest.raises(FormatError, match="not JSON"):
        decode_record(record, 0, len(record))
    assert decode_record(bytes(64), 0, 64) is None
    # the record and the RAFS prefetch table must agree on the count
    pto, pts = struct.unpack_from("<QI", data, 1152 + 40)
    bad = bytearray(data)
    struct.pack_into("<I", bad, pto + pts - 4, 0)                 # a zero nid ends the table early
    with pytest.raises(FormatError, match="prefetch table"):
        Bootstrap.from_bytes(bytes(bad))
    bad = bytearray(_without_record(data))
    struct.pack_into("<I", bad, pto, 999_999)
    with pytest.raises(FormatError, match="nid 999999 is not in the tree"):
        Bootstrap.from_bytes(bytes(bad))


# --- real Nydus images ---------------------------------------------------------------------


def extract_toc_bootstrap(blob: bytes) -> bytes:
    """image.boot from a blob's ToC (the last 512 bytes: tar header "rafs.blob.toc"; 128-byte entries)."""
    import zstandard
    hdr = blob[-512:]
    assert hdr[:13] == b"rafs.blob.toc"
    size = int(hdr[124:136].rstrip(b"\0 ") or b"0", 8)
    toc = blob[-512 - size:-512]
    for k in range(0, size, 128):
        flags, _, name, sha, coff, csize, usize = struct.unpack_from("<II16s32sQQQ", toc, k)
        if name.rstrip(b"\0") == b"image.boot":
            raw = blob[coff:coff + csize]
            plain = zstandard.ZstdDecompressor().decompress(raw, max_output_size=usize) if flags == 2 else raw
            assert hashlib.sha256(plain).digest() == sha
            return plain
    raise AssertionError("no image.boot in the ToC")


def _view(b: Bootstrap, blob: bytes) -> bytes:
    """The blob's uncompressed view from the bootstrap's chunk table (zstd blobs)."""
    import zstandard
    info = b.meta.blobs[0]
    view = bytearray(info.uncompressed_size)
    for e in info.entries:
        raw = blob[e.compressed_offset:e.compressed_offset + e.compressed_size]
        plain = zstandard.ZstdDecompressor().decompress(raw, max_output_size=e.uncompressed_size) \
            if e.compressed else raw
        view[e.uncompressed_offset:e.uncompressed_offset + len(plain)] = plain
    return bytes(view)


def _files(b: Bootstrap, view: bytes) -> dict[bytes, bytes]:
    out = {}
    for path, nid in b.erofs.walk():
        info = b.getattr(nid)
        if info.is_reg():
            out[path] = b"".join(view[x.blob_offset:x.blob_offset + x.length]
                                 for x in b.file_extents(nid, 0, info.size))
    return out


def _fsck_extract(tmp_path: Path, boot_bytes: bytes, view: bytes) -> dict[bytes, bytes]:
    (tmp_path / "boot").write_bytes(boot_bytes)
    (tmp_path / "view").write_bytes(view)
    out = tmp_path / "x"
    run("fsck.erofs", f"--device={tmp_path / 'view'}", f"--extract={out}", tmp_path / "boot")
    got = {}
    for dirpath, _, names in os.walk(out):
        for n in names:
            p = os.path.join(dirpath, n)
            got[b"/" + os.fsencode(os.path.relpath(p, out))] = open(p, "rb").read()
    return got


def test_nydus_image_2_2_bootstrap(tmp_path):
    data = fixture("rafs-v6-2.2.boot").read_bytes()
    b = Bootstrap.from_bytes(data)
    m = b.meta
    assert (m.chunk_size, m.compressor, m.digester, m.prefetch) == (1 << 20, "zstd", "blake3", [])
    (info,) = m.blobs
    assert info.blob_id == "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
    assert (info.chunk_count, info.compressed_size, info.uncompressed_size, info.features) == \
        (2, 14554, 36864, 0x7000_0021)
    assert [(e.index, e.uncompressed_offset, e.uncompressed_size) for e in info.entries] == \
        [(0, 0, 16931), (1, 20480, 13400)]
    assert b.erofs.sb.root_nid == 128 and b.erofs.sb.blocks == 9
    blob = fixture("blobs", info.blob_id).read_bytes()
    files = _files(b, _view(b, blob))
    assert {p: len(c) for p, c in files.items()} == {b"/lib.rs": 16931, b"/sync_io.rs": 13400}
    assert files == _fsck_extract(tmp_path, data, _view(b, blob))
    # nydus-image 2.2 aligned mapped_blkaddr to 2 MiB (512 KiB since): the checker agrees with the real thing
    assert nydusd_problems(data, mapped_align=2 << 20) == []
    assert nydusd_problems(data) == ["device 0 mapped_blkaddr 512, nydus-image writes 128"]


def test_bootstrap_inlined_in_a_blob(tmp_path):
    path = next(iter(sorted(fixture("toc").iterdir())))
    blob = path.read_bytes()
    data = extract_toc_bootstrap(blob)
    b = Bootstrap.from_bytes(data)
    (info,) = b.meta.blobs
    assert (info.chunk_count, info.features, info.compressor, info.digester) == (3, 0x1, "zstd", "blake3")
    assert [e.index for e in info.entries] == [0, 1, 2]
    files = _files(b, _view(b, blob))
    assert sorted(files) == [b"/error.rs", b"/lib.rs", b"/logger.rs"]
    assert files == _fsck_extract(tmp_path, data, _view(b, blob))
    assert nydusd_problems(data, mapped_align=None) == []      # a per-layer bootstrap: not mapped yet


def test_snapshotter_bootstrap_layer():
    with tarfile.open(fixture("snapshotter", "v6-bootstrap-chunk-pos-438272.tar.gz")) as t:
        data = t.extractfile("image/image.boot").read()
    b = Bootstrap.from_bytes(data)
    m = b.meta
    assert (m.compressor, m.digester, m.chunk_size, len(m.blobs)) == ("lz4", "blake3", 1 << 20, 1)
    assert b.erofs.sb.inos == 3517 and b.erofs.sb.blocks == 4096           # old builders: a fixed 4096
    assert m.prefetch == [PrefetchEntry(b"/bin")]
    (info,) = m.blobs
    assert (info.chunk_count, len(info.entries), info.ci_compressor, info.features) == (2515, 2515, "lz4", 1)
    inodes = files = 0
    for path, nid in b.erofs.walk():
        inodes += 1
        info_ = b.getattr(nid)
        if info_.is_reg():
            files += 1
            for a in b.chunk_addrs(nid):
                assert b.chunk_entry(a).uncompressed_offset == a.blob_offset, path
    assert inodes == 3517 and files > 2000
    assert struct.unpack_from("<I", data, 1408 + 68)[0] == 0                 # mapped_blkaddr 0 in old images
    assert nydusd_problems(data, mapped_align=None, builder=False) == []


def test_unsupported_features_are_named():
    data = fixture("rafs-v6-2.2.boot").read_bytes()

    def patch(off, fmt, value, base=data):
        bad = bytearray(base)
        struct.pack_into(fmt, bad, off, value)
        return bytes(bad)
    feat = 4096 + 84
    for bad, name in [(patch(feat, "<I", 0x7000_0021 | B.FEATURE_ZRAN | B.FEATURE_CHUNK_INFO_V2), "zran"),
                      (patch(feat, "<I", 0x7000_0021 | B.FEATURE_BATCH | B.FEATURE_CHUNK_INFO_V2), "batch"),
                      (patch(feat, "<I", 0x7000_0021 | B.FEATURE_ENCRYPTED | B.FEATURE_CHUNK_INFO_V2), "encrypted"),
                      (patch(feat, "<I", 0x4000_0040), "tarfs"),
                      (patch(4096 + 216, "<I", 1), "encrypted"),
                      (patch(1152, "<Q", 0x194 | 0x200), "tarfs"),
                      (patch(1152, "<Q", 0x194 | 0x0200_0000), "encrypted"),
                      (patch(1024 + 12, "<B", 9), "tarfs"),
                      (patch(16384 + 36, "<I", 0x8 | 1), "batch"),
                      (patch(16384 + 36, "<I", 0x4 | 1), "encrypted")]:
        with pytest.raises(FormatError, match=f"not supported: {name}"):
            Bootstrap.from_bytes(bad)


# --- writer rejections -----------------------------------------------------------------------


def _small():
    blobs = Blobs(1, CS, holes=False)
    root = new_dir()
    root.entries[b"a"] = blobs.file(rnd(1, 2 * CS + 3))
    return root, blobs, RafsMeta(chunk_size=CS, compressor="zstd", digester="blake3", blobs=blob_infos(blobs))


@pytest.mark.parametrize("change, match", [
    ({"compressor": "gzip"}, "compressor"),
    ({"compressor": "lz4_block"}, "compressor"),
    ({"digester": "md5"}, "digester"),
    ({"chunk_size": 3 * 4096}, "chunk_size"),
    ({"chunk_size": 32 << 20}, "chunk_size"),
    ({"prefetch": ["relative"]}, "prefetch"),
    ({"prefetch": [b"relative"]}, "prefetch"),
    ({"prefetch": [b"/missing"]}, "not in the tree"),
    ({"prefetch": [PrefetchEntry(b"/a", ((5, 1), (0, 1)))]}, "range"),
])
def test_write_rejects_bad_meta(change, match):
    root, _, meta = _small()
    with pytest.raises(FormatError, match=match):
        write_bootstrap(root, dataclasses.replace(meta, **change), io.BytesIO())


@pytest.mark.parametrize("change, match", [
    ({"blob_toc_digest": "z" * 64}, "blob_toc_digest"),
    ({"uncompressed_size": 4097}, "4 KiB"),
    ({"uncompressed_size": 0}, "empty blobs"),
    ({"chunk_count": -1}, "chunk_count"),
    ({"chunk_count": 1 << 25}, "chunks"),
    ({"compressor": "xz"}, "compressor"),
    ({"ci_compressor": "xz"}, "ci_compressor"),
    ({"chunk_size": 8192}, "chunk_size"),
    ({"features": 0}, "ALIGNED"),
    ({"features": 0x1001}, "invalid blob features"),
    ({"features": 0x1 | B.FEATURE_ZRAN}, "not supported: zran"),
    ({"ci_uncompressed_size": 17}, "ci_"),
    ({"compressed_size": 1 << 41}, "compressed_size"),
])
def test_write_rejects_bad_blob_info(change, match):
    root, _, meta = _small()
    blobs = [dataclasses.replace(meta.blobs[0], **change)]
    with pytest.raises(FormatError, match=match):
        write_bootstrap(root, dataclasses.replace(meta, blobs=blobs), io.BytesIO())


def test_blob_info_rejects_bad_ids():
    for bad in ("ABC", "A" * 64, "g" * 64, "y" * 64, b"0" * 64):
        with pytest.raises(FormatError, match="blob_id"):
            BlobInfo(blob_id=bad, compressed_size=1, uncompressed_size=4096, chunk_count=1)


def test_write_rejects_what_nydusd_cannot_load():
    root, blobs, meta = _small()
    a = root.entries[b"a"]
    cases = []
    twin = dataclasses.replace(meta, blobs=[meta.blobs[0], dataclasses.replace(meta.blobs[0])])
    cases.append((root, twin, "appears twice"))
    many = dataclasses.replace(meta, blobs=[dataclasses.replace(meta.blobs[0], blob_id="%064x" % i)
                                            for i in range(255)])
    cases.append((root, many, "at most 254"))
    holed = new_dir()
    holed.entries[b"h"] = Inode(stat.S_IFREG | 0o644, size=CS, chunks=[None])
    cases.append((holed, meta, "hole"))
    unplaced = new_dir()
    unplaced.entries[b"u"] = Inode(stat.S_IFREG | 0o644, size=a.chunks[0].size,
                                   chunks=[dataclasses.replace(a.chunks[0], ci_index=-1)])
    cases.append((unplaced, meta, "ci index -1"))
    for field_, value in (("offset", 2 * CS), ("digest", bytes(32)), ("ci_index", 1)):
        wrong = new_dir()
        wrong.entries[b"w"] = Inode(stat.S_IFREG | 0o644, size=a.chunks[0].size,
                                    chunks=[dataclasses.replace(a.chunks[0], **{field_: value})])
        cases.append((wrong, meta, "the file says|fit"))
    missing = dataclasses.replace(meta, blobs=[dataclasses.replace(meta.blobs[0], entries=[])])
    cases.append((root, missing, "no chunk with ci index 0"))
    for tree, m, match in cases:
        with pytest.raises(FormatError, match=match):
            write_bootstrap(tree, m, io.BytesIO())


# --- damage ------------------------------------------------------------------------------------


def _patch(data: bytes, off: int, fmt: str, *values) -> bytes:
    bad = bytearray(data)
    struct.pack_into(fmt, bad, off, *values)
    return bytes(bad)


def test_damage_is_reported(boot):
    root, _, data, _ = boot
    b = Bootstrap.from_bytes(data)
    cto, cts = struct.unpack_from("<QQ", data, 1152 + 24)
    bt = 4096
    sb = 1024
    cases = [
        (data[:-1], "multiple of 4096"),
        (data[:-4096], "chunk table"),
        (data[:8192], "table"),
        (data[:4096], "meta_blkaddr"),
        (data[:1100], "too small"),
        (b"", "too small"),
        (_patch(data, sb, "<I", 0), "bad EROFS magic"),
        (_patch(data, sb + 8, "<I", 0), "not a RAFS v6 bootstrap"),
        (_patch(data, sb + 4, "<I", 1), "checksum"),
        (_patch(data, sb + 13, "<B", 1), "extslots"),
        (_patch(data, sb + 16, "<Q", 0), "inode count"),
        (_patch(data, sb + 84, "<H", 1), "s_u"),
        (_patch(data, sb + 44, "<I", 3), "xattr_blkaddr"),
        (_patch(data, sb + 88, "<H", 9), "devt_slotoff"),
        (_patch(data, sb + 80, "<I", 0x4), "feature_incompat"),
        (_patch(data, sb + 80, "<I", 0xC | 0x80), "feature_incompat"),
        (_patch(data, sb + 40, "<I", 1 << 20), "meta_blkaddr"),
        (_patch(data, sb + 86, "<H", 3), "devices"),
        (_patch(data, 1152, "<Q", 0x80 | 0x1 | 0x8), "compression"),
        (_patch(data, 1152, "<Q", 0x80), "digest"),
        (_patch(data, 1152, "<Q", 0x88 | 0x400), "unknown flags"),
        (_patch(data, 1152 + 20, "<I", 3000), "chunk size"),
        (_patch(data, 1152 + 8, "<Q", 4097), "blob table"),
        (_patch(data, 1152 + 16, "<I", 255), "blob table"),
        (_patch(data, 1152 + 16, "<I", 256), "devices but"),
        (_patch(data, 1152 + 24, "<Q", cto + 80), "chunk table"),
        (_patch(data, 1152 + 32, "<Q", cts + 1), "chunk table"),
        (_patch(data, 1152 + 40, "<Q", 4096), "overlap"),
        (_patch(data, 1408, "<4s", b"ffff"), "does not match"),
        (_patch(data, 1408 + 64, "<I", 0), "does not match"),
        (_patch(data, bt, "<4s", b"XYZW"), "blob id"),
        (_patch(data, bt + 64, "<I", 1), "blob_index"),
        (_patch(data, bt + 68, "<I", 8192), "chunk_size"),
        (_patch(data, bt + 76, "<I", 9), "compression algorithm"),
        (_patch(data, bt + 80, "<I", 2), "digest algorithm"),
        (_patch(data, bt + 84, "<I", 0x7000_0020), "ALIGNED"),
        (_patch(data, bt + 84, "<I", 0x7000_1021), "invalid blob features"),
        (_patch(data, bt + 128, "<Q", 17), "ci_uncompressed_size"),
        (_patch(data, bt + 96, "<Q", 4096), "does not match"),
        (_patch(data, cto + 32, "<I", 7), "blob index 7"),
        (_patch(data, cto + 56, "<Q", 100), "does not fit"),
        (_patch(data, cto + 44, "<I", 0), "does not fit"),
        (_patch(data, cto + 36, "<I", 0x100), "unknown chunk flags"),
        (_patch(data, cto + 72, "<I", 1 << 23), "does not fit"),
    ]
    # both blobs named alike, in the device table and the blob table
    twin = _patch(_patch(data, 1408 + 128, "<64s", data[1408:1472]), bt + 256, "<64s", data[1408:1472])
    cases.append((_patch(twin, 1408 + 128 + 64, "<I", struct.unpack_from("<I", data, 1408 + 64)[0]), "twice|match"))
    for bad, match in cases:
        with pytest.raises(FormatError, match=match):
            Bootstrap.from_bytes(bad)
    # a chunk index naming a device beyond the blob table
    nid = b.resolve(b"/files/size-1")
    bad = Bootstrap.from_bytes(_patch(data, _index_offset(b, nid, 0) + 2, "<H", 5))
    with pytest.raises(FormatError, match="outside the blob table"):
        bad.file_extents(nid, 0, 1)


def _exercise(data: bytes) -> None:
    b = Bootstrap.from_bytes(data)
    for n, (_, nid) in enumerate(b.erofs.walk()):
        info = b.getattr(nid)
        b.xattrs(nid)
        if info.is_symlink():
            b.readlink(nid)
        elif info.is_reg() and info.size:
            for a in b.chunk_addrs(nid):
                b.chunk_entry(a)
            b.file_extents(nid, 0, info.size)
        if n > 3000:
            break


def test_reader_survives_random_corruption():
    """Flipped bytes anywhere (tables, inodes, chunk table) and truncations give a FormatError or a
    bootstrap that still reads; never another exception, a crash or a hang."""
    blobs = Blobs(2, CS, holes=False, ci_base=[0, 0xFFF0])
    root = awkward_tree(blobs)
    del root.entries[b"big"], root.entries[b"deep"]
    data, _ = make(root, blobs)
    b = Bootstrap.from_bytes(data)
    meta = b.erofs.sb.meta_blkaddr * 4096
    cto = struct.unpack_from("<Q", data, 1152 + 24)[0]
    rng = random.Random(1)
    rejected = 0
    regions = [(1024, 1408 + 256), (4096, meta), (meta, cto), (cto, len(data))]
    for trial in range(400):
        bad = bytearray(data)
        lo, hi = regions[trial % len(regions)]
        for _ in range(rng.randint(1, 6)):
            bad[rng.randrange(lo, hi)] = rng.randrange(256)
        if trial % 7 == 0:
            bad = bad[:rng.randrange(0, len(bad))]
        try:
            _exercise(bytes(bad))
        except FormatError:
            rejected += 1
    assert rejected >= 100, f"only {rejected} of 400 corruptions were caught"
