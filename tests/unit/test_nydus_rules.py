"""The independent nydusd-rules checker (tests/helpers/nydus_rules.py) on real Nydus images.

Real images made by the Nydus tools pass every load-time rule (and the 2.2 image also every
nydus-image writer convention of strict mode); hand-mutated copies are flagged with the rule
they break, so the checker demonstrably can fail. The fsck.erofs oracle (views built from the
blobs' ci arrays) extracts both complete fixture images.
"""
from __future__ import annotations

import hashlib
import shutil
import struct
import tarfile

import pytest

from tests.helpers import nydus_rules as R

BOOT_22 = "rafs-v6-2.2.boot"
BLOB_22 = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
TOC_BLOB = "2fa78cad554b75ac91a4a125ed148d0ddeb25efa4aaa8bd80e5dc292690a4dca"
SNAPSHOTTER = "snapshotter/v6-bootstrap-chunk-pos-438272.tar.gz"
ZRAN_META = "zran/233c72f2b6b698c07021c4da367cfe2dff4f049efbaa885ca0ff760ea297865a.blob.meta"


@pytest.fixture(scope="module")
def fx():
    return R.fixtures_dir()


@pytest.fixture(scope="module")
def boot22(fx) -> bytes:
    return (fx / BOOT_22).read_bytes()


@pytest.fixture(scope="module")
def blob22(fx) -> bytes:
    return (fx / "blobs" / BLOB_22).read_bytes()


@pytest.fixture(scope="module")
def toc_blob(fx) -> bytes:
    return (fx / "toc" / TOC_BLOB).read_bytes()


@pytest.fixture(scope="module")
def snap_boot(fx) -> bytes:
    with tarfile.open(fx / SNAPSHOTTER) as tf:
        return tf.extractfile("image/image.boot").read()


def rules(violations: list[str]) -> set[str]:
    """'blob[0] ci.header: ...' -> {'ci.header'}; 'sb.incompat: ...' -> {'sb.incompat'}."""
    out = set()
    for v in violations:
        head = v.split(":", 1)[0]
        out.add(head.split(" ")[-1])
    return out


def put(data: bytes, off: int, fmt: str, *vals) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, off, *vals)
    return bytes(b)


def flip(data: bytes, off: int) -> bytes:
    b = bytearray(data)
    b[off] ^= 0xFF
    return bytes(b)


# --------------------------------------------------------------------------- the real images pass

def test_nydus_22_image_passes_every_rule(boot22, blob22):
    assert R.check_bootstrap(boot22) == []
    assert R.check_bootstrap(boot22, strict=True) == []
    boot = R.parse_bootstrap(boot22)
    (entry,) = boot.blobs
    assert R.check_blob(blob22, entry, chunks=boot.chunks) == []
    assert R.check_blob(blob22, entry, chunks=boot.chunks, strict=True) == []
    assert R.check_image(boot22, {0: blob22}, strict=True) == []
    # what the checker saw (README facts)
    assert (boot.sb.inos, len(boot.inodes), boot.sb.blocks, len(boot.chunks)) == (3, 3, 9, 2)
    assert sorted(p for ps in boot.paths.values() for p in ps) == [b"/", b"/lib.rs", b"/sync_io.rs"]
    assert entry.features == 0x70000021 and entry.blob_toc_size == 1024
    assert hashlib.sha256(blob22).hexdigest() != entry.blob_id      # id != digest outside nydusify


def test_toc_blob_with_inlined_bootstrap_passes(toc_blob):
    boot_bytes = R.inlined_bootstrap(toc_blob)
    assert R.check_bootstrap(boot_bytes) == []
    boot = R.parse_bootstrap(boot_bytes)
    assert R.check_image(boot_bytes, {0: toc_blob}) == []
    toc, _ = R.read_toc(toc_blob)
    assert [e.name for e in toc] == ["image.blob", "blob.meta", "blob.meta.header", "image.boot"]
    assert hashlib.sha256(toc_blob).hexdigest() == TOC_BLOB
    assert sorted(p for ps in boot.paths.values() for p in ps) == [b"/", b"/error.rs", b"/lib.rs", b"/logger.rs"]
    # Its inlined bootstrap is a per-layer one: the blob table still holds the size of the chunk data
    # only (the bootstrap was appended afterwards) and no mapped_blkaddr: not what a final image holds.
    assert rules(R.check_image(boot_bytes, {0: toc_blob}, strict=True)) == {
        "strict.device[0].mapped_blkaddr", "blob.size"}


