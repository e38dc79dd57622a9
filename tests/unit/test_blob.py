"""RAFS v6 data blobs as Nydus writes them: writer, ci arrays and header, ToC, reader, bad input,
and the real Nydus blobs in ../shared/fixtures/nydus."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
import struct
import sys
import types
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rafs import blob as B
from rafs.blob import (CHUNK_SIZE_DEFAULT, FLAG_COMPRESSED, BlobReader, BlobWriter, ChunkEntry,
                       ChunkNotFound, CiHeader, decode_chunk, parse_blob_meta, prepare_chunk,
                       read_blob_meta, read_toc, toc_member, validate_chunk_size)
from rafs.compress import COMPRESSORS, compress, decompress
from rafs.digest import DIGESTERS, DigesterUnavailable, digest
from rafs.errors import FormatError, IntegrityError, RafsError
from rafs.image import media

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared/fixtures/nydus"
TOC_BLOB = FIXTURES / "toc/2fa78cad554b75ac91a4a125ed148d0ddeb25efa4aaa8bd80e5dc292690a4dca"
OLD_BLOB = FIXTURES / "blobs/be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
OLD_BOOT = FIXTURES / "rafs-v6-2.2.boot"
ZRAN_META = FIXTURES / "zran/233c72f2b6b698c07021c4da367cfe2dff4f049efbaa885ca0ff760ea297865a.blob.meta"


def fixture(path: Path) -> bytes:
    if not path.exists():
        pytest.skip(f"Nydus fixture {path.name} not found: the real Nydus images live in "
                    f"{FIXTURES} (../shared/fixtures/nydus from the project root; CI has it)")
    return path.read_bytes()


def sample(size: int, seed: int = 0) -> bytes:
    """Half compressible text, half random: exercises both compressed and stored chunks."""
    rng = random.Random(seed)
    text = b"".join(b"line %d of some rather repetitive file content\n" % i
                    for i in range(size // 40 + 1))
    out = bytearray()
    while len(out) < size:
        out += text[:rng.randrange(1000, 9000)]
        out += rng.randbytes(rng.randrange(100, 6000))
    return bytes(out[:size])


def cut(data: bytes, chunk_size: int) -> list[bytes]:
    return [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)]


def build(chunks, compressor="zstd", digester="blake3", bootstrap=None):
    buf = io.BytesIO()
    w = BlobWriter(buf, compressor, digester)
    entries = [w.add_chunk(c) for c in chunks]
    summary = w.finish(bootstrap)
    return buf.getvalue(), entries, summary


def expected_view(chunks) -> bytes:
    view = bytearray()
    for c in chunks:
        view += c
        view += bytes(B.align_up(len(view)) - len(view))
    return bytes(view)


def reader(blob: bytes, info, **kw) -> BlobReader:
    return BlobReader.from_bytes(blob, info, **kw)


def at(blob: bytes):
    return lambda off, n: blob[off:off + n]


def tar_members(blob: bytes) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the reverse-tar members, walking back from the end."""
    out, end = [], len(blob)
    while end >= 512:
        parsed = B.parse_tar_header(blob[end - 512:end])
        if parsed is None:
            break
        name, size = parsed
        out.append((name, end - 512 - size, size))
        end -= 512 + size
    assert end == 0 or not out or out[-1][0] != "image.blob", "image.blob must start at 0"
    return out


# --------------------------------------------------------------------------- constants

def test_nydus_constants():
    assert B.WRITER_FEATURES == 0x7000_0021
    assert (B.FEATURE_ALIGNED, B.FEATURE_INLINED_FS_META, B.FEATURE_CHUNK_INFO_V2,
            B.FEATURE_ZRAN, B.FEATURE_SEPARATE, B.FEATURE_INLINED_CHUNK_DIGEST, B.FEATURE_TARFS,
            B.FEATURE_BATCH, B.FEATURE_ENCRYPTED) == (1, 2, 4, 8, 0x10, 0x20, 0x40, 0x80, 0x100)
    assert (B.FEATURE_HAS_TAR_HEADER, B.FEATURE_HAS_TOC, B.FEATURE_CAP_TAR_TOC) == \
        (0x1000_0000, 0x2000_0000, 0x4000_0000)
    assert B.FLAG_COMPRESSED == 1 and B.KNOWN_FLAGS == 1 and B.VIEW_ALIGN == 4096
    assert B.TOC_ENTRY_SIZE == 128 and B.CI_HEADER_SIZE == 4096
    assert B.CI_V1_SIZE == 16 and B.CI_V2_SIZE == 24
    assert media.NYDUS_BLOB == "application/vnd.oci.image.layer.nydus.blob.v1"
    for gone in ("BLOB_MAGIC", "FOOTER", "Footer", "read_footer", "parse_toc", "pack_toc",
                 "TOC_ENTRY_SIZE_OLD", "FOOTER_SIZE"):
        assert not hasattr(B, gone), gone


