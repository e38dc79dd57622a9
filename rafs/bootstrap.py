"""The bootstrap: a RAFS v6 image as nydus-image 2.x writes it and nydusd loads it.

One file, 4 KiB aligned, nothing after it (Nydus: rafs/src/metadata/layout/v6.rs,
builder/src/core/v6.rs; pynydus: docs/rafs-format.md):

    0..1024          zeros
    1024             EROFS superblock: compat RAFS_V6 (0x4000_0000), incompat exactly
                     CHUNKED_FILE | DEVICE_TABLE (0xC), devt_slotoff 11, s_blocks = the
                     blobs' blocks, checksum / extslots / xattr_blkaddr / s_u 0
    1152             RAFS extended superblock (256 B): flags (one compression bit, one
                     digest bit, ...), chunk size, offsets and sizes of the tables below
    1408             device table: one 128-B slot per blob (blob id, blocks, mapped_blkaddr)
    4 KiB aligned    blob table: one 256-B RafsV6Blob per blob (sizes, algorithms, ci and
                     ToC fields), blob i = EROFS device i + 1
                     prefetch table: u32 nids (the root's nid = everything)
                     [pynydus record: "PYNYDUS\\0", u32 version, u32 length, canonical JSON;
                     the prefetch list with byte ranges, which Nydus has no place for and
                     ignores here, in the gap before the meta area]
    meta_blkaddr     the EROFS meta area (inodes, chunk indexes carrying the ci index),
                     directory blocks
    4 KiB aligned    chunk table: one 80-B RafsV5ChunkInfo per distinct (digest, blob),
                     sorted by (digest, blob) as Nydus's BTreeMap, then zeros to 4 KiB

The kernel mounts it as is (it ignores compat bits and masks the ci bits away);
nydusd checks every rule `Bootstrap.from_bytes` checks.
"""
from __future__ import annotations

import base64
import errno
import json
import operator
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple

from . import blob as B
from .blob import CHUNK_SIZE_DEFAULT, ChunkEntry
from .compress import COMPRESSOR_IDS, COMPRESSOR_NAMES, COMPRESSORS
from .digest import DIGESTER_IDS, DIGESTER_NAMES
from .errors import FormatError
from .erofs import layout as L
from .erofs.reader import ErofsImage, InodeInfo
from .erofs.writer import build_erofs
from .image.digests import is_hex_id
from .tree import Inode, lookup

MIN_CHUNK, MAX_CHUNK = 4096, 16 << 20
PLACEHOLDER_BLOB_ID = "x" * 64          # nydus-image's id for a blob that inlines its own bootstrap
RECORD_MAGIC = b"PYNYDUS\0"
RECORD_VERSION = 1
RECORD_HEAD = struct.Struct("<8sII")    # magic, version, JSON length
_ZERO64 = "0" * 64
_U32, _U64 = (1 << 32) - 1, (1 << 64) - 1
_MAX_CHUNKS_PER_BLOB = 1 << 24          # RAFS_MAX_CHUNKS_PER_BLOB
_MAX_BLOB_USIZE, _MAX_BLOB_CSIZE = 1 << 44, 1 << 40
_CI_V1, _CI_V2 = 16, 24                 # bytes per ci entry
_ALL_CHUNK_FLAGS = (L.RAFS_CHUNK_COMPRESSED | L.RAFS_CHUNK_HOLE | L.RAFS_CHUNK_ENCRYPTED
                    | L.RAFS_CHUNK_BATCH | L.RAFS_CHUNK_HAS_CRC32)