def test_snapshotter_bootstrap_passes_load_rules(snap_boot):
    assert R.check_bootstrap(snap_boot) == []
    boot = R.parse_bootstrap(snap_boot)
    assert (boot.sb.inos, len(boot.inodes), len(boot.blobs), len(boot.chunks)) == (3517, 3517, 1, 2515)
    assert boot.sb.blocks == 4096 and boot.devices[0].mapped_blkaddr == 0       # an old (2022) builder
    assert boot.blobs[0].compression_algo == 1 and boot.blobs[0].ci_compressor == 1  # lz4_block
    assert boot.prefetch and all(n in boot.inodes for n in boot.prefetch)
    # the old builder's habits are exactly what strict mode reports
    assert rules(R.check_bootstrap(snap_boot, strict=True)) == {
        "strict.device[0].mapped_blkaddr", "strict.sb.blocks", "strict.chunk_table.sorted"}


def test_zran_blob_meta_decodes_as_ci_v2(fx):
    data = (fx / ZRAN_META).read_bytes()
    hdr = R.CiHeader.parse(data[-R.CI_HEADER:])
    assert hdr.magic == hdr.magic2 == R.CI_MAGIC
    assert hdr.features & (R.F_CHUNK_INFO_V2 | R.F_ZRAN) == R.F_CHUNK_INFO_V2 | R.F_ZRAN
    ci = [R.decode_ci_v2(data, i) for i in range(hdr.ci_entries)]
    assert all(c.flags & 0x2 for c in ci)                                           # ZRAN flag
    assert [c.uncompressed_offset for c in ci] == sorted(c.uncompressed_offset for c in ci)
    assert hdr.zran_offset == hdr.ci_entries * R.CI_V2


def test_fsck_erofs_extracts_both_fixture_images(fx, toc_blob, tmp_path):
    if shutil.which("fsck.erofs") is None:
        pytest.skip("needs fsck.erofs (erofs-utils)")
    views = R.build_views(fx / BOOT_22, fx / "blobs", tmp_path / "v22")
    out = R.extract_tree(fx / BOOT_22, views, tmp_path / "t22")
    assert sorted(p.name for p in out.iterdir()) == ["lib.rs", "sync_io.rs"]
    assert (out / "lib.rs").stat().st_size == 16931 and b"Alibaba" in (out / "lib.rs").read_bytes()[:200]

    boot = R.inlined_bootstrap(toc_blob)
    views = R.build_views(boot, None, tmp_path / "vtoc", files={0: fx / "toc" / TOC_BLOB})
    out = R.extract_tree(boot, views, tmp_path / "ttoc")
    assert sorted(p.name for p in out.iterdir()) == ["error.rs", "lib.rs", "logger.rs"]


def test_views_refuse_a_corrupt_chunk(fx, blob22, tmp_path):
    boot = R.parse_bootstrap((fx / BOOT_22).read_bytes())
    c = R.read_ci(blob22, boot.blobs[0])[1][1]
    bad = tmp_path / "bad"
    bad.write_bytes(flip(blob22, c.compressed_offset + 10))
    with pytest.raises(Exception):
        R.build_views(fx / BOOT_22, None, tmp_path / "v", files={0: bad})


# --------------------------------------------------------------------------- mutated bootstraps are flagged

SB = R.SB_OFFSET
EXT = R.EXT_SB_OFFSET