def test_default_chunk_size_compressor_digester():
    assert CHUNK_SIZE_DEFAULT == 1 << 20
    w = BlobWriter(io.BytesIO())
    assert (w.compressor, w.digester) == ("zstd", "blake3")
    assert BlobWriter(io.BytesIO(), compressor="lz4_block").compressor == "lz4"


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("chunk_size", [4 << 10, 64 << 10, 1 << 20])
@pytest.mark.parametrize("digester", DIGESTERS)
@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_round_trip(compressor, digester, chunk_size):
    data = sample(chunk_size * 2 + chunk_size // 3 + 17, seed=chunk_size)
    chunks = cut(data, chunk_size)
    blob, entries, s = build(chunks, compressor, digester, bootstrap=b"boot" * 3000)

    assert s.blob_id == hashlib.sha256(blob).hexdigest() and s.digest == "sha256:" + s.blob_id
    assert s.compressed_size == len(blob) and s.chunk_count == len(chunks)
    assert (s.compressor, s.digester, s.features) == (compressor, digester, B.WRITER_FEATURES)
    assert s.entries == tuple(entries) and [e.index for e in entries] == list(range(len(chunks)))
    assert s.data_size == entries[-1].compressed_end
    view = expected_view(chunks)
    assert s.uncompressed_size == len(view) and len(view) % 4096 == 0

    r = reader(blob, s)
    for e, c in zip(entries, chunks):
        assert e.digest == digest(digester, c)
        assert r.read_chunk(e) == c
        assert r.find(e.uncompressed_offset) is e and r.find(e.uncompressed_end - 1) is e
        if compressor == "none":
            assert not e.compressed
        assert e.compressed == (e.compressed_size != e.uncompressed_size)
    assert r.verify_all() == len(chunks) == r.verify_all(sha256=True)
    assert r.read_range(0, len(view)) == view
    mid = len(view) // 3
    assert r.read_range(mid, 5000) == view[mid:mid + 5000]

    # the blob describes itself: ci + blob.digest give back exactly the writer's entries
    meta = read_blob_meta(at(blob), len(blob), s)
    assert meta.entries == entries and meta.has_digests and meta.version == 1
    assert (meta.ci_compressor, meta.ci_offset, meta.ci_compressed_size) == \
        ("none", s.ci_offset, s.ci_compressed_size)
    assert toc_member(at(blob), len(blob), "image.boot") == b"boot" * 3000


@pytest.mark.parametrize("compressor", ["zstd", "lz4"])
def test_incompressible_chunk_stored_plain(compressor):
    noise = os.urandom(64 << 10)
    text = b"hello world\n" * 6000
    blob, entries, s = build([noise, text], compressor)
    assert not entries[0].compressed and entries[0].flags == 0
    assert entries[0].compressed_size == entries[0].uncompressed_size == len(noise)
    assert entries[1].compressed and entries[1].compressed_size < len(text)
    assert blob[:len(noise)] == noise                          # stored plain, in place
    r = reader(blob, s)
    assert r.read_chunk(entries[0]) == noise and r.read_chunk(entries[1]) == text


def test_lz4_chunks_are_raw_blocks():
    text = b"lz4 block, no frame " * 500
    blob, (e,), s = build([text], "lz4")
    payload = blob[e.compressed_offset:e.compressed_end]
    assert not payload.startswith(b"\x04\x22\x4d\x18")        # no LZ4 frame magic
    import lz4.block
    assert lz4.block.decompress(payload, uncompressed_size=len(text)) == text


def test_view_offsets_are_4k_aligned_and_packed():
    sizes = [1, 4095, 4096, 4097, 10000, 1]
    blob, entries, s = build([bytes([i + 1]) * n for i, n in enumerate(sizes)], "none")
    assert [e.uncompressed_offset for e in entries] == [0, 4096, 8192, 12288, 20480, 32768]
    assert s.uncompressed_size == 36864
    assert [e.compressed_offset for e in entries] == [0, 1, 4096, 8192, 12289, 22289]
    r = reader(blob, s)
    assert r.read_range(0, 4096) == b"\x01" + bytes(4095)     # padding reads as zeros
    assert [e.uncompressed_offset for e in r.chunks_for_range(4000, 4200)] == [4096, 8192]
    assert r.chunks_for_range(1, 100) == []                   # only padding
    with pytest.raises(ChunkNotFound) as ei:
        r.find(100)
    assert isinstance(ei.value, KeyError) and isinstance(ei.value, FormatError)
    assert "no chunk at uncompressed offset 100" in str(ei.value)


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_add_compressed_copy_equals_original(compressor):
    chunks = cut(sample(300_000, seed=7), 64 << 10)
    blob, entries, s = build(chunks, compressor)
    out = io.BytesIO()
    w = BlobWriter(out, compressor)
    for e in entries:
        w.add_compressed(blob[e.compressed_offset:e.compressed_end], e.uncompressed_size,
                         e.digest, e.flags, verify=True)
    assert w.finish() == s and out.getvalue() == blob


def test_prepared_chunks_from_a_thread_pool_match_serial():
    chunks = cut(sample(1 << 20, seed=3), 16 << 10)
    serial, _, s1 = build(chunks)
    out = io.BytesIO()
    w = BlobWriter(out)
    with ThreadPoolExecutor(8) as pool:
        for p in pool.map(prepare_chunk, chunks):
            w.add_prepared(p)
    assert w.finish() == s1 and out.getvalue() == serial


def test_reader_over_file_and_batched_reads(tmp_path):
    chunks = cut(sample(600_000, seed=5), 4096)
    blob, entries, s = build(chunks, "none")
    p = tmp_path / "blob"
    p.write_bytes(blob)
    with open(p, "rb") as f:
        assert BlobReader.from_file(f, s).verify_all(sha256=True) == len(chunks)
    reads = []

    def read_at(off, n):
        reads.append(n)
        return blob[off:off + n]
    r = BlobReader(read_at, len(blob), s)
    assert reads == []                                         # nothing read at construction
    assert r.verify_all(batch_bytes=64 << 10) == len(chunks)
    assert max(reads) <= 64 << 10 and len(reads) >= 600_000 // (64 << 10)
    reads.clear()
    span = entries[3:9]
    assert r.compressed_span(span) == (span[0].compressed_offset,
                                       span[-1].compressed_end - span[0].compressed_offset)
    assert r.read_chunks(span) == chunks[3:9] and len(reads) == 1


def test_subset_of_entries_like_a_chunk_dict_blob():
    chunks = [sample(20_000, seed=i) for i in range(5)]
    blob, entries, s = build(chunks)
    sub = [entries[1], entries[3]]                             # not back to back in the blob
    r = reader(blob, dataclasses.replace(s, entries=tuple(sub)))
    with pytest.raises(ValueError, match="gaps of at most 0"):
        r.compressed_span(sub)
    off, length = r.compressed_span(sub, max_gap=1 << 20)
    assert (off, off + length) == (sub[0].compressed_offset, sub[1].compressed_end)
    assert r.read_chunks(sub) == [chunks[1], chunks[3]]       # one read over the small gap
    view = expected_view(chunks)
    got = r.read_range(0, s.uncompressed_size)
    for e in sub:
        assert got[e.uncompressed_offset:e.uncompressed_end] == view[e.uncompressed_offset:
                                                                    e.uncompressed_end]
    assert got[:entries[1].uncompressed_offset] == bytes(entries[1].uncompressed_offset)
    with pytest.raises(ChunkNotFound):
        r.find(entries[0].uncompressed_offset)
    assert r.verify_all() == 2 and r.verify_all(sha256=True) == 2
    with pytest.raises(ValueError, match="blob order"):
        r.compressed_span([sub[1], sub[0]], max_gap=1 << 20)


def test_empty_blob_like_nydus_has_no_ci_and_no_digests():
    blob, entries, s = build([], bootstrap=b"x" * 5000)
    assert entries == [] and s.chunk_count == 0 and s.uncompressed_size == 0
    assert (s.ci_offset, s.ci_compressed_size, s.ci_uncompressed_size) == (0, 0, 0)
    assert s.features == B.WRITER_FEATURES & ~B.FEATURE_INLINED_CHUNK_DIGEST
    assert [t.name for t in read_toc(at(blob), len(blob))] == ["image.blob", "image.boot"]
    assert [m[0] for m in tar_members(blob)] == ["rafs.blob.toc", "image.boot", "image.blob"]
    r = reader(blob, s)
    assert r.verify_all(sha256=True) == 0 and r.chunks_for_range(0, 0) == []


# --------------------------------------------------------------------------- ci v1 encoding

@pytest.mark.parametrize("usize,csize", [(1, 1), (4096, 4096), (1 << 20, 1 << 20), ((1 << 20) + 1, 7),
                                         (16 << 20, 16 << 20), (16 << 20, (16 << 20) - 1),
                                         (0xABCDE2, 0x123457)])
def test_ci_v1_round_trip_at_limits(usize, csize):
    flags = FLAG_COMPRESSED if csize != usize else 0
    e = ChunkEntry((1 << 44) - 4096, usize, (1 << 40) - 1, csize, bytes(32), flags)
    raw = B.pack_ci_v1(e)
    assert len(raw) == 16
    assert B.unpack_ci_v1(raw, 1) == [(e.uncompressed_offset, usize, e.compressed_offset,
                                       csize, flags)]


def test_ci_v1_bit_layout():
    # sizes are stored minus one: low 20 bits at 44-63, high 4 bits at 8-11 (uncomp) / 40-43 (comp)
    e = ChunkEntry(0x1234_5000, 0xABCDE2, 0x12_3456_789A, 0x123457, bytes(32), FLAG_COMPRESSED)
    uncomp, comp = struct.unpack("<QQ", B.pack_ci_v1(e))
    assert uncomp == 0xBCDE1 << 44 | 0x1234_5000 | 0xA << 8
    assert comp == 0x23456 << 44 | 0x1 << 40 | 0x12_3456_789A
    assert uncomp & 0xFF == 0                                  # reserved bits


@pytest.mark.parametrize("bad,msg", [
    (dict(uncompressed_size=0), "uncompressed size 0"),
    (dict(uncompressed_size=(16 << 20) + 1, compressed_size=5), "outside 1"),
    (dict(compressed_size=0), "compressed size 0"),
    (dict(uncompressed_offset=100), "aligned"),
    (dict(uncompressed_offset=1 << 44), "16 TiB"),
    (dict(compressed_offset=1 << 40), "40 bits"),
    (dict(compressed_size=4096), "compressed exactly when"),     # flagged compressed, sizes equal
    (dict(flags=0), "compressed exactly when"),                  # stored, sizes differ
])
def test_ci_v1_rejects_what_it_cannot_express(bad, msg):
    e = dataclasses.replace(ChunkEntry(0, 4096, 0, 100, bytes(32), FLAG_COMPRESSED), **bad)
    with pytest.raises(ValueError, match=msg):
        B.pack_ci_v1(e)


def test_writer_enforces_ci_v1_compressed_iff_smaller():
    w = BlobWriter(io.BytesIO())
    with pytest.raises(ValueError, match="must be stored plain"):
        w.add_compressed(b"abcd", 4, bytes(32), FLAG_COMPRESSED)     # csize == usize
    assert w.chunk_count == 0


# --------------------------------------------------------------------------- ci header, ToC

def test_ci_header_fields():
    blob, entries, s = build([b"a" * 10000, os.urandom(5000), b"b" * 3000])
    ci_off = s.ci_offset
    assert ci_off == s.data_size + 512 and s.ci_compressed_size == s.ci_uncompressed_size == 48
    assert B.parse_tar_header(blob[s.data_size:ci_off]) == ("image.blob", s.data_size)
    hdr = blob[ci_off + 48:ci_off + 48 + 4096]
    magic, feat, comp, n, off, csz, usz, zoff, zsz, zcnt = struct.unpack_from("<IIIIQQQQQI", hdr)
    assert (magic, feat, comp, n, off, csz, usz) == (0xB10BB10B, 0x7000_0021, 0, 3, ci_off, 48, 48)
    assert (zoff, zsz, zcnt) == (0, 0, 0) and not any(hdr[60:4092])
    assert struct.unpack_from("<I", hdr, 4092) == (0xB10BB10B,)
    assert CiHeader.unpack(hdr) == CiHeader(0x7000_0021, "none", 3, ci_off, 48, 48)
    assert blob[ci_off:ci_off + 48] == b"".join(B.pack_ci_v1(e) for e in entries)
    assert B.parse_tar_header(blob[ci_off + 48 + 4096:ci_off + 48 + 4608]) == ("blob.meta", 48 + 4096)


def test_toc_entries_and_digests():
    boot = b"bootstrap bytes " * 2000
    blob, entries, s = build([sample(50_000, 1), sample(30_000, 2)], bootstrap=boot)
    toc = read_toc(at(blob), len(blob), toc_size=s.blob_toc_size, toc_digest=s.blob_toc_digest)
    assert [(t.name, t.flags) for t in toc] == [
        ("image.blob", 1), ("blob.meta", 1), ("blob.meta.header", 1), ("blob.digest", 1),
        ("image.boot", 2)]
    t = {x.name: x for x in toc}
    n = len(entries)
    # image.blob: sha256 of chunk data + its tar header; offset == size (Nydus's quirk)
    assert t["image.blob"].compressed_offset == t["image.blob"].compressed_size == s.data_size
    assert t["image.blob"].uncompressed_size == s.uncompressed_size
    assert t["image.blob"].sha256 == hashlib.sha256(blob[:s.data_size + 512]).digest()
    ci = blob[s.ci_offset:s.ci_offset + 16 * n]
    assert (t["blob.meta"].compressed_offset, t["blob.meta"].compressed_size,
            t["blob.meta"].sha256) == (s.ci_offset, 16 * n, hashlib.sha256(ci).digest())
    hdr_off = s.ci_offset + 16 * n
    assert t["blob.meta.header"].compressed_offset == hdr_off
    assert t["blob.meta.header"].sha256 == hashlib.sha256(blob[hdr_off:hdr_off + 4096]).digest()
    dg = t["blob.digest"]
    assert dg.compressed_offset == hdr_off + 4096 + 512
    assert blob[dg.compressed_offset:dg.compressed_offset + 32 * n] == \
        b"".join(e.digest for e in entries)
    assert dg.sha256 == hashlib.sha256(b"".join(e.digest for e in entries)).digest()
    ib = t["image.boot"]
    assert ib.uncompressed_size == len(boot) and ib.sha256 == hashlib.sha256(boot).digest()
    assert decompress("zstd", blob[ib.compressed_offset:ib.compressed_offset + ib.compressed_size],
                      len(boot)) == boot
    # the blob table's ToC size/digest: entries + their tar header, at the very end
    assert s.blob_toc_size == 5 * 128 + 512
    assert s.blob_toc_digest == hashlib.sha256(blob[-s.blob_toc_size:]).hexdigest()
    assert B.parse_tar_header(blob[-512:]) == ("rafs.blob.toc", 5 * 128)
    for name in ("image.blob", "blob.meta", "blob.meta.header", "blob.digest", "image.boot"):
        toc_member(at(blob), len(blob), name, toc)               # every member sha256-checks


def test_tar_headers_are_gnu_with_valid_checksum():
    import tarfile
    h = B.pack_tar_header("blob.digest", 96)
    info = tarfile.TarInfo.frombuf(h, "utf-8", "strict")        # checks the checksum
    assert (info.name, info.size, info.type, info.mode, info.mtime) == \
        ("blob.digest", 96, tarfile.REGTYPE, 0, 0)
    assert h[257:265] == b"ustar  \0"
    big = B.pack_tar_header("image.blob", 9 << 30)              # GNU base-256 size
    assert B.parse_tar_header(big) == ("image.blob", 9 << 30)
    assert B.parse_tar_header(h[:148] + b"0000000\0" + h[156:]) is None    # bad checksum


def test_blob_meta_file_is_the_cache_shape():
    buf = io.BytesIO()
    w = BlobWriter(buf)
    with pytest.raises(RuntimeError):
        w.blob_meta_file
    entries = [w.add_chunk(c) for c in (b"x" * 9000, b"y" * 100)]
    s = w.finish()
    f = w.blob_meta_file
    assert len(f) == 4096 + 4096 and f[-4096:] == buf.getvalue()[s.ci_offset + 32:s.ci_offset + 32 + 4096]
    m = parse_blob_meta(f, compressor="zstd", digester="blake3")
    assert [dataclasses.replace(e, digest=bytes(32)) for e in entries] == m.entries
    assert m.cache_file() == f


@pytest.mark.parametrize("ci_compressor", ["zstd", "lz4", "gzip"])
def test_parse_compressed_ci_array(ci_compressor):
    chunks = [sample(9000, i) for i in range(300)]
    blob, entries, s = build(chunks)
    ci = blob[s.ci_offset:s.ci_offset + s.ci_uncompressed_size]
    if ci_compressor == "gzip":
        co = zlib.compressobj(wbits=31)
        packed = co.compress(ci) + co.flush()
    else:
        packed = compress(ci_compressor, ci)
    assert len(packed) < len(ci)
    hdr = CiHeader(B.WRITER_FEATURES, ci_compressor, len(entries), s.ci_offset, len(packed),
                   len(ci)).pack()
    digests = b"".join(e.digest for e in entries)
    m = parse_blob_meta(packed + hdr, compressor="zstd", digester="blake3", digests=digests)
    assert m.entries == entries and m.ci_compressor == ci_compressor
    short = packed[:-5]                                  # a truncated stream cannot decode
    hdr = CiHeader(B.WRITER_FEATURES, ci_compressor, len(entries), s.ci_offset, len(short),
                   len(ci)).pack()
    with pytest.raises(IntegrityError, match="ci array"):
        parse_blob_meta(short + hdr, compressor="zstd")


# --------------------------------------------------------------------------- structure vs Nydus

def structure(blob: bytes) -> dict:
    """What must match between a Nydus blob and ours: members, ToC, relations between them."""
    members = tar_members(blob)
    toc = read_toc(at(blob), len(blob))
    t = {x.name: x for x in toc}
    by_name = {m[0]: m for m in members}
    ib, bm, bh = t["image.blob"], t["blob.meta"], t["blob.meta.header"]
    rel = {
        "image.blob at 0, offset == size": by_name["image.blob"][1] == 0
        and ib.compressed_offset == ib.compressed_size == by_name["image.blob"][2],
        "image.blob sha256 = data + tar header":
            ib.sha256 == hashlib.sha256(blob[:ib.compressed_size + 512]).digest(),
        "ci right after image.blob header": bm.compressed_offset == ib.compressed_size + 512,
        "ci header right after ci": bh.compressed_offset == bm.compressed_offset + bm.compressed_size,
        "blob.meta tar covers ci + header": by_name["blob.meta"][1:] == (
            bm.compressed_offset, bm.compressed_size + 4096),
        "ToC entries follow their tar members": all(
            by_name[x.name][1:] == (x.compressed_offset, x.compressed_size)
            for x in toc if x.name in ("blob.digest", "image.boot")),
        "reserved ToC word 0": all(struct.unpack_from("<I", blob, len(blob) - 512 - 128 * len(toc)
                                                      + 128 * i + 4) == (0,)
                                   for i in range(len(toc))),
    }
    return {"members": [m[0] for m in members], "toc": [(x.name, x.flags) for x in toc],
            "relations": rel}


def test_writer_lays_out_members_like_nydus():
    old = fixture(OLD_BLOB)                    # blob-toc, no inlined bootstrap (2.2 builder)
    with_boot = fixture(TOC_BLOB)              # blob-toc + inlined image.boot, no blob.digest
    ours, _, _ = build([sample(40_000, 1), os.urandom(9000)])
    ours_boot, _, _ = build([sample(40_000, 1)], bootstrap=bytes(20480))
    want_old, got = structure(old), structure(ours)
    assert got == want_old
    assert all(got["relations"].values()), got["relations"]
    # with image.boot: the fixture's builder predates blob.digest; otherwise the same order
    want_boot, got_boot = structure(with_boot), structure(ours_boot)
    assert [m for m in got_boot["members"] if m != "blob.digest"] == want_boot["members"]
    assert [x for x in got_boot["toc"] if x[0] != "blob.digest"] == want_boot["toc"]
    assert got_boot["relations"] == want_boot["relations"]
    assert all(got_boot["relations"].values()), got_boot["relations"]


def test_tar_headers_and_ci_header_byte_exact_with_nydus():
    old = fixture(OLD_BLOB)
    for name, data_off, size in tar_members(old):
        end = data_off + size
        assert B.pack_tar_header(name, size) == old[end:end + 512], name
    hdr = old[8346:8346 + 4096]
    h = CiHeader.unpack(hdr)
    assert h == CiHeader(0x7000_0021, "none", 2, 8314, 32, 32)
    assert h.pack() == hdr
    # ci entries re-encode byte for byte
    assert b"".join(B.pack_ci_v1(ChunkEntry(u, us, c, cs, bytes(32), f))
                    for u, us, c, cs, f in B.unpack_ci_v1(old[8314:8346], 2)) == old[8314:8346]


# --------------------------------------------------------------------------- fixtures

def boot_tables(boot: bytes):
    """Blob table and chunk table of a RAFS v6 bootstrap, parsed independently of rafs.bootstrap."""
    flags, bt_off, bt_size, chunk_size, ct_off, ct_size = struct.unpack_from("<QQIIQQ", boot, 1152)
    blobs = []
    names = {0: "none", 1: "lz4", 2: "gzip", 3: "zstd"}
    for i in range(bt_size // 256):
        e = boot[bt_off + 256 * i:bt_off + 256 * (i + 1)]
        (idx, csz, count, calgo, dalgo, feat, comp, uncomp, toc_size, cicomp, cioff, cicsz,
         ciusz) = struct.unpack_from("<IIIIIIQQIIQQQ", e, 64)
        blobs.append(types.SimpleNamespace(
            blob_id=e[:64].decode(), chunk_count=count, compressor=names[calgo],
            digester=("blake3", "sha256")[dalgo], features=feat, compressed_size=comp,
            uncompressed_size=uncomp, blob_toc_size=toc_size, ci_compressor=names[cicomp],
            ci_offset=cioff, ci_compressed_size=cicsz, ci_uncompressed_size=ciusz,
            blob_toc_digest=e[136:168].hex(), entries=[]))
    for i in range(ct_size // 80):
        dig, bi, fl, csz, usz, coff, uoff, _foff, index, _crc = struct.unpack_from(
            "<32sIIIIQQQII", boot, ct_off + 80 * i)
        blobs[bi].entries.append(ChunkEntry(uoff, usz, coff, csz, dig, fl & 1, index))
    for b in blobs:
        b.entries.sort(key=lambda e: e.uncompressed_offset)
    return blobs


def test_fixture_blob_with_toc_and_digests():
    blob = fixture(OLD_BLOB)
    (info,) = boot_tables(fixture(OLD_BOOT))
    assert info.blob_id == OLD_BLOB.name and hashlib.sha256(blob).hexdigest() != info.blob_id
    assert (info.features, info.blob_toc_size, info.ci_offset) == (0x7000_0021, 1024, 8314)
    # the blob table's ToC digest is sha256(ToC entries + their tar header)
    assert info.blob_toc_digest == hashlib.sha256(blob[-info.blob_toc_size:]).hexdigest()
    toc = read_toc(at(blob), len(blob), toc_size=info.blob_toc_size,
                   toc_digest=info.blob_toc_digest)
    assert [t.name for t in toc] == ["image.blob", "blob.meta", "blob.meta.header", "blob.digest"]
    meta = read_blob_meta(at(blob), len(blob), info)
    assert meta.has_digests and meta.version == 1 and meta.features == 0x7000_0021
    # blob.digest (ci order) agrees with the bootstrap's chunk table
    assert sorted(meta.entries, key=lambda e: e.index) == sorted(info.entries, key=lambda e: e.index)
    r = reader(blob, info)
    assert r.verify_all() == 2
    with pytest.raises(IntegrityError, match="sha256 is"):
        r.verify_all(sha256=True)                        # Nydus blob ids are not sha256(blob)
    view = r.read_range(0, info.uncompressed_size)
    for e in info.entries:
        assert digest("blake3", view[e.uncompressed_offset:e.uncompressed_end]) == e.digest


def test_fixture_blob_with_inlined_bootstrap():
    blob = fixture(TOC_BLOB)
    assert hashlib.sha256(blob).hexdigest() == TOC_BLOB.name
    toc = read_toc(at(blob), len(blob))
    assert [(t.name, t.flags) for t in toc] == [("image.blob", 1), ("blob.meta", 1),
                                                ("blob.meta.header", 1), ("image.boot", 2)]
    boot = toc_member(at(blob), len(blob), "image.boot", toc)
    assert len(boot) == 20480 and struct.unpack_from("<I", boot, 1024) == (0xE0F5E1E2,)
    (info,) = boot_tables(boot)
    assert info.chunk_count == 3 and info.features == 0x1 and info.blob_toc_size == 0
    meta = read_blob_meta(at(blob), len(blob), info)     # ci located by the blob table
    assert not meta.has_digests and meta.features == 0x1
    assert [dataclasses.replace(e, digest=bytes(32)) for e in sorted(info.entries, key=lambda e: e.index)] \
        == meta.entries
    r = reader(blob, info)
    assert r.verify_all() == 3
    assert sum(len(r.read_chunk(e)) for e in info.entries) == 2816 + 678 + 3115


def test_fixture_old_layout_without_toc():
    """Before blob-toc: chunks | ci | header. The ci is found through the blob table."""
    blob = fixture(OLD_BLOB)[:8346 + 4096]
    (info,) = boot_tables(fixture(OLD_BOOT))
    info.features, info.blob_toc_size, info.blob_toc_digest = 0x1, 0, "0" * 64
    with pytest.raises(FormatError, match="no ToC"):
        read_toc(at(blob), len(blob))
    meta = read_blob_meta(at(blob), len(blob), info)
    assert not meta.has_digests and len(meta.entries) == 2
    assert reader(blob, info).verify_all() == 2


def test_fixture_zran_v2_ci_is_refused_clearly():
    data = fixture(ZRAN_META)
    h = CiHeader.unpack(data[-4096:])
    assert h.features & B.FEATURE_ZRAN and h.features & B.FEATURE_CHUNK_INFO_V2
    raw = B.unpack_ci_v2(data, h.ci_entries)
    assert len(raw) == 163 and all(r[4] & B.CI_V2_ZRAN for r in raw)
    assert [r[0] for r in raw] == sorted(r[0] for r in raw)
    assert all(r[0] % 4096 == 0 and r[1] > 0 for r in raw)
    with pytest.raises(FormatError, match="not supported: zran"):
        parse_blob_meta(data, compressor="gzip")


def test_v2_ci_without_zran_is_read():
    entries = [ChunkEntry(0, 5000, 0, 300, bytes(32), FLAG_COMPRESSED, 0),
               ChunkEntry(8192, 100, 300, 100, bytes(32), 0, 1)]
    ci = b"".join(struct.pack("<QQQ", e.uncompressed_offset >> 12 | (e.uncompressed_size - 1) << 32
                              | (0x10 | e.flags) << 56, e.compressed_offset | e.compressed_size << 40,
                              0xDEADBEEF) for e in entries)
    feat = B.FEATURE_ALIGNED | B.FEATURE_CHUNK_INFO_V2
    m = parse_blob_meta(ci + CiHeader(feat, "none", 2, 400, 48, 48).pack(), compressor="zstd")
    assert m.version == 2 and m.entries == entries
    bad = bytearray(ci)
    bad[7] |= B.CI_V2_BATCH
    with pytest.raises(FormatError, match="not supported: batch"):
        parse_blob_meta(bytes(bad) + CiHeader(feat, "none", 2, 400, 48, 48).pack(), compressor="zstd")


@pytest.mark.parametrize("feature,name", [(B.FEATURE_BATCH, "batch"), (B.FEATURE_ENCRYPTED, "encrypted"),
                                          (B.FEATURE_TARFS, "tarfs")])
def test_unsupported_blob_features(feature, name):
    blob, entries, s = build([b"a" * 5000])
    meta = blob[s.ci_offset:s.ci_offset + 16 + 4096]
    hdr = CiHeader.unpack(meta[16:])
    patched = meta[:16] + dataclasses.replace(hdr, features=hdr.features | feature).pack()
    with pytest.raises(FormatError, match=f"not supported: {name}"):
        parse_blob_meta(patched, compressor="zstd")


def test_gzip_chunks_are_read():
    plain = sample(20_000, 9)
    co = zlib.compressobj(wbits=31)
    payload = co.compress(plain) + co.flush()
    e = ChunkEntry(0, len(plain), 0, len(payload), digest("sha256", plain), FLAG_COMPRESSED, 0)
    assert decode_chunk(e, payload, "gzip", "sha256") == plain
    with pytest.raises(IntegrityError):
        decode_chunk(e, payload[:-8] + bytes(8), "gzip", "sha256")


# --------------------------------------------------------------------------- tampering

@pytest.fixture
def good():
    chunks = [b"A" * 8192, os.urandom(8192), b"C" * 8192]     # compressed, stored, compressed
    blob, entries, s = build(chunks, bootstrap=b"boot" * 100)
    assert [e.compressed for e in entries] == [True, False, True]
    return blob, entries, s, chunks


@pytest.mark.parametrize("index", [0, 1, 2])
def test_tampered_chunk_byte(good, index):
    blob, entries, s, chunks = good
    e = entries[index]
    bad = bytearray(blob)
    bad[e.compressed_offset + e.compressed_size // 2] ^= 0x40
    r = reader(bytes(bad), s)
    with pytest.raises(IntegrityError, match=f"blob {s.blob_id}: chunk #{index} ") as ei:
        r.read_chunk(e)
    assert "fetch it again" in str(ei.value)
    with pytest.raises(IntegrityError, match=f"chunk #{index} "):
        r.verify_all()
    with pytest.raises(IntegrityError):
        r.read_range(0, s.uncompressed_size)
    for j in set(range(3)) - {index}:                          # the others are still served
        assert r.read_chunk(entries[j]) == chunks[j]


def test_decode_chunk_is_the_check(good):
    blob, entries, s, chunks = good
    e = entries[0]
    payload = blob[e.compressed_offset:e.compressed_end]
    assert decode_chunk(e, payload, "zstd", "blake3") == chunks[0]
    wrong = dataclasses.replace(e, digest=entries[2].digest)
    with pytest.raises(IntegrityError, match=r"chunk #0 .*failed its blake3 check"):
        decode_chunk(wrong, payload, "zstd", "blake3", name="blob X")
    with pytest.raises(IntegrityError, match="blob X: chunk #0"):
        decode_chunk(wrong, payload, "zstd", "blake3", name="blob X")
    with pytest.raises(IntegrityError, match="payload bytes"):
        decode_chunk(e, payload[:-1], "zstd", "blake3")
    with pytest.raises(IntegrityError, match="8192.*expected 8000"):
        decode_chunk(dataclasses.replace(e, uncompressed_size=8000), payload, "zstd", "blake3")
    stored = entries[1]
    with pytest.raises(IntegrityError, match="failed its sha256 check"):
        decode_chunk(stored, blob[stored.compressed_offset:stored.compressed_end], "none", "sha256")


def test_tampered_toc_ci_header_and_digests(good):
    blob, entries, s, _ = good
    # ToC byte: the blob table's ToC digest catches it
    bad = bytearray(blob)
    bad[-512 - 128 * 5 + 30] ^= 1
    with pytest.raises(IntegrityError, match="ToC hashes to"):
        read_toc(at(bytes(bad)), len(bad), toc_digest=s.blob_toc_digest)
    read_toc(at(bytes(bad)), len(bad))                         # self-consistent without it
    # a reserved byte of the ci header: the ToC's sha256 catches it
    bad = bytearray(blob)
    bad[s.ci_offset + 48 + 2000] ^= 1
    with pytest.raises(IntegrityError, match="blob.meta.header"):
        read_blob_meta(at(bytes(bad)), len(bad), s)
    # blob.digest
    toc = {t.name: t for t in read_toc(at(blob), len(blob))}
    bad = bytearray(blob)
    bad[toc["blob.digest"].compressed_offset + 3] ^= 1
    with pytest.raises(IntegrityError, match="blob.digest"):
        read_blob_meta(at(bytes(bad)), len(bad), s)
    # image.boot
    bad = bytearray(blob)
    bad[toc["image.boot"].compressed_offset + toc["image.boot"].compressed_size - 2] ^= 1
    with pytest.raises(IntegrityError):
        toc_member(at(bytes(bad)), len(bad), "image.boot")


def test_ci_header_disagreeing_with_the_blob_table(good):
    blob, entries, s, _ = good
    for field, value in [("chunk_count", 4), ("ci_uncompressed_size", 64), ("ci_compressor", "zstd")]:
        with pytest.raises(IntegrityError, match="blob table"):     # the blob disagrees with the bootstrap
            read_blob_meta(at(blob), len(blob), dataclasses.replace(s, **{field: value}))
    with pytest.raises(FormatError, match="magic"):
        read_blob_meta(at(blob), len(blob), dataclasses.replace(s, ci_offset=s.ci_offset - 16))


@pytest.mark.parametrize("keep", [0, 10, 511, 5000, -1, -512, -700])
def test_truncated_blob(good, keep):
    blob, entries, s, _ = good
    cut_blob = blob[:keep]
    with pytest.raises(FormatError):
        read_toc(at(cut_blob), len(cut_blob))
    with pytest.raises(FormatError):
        read_blob_meta(at(cut_blob), len(cut_blob), s)
    if len(cut_blob) < entries[-1].compressed_end:
        with pytest.raises(FormatError, match="truncated"):
            reader(cut_blob, s)


def test_short_reads_from_backend(good):
    blob, entries, s, _ = good
    r = BlobReader(at(blob[:entries[1].compressed_offset]), len(blob), s)
    with pytest.raises(FormatError, match="short read"):
        r.read_chunk(entries[2])
    with pytest.raises(FormatError, match="short read"):
        read_toc(at(blob[:-100]), len(blob))


def test_trailing_bytes_hide_the_toc(good):
    blob, *_ = good
    with pytest.raises(FormatError, match="no ToC|appended"):
        read_toc(at(blob + bytes(512)), len(blob) + 512)


def test_bad_toc_entries(good):
    blob, entries, s, _ = good
    start = len(blob) - 512 - 5 * 128
    bad = bytearray(blob)
    bad[start + 128 * 4:start + 128 * 4 + 4] = struct.pack("<I", 0x8)        # unknown compressor
    with pytest.raises(FormatError, match="unknown compression"):
        read_toc(at(bytes(bad)), len(bad))
    bad = bytearray(blob)
    struct.pack_into("<Q", bad, start + 128 * 3 + 56, len(blob))               # past the end
    with pytest.raises(FormatError, match="runs past"):
        read_toc(at(bytes(bad)), len(bad))
    with pytest.raises(IntegrityError, match="blob table says"):
        read_toc(at(blob), len(blob), toc_size=s.blob_toc_size + 128)
    with pytest.raises(FormatError, match="no 'nope' member"):
        toc_member(at(blob), len(blob), "nope")


def test_reader_rejects_entries_that_do_not_fit(good):
    blob, entries, s, _ = good
    with pytest.raises(FormatError, match="overlaps"):
        reader(blob, dataclasses.replace(s, entries=(entries[0], dataclasses.replace(
            entries[1], uncompressed_offset=4096))))
    with pytest.raises(FormatError, match="view size"):
        reader(blob, dataclasses.replace(s, uncompressed_size=8192))


def test_range_and_span_misuse(good):
    blob, entries, s, _ = good
    r = reader(blob, s)
    with pytest.raises(FormatError, match="past the end of the uncompressed view"):
        r.chunks_for_range(s.uncompressed_size - 10, 20)
    with pytest.raises(ChunkNotFound, match="no chunk at uncompressed offset"):
        r.find(s.uncompressed_size)
    with pytest.raises(ValueError, match="gaps of at most 0"):
        r.compressed_span([entries[0], entries[2]])
    with pytest.raises(ValueError):
        r.compressed_span([])
    with pytest.raises(ValueError):
        r.chunks_for_range(-1, 5)


def test_blob_id_mismatch_caught_by_verify_all(good):
    blob, entries, s, _ = good
    r = reader(blob, dataclasses.replace(s, blob_id="0" * 64))
    assert r.verify_all() == 3
    with pytest.raises(IntegrityError, match="sha256"):
        r.verify_all(sha256=True)


def test_blob_info_from_summary_if_available(good):
    from rafs import bootstrap
    if not hasattr(getattr(bootstrap, "BlobInfo", None), "from_summary"):
        pytest.skip("rafs.bootstrap.BlobInfo.from_summary not there yet")
    blob, entries, s, chunks = good
    info = bootstrap.BlobInfo.from_summary(s, CHUNK_SIZE_DEFAULT)
    r = reader(blob, info)
    assert [r.read_chunk(e) for e in entries] == chunks
    assert read_blob_meta(at(blob), len(blob), info).entries == entries


# --------------------------------------------------------------------------- chunk size, misuse

@pytest.mark.parametrize("n", [4096, 8192, 65536, 1 << 20, 16 << 20])
def test_validate_chunk_size_ok(n):
    assert validate_chunk_size(n) == n


def test_validate_chunk_size_strings():
    assert validate_chunk_size("0x100000") == 1 << 20
    assert validate_chunk_size("1M") == 1 << 20
    assert validate_chunk_size("64KiB") == 64 << 10
    assert validate_chunk_size("4096") == 4096


@pytest.mark.parametrize("n", [0, 2048, 4095, 5000, 3 << 20, 32 << 20, -4096, True, 4096.0, "1G", "big"])
def test_validate_chunk_size_bad(n):
    with pytest.raises(ValueError, match="power of two between 4 KiB and 16 MiB"):
        validate_chunk_size(n)


def test_unknown_names():
    with pytest.raises(ValueError, match="choose one of"):
        BlobWriter(io.BytesIO(), compressor="brotli")
    with pytest.raises(ValueError, match="choose one of"):
        BlobWriter(io.BytesIO(), compressor="gzip")             # read only
    with pytest.raises(ValueError, match="choose one of"):
        BlobWriter(io.BytesIO(), digester="md5")


def test_blake3_missing_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "blake3", None)             # makes `import blake3` fail
    with pytest.raises(DigesterUnavailable, match="pip install blake3") as ei:
        BlobWriter(io.BytesIO()).add_chunk(b"abc")
    assert isinstance(ei.value, RafsError) and isinstance(ei.value, ImportError)


def test_writer_rejects_bad_chunks():
    w = BlobWriter(io.BytesIO(), digester="sha256")
    with pytest.raises(ValueError, match="empty files have no chunks"):
        w.add_chunk(b"")
    with pytest.raises(ValueError, match="digest is 32 bytes"):
        w.add_chunk(b"x", digest=b"short")
    with pytest.raises(ValueError, match="stored"):
        w.add_compressed(b"abc", 4, bytes(32), 0)
    with pytest.raises(ValueError, match="unknown chunk flags"):
        w.add_compressed(b"abc", 3, bytes(32), 0x10)
    with pytest.raises(ValueError, match="must be stored plain"):
        w.add_compressed(b"abcd", 3, bytes(32), FLAG_COMPRESSED)
    with pytest.raises(IntegrityError, match="failed its sha256 check"):
        w.add_compressed(b"abc", 3, bytes(32), 0, verify=True)
    assert w.chunk_count == 0                                     # nothing half-written
    with pytest.raises(ValueError, match="compressor is 'none'"):
        BlobWriter(io.BytesIO(), "none").add_compressed(b"ab", 3, bytes(32), FLAG_COMPRESSED)
    w.finish()
    with pytest.raises(RuntimeError, match="already called"):
        w.add_chunk(b"x")
    with pytest.raises(RuntimeError, match="already called"):
        w.finish()