def _align(n: int, a: int = L.BLKSZ) -> int:
    return -(-n // a) * a


def _hex_id(value, what: str, placeholder_ok: bool = False) -> str:
    if is_hex_id(value) or (placeholder_ok and value == PLACEHOLDER_BLOB_ID):
        return value
    raise FormatError(f"{what} must be 64 lowercase hex digits, got {value!r}")


@dataclass
class BlobInfo:
    """One blob-table entry (RafsV6Blob) and, in `entries`, its chunks from the chunk table.

    Blob i of the table is EROFS device i + 1: the device's tag is the blob id and its
    block count the uncompressed view size / 4096.
    """
    blob_id: str                # 64 lowercase hex (or nydus-image's "x"*64 placeholder of an inlined bootstrap)
    compressed_size: int        # the whole blob file
    uncompressed_size: int      # the uncompressed view (4 KiB multiple)
    chunk_count: int            # entries in the blob's ci array
    compressor: str = "zstd"
    digester: str = "blake3"
    chunk_size: int = CHUNK_SIZE_DEFAULT
    features: int = 0
    ci_compressor: str = "none"
    ci_offset: int = 0
    ci_compressed_size: int = 0
    ci_uncompressed_size: int = 0
    blob_toc_size: int = 0      # ToC entries + their 512-B tar header
    blob_toc_digest: str = _ZERO64
    blob_meta_digest: str = _ZERO64
    blob_meta_size: int = 0
    # the chunks the image uses, sorted by uncompressed offset (a subset of the blob's for a chunk dict)
    entries: list[ChunkEntry] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self):
        _hex_id(self.blob_id, "blob_id", placeholder_ok=True)

    @classmethod
    def from_summary(cls, summary: "B.BlobSummary", chunk_size: int) -> "BlobInfo":
        """The blob-table entry of a blob `BlobWriter.finish()` just wrote."""
        return cls(blob_id=summary.blob_id, compressed_size=summary.compressed_size,
                   uncompressed_size=summary.uncompressed_size, chunk_count=summary.chunk_count,
                   compressor=summary.compressor, digester=summary.digester, chunk_size=chunk_size,
                   features=summary.features, ci_compressor=summary.ci_compressor,
                   ci_offset=summary.ci_offset, ci_compressed_size=summary.ci_compressed_size,
                   ci_uncompressed_size=summary.ci_uncompressed_size, blob_toc_size=summary.blob_toc_size,
                   blob_toc_digest=summary.blob_toc_digest,
                   entries=sorted(summary.entries, key=lambda e: e.uncompressed_offset))

    def entry(self, ci_index: int) -> ChunkEntry:
        """The chunk whose ci index is `ci_index` (FormatError if the image has no such chunk)."""
        es = self.entries
        if 0 <= ci_index < len(es) and es[ci_index].index == ci_index:
            return es[ci_index]                 # what pynydus writes: ci order == offset order
        cache = self.__dict__.get("_by_index")
        if cache is None or cache[0] is not es or cache[1] != len(es):
            by_index: dict[int, ChunkEntry] = {}
            for e in es:
                by_index.setdefault(e.index, e)
            cache = self.__dict__["_by_index"] = (es, len(es), by_index)
        e = cache[2].get(ci_index)
        if e is None:
            raise FormatError(f"blob {self.blob_id}: the chunk table has no chunk with ci index {ci_index}")
        return e


class PrefetchEntry(NamedTuple):
    """A file (or directory) to fetch first at mount: all of it, or `ranges` of a regular file."""
    path: bytes                                     # absolute
    ranges: tuple[tuple[int, int], ...] | None = None   # sorted, disjoint (offset, length); None: all


@dataclass
class RafsMeta:
    chunk_size: int
    compressor: str             # the extended superblock's compression bit (each blob has its own too)
    digester: str
    blobs: list[BlobInfo]
    prefetch: list[PrefetchEntry] = field(default_factory=list)   # a bare path (bytes) = PrefetchEntry(path)

    def __post_init__(self):
        self.prefetch = [PrefetchEntry(p) if isinstance(p, bytes) else p for p in self.prefetch]


class Extent(NamedTuple):
    """`length` bytes of a file at `file_offset`, found at `blob_offset` in the uncompressed
    view of blob `blob_index`; a hole (zeros) has blob_index and blob_offset -1."""
    file_offset: int
    length: int
    blob_index: int
    blob_offset: int


class ChunkAddr(NamedTuple):
    """A RAFS v6 chunk index, decoded as nydusd does."""
    blob_index: int             # -1: a hole (EROFS null address; Nydus writes none)
    ci_index: int               # position in the blob's ci array
    blob_offset: int            # in the blob's uncompressed view


# --- validation ------------------------------------------------------------------