BOOT_MUTATIONS = {
    # name: (mutate(boot bytes, parsed) -> bytes, rule expected, strict)
    "incompat 0x4": (lambda b, p: put(b, SB + 80, "<I", 0x4), "sb.incompat", False),
    "incompat 0x1c": (lambda b, p: put(b, SB + 80, "<I", 0x1C), "sb.incompat", False),
    "compat without RAFS_V6": (lambda b, p: put(b, SB + 8, "<I", 0), "sb.compat", False),
    "devt_slotoff 9": (lambda b, p: put(b, SB + 88, "<H", 9), "sb.devt_slotoff", False),
    "checksum": (lambda b, p: put(b, SB + 4, "<I", 0x1234), "sb.checksum", False),
    "extslots": (lambda b, p: put(b, SB + 13, "<B", 1), "sb.extslots", False),
    "xattr_blkaddr": (lambda b, p: put(b, SB + 44, "<I", 3), "sb.xattr_blkaddr", False),
    "s_u": (lambda b, p: put(b, SB + 84, "<H", 1), "sb.s_u", False),
    "inos 0": (lambda b, p: put(b, SB + 16, "<Q", 0), "sb.inos", False),
    "blocks without devices": (lambda b, p: put(put(b, SB + 86, "<H", 0), SB + 36, "<I", 9), "sb.blocks", False),
    "size not % 4096": (lambda b, p: b + bytes(100), "sb.size", False),
    "magic": (lambda b, p: put(b, SB, "<I", 0xE0F5E1E3), "sb.magic", False),
    "two compressors": (lambda b, p: put(b, EXT, "<Q", p.ext.flags | R.SF_COMP_LZ4), "ext.flags", False),
    "no digester": (lambda b, p: put(b, EXT, "<Q", p.ext.flags & ~(R.SF_HASH_BLAKE3 | R.SF_HASH_SHA256)),
                    "ext.flags", False),
    "unknown flag": (lambda b, p: put(b, EXT, "<Q", p.ext.flags | 0x1000), "ext.flags", False),
    "chunk_size 3000": (lambda b, p: put(b, EXT + 20, "<I", 3000), "ext.chunk_size", False),
    "blob table misaligned": (lambda b, p: put(b, EXT + 8, "<Q", 4096 + 128), "ext.blob_table", False),
    "blob table past end": (lambda b, p: put(b, EXT + 16, "<I", 256 * 100), "ext.blob_table", False),
    "chunk table size % 80": (lambda b, p: put(b, EXT + 32, "<Q", 150), "ext.chunk_table", False),
    "chunk table over blob table": (lambda b, p: put(b, EXT + 24, "<Q", 4096), "ext.chunk_table", False),
    "prefetch table over blob table": (lambda b, p: put(put(b, EXT + 40, "<Q", 4096), EXT + 48, "<I", 4),
                                       "ext.prefetch_table", False),
    "prefetch nid not an inode": (lambda b, p: put(put(put(b, EXT + 40, "<Q", 4096 + 256), EXT + 48, "<I", 4),
                                                   4096 + 256, "<I", 5), "prefetch.nid", False),
    "blob_index 1": (lambda b, p: put(b, p.ext.blob_table_offset + 64, "<I", 1), "blob[0].blob_index", False),
    "blob chunk_size": (lambda b, p: put(b, p.ext.blob_table_offset + 68, "<I", 65536), "blob[0].chunk_size", False),
    "compression_algo 9": (lambda b, p: put(b, p.ext.blob_table_offset + 76, "<I", 9),
                           "blob[0].compression_algo", False),
    "digest_algo 2": (lambda b, p: put(b, p.ext.blob_table_offset + 80, "<I", 2), "blob[0].digest_algo", False),
    "features without ALIGNED": (lambda b, p: put(b, p.ext.blob_table_offset + 84, "<I", 0x70000020),
                                 "blob[0].features", False),
    "features incompat bit": (lambda b, p: put(b, p.ext.blob_table_offset + 84, "<I", 0x70001021),
                              "blob[0].features", False),
    "ci_uncompressed_size": (lambda b, p: put(b, p.ext.blob_table_offset + 128, "<Q", 48),
                             "blob[0].ci_uncompressed_size", False),
    "ci csize > usize": (lambda b, p: put(b, p.ext.blob_table_offset + 120, "<Q", 33),
                         "blob[0].ci_compressed_size", False),
    "device blocks 0": (lambda b, p: put(b, R.DEVTABLE_OFFSET + 64, "<I", 0), "device[0].blocks", False),
    "chunk table ci index": (lambda b, p: put(b, p.ext.chunk_table_offset + 72, "<I", 7), "chunk[0].index", False),
    "chunk table unknown flag": (lambda b, p: put(b, p.ext.chunk_table_offset + 36, "<I", 0x41),
                                 "chunk[0].flags", False),
    "chunk table usize": (lambda b, p: put(b, p.ext.chunk_table_offset + 44, "<I", 0), "chunk[0].uncompressed_size",
                          False),
    # strict: what nydus-image always writes
    "s_blocks": (lambda b, p: put(b, SB + 36, "<I", 4096), "strict.sb.blocks", True),
    "chunk table unsorted": (lambda b, p: _swap_chunk_rows(b, p), "strict.chunk_table.sorted", True),
    "device id": (lambda b, p: put(b, R.DEVTABLE_OFFSET, "<64s", b"0" * 64), "strict.device[0].blob_id", True),
    "device blocks": (lambda b, p: put(b, R.DEVTABLE_OFFSET + 64, "<I", 8), "strict.device[0].blocks", True),
    "mapped_blkaddr": (lambda b, p: put(b, R.DEVTABLE_OFFSET + 68, "<I", 7), "strict.device[0].mapped_blkaddr", True),
    "inos": (lambda b, p: put(b, SB + 16, "<Q", 4), "strict.sb.inos", True),
    "head not zero": (lambda b, p: put(b, 10, "<B", 1), "strict.head", True),
    "trailing block": (lambda b, p: b + bytes(4096), "strict.chunk_table", True),
}


