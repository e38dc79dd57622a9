"""RAFS v6 data blobs, byte-compatible with Nydus (`nydus-image create --type tar-rafs
--blob-inline-meta --features blob-toc`, as nydusify runs it). All integers little-endian.

Layout of a blob `BlobWriter` writes (every `tar(x)` is a 512-byte GNU tar header placed
*after* the data it names, so the blob streams without seeking and reads from the end)::

    chunk data                  each chunk compressed on its own, back to back, from offset 0
    tar(image.blob)             size = bytes of chunk data
    ci array                    v1, 16 B per chunk, in ci order; written uncompressed
    ci header (4096 B)          magic 0xB10BB10B at 0 and at 4092
    tar(blob.meta)              size = ci array + 4096
    blob.digest                 32 B per chunk, ci order: digest of each chunk's plain bytes
    tar(blob.digest)
    [image.boot                 the layer's bootstrap, zstd (only with finish(bootstrap=...))
    tar(image.boot)]
    ToC                         128 B per entry
    tar(rafs.blob.toc)          size = 128 * entries

Uncompressed view (feature ALIGNED): chunk k's plain bytes sit at a 4 KiB-aligned
`uncompressed_offset`, packed in order; the gaps read as zeros; the view size is the
aligned end of the last chunk. It is the device EROFS reads; chunk indexes address it.

ci v1 entry (16 B; storage/src/meta/chunk_info_v1.rs)

| word      | bits  | field                                     |
|-----------|-------|-------------------------------------------|
| uncomp u64| 0-7   | reserved (0)                              |
|           | 8-11  | (uncompressed size - 1) bits 20-23        |
|           | 12-43 | uncompressed offset (4 KiB aligned)       |
|           | 44-63 | (uncompressed size - 1) bits 0-19         |
| comp u64  | 0-39  | compressed offset                         |
|           | 40-43 | (compressed size - 1) bits 20-23          |
|           | 44-63 | (compressed size - 1) bits 0-19           |

A v1 chunk is compressed iff its compressed size differs from its uncompressed size.
ci v2 (24 B, read only): uncomp = offset>>12 (bits 0-31) | size-1 (32-55) | flags (56-63:
COMPRESSED 1, ZRAN 2, BATCH 4, ENCRYPTED 8, CRC32 0x10); comp = offset (0-39) | size, not
minus one (40-63); data u64 (zran/batch context or crc32).

ci header (4096 B; storage/src/meta/mod.rs)

| off | field                    | off  | field              |
|-----|--------------------------|------|--------------------|
| 0   | magic u32 = 0xB10BB10B   | 32   | ci_uncompressed_size u64 |
| 4   | features u32 (FEATURE_*) | 40   | zran_offset u64    |
| 8   | ci_compressor u32 (id)   | 48   | zran_size u64      |
| 12  | ci_entries u32           | 56   | zran_count u32     |
| 16  | ci_offset u64            | 60   | reserved (zeros)   |
| 24  | ci_compressed_size u64   | 4092 | magic2 u32 = 0xB10BB10B |

ToC entry (128 B; storage/src/meta/toc.rs): flags u32 @0 (1 none, 2 zstd, 4 lz4_block),
reserved u32 @4, name[16] @8 (NUL padded), sha256 of the plain member @24, compressed_offset
u64 @56, compressed_size u64 @64, uncompressed_size u64 @72, reserved[48] @80 (ignored on
read: Nydus leaves bytes there). Entries, in order: image.blob, blob.meta, blob.meta.header,
blob.digest, image.boot. Measured on the Nydus fixtures and reproduced: the image.blob entry's
sha256 covers the chunk data *and* its tar header, its compressed_offset equals its
compressed_size (the data really is [0, size)), its uncompressed_size is the view size.
The blob table keeps blob_toc_size = ToC entries + 512 and blob_toc_digest = sha256 of
the ToC entries followed by their tar header. The writer's features: WRITER_FEATURES.

Reading also takes what other Nydus builders write: a ci array compressed with lz4_block,
zstd or gzip; ci v2 (but zran, batch, encrypted, tarfs and separate blobs raise FormatError
"... not supported: <feature>"); blobs without ToC or tar headers (the ci is then found through
the blob table's ci_offset); gzip chunks. The `<id>.blob.meta` file shape (ci padded to 4 KiB,
then the header) parses too.

Trust: the bootstrap's chunk table gives each chunk's digest (and position); `decode_chunk`
is the one place that checks a chunk payload against it. The blob table's ToC digest covers
the ToC, whose sha256s cover the ci array, ci header, blob.digest and image.boot.
"""
from __future__ import annotations

import bisect
import hashlib
import os
import re
import struct
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, Sequence

from .compress import (COMPRESSOR_IDS, COMPRESSOR_NAMES, canonical_compressor, check_compressor,
                       compress, decompress)
from .digest import DIGEST_SIZE, check_digester
from .digest import digest as digest_of
from .errors import FormatError, IntegrityError
from .image import media

VIEW_ALIGN = 4096                  # uncompressed view: chunk offsets and view size
CHUNK_SIZE_MIN = 4 << 10
CHUNK_SIZE_MAX = 16 << 20
CHUNK_SIZE_DEFAULT = 1 << 20

FLAG_COMPRESSED = 0x1              # Nydus chunk flag COMPRESSED: payload compressed, else stored plain
KNOWN_FLAGS = FLAG_COMPRESSED

# Blob features (storage/src/device.rs BlobFeatures): ci header and blob table.
FEATURE_ALIGNED = 0x0000_0001
FEATURE_INLINED_FS_META = 0x0000_0002
FEATURE_CHUNK_INFO_V2 = 0x0000_0004
FEATURE_ZRAN = 0x0000_0008
FEATURE_SEPARATE = 0x0000_0010
FEATURE_INLINED_CHUNK_DIGEST = 0x0000_0020
FEATURE_TARFS = 0x0000_0040
FEATURE_BATCH = 0x0000_0080
FEATURE_ENCRYPTED = 0x0000_0100
FEATURE_IS_CHUNKDICT_GENERATED = 0x0000_0200
FEATURE_IS_SEPARATED_WITH_PREFETCH_FILES = 0x0000_0400
FEATURE_EXTERNAL = 0x0000_0800
FEATURE_HAS_TAR_HEADER = 0x1000_0000
FEATURE_HAS_TOC = 0x2000_0000
FEATURE_CAP_TAR_TOC = 0x4000_0000
FEATURE_V5_NO_EXT_BLOB_TABLE = 0x8000_0000          # internal to Nydus; invalid on disk
FEATURE_INCOMPAT_MASK = 0x0000_ffff                 # low bits must be known ones
FEATURE_INCOMPAT_KNOWN = 0x0000_0fff
WRITER_FEATURES = (FEATURE_ALIGNED | FEATURE_INLINED_CHUNK_DIGEST | FEATURE_HAS_TAR_HEADER
                   | FEATURE_HAS_TOC | FEATURE_CAP_TAR_TOC)