def _int(value, what: str, lo: int = 0, hi: int = _U64) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise FormatError(f"{what} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _check_chunk_size(cs, what: str) -> int:
    if type(cs) is not int or cs < MIN_CHUNK or cs > MAX_CHUNK or cs & (cs - 1):
        raise FormatError(f"{what} {cs!r} is not a power of two in 4 KiB..16 MiB")
    return cs


def _blob_rules(i: int, b: BlobInfo, chunk_size: int) -> None:
    """nydusd's RafsV6Blob::validate() and device-slot rules, and what pynydus can read."""
    where = f"blob {i} ({b.blob_id})"
    for name in ("compressed_size", "uncompressed_size", "chunk_count", "ci_offset", "ci_compressed_size",
                 "ci_uncompressed_size", "blob_meta_size"):
        _int(getattr(b, name), f"{where} {name}")
    _int(b.features, f"{where} features", hi=_U32)
    _int(b.blob_toc_size, f"{where} blob_toc_size", hi=_U32)
    _hex_id(b.blob_toc_digest, f"{where} blob_toc_digest")
    _hex_id(b.blob_meta_digest, f"{where} blob_meta_digest")
    for what, name, known in (("compressor", b.compressor, COMPRESSOR_IDS),
                              ("ci_compressor", b.ci_compressor, COMPRESSOR_IDS),
                              ("digester", b.digester, DIGESTER_IDS)):
        if name not in known:
            raise FormatError(f"{where}: {what} {name!r} is not one of {', '.join(known)}")
    if b.chunk_size != chunk_size:
        raise FormatError(f"{where}: chunk_size {b.chunk_size!r} differs from the image's {chunk_size} "
                          "(nydusd requires them equal)")
    if b.chunk_count > _MAX_CHUNKS_PER_BLOB:
        raise FormatError(f"{where}: {b.chunk_count} chunks, more than {_MAX_CHUNKS_PER_BLOB}")
    usize = b.uncompressed_size
    if usize % L.BLKSZ or not 0 < usize <= _MAX_BLOB_USIZE:
        raise FormatError(f"{where}: uncompressed_size {usize} is not a non-zero 4 KiB multiple up to 16 TiB "
                          "(nydusd rejects a device of 0 blocks: no empty blobs in the table)")
    if b.compressed_size > _MAX_BLOB_CSIZE:
        raise FormatError(f"{where}: compressed_size {b.compressed_size} is above 1 TiB")
    f = b.features
    if f & B.FEATURE_INCOMPAT_MASK & ~B.FEATURE_INCOMPAT_KNOWN or f & B.FEATURE_V5_NO_EXT_BLOB_TABLE:
        raise FormatError(f"{where}: invalid blob features {f:#x}")
    bad = B.unsupported_features(f)
    if bad:
        raise FormatError(f"{where}: not supported: {', '.join(bad)} (blob features {f:#x})")
    if not f & B.FEATURE_ALIGNED:
        raise FormatError(f"{where}: blob features {f:#x} lack ALIGNED (0x1), which nydusd requires")
    if b.ci_offset + b.ci_compressed_size > _U64 or b.ci_compressed_size > b.ci_uncompressed_size:
        raise FormatError(f"{where}: ci_compressed_size {b.ci_compressed_size} is above ci_uncompressed_size "
                          f"{b.ci_uncompressed_size} or past 2^64 from ci_offset {b.ci_offset}")
    unit = _CI_V2 if f & B.FEATURE_CHUNK_INFO_V2 else _CI_V1
    if not f & B.FEATURE_IS_CHUNKDICT_GENERATED and b.ci_uncompressed_size != unit * b.chunk_count:
        raise FormatError(f"{where}: ci_uncompressed_size {b.ci_uncompressed_size} is not {unit} x "
                          f"{b.chunk_count} chunks")


def _check_ranges(e: PrefetchEntry) -> None:
    # Canonical (what the converter writes): sorted, disjoint, non-empty, so one entry has one encoding.
    if not isinstance(e.ranges, tuple) or not e.ranges:
        raise FormatError(f"prefetch entry {e.path!r}: ranges must be a non-empty tuple")
    end = 0
    for r in e.ranges:
        if not (isinstance(r, tuple) and len(r) == 2 and all(type(v) is int for v in r)
                and end <= r[0] and 0 < r[1] and r[0] + r[1] <= 1 << 63):
            raise FormatError(f"prefetch entry {e.path!r}: range {r!r} is not an "
                              "(offset, length > 0) pair after the previous range, below 2^63")
        end = r[0] + r[1]


def _check_prefetch(entries) -> None:
    for e in entries:
        if not isinstance(e, PrefetchEntry) or not isinstance(e.path, bytes) or not e.path.startswith(b"/"):
            raise FormatError(f"prefetch entry {e!r} is not an absolute path (bytes)")
        if e.ranges is not None:
            _check_ranges(e)


def validate_meta(meta: RafsMeta) -> None:
    """FormatError unless a bootstrap can be written for `meta` and nydusd would load it."""
    _check_chunk_size(meta.chunk_size, "chunk_size")
    if meta.compressor not in COMPRESSORS:
        raise FormatError(f"compressor {meta.compressor!r} is not one of {', '.join(COMPRESSORS)}")
    if meta.digester not in DIGESTER_IDS:
        raise FormatError(f"digester {meta.digester!r} is not one of {', '.join(DIGESTER_IDS)}")
    if not isinstance(meta.blobs, list) or len(meta.blobs) > L.RAFS_MAX_BLOBS:
        raise FormatError(f"at most {L.RAFS_MAX_BLOBS} blobs fit a RAFS v6 image")
    seen = set()
    for i, b in enumerate(meta.blobs):
        if not isinstance(b, BlobInfo):
            raise FormatError(f"blob {i} is not a BlobInfo")
        _hex_id(b.blob_id, f"blob {i} blob_id", placeholder_ok=True)
        if b.blob_id in seen:
            raise FormatError(f"blob {i}: blob id {b.blob_id} appears twice (nydusd rejects duplicates)")
        seen.add(b.blob_id)
        _blob_rules(i, b, meta.chunk_size)
    _check_prefetch(meta.prefetch)


# --- the pynydus record (prefetch list with ranges) ---------------------------


def _encode_path(p: bytes):
    # JSON has no bytes: UTF-8 paths stay readable strings, others go base64.
    try:
        return p.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(p).decode("ascii")}


def _decode_path(v) -> bytes:
    if isinstance(v, str):
        return v.encode("utf-8", "surrogatepass")
    if isinstance(v, dict) and set(v) == {"base64"} and isinstance(v["base64"], str):
        try:
            return base64.b64decode(v["base64"], validate=True)
        except ValueError:
            pass
    raise FormatError(f"pynydus record: bad prefetch path {v!r}")


def _encode_entry(e: PrefetchEntry):
    if e.ranges is None:
        return _encode_path(e.path)
    return {"path": _encode_path(e.path), "ranges": [list(r) for r in e.ranges]}