def _swap_chunk_rows(b: bytes, p) -> bytes:
    o = p.ext.chunk_table_offset
    rows = [b[o + i * 80:o + i * 80 + 80] for i in range(2)]
    return b[:o] + rows[1] + rows[0] + b[o + 160:]


def _chunk_addr_offset(p, path: bytes) -> int:
    (nid,) = [n for n, ps in p.paths.items() if path in ps]
    return R._align(p.inodes[nid].body_end, 8)


def _inode_offset(p, path: bytes) -> int:
    (nid,) = [n for n, ps in p.paths.items() if path in ps]
    return p.inodes[nid].offset


TREE_MUTATIONS = {
    # chunk index of /sync_io.rs is (lo=1, hi=1, blk=5): ci 1 of blob 0
    "ci index dropped": (lambda b, p: put(b, _chunk_addr_offset(p, b"/sync_io.rs"), "<H", 0), "chunkaddr.chunk_table"),
    "device 0": (lambda b, p: put(b, _chunk_addr_offset(p, b"/sync_io.rs") + 2, "<H", 0), "chunkaddr.blob_index"),
    "device 2": (lambda b, p: put(b, _chunk_addr_offset(p, b"/sync_io.rs") + 2, "<H", 2), "chunkaddr.blob_index"),
    "hole": (lambda b, p: put(b, _chunk_addr_offset(p, b"/sync_io.rs") + 4, "<I", 0xFFFFFFFF), "chunkaddr.hole"),
    "ci beyond chunk_count": (lambda b, p: put(b, _chunk_addr_offset(p, b"/sync_io.rs"), "<H", 9),
                              "chunkaddr.ci_index"),
    "wrong block": (lambda b, p: put(b, _chunk_addr_offset(p, b"/sync_io.rs") + 4, "<I", 6), "chunkaddr.chunk_table"),
    "nlink 0": (lambda b, p: put(b, _inode_offset(p, b"/lib.rs") + 44, "<I", 0), "inode.nlink"),
    "flat regular file": (lambda b, p: put(b, _inode_offset(p, b"/lib.rs"), "<H", 0x3), "inode.layout"),
    "no INDEXES chunk format": (lambda b, p: put(b, _inode_offset(p, b"/lib.rs") + 16, "<I", 0x08),
                                "inode.chunk_format"),
    "48-bit chunk format": (lambda b, p: put(b, _inode_offset(p, b"/lib.rs") + 16, "<I", 0x68), "inode.chunk_format"),
    "chunk bits below SB chunk size": (lambda b, p: put(b, _inode_offset(p, b"/lib.rs") + 16, "<I", 0x20),
                                       "inode.chunk_bits"),
    "root not a dir": (lambda b, p: put(b, SB + 14, "<H", 133), "sb.root_nid"),
}


@pytest.mark.parametrize("name", list(BOOT_MUTATIONS))
def test_mutated_bootstrap_is_flagged(name, boot22):
    mutate, rule, strict = BOOT_MUTATIONS[name]
    bad = mutate(boot22, R.parse_bootstrap(boot22))
    assert bad != boot22
    got = R.check_bootstrap(bad, strict=strict)
    assert rule in rules(got), f"{name}: expected {rule}, got {got}"
    if strict:
        assert rule not in rules(R.check_bootstrap(bad)), "a writer convention reported as a load rule"