assert WRITER_FEATURES == 0x7000_0021
# Features whose blobs we refuse to read (the name goes into "not supported: <name>").
UNSUPPORTED_FEATURES = {FEATURE_ZRAN: "zran", FEATURE_BATCH: "batch",
                        FEATURE_ENCRYPTED: "encrypted", FEATURE_TARFS: "tarfs",
                        FEATURE_SEPARATE: "separate data blob", FEATURE_EXTERNAL: "external blob"}

# ci (compression information) arrays.
CI_MAGIC = 0xB10B_B10B
CI_HEADER_SIZE = 4096
CI_HEADER = struct.Struct("<IIIIQQQQQI")            # the fields before the reserved area
CI_V1 = struct.Struct("<QQ")
CI_V2 = struct.Struct("<QQQ")
CI_V1_SIZE, CI_V2_SIZE = CI_V1.size, CI_V2.size
CI_V2_COMPRESSED, CI_V2_ZRAN, CI_V2_BATCH, CI_V2_ENCRYPTED, CI_V2_CRC32 = 0x1, 0x2, 0x4, 0x8, 0x10
CI_V2_KNOWN = 0x1f
MAX_CHUNKS_PER_BLOB = 0xFF_FFFF    # the writer's limit: ci index < 0xFFFFFF (Nydus builder)
_READ_MAX_CHUNKS = 1 << 24         # what nydusd accepts
_MASK40 = (1 << 40) - 1
_CI_SIZE_MAX = 1 << 24             # 24-bit sizes (stored as size-1 in v1)

# ToC.
TOC_ENTRY = struct.Struct("<II16s32sQQQ48s")
TOC_ENTRY_SIZE = TOC_ENTRY.size
assert TOC_ENTRY_SIZE == 128
TOC_NONE, TOC_ZSTD, TOC_LZ4_BLOCK = 0x1, 0x2, 0x4
_TOC_FLAG_COMPRESSOR = {TOC_NONE: "none", TOC_ZSTD: "zstd", TOC_LZ4_BLOCK: "lz4"}
_TOC_COMPRESSOR_FLAG = {v: k for k, v in _TOC_FLAG_COMPRESSOR.items()}
TOC_BLOB_RAW = "image.blob"
TOC_BOOTSTRAP = "image.boot"
TOC_BLOB_META = "blob.meta"
TOC_BLOB_META_HEADER = "blob.meta.header"
TOC_BLOB_DIGEST = "blob.digest"
TOC_NAME = "rafs.blob.toc"
TAR_HEADER_SIZE = 512

MAX_MERGE_GAP = 64 << 10           # read_chunks/read_range may read over gaps this small
_BATCH_BYTES = 8 << 20             # verify_all / read_range: compressed bytes per backend read
_TOC_TAIL = 4096                   # first read for the ToC (entries + header), as nydusd does


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


def unsupported_features(features: int) -> list[str]:
    """Names of the features in `features` that pynydus cannot read."""
    return [name for bit, name in UNSUPPORTED_FEATURES.items() if features & bit]


def _check_features(features: int, where: str) -> None:
    if (features & FEATURE_INCOMPAT_MASK & ~FEATURE_INCOMPAT_KNOWN
            or features & FEATURE_V5_NO_EXT_BLOB_TABLE):
        raise FormatError(f"{where}: invalid blob features {features:#x} (unknown incompatible bits)")
    bad = unsupported_features(features)
    if bad:
        raise FormatError(f"{where}: not supported: {', '.join(bad)} "
                          f"(blob features {features:#x})")


# --------------------------------------------------------------------------- records

@dataclass(frozen=True, slots=True)
class ChunkEntry:
    """One chunk: its compression-info (ci) entry and the digest of its plain bytes."""
    uncompressed_offset: int       # in the blob's uncompressed view (4 KiB aligned)
    uncompressed_size: int
    compressed_offset: int         # in the blob file
    compressed_size: int
    digest: bytes                  # 32 bytes, of the plain bytes, with the blob's digester
    flags: int                     # FLAG_COMPRESSED or 0
    index: int = 0                 # position in the blob's ci array (what chunk indexes store)

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


def pack_ci_v1(entry: ChunkEntry) -> bytes:
    """The 16-byte v1 ci entry of `entry` (ValueError if it cannot be expressed in v1)."""
    uoff, usize = entry.uncompressed_offset, entry.uncompressed_size
    coff, csize = entry.compressed_offset, entry.compressed_size
    if uoff % VIEW_ALIGN or not 0 <= uoff < 1 << 44:
        raise ValueError(f"ci v1: uncompressed offset {uoff} is not a 4 KiB-aligned offset below 16 TiB")
    if not 0 <= coff <= _MASK40:
        raise ValueError(f"ci v1: compressed offset {coff} does not fit in 40 bits")
    for what, n in (("uncompressed", usize), ("compressed", csize)):
        if not 1 <= n <= _CI_SIZE_MAX:
            raise ValueError(f"ci v1: {what} size {n} is outside 1..{_CI_SIZE_MAX}")
    if entry.compressed == (csize == usize):
        raise ValueError("ci v1: a chunk is compressed exactly when its compressed size differs "
                         f"from its plain size (flags {entry.flags:#x}, sizes {csize}/{usize})")
    u, c = usize - 1, csize - 1
    uncomp = uoff | (u & 0xF_FFFF) << 44 | (u >> 20 & 0xF) << 8
    comp = coff | (c & 0xF_FFFF) << 44 | (c >> 20 & 0xF) << 40
    return CI_V1.pack(uncomp, comp)


def unpack_ci_v1(data: bytes, count: int) -> list[tuple[int, int, int, int, int]]:
    """(uoff, usize, coff, csize, flags) of `count` v1 entries; compressed iff csize != usize."""
    out = []
    for uncomp, comp in CI_V1.iter_unpack(memoryview(data)[:count * CI_V1_SIZE]):
        uoff = uncomp & 0xFFF_FFFF_F000
        usize = ((uncomp >> 44) | (uncomp >> 8 & 0xF) << 20) + 1
        coff = comp & _MASK40
        csize = ((comp >> 44) | (comp >> 40 & 0xF) << 20) + 1
        out.append((uoff, usize, coff, csize, FLAG_COMPRESSED if csize != usize else 0))
    return out


def unpack_ci_v2(data: bytes, count: int) -> list[tuple[int, int, int, int, int, int]]:
    """(uoff, usize, coff, csize, v2 flags, data) of `count` v2 entries (raw flags, not FLAG_*)."""
    out = []
    for uncomp, comp, extra in CI_V2.iter_unpack(memoryview(data)[:count * CI_V2_SIZE]):
        out.append(((uncomp & 0xFFFF_FFFF) << 12, (uncomp >> 32 & 0xFF_FFFF) + 1,
                    comp & _MASK40, comp >> 40 & 0xFF_FFFF, uncomp >> 56, extra))
    return out


