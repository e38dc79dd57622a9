"""The RAFS blob: one source layer's file data, stored as an OCI blob.

Layout (all integers little-endian; see docs/rafs-format.md, "Blob")::

    [ data: chunk 0 | chunk 1 | ... ]   each chunk compressed on its own, back to back
    [ TOC: chunk_count x 64-byte entries ]   sorted by uncompressed offset
    [ footer: 128 bytes ]                    at the very end of the blob

The *uncompressed view* puts chunk k's plain bytes at its `uncompressed_offset`;
offsets are 4 KiB aligned and packed (next = align_up(prev end, 4096)), the
gaps read as zeros and the view size is a multiple of 4096. The bootstrap
addresses chunks by view offset; a reader maps a view range to TOC entries and
those to compressed byte ranges after one small read of the footer + TOC.

Trust: the bootstrap holds the blob's sha256 (its OCI digest) and the sha256
of its TOC; the TOC holds each chunk's digest of its plain bytes. A
`BlobReader` given the trusted TOC digest serves a chunk only after the chunk
digest matched.
"""
from __future__ import annotations

import bisect
import hashlib
import os
import re
import struct
import threading
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Sequence

from .compress import (COMPRESSOR_IDS, COMPRESSOR_NAMES, check_compressor, compress,
                       decompress)
from .digest import DIGEST_SIZE, DIGESTER_IDS, DIGESTER_NAMES, check_digester
from .digest import digest as digest_of
from .errors import FormatError, IntegrityError

BLOB_MEDIA_TYPE = "application/vnd.oci.image.layer.nydus.blob.v1"
BLOB_MAGIC = b"RAFSBLOB"
BLOB_VERSION = 1

VIEW_ALIGN = 4096                  # uncompressed view: chunk offsets and view size
CHUNK_SIZE_MIN = 4 << 10
CHUNK_SIZE_MAX = 16 << 20
CHUNK_SIZE_DEFAULT = 1 << 20

FLAG_COMPRESSED = 0x1              # payload is compressed with the blob's compressor; else stored plain
KNOWN_FLAGS = FLAG_COMPRESSED

# TOC entry: uncompressed_offset u64, uncompressed_size u32, compressed_offset u64,
# compressed_size u32, digest 32s, flags u32, reserved u32 (must be 0).
TOC_ENTRY = struct.Struct("<QIQI32sII")
TOC_ENTRY_SIZE = TOC_ENTRY.size
assert TOC_ENTRY_SIZE == 64, TOC_ENTRY_SIZE

# Footer: magic 8s, version u32, compressor id u32, digester id u32, flags u32 (0),
# chunk_count u64, toc_offset u64, toc_size u64, toc_digest 32s (sha256 of the TOC
# bytes), uncompressed_size u64 (view size), reserved 40s (zeros).
FOOTER = struct.Struct("<8sIIIIQQQ32sQ40s")
FOOTER_SIZE = FOOTER.size
assert FOOTER_SIZE == 128, FOOTER_SIZE

_TAIL_HINT = 64 << 10              # first read at open: footer + up to 64 KiB of TOC (1024 entries)
_BATCH_BYTES = 8 << 20             # verify_all / read_range: compressed bytes per backend read


def align_up(n: int, align: int = VIEW_ALIGN) -> int:
    return (n + align - 1) // align * align


_SIZE_RE = re.compile(r"^\s*(0[xX][0-9a-fA-F]+|\d+)\s*([KkMm](?:i?[Bb])?)?\s*$")


def validate_chunk_size(n: int | str) -> int:
    """Return the chunk size as an int if it is a power of two in 4 KiB..16 MiB.

    Accepts an int, or a string such as "1048576", "0x100000", "1M", "64KiB".
    Raises ValueError with the allowed range otherwise.
    """
    allowed = ("chunk size must be a power of two between 4 KiB and 16 MiB "
               "(4096, 8192, ... 16777216; e.g. 0x100000 = 1 MiB)")
    value = n
    if isinstance(n, str):
        m = _SIZE_RE.match(n)
        if not m:
            raise ValueError(f"{allowed}; cannot read {n!r} as a size")
        value = int(m.group(1), 0)
        unit = (m.group(2) or "")[:1].upper()
        value <<= {"": 0, "K": 10, "M": 20}[unit]
    elif isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"{allowed}; got {n!r}")
    if value < CHUNK_SIZE_MIN or value > CHUNK_SIZE_MAX or value & (value - 1):
        raise ValueError(f"{allowed}; got {n!r}")
    return value


