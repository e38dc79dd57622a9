"""nydusd's load-time rules for RAFS v6 bootstraps and data blobs, checked without pynydus.

An independent second reader for the conformance tests of issue 10: it parses every structure itself
(``struct`` + zstandard/lz4/blake3 directly) and imports nothing from ``rafs`` or ``converter``, so a
bug in pynydus's own reader cannot hide the same bug in its writer.

The rules are those the Nydus sources (dragonflyoss/nydus, read at commit 34e6071e) apply when they
load an image, each violation tagged with the function it comes from:

* bootstrap: ``RafsV6SuperBlock::validate`` and ``RafsV6SuperBlockExt::validate``
  (rafs/src/metadata/layout/v6.rs), ``RafsSuper::try_load_v6`` (rafs/src/metadata/md_v6.rs: known
  ``RafsSuperFlags``), ``DirectSuperBlockV6::update_state`` (rafs/src/metadata/direct_v6.rs: blob
  table inside the file), ``RafsV6BlobTable::load`` / ``RafsV6Blob::validate``,
  ``rafsv6_load_blob_extra_info`` / ``RafsV6Device::validate`` (device slots), ``RafsV6InodeChunkAddr``
  (``blob_index``, ``validate``), ``OndiskInodeWrapper::validate`` / ``data_block_offset`` /
  ``chunk_addresses`` (inode shapes), ``DirectSuperBlockV6::load_chunk_map`` + ``DirectChunkInfoV6``
  (the 80-byte ``RafsV5ChunkInfo`` chunk table of rafs/src/metadata/layout/v5.rs, and that every chunk
  index resolves in it), ``RafsV6PrefetchTable`` (u32 nids; md_v6.rs ``prefetch_data_v6``);
* blob: ``BlobCompressionContextInfo::new`` / ``read_metadata`` / ``validate_header``
  (storage/src/meta/mod.rs: ci array + 4 KiB header vs. the blob table), ``BlobChunkInfoV1Ondisk``
  and ``BlobChunkInfoV2Ondisk`` (chunk_info_v1.rs / chunk_info_v2.rs: bit layout and ``validate``),
  ``BlobMetaChunkArray::_get_chunks_uncompressed`` (ci entries in uncompressed order, each starting
  at the 4 KiB-aligned end of the previous one), ``BlobInfo::compressed_data_size``
  (storage/src/device.rs: chunk data ends at ci_offset, minus a 512-byte tar header with
  HAS_TAR_HEADER), ``BlobFeatures::try_from`` (device.rs), ``TocEntryList::parse_toc_header`` /
  ``TocEntry::extract_from_*`` / ``extract_from_blob`` (storage/src/meta/toc.rs: the reverse-tar ToC,
  its sha256, per-entry sha256s, ``blob.digest`` size), utils/src/compress (chunk payloads:
  zstd frame, raw lz4 block, gzip) and utils/src/digest.rs (blake3 0, sha256 1).

``strict=True`` adds what nydus-image 2.x always writes and pynydus promises to write as well
(builder/src/core/v6.rs ``dump_bootstrap``/``v6_align_mapped_blkaddr``, builder/src/core/blob.rs
``dump_meta_data``, builder/src/lib.rs ``dump_toc``; builder/src/core/chunk_dict.rs
``DigestWithBlobIndex`` order): first 1 KiB zero, a device slot per blob with the blob's id and
block count, ``s_blocks`` = their sum, ``mapped_blkaddr`` consecutive after the bootstrap in 512 KiB
steps, chunk table last and sorted by (digest, blob index), blob id 64 lowercase hex, ci header
features = blob table features, chunk data back to back, every ToC member framed by its GNU tar
header with a valid checksum and the chain reaching offset 0, ``s_inos`` = distinct inodes, the
pynydus ranged-prefetch record (if any) in the gap before the meta area.

API::

    check_bootstrap(data, strict=False) -> list[str]             # [] = every rule holds
    check_blob(data, entry, chunks=None, strict=False) -> list[str]
    check_image(bootstrap, blobs, strict=False) -> list[str]     # both + cross checks
    build_views(bootstrap, blob_dir, outdir, files=None) -> {blob_index: view path}
    extract_tree(bootstrap_path, views, outdir)                  # fsck.erofs --device=... --extract=

Violations read "<rule>: <what is wrong>", e.g. ``"sb.incompat: ..."``; tests match on the rule.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO.parent / "shared" / "fixtures" / "nydus"


def fixtures_dir() -> Path:
    """The real Nydus images, or pytest.skip naming the folder where they are absent."""
    if not (FIXTURES / "rafs-v6-2.2.boot").is_file():
        import pytest
        pytest.skip(f"Nydus fixtures not found in {FIXTURES} (see ../shared/fixtures/nydus/README.md)")
    return FIXTURES


class RuleError(Exception):
    """Input too broken to go on parsing (the message is the violation)."""


# ----------------------------------------------------------------------------------------- constants

BLOCK = 4096
SB_OFFSET = 1024
SB_SIZE = 128
EXT_SB_OFFSET = SB_OFFSET + SB_SIZE          # 1152
DEVTABLE_OFFSET = EXT_SB_OFFSET + 256        # 1408 = slot 11
DEVICE_SLOT = 128
BLOB_ENTRY = 256
CHUNK_INFO = 80
INODE_SLOT = 32
DIRENT = 12
MAX_CHUNK_SIZE = 16 << 20                    # storage/src/lib.rs RAFS_MAX_CHUNK_SIZE
MAX_CHUNKS_PER_BLOB = 1 << 24                # RAFS_MAX_CHUNKS_PER_BLOB
BLOB_MAX_UNCOMPRESSED = 1 << 44              # v6.rs BLOB_MAX_SIZE_UNCOMPRESSED
BLOB_MAX_COMPRESSED = 1 << 40
MAPPED_ALIGN = 0x8_0000                      # builder v6.rs V6_BLOCK_SEG_ALIGNMENT

EROFS_MAGIC = 0xE0F5E1E2
COMPAT_RAFS_V6 = 0x4000_0000
INCOMPAT_CHUNKED_FILE = 0x4
INCOMPAT_DEVICE_TABLE = 0x8

# RafsSuperFlags (rafs/src/metadata/mod.rs)
SF_COMP_NONE, SF_COMP_LZ4, SF_HASH_BLAKE3, SF_HASH_SHA256 = 0x1, 0x2, 0x4, 0x8
SF_EXPLICIT_UID_GID, SF_HAS_XATTR, SF_COMP_GZIP, SF_COMP_ZSTD = 0x10, 0x20, 0x40, 0x80
SF_INLINED_CHUNK_DIGEST, SF_TARFS = 0x100, 0x200
SF_KNOWN = 0x3FF | 0xFF00_0000               # incl. ENCRYPTION_* and PRESERVED_COMPAT_*
SF_COMPRESSION = {SF_COMP_NONE: 0, SF_COMP_LZ4: 1, SF_COMP_GZIP: 2, SF_COMP_ZSTD: 3}
SF_HASH = {SF_HASH_BLAKE3: 0, SF_HASH_SHA256: 1}

# utils/src/compress/mod.rs, utils/src/digest.rs, utils/src/crypt.rs
COMPRESSORS = {0: "none", 1: "lz4_block", 2: "gzip", 3: "zstd"}
DIGESTERS = {0: "blake3", 1: "sha256"}
CIPHERS = {0: "none", 1: "aes128xts", 2: "aes256xts", 3: "aes256gcm"}

# BlobFeatures (storage/src/device.rs)
F_ALIGNED, F_INLINED_FS_META, F_CHUNK_INFO_V2, F_ZRAN = 0x1, 0x2, 0x4, 0x8
F_SEPARATE, F_INLINED_CHUNK_DIGEST, F_TARFS, F_BATCH = 0x10, 0x20, 0x40, 0x80
F_ENCRYPTED, F_CHUNKDICT, F_SEP_PREFETCH, F_EXTERNAL = 0x100, 0x200, 0x400, 0x800
F_HAS_TAR_HEADER, F_HAS_TOC, F_CAP_TAR_TOC, F_V5_NO_EXT = 0x1000_0000, 0x2000_0000, 0x4000_0000, 0x8000_0000
F_INCOMPAT_MASK, F_INCOMPAT_VALUE = 0xFFFF, 0x0FFF

# BlobChunkFlags (device.rs), chunk table
CF_COMPRESSED, CF_HOLE, CF_ENCRYPTED, CF_BATCH, CF_CRC32 = 0x1, 0x2, 0x4, 0x8, 0x10
CF_KNOWN = 0x1F

# ci header (storage/src/meta/mod.rs)
CI_MAGIC = 0xB10BB10B
CI_HEADER = 4096
CI_V1, CI_V2 = 16, 24
CI_V1_MAX = MAX_CHUNK_SIZE * 16
CI_V2_MAX = MAX_CHUNK_SIZE * 24

# ToC (storage/src/meta/toc.rs)
TOC_ENTRY = 128
TOC_NONE, TOC_ZSTD, TOC_LZ4 = 0x1, 0x2, 0x4
TOC_NAMES = ("image.blob", "blob.meta", "blob.meta.header", "blob.digest", "image.boot")
TAR_BLOCK = 512
GNU_MAGIC = b"ustar  \x00"

PYNYDUS_MAGIC = b"PYNYDUS\x00"

S_IFMT, S_IFDIR, S_IFREG, S_IFLNK = 0o170000, 0o040000, 0o100000, 0o120000
LAYOUT_FLAT_PLAIN, LAYOUT_FLAT_INLINE, LAYOUT_CHUNK_BASED = 0, 2, 4
CHUNK_FORMAT_INDEXES = 0x20
CHUNK_FORMAT_BLKBITS_MASK = 0x1F
NULL_ADDR = 0xFFFF_FFFF


def _align(n: int, a: int = BLOCK) -> int:
    return (n + a - 1) // a * a


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# ----------------------------------------------------------------------------------------- structures

@dataclass
class SuperBlock:                    # RafsV6SuperBlock, 128 B @1024
    magic: int
    checksum: int
    feature_compat: int
    blkszbits: int
    extslots: int
    root_nid: int
    inos: int
    build_time: int
    build_time_nsec: int
    blocks: int
    meta_blkaddr: int
    xattr_blkaddr: int
    uuid: bytes
    volume_name: bytes
    feature_incompat: int
    s_u: int
    extra_devices: int
    devt_slotoff: int

    FMT = "<IIIBBHQQIIII16s16sIHHH"

    @classmethod
    def parse(cls, data: bytes) -> "SuperBlock":
        return cls(*struct.unpack_from(cls.FMT, data, SB_OFFSET))

    @property
    def block_size(self) -> int:
        return 512 if self.blkszbits == 9 else BLOCK


@dataclass
class ExtSuperBlock:                 # RafsV6SuperBlockExt, 256 B @1152
    flags: int
    blob_table_offset: int
    blob_table_size: int
    chunk_size: int
    chunk_table_offset: int
    chunk_table_size: int
    prefetch_table_offset: int
    prefetch_table_size: int
    padding: int

    FMT = "<QQIIQQQII"

    @classmethod
    def parse(cls, data: bytes) -> "ExtSuperBlock":
        return cls(*struct.unpack_from(cls.FMT, data, EXT_SB_OFFSET))


@dataclass
class Device:                        # RafsV6Device, 128 B
    blob_id: bytes
    blocks: int
    mapped_blkaddr: int
    reserved: bytes

    @classmethod
    def parse(cls, data: bytes, off: int) -> "Device":
        blocks, mapped = struct.unpack_from("<II", data, off + 64)
        return cls(bytes(data[off:off + 64]), blocks, mapped, bytes(data[off + 72:off + 128]))


@dataclass
class BlobEntry:                     # RafsV6Blob, 256 B
    blob_id_raw: bytes
    blob_index: int
    chunk_size: int
    chunk_count: int
    compression_algo: int
    digest_algo: int
    features: int
    compressed_size: int
    uncompressed_size: int
    blob_toc_size: int
    ci_compressor: int
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    blob_toc_digest: bytes
    blob_meta_digest: bytes
    blob_meta_size: int
    cipher_iv: bytes
    cipher_algo: int
    reserved: bytes

    FMT = "<64sIIIIIIQQIIQQQ32s32sQ8sI36s"

    @classmethod
    def parse(cls, data: bytes, off: int) -> "BlobEntry":
        return cls(*struct.unpack_from(cls.FMT, data, off))

    def pack(self) -> bytes:
        return struct.pack(self.FMT, self.blob_id_raw, self.blob_index, self.chunk_size, self.chunk_count,
                           self.compression_algo, self.digest_algo, self.features, self.compressed_size,
                           self.uncompressed_size, self.blob_toc_size, self.ci_compressor, self.ci_offset,
                           self.ci_compressed_size, self.ci_uncompressed_size, self.blob_toc_digest,
                           self.blob_meta_digest, self.blob_meta_size, self.cipher_iv, self.cipher_algo,
                           self.reserved)

    @property
    def blob_id(self) -> str:
        return self.blob_id_raw.split(b"\0", 1)[0].decode("ascii", "replace")

    def has(self, feature: int) -> bool:
        return bool(self.features & feature)

    @property
    def compressed_data_size(self) -> int:
        """BlobInfo::compressed_data_size (storage/src/device.rs)."""
        if self.has(F_SEPARATE):
            return self.compressed_size
        if self.has(F_CAP_TAR_TOC):
            if self.ci_compressed_size and self.ci_uncompressed_size:
                return self.ci_offset - (TAR_BLOCK if self.has(F_HAS_TAR_HEADER) else 0)
            return self.compressed_size - (TAR_BLOCK if self.has(F_HAS_TAR_HEADER) else 0)
        return self.compressed_size


@dataclass(frozen=True)
class ChunkInfo:                     # RafsV5ChunkInfo, 80 B (rafs/src/metadata/layout/v5.rs)
    digest: bytes
    blob_index: int
    flags: int
    compressed_size: int
    uncompressed_size: int
    compressed_offset: int
    uncompressed_offset: int
    file_offset: int
    index: int
    crc32: int

    FMT = "<32sIIIIQQQII"

    @classmethod
    def parse(cls, data: bytes, off: int) -> "ChunkInfo":
        return cls(*struct.unpack_from(cls.FMT, data, off))


@dataclass(frozen=True)
class CiEntry:                       # BlobChunkInfoV1Ondisk / V2Ondisk, decoded
    uncompressed_offset: int
    uncompressed_size: int
    compressed_offset: int
    compressed_size: int
    compressed: bool
    flags: int = 0                   # v2 flag byte
    data: int = 0                    # v2 misc

    @property
    def uncompressed_end(self) -> int:
        return self.uncompressed_offset + self.uncompressed_size

    @property
    def compressed_end(self) -> int:
        return self.compressed_offset + self.compressed_size


def decode_ci_v1(raw: bytes, i: int) -> CiEntry:
    """chunk_info_v1.rs: uncomp u64 = uoff bits 12-43 | (usize-1) low 20 bits @44, high 4 bits @8;
    comp u64 = coff bits 0-39 | (csize-1) low 20 bits @44, high 4 bits @40. compressed <=> sizes differ."""
    u, c = struct.unpack_from("<QQ", raw, i * CI_V1)
    usize = ((u >> 44) | ((u & 0xF00) << 12)) + 1
    csize = ((c >> 44) | ((c & 0xF00_0000_0000) >> 20)) + 1
    return CiEntry(u & 0xFFF_FFFF_F000, usize, c & 0xFF_FFFF_FFFF, csize, csize != usize, 0, u & 0xFF)


def decode_ci_v2(raw: bytes, i: int) -> CiEntry:
    """chunk_info_v2.rs: uncomp u64 = uoff>>12 bits 0-31 | (usize-1) bits 32-55 | flags bits 56-63;
    comp u64 = coff bits 0-39 | csize (not minus one) bits 40-63; data u64."""
    u, c, d = struct.unpack_from("<QQQ", raw, i * CI_V2)
    flags = u >> 56
    return CiEntry((u & 0xFFFF_FFFF) << 12, ((u >> 32) & 0xFF_FFFF) + 1, c & 0xFF_FFFF_FFFF,
                   c >> 40, bool(flags & 1), flags, d)


@dataclass(frozen=True)
class CiHeader:                      # BlobCompressionContextHeader, 4096 B
    magic: int
    features: int
    ci_compressor: int
    ci_entries: int
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    zran_offset: int
    zran_size: int
    zran_count: int
    magic2: int

    @classmethod
    def parse(cls, raw: bytes) -> "CiHeader":
        f = struct.unpack_from("<IIIIQQQQQI", raw, 0)
        return cls(*f, struct.unpack_from("<I", raw, CI_HEADER - 4)[0])


@dataclass(frozen=True)
class TocEntry:                      # toc.rs TocEntry, 128 B
    flags: int
    reserved1: int
    name_raw: bytes
    sha256: bytes
    compressed_offset: int
    compressed_size: int
    uncompressed_size: int

    @classmethod
    def parse(cls, raw: bytes, off: int) -> "TocEntry":
        return cls(*struct.unpack_from("<II16s32sQQQ", raw, off))

    @property
    def name(self) -> str:
        return self.name_raw.rstrip(b"\0").decode("utf-8", "replace")


@dataclass(frozen=True)
class TarMember:                     # a reverse-tar member: 512-B GNU header AFTER its data
    name: str
    header_offset: int
    data_offset: int
    size: int


@dataclass
class Inode:
    nid: int
    offset: int
    extended: bool
    format: int
    xattr_icount: int
    mode: int
    nlink: int
    size: int
    i_u: int
    ino: int
    uid: int
    gid: int

    @property
    def layout(self) -> int:
        return (self.format >> 1) & 0x7

    @property
    def inode_size(self) -> int:
        return 64 if self.extended else 32

    @property
    def xattr_size(self) -> int:
        return 12 + (self.xattr_icount - 1) * 4 if self.xattr_icount else 0

    @property
    def body_end(self) -> int:
        return self.offset + self.inode_size + self.xattr_size

    @property
    def kind(self) -> int:
        return self.mode & S_IFMT


@dataclass
class Bootstrap:
    data: bytes
    sb: SuperBlock
    ext: ExtSuperBlock
    devices: list[Device]
    blobs: list[BlobEntry]
    chunks: list[ChunkInfo]
    prefetch: list[int]
    inodes: dict[int, Inode] = field(default_factory=dict)       # reachable, by nid
    paths: dict[int, list[bytes]] = field(default_factory=dict)  # nid -> paths
    chunk_addrs: dict[int, list[tuple[int, int, int, int]]] = field(default_factory=dict)
    # nid -> [(lo, hi, blkaddr, file chunk index)]

    @property
    def meta_offset(self) -> int:
        return self.sb.meta_blkaddr * self.sb.block_size

    def inode_offset(self, nid: int) -> int:
        return self.meta_offset + nid * INODE_SLOT


def parse_bootstrap(data: bytes, *, walk: bool = True, problems: list[str] | None = None) -> Bootstrap:
    """Parse the tables (and, with `walk`, the inode tree) of a RAFS v6 bootstrap.

    Raises RuleError when the header is too broken to read on; tree problems found while walking are
    appended to `problems` (when given)."""
    data = bytes(data)
    if len(data) < EXT_SB_OFFSET + 256:
        raise RuleError(f"sb.size: bootstrap of {len(data)} bytes is smaller than its superblocks")
    sb = SuperBlock.parse(data)
    ext = ExtSuperBlock.parse(data)
    devices = []
    for i in range(sb.extra_devices):
        off = sb.devt_slotoff * DEVICE_SLOT + i * DEVICE_SLOT
        if off + DEVICE_SLOT > len(data):
            break
        devices.append(Device.parse(data, off))
    blobs = []
    if ext.blob_table_size % BLOB_ENTRY == 0 and ext.blob_table_offset + ext.blob_table_size <= len(data):
        blobs = [BlobEntry.parse(data, ext.blob_table_offset + i * BLOB_ENTRY)
                 for i in range(ext.blob_table_size // BLOB_ENTRY)]
    chunks = []
    if ext.chunk_table_size % CHUNK_INFO == 0 and ext.chunk_table_offset + ext.chunk_table_size <= len(data):
        chunks = [ChunkInfo.parse(data, ext.chunk_table_offset + i * CHUNK_INFO)
                  for i in range(ext.chunk_table_size // CHUNK_INFO)]
    prefetch = []
    if ext.prefetch_table_size and ext.prefetch_table_offset \
            and ext.prefetch_table_offset + ext.prefetch_table_size <= len(data):
        n = ext.prefetch_table_size // 4
        prefetch = list(struct.unpack_from(f"<{n}I", data, ext.prefetch_table_offset))
    boot = Bootstrap(data, sb, ext, devices, blobs, chunks, prefetch)
    if walk:
        _walk(boot, problems if problems is not None else [])
    return boot


# ----------------------------------------------------------------------------------------- inode tree

def _read_inode(boot: Bootstrap, nid: int) -> Inode:
    off = boot.inode_offset(nid)
    d = boot.data
    if off + 32 > len(d):
        raise RuleError(f"inode.range: nid {nid} at {off} is beyond the bootstrap ({len(d)} bytes)")
    fmt = struct.unpack_from("<H", d, off)[0]
    if fmt & 1:
        if off + 64 > len(d):
            raise RuleError(f"inode.range: extended nid {nid} at {off} is cut off")
        (fmt, icount, mode, _r, size, i_u, ino, uid, gid, _mt, _mtn, nlink) = \
            struct.unpack_from("<HHHHQIIIIQII", d, off)
        return Inode(nid, off, True, fmt, icount, mode, nlink, size, i_u, ino, uid, gid)
    (fmt, icount, mode, nlink, size, _r, i_u, ino, uid, gid) = struct.unpack_from("<HHHHIIIIHH", d, off)
    return Inode(nid, off, False, fmt, icount, mode, nlink, size, i_u, ino, uid, gid)


def _flat_data(boot: Bootstrap, ino: Inode, problems: list[str], what: str) -> bytes | None:
    """The data of a FLAT_PLAIN / FLAT_INLINE inode (direct_v6.rs data_block_offset)."""
    bs = boot.sb.block_size
    d = boot.data
    if ino.format & ~0xF:
        problems.append(f"inode.format: {what} (nid {ino.nid}) has format 0x{ino.format:x} with bits "
                        "nydusd does not know (data_block_offset)")
        return None
    if ino.layout == LAYOUT_FLAT_PLAIN:
        start = ino.i_u * bs
        if start + ino.size > len(d):
            problems.append(f"inode.range: {what} (nid {ino.nid}) data [{start}, +{ino.size}) beyond the bootstrap")
            return None
        return d[start:start + ino.size]
    if ino.layout == LAYOUT_FLAT_INLINE:
        full = ino.size // bs * bs
        tail = ino.size - full
        if tail == 0 and full:
            full -= bs
            tail = bs
        start = ino.i_u * bs
        inline = ino.body_end
        if full and start + full > len(d):
            problems.append(f"inode.range: {what} (nid {ino.nid}) blocks beyond the bootstrap")
            return None
        if inline % bs + tail > bs:
            problems.append(f"inode.inline: {what} (nid {ino.nid}) inline tail of {tail} bytes at {inline} "
                            "crosses a block boundary")
            return None
        if inline + tail > len(d):
            problems.append(f"inode.range: {what} (nid {ino.nid}) inline tail beyond the bootstrap")
            return None
        return d[start:start + full] + d[inline:inline + tail]
    problems.append(f"inode.layout: {what} (nid {ino.nid}) has data layout {ino.layout}; nydusd reads "
                    "directories and symlinks only as FLAT_PLAIN (0) or FLAT_INLINE (2)")
    return None


def _dirents(boot: Bootstrap, ino: Inode, data: bytes, path: bytes,
             problems: list[str]) -> list[tuple[bytes, int, int]]:
    bs = boot.sb.block_size
    out: list[tuple[bytes, int, int]] = []
    prev_last: bytes | None = None
    for bstart in range(0, len(data), bs):
        blk = data[bstart:bstart + bs]
        if len(blk) < DIRENT:
            problems.append(f"dir.dirent: {_p(path)} block {bstart // bs} too short for a dirent")
            break
        first_off = struct.unpack_from("<H", blk, 8)[0]
        if first_off % DIRENT or first_off == 0 or first_off > len(blk):
            problems.append(f"dir.dirent: {_p(path)} block {bstart // bs} has first nameoff {first_off}")
            break
        n = first_off // DIRENT
        ents = [struct.unpack_from("<QHBB", blk, i * DIRENT) for i in range(n)]
        names = []
        for i, (nid, nameoff, ftype, _r) in enumerate(ents):
            end = ents[i + 1][1] if i + 1 < n else len(blk)
            if not (first_off <= nameoff <= end <= len(blk)):
                problems.append(f"dir.dirent: {_p(path)} entry {i} name [{nameoff}, {end}) out of order/range")
                return out
            name = blk[nameoff:end]
            if i + 1 == n:
                name = name.split(b"\0", 1)[0]
            if not name:
                problems.append(f"dir.dirent: {_p(path)} has an empty name")
            names.append(name)
            out.append((name, nid, ftype))
        if names != sorted(names):
            problems.append(f"dir.sorted: {_p(path)} block {bstart // bs} names are not sorted by bytes "
                            "(nydusd and the kernel binary-search them)")
        if prev_last is not None and names and names[0] <= prev_last:
            problems.append(f"dir.sorted: {_p(path)} block {bstart // bs} starts at or before the previous block's end")
        if names:
            prev_last = names[-1]
    return out


def _p(path: bytes) -> str:
    return (path or b"/").decode("utf-8", "backslashreplace")


def _walk(boot: Bootstrap, problems: list[str]) -> None:
    """Walk the tree from the root nid; fill boot.inodes / paths / chunk_addrs and report shape rules."""
    stack = [(boot.sb.root_nid, b"/", boot.sb.root_nid)]
    seen_dirs: set[int] = set()
    while stack:
        nid, path, parent = stack.pop()
        try:
            ino = boot.inodes.get(nid) or _read_inode(boot, nid)
        except RuleError as e:
            problems.append(f"{e} (path {_p(path)})")
            continue
        first = nid not in boot.inodes
        boot.inodes[nid] = ino
        boot.paths.setdefault(nid, []).append(path)
        if not first and ino.kind != S_IFDIR:
            continue
        if ino.nlink == 0:
            problems.append(f"inode.nlink: {_p(path)} (nid {nid}) has nlink 0 (OndiskInodeWrapper::validate)")
        kind = ino.kind
        if kind == S_IFDIR:
            if nid in seen_dirs:
                problems.append(f"dir.loop: directory nid {nid} reached twice ({_p(path)})")
                continue
            seen_dirs.add(nid)
            data = _flat_data(boot, ino, problems, f"directory {_p(path)}")
            if data is None:
                continue
            ents = _dirents(boot, ino, data, path, problems)
            names = {n: (c, t) for n, c, t in ents}
            if names.get(b".", (None,))[0] != nid:
                problems.append(f"dir.dot: {_p(path)} has no '.' pointing at itself")
            if names.get(b"..", (None,))[0] != parent:
                problems.append(f"dir.dotdot: {_p(path)} has no '..' pointing at its parent")
            for name, child, _t in ents:
                if name in (b".", b".."):
                    continue
                if b"/" in name:
                    problems.append(f"dir.name: {_p(path)} has an entry with '/' in its name")
                    continue
                stack.append((child, (path if path != b"/" else b"") + b"/" + name, nid))
        elif kind == S_IFLNK:
            if ino.size == 0:
                problems.append(f"inode.symlink: {_p(path)} has an empty target (OndiskInodeWrapper::validate)")
            else:
                _flat_data(boot, ino, problems, f"symlink {_p(path)}")
        elif kind == S_IFREG:
            _chunk_indexes(boot, ino, path, problems)


def _chunk_indexes(boot: Bootstrap, ino: Inode, path: bytes, problems: list[str]) -> None:
    """RafsV6InodeChunkAddr array of a regular file (direct_v6.rs chunk_addresses / validate)."""
    if ino.size == 0:
        return
    where = f"{_p(path)} (nid {ino.nid})"
    if ino.layout != LAYOUT_CHUNK_BASED or ino.format & ~0xF:
        problems.append(f"inode.layout: regular file {where} has format 0x{ino.format:x}; nydusd only reads "
                        "CHUNK_BASED (4) regular files")
        return
    if not ino.i_u & CHUNK_FORMAT_INDEXES:
        problems.append(f"inode.chunk_format: {where} i_u 0x{ino.i_u:x} lacks EROFS_CHUNK_FORMAT_INDEXES "
                        "(nydusd reads 8-byte chunk indexes)")
        return
    if ino.i_u & ~(CHUNK_FORMAT_INDEXES | CHUNK_FORMAT_BLKBITS_MASK):
        problems.append(f"inode.chunk_format: {where} i_u 0x{ino.i_u:x} sets unknown chunk format bits "
                        "(48-bit indexes would make the kernel use the ci bits as block bits)")
    cs = boot.ext.chunk_size or 1
    count = -(-ino.size // cs)
    base = _align(ino.body_end, 8)
    if base + count * 8 > len(boot.data):
        problems.append(f"inode.range: {where} chunk index array ({count} entries at {base}) beyond the bootstrap")
        return
    addrs = []
    for k in range(count):
        lo, hi, blk = struct.unpack_from("<HHI", boot.data, base + k * 8)
        addrs.append((lo, hi, blk, k))
    boot.chunk_addrs[ino.nid] = addrs
    kbits = boot.sb.blkszbits + (ino.i_u & CHUNK_FORMAT_BLKBITS_MASK)
    kcs = 1 << kbits
    if kcs < cs:
        problems.append(f"inode.chunk_bits: {where} declares {kcs}-byte chunks, smaller than the superblock's "
                        f"{cs}: the kernel would read past the {count} indexes written")
    elif kcs > cs and count > 1:
        lo0, hi0, blk0, _ = addrs[0]
        for lo, hi, blk, k in addrs[1:]:
            if (hi & 0xFF) != (hi0 & 0xFF) or blk != blk0 + k * cs // boot.sb.block_size:
                problems.append(f"inode.chunk_bits: {where} declares {kcs}-byte chunks (kernel uses index 0 "
                                f"only) but chunk {k} is not contiguous with chunk 0")
                break


# ----------------------------------------------------------------------------------------- bootstrap rules

def check_bootstrap(data: bytes, *, strict: bool = False) -> list[str]:
    """Every load-time rule nydusd applies to a RAFS v6 bootstrap ([] = all hold).

    strict=True adds nydus-image 2.x's writer conventions (see the module docstring)."""
    v: list[str] = []
    data = bytes(data)
    size = len(data)
    try:
        boot = parse_bootstrap(data, walk=False)
    except RuleError as e:
        return [str(e)]
    sb, ext = boot.sb, boot.ext

    # --- RafsV6SuperBlock::validate (v6.rs)
    if size < BLOCK:
        v.append(f"sb.size: bootstrap of {size} bytes is smaller than 4096")
    bs = 512 if sb.blkszbits == 9 else BLOCK
    if size % bs:
        v.append(f"sb.size: bootstrap size {size} is not a multiple of {bs}")
    if sb.meta_blkaddr * bs > size:
        v.append(f"sb.meta_blkaddr: meta block {sb.meta_blkaddr} is beyond the {size}-byte bootstrap")
    if sb.magic != EROFS_MAGIC:
        v.append(f"sb.magic: 0x{sb.magic:x} is not the EROFS magic 0x{EROFS_MAGIC:x}")
        return v
    if sb.checksum:
        v.append(f"sb.checksum: must be 0, is 0x{sb.checksum:x}")
    if sb.blkszbits not in (9, 12):
        v.append(f"sb.blkszbits: {sb.blkszbits} is neither 12 nor 9")
    if sb.extslots:
        v.append(f"sb.extslots: must be 0, is {sb.extslots}")
    if sb.inos == 0:
        v.append("sb.inos: inode count is 0")
    if sb.s_u:
        v.append(f"sb.s_u: union field must be 0, is {sb.s_u}")
    if sb.xattr_blkaddr:
        v.append(f"sb.xattr_blkaddr: shared xattrs are unsupported, xattr_blkaddr is {sb.xattr_blkaddr}")
    if sb.extra_devices == 0 and sb.blocks not in (0, 4096):
        v.append(f"sb.blocks: {sb.blocks} blocks with no extra devices (only 0 or the old fixed 4096 pass)")
    if sb.devt_slotoff * DEVICE_SLOT != DEVTABLE_OFFSET:
        v.append(f"sb.devt_slotoff: {sb.devt_slotoff} (device table at {sb.devt_slotoff * DEVICE_SLOT}), "
                 f"must be {DEVTABLE_OFFSET // DEVICE_SLOT} ({DEVTABLE_OFFSET})")
    devslot_end = sb.devt_slotoff * DEVICE_SLOT + sb.extra_devices * DEVICE_SLOT
    if devslot_end > size:
        v.append(f"sb.extra_devices: {sb.extra_devices} device slots run past the bootstrap's end")
    if sb.feature_incompat != INCOMPAT_CHUNKED_FILE | INCOMPAT_DEVICE_TABLE:
        v.append(f"sb.incompat: feature_incompat 0x{sb.feature_incompat:x}, must be exactly 0xc "
                 "(CHUNKED_FILE | DEVICE_TABLE)")
    if not sb.feature_compat & COMPAT_RAFS_V6:
        v.append(f"sb.compat: feature_compat 0x{sb.feature_compat:x} lacks RAFS_V6 (0x40000000)")

    # --- RafsV6SuperBlockExt::validate (v6.rs) + RafsSuperFlags::from_bits (md_v6.rs)
    if ext.flags & ~SF_KNOWN:
        v.append(f"ext.flags: unknown RafsSuperFlags bits 0x{ext.flags & ~SF_KNOWN:x}")
    comp_bits = [b for b in SF_COMPRESSION if ext.flags & b]
    if len(comp_bits) != 1:
        v.append(f"ext.flags: {len(comp_bits)} compression flags set in 0x{ext.flags:x}, need exactly one")
    hash_bits = [b for b in SF_HASH if ext.flags & b]
    if len(hash_bits) != 1:
        v.append(f"ext.flags: {len(hash_bits)} digest flags set in 0x{ext.flags:x}, need exactly one")
    if not _pow2(ext.chunk_size) or not BLOCK <= ext.chunk_size <= MAX_CHUNK_SIZE:
        v.append(f"ext.chunk_size: {ext.chunk_size} is not a power of two in [4096, 16 MiB]")
    # nydusd computes devslot_end before it knows the blob table size (meta.blob_table_size is still
    # 0 there); the device slots themselves are what must not be overlapped.
    bto, bts = ext.blob_table_offset, ext.blob_table_size
    if bto % BLOCK or bto < BLOCK or bto < devslot_end or bts % BLOB_ENTRY or bto + bts > size:
        v.append(f"ext.blob_table: offset 0x{bto:x}/size 0x{bts:x} invalid (4 KiB aligned, after the device "
                 "slots, a multiple of 256, inside the file)")
    if bto + bts > size or bto < BLOCK:           # DirectSuperBlockV6::update_state
        v.append("ext.blob_table: blob table is not inside [4096, file end) (update_state)")
    blob_range = (bto, bto + bts)
    cto, cts = ext.chunk_table_offset, ext.chunk_table_size
    chunk_range = None
    if cts:
        if cto < BLOCK or cto % BLOCK or cto < devslot_end or cts % CHUNK_INFO or cto + cts > size:
            v.append(f"ext.chunk_table: offset 0x{cto:x}/size 0x{cts:x} invalid (4 KiB aligned, after the device "
                     "slots, a multiple of 80, inside the file)")
        chunk_range = (cto, cto + cts)
        if _intersect(blob_range, chunk_range):
            v.append("ext.chunk_table: blob table intersects the chunk table")
    pto, pts = ext.prefetch_table_offset, ext.prefetch_table_size
    if pts and pto:
        if pto < BLOCK or pts % 4 or pto < devslot_end or pto + pts > size:
            v.append(f"ext.prefetch_table: offset 0x{pto:x}/size 0x{pts:x} invalid (>= 4096, a multiple of 4, "
                     "after the device slots, inside the file)")
        pr = (pto, pto + pts)
        if _intersect(blob_range, pr):
            v.append("ext.prefetch_table: blob table intersects the prefetch table")
        if chunk_range and _intersect(chunk_range, pr):
            v.append("ext.prefetch_table: chunk table intersects the prefetch table")

    # --- RafsV6BlobTable::load / RafsV6Blob::validate
    tarfs = bool(ext.flags & SF_TARFS)
    for i, b in enumerate(boot.blobs):
        v += [f"blob[{i}].{m}" for m in _blob_entry_rules(b, i, ext.chunk_size, tarfs)]
    if len(boot.blobs) > 254:
        v.append(f"blob.count: {len(boot.blobs)} blobs; a chunk index holds blob_index+1 in 8 bits (< 255)")

    # --- rafsv6_load_blob_extra_info / RafsV6Device::validate
    ids = set()
    for i, d in enumerate(boot.devices):
        try:
            d.blob_id.decode("utf-8")
        except UnicodeDecodeError:
            v.append(f"device[{i}].blob_id: not UTF-8")
        if d.blocks == 0:
            v.append(f"device[{i}].blocks: 0 (RafsV6Device::validate needs blocks != 0)")
        if d.blob_id in ids:
            v.append(f"device[{i}].blob_id: duplicated blob id in the device table")
        ids.add(d.blob_id)

    # --- chunk table (RafsV5ChunkInfo; load_chunk_map / DirectChunkInfoV6)
    for i, c in enumerate(boot.chunks):
        where = f"chunk[{i}]"
        if c.blob_index >= len(boot.blobs):
            v.append(f"{where}.blob_index: {c.blob_index} but the blob table has {len(boot.blobs)} entries")
            continue
        b = boot.blobs[c.blob_index]
        if c.flags & ~CF_KNOWN:
            v.append(f"{where}.flags: unknown chunk flags 0x{c.flags:x}")
        if c.flags & CF_HOLE:
            v.append(f"{where}.flags: HOLECHUNK is not a RAFS v6 chunk")
        if c.index >= b.chunk_count and not b.has(F_CHUNKDICT):
            v.append(f"{where}.index: ci index {c.index} >= blob {c.blob_index}'s chunk_count {b.chunk_count}")
        if c.index > 0xFF_FFFF:
            v.append(f"{where}.index: ci index {c.index} does not fit the 24 bits of a chunk index")
        if c.uncompressed_size == 0 or c.uncompressed_size > ext.chunk_size:
            v.append(f"{where}.uncompressed_size: {c.uncompressed_size} not in [1, chunk_size {ext.chunk_size}]")
        if not tarfs and c.uncompressed_offset % BLOCK:
            v.append(f"{where}.uncompressed_offset: {c.uncompressed_offset} not 4 KiB aligned (ALIGNED blob)")
        if c.uncompressed_offset + c.uncompressed_size > _align(b.uncompressed_size):
            v.append(f"{where}.uncompressed_offset: chunk ends at {c.uncompressed_offset + c.uncompressed_size}, "
                     f"past blob {c.blob_index}'s uncompressed size {b.uncompressed_size}")
        if bool(c.flags & CF_COMPRESSED) != (c.compressed_size != c.uncompressed_size) \
                and not c.flags & (CF_ENCRYPTED | CF_BATCH):
            v.append(f"{where}.flags: COMPRESSED={bool(c.flags & CF_COMPRESSED)} but csize {c.compressed_size} "
                     f"usize {c.uncompressed_size} (ci v1 decides compression by csize != usize)")
        if c.compressed_size == 0 and not c.flags & CF_BATCH:
            v.append(f"{where}.compressed_size: 0")
    keys = [(c.digest, c.blob_index + 1) for c in boot.chunks]
    if len(set(keys)) != len(keys):
        v.append("chunk_table.unique: a (digest, blob) pair appears twice in the chunk table")

    # --- the inode tree
    tree: list[str] = []
    try:
        _walk(boot, tree)
    except RuleError as e:
        tree.append(str(e))
    v += tree
    if sb.root_nid not in boot.inodes or boot.inodes[sb.root_nid].kind != S_IFDIR:
        v.append(f"sb.root_nid: root nid {sb.root_nid} is not a directory")
    chunk_keys = {}
    for i, c in enumerate(boot.chunks):
        if c.blob_index < 256:
            chunk_keys.setdefault((c.blob_index + 1, c.index, c.uncompressed_offset // bs), i)
    use_table = not (ext.flags & SF_INLINED_CHUNK_DIGEST)
    if use_table and not boot.chunks and boot.chunk_addrs:
        v.append("chunk_table.missing: no chunk table, and without INLINED_CHUNK_DIGEST nydusd resolves every "
                 "chunk index through it")
    reported = 0
    for nid, addrs in boot.chunk_addrs.items():
        path = _p(boot.paths[nid][0])
        for lo, hi, blk, k in addrs:
            dev = hi & 0xFF
            ci = ((hi >> 8) << 16) | lo
            msg = None
            if blk == NULL_ADDR:
                msg = f"chunkaddr.hole: {path} chunk {k} is an EROFS hole; RAFS v6 has no holes"
            elif dev == 0:
                msg = f"chunkaddr.blob_index: {path} chunk {k} has device 0 (\"invalid zero blob index\")"
            elif dev - 1 >= len(boot.blobs):
                msg = f"chunkaddr.blob_index: {path} chunk {k} names blob {dev - 1}, table has {len(boot.blobs)}"
            elif ci >= boot.blobs[dev - 1].chunk_count and not boot.blobs[dev - 1].has(F_CHUNKDICT):
                msg = (f"chunkaddr.ci_index: {path} chunk {k} ci index {ci} >= chunk_count "
                       f"{boot.blobs[dev - 1].chunk_count} of blob {dev - 1}")
            elif boot.chunks and (dev, ci, blk) not in chunk_keys:
                msg = (f"chunkaddr.chunk_table: {path} chunk {k} (blob {dev - 1}, ci {ci}, block {blk}) has no "
                       "chunk table entry (load_chunk_map: \"failed to get chunk info\")")
            if msg:
                reported += 1
                if reported <= 20:
                    v.append(msg)
    if reported > 20:
        v.append(f"chunkaddr: ... {reported - 20} more chunk index problems")
    if boot.devices and boot.chunk_addrs:
        mask = (1 << (sb.extra_devices).bit_length()) - 1
        for addrs in boot.chunk_addrs.values():
            if any((hi & mask) != (hi & 0xFF) for _l, hi, _b, _k in addrs):
                v.append(f"chunkaddr.device_mask: the kernel's device_id_mask 0x{mask:x} does not isolate the "
                         "blob index from the ci bits")
                break

    # --- prefetch table (nids)
    for n in boot.prefetch:
        if n == 0:
            continue                    # padding ("inode number 0 is invalid ... aligned")
        if n not in boot.inodes:
            v.append(f"prefetch.nid: prefetch entry {n} is not an inode of the tree")

    if strict:
        v += _strict_bootstrap(boot)
    return v


def _intersect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1] and a[0] != a[1] and b[0] != b[1]


def _blob_entry_rules(b: BlobEntry, idx: int, chunk_size: int, tarfs: bool) -> list[str]:
    """RafsV6Blob::validate (v6.rs) + BlobFeatures::try_from (device.rs) + to_blob_info."""
    v = []
    try:
        b.blob_id_raw.decode("utf-8")
    except UnicodeDecodeError:
        v.append("blob_id: not UTF-8")
    if b.blob_index != idx:
        v.append(f"blob_index: {b.blob_index} at table position {idx}")
    if not _pow2(b.chunk_size) or not BLOCK <= b.chunk_size <= MAX_CHUNK_SIZE or b.chunk_size != chunk_size:
        v.append(f"chunk_size: {b.chunk_size}, must be a power of two in [4096, 16 MiB] equal to the "
                 f"extended superblock's {chunk_size}")
    if b.chunk_count > MAX_CHUNKS_PER_BLOB:
        v.append(f"chunk_count: {b.chunk_count} > 2^24")
    for name, val, table in (("compression_algo", b.compression_algo, COMPRESSORS),
                             ("ci_compressor", b.ci_compressor, COMPRESSORS),
                             ("digest_algo", b.digest_algo, DIGESTERS), ("cipher_algo", b.cipher_algo, CIPHERS)):
        if val not in table:
            v.append(f"{name}: unknown id {val}")
    if b.uncompressed_size > BLOB_MAX_UNCOMPRESSED:
        v.append(f"uncompressed_size: {b.uncompressed_size} > 2^44")
    if b.compressed_size > BLOB_MAX_COMPRESSED:
        v.append(f"compressed_size: {b.compressed_size} > 2^40")
    f = b.features
    if f & F_INCOMPAT_MASK & ~F_INCOMPAT_VALUE or f & F_V5_NO_EXT:
        v.append(f"features: invalid blob features 0x{f:x} (BlobFeatures::try_from)")
    if not f & F_ALIGNED and not tarfs:
        v.append(f"features: 0x{f:x} lacks ALIGNED")
    if f & F_ALIGNED and tarfs:
        v.append("features: ALIGNED set in TARFS mode")
    if b.ci_offset + b.ci_compressed_size >= 1 << 64:
        v.append("ci_offset: ci_offset + ci_compressed_size wraps around")
    if b.ci_compressed_size > b.ci_uncompressed_size:
        v.append(f"ci_compressed_size: {b.ci_compressed_size} > ci_uncompressed_size {b.ci_uncompressed_size}")
    n = b.chunk_count
    special = f & (F_BATCH | F_ZRAN | F_ENCRYPTED)
    if f & F_CHUNK_INFO_V2 and special:
        if b.ci_uncompressed_size < n * CI_V2:
            v.append(f"ci_uncompressed_size: {b.ci_uncompressed_size} < {n} v2 entries")
    elif f & F_CHUNK_INFO_V2:
        if b.ci_uncompressed_size != n * CI_V2:
            v.append(f"ci_uncompressed_size: {b.ci_uncompressed_size} != 24 * chunk_count {n}")
    elif special:
        v.append(f"features: BATCH/ZRAN/ENCRYPTED 0x{f:x} without CHUNK_INFO_V2")
    elif not f & F_CHUNKDICT and not tarfs and b.ci_uncompressed_size != n * CI_V1:
        v.append(f"ci_uncompressed_size: {b.ci_uncompressed_size} != 16 * chunk_count {n}")
    return v


def _strict_bootstrap(boot: Bootstrap) -> list[str]:
    """What nydus-image 2.x writes (builder/src/core/v6.rs dump_bootstrap) and pynydus must too."""
    v = []
    sb, ext, data = boot.sb, boot.ext, boot.data
    if any(data[:SB_OFFSET]):
        v.append("strict.head: bytes 0..1024 are not zero")
    if sb.blkszbits != 12:
        v.append(f"strict.blkszbits: {sb.blkszbits}, nydus-image writes 12 outside tarfs")
    if sb.extra_devices != len(boot.blobs):
        v.append(f"strict.devices: {sb.extra_devices} device slots for {len(boot.blobs)} blobs")
    total = 0
    prev_end = len(data)               # devices are mapped after the bootstrap, one after the other
    for i, (d, b) in enumerate(zip(boot.devices, boot.blobs)):
        if d.blob_id != b.blob_id_raw:
            v.append(f"strict.device[{i}].blob_id: {d.blob_id[:16]!r}... differs from blob table id "
                     f"{b.blob_id[:16]}...")
        if d.blocks != b.uncompressed_size // BLOCK:
            v.append(f"strict.device[{i}].blocks: {d.blocks}, blob uncompressed_size/4096 is "
                     f"{b.uncompressed_size // BLOCK}")
        # v6_align_mapped_blkaddr: the previous end rounded up to 512 KiB (nydus-image >= 2.3) or to 2 MiB
        # (2.2, the fixture: 512 blocks after a 20 KiB bootstrap)
        at = d.mapped_blkaddr * BLOCK
        if at % MAPPED_ALIGN or not _align(prev_end, MAPPED_ALIGN) <= at <= _align(prev_end, 4 * MAPPED_ALIGN):
            v.append(f"strict.device[{i}].mapped_blkaddr: {d.mapped_blkaddr}; nydus-image maps device {i} at "
                     f"{_align(prev_end, MAPPED_ALIGN) // BLOCK} (512 KiB steps) or "
                     f"{_align(prev_end, 4 * MAPPED_ALIGN) // BLOCK} (2 MiB, nydus-image 2.2)")
        total += d.blocks
        prev_end = at + d.blocks * BLOCK
        if any(d.reserved):
            v.append(f"strict.device[{i}].reserved: not zero")
    if sb.blocks != total:
        v.append(f"strict.sb.blocks: s_blocks {sb.blocks}, sum of device blocks {total}")
    for i, b in enumerate(boot.blobs):
        bid = b.blob_id_raw
        if len(bid) != 64 or any(ch not in b"0123456789abcdef" for ch in bid):
            v.append(f"strict.blob[{i}].blob_id: {bid[:70]!r} is not 64 lowercase hex digits")
        if b.uncompressed_size % BLOCK:
            v.append(f"strict.blob[{i}].uncompressed_size: {b.uncompressed_size} not a 4 KiB multiple")
        if b.digest_algo != SF_HASH.get(ext.flags & (SF_HASH_BLAKE3 | SF_HASH_SHA256), -1):
            v.append(f"strict.blob[{i}].digest_algo: {b.digest_algo} differs from the superblock's digester")
        if any(b.reserved) or b.cipher_algo or any(b.cipher_iv):
            v.append(f"strict.blob[{i}].reserved: reserved/cipher fields not zero")
        if b.chunk_count == 0:
            v.append(f"strict.blob[{i}].chunk_count: a blob without chunks in the table")
    if ext.flags & SF_TARFS:
        v.append("strict.ext.flags: TARFS_MODE")
    if any(data[EXT_SB_OFFSET + 56:EXT_SB_OFFSET + 256]) or ext.padding:
        v.append("strict.ext.reserved: not zero")
    if any(data[SB_OFFSET + 90:SB_OFFSET + 128]):
        v.append("strict.sb.reserved: not zero")
    # chunk table: last thing in the file, sorted as DigestWithBlobIndex (digest, blob_index+1)
    cto, cts = ext.chunk_table_offset, ext.chunk_table_size
    if boot.chunk_addrs and not cts:
        v.append("strict.chunk_table: missing")
    if cts and _align(cto + cts) != len(data):
        v.append(f"strict.chunk_table: ends at {cto + cts}, the bootstrap at {len(data)}; nothing may follow it")
    keys = [(c.digest, c.blob_index + 1) for c in boot.chunks]
    if keys != sorted(keys):
        v.append("strict.chunk_table.sorted: entries not in (digest, blob index) order")
    if any(c.crc32 and not c.flags & CF_CRC32 for c in boot.chunks):
        v.append("strict.chunk_table: crc32 set without HAS_CRC32")
    if any(c.file_offset % ext.chunk_size for c in boot.chunks if ext.chunk_size):
        v.append("strict.chunk_table: a file_offset is not a multiple of the chunk size")
    used = {(d, ci) for addrs in boot.chunk_addrs.values() for _lo, hi, _b, _k in addrs
            for d, ci in [((hi & 0xFF) - 1, ((hi >> 8) << 16) | _lo)]}
    listed = {(c.blob_index, c.index) for c in boot.chunks}
    if cts and used - listed:
        v.append(f"strict.chunk_table: {len(used - listed)} referenced chunks missing")
    if cts and listed - used:
        v.append(f"strict.chunk_table: {len(listed - used)} entries no file references")
    # inode count
    distinct = len(boot.inodes)
    if sb.inos != distinct:
        v.append(f"strict.sb.inos: s_inos {sb.inos}, the tree has {distinct} distinct inodes")
    # prefetch table: nonzero nids only, inside the gap before the meta area
    meta = boot.meta_offset
    tables_end = max(ext.blob_table_offset + ext.blob_table_size,
                     (ext.prefetch_table_offset + ext.prefetch_table_size) if ext.prefetch_table_size else 0)
    if tables_end > meta:
        v.append(f"strict.layout: blob/prefetch tables end at {tables_end}, after the meta area at {meta}")
    if meta % BLOCK:
        v.append("strict.layout: meta area not 4 KiB aligned")
    # the pynydus ranged-prefetch record: "PYNYDUS\0" u32 version u32 len JSON, in the gap before meta
    at = data.find(PYNYDUS_MAGIC, 0, meta)
    if at >= 0:
        if at < tables_end:
            v.append(f"strict.pynydus_record: at {at}, inside the blob/prefetch tables (end {tables_end})")
        if at + 16 > meta:
            v.append("strict.pynydus_record: header crosses into the meta area")
        else:
            _ver, ln = struct.unpack_from("<II", data, at + 8)
            if at + 16 + ln > meta:
                v.append(f"strict.pynydus_record: {ln} bytes of JSON run into the meta area at {meta}")
            else:
                import json
                try:
                    json.loads(data[at + 16:at + 16 + ln])
                except ValueError as e:
                    v.append(f"strict.pynydus_record: JSON does not parse: {e}")
    return v


# ----------------------------------------------------------------------------------------- blobs

def _decompress(payload: bytes, algo: int, size: int) -> bytes:
    """utils/src/compress decompress(): exactly `size` bytes or an exception."""
    if algo == 0:
        out = payload
    elif algo == 1:
        import lz4.block
        out = lz4.block.decompress(payload, uncompressed_size=size)
    elif algo == 2:
        out = gzip.decompress(payload)
    elif algo == 3:
        import zstandard
        out = zstandard.ZstdDecompressor().decompress(payload, max_output_size=max(size, 1))
    else:
        raise ValueError(f"unknown compressor id {algo}")
    if len(out) != size:
        raise ValueError(f"decompressed to {len(out)} bytes, expected {size}")
    return out


def _digest(data: bytes, algo: int) -> bytes:
    if algo == 0:
        import blake3
        return blake3.blake3(data).digest()
    if algo == 1:
        return hashlib.sha256(data).digest()
    raise ValueError(f"unknown digester id {algo}")


def tar_header_ok(h: bytes) -> str | None:
    """None if `h` is a 512-byte GNU header of a regular file with a valid checksum, else why not."""
    if len(h) != TAR_BLOCK:
        return "short header"
    if h[257:265] != GNU_MAGIC:
        return f"magic {h[257:265]!r} is not the GNU 'ustar  \\0'"
    if h[156:157] not in (b"0", b"\0"):
        return f"type flag {h[156:157]!r} is not a regular file"
    try:
        want = int(h[148:156].strip(b"\0 ") or b"x", 8)
    except ValueError:
        return f"unreadable checksum field {h[148:156]!r}"
    got = sum(h[:148]) + 8 * 32 + sum(h[156:])
    if want != got:
        return f"checksum {want} != computed {got}"
    try:
        _tar_size(h)
    except ValueError:
        return f"unreadable size field {h[124:136]!r}"
    return None


def _tar_size(h: bytes) -> int:
    raw = h[124:136]
    if raw[0] & 0x80:                        # GNU base-256
        return int.from_bytes(raw[1:], "big")
    return int(raw.strip(b"\0 ") or b"0", 8)


def _tar_name(h: bytes) -> str:
    return h[:100].split(b"\0", 1)[0].decode("utf-8", "replace")


def reverse_tar(data: bytes, end: int | None = None) -> tuple[list[TarMember], str | None]:
    """Walk the reverse tar from `end` (default: the blob's end) towards 0: members last-first, and
    None or the reason the walk stopped before reaching offset 0."""
    pos = len(data) if end is None else end
    out: list[TarMember] = []
    while pos > 0:
        if pos < TAR_BLOCK:
            return out, f"{pos} bytes left before the first tar header"
        h = data[pos - TAR_BLOCK:pos]
        why = tar_header_ok(h)
        if why:
            return out, f"tar header at {pos - TAR_BLOCK}: {why}"
        size = _tar_size(h)
        start = pos - TAR_BLOCK - size
        if start < 0:
            return out, f"tar member {_tar_name(h)!r} of {size} bytes starts before the blob"
        out.append(TarMember(_tar_name(h), pos - TAR_BLOCK, start, size))
        pos = start
    return out, None


def read_toc(data: bytes, toc_size: int = 0) -> tuple[list[TocEntry], bytes]:
    """TocEntryList::parse_toc_header: the ToC at the blob's end (toc_size bytes, or auto-detected from the
    last 4 KiB) -> (entries, the bytes its sha256 covers). Raises RuleError."""
    if toc_size:
        if toc_size > len(data):
            raise RuleError(f"toc.size: blob_toc_size {toc_size} > blob size {len(data)}")
        buf = data[len(data) - toc_size:]
    else:
        n = 0x1000 if len(data) > 0x1000 else len(data) >> 7 << 7
        buf = data[len(data) - n:]
    if len(buf) < TAR_BLOCK:
        raise RuleError(f"toc.size: ToC area of {len(buf)} bytes is too small")
    h = buf[-TAR_BLOCK:]
    why = tar_header_ok(h)
    if why:
        raise RuleError(f"toc.header: {why}")
    if _tar_name(h) != "rafs.blob.toc":
        raise RuleError(f"toc.header: last tar member is {_tar_name(h)!r}, not rafs.blob.toc")
    size = _tar_size(h)
    if size > len(buf) - TAR_BLOCK:
        raise RuleError(f"toc.header: ToC of {size} bytes does not fit before its header")
    if size % TOC_ENTRY:
        raise RuleError(f"toc.header: ToC size {size} is not a multiple of 128")
    body = buf[len(buf) - TAR_BLOCK - size:]
    return [TocEntry.parse(body, i) for i in range(0, size, TOC_ENTRY)], body


def toc_member(data: bytes, e: TocEntry) -> bytes:
    """TocEntry::extract_from_buf: the plain bytes of a ToC entry, sha256-checked. Raises RuleError."""
    if e.compressed_offset + e.compressed_size > len(data):
        raise RuleError(f"toc.{e.name}: [{e.compressed_offset}, +{e.compressed_size}) beyond the blob")
    raw = data[e.compressed_offset:e.compressed_offset + e.compressed_size]
    c = e.flags & 0xF
    if e.flags & ~0xF or c not in (TOC_NONE, TOC_ZSTD, TOC_LZ4):
        raise RuleError(f"toc.{e.name}: flags 0x{e.flags:x} name no single known compressor")
    if c == TOC_LZ4:
        raise RuleError(f"toc.{e.name}: lz4_block ToC members cannot be extracted by nydusd")
    if c == TOC_NONE and e.compressed_size != e.uncompressed_size:
        raise RuleError(f"toc.{e.name}: uncompressed member with csize {e.compressed_size} != usize "
                        f"{e.uncompressed_size}")
    try:
        plain = raw if c == TOC_NONE else _decompress(raw, 3, e.uncompressed_size)
    except Exception as ex:                              # noqa: BLE001 - a rule violation
        raise RuleError(f"toc.{e.name}: does not decompress: {ex}") from None
    if len(plain) != e.uncompressed_size:
        raise RuleError(f"toc.{e.name}: {len(plain)} bytes, ToC says {e.uncompressed_size}")
    if hashlib.sha256(plain).digest() != e.sha256:
        raise RuleError(f"toc.{e.name}: sha256 of the content does not match the ToC entry")
    return plain


def inlined_bootstrap(data: bytes) -> bytes:
    """The image.boot a blob carries in its ToC (nydusd's extract_rafs_meta path). Raises RuleError."""
    entries, _ = read_toc(data)
    for e in entries:
        if e.name == "image.boot":
            return toc_member(data, e)
    raise RuleError("toc.image.boot: the blob's ToC has no image.boot")


def read_ci(data: bytes, entry: BlobEntry) -> tuple[CiHeader, list[CiEntry], bytes]:
    """read_metadata + validate_header + BlobMetaChunkArray: (header, entries, plain ci bytes). Raises RuleError."""
    off, csz = entry.ci_offset, entry.ci_compressed_size
    if off + csz + CI_HEADER > len(data):
        raise RuleError(f"ci.read: ci [{off}, +{csz}) + 4096-byte header runs past the blob ({len(data)} bytes)")
    hdr = CiHeader.parse(data[off + csz:off + csz + CI_HEADER])
    bad = []
    if hdr.magic != CI_MAGIC or hdr.magic2 != CI_MAGIC:
        bad.append(f"magic 0x{hdr.magic:x}/0x{hdr.magic2:x}")
    if not entry.has(F_CHUNKDICT) and hdr.ci_entries != entry.chunk_count:
        bad.append(f"ci_entries {hdr.ci_entries} != chunk_count {entry.chunk_count}")
    for name in ("ci_compressor", "ci_offset", "ci_compressed_size", "ci_uncompressed_size"):
        if getattr(hdr, name) != getattr(entry, name):
            bad.append(f"{name} {getattr(hdr, name)} != blob table {getattr(entry, name)}")
    if bad:
        raise RuleError("ci.header: header does not match the blob table: " + "; ".join(bad))
    n = entry.chunk_count
    if n == 0 or n > MAX_CHUNKS_PER_BLOB:
        raise RuleError(f"ci.header: chunk count {n} invalid")
    usz = hdr.ci_uncompressed_size
    f = entry.features
    v2 = bool(f & F_CHUNK_INFO_V2)
    if v2 and f & (F_ZRAN | F_BATCH):
        ok = usz >= n * CI_V2
    elif v2:
        ok = usz == n * CI_V2 and _align(usz) <= CI_V2_MAX
    elif f & (F_ZRAN | F_BATCH):
        raise RuleError("ci.header: ZRAN/BATCH without CHUNK_INFO_V2")
    else:
        ok = f & F_CHUNKDICT or (usz == n * CI_V1 and _align(usz) <= CI_V1_MAX)
    if not ok:
        raise RuleError(f"ci.header: uncompressed size {usz} invalid for {n} {'v2' if v2 else 'v1'} entries")
    try:
        raw = _decompress(data[off:off + csz], entry.ci_compressor, usz)
    except Exception as ex:                              # noqa: BLE001
        raise RuleError(f"ci.decompress: ci array does not decompress with "
                        f"{COMPRESSORS.get(entry.ci_compressor, entry.ci_compressor)}: {ex}") from None
    dec = decode_ci_v2 if v2 else decode_ci_v1
    return hdr, [dec(raw, i) for i in range(n)], raw


def check_blob_meta_file(meta: bytes, entry: BlobEntry, blob: bytes | None = None) -> list[str]:
    """A `<blob id>.blob.meta` file (nydusd's ci cache file; nydusify also ships it as
    image/<digest>.blob.meta in the bootstrap layer): the plain ci array padded to 4 KiB, then the
    blob's 4096-byte ci header, which must match the blob table (BlobCompressionContextInfo::new:
    "size of blob meta file ... doesn't match", validate_header). With `blob`, the ci bytes and the
    header must equal the blob's own."""
    v = []
    usz = entry.ci_uncompressed_size
    want = _align(usz) + CI_HEADER
    if len(meta) != want:
        return [f"blob_meta_file.size: {len(meta)} bytes, expected round_up_4k({usz}) + 4096 = {want}"]
    hdr = meta[_align(usz):]
    # validate_header compares the header with the blob table: reuse read_ci on a synthetic blob
    fake = BlobEntry(**{**entry.__dict__, "ci_offset": 0, "ci_compressed_size": usz, "ci_compressor": 0})
    h = CiHeader.parse(hdr)
    bad = [f"{n} {getattr(h, n)} != {getattr(entry, n)}" for n in
           ("ci_compressor", "ci_offset", "ci_compressed_size", "ci_uncompressed_size")
           if getattr(h, n) != getattr(entry, n)]
    if h.magic != CI_MAGIC or h.magic2 != CI_MAGIC:
        bad.append("magic")
    if not entry.has(F_CHUNKDICT) and h.ci_entries != entry.chunk_count:
        bad.append(f"ci_entries {h.ci_entries} != chunk_count {entry.chunk_count}")
    if bad:
        v.append("blob_meta_file.header: " + "; ".join(bad))
    if any(meta[usz:_align(usz)]):
        v.append("blob_meta_file.padding: bytes between the ci array and the header are not zero")
    try:
        synthetic = meta[:usz] + hdr[:8] + struct.pack("<IIQQQ", 0, h.ci_entries, 0, usz, usz) + hdr[40:]
        read_ci(synthetic, fake)
    except RuleError as e:
        v.append(f"blob_meta_file.ci: {e}")
    if blob is not None:
        try:
            _h, _ci, plain = read_ci(blob, entry)
            off = entry.ci_offset + entry.ci_compressed_size
            if plain != meta[:usz]:
                v.append("blob_meta_file.ci: differs from the blob's ci array")
            if blob[off:off + CI_HEADER] != hdr:
                v.append("blob_meta_file.header: differs from the blob's ci header")
        except RuleError as e:
            v.append(f"blob_meta_file.blob: {e}")
    return v


def check_blob(data: bytes, entry: BlobEntry, *, chunks: Sequence[ChunkInfo] | None = None,
               strict: bool = False, verify_data: bool = True, name: str | None = None) -> list[str]:
    """Every rule nydusd applies when it opens a data blob described by blob table `entry`.

    `chunks`: this blob's rows of the bootstrap's chunk table (cross-checked against the ci array and
    blob.digest); verify_data decompresses and digests every chunk."""
    data = bytes(data)
    name = name or entry.blob_id[:12]
    v: list[str] = []
    if entry.has(F_ZRAN | F_BATCH | F_ENCRYPTED | F_TARFS | F_SEPARATE):
        return [f"blob.features: {name} uses 0x{entry.features:x} (zran/batch/encrypted/tarfs/separate), "
                "which this checker does not cover"]
    if strict and len(data) != entry.compressed_size:
        v.append(f"blob.size: {name} is {len(data)} bytes, blob table compressed_size {entry.compressed_size}")
    try:
        hdr, ci, ci_plain = read_ci(data, entry)
    except RuleError as e:
        return v + [f"{e} ({name})"]
    if strict and hdr.features != entry.features:
        v.append(f"strict.ci.features: ci header features 0x{hdr.features:x} != blob table 0x{entry.features:x}")
    if strict and any(data[entry.ci_offset + entry.ci_compressed_size + 60:
                           entry.ci_offset + entry.ci_compressed_size + CI_HEADER - 4]):
        v.append("strict.ci.reserved: ci header reserved bytes not zero")

    # --- chunk info validate() + ordering (chunk_info_v1.rs, mod.rs _get_chunks_uncompressed)
    data_end = entry.compressed_data_size
    uend = _align(entry.uncompressed_size)
    reported = 0
    prev: CiEntry | None = None
    coff_expect = 0
    for i, c in enumerate(ci):
        msg = None
        if c.compressed_end > data_end or c.uncompressed_end > uend or c.uncompressed_size == 0 \
                or (not c.compressed and c.compressed_size != c.uncompressed_size):
            msg = (f"ci[{i}].validate: c_end {c.compressed_end} (data ends {data_end}), d_end {c.uncompressed_end} "
                   f"(view {uend}), usize {c.uncompressed_size}, compressed {c.compressed}")
        elif c.compressed_size == 0:
            msg = f"ci[{i}].validate: compressed size 0"
        elif entry.has(F_ALIGNED) and c.uncompressed_offset % BLOCK:
            msg = f"ci[{i}].aligned: uncompressed offset {c.uncompressed_offset} not 4 KiB aligned"
        elif prev is not None and c.uncompressed_offset != _align(prev.uncompressed_end):
            msg = (f"ci[{i}].order: uncompressed offset {c.uncompressed_offset}, previous chunk's aligned end "
                   f"{_align(prev.uncompressed_end)} (\"mismatch uncompressed\")")
        elif prev is None and c.uncompressed_offset != 0:
            msg = f"ci[0].order: first chunk at uncompressed offset {c.uncompressed_offset}, not 0"
        elif prev is not None and c.compressed_offset < prev.compressed_end:
            msg = f"ci[{i}].order: compressed range overlaps or precedes the previous chunk's"
        elif c.uncompressed_size > entry.chunk_size:
            msg = f"ci[{i}].size: {c.uncompressed_size} bytes > chunk_size {entry.chunk_size}"
        elif strict and c.compressed_offset != coff_expect:
            msg = (f"strict.ci[{i}].packed: compressed offset {c.compressed_offset}, chunk data so far ends "
                   f"at {coff_expect}")
        if msg:
            reported += 1
            if reported <= 20:
                v.append(msg)
        prev = c
        coff_expect = c.compressed_end
    if strict and ci and _align(ci[-1].uncompressed_end) != entry.uncompressed_size:
        v.append(f"strict.blob.uncompressed_size: {entry.uncompressed_size}, last chunk's aligned end "
                 f"{_align(ci[-1].uncompressed_end)}")
    if strict and ci and coff_expect != data_end:
        v.append(f"strict.blob.data_size: chunk data ends at {coff_expect}, compressed data size {data_end}")

    # --- ToC (toc.rs) and the reverse tar framing
    toc: dict[str, TocEntry] = {}
    has_toc_bytes = len(data) >= TAR_BLOCK and _tar_name(data[-TAR_BLOCK:]) == "rafs.blob.toc"
    if entry.blob_toc_size or entry.has(F_HAS_TOC) or has_toc_bytes:
        try:
            entries, body = read_toc(data, entry.blob_toc_size)
        except RuleError as e:
            v.append(f"{e} ({name})")
            entries, body = [], b""
        if entries:
            if entry.blob_toc_size and len(body) != entry.blob_toc_size:
                v.append(f"toc.size: ToC + header are {len(body)} bytes, blob table says {entry.blob_toc_size}")
            if any(entry.blob_toc_digest) and hashlib.sha256(body).digest() != entry.blob_toc_digest:
                v.append("toc.digest: sha256 of ToC entries + tar header != blob table blob_toc_digest")
            if not entry.blob_toc_size and len(body) > 0x1000:
                v.append("toc.size: a ToC found by auto-detection must fit the blob's last 4 KiB")
            for e in entries:
                try:
                    e.name_raw.decode("utf-8")
                except UnicodeDecodeError:
                    v.append("toc.name: ToC entry name not UTF-8")
                if e.name in toc:
                    v.append(f"toc.name: {e.name} appears twice")
                toc[e.name] = e
                start = 0 if e.name == "image.blob" else e.compressed_offset   # see _toc_member_rules
                if start + e.compressed_size > len(data) - len(body):
                    v.append(f"toc.{e.name}: [{e.compressed_offset}, +{e.compressed_size}) overlaps the ToC")
            v += _toc_member_rules(data, entry, toc, ci_plain, strict)
    if entry.has(F_INLINED_CHUNK_DIGEST) and "blob.digest" not in toc:
        v.append("toc.blob.digest: INLINED_CHUNK_DIGEST but the ToC has no blob.digest")
    if strict or entry.has(F_HAS_TAR_HEADER):
        v += _tar_rules(data, entry, toc, strict)

    # --- chunk digests: blob.digest (ci order) and/or the chunk table
    digests: list[bytes | None] = [None] * len(ci)
    if "blob.digest" in toc:
        try:
            raw = toc_member(data, toc["blob.digest"])
            if len(raw) != 32 * entry.chunk_count:
                v.append(f"toc.blob.digest: {len(raw)} bytes, expected 32 * {entry.chunk_count}")
            else:
                digests = [raw[i * 32:i * 32 + 32] for i in range(len(ci))]
        except RuleError as e:
            v.append(str(e))
    for row in chunks or ():
        if row.index >= len(ci):
            v.append(f"chunk_table.index: row ci index {row.index} beyond {len(ci)} ci entries of {name}")
            continue
        c = ci[row.index]
        got = (c.uncompressed_offset, c.uncompressed_size, c.compressed_offset, c.compressed_size, c.compressed)
        want = (row.uncompressed_offset, row.uncompressed_size, row.compressed_offset, row.compressed_size,
                bool(row.flags & CF_COMPRESSED))
        if got != want:
            v.append(f"chunk_table.ci: row for ci {row.index} (uoff, usize, coff, csize, compressed) {want} != "
                     f"ci entry {got}")
        if digests[row.index] is None:
            digests[row.index] = row.digest
        elif digests[row.index] != row.digest:
            v.append(f"chunk_table.digest: row for ci {row.index} digest != blob.digest[{row.index}]")
    if verify_data:
        bad = 0
        for i, c in enumerate(ci):
            try:
                plain = _decompress(data[c.compressed_offset:c.compressed_end],
                                    entry.compression_algo if c.compressed else 0, c.uncompressed_size)
            except Exception as ex:                      # noqa: BLE001
                bad += 1
                if bad <= 10:
                    v.append(f"chunk[{i}].data: does not decompress with "
                             f"{COMPRESSORS.get(entry.compression_algo)}: {ex}")
                continue
            if digests[i] is not None and _digest(plain, entry.digest_algo) != digests[i]:
                bad += 1
                if bad <= 10:
                    v.append(f"chunk[{i}].digest: {DIGESTERS.get(entry.digest_algo)} of the plain chunk does not "
                             "match its digest")
        if bad > 10:
            v.append(f"chunk: ... {bad - 10} more bad chunks")
    return v


def _toc_member_rules(data: bytes, entry: BlobEntry, toc: Mapping[str, TocEntry], ci_plain: bytes,
                      strict: bool) -> list[str]:
    v = []
    for name in ("blob.meta.header", "blob.digest", "image.boot"):
        if name in toc:
            try:
                toc_member(data, toc[name])
            except RuleError as e:
                v.append(str(e))
    if "blob.meta" in toc:
        e = toc["blob.meta"]
        if (e.compressed_offset, e.compressed_size, e.uncompressed_size) != \
                (entry.ci_offset, entry.ci_compressed_size, entry.ci_uncompressed_size):
            v.append("toc.blob.meta: offset/sizes differ from the blob table's ci fields")
        want_flag = {0: TOC_NONE, 3: TOC_ZSTD, 1: TOC_LZ4}.get(entry.ci_compressor)
        if e.flags != want_flag:
            v.append(f"toc.blob.meta: flags 0x{e.flags:x}, ci compressor {entry.ci_compressor}")
        if hashlib.sha256(ci_plain).digest() != e.sha256:
            v.append("toc.blob.meta: sha256 != sha256 of the uncompressed ci array")
    if "blob.meta.header" in toc:
        e = toc["blob.meta.header"]
        if (e.compressed_offset, e.compressed_size) != (entry.ci_offset + entry.ci_compressed_size, CI_HEADER):
            v.append("toc.blob.meta.header: not the 4096 bytes after the ci array")
    if "image.blob" in toc:
        e = toc["image.blob"]
        size = entry.compressed_data_size
        if e.compressed_size != size:
            v.append(f"toc.image.blob: compressed_size {e.compressed_size}, chunk data is {size} bytes")
        if e.uncompressed_size != entry.uncompressed_size:
            v.append(f"toc.image.blob: uncompressed_size {e.uncompressed_size} != blob {entry.uncompressed_size}")
        if strict:
            # builder: sha256 of the chunk data and its image.blob tar header; compressed_offset as nydus
            # writes it (== compressed_size) or the true 0
            if e.compressed_offset not in (0, e.compressed_size):
                v.append(f"strict.toc.image.blob: compressed_offset {e.compressed_offset}")
            framed = tar_header_ok(data[size:size + TAR_BLOCK]) is None and \
                _tar_name(data[size:size + TAR_BLOCK]) == "image.blob"
            end = size + (TAR_BLOCK if framed else 0)
            if hashlib.sha256(data[:end]).digest() != e.sha256:
                v.append("strict.toc.image.blob: sha256 != sha256(chunk data + its tar header)")
    if strict:
        for name in toc:
            if name not in TOC_NAMES:
                v.append(f"strict.toc.name: unknown ToC entry {name!r}")
    return v


def _tar_rules(data: bytes, entry: BlobEntry, toc: Mapping[str, TocEntry], strict: bool) -> list[str]:
    """The reverse tar: each member's 512-B GNU header right after its data, the chain reaching offset 0."""
    v = []
    members, why = reverse_tar(data)
    if why:
        return [f"tar.chain: {why}"]
    by = {m.name: m for m in members}
    order = [m.name for m in reversed(members)]
    if entry.has(F_HAS_TAR_HEADER) or strict:
        if not order or order[0] != "image.blob":
            v.append(f"tar.order: first member is {order[:1]}, not image.blob")
        elif by["image.blob"].size != entry.compressed_data_size:
            v.append(f"tar.image.blob: {by['image.blob'].size} bytes, chunk data {entry.compressed_data_size}")
        m = by.get("blob.meta")
        if m is None:
            v.append("tar.blob.meta: no blob.meta member")
        elif (m.data_offset, m.size) != (entry.ci_offset, entry.ci_compressed_size + CI_HEADER):
            v.append(f"tar.blob.meta: member [{m.data_offset}, +{m.size}) is not ci + header "
                     f"[{entry.ci_offset}, +{entry.ci_compressed_size + CI_HEADER})")
    if len(set(order)) != len(order):
        v.append(f"tar.names: duplicate members {order}")
    for name, e in toc.items():
        if name in ("image.blob", "blob.meta", "blob.meta.header"):
            continue
        m = by.get(name)
        if m is None:
            v.append(f"tar.{name}: ToC entry without a tar member")
        elif (m.data_offset, m.size) != (e.compressed_offset, e.compressed_size):
            v.append(f"tar.{name}: tar member [{m.data_offset}, +{m.size}) != ToC [{e.compressed_offset}, "
                     f"+{e.compressed_size})")
    if toc and (not order or order[-1] != "rafs.blob.toc"):
        v.append("tar.order: rafs.blob.toc is not the last member")
    if strict:
        want = ["image.blob", "blob.meta", "blob.digest", "image.boot", "rafs.blob.toc"]
        if [n for n in order if n in want] != [n for n in want if n in by] or set(order) - set(want):
            v.append(f"strict.tar.order: members {order}, nydus-image writes them as {want}")
    return v


# ----------------------------------------------------------------------------------------- images

def _as_bytes(x) -> bytes:
    return x if isinstance(x, (bytes, bytearray, memoryview)) else Path(x).read_bytes()


def blob_files(bootstrap: bytes | os.PathLike, blob_dir: os.PathLike | None,
               files: Mapping[int, os.PathLike] | None = None) -> dict[int, Path]:
    """Blob index -> file: `files` first, else `blob_dir/<blob id>` (nydusd's localfs backend)."""
    boot = parse_bootstrap(_as_bytes(bootstrap), walk=False)
    out = {}
    for i, b in enumerate(boot.blobs):
        if files and i in files:
            out[i] = Path(files[i])
        elif blob_dir is not None and (Path(blob_dir) / b.blob_id).is_file():
            out[i] = Path(blob_dir) / b.blob_id
        else:
            raise RuleError(f"image.blob_file: no file for blob {i} ({b.blob_id}) in {blob_dir}")
    return out


def check_image(bootstrap: bytes | os.PathLike, blobs: Mapping[int, bytes | os.PathLike], *,
                strict: bool = False, sha256_ids: bool = False, verify_data: bool = True) -> list[str]:
    """check_bootstrap + check_blob for every blob (with its chunk-table rows) + the cross checks
    between the bootstrap's chunk indexes and the blobs' ci arrays. sha256_ids: blob id == sha256(blob),
    as for nydusify-made (and pynydus-made) images."""
    boot_bytes = _as_bytes(bootstrap)
    v = check_bootstrap(boot_bytes, strict=strict)
    try:
        boot = parse_bootstrap(boot_bytes)
    except RuleError as e:
        return v + [str(e)]
    cis: dict[int, list[CiEntry]] = {}
    for i, b in enumerate(boot.blobs):
        if i not in blobs:
            v.append(f"image.blob_file: no data for blob {i} ({b.blob_id})")
            continue
        data = _as_bytes(blobs[i])
        if sha256_ids and hashlib.sha256(data).hexdigest() != b.blob_id:
            v.append(f"image.blob_id: blob {i} id {b.blob_id[:16]}... is not the sha256 of its file")
        rows = [c for c in boot.chunks if c.blob_index == i]
        v += [f"blob[{i}] {m}" for m in check_blob(data, b, chunks=rows, strict=strict, verify_data=verify_data)]
        try:
            cis[i] = read_ci(data, b)[1]
        except RuleError:
            pass
    # every chunk index's block address is its ci entry's uncompressed offset
    bs = boot.sb.block_size
    bad = 0
    for nid, addrs in boot.chunk_addrs.items():
        for lo, hi, blk, k in addrs:
            bi, ci = (hi & 0xFF) - 1, ((hi >> 8) << 16) | lo
            if bi not in cis or ci >= len(cis[bi]):
                continue
            if cis[bi][ci].uncompressed_offset != blk * bs:
                bad += 1
                if bad <= 10:
                    v.append(f"chunkaddr.ci: {_p(boot.paths[nid][0])} chunk {k}: block {blk} but ci {ci} of blob "
                             f"{bi} is at uncompressed offset {cis[bi][ci].uncompressed_offset}")
    return v


# ----------------------------------------------------------------------------------------- fsck.erofs oracle

def build_views(bootstrap: bytes | os.PathLike, blob_dir: os.PathLike | None, outdir: os.PathLike,
                files: Mapping[int, os.PathLike] | None = None) -> dict[int, Path]:
    """Write each blob's uncompressed view (every chunk decompressed at its ci uncompressed offset,
    zeros between) to outdir/blob<i>.view, checking chunk digests where blob.digest or the chunk table
    give them. This is the address space EROFS reads through fscache; fsck.erofs reads it as a device."""
    boot_bytes = _as_bytes(bootstrap)
    boot = parse_bootstrap(boot_bytes, walk=False)
    paths = blob_files(boot_bytes, blob_dir, files)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    views = {}
    for i, b in enumerate(boot.blobs):
        data = paths[i].read_bytes()
        _hdr, ci, _raw = read_ci(data, b)
        digests: dict[int, bytes] = {c.index: c.digest for c in boot.chunks if c.blob_index == i}
        try:
            toc, _ = read_toc(data, b.blob_toc_size)
            for e in toc:
                if e.name == "blob.digest":
                    raw = toc_member(data, e)
                    digests = {k: raw[k * 32:k * 32 + 32] for k in range(len(raw) // 32)}
        except RuleError:
            pass
        size = _align(b.uncompressed_size)
        if i < len(boot.devices):
            size = max(size, boot.devices[i].blocks * BLOCK)
        view = bytearray(size)
        for k, c in enumerate(ci):
            plain = _decompress(data[c.compressed_offset:c.compressed_end],
                                b.compression_algo if c.compressed else 0, c.uncompressed_size)
            if k in digests and _digest(plain, b.digest_algo) != digests[k]:
                raise RuleError(f"view: blob {i} chunk {k} fails its {DIGESTERS[b.digest_algo]} check")
            view[c.uncompressed_offset:c.uncompressed_end] = plain
        p = out / f"blob{i}.view"
        p.write_bytes(view)
        views[i] = p
    return views


def extract_tree(bootstrap: bytes | os.PathLike, views: Mapping[int, os.PathLike],
                 outdir: os.PathLike) -> Path:
    """`fsck.erofs --device=VIEW... --extract=OUTDIR BOOT` (erofs-utils, not pynydus); raises
    AssertionError with its output on failure. Returns outdir."""
    out = Path(outdir)
    if isinstance(bootstrap, (bytes, bytearray, memoryview)):
        boot_path = out.parent / (out.name + ".boot")
        boot_path.write_bytes(bytes(bootstrap))
    else:
        boot_path = Path(bootstrap)
    if out.exists() and any(out.iterdir()):
        raise AssertionError(f"extract_tree: {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    args = ["fsck.erofs", *[f"--device={views[i]}" for i in sorted(views)], f"--extract={out}", str(boot_path)]
    r = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=600)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed (rc {r.returncode}):\n{r.stdout}\n{r.stderr}")
    return out


def inode_count(bootstrap: bytes | os.PathLike) -> int:
    """Distinct inodes reachable from the root (what `nydusify inspect` should report)."""
    return len(parse_bootstrap(_as_bytes(bootstrap)).inodes)


__all__ = [n for n in dir() if not n.startswith("_")]


def _main(argv: Iterable[str] | None = None) -> int:   # python -m tests.helpers.nydus_rules BOOT [BLOB_DIR]
    import sys
    args = list(argv if argv is not None else sys.argv[1:])
    strict = "--strict" in args
    args = [a for a in args if a != "--strict"]
    boot = Path(args[0]).read_bytes()
    if len(args) > 1:
        v = check_image(boot, blob_files(boot, args[1]), strict=strict)
    else:
        v = check_bootstrap(boot, strict=strict)
    print("\n".join(v) or "ok")
    return 1 if v else 0


if __name__ == "__main__":
    raise SystemExit(_main())