@pytest.mark.parametrize("name", list(TREE_MUTATIONS))
def test_mutated_inode_tree_is_flagged(name, boot22):
    mutate, rule = TREE_MUTATIONS[name]
    bad = mutate(boot22, R.parse_bootstrap(boot22))
    assert bad != boot22
    got = R.check_bootstrap(bad)
    assert rule in rules(got), f"{name}: expected {rule}, got {got}"


def test_unsorted_directory_is_flagged(boot22):
    """Swap the names of /lib.rs and /sync_io.rs's dirents (same length class does not matter: the names
    area is rewritten in swapped order, offsets recomputed)."""
    p = R.parse_bootstrap(boot22)
    root = p.inodes[p.sb.root_nid]
    assert root.layout == R.LAYOUT_FLAT_INLINE and root.size < 4096
    at = root.body_end
    blk = bytearray(boot22[at:at + root.size])
    n = struct.unpack_from("<H", blk, 8)[0] // 12
    ents = [struct.unpack_from("<QHBB", blk, i * 12) for i in range(n)]
    names = [bytes(blk[ents[i][1]:(ents[i + 1][1] if i + 1 < n else root.size)]) for i in range(n)]
    assert names == [b".", b"..", b"lib.rs", b"sync_io.rs"]
    order = [0, 1, 3, 2]
    off = n * 12
    for i, j in enumerate(order):
        nid, _o, t, r = ents[j]
        struct.pack_into("<QHBB", blk, i * 12, nid, off, t, r)
        blk[off:off + len(names[j])] = names[j]
        off += len(names[j])
    bad = boot22[:at] + bytes(blk) + boot22[at + root.size:]
    assert "dir.sorted" in rules(R.check_bootstrap(bad))


# --------------------------------------------------------------------------- mutated blobs are flagged

def _blob_case(name, blob: bytes, entry: R.BlobEntry, chunks):
    """-> (blob bytes, entry, chunk rows) after mutation `name`."""
    _h, ci, _raw = R.read_ci(blob, entry)
    toc, body = R.read_toc(blob, entry.blob_toc_size)
    by = {e.name: e for e in toc}
    ci_hdr = entry.ci_offset + entry.ci_compressed_size
    rep = lambda **kw: R.BlobEntry(**{**entry.__dict__, **kw})         # noqa: E731
    if name == "ci header magic":
        return put(blob, ci_hdr, "<I", 0xB10BB10C), entry, chunks
    if name == "ci header entries":
        return put(blob, ci_hdr + 12, "<I", 3), entry, chunks
    if name == "ci_offset in the table":
        return blob, rep(ci_offset=entry.ci_offset + 1), chunks
    if name == "ci entry out of order":                     # v1 cannot even express a misaligned offset
        u = struct.unpack_from("<Q", blob, entry.ci_offset + 16)[0]
        return put(blob, entry.ci_offset + 16, "<Q", u - 0x1000), entry, chunks
    if name == "ci entry past the data":
        c = struct.unpack_from("<Q", blob, entry.ci_offset + 24)[0]
        return put(blob, entry.ci_offset + 24, "<Q", c + 100000), entry, chunks
    if name == "chunk payload":
        return flip(blob, ci[1].compressed_offset + 100), entry, chunks
    if name == "blob.digest content":
        return flip(blob, by["blob.digest"].compressed_offset + 3), entry, chunks
    if name == "toc digest":
        return blob, rep(blob_toc_digest=bytes(31) + b"\x01"), chunks
    if name == "toc size":
        return blob, rep(blob_toc_size=entry.blob_toc_size + 128), chunks
    if name == "toc entry sha":
        off = len(blob) - len(body) + 3 * 128 + 24                    # blob.digest's sha256
        return flip(blob, off), rep(blob_toc_digest=bytes(32)), chunks
    if name == "tar header checksum":
        return flip(blob, by["blob.digest"].compressed_offset + 64 + 150), entry, chunks
    if name == "chunk table row":
        row = chunks[0]
        return blob, entry, [R.ChunkInfo(**{**row.__dict__, "compressed_offset": row.compressed_offset + 1})]
    if name == "chunk table digest":
        row = chunks[0]
        return blob, entry, [R.ChunkInfo(**{**row.__dict__, "digest": bytes(32)})]
    raise KeyError(name)