def _hex_digest(value: str | bytes) -> str:
    """Normalise a sha256 given as 'sha256:<hex>', '<hex>' or 32 raw bytes to lowercase hex."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 32:
            raise ValueError(f"a sha256 digest is 32 bytes, got {len(value)}")
        return bytes(value).hex()
    v = value.strip().lower()
    if v.startswith("sha256:"):
        v = v[7:]
    if not re.fullmatch(r"[0-9a-f]{64}", v):
        raise ValueError(f"not a sha256 digest: {value!r} (want 'sha256:' + 64 hex digits)")
    return v


# --------------------------------------------------------------------------- records

@dataclass(frozen=True, slots=True)
class ChunkEntry:
    """One TOC entry: where a chunk's plain bytes sit in the view and its payload in the blob."""
    uncompressed_offset: int
    uncompressed_size: int
    compressed_offset: int
    compressed_size: int
    digest: bytes                  # 32 bytes, of the plain bytes, with the blob's digester
    flags: int

    @property
    def compressed(self) -> bool:
        """True if the payload is compressed, False if the plain bytes are stored as they are."""
        return bool(self.flags & FLAG_COMPRESSED)

    @property
    def uncompressed_end(self) -> int:
        return self.uncompressed_offset + self.uncompressed_size

    @property
    def compressed_end(self) -> int:
        return self.compressed_offset + self.compressed_size

    def pack(self) -> bytes:
        return TOC_ENTRY.pack(self.uncompressed_offset, self.uncompressed_size,
                              self.compressed_offset, self.compressed_size,
                              self.digest, self.flags, 0)


def pack_toc(entries: Sequence[ChunkEntry]) -> bytes:
    return b"".join(e.pack() for e in entries)


@dataclass(frozen=True, slots=True)
class Footer:
    """The fixed-size record at the end of every blob."""
    version: int
    compressor: str                # a name from rafs.compress.COMPRESSORS
    digester: str                  # a name from rafs.digest.DIGESTERS
    chunk_count: int
    toc_offset: int                # == size of the data area
    toc_size: int                  # == chunk_count * TOC_ENTRY_SIZE
    toc_digest: bytes              # sha256 of the TOC bytes (32 bytes)
    uncompressed_size: int         # size of the uncompressed view, multiple of 4096

    @property
    def data_size(self) -> int:
        return self.toc_offset

    @property
    def blob_size(self) -> int:
        return self.toc_offset + self.toc_size + FOOTER_SIZE

    def pack(self) -> bytes:
        return FOOTER.pack(BLOB_MAGIC, self.version, COMPRESSOR_IDS[self.compressor],
                           DIGESTER_IDS[self.digester], 0, self.chunk_count,
                           self.toc_offset, self.toc_size, self.toc_digest,
                           self.uncompressed_size, bytes(40))


@dataclass(frozen=True)
class BlobSummary:
    """What `BlobWriter.finish` reports; the bootstrap's blob table and the OCI descriptor use it."""
    blob_id: str                   # hex sha256 of the whole blob file (its OCI digest without "sha256:")
    compressed_size: int           # size of the whole blob file in bytes (the OCI descriptor size)
    uncompressed_size: int         # size of the uncompressed view (multiple of 4096)
    chunk_count: int
    toc_offset: int
    toc_size: int
    toc_digest: str                # hex sha256 of the TOC bytes
    compressor: str
    digester: str

    @property
    def digest(self) -> str:
        """The OCI digest, "sha256:<blob_id>"."""
        return "sha256:" + self.blob_id

    @property
    def media_type(self) -> str:
        return BLOB_MEDIA_TYPE


@dataclass(frozen=True, slots=True)
class PreparedChunk:
    """A chunk compressed and digested, ready for `BlobWriter.add_prepared` (or add_compressed)."""
    payload: bytes
    plain_size: int
    digest: bytes
    flags: int