@dataclass(frozen=True)
class CiHeader:
    """The 4096-byte compression-info header (BlobCompressionContextHeader)."""
    features: int
    ci_compressor: str
    ci_entries: int
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    zran_offset: int = 0
    zran_size: int = 0
    zran_count: int = 0

    def pack(self) -> bytes:
        head = CI_HEADER.pack(CI_MAGIC, self.features, COMPRESSOR_IDS[self.ci_compressor],
                              self.ci_entries, self.ci_offset, self.ci_compressed_size,
                              self.ci_uncompressed_size, self.zran_offset, self.zran_size,
                              self.zran_count)
        return head + bytes(CI_HEADER_SIZE - 4 - len(head)) + struct.pack("<I", CI_MAGIC)

    @classmethod
    def unpack(cls, data: bytes, where: str = "blob") -> "CiHeader":
        if len(data) != CI_HEADER_SIZE:
            raise FormatError(f"{where}: ci header is {len(data)} bytes, expected {CI_HEADER_SIZE}")
        (magic, features, comp_id, entries, off, csize, usize, zoff, zsize,
         zcount) = CI_HEADER.unpack_from(data)
        magic2, = struct.unpack_from("<I", data, CI_HEADER_SIZE - 4)
        if magic != CI_MAGIC or magic2 != CI_MAGIC:
            raise FormatError(f"{where}: no compression-info header (magic {magic:#x}/{magic2:#x}, "
                              f"expected {CI_MAGIC:#x} at 0 and {CI_HEADER_SIZE - 4}): the blob is "
                              "truncated, or the ci offset is wrong")
        if comp_id not in COMPRESSOR_NAMES:
            raise FormatError(f"{where}: ci header names unknown compressor id {comp_id}")
        return cls(features, COMPRESSOR_NAMES[comp_id], entries, off, csize, usize, zoff, zsize,
                   zcount)


@dataclass(frozen=True)
class TocEntry:
    """One 128-byte ToC entry: where a member (image.boot, blob.meta, ...) sits in the blob."""
    name: str
    flags: int                     # TOC_NONE / TOC_ZSTD / TOC_LZ4_BLOCK
    sha256: bytes                  # of the plain member (image.blob: chunk data + its tar header)
    compressed_offset: int
    compressed_size: int
    uncompressed_size: int

    @property
    def compressor(self) -> str:
        return _TOC_FLAG_COMPRESSOR[self.flags]

    def pack(self) -> bytes:
        name = self.name.encode()
        if len(name) > 16:
            raise ValueError(f"ToC entry name {self.name!r} is longer than 16 bytes")
        return TOC_ENTRY.pack(self.flags, 0, name, self.sha256, self.compressed_offset,
                              self.compressed_size, self.uncompressed_size, bytes(48))


@dataclass(frozen=True)
class BlobSummary:
    """What `BlobWriter.finish` reports; `BlobInfo.from_summary` makes a blob-table entry of it."""
    blob_id: str                   # hex sha256 of the whole blob file (its OCI digest without "sha256:")
    compressed_size: int           # size of the whole blob file
    uncompressed_size: int         # view size (4 KiB multiple)
    chunk_count: int
    compressor: str
    digester: str
    features: int
    ci_compressor: str             # "none": the ci array is written uncompressed
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    blob_toc_size: int             # ToC entries + their 512-byte tar header
    blob_toc_digest: str           # hex sha256 of the ToC entries + tar header
    entries: tuple[ChunkEntry, ...]   # in ci order (= uncompressed-offset order)

    @property
    def digest(self) -> str:
        """The OCI digest, "sha256:<blob_id>"."""
        return "sha256:" + self.blob_id

    @property
    def media_type(self) -> str:
        return media.NYDUS_BLOB

    @property
    def data_size(self) -> int:
        """Bytes of chunk data at the start of the blob."""
        return self.entries[-1].compressed_end if self.entries else 0


# --------------------------------------------------------------------------- tar headers

def pack_tar_header(name: str, size: int) -> bytes:
    """A 512-byte GNU tar header for a regular file, as Nydus writes it (mode, ids, mtime 0)."""
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"tar member name {name!r} is longer than 100 bytes")
    h = bytearray(TAR_HEADER_SIZE)
    h[0:len(raw)] = raw
    if size < 8 ** 11:
        h[124:136] = b"%011o\0" % size
    else:                                          # GNU base-256 for sizes of 8 GiB and more
        h[124:136] = b"\x80" + size.to_bytes(11, "big")
    h[136:148] = b"%011o\0" % 0
    h[156:157] = b"0"
    h[257:265] = b"ustar  \0"
    h[148:156] = b" " * 8
    h[148:156] = b"%07o\0" % sum(h)
    return bytes(h)


def parse_tar_header(h: bytes) -> tuple[str, int] | None:
    """(name, size) of a regular-file tar header, or None if `h` is not a valid one."""
    if len(h) != TAR_HEADER_SIZE or h[257:262] != b"ustar" or h[156:157] not in (b"0", b"\0"):
        return None
    try:
        stored = int(h[148:156].split(b"\0")[0].strip() or b"-1", 8)
    except ValueError:
        return None
    if stored != sum(h[:148]) + 8 * 32 + sum(h[156:]):
        return None
    field = h[124:136]
    if field[0] & 0x80:
        size = int.from_bytes(field[1:], "big")
    else:
        try:
            size = int(field.split(b"\0")[0].strip() or b"0", 8)
        except ValueError:
            return None
    try:
        name = h[:100].split(b"\0")[0].decode()
    except UnicodeDecodeError:
        return None
    return name, size


# --------------------------------------------------------------------------- chunks

@dataclass(frozen=True, slots=True)
class PreparedChunk:
    """A chunk compressed and digested, ready for `BlobWriter.add_prepared` (or add_compressed)."""
    payload: bytes
    plain_size: int
    digest: bytes
    flags: int


def prepare_chunk(plain: bytes, compressor: str = "zstd", digester: str = "blake3",
                  chunk_digest: bytes | None = None) -> PreparedChunk:
    """Digest and compress one chunk; pure, thread-safe, so a pool can prepare chunks in parallel.

    A chunk that does not shrink is stored plain (flags without FLAG_COMPRESSED), as Nydus does
    (and as ci v1 requires: compressed means compressed size != plain size).
    """
    compressor = check_compressor(canonical_compressor(compressor))
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


def _where(entry: ChunkEntry, name: str) -> str:
    return (f"{name}: chunk #{entry.index} (uncompressed offset {entry.uncompressed_offset}, "
            f"{entry.uncompressed_size} bytes; compressed bytes "
            f"[{entry.compressed_offset}, {entry.compressed_end}))")