BLOB_MUTATIONS = {
    "ci header magic": "ci.header",
    "ci header entries": "ci.header",
    "ci_offset in the table": "ci.header",
    "ci entry out of order": "ci[1].order",
    "ci entry past the data": "ci[1].validate",
    "chunk payload": ("chunk[1].data", "chunk[1].digest"),     # zstd frames carry no checksum here
    "blob.digest content": "toc.blob.digest",
    "toc digest": "toc.digest",
    "toc size": "toc.size",
    "toc entry sha": "toc.blob.digest",
    "tar header checksum": "tar.chain",
    "chunk table row": "chunk_table.ci",
    "chunk table digest": "chunk_table.digest",
}


@pytest.mark.parametrize("name", list(BLOB_MUTATIONS))
def test_mutated_blob_is_flagged(name, boot22, blob22):
    p = R.parse_bootstrap(boot22)
    blob, entry, chunks = _blob_case(name, blob22, p.blobs[0], p.chunks)
    got = R.check_blob(blob, entry, chunks=chunks)
    want = BLOB_MUTATIONS[name]
    want = {want} if isinstance(want, str) else set(want)
    assert want & rules(got), f"{name}: got {got}"


def test_chunk_table_digests_are_checked_without_a_toc(boot22, blob22):
    """A blob without ToC/blob.digest (as older builders wrote them): the chunk digests come from the
    bootstrap's chunk table, and a wrong one is reported for exactly that chunk."""
    p = R.parse_bootstrap(boot22)
    entry = R.BlobEntry(**{**p.blobs[0].__dict__, "blob_toc_size": 0, "blob_toc_digest": bytes(32),
                           "features": p.blobs[0].features & ~(R.F_HAS_TOC | R.F_INLINED_CHUNK_DIGEST)})
    # without the ToC the digests come from the chunk table only
    blob = blob22[:len(blob22) - 1024]                 # ToC + its header gone
    rows = [R.ChunkInfo(**{**c.__dict__, "digest": bytes(32) if c.index == 0 else c.digest}) for c in p.chunks]
    got = R.check_blob(blob, entry, chunks=rows)
    assert "chunk[0].digest" in rules(got) and "chunk[1].digest" not in rules(got), got


def test_toc_blob_with_a_bad_inlined_bootstrap_is_flagged(toc_blob):
    toc, _ = R.read_toc(toc_blob)
    (boot,) = [e for e in toc if e.name == "image.boot"]
    bad = flip(toc_blob, boot.compressed_offset + boot.compressed_size // 2)
    with pytest.raises(R.RuleError):
        R.inlined_bootstrap(bad)


def test_reverse_tar_of_the_22_blob(blob22):
    members, why = R.reverse_tar(blob22)
    assert why is None
    assert [m.name for m in reversed(members)] == ["image.blob", "blob.meta", "blob.digest", "rafs.blob.toc"]
    assert members[-1].data_offset == 0
    assert R.tar_header_ok(bytes(512)) is not None


def test_blob_meta_file_shape(boot22, blob22):
    """<id>.blob.meta: plain ci padded to 4 KiB + the blob's ci header (what nydusd caches and what
    nydusify ships in the bootstrap layer)."""
    entry = R.parse_bootstrap(boot22).blobs[0]
    _h, _ci, plain = R.read_ci(blob22, entry)
    hdr_at = entry.ci_offset + entry.ci_compressed_size
    meta = plain + bytes(R._align(len(plain)) - len(plain)) + blob22[hdr_at:hdr_at + R.CI_HEADER]
    assert R.check_blob_meta_file(meta, entry, blob22) == []
    assert "blob_meta_file.size" in rules(R.check_blob_meta_file(meta + bytes(4096), entry))
    assert "blob_meta_file.ci" in rules(R.check_blob_meta_file(flip(meta, 3), entry, blob22))
    assert "blob_meta_file.header" in rules(R.check_blob_meta_file(put(meta, len(meta) - 4096 + 12, "<I", 9), entry))
    assert "blob_meta_file.padding" in rules(R.check_blob_meta_file(put(meta, 100, "<B", 1), entry))