def prepare_chunk(plain: bytes, compressor: str = "zstd", digester: str = "sha256",
                  chunk_digest: bytes | None = None) -> PreparedChunk:
    """Digest and compress one chunk; pure, thread-safe, so a pool can prepare chunks in parallel.

    A chunk that does not shrink is stored plain (flags without FLAG_COMPRESSED).
    """
    check_compressor(compressor)
    check_digester(digester)
    size = len(plain)
    if not 0 < size <= CHUNK_SIZE_MAX:
        raise ValueError(f"a chunk holds 1..{CHUNK_SIZE_MAX} plain bytes, got {size} "
                         "(empty files have no chunks)")
    if chunk_digest is None:
        chunk_digest = digest_of(digester, plain)
    elif len(chunk_digest) != DIGEST_SIZE:
        raise ValueError(f"a chunk digest is {DIGEST_SIZE} bytes, got {len(chunk_digest)}")
    if compressor != "none":
        packed = compress(compressor, plain)
        if len(packed) < size:
            return PreparedChunk(packed, size, bytes(chunk_digest), FLAG_COMPRESSED)
    return PreparedChunk(bytes(plain), size, bytes(chunk_digest), 0)


# --------------------------------------------------------------------------- writer

class BlobWriter:
    """Streams a blob to a binary file object, hashing (sha256) everything it writes.

    Holds at most one chunk's bytes (plus the TOC entries) in memory. Never
    seeks, so `out` may be a pipe or an upload stream. Call `finish()` once,
    after the last chunk, to write the TOC and footer.
    Not thread-safe: prepare chunks in a pool with `prepare_chunk`, add them in order here.
    """

    def __init__(self, out: BinaryIO, compressor: str = "zstd", digester: str = "sha256"):
        self.compressor = check_compressor(compressor)
        self.digester = check_digester(digester)
        self._out = out
        self._sha = hashlib.sha256()
        self._entries: list[ChunkEntry] = []
        self._data_size = 0                # bytes of chunk data written so far
        self._view_end = 0                 # end of the last chunk in the view (unaligned)
        self._summary: BlobSummary | None = None

    # -- state
    @property
    def chunk_count(self) -> int:
        return len(self._entries)

    @property
    def uncompressed_size(self) -> int:
        """View size so far (aligned)."""
        return align_up(self._view_end)

    @property
    def data_size(self) -> int:
        return self._data_size

    @property
    def entries(self) -> tuple[ChunkEntry, ...]:
        return tuple(self._entries)

    # -- writing
    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view.nbytes:
            n = self._out.write(view)
            if n is None:                  # non-blocking raw stream that could not take it
                raise OSError("blob output stream would block; give BlobWriter a blocking stream")
            view = view[n:]
        self._sha.update(data)

    def _check_open(self) -> None:
        if self._summary is not None:
            raise RuntimeError("BlobWriter.finish() was already called; start a new BlobWriter")

    def add_chunk(self, plain: bytes, digest: bytes | None = None) -> ChunkEntry:
        """Compress `plain` (1 byte..16 MiB) and append it; returns its TOC entry.

        `digest`, if given, is trusted as the digest of `plain` (saves hashing twice
        when the caller already looked it up for deduplication).
        """
        self._check_open()
        return self.add_prepared(prepare_chunk(plain, self.compressor, self.digester, digest))

    def add_prepared(self, chunk: PreparedChunk) -> ChunkEntry:
        """Append a chunk made by `prepare_chunk` with this writer's compressor and digester."""
        return self.add_compressed(chunk.payload, chunk.plain_size, chunk.digest, chunk.flags)

    def add_compressed(self, payload: bytes, plain_size: int, digest: bytes, flags: int,
                       *, verify: bool = False) -> ChunkEntry:
        """Append an already-compressed chunk as it is (re-packing from another blob).

        `payload` must be compressed with this writer's compressor if `flags` has
        FLAG_COMPRESSED, else be the plain bytes; `digest` made with this writer's
        digester. With `verify=True` the payload is decompressed and its digest
        checked first (IntegrityError if it does not match).
        """
        self._check_open()
        size = len(payload)
        if not 0 < plain_size <= CHUNK_SIZE_MAX:
            raise ValueError(f"a chunk holds 1..{CHUNK_SIZE_MAX} plain bytes, got {plain_size}")
        if len(digest) != DIGEST_SIZE:
            raise ValueError(f"a chunk digest is {DIGEST_SIZE} bytes, got {len(digest)}")
        if flags & ~KNOWN_FLAGS:
            raise ValueError(f"unknown chunk flags {flags:#x} (known: {KNOWN_FLAGS:#x})")
        if flags & FLAG_COMPRESSED:
            if self.compressor == "none":
                raise ValueError("a compressed chunk cannot go into a blob whose compressor is 'none'")
            if not 0 < size <= plain_size:
                raise ValueError(f"compressed payload is {size} bytes for {plain_size} plain bytes; "
                                 "a chunk that does not shrink must be stored plain (flags=0)")
        elif size != plain_size:
            raise ValueError(f"stored (uncompressed) chunk payload is {size} bytes "
                             f"but plain_size is {plain_size}")
        if verify:
            plain = (decompress(self.compressor, payload, plain_size)
                     if flags & FLAG_COMPRESSED else payload)
            got = digest_of(self.digester, plain)
            if got != digest:
                raise IntegrityError(
                    f"chunk to copy does not match its {self.digester} digest "
                    f"(expected {bytes(digest).hex()}, got {got.hex()}); the source blob is corrupt")
        entry = ChunkEntry(align_up(self._view_end), plain_size, self._data_size, size,
                           bytes(digest), flags)
        self._write(payload)
        self._data_size += size
        self._view_end = entry.uncompressed_end
        self._entries.append(entry)
        return entry

    def finish(self) -> BlobSummary:
        """Write the TOC and footer; returns the summary. Does not close `out`."""
        self._check_open()
        toc = pack_toc(self._entries)
        footer = Footer(BLOB_VERSION, self.compressor, self.digester, len(self._entries),
                        self._data_size, len(toc), hashlib.sha256(toc).digest(),
                        align_up(self._view_end))
        self._write(toc)
        self._write(footer.pack())
        flush = getattr(self._out, "flush", None)
        if flush is not None:
            flush()
        self._summary = BlobSummary(
            blob_id=self._sha.hexdigest(), compressed_size=footer.blob_size,
            uncompressed_size=footer.uncompressed_size, chunk_count=footer.chunk_count,
            toc_offset=footer.toc_offset, toc_size=footer.toc_size,
            toc_digest=footer.toc_digest.hex(), compressor=self.compressor,
            digester=self.digester)
        return self._summary