def decode_chunk(entry: ChunkEntry, payload: bytes, compressor: str, digester: str, *,
                 name: str = "blob") -> bytes:
    """The plain bytes of `entry` from its payload, verified; the one place chunks are checked.

    Decompresses (if the entry is compressed) to exactly its uncompressed size and checks the
    digest against `entry.digest`; IntegrityError naming the blob and chunk otherwise.
    """
    compressor = canonical_compressor(compressor)
    where = _where(entry, name)
    advice = "the blob is corrupt or was tampered with — drop it from the cache and fetch it again"
    if len(payload) != entry.compressed_size:
        raise IntegrityError(f"{where}: got {len(payload)} payload bytes, expected "
                             f"{entry.compressed_size}; {advice}")
    if entry.compressed:
        try:
            plain = decompress(compressor, payload, entry.uncompressed_size)
        except IntegrityError as e:
            raise IntegrityError(f"{where}: {e}; {advice}") from None
    elif entry.compressed_size != entry.uncompressed_size:
        raise IntegrityError(f"{where}: stored chunk has {entry.compressed_size} bytes for "
                             f"{entry.uncompressed_size} plain bytes; {advice}")
    else:
        plain = bytes(payload)
    got = digest_of(digester, plain)
    if got != entry.digest:
        raise IntegrityError(f"{where} failed its {digester} check: expected "
                             f"{bytes(entry.digest).hex()}, got {got.hex()}; {advice}")
    return plain


# --------------------------------------------------------------------------- writer

