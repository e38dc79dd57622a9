"""RAFS blob format: compressors, digesters, writer, TOC/footer parsing, reader, bad input."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from rafs import blob as B
from rafs.blob import (CHUNK_SIZE_DEFAULT, FLAG_COMPRESSED, FOOTER_SIZE, TOC_ENTRY_SIZE,
                       BlobReader, BlobWriter, ChunkEntry, ChunkNotFound, Footer, pack_toc,
                       parse_toc, prepare_chunk, read_footer, validate_chunk_size)
from rafs.compress import COMPRESSORS, compress, decompress
from rafs.digest import DIGESTERS, DigesterUnavailable, blake3_available, digest
from rafs.errors import FormatError, IntegrityError, RafsError

needs_blake3 = pytest.mark.skipif(not blake3_available(), reason="blake3 package not installed")


def digester_param(name):
    return pytest.param(name, marks=needs_blake3) if name == "blake3" else name


ALL_DIGESTERS = [digester_param(d) for d in DIGESTERS]


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


def build(chunks, compressor="zstd", digester="sha256"):
    buf = io.BytesIO()
    w = BlobWriter(buf, compressor, digester)
    entries = [w.add_chunk(c) for c in chunks]
    summary = w.finish()
    return buf.getvalue(), entries, summary


def expected_view(chunks) -> bytes:
    view = bytearray()
    for c in chunks:
        view += c
        view += bytes(B.align_up(len(view)) - len(view))
    return bytes(view)


def relie(blob: bytes, mutate) -> bytes:
    """Rewrite the TOC with mutate(entries) and fix up the footer so the TOC digest matches."""
    footer = read_footer(blob)
    entries = parse_toc(blob[footer.toc_offset:footer.toc_offset + footer.toc_size], footer)
    new = mutate(list(entries))
    toc = pack_toc(new)
    f2 = dataclasses.replace(footer, toc_digest=hashlib.sha256(toc).digest(),
                             chunk_count=len(new), toc_size=len(toc))
    return blob[:footer.toc_offset] + toc + f2.pack()


# --------------------------------------------------------------------------- layout constants

def test_struct_sizes():
    assert TOC_ENTRY_SIZE == 64
    assert FOOTER_SIZE == 128
    assert B.BLOB_MAGIC == b"RAFSBLOB"


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("chunk_size", [4 << 10, 64 << 10, 1 << 20])
@pytest.mark.parametrize("digester", ALL_DIGESTERS)
@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_round_trip(compressor, digester, chunk_size):
    data = sample(chunk_size * 2 + chunk_size // 3 + 17, seed=chunk_size)
    chunks = cut(data, chunk_size)
    blob, entries, s = build(chunks, compressor, digester)

    assert s.blob_id == hashlib.sha256(blob).hexdigest()
    assert s.digest == "sha256:" + s.blob_id
    assert s.compressed_size == len(blob)
    assert s.chunk_count == len(chunks)
    assert s.toc_size == len(chunks) * TOC_ENTRY_SIZE
    assert s.toc_offset + s.toc_size + FOOTER_SIZE == len(blob)
    assert s.toc_digest == hashlib.sha256(blob[s.toc_offset:s.toc_offset + s.toc_size]).hexdigest()
    assert (s.compressor, s.digester) == (compressor, digester)
    view = expected_view(chunks)
    assert s.uncompressed_size == len(view) and len(view) % 4096 == 0

    r = BlobReader.from_bytes(blob, toc_digest=s.toc_digest, blob_id=s.blob_id)
    assert r.toc == entries
    assert r.footer.compressor == compressor and r.footer.digester == digester
    for e, c in zip(r.toc, chunks):
        assert e.digest == digest(digester, c)
        assert r.read_chunk(e) == c
        assert r.find(e.uncompressed_offset) is e
        assert r.find(e.uncompressed_end - 1) is e
        if compressor == "none":
            assert not e.compressed
    assert r.verify_all() == len(chunks)
    assert r.read_range(0, len(view)) == view
    mid = len(view) // 3
    assert r.read_range(mid, 5000) == view[mid:mid + 5000]


def test_default_chunk_size_and_compressor():
    assert CHUNK_SIZE_DEFAULT == 1 << 20
    w = BlobWriter(io.BytesIO())
    assert (w.compressor, w.digester) == ("zstd", "sha256")


@pytest.mark.parametrize("compressor", ["zstd", "lz4"])
def test_incompressible_chunk_stored_plain(compressor):
    noise = os.urandom(64 << 10)
    text = b"hello world\n" * 6000
    blob, entries, _ = build([noise, text], compressor)
    assert not entries[0].compressed and entries[0].flags & FLAG_COMPRESSED == 0
    assert entries[0].compressed_size == entries[0].uncompressed_size == len(noise)
    assert entries[1].compressed and entries[1].compressed_size < len(text)
    # the stored chunk is the plain bytes, in place
    assert blob[:len(noise)] == noise
    r = BlobReader.from_bytes(blob)
    assert r.read_chunk(r.toc[0]) == noise and r.read_chunk(r.toc[1]) == text


def test_empty_blob():
    blob, entries, s = build([])
    assert entries == [] and s.chunk_count == 0 and s.uncompressed_size == 0
    assert len(blob) == FOOTER_SIZE == s.compressed_size
    assert s.toc_digest == hashlib.sha256(b"").hexdigest()
    r = BlobReader.from_bytes(blob, toc_digest=s.toc_digest, blob_id=s.blob_id)
    assert r.toc == [] and r.uncompressed_size == 0
    assert r.verify_all() == 0
    assert r.chunks_for_range(0, 0) == []
    with pytest.raises(ChunkNotFound):
        r.find(0)


def test_view_offsets_are_4k_aligned_and_packed():
    sizes = [1, 4095, 4096, 4097, 10000, 1]
    blob, entries, s = build([bytes([i + 1]) * n for i, n in enumerate(sizes)], "none")
    assert [e.uncompressed_offset for e in entries] == [0, 4096, 8192, 12288, 20480, 32768]
    assert all(e.uncompressed_offset % 4096 == 0 for e in entries)
    assert s.uncompressed_size == 36864
    # compressed data is back to back, no padding
    assert [e.compressed_offset for e in entries] == [0, 1, 4096, 8192, 12289, 22289]
    r = BlobReader.from_bytes(blob)
    assert r.read_range(0, 4096) == b"\x01" + bytes(4095)        # padding reads as zeros
    assert [e.uncompressed_offset for e in r.chunks_for_range(4000, 4200)] == [4096, 8192]
    assert r.chunks_for_range(1, 100) == []                       # only padding
    with pytest.raises(ChunkNotFound) as ei:
        r.find(100)                                               # padding after chunk 0
    assert isinstance(ei.value, KeyError) and isinstance(ei.value, FormatError)
    assert str(ei.value).startswith("blob: no chunk at uncompressed offset 100")


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_add_compressed_copy_equals_original(compressor):
    chunks = cut(sample(300_000, seed=7), 64 << 10)
    blob, _, s = build(chunks, compressor)
    src = BlobReader.from_bytes(blob)
    out = io.BytesIO()
    w = BlobWriter(out, compressor)
    for e in src.toc:
        payload = blob[e.compressed_offset:e.compressed_end]
        w.add_compressed(payload, e.uncompressed_size, e.digest, e.flags, verify=True)
    s2 = w.finish()
    assert out.getvalue() == blob and s2 == s


def test_prepared_chunks_from_a_thread_pool_match_serial():
    chunks = cut(sample(1 << 20, seed=3), 16 << 10)
    serial, _, s1 = build(chunks)
    out = io.BytesIO()
    w = BlobWriter(out)
    with ThreadPoolExecutor(8) as pool:
        for p in pool.map(prepare_chunk, chunks):
            w.add_prepared(p)
    assert w.finish() == s1 and out.getvalue() == serial


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_compress_thread_safe(compressor):
    chunks = cut(sample(2 << 20, seed=11), 32 << 10)
    with ThreadPoolExecutor(8) as pool:
        packed = list(pool.map(lambda c: compress(compressor, c), chunks))
        plain = list(pool.map(lambda pc: decompress(compressor, pc[0], len(pc[1])),
                              zip(packed, chunks)))
    assert plain == chunks
    assert packed == [compress(compressor, c) for c in chunks]


def test_reader_over_file_and_batched_reads(tmp_path):
    chunks = cut(sample(600_000, seed=5), 4096)
    blob, _, s = build(chunks, "none")
    p = tmp_path / "blob"
    p.write_bytes(blob)
    with open(p, "rb") as f:
        r = BlobReader.from_file(f, toc_digest="sha256:" + s.toc_digest, blob_id=s.blob_id)
        assert r.verify_all() == len(chunks)
    reads = []

    def read_at(off, n):
        reads.append(n)
        return blob[off:off + n]
    r = BlobReader(read_at, len(blob), toc_digest=s.toc_digest, blob_id=s.blob_id)
    assert len(reads) == 1                                        # footer + TOC: one read
    reads.clear()
    assert r.verify_all(batch_bytes=64 << 10) == len(chunks)
    assert max(reads) <= 64 << 10 and len(reads) >= 600_000 // (64 << 10)
    # merged range request for adjacent entries
    reads.clear()
    span = r.toc[3:9]
    assert r.compressed_span(span) == (span[0].compressed_offset,
                                       span[-1].compressed_end - span[0].compressed_offset)
    assert r.read_chunks(span) == chunks[3:9] and len(reads) == 1


def test_large_toc_needs_second_read():
    chunks = [bytes([i % 251]) * 10 for i in range(2000)]         # TOC 128000 bytes > 64 KiB hint
    blob, _, s = build(chunks, "none")
    reads = []

    def read_at(off, n):
        reads.append((off, n))
        return blob[off:off + n]
    r = BlobReader(read_at, len(blob), toc_digest=s.toc_digest)
    assert len(r.toc) == 2000 and len(reads) == 2
    assert r.read_chunk(r.toc[1999]) == chunks[1999]


# --------------------------------------------------------------------------- chunk size

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


# --------------------------------------------------------------------------- compressors / digesters

@pytest.mark.parametrize("compressor", ["zstd", "lz4"])
def test_decompress_rejects_garbage_and_wrong_size(compressor):
    data = b"some data " * 1000
    packed = compress(compressor, data)
    assert decompress(compressor, packed, len(data)) == data
    for bad, why in [(b"definitely not compressed", "garbage"),
                     (packed[:-3], "truncated"),
                     (packed + b"junk", "trailing bytes")]:
        with pytest.raises(IntegrityError):
            decompress(compressor, bad, len(data))
    with pytest.raises(IntegrityError, match=str(len(data) + 1)):
        decompress(compressor, packed, len(data) + 1)
    with pytest.raises(IntegrityError):
        decompress(compressor, packed, len(data) - 1)


def test_decompress_none_checks_size():
    assert decompress("none", b"abc", 3) == b"abc"
    with pytest.raises(IntegrityError, match="expected 4"):
        decompress("none", b"abc", 4)


def test_unknown_names():
    with pytest.raises(ValueError, match="choose one of: zstd, lz4, none"):
        compress("gzip", b"x")
    with pytest.raises(ValueError, match="choose one of: sha256, blake3"):
        digest("md5", b"x")
    with pytest.raises(ValueError):
        BlobWriter(io.BytesIO(), compressor="brotli")


def test_digests():
    assert digest("sha256", b"abc") == hashlib.sha256(b"abc").digest()
    if blake3_available():
        d = digest("blake3", b"abc")
        assert len(d) == 32 and d != digest("sha256", b"abc")


def test_blake3_missing_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "blake3", None)             # makes `import blake3` fail
    with pytest.raises(DigesterUnavailable, match="pip install blake3") as ei:
        digest("blake3", b"abc")
    assert isinstance(ei.value, RafsError) and isinstance(ei.value, ImportError)
    with pytest.raises(DigesterUnavailable):
        BlobWriter(io.BytesIO(), digester="blake3").add_chunk(b"abc")


# --------------------------------------------------------------------------- writer misuse

def test_writer_rejects_bad_chunks():
    w = BlobWriter(io.BytesIO())
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
    with pytest.raises(IntegrityError, match="does not match its sha256 digest"):
        w.add_compressed(b"abc", 3, bytes(32), 0, verify=True)
    assert w.chunk_count == 0                                     # nothing half-written
    w.finish()
    with pytest.raises(RuntimeError, match="already called"):
        w.add_chunk(b"x")


# --------------------------------------------------------------------------- bad blobs

@pytest.fixture
def good():
    chunks = [b"A" * 8192, os.urandom(8192), b"C" * 8192]       # compressed, stored, compressed
    blob, entries, s = build(chunks)
    assert [e.compressed for e in entries] == [True, False, True]
    return blob, entries, s, chunks


def test_wrong_footer_magic(good):
    blob, *_ = good
    bad = blob[:-FOOTER_SIZE] + b"NOTABLOB" + blob[-FOOTER_SIZE + 8:]
    with pytest.raises(FormatError, match="magic"):
        BlobReader.from_bytes(bad)
    with pytest.raises(FormatError, match="not a RAFS blob"):
        BlobReader.from_bytes(b"\x1f\x8b" + bytes(500))           # e.g. a gzip layer


def test_unsupported_version(good):
    blob, *_ = good
    f = bytearray(blob[-FOOTER_SIZE:])
    f[8:12] = (99).to_bytes(4, "little")
    with pytest.raises(FormatError, match="version 99 is not supported"):
        BlobReader.from_bytes(blob[:-FOOTER_SIZE] + bytes(f))


@pytest.mark.parametrize("keep", [0, 10, FOOTER_SIZE - 1, FOOTER_SIZE, -1, -FOOTER_SIZE])
def test_truncated_blob(good, keep):
    blob, *_ = good
    with pytest.raises(FormatError, match="truncated"):
        BlobReader.from_bytes(blob[:keep])


def test_trailing_bytes(good):
    blob, *_ = good
    with pytest.raises(FormatError, match="appended|trailing"):
        BlobReader.from_bytes(blob + bytes(FOOTER_SIZE) + blob[-FOOTER_SIZE:])


def test_short_reads_from_backend(good):
    blob, *_ = good
    with pytest.raises(FormatError, match="short read"):
        BlobReader(lambda off, n: blob[off:off + n], len(blob) + 100)


def test_flipped_toc_byte(good):
    blob, entries, s, _ = good
    bad = bytearray(blob)
    bad[s.toc_offset + 70] ^= 0x01
    with pytest.raises(IntegrityError, match="TOC"):
        BlobReader.from_bytes(bytes(bad))


def test_footer_toc_digest_not_trusted(good):
    blob, entries, s, _ = good
    # a self-consistent blob whose TOC differs from the one the bootstrap trusts
    other = relie(blob, lambda es: [dataclasses.replace(es[0], digest=bytes(32))] + es[1:])
    BlobReader.from_bytes(other)                                  # consistent on its own
    with pytest.raises(IntegrityError, match="trusted"):
        BlobReader.from_bytes(other, toc_digest=s.toc_digest)
    with pytest.raises(ValueError, match="not a sha256"):
        BlobReader.from_bytes(blob, toc_digest="abc")


def _swap_first_two(es):
    a, b = es[0], es[1]
    return [dataclasses.replace(b, uncompressed_offset=a.uncompressed_offset),
            dataclasses.replace(a, uncompressed_offset=b.uncompressed_offset)] + es[2:]


LIES = {
    "view overlap": (lambda es: [es[0], dataclasses.replace(es[1], uncompressed_offset=4096), es[2]],
                     "#1.*overlaps the previous chunk"),
    "unsorted": (lambda es: [es[0], es[2], es[1]], "#1.*(unsorted|not sorted)"),
    "unaligned": (lambda es: [es[0], dataclasses.replace(es[1], uncompressed_offset=8193), es[2]],
                  "#1.*aligned"),
    "view gap": (lambda es: es[:2] + [dataclasses.replace(es[2], uncompressed_offset=8192 * 3)],
                 "#2.*expected at offset 16384"),
    "compressed past data": (lambda es: es[:2] + [dataclasses.replace(
        es[2], compressed_size=es[2].compressed_size + 50)], "#2.*past the end of the data area"),
    "compressed overlap": (lambda es: [es[0], dataclasses.replace(
        es[1], compressed_offset=es[1].compressed_offset - 1), es[2]], "#1.*overlaps"),
    "stored size lie": (lambda es: [es[0], dataclasses.replace(es[1], compressed_size=100), es[2]],
                        "#1.*stored chunk"),
    "unknown flags": (lambda es: [dataclasses.replace(es[0], flags=0x80)] + es[1:],
                      "#0.*unknown flags"),
    "zero size": (lambda es: [dataclasses.replace(es[0], uncompressed_size=0)] + es[1:],
                  "#0.*uncompressed size 0"),
    "missing entry": (lambda es: es[:2], "data area"),
}


@pytest.mark.parametrize("lie", LIES)
def test_toc_that_lies(good, lie):
    blob, *_ = good
    mutate, msg = LIES[lie]
    with pytest.raises(FormatError, match=msg):
        BlobReader.from_bytes(relie(blob, mutate))


def test_footer_view_size_lie(good):
    blob, *_ = good
    f = read_footer(blob)
    bad = blob[:-FOOTER_SIZE] + dataclasses.replace(f, uncompressed_size=f.uncompressed_size + 4096).pack()
    with pytest.raises(FormatError, match="uncompressed view"):
        BlobReader.from_bytes(bad)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_tampered_chunk_byte(good, index):
    blob, entries, s, _ = good
    e = entries[index]
    bad = bytearray(blob)
    bad[e.compressed_offset + e.compressed_size // 2] ^= 0x40
    r = BlobReader.from_bytes(bytes(bad), toc_digest=s.toc_digest, blob_id=s.blob_id)
    with pytest.raises(IntegrityError, match=f"blob sha256:{s.blob_id}: chunk #{index} ") as ei:
        r.read_chunk(r.toc[index])
    assert "fetch it again" in str(ei.value)
    with pytest.raises(IntegrityError, match=f"chunk #{index} "):
        r.verify_all()
    # the other chunks are still served
    for j in set(range(3)) - {index}:
        r.read_chunk(r.toc[j])


def test_wrong_plain_size_after_decompress(good):
    blob, entries, s, chunks = good
    # the TOC claims 8000 plain bytes for chunk #2; its zstd frame holds 8192
    bad = relie(blob, lambda es: es[:2] + [dataclasses.replace(es[2], uncompressed_size=8000)])
    r = BlobReader.from_bytes(bad)
    with pytest.raises(IntegrityError, match="chunk #2 .*8192.*expected 8000"):
        r.read_chunk(r.toc[2])
    assert r.read_chunk(r.toc[0]) == chunks[0]


def test_blob_id_mismatch_caught_by_verify_all(good):
    blob, entries, s, _ = good
    r = BlobReader.from_bytes(blob, blob_id="sha256:" + "0" * 64)
    with pytest.raises(IntegrityError, match="sha256"):
        r.verify_all()


def test_bootstrap_digest_mismatch(good):
    blob, entries, s, chunks = good
    r = BlobReader.from_bytes(blob)
    assert r.read_chunk(r.toc[0], expected_digest=entries[0].digest) == chunks[0]
    with pytest.raises(IntegrityError, match="bootstrap expects"):
        r.read_chunk(r.toc[0], expected_digest=entries[1].digest)


def test_range_and_span_misuse(good):
    blob, entries, s, _ = good
    r = BlobReader.from_bytes(blob)
    with pytest.raises(FormatError, match="past the end of the uncompressed view"):
        r.chunks_for_range(s.uncompressed_size - 10, 20)
    with pytest.raises(ChunkNotFound, match="no chunk at uncompressed offset"):
        r.find(s.uncompressed_size)
    with pytest.raises(ValueError, match="not adjacent"):
        r.compressed_span([r.toc[0], r.toc[2]])
    with pytest.raises(ValueError):
        r.read_chunk(ChunkEntry(0, 1, 0, 1, bytes(32), 0))      # not from this TOC
    assert isinstance(r.footer, Footer)