# --------------------------------------------------------------------------- parsing

def read_footer(tail: bytes, blob_size: int | None = None) -> Footer:
    """Parse and check the footer in the last FOOTER_SIZE bytes of `tail`.

    With `blob_size` (the size of the whole blob) also checks that data + TOC +
    footer add up to it. Raises FormatError saying what is wrong.
    """
    if len(tail) < FOOTER_SIZE:
        raise FormatError(
            f"blob is too short to hold the {FOOTER_SIZE}-byte RAFS blob footer "
            f"(got {len(tail)} bytes): it is truncated or not a RAFS blob")
    (magic, version, comp_id, dig_id, fflags, count, toc_offset, toc_size, toc_digest,
     view_size, reserved) = FOOTER.unpack_from(tail, len(tail) - FOOTER_SIZE)
    if magic != BLOB_MAGIC:
        raise FormatError(
            f"no RAFS blob footer: expected magic {BLOB_MAGIC!r} at {FOOTER_SIZE} bytes "
            f"before the end, found {magic!r}; the blob is truncated, has trailing "
            "bytes, or is not a RAFS blob (was the image converted by nydusify?)")
    if version != BLOB_VERSION:
        raise FormatError(
            f"RAFS blob format version {version} is not supported (this pynydus reads "
            f"version {BLOB_VERSION}); upgrade pynydus or convert the image again")
    if comp_id not in COMPRESSOR_NAMES:
        raise FormatError(f"RAFS blob footer names unknown compressor id {comp_id} "
                          f"(known: {dict(sorted(COMPRESSOR_NAMES.items()))})")
    if dig_id not in DIGESTER_NAMES:
        raise FormatError(f"RAFS blob footer names unknown digester id {dig_id} "
                          f"(known: {dict(sorted(DIGESTER_NAMES.items()))})")
    if fflags != 0 or any(reserved):
        raise FormatError("RAFS blob footer has non-zero reserved fields: "
                          "written by a newer or broken writer")
    if toc_size != count * TOC_ENTRY_SIZE:
        raise FormatError(f"RAFS blob footer is inconsistent: TOC size {toc_size} is not "
                          f"{count} chunks x {TOC_ENTRY_SIZE} bytes")
    if view_size % VIEW_ALIGN:
        raise FormatError(f"RAFS blob footer is inconsistent: uncompressed size {view_size} "
                          f"is not a multiple of {VIEW_ALIGN}")
    if not count * VIEW_ALIGN <= view_size <= count * align_up(CHUNK_SIZE_MAX):
        raise FormatError(f"RAFS blob footer is inconsistent: {count} chunks cannot span "
                          f"an uncompressed view of {view_size} bytes")
    footer = Footer(version, COMPRESSOR_NAMES[comp_id], DIGESTER_NAMES[dig_id], count,
                    toc_offset, toc_size, bytes(toc_digest), view_size)
    if blob_size is not None and footer.blob_size != blob_size:
        raise FormatError(
            f"RAFS blob is {blob_size} bytes but its footer describes {footer.blob_size} "
            f"(data {toc_offset} + TOC {toc_size} + footer {FOOTER_SIZE}): the blob is "
            "truncated or has bytes appended")
    return footer