def _decode_entry(v) -> PrefetchEntry:
    if isinstance(v, dict) and set(v) == {"path", "ranges"}:
        rs = v["ranges"]
        if not isinstance(rs, list) or not all(isinstance(r, list) for r in rs):
            raise FormatError(f"pynydus record: bad prefetch ranges {rs!r}")
        return PrefetchEntry(_decode_path(v["path"]), tuple(tuple(r) for r in rs))
    return PrefetchEntry(_decode_path(v))


def encode_record(prefetch: list[PrefetchEntry]) -> bytes:
    doc = json.dumps({"prefetch": [_encode_entry(e) for e in prefetch]}, sort_keys=True,
                     separators=(",", ":")).encode("utf-8")
    return RECORD_HEAD.pack(RECORD_MAGIC, RECORD_VERSION, len(doc)) + doc


def decode_record(data, off: int, end: int) -> list[PrefetchEntry] | None:
    """The prefetch list of the record at `off` (before `end`), or None if there is none."""
    if off + RECORD_HEAD.size > end or bytes(data[off:off + 8]) != RECORD_MAGIC:
        return None
    _magic, version, size = RECORD_HEAD.unpack_from(data, off)
    if version != RECORD_VERSION:
        raise FormatError(f"pynydus record version {version} not supported (expected {RECORD_VERSION})")
    start = off + RECORD_HEAD.size
    if start + size > end:
        raise FormatError(f"pynydus record of {size} bytes at {start} runs into the meta area at {end}")
    try:
        doc = json.loads(bytes(data[start:start + size]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"pynydus record is not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("prefetch"), list):
        raise FormatError("pynydus record: no prefetch list")
    entries = [_decode_entry(v) for v in doc["prefetch"]]
    _check_prefetch(entries)
    return entries


# --- write ---------------------------------------------------------------------


def _chunk_table(build, meta: RafsMeta) -> bytes:
    """The 80-byte RafsV5ChunkInfo of every distinct (digest, blob, ci index) the files use,
    ordered like Nydus's BTreeMap (digest, then blob); the value of the last use wins."""
    table: dict[tuple[bytes, int, int], tuple[ChunkEntry, int]] = {}
    blobs, cs = meta.blobs, meta.chunk_size
    for inode, nid in build.inodes():
        if not inode.is_reg():
            continue
        for i, ref in enumerate(inode.chunks):
            bi, ci = ref.blob_index, ref.ci_index
            key = (ref.digest, bi, ci)
            if key in table:
                table[key] = (table[key][0], i * cs)
                continue
            e = blobs[bi].entry(ci)
            if (e.uncompressed_offset, e.uncompressed_size, e.digest) != (ref.offset, ref.size, ref.digest):
                raise FormatError(
                    f"nid {nid} chunk {i}: blob {bi} ci {ci} is {e.uncompressed_size} bytes at "
                    f"{e.uncompressed_offset} with digest {e.digest.hex()}, the file says {ref.size} bytes "
                    f"at {ref.offset} with digest {bytes(ref.digest).hex()}")
            if not (e.compressed_size <= _U32 and e.uncompressed_size <= _U32 and len(e.digest) == 32):
                raise FormatError(f"blob {bi} ci {ci}: sizes or digest do not fit a chunk-table entry")
            table[key] = (e, i * cs)
    pack = L.RAFS_CHUNK_INFO.pack
    return b"".join(
        pack(digest, bi, L.RAFS_CHUNK_COMPRESSED if e.flags & B.FLAG_COMPRESSED else 0, e.compressed_size,
             e.uncompressed_size, e.compressed_offset, e.uncompressed_offset, file_offset, ci, 0)
        for (digest, bi, ci), (e, file_offset) in sorted(table.items(), key=lambda kv: kv[0]))


def _any_xattrs(build) -> bool:
    return any(inode.xattrs for inode, _ in build.inodes())


def write_bootstrap(root: Inode, meta: RafsMeta, out: BinaryIO) -> None:
    """Write the RAFS v6 bootstrap of the tree `root` with blob table `meta.blobs` to `out`.

    Every chunk must be placed (blob_index, offset, ci_index) on a chunk of its blob's
    `entries`; `meta.prefetch` paths must be in the tree.
    """
    validate_meta(meta)
    blobs = meta.blobs
    n = len(blobs)
    bto = _align(L.RAFS_DEVT_OFFSET + L.DEVT_SLOT_SIZE * n)
    bts = L.RAFS_BLOB.size * n
    pts = 4 * len(meta.prefetch) if n else 0           # Nydus writes no prefetch table without blobs
    pto = bto + bts if pts else 0
    record = encode_record(meta.prefetch) if meta.prefetch else b""
    rec_off = _align(bto + bts + pts, 8)
    devices = [(b.blob_id.encode("ascii"), b.uncompressed_size // L.BLKSZ) for b in blobs]
    build = build_erofs(root, chunk_size=meta.chunk_size, devices=devices, rafs=True,
                        meta_offset=rec_off + len(record))
    img = build.image

    chunks = _chunk_table(build, meta)
    cto = len(img)
    total = cto + _align(len(chunks))

    flags = (L.RAFS_COMPRESSION_FLAGS[meta.compressor] | L.RAFS_HASH_FLAGS[meta.digester]
             | L.RAFS_EXPLICIT_UID_GID)
    if _any_xattrs(build):
        flags |= L.RAFS_HAS_XATTR
    if all(b.features & B.FEATURE_INLINED_CHUNK_DIGEST for b in blobs):
        flags |= L.RAFS_INLINED_CHUNK_DIGEST            # as nydus-image: also with no blobs at all
    L.RAFS_EXT_SUPERBLOCK.pack_into(img, L.RAFS_EXT_SUPER_OFFSET, flags, bto, bts, meta.chunk_size,
                                    cto, len(chunks), pto, pts, 0)

    pos = total
    for i, b in enumerate(blobs):
        blocks = devices[i][1]
        mapped = _align(pos, L.RAFS_MAPPED_ALIGN) // L.BLKSZ
        if mapped + blocks > _U32:
            raise FormatError(f"blob {i}: mapped block address {mapped} + {blocks} blocks passes 2^32")
        pos = (mapped + blocks) * L.BLKSZ
        L.DEVICE_SLOT.pack_into(img, L.RAFS_DEVT_OFFSET + L.DEVT_SLOT_SIZE * i, devices[i][0], blocks,
                                mapped, 0, 0)
        L.RAFS_BLOB.pack_into(
            img, bto + L.RAFS_BLOB.size * i, devices[i][0], i, b.chunk_size, b.chunk_count,
            COMPRESSOR_IDS[b.compressor], DIGESTER_IDS[b.digester], b.features, b.compressed_size,
            b.uncompressed_size, b.blob_toc_size, COMPRESSOR_IDS[b.ci_compressor], b.ci_offset,
            b.ci_compressed_size, b.ci_uncompressed_size, bytes.fromhex(b.blob_toc_digest),
            bytes.fromhex(b.blob_meta_digest), b.blob_meta_size, bytes(8), 0)

    if meta.prefetch:
        nids = []
        for e in meta.prefetch:
            node = lookup(root, e.path)
            if node is None:
                raise FormatError(f"prefetch entry {e.path!r} is not in the tree")
            nids.append(build.nid(node))
        if pts:
            img[pto:pto + pts] = struct.pack(f"<{len(nids)}I", *nids)
        img[rec_off:rec_off + len(record)] = record

    out.write(img)
    out.write(chunks)
    out.write(bytes(total - cto - len(chunks)))


# --- read ----------------------------------------------------------------------


class _Head(NamedTuple):
    flags: int
    bto: int
    bts: int
    chunk_size: int
    cto: int
    cts: int
    pto: int
    pts: int


def _check_superblock(data, n: int) -> L.Superblock:
    sb = L.Superblock.unpack(data)
    if not sb.feature_compat & L.FEATURE_COMPAT_RAFS_V6:
        raise FormatError(f"not a RAFS v6 bootstrap: feature_compat {sb.feature_compat:#x} lacks "
                          f"RAFS_V6 ({L.FEATURE_COMPAT_RAFS_V6:#x})")
    if sb.blkszbits == 9:
        raise FormatError("not supported: tarfs (a RAFS v6 image with 512-byte blocks)")
    if n < L.BLKSZ or n % L.BLKSZ:
        raise FormatError(f"bootstrap of {n} bytes is not a non-zero multiple of 4096 (truncated?)")
    (s_u,) = struct.unpack_from("<H", data, L.SUPER_OFFSET + 84)
    problems = [
        (sb.checksum != 0, f"checksum {sb.checksum:#x} (must be 0)"),
        (sb.blkszbits != L.BLKSZBITS, f"block size bits {sb.blkszbits} (must be 12)"),
        (sb.sb_extslots != 0, f"extslots {sb.sb_extslots} (must be 0)"),
        (sb.inos == 0, "inode count 0"),
        (s_u != 0, f"s_u {s_u:#x} (must be 0)"),
        (sb.xattr_blkaddr != 0, f"xattr_blkaddr {sb.xattr_blkaddr} (shared xattrs are not RAFS v6)"),
        (sb.extra_devices == 0 and sb.blocks not in (0, 4096), f"{sb.blocks} blocks with no blob devices"),
        (sb.devt_slotoff != L.RAFS_DEVT_SLOTOFF, f"devt_slotoff {sb.devt_slotoff} (must be 11)"),
        (sb.feature_incompat != L.RAFS_INCOMPAT, f"feature_incompat {sb.feature_incompat:#x} (must be 0xc)"),
        (sb.meta_blkaddr * L.BLKSZ > n, f"meta_blkaddr {sb.meta_blkaddr} beyond the {n}-byte file"),
    ]
    for bad, what in problems:
        if bad:
            raise FormatError(f"RAFS v6 superblock: invalid {what}")
    return sb


def _check_ext(data, n: int, sb: L.Superblock) -> _Head:
    h = _Head(*L.RAFS_EXT_SUPERBLOCK.unpack_from(data, L.RAFS_EXT_SUPER_OFFSET)[:8])
    flags = h.flags
    if flags & ~L.RAFS_KNOWN_FLAGS:
        raise FormatError(f"RAFS v6 extended superblock: unknown flags {flags & ~L.RAFS_KNOWN_FLAGS:#x}")
    if flags & L.RAFS_TARFS_MODE:
        raise FormatError("not supported: tarfs (RAFS flag TARFS_MODE)")
    if flags & L.RAFS_ENCRYPTION_AES128XTS:
        raise FormatError("not supported: encrypted (RAFS flag ENCRYPTION_AES_128_XTS)")
    for kind, table in (("compression", L.RAFS_COMPRESSION_FLAGS), ("digest", L.RAFS_HASH_FLAGS)):
        got = [name for name, bit in table.items() if flags & bit]
        if len(got) != 1:
            raise FormatError(f"RAFS v6 extended superblock: flags {flags:#x} name {len(got)} {kind} "
                              "algorithms (must be exactly one)")
    _check_chunk_size(h.chunk_size, "RAFS v6 extended superblock: chunk size")
    devt_end = L.RAFS_DEVT_OFFSET + L.DEVT_SLOT_SIZE * sb.extra_devices

    def table(what, off, size, unit, align):
        if off < L.BLKSZ or off % align or off < devt_end or size % unit or off + size > n:
            raise FormatError(f"RAFS v6 extended superblock: {what} table at {off} of {size} bytes does not "
                              f"fit (aligned to {align}, after the device table, {unit}-byte entries, "
                              f"inside the {n}-byte file)")
        return off, off + size

    ranges = [table("blob", h.bto, h.bts, L.RAFS_BLOB.size, L.BLKSZ)]
    if h.cts:
        ranges.append(table("chunk", h.cto, h.cts, L.RAFS_CHUNK_INFO.size, L.BLKSZ))
    if h.pts and h.pto:
        ranges.append(table("prefetch", h.pto, h.pts, 4, 1))
    for i, (a0, a1) in enumerate(ranges):
        for b0, b1 in ranges[i + 1:]:
            if a0 < b1 and b0 < a1:
                raise FormatError("RAFS v6 extended superblock: the blob, chunk and prefetch tables overlap")
    return h


def _read_blob(data, i: int, h: _Head) -> BlobInfo:
    (raw_id, index, chunk_size, chunk_count, comp, dig, features, csize, usize, toc_size, ci_comp,
     ci_off, ci_csize, ci_usize, toc_digest, meta_digest, meta_size, _iv,
     cipher) = L.RAFS_BLOB.unpack_from(data, h.bto + L.RAFS_BLOB.size * i)
    where = f"RAFS v6 blob table entry {i}"
    try:
        blob_id = raw_id.decode("ascii")
        _hex_id(blob_id, "blob id", placeholder_ok=True)
    except (UnicodeDecodeError, FormatError):
        raise FormatError(f"{where}: blob id {raw_id!r} is not 64 lowercase hex digits") from None
    if B.unsupported_features(features):
        raise FormatError(f"{where} ({blob_id}): not supported: "
                          f"{', '.join(B.unsupported_features(features))} (blob features {features:#x})")
    if cipher:
        raise FormatError(f"{where} ({blob_id}): not supported: encrypted (cipher {cipher})")
    if index != i:
        raise FormatError(f"{where} ({blob_id}): blob_index {index}, expected {i}")
    names = []
    for what, value, table in (("compression", comp, COMPRESSOR_NAMES), ("ci compression", ci_comp,
                               COMPRESSOR_NAMES), ("digest", dig, DIGESTER_NAMES)):
        if value not in table:
            raise FormatError(f"{where} ({blob_id}): unknown {what} algorithm {value}")
        names.append(table[value])
    info = BlobInfo(blob_id=blob_id, compressed_size=csize, uncompressed_size=usize, chunk_count=chunk_count,
                    compressor=names[0], digester=names[2], chunk_size=chunk_size, features=features,
                    ci_compressor=names[1], ci_offset=ci_off, ci_compressed_size=ci_csize,
                    ci_uncompressed_size=ci_usize, blob_toc_size=toc_size, blob_toc_digest=toc_digest.hex(),
                    blob_meta_digest=meta_digest.hex(), blob_meta_size=meta_size)
    try:
        _blob_rules(i, info, h.chunk_size)
    except FormatError as e:
        raise FormatError(f"RAFS v6 blob table: {e}") from None
    return info


_VIEW_ORDER = operator.attrgetter("uncompressed_offset", "index")


def _read_chunks(data, h: _Head, blobs: list[BlobInfo]) -> None:
    """Fill each blob's `entries` from the chunk table, checking each entry against its blob."""
    per_blob: list[list[ChunkEntry]] = [[] for _ in blobs]
    for k, (digest, bi, flags, csize, usize, coff, uoff, _foff, index, _crc) in enumerate(
            L.RAFS_CHUNK_INFO.iter_unpack(data[h.cto:h.cto + h.cts])):
        if bi >= len(blobs):
            raise FormatError(f"RAFS v6 chunk table entry {k}: blob index {bi}, but the image has "
                              f"{len(blobs)} blobs")
        b = blobs[bi]
        if flags & L.RAFS_CHUNK_ENCRYPTED:
            raise FormatError(f"RAFS v6 chunk table entry {k}: not supported: encrypted "
                              f"(chunk flags {flags:#x})")
        if flags & L.RAFS_CHUNK_BATCH:
            raise FormatError(f"RAFS v6 chunk table entry {k}: not supported: batch (chunk flags {flags:#x})")
        if flags & ~_ALL_CHUNK_FLAGS:
            raise FormatError(f"RAFS v6 chunk table entry {k}: unknown chunk flags {flags:#x}")
        if (uoff % L.BLKSZ or not 0 < usize <= h.chunk_size or uoff + usize > b.uncompressed_size
                or csize == 0 or coff + csize > b.compressed_size
                or (index >= b.chunk_count and not b.features & B.FEATURE_IS_CHUNKDICT_GENERATED)):
            raise FormatError(f"RAFS v6 chunk table entry {k}: chunk {index} ({usize} bytes at {uoff} in the "
                              f"view, {csize} at {coff} in the blob) does not fit blob {bi} ({b.chunk_count} chunks, "
                              f"{b.uncompressed_size}-byte view, {b.compressed_size}-byte file)")
        per_blob[bi].append(ChunkEntry(uoff, usize, coff, csize, digest,
                                       B.FLAG_COMPRESSED if flags & L.RAFS_CHUNK_COMPRESSED else 0, index))
    for b, entries in zip(blobs, per_blob):
        entries.sort(key=_VIEW_ORDER)
        b.entries = entries


def _paths_of(erofs: ErofsImage, nids: list[int]) -> dict[int, bytes]:
    """A path for each nid (the first met walking the tree), stopping once all are found."""
    want = set(nids)
    found: dict[int, bytes] = {}
    if erofs.root_nid in want:
        found[erofs.root_nid] = b"/"
    stack, dirs = [(b"", erofs.root_nid)], set()
    while stack and len(found) < len(want):
        base, nid = stack.pop()
        if nid in dirs:
            raise FormatError(f"directory nid {nid} reached twice (at {base or b'/'!r}): cycle")
        dirs.add(nid)
        for name, child, _ftype in erofs.readdir(nid):
            path = base + b"/" + name
            if child in want and child not in found:
                found[child] = path
            if erofs.inode(child).is_dir():
                stack.append((path, child))
    missing = want - set(found)
    if missing:
        raise FormatError(f"RAFS v6 prefetch table: nid {min(missing)} is not in the tree")
    return found


class Bootstrap:
    def __init__(self, erofs: ErofsImage, meta: RafsMeta):
        self.erofs = erofs
        self.meta = meta

    @classmethod
    def open(cls, path) -> "Bootstrap":
        with open(path, "rb") as f:
            return cls.from_bytes(f.read())

    @classmethod
    def from_bytes(cls, data: bytes) -> "Bootstrap":
        """Parse a RAFS v6 bootstrap, checking what nydusd checks when it loads one."""
        n = len(data)
        sb = _check_superblock(data, n)
        h = _check_ext(data, n, sb)
        ndev = sb.extra_devices
        if ndev > L.RAFS_MAX_BLOBS or (ndev and L.RAFS_DEVT_OFFSET + L.DEVT_SLOT_SIZE * ndev > h.bto):
            raise FormatError(f"RAFS v6: {ndev} devices do not fit between 1408 and the blob table at {h.bto}")
        if h.bts // L.RAFS_BLOB.size != ndev:
            raise FormatError(f"RAFS v6: {ndev} devices but {h.bts // L.RAFS_BLOB.size} blob table entries")
        blobs = [_read_blob(data, i, h) for i in range(ndev)]
        seen = set()
        for i, b in enumerate(blobs):
            slot = L.RAFS_DEVT_OFFSET + L.DEVT_SLOT_SIZE * i
            tag, blocks, _mapped, _bhi, _uhi = L.DEVICE_SLOT.unpack_from(data, slot)
            if tag != b.blob_id.encode() or blocks != b.uncompressed_size // L.BLKSZ:
                raise FormatError(f"RAFS v6 device {i + 1} ({tag!r}, {blocks} blocks) does not match "
                                  f"blob {i} ({b.blob_id}, {b.uncompressed_size} bytes)")
            if b.blob_id in seen:
                raise FormatError(f"RAFS v6 device table: blob id {b.blob_id} appears twice")
            seen.add(b.blob_id)
        _read_chunks(data, h, blobs)
        compressor = next(k for k, bit in L.RAFS_COMPRESSION_FLAGS.items() if h.flags & bit)
        digester = next(k for k, bit in L.RAFS_HASH_FLAGS.items() if h.flags & bit)
        erofs = ErofsImage(data, chunk_size=h.chunk_size)
        meta = RafsMeta(chunk_size=h.chunk_size, compressor=compressor, digester=digester, blobs=blobs,
                        prefetch=cls._prefetch(data, sb, h, erofs, bool(blobs)))
        return cls(erofs, meta)

    @staticmethod
    def _prefetch(data, sb: L.Superblock, h: _Head, erofs: ErofsImage, has_blobs: bool) -> list[PrefetchEntry]:
        nids = []
        if h.pts and h.pto:
            for (nid,) in L.RAFS_PREFETCH_ENTRY.iter_unpack(data[h.pto:h.pto + h.pts]):
                if nid == 0:            # Nydus pads the table with zeros
                    break
                nids.append(nid)
        meta_start = sb.meta_blkaddr * L.BLKSZ
        tail = max(h.bto + h.bts, h.pto + h.pts if h.pto and h.pts else 0)
        record = decode_record(data, _align(tail, 8), meta_start)
        if record is not None:
            if len(nids) != (len(record) if has_blobs else 0):
                raise FormatError(f"pynydus record lists {len(record)} prefetch entries, the RAFS v6 "
                                  f"prefetch table {len(nids)}")
            return record
        paths = _paths_of(erofs, nids)
        return [PrefetchEntry(paths[nid]) for nid in nids]

    # --- path-level conveniences (check, inspect, FUSE) ---------------------------

    @property
    def root_nid(self) -> int:
        return self.erofs.root_nid

    def resolve(self, path: bytes) -> int | None:
        return self.erofs.resolve(path)

    def lookup(self, dir_nid: int, name: bytes) -> int | None:
        return self.erofs.lookup(dir_nid, name)

    def getattr(self, nid: int) -> InodeInfo:
        return self.erofs.inode(nid)

    def readdir(self, nid: int) -> list[tuple[bytes, int, int]]:
        return self.erofs.readdir(nid)

    def readlink(self, nid: int) -> bytes:
        return self.erofs.readlink(nid)

    def xattrs(self, nid: int) -> dict[bytes, bytes]:
        return self.erofs.xattrs(nid)

    def chunk_addrs(self, nid: int, start: int = 0, count: int | None = None) -> list[ChunkAddr]:
        """The chunk indexes of chunks start..start+count of a regular file, decoded as nydusd
        does (blob index, 24-bit ci index, view offset), each checked against the blob table."""
        info = self.erofs.inode(nid)
        if not info.is_reg():
            raise OSError(errno.EISDIR if info.is_dir() else errno.EINVAL, f"nid {nid} is not a regular file")
        if info.size == 0:
            return []
        if not info.chunk_size or not info.chunk_format & L.CHUNK_FORMAT_INDEXES:
            raise FormatError(f"nid {nid} is not a chunk-based file with chunk indexes")
        blobs = self.meta.blobs
        out = []
        for k, (lo16, hi, blk) in enumerate(self.erofs.raw_chunk_indexes(nid, start, count)):
            if blk == L.NULL_ADDR:
                out.append(ChunkAddr(-1, -1, -1))
                continue
            blob, ci, boff = (hi & 0xFF) - 1, (hi >> 8) << 16 | lo16, blk << L.BLKSZBITS
            if not 0 <= blob < len(blobs) or boff >= blobs[blob].uncompressed_size:
                raise FormatError(f"nid {nid}: chunk {start + k} points at device {hi & 0xFF} block {blk}, "
                                  "outside the blob table")
            out.append(ChunkAddr(blob, ci, boff))
        return out

    def chunk_entry(self, addr: ChunkAddr) -> ChunkEntry:
        """The chunk-table entry a chunk index names (FormatError if there is none)."""
        if addr.blob_index < 0:
            raise FormatError("a hole has no chunk entry")
        return self.meta.blobs[addr.blob_index].entry(addr.ci_index)

    def file_extents(self, nid: int, offset: int, size: int) -> list[Extent]:
        """Where bytes [offset, offset+size) of a regular file live (clipped to its size).

        Adjacent pieces in one blob (or adjacent holes) are merged into one extent.
        """
        info = self.erofs.inode(nid)
        if not info.is_reg():
            raise OSError(errno.EISDIR if info.is_dir() else errno.EINVAL, f"nid {nid} is not a regular file")
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        end = min(info.size, offset + size)
        if offset >= end:
            return []
        cs = info.chunk_size
        if not cs or not info.chunk_format & L.CHUNK_FORMAT_INDEXES:
            raise FormatError(f"nid {nid} is not a chunk-based file with chunk indexes")
        first = offset // cs
        addrs = self.chunk_addrs(nid, first, (end - 1) // cs - first + 1)
        blobs = self.meta.blobs
        out: list[Extent] = []
        for k, a in enumerate(addrs):
            cstart = (first + k) * cs
            lo, hi = max(offset, cstart), min(end, cstart + cs)
            blob, boff = a.blob_index, -1
            if blob >= 0:
                boff = a.blob_offset + lo - cstart
                if boff + hi - lo > blobs[blob].uncompressed_size:
                    raise FormatError(f"nid {nid}: chunk {first + k} runs past the end of blob {blob}")
            if out:
                p = out[-1]
                if p.blob_index == blob and (blob < 0 or p.blob_offset + p.length == boff):
                    out[-1] = p._replace(length=p.length + hi - lo)
                    continue
            out.append(Extent(lo, hi - lo, blob, boff))
        return out