class BlobWriter:
    """Streams a Nydus RAFS v6 blob to a binary file object, hashing (sha256) all it writes.

    Holds at most one chunk's bytes (plus the chunk records) in memory. Never seeks, so
    `out` may be a pipe or an upload stream. Call `finish()` once, after the last chunk.
    Not thread-safe: prepare chunks in a pool with `prepare_chunk`, add them in order here.
    """

    def __init__(self, out: BinaryIO, compressor: str = "zstd", digester: str = "blake3"):
        self.compressor = check_compressor(canonical_compressor(compressor))
        self.digester = check_digester(digester)
        self._out = out
        self._sha = hashlib.sha256()
        self._pos = 0
        self._entries: list[ChunkEntry] = []
        self._data_size = 0                # bytes of chunk data written so far
        self._view_end = 0                 # end of the last chunk in the view (unaligned)
        self._summary: BlobSummary | None = None
        self._blob_meta_file: bytes | None = None

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

    @property
    def blob_meta_file(self) -> bytes:
        """After finish(): the ci array padded to 4 KiB + ci header, the `<id>.blob.meta` shape
        (nydusd's cache file, the bootstrap layer's `image/<digest>.blob.meta`); b"" if no chunks."""
        if self._summary is None:
            raise RuntimeError("blob_meta_file is known only after finish()")
        return self._blob_meta_file or b""

    # -- writing
    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view.nbytes:
            n = self._out.write(view)
            if n is None:                  # non-blocking raw stream that could not take it
                raise OSError("blob output stream would block; give BlobWriter a blocking stream")
            view = view[n:]
        self._sha.update(data)
        self._pos += len(data)

    def _check_open(self) -> None:
        if self._summary is not None:
            raise RuntimeError("BlobWriter.finish() was already called; start a new BlobWriter")

    def add_chunk(self, plain: bytes, digest: bytes | None = None) -> ChunkEntry:
        """Compress `plain` (1 byte..16 MiB) and append it; returns its entry.

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

        `payload` must be compressed with this writer's compressor and be smaller than the
        plain bytes if `flags` has FLAG_COMPRESSED, else be the plain bytes; `digest` made with
        this writer's digester. With `verify=True` the payload is decompressed and its digest
        checked first (IntegrityError if it does not match). Returns the entry, whose `index`
        is its position in the ci array.
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
            if not 0 < size < plain_size:
                raise ValueError(f"compressed payload is {size} bytes for {plain_size} plain bytes; "
                                 "a chunk that does not shrink must be stored plain (flags=0)")
        elif size != plain_size:
            raise ValueError(f"stored (uncompressed) chunk payload is {size} bytes "
                             f"but plain_size is {plain_size}")
        if len(self._entries) >= MAX_CHUNKS_PER_BLOB:
            raise ValueError(f"a blob holds at most {MAX_CHUNKS_PER_BLOB} chunks (24-bit ci index)")
        entry = ChunkEntry(align_up(self._view_end), plain_size, self._data_size, size,
                           bytes(digest), flags, len(self._entries))
        pack_ci_v1(entry)                  # ValueError now if v1 cannot express it
        if verify:
            decode_chunk(entry, payload, self.compressor, self.digester, name="chunk to copy")
        self._write(payload)
        self._data_size += size
        self._view_end = entry.uncompressed_end
        self._entries.append(entry)
        return entry

    def finish(self, bootstrap: bytes | None = None) -> BlobSummary:
        """Write the tar headers, ci array + header, blob.digest, [image.boot], ToC.

        `bootstrap`, if given, is inlined as the zstd-compressed `image.boot` member (as
        `--blob-inline-meta` does). Returns the summary; does not close `out`.
        """
        self._check_open()
        toc: list[TocEntry] = []
        n = len(self._entries)
        data_size = self._data_size
        view = align_up(self._view_end)
        self._write(pack_tar_header(TOC_BLOB_RAW, data_size))
        # Nydus's image.blob entry: sha256 of data + its tar header; offset == size (measured).
        toc.append(TocEntry(TOC_BLOB_RAW, TOC_NONE, self._sha.copy().digest(), data_size,
                            data_size, view))
        features = WRITER_FEATURES
        ci_offset = ci_size = 0
        if n:
            ci = b"".join(pack_ci_v1(e) for e in self._entries)
            ci_offset, ci_size = self._pos, len(ci)
            header = CiHeader(features, "none", n, ci_offset, ci_size, ci_size).pack()
            self._write(ci)
            self._write(header)
            self._write(pack_tar_header(TOC_BLOB_META, ci_size + CI_HEADER_SIZE))
            toc.append(TocEntry(TOC_BLOB_META, TOC_NONE, hashlib.sha256(ci).digest(),
                                ci_offset, ci_size, ci_size))
            toc.append(TocEntry(TOC_BLOB_META_HEADER, TOC_NONE, hashlib.sha256(header).digest(),
                                ci_offset + ci_size, CI_HEADER_SIZE, CI_HEADER_SIZE))
            digests = b"".join(e.digest for e in self._entries)
            off = self._pos
            self._write(digests)
            self._write(pack_tar_header(TOC_BLOB_DIGEST, len(digests)))
            toc.append(TocEntry(TOC_BLOB_DIGEST, TOC_NONE, hashlib.sha256(digests).digest(),
                                off, len(digests), len(digests)))
            self._blob_meta_file = ci + bytes(align_up(ci_size) - ci_size) + header
        else:
            features &= ~FEATURE_INLINED_CHUNK_DIGEST          # as Nydus: no ci, no digests
        if bootstrap is not None:
            plain = bytes(bootstrap)
            packed, flags = compress("zstd", plain), TOC_ZSTD
            if len(packed) >= len(plain):
                packed, flags = plain, TOC_NONE
            off = self._pos
            self._write(packed)
            self._write(pack_tar_header(TOC_BOOTSTRAP, len(packed)))
            toc.append(TocEntry(TOC_BOOTSTRAP, flags, hashlib.sha256(plain).digest(), off,
                                len(packed), len(plain)))
        toc_bytes = b"".join(t.pack() for t in toc)
        toc_tail = toc_bytes + pack_tar_header(TOC_NAME, len(toc_bytes))
        self._write(toc_tail)
        flush = getattr(self._out, "flush", None)
        if flush is not None:
            flush()
        self._summary = BlobSummary(
            blob_id=self._sha.hexdigest(), compressed_size=self._pos, uncompressed_size=view,
            chunk_count=n, compressor=self.compressor, digester=self.digester, features=features,
            ci_compressor="none", ci_offset=ci_offset, ci_compressed_size=ci_size,
            ci_uncompressed_size=ci_size, blob_toc_size=len(toc_tail),
            blob_toc_digest=hashlib.sha256(toc_tail).hexdigest(), entries=tuple(self._entries))
        return self._summary


# --------------------------------------------------------------------------- reading

ReadAt = Callable[[int, int], bytes]


def _read(read_at: ReadAt, offset: int, size: int, name: str, blob_size: int) -> bytes:
    data = read_at(offset, size)
    if len(data) != size:
        raise FormatError(
            f"{name}: short read at offset {offset}: wanted {size} bytes, got {len(data)}; "
            f"the blob is truncated or its size ({blob_size}) is wrong")
    return bytes(data)


def _is_zero_digest(d: str | bytes | None) -> bool:
    if d is None:
        return True
    if isinstance(d, str):
        d = d.removeprefix("sha256:")
        return not d.strip("0")
    return not any(d)


def _hex(d: str | bytes) -> str:
    if isinstance(d, str):
        return d.removeprefix("sha256:").lower()
    return bytes(d).hex()


def read_toc(read_at: ReadAt, blob_size: int, *, toc_size: int = 0,
             toc_digest: str | bytes | None = None, name: str = "blob") -> list[TocEntry]:
    """The ToC at the end of the blob (FormatError if it has none).

    `toc_size` / `toc_digest`, the blob table's blob_toc_size / blob_toc_digest, are checked
    when given (0 / all zeros mean unknown): IntegrityError on a digest mismatch.
    """
    tail_len = min(blob_size, _TOC_TAIL if not toc_size else max(toc_size, TAR_HEADER_SIZE))
    if tail_len < TAR_HEADER_SIZE:
        raise FormatError(f"{name}: {blob_size} bytes is too short to end with a ToC; "
                          "it is truncated or has no ToC")
    tail = _read(read_at, blob_size - tail_len, tail_len, name, blob_size)
    parsed = parse_tar_header(tail[-TAR_HEADER_SIZE:])
    if parsed is None or parsed[0] != TOC_NAME:
        raise FormatError(f"{name}: does not end with a '{TOC_NAME}' tar header: it has no ToC "
                          "(an old blob), is truncated, or has bytes appended")
    size = parsed[1]
    if size == 0 or size % TOC_ENTRY_SIZE or size + TAR_HEADER_SIZE > blob_size:
        raise FormatError(f"{name}: ToC size {size} is not a positive multiple of "
                          f"{TOC_ENTRY_SIZE} that fits in the blob")
    total = size + TAR_HEADER_SIZE
    if toc_size and toc_size != total:
        raise IntegrityError(f"{name}: the ToC is {total} bytes but the blob table says {toc_size}")
    if total <= tail_len:
        raw = tail[tail_len - total:]
    else:
        raw = _read(read_at, blob_size - total, total, name, blob_size)
    if not _is_zero_digest(toc_digest):
        got = hashlib.sha256(raw).hexdigest()
        if got != _hex(toc_digest):
            raise IntegrityError(
                f"{name}: ToC hashes to sha256:{got}, the blob table expects sha256:"
                f"{_hex(toc_digest)}: the blob does not belong to this image or was corrupted")
    limit = blob_size - total
    out = []
    for i, (flags, _r1, raw_name, sha, coff, csize, usize, _r2) in enumerate(
            TOC_ENTRY.iter_unpack(raw[:size])):
        try:
            ename = raw_name.rstrip(b"\0").decode()
        except UnicodeDecodeError:
            raise FormatError(f"{name}: ToC entry #{i} has a name that is not UTF-8") from None
        if flags not in _TOC_FLAG_COMPRESSOR:
            raise FormatError(f"{name}: ToC entry #{i} ({ename!r}) has unknown compression "
                              f"flags {flags:#x}")
        # image.blob: offset == size in real blobs (the data is [0, size)); bound the size only.
        start = 0 if ename == TOC_BLOB_RAW else coff
        if start + csize > limit:
            raise FormatError(f"{name}: ToC entry {ename!r} [{start}, {start + csize}) runs "
                              f"past the data before the ToC ({limit} bytes)")
        out.append(TocEntry(ename, flags, bytes(sha), coff, csize, usize))
    return out


def _find_toc(toc: Sequence[TocEntry], member: str) -> TocEntry | None:
    for t in toc:
        if t.name == member:
            return t
    return None


def toc_member(read_at: ReadAt, blob_size: int, member: str, toc: Sequence[TocEntry] | None = None,
               *, name: str = "blob") -> bytes:
    """The plain bytes of ToC member `member` (e.g. "image.boot"), sha256-checked.

    FormatError if the blob has no ToC or no such member; IntegrityError on a bad sha256.
    """
    if toc is None:
        toc = read_toc(read_at, blob_size, name=name)
    e = _find_toc(toc, member)
    if e is None:
        raise FormatError(f"{name}: the ToC has no {member!r} member "
                          f"(it has: {', '.join(t.name for t in toc)})")
    where = f"{name}: ToC member {member!r}"
    if member == TOC_BLOB_RAW:                       # hashed with its tar header; data at 0
        raw = _read(read_at, 0, e.compressed_size + TAR_HEADER_SIZE, name, blob_size)
        hashed, plain = raw, raw[:e.compressed_size]
    else:
        raw = _read(read_at, e.compressed_offset, e.compressed_size, name, blob_size)
        if e.compressor == "none":
            if e.compressed_size != e.uncompressed_size:
                raise FormatError(f"{where} is stored plain but its sizes differ "
                                  f"({e.compressed_size} / {e.uncompressed_size})")
            plain = raw
        else:
            try:
                plain = decompress(e.compressor, raw, e.uncompressed_size)
            except IntegrityError as err:
                raise IntegrityError(f"{where}: {err}") from None
        hashed = plain
    got = hashlib.sha256(hashed).digest()
    if got != e.sha256:
        raise IntegrityError(f"{where} hashes to sha256:{got.hex()}, the ToC says "
                             f"sha256:{e.sha256.hex()}: the blob is corrupt")
    return plain


@dataclass(frozen=True)
class BlobMeta:
    """A parsed ci header + ci array (+ chunk digests from blob.digest when present)."""
    version: int                   # ci format: 1 (16 B) or 2 (24 B)
    features: int
    compressor: str                # the chunks' compressor (from the blob table)
    digester: str | None
    ci_compressor: str
    ci_entries: int
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    zran_offset: int
    zran_size: int
    zran_count: int
    entries: list[ChunkEntry]      # in ci order; digest = bytes(32) when unknown
    has_digests: bool
    header: bytes = b""            # the raw 4096-byte header
    ci: bytes = b""                # the uncompressed ci array (+ zran/batch data)

    @property
    def chunk_count(self) -> int:
        return len(self.entries)

    @property
    def uncompressed_size(self) -> int:
        """The view the entries span (aligned end of the furthest chunk)."""
        return align_up(max((e.uncompressed_end for e in self.entries), default=0))

    @property
    def data_size(self) -> int:
        """End of the furthest chunk payload."""
        return max((e.compressed_end for e in self.entries), default=0)

    def cache_file(self) -> bytes:
        """The `<id>.blob.meta` shape: ci array padded to 4 KiB + ci header."""
        return self.ci + bytes(align_up(len(self.ci)) - len(self.ci)) + self.header


def parse_blob_meta(data: bytes, *, compressor: str, digester: str | None = None,
                    digests: bytes | None = None, name: str = "blob") -> BlobMeta:
    """Parse ci array + 4096-byte header: as in the blob (ci maybe compressed, then header) or as
    the `<id>.blob.meta` cache file / bootstrap-layer member (ci uncompressed, padded to 4 KiB).

    `digests` (blob.digest, 32 bytes per chunk) fills in the entries' digests. Unsupported
    blobs (zran, batch, encrypted, tarfs, separate) raise FormatError "... not supported: ...".
    """
    compressor = check_compressor(canonical_compressor(compressor), reading=True)
    if len(data) < CI_HEADER_SIZE:
        raise FormatError(f"{name}: blob meta is {len(data)} bytes, shorter than its "
                          f"{CI_HEADER_SIZE}-byte header: truncated")
    header_bytes = bytes(data[-CI_HEADER_SIZE:])
    h = CiHeader.unpack(header_bytes, name)
    body = memoryview(data)[:-CI_HEADER_SIZE]
    _check_features(h.features, name)
    if h.ci_entries == 0 or h.ci_entries > _READ_MAX_CHUNKS:
        raise FormatError(f"{name}: ci header has {h.ci_entries} entries (1..{_READ_MAX_CHUNKS})")
    version = 2 if h.features & FEATURE_CHUNK_INFO_V2 else 1
    esize = CI_V2_SIZE if version == 2 else CI_V1_SIZE
    if h.ci_uncompressed_size != h.ci_entries * esize:
        raise FormatError(f"{name}: ci header says {h.ci_uncompressed_size} uncompressed bytes for "
                          f"{h.ci_entries} v{version} entries of {esize} bytes")
    if h.ci_compressor == "none" and h.ci_compressed_size != h.ci_uncompressed_size:
        raise FormatError(f"{name}: uncompressed ci array with compressed size "
                          f"{h.ci_compressed_size} != {h.ci_uncompressed_size}")
    if len(body) == h.ci_compressed_size:                          # as inside the blob
        if h.ci_compressor == "none":
            ci = bytes(body)
        else:
            try:
                ci = decompress(h.ci_compressor, bytes(body), h.ci_uncompressed_size)
            except IntegrityError as e:
                raise IntegrityError(f"{name}: ci array: {e}") from None
    elif len(body) == align_up(h.ci_uncompressed_size):            # cache-file shape
        ci = bytes(body[:h.ci_uncompressed_size])
    else:
        raise FormatError(f"{name}: blob meta has {len(body)} bytes before its header; the header "
                          f"describes a ci array of {h.ci_compressed_size} bytes "
                          f"({h.ci_uncompressed_size} uncompressed)")
    n = h.ci_entries
    if digests is not None and len(digests) != n * DIGEST_SIZE:
        raise FormatError(f"{name}: blob.digest is {len(digests)} bytes, expected "
                          f"{n} x {DIGEST_SIZE}")
    if version == 1:
        raw = unpack_ci_v1(ci, n)
    else:
        raw = []
        for i, (uoff, usize, coff, csize, fl, _data) in enumerate(unpack_ci_v2(ci, n)):
            bad = [w for bit, w in ((CI_V2_ZRAN, "zran"), (CI_V2_BATCH, "batch"),
                                    (CI_V2_ENCRYPTED, "encrypted")) if fl & bit]
            if bad:
                raise FormatError(f"{name}: ci entry #{i}: not supported: {', '.join(bad)}")
            if fl & ~CI_V2_KNOWN:
                raise FormatError(f"{name}: ci entry #{i} has unknown flags {fl:#x}")
            raw.append((uoff, usize, coff, csize, FLAG_COMPRESSED if fl & CI_V2_COMPRESSED else 0))
    data_end = None
    if h.ci_offset:
        data_end = h.ci_offset - (TAR_HEADER_SIZE if h.features & FEATURE_HAS_TAR_HEADER else 0)
    entries: list[ChunkEntry] = []
    prev_end = 0
    for i, (uoff, usize, coff, csize, flags) in enumerate(raw):
        where = f"{name}: ci entry #{i} (uncompressed offset {uoff})"
        if usize == 0 or usize > CHUNK_SIZE_MAX:
            raise FormatError(f"{where}: uncompressed size {usize} is outside 1..{CHUNK_SIZE_MAX}")
        if flags & FLAG_COMPRESSED:
            if compressor == "none":
                raise FormatError(f"{where}: compressed chunk in a blob whose compressor is none")
            if csize == 0:
                raise FormatError(f"{where}: compressed size 0")
        elif csize != usize:
            raise FormatError(f"{where}: stored chunk with compressed size {csize} != {usize}")
        if uoff < prev_end:
            raise FormatError(f"{where}: overlaps or precedes the previous chunk, which ends "
                              f"at {prev_end} (ci entries are sorted by uncompressed offset)")
        if data_end is not None and coff + csize > data_end:
            raise FormatError(f"{where}: compressed range [{coff}, {coff + csize}) runs past the "
                              f"chunk data, which ends at {data_end}")
        prev_end = uoff + usize
        d = bytes(digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]) if digests is not None \
            else bytes(DIGEST_SIZE)
        entries.append(ChunkEntry(uoff, usize, coff, csize, d, flags, i))
    return BlobMeta(version, h.features, compressor, digester, h.ci_compressor, n, h.ci_offset,
                    h.ci_compressed_size, h.ci_uncompressed_size, h.zran_offset, h.zran_size,
                    h.zran_count, entries, digests is not None, header_bytes, ci)


def _info(info: Any, field: str, default: Any = None) -> Any:
    return getattr(info, field, default)


def read_blob_meta(read_at: ReadAt, blob_size: int, info: Any, *, name: str | None = None) -> BlobMeta:
    """The blob's own ci header + array (and blob.digest), checked against `info` (a BlobInfo).

    The ci is found by info's ci_offset / ci_compressed_size (as nydusd does) or, when those are
    0, by the ToC's blob.meta entry. When the blob has a ToC, its digest is checked against
    info.blob_toc_digest (if non-zero) and the ci array and header against the ToC's sha256s.
    """
    blob_id = _info(info, "blob_id", "")
    name = name or (f"blob {blob_id}" if blob_id else "blob")
    features = _info(info, "features", 0) or 0
    toc_size = _info(info, "blob_toc_size", 0) or 0
    toc = None
    if toc_size or features & FEATURE_HAS_TOC:
        toc = read_toc(read_at, blob_size, toc_size=toc_size,
                       toc_digest=_info(info, "blob_toc_digest"), name=name)
    ci_offset = _info(info, "ci_offset", 0) or 0
    ci_csize = _info(info, "ci_compressed_size", 0) or 0
    if not ci_csize:
        if toc is None:
            toc = read_toc(read_at, blob_size, name=name)
        e = _find_toc(toc, TOC_BLOB_META)
        if e is None:
            raise FormatError(f"{name}: the blob table has no ci location and the ToC no "
                              f"{TOC_BLOB_META!r} member")
        ci_offset, ci_csize = e.compressed_offset, e.compressed_size
    if ci_offset + ci_csize + CI_HEADER_SIZE > blob_size:
        raise FormatError(f"{name}: ci array + header [{ci_offset}, "
                          f"{ci_offset + ci_csize + CI_HEADER_SIZE}) run past the end of the "
                          f"blob ({blob_size} bytes): it is truncated")
    raw = _read(read_at, ci_offset, ci_csize + CI_HEADER_SIZE, name, blob_size)
    header = CiHeader.unpack(raw[-CI_HEADER_SIZE:], name)
    digests = None
    if (toc is not None and header.features & FEATURE_INLINED_CHUNK_DIGEST
            and _find_toc(toc, TOC_BLOB_DIGEST)):
        digests = toc_member(read_at, blob_size, TOC_BLOB_DIGEST, toc, name=name)
    meta = parse_blob_meta(raw, compressor=_info(info, "compressor", "zstd"),
                           digester=_info(info, "digester"), digests=digests, name=name)
    # nydusd's validate_header: the header must agree with the blob table. A blob that disagrees with
    # the (trusted) bootstrap is an IntegrityError, as a chunk that fails its digest is.
    want = {"ci_offset": ci_offset, "ci_compressed_size": ci_csize}
    if _info(info, "ci_compressed_size", 0):
        want["ci_uncompressed_size"] = _info(info, "ci_uncompressed_size", 0)
        want["ci_compressor"] = canonical_compressor(_info(info, "ci_compressor", "none"))
    count = _info(info, "chunk_count")
    if count is not None and not features & FEATURE_IS_CHUNKDICT_GENERATED:
        want["ci_entries"] = count
    for field, v in want.items():
        if getattr(meta, field) != v:
            raise IntegrityError(f"{name}: ci header has {field} {getattr(meta, field)!r}, the blob "
                              f"table says {v!r}")
    view = _info(info, "uncompressed_size")
    if view is not None and meta.uncompressed_size > align_up(view):
        raise IntegrityError(f"{name}: ci entries span {meta.uncompressed_size} bytes of view, the "
                          f"blob table says {view}")
    if meta.data_size > blob_size:
        raise FormatError(f"{name}: ci entries reach byte {meta.data_size} of a {blob_size}-byte "
                          "blob: it is truncated")
    if toc is not None:
        for member, plain in ((TOC_BLOB_META, meta.ci), (TOC_BLOB_META_HEADER, meta.header)):
            e = _find_toc(toc, member)
            if e is not None and hashlib.sha256(plain).digest() != e.sha256:
                raise IntegrityError(f"{name}: {member} does not match its sha256 in the ToC: "
                                     "the blob is corrupt")
    return meta


class ChunkNotFound(FormatError, KeyError):
    """No chunk of the blob covers the asked uncompressed offset (a FormatError and a KeyError)."""

    def __str__(self) -> str:                  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class BlobReader:
    """Random access to one blob's chunks over any `read_at(offset, size) -> bytes` callable.

    The chunks are `info.entries` (the bootstrap's chunk table: trusted digests, ci indexes);
    nothing is read at construction. `info.entries` may be a subset of the blob's chunks
    (a chunk-dict blob), so entries need not be back to back in the blob file. Every chunk
    served went through `decode_chunk`. Immutable, so thread-safe if `read_at` is.
    """

    def __init__(self, read_at: ReadAt, blob_size: int, info: Any, *, name: str | None = None):
        self._read_at = read_at
        self.blob_size = blob_size
        self.info = info
        self.blob_id = _info(info, "blob_id") or None
        self.name = name or (f"blob {self.blob_id}" if self.blob_id else "blob")
        self.compressor = check_compressor(canonical_compressor(_info(info, "compressor", "zstd")),
                                           reading=True)
        self.digester = check_digester(_info(info, "digester", "blake3"))
        entries = sorted(_info(info, "entries", ()) or (), key=lambda e: e.uncompressed_offset)
        self.entries: list[ChunkEntry] = entries
        view = _info(info, "uncompressed_size")
        self.uncompressed_size = align_up(view) if view is not None else \
            align_up(max((e.uncompressed_end for e in entries), default=0))
        prev_end = 0
        for e in entries:
            if e.uncompressed_offset < prev_end:
                raise FormatError(f"{_where(e, self.name)}: overlaps the previous chunk")
            prev_end = e.uncompressed_end
            if e.compressed_end > blob_size:
                raise FormatError(f"{_where(e, self.name)}: runs past the end of the "
                                  f"{blob_size}-byte blob: it is truncated or is not this blob")
        if prev_end > self.uncompressed_size:
            raise FormatError(f"{self.name}: chunks reach view offset {prev_end}, past the "
                              f"view size {self.uncompressed_size}")
        self._offsets = [e.uncompressed_offset for e in entries]

    # -- construction helpers
    @classmethod
    def from_bytes(cls, data: bytes, info: Any, **kw) -> "BlobReader":
        view = memoryview(data)
        return cls(lambda off, size: bytes(view[off:off + size]), len(data), info, **kw)

    @classmethod
    def from_file(cls, f: BinaryIO, info: Any, **kw) -> "BlobReader":
        """Over an open binary file (not closed by the reader); pread if it has a fileno."""
        try:
            fd = f.fileno()
        except (AttributeError, OSError):
            fd = None
        if fd is not None:
            size = os.fstat(fd).st_size
            return cls(lambda off, n: os.pread(fd, n, off), size, info, **kw)
        lock = threading.Lock()

        def read_at(off: int, n: int) -> bytes:
            with lock:
                f.seek(off)
                return f.read(n)
        with lock:
            size = f.seek(0, os.SEEK_END)
        return cls(read_at, size, info, **kw)

    # -- the blob's own metadata
    def read_toc(self) -> list[TocEntry]:
        return read_toc(self._read_at, self.blob_size,
                        toc_size=_info(self.info, "blob_toc_size", 0) or 0,
                        toc_digest=_info(self.info, "blob_toc_digest"), name=self.name)

    def read_meta(self) -> BlobMeta:
        return read_blob_meta(self._read_at, self.blob_size, self.info, name=self.name)

    # -- lookups
    def _read(self, offset: int, size: int) -> bytes:
        return _read(self._read_at, offset, size, self.name, self.blob_size)

    def find(self, uncompressed_offset: int) -> ChunkEntry:
        """The entry whose plain bytes cover `uncompressed_offset`; ChunkNotFound if none does."""
        i = bisect.bisect_right(self._offsets, uncompressed_offset) - 1
        if i >= 0 and uncompressed_offset < self.entries[i].uncompressed_end:
            return self.entries[i]
        raise ChunkNotFound(
            f"{self.name}: no chunk at uncompressed offset {uncompressed_offset} "
            f"(view is {self.uncompressed_size} bytes, {len(self.entries)} chunks): the "
            "bootstrap does not match this blob")

    def chunks_for_range(self, offset: int, size: int) -> list[ChunkEntry]:
        """Entries overlapping view range [offset, offset+size); padding between chunks reads as zeros."""
        if offset < 0 or size < 0:
            raise ValueError(f"bad range: offset {offset}, size {size}")
        end = offset + size
        if end > self.uncompressed_size:
            raise FormatError(
                f"{self.name}: range [{offset}, {end}) runs past the end of the uncompressed "
                f"view ({self.uncompressed_size} bytes)")
        if size == 0 or not self.entries:
            return []
        i = max(bisect.bisect_right(self._offsets, offset) - 1, 0)
        if self.entries[i].uncompressed_end <= offset:
            i += 1
        out = []
        while i < len(self.entries) and self.entries[i].uncompressed_offset < end:
            out.append(self.entries[i])
            i += 1
        return out

    @staticmethod
    def compressed_span(entries: Sequence[ChunkEntry], *, max_gap: int = 0) -> tuple[int, int]:
        """(offset, length) of one byte range covering `entries` (a merged range request).

        Entries must be in blob order with at most `max_gap` bytes between neighbours
        (ValueError otherwise); the bytes in the gaps are read but never served.
        """
        if not entries:
            raise ValueError("compressed_span needs at least one entry")
        end = entries[0].compressed_end
        for e in entries[1:]:
            if e.compressed_offset < end or e.compressed_offset - end > max_gap:
                raise ValueError(
                    f"entries are not in blob order with gaps of at most {max_gap} bytes: one "
                    f"ends at {end}, the next starts at {e.compressed_offset}; split them into "
                    "separate requests")
            end = e.compressed_end
        first = entries[0].compressed_offset
        return first, end - first

    # -- reading
    def decode(self, entry: ChunkEntry, payload: bytes) -> bytes:
        return decode_chunk(entry, payload, self.compressor, self.digester, name=self.name)

    def read_chunk(self, entry: ChunkEntry) -> bytes:
        """Fetch, decompress and verify one chunk; IntegrityError names the blob and chunk."""
        return self.decode(entry, self._read(entry.compressed_offset, entry.compressed_size))

    def read_chunks(self, entries: Sequence[ChunkEntry], *,
                    max_gap: int = MAX_MERGE_GAP) -> list[bytes]:
        """Entries in blob order (gaps <= max_gap) with one backend read; each verified."""
        off, length = self.compressed_span(entries, max_gap=max_gap)
        data = memoryview(self._read(off, length))
        out = []
        for e in entries:
            start = e.compressed_offset - off
            out.append(self.decode(e, data[start:start + e.compressed_size]))
        return out

    @staticmethod
    def _batches(entries: Sequence[ChunkEntry], limit: int,
                 max_gap: int = MAX_MERGE_GAP) -> Iterator[list[ChunkEntry]]:
        """Runs of entries in blob order, small gaps, each at most `limit` bytes (or one entry)."""
        batch: list[ChunkEntry] = []
        for e in entries:
            if batch:
                end = batch[-1].compressed_end
                if (e.compressed_offset < end or e.compressed_offset - end > max_gap
                        or e.compressed_end - batch[0].compressed_offset > limit):
                    yield batch
                    batch = []
            batch.append(e)
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

    def verify_all(self, *, sha256: bool = False, batch_bytes: int = _BATCH_BYTES) -> int:
        """Read and verify every entry; returns the count.

        With `sha256=True` the whole blob file is streamed once and its sha256 must equal the
        blob id (true of blobs pynydus/nydusify push; not of every Nydus blob).
        """
        by_coff = sorted(self.entries, key=lambda e: (e.compressed_offset, e.index))
        if not sha256:
            count = 0
            for batch in self._batches(by_coff, batch_bytes):
                count += len(self.read_chunks(batch))
            return count
        if not self.blob_id:
            raise ValueError(f"{self.name}: no blob id to check the sha256 against")
        sha = hashlib.sha256()
        buf = bytearray()
        buf_start = pos = 0                    # file offset of buf[0]; next offset to read
        for e in by_coff:
            while pos < e.compressed_offset:   # bytes before the entry: hash, don't keep
                n = min(batch_bytes, e.compressed_offset - pos)
                sha.update(self._read(pos, n))
                pos += n
                buf.clear()
                buf_start = pos
            if e.compressed_offset > buf_start:
                del buf[:e.compressed_offset - buf_start]
                buf_start = e.compressed_offset
            while pos < e.compressed_end:      # read ahead: the next entries come in the batch
                n = min(batch_bytes, self.blob_size - pos)
                piece = self._read(pos, n)
                sha.update(piece)
                buf += piece
                pos += n
            start = e.compressed_offset - buf_start
            self.decode(e, bytes(buf[start:start + e.compressed_size]))
        while pos < self.blob_size:
            n = min(batch_bytes, self.blob_size - pos)
            sha.update(self._read(pos, n))
            pos += n
        if sha.hexdigest() != self.blob_id:
            raise IntegrityError(
                f"{self.name}: the blob's sha256 is {sha.hexdigest()}, not its id; "
                "it is corrupt or was replaced — fetch it again")
        return len(by_coff)