def parse_toc(data: bytes, footer: Footer, *,
              trusted_digest: str | bytes | None = None) -> list[ChunkEntry]:
    """Verify and parse the TOC bytes described by `footer`.

    `trusted_digest` is the TOC sha256 the bootstrap holds ('sha256:<hex>', hex
    or 32 bytes); when given the footer must carry the same value. Raises
    IntegrityError if the TOC bytes or the footer's TOC digest do not match,
    FormatError (naming the entry) if an entry is malformed: unknown flags,
    bad sizes, unaligned/unsorted/overlapping/gapped view offsets, compressed
    ranges outside the data area or not back to back.
    """
    if trusted_digest is not None:
        want = _hex_digest(trusted_digest)
        if footer.toc_digest.hex() != want:
            raise IntegrityError(
                f"blob TOC digest {footer.toc_digest.hex()} does not match the trusted "
                f"sha256:{want} from the bootstrap: this blob does not belong to the "
                "image, or it was replaced or corrupted; fetch it again")
    if len(data) != footer.toc_size:
        raise FormatError(f"blob TOC is {len(data)} bytes, footer says {footer.toc_size}")
    got = hashlib.sha256(data).digest()
    if got != footer.toc_digest:
        raise IntegrityError(
            f"blob TOC bytes hash to sha256:{got.hex()} but the footer records "
            f"sha256:{footer.toc_digest.hex()}: the TOC is corrupt; fetch the blob again")
    entries: list[ChunkEntry] = []
    comp_expected = 0
    prev: ChunkEntry | None = None
    for i, (uoff, usize, coff, csize, dig, flags, reserved) in enumerate(TOC_ENTRY.iter_unpack(data)):
        where = f"blob TOC entry #{i} (uncompressed offset {uoff})"
        if flags & ~KNOWN_FLAGS or reserved:
            raise FormatError(f"{where}: unknown flags {flags:#x} / reserved {reserved:#x}; "
                              "written by a newer or broken writer")
        if not 0 < usize <= CHUNK_SIZE_MAX:
            raise FormatError(f"{where}: uncompressed size {usize} is outside 1..{CHUNK_SIZE_MAX}")
        if uoff % VIEW_ALIGN:
            raise FormatError(f"{where}: offset is not {VIEW_ALIGN}-byte aligned")
        if prev is not None:
            if uoff < prev.uncompressed_offset:
                raise FormatError(f"{where}: entries are not sorted (previous entry is at "
                                  f"{prev.uncompressed_offset})")
            if uoff < prev.uncompressed_end:
                raise FormatError(f"{where}: overlaps the previous chunk "
                                  f"[{prev.uncompressed_offset}, {prev.uncompressed_end})")
        view_expected = align_up(prev.uncompressed_end) if prev is not None else 0
        if uoff != view_expected:
            raise FormatError(f"{where}: expected at offset {view_expected}; chunks are packed "
                              "in order at 4 KiB-aligned offsets, so the TOC is unsorted or "
                              "has a gap")
        if flags & FLAG_COMPRESSED:
            if not 0 < csize <= usize:
                raise FormatError(f"{where}: compressed size {csize} for {usize} plain bytes "
                                  "(a compressed chunk is 1..plain-size bytes)")
        elif csize != usize:
            raise FormatError(f"{where}: stored chunk has compressed size {csize} "
                              f"!= uncompressed size {usize}")
        if coff + csize > footer.toc_offset:
            raise FormatError(f"{where}: compressed range [{coff}, {coff + csize}) runs past "
                              f"the end of the data area at {footer.toc_offset}")
        if coff != comp_expected:
            what = "overlaps the previous chunk" if coff < comp_expected else "leaves a gap"
            raise FormatError(f"{where}: compressed range starts at {coff}, expected "
                              f"{comp_expected}; it {what} (chunks are stored back to back)")
        comp_expected = coff + csize
        prev = ChunkEntry(uoff, usize, coff, csize, dig, flags)
        entries.append(prev)
    if len(entries) != footer.chunk_count:          # guarded by toc_size, kept for clarity
        raise FormatError(f"blob TOC has {len(entries)} entries, footer says {footer.chunk_count}")
    if comp_expected != footer.toc_offset:
        raise FormatError(f"blob data area is {footer.toc_offset} bytes but the TOC accounts "
                          f"for {comp_expected}: the TOC does not describe the data")
    view = align_up(prev.uncompressed_end) if prev is not None else 0
    if view != footer.uncompressed_size:
        raise FormatError(f"blob footer says the uncompressed view is "
                          f"{footer.uncompressed_size} bytes, the TOC makes it {view}")
    return entries


# --------------------------------------------------------------------------- reader

class ChunkNotFound(FormatError, KeyError):
    """No chunk of the blob covers the asked uncompressed offset (a FormatError and a KeyError)."""

    def __str__(self) -> str:                  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


ReadAt = Callable[[int, int], bytes]


class BlobReader:
    """Random access to one blob over any `read_at(offset, size) -> bytes` callable.

    Opening reads the footer and TOC (one read of the last 64 KiB + 128 bytes;
    a second one only for larger TOCs) and validates them. After that the
    reader is immutable, so it is thread-safe if `read_at` is.

    `toc_digest` is the trusted TOC sha256 from the bootstrap (hex, 'sha256:hex'
    or bytes); without it only the blob's self-consistency is checked.
    `blob_id` (the blob's sha256) names the blob in errors and lets
    `verify_all` check the whole file; `name` overrides the name in errors.
    """

    def __init__(self, read_at: ReadAt, blob_size: int, *, toc_digest: str | bytes | None = None,
                 blob_id: str | None = None, name: str | None = None):
        self._read_at = read_at
        self.blob_size = blob_size
        self.blob_id = _hex_digest(blob_id) if blob_id is not None else None
        self.name = name or (f"blob sha256:{self.blob_id}" if self.blob_id else "blob")
        try:
            if blob_size < FOOTER_SIZE:
                raise FormatError(
                    f"blob is {blob_size} bytes, too short for the {FOOTER_SIZE}-byte footer: "
                    "it is truncated or not a RAFS blob")
            tail_len = min(blob_size, FOOTER_SIZE + _TAIL_HINT)
            tail = self._read(blob_size - tail_len, tail_len)
            self.footer = read_footer(tail, blob_size)
            if self.footer.toc_size + FOOTER_SIZE <= tail_len:
                start = tail_len - FOOTER_SIZE - self.footer.toc_size
                toc_bytes = tail[start:tail_len - FOOTER_SIZE]
            else:
                toc_bytes = self._read(self.footer.toc_offset, self.footer.toc_size)
            self.toc = parse_toc(toc_bytes, self.footer, trusted_digest=toc_digest)
        except (FormatError, IntegrityError) as e:
            if str(e).startswith(self.name + ":"):
                raise
            raise type(e)(f"{self.name}: {e}") from None
        self._offsets = [e.uncompressed_offset for e in self.toc]

    # -- construction helpers
    @classmethod
    def from_bytes(cls, data: bytes, **kw) -> "BlobReader":
        view = memoryview(data)
        return cls(lambda off, size: bytes(view[off:off + size]), len(data), **kw)

    @classmethod
    def from_file(cls, f: BinaryIO, **kw) -> "BlobReader":
        """Over an open binary file (not closed by the reader); pread if it has a fileno."""
        try:
            fd = f.fileno()
        except (AttributeError, OSError):
            fd = None
        if fd is not None:
            size = os.fstat(fd).st_size
            return cls(lambda off, n: os.pread(fd, n, off), size, **kw)
        lock = threading.Lock()

        def read_at(off: int, n: int) -> bytes:
            with lock:
                f.seek(off)
                return f.read(n)
        with lock:
            size = f.seek(0, os.SEEK_END)
        return cls(read_at, size, **kw)

    # -- properties
    @property
    def compressor(self) -> str:
        return self.footer.compressor

    @property
    def digester(self) -> str:
        return self.footer.digester

    @property
    def uncompressed_size(self) -> int:
        return self.footer.uncompressed_size

    @property
    def toc_digest(self) -> str:
        return self.footer.toc_digest.hex()

    # -- lookups
    def _read(self, offset: int, size: int) -> bytes:
        data = self._read_at(offset, size)
        if len(data) != size:
            raise FormatError(
                f"{self.name}: short read at offset {offset}: wanted {size} bytes, got "
                f"{len(data)}; the blob is truncated or blob_size ({self.blob_size}) is wrong")
        return data

    def index(self, entry: ChunkEntry) -> int:
        """Position of `entry` in the TOC; ValueError if it is not an entry of this blob."""
        i = bisect.bisect_left(self._offsets, entry.uncompressed_offset)
        if i < len(self.toc) and self.toc[i] == entry:
            return i
        raise ValueError(f"{self.name}: {entry!r} is not an entry of this blob's TOC")

    def find(self, uncompressed_offset: int) -> ChunkEntry:
        """The entry whose plain bytes cover `uncompressed_offset`; ChunkNotFound if none does."""
        i = bisect.bisect_right(self._offsets, uncompressed_offset) - 1
        if i >= 0 and uncompressed_offset < self.toc[i].uncompressed_end:
            return self.toc[i]
        raise ChunkNotFound(
            f"{self.name}: no chunk at uncompressed offset {uncompressed_offset} "
            f"(view is {self.uncompressed_size} bytes, {len(self.toc)} chunks): the bootstrap "
            "does not match this blob")

    def chunks_for_range(self, offset: int, size: int) -> list[ChunkEntry]:
        """Entries overlapping view range [offset, offset+size); padding between chunks reads as zeros."""
        if offset < 0 or size < 0:
            raise ValueError(f"bad range: offset {offset}, size {size}")
        end = offset + size
        if end > self.uncompressed_size:
            raise FormatError(
                f"{self.name}: range [{offset}, {end}) runs past the end of the uncompressed "
                f"view ({self.uncompressed_size} bytes)")
        if size == 0:
            return []
        i = max(bisect.bisect_right(self._offsets, offset) - 1, 0)
        if self.toc[i].uncompressed_end <= offset:
            i += 1
        out = []
        while i < len(self.toc) and self.toc[i].uncompressed_offset < end:
            out.append(self.toc[i])
            i += 1
        return out

    @staticmethod
    def compressed_span(entries: Sequence[ChunkEntry]) -> tuple[int, int]:
        """(offset, length) of one byte range covering adjacent entries (a merged range request)."""
        if not entries:
            raise ValueError("compressed_span needs at least one entry")
        for a, b in zip(entries, entries[1:]):
            if b.compressed_offset != a.compressed_end:
                raise ValueError(
                    f"entries are not adjacent in the blob: one ends at {a.compressed_end}, "
                    f"the next starts at {b.compressed_offset}; split them into separate requests")
        first = entries[0].compressed_offset
        return first, entries[-1].compressed_end - first

    # -- reading
    def _decode(self, index: int, entry: ChunkEntry, payload: bytes,
                expected_digest: bytes | None = None) -> bytes:
        where = (f"{self.name}: chunk #{index} (uncompressed offset {entry.uncompressed_offset}, "
                 f"{entry.uncompressed_size} bytes; compressed bytes "
                 f"[{entry.compressed_offset}, {entry.compressed_end}))")
        if entry.compressed:
            try:
                plain = decompress(self.compressor, payload, entry.uncompressed_size)
            except IntegrityError as e:
                raise IntegrityError(
                    f"{where}: {e}; the blob is corrupt or was tampered with — drop it from "
                    "the cache and fetch it again") from None
        else:
            plain = bytes(payload)
        got = digest_of(self.digester, plain)
        if got != entry.digest:
            raise IntegrityError(
                f"{where} failed its {self.digester} check: expected {entry.digest.hex()}, "
                f"got {got.hex()}; the blob is corrupt or was tampered with — drop it from "
                "the cache and fetch it again")
        if expected_digest is not None and bytes(expected_digest) != entry.digest:
            raise IntegrityError(
                f"{where}: the bootstrap expects digest {bytes(expected_digest).hex()} but the "
                f"blob's TOC says {entry.digest.hex()}: the bootstrap does not match this blob")
        return plain

    def read_chunk(self, entry: ChunkEntry, *, expected_digest: bytes | None = None) -> bytes:
        """Fetch, decompress and verify one chunk; IntegrityError names the blob and chunk.

        `expected_digest` (the bootstrap's digest for the chunk) must also match, if given.
        """
        i = self.index(entry)
        payload = self._read(entry.compressed_offset, entry.compressed_size)
        return self._decode(i, entry, payload, expected_digest)

    def read_chunks(self, entries: Sequence[ChunkEntry]) -> list[bytes]:
        """Adjacent entries with one backend read (see compressed_span); each verified."""
        off, length = self.compressed_span(entries)
        data = memoryview(self._read(off, length))
        out = []
        for e in entries:
            i = self.index(e)
            start = e.compressed_offset - off
            out.append(self._decode(i, e, data[start:start + e.compressed_size]))
        return out

    def _batches(self, entries: Sequence[ChunkEntry], limit: int) -> Iterator[list[ChunkEntry]]:
        """Runs of adjacent entries, each at most `limit` compressed bytes (or one entry)."""
        batch: list[ChunkEntry] = []
        size = 0
        for e in entries:
            if batch and (size + e.compressed_size > limit
                          or e.compressed_offset != batch[-1].compressed_end):
                yield batch
                batch, size = [], 0
            batch.append(e)
            size += e.compressed_size
        if batch:
            yield batch

    def read_range(self, offset: int, size: int) -> bytes:
        """`size` bytes of the uncompressed view at `offset` (zeros between chunks), verified."""
        entries = self.chunks_for_range(offset, size)
        out = bytearray(size)
        end = offset + size
        for batch in self._batches(entries, _BATCH_BYTES):
            for e, plain in zip(batch, self.read_chunks(batch)):
                lo = max(offset, e.uncompressed_offset)
                hi = min(end, e.uncompressed_end)
                out[lo - offset:hi - offset] = plain[lo - e.uncompressed_offset:
                                                     hi - e.uncompressed_offset]
        return bytes(out)

    def verify_all(self, *, batch_bytes: int = _BATCH_BYTES) -> int:
        """Read and verify every chunk, `batch_bytes` of compressed data per read; returns the count.

        If the reader knows the blob's id, the sha256 of the whole blob is checked too.
        """
        sha = hashlib.sha256() if self.blob_id else None
        count = 0
        for batch in self._batches(self.toc, batch_bytes):
            off, length = self.compressed_span(batch)
            data = memoryview(self._read(off, length))
            if sha is not None:
                sha.update(data)
            for e in batch:
                start = e.compressed_offset - off
                self._decode(count, e, data[start:start + e.compressed_size])
                count += 1
        if sha is not None:
            sha.update(pack_toc(self.toc))
            sha.update(self.footer.pack())
            if sha.hexdigest() != self.blob_id:
                raise IntegrityError(
                    f"{self.name}: the blob's sha256 is {sha.hexdigest()}, not its id; "
                    "it is corrupt or was replaced — fetch it again")
        return count
