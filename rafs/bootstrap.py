"""The bootstrap: an EROFS image (the tree) + the RAFS extension (blob table, chunk size, prefetch).

File layout:

    [EROFS image: N * 4096 bytes]      mountable by the kernel as is; it ignores what follows
    [payload: canonical JSON RafsMeta]
    [footer: 64 bytes]                 magic "RAFSBOOT", version, payload offset/size, sha256(payload)

Blob i of the table is EROFS device i + 1; its device tag is the blob id and
its block count the uncompressed view size / 4096. Readers check that the two
agree, so a bootstrap whose extension and EROFS part disagree is rejected.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import re
import struct
from dataclasses import asdict, dataclass, field
from typing import BinaryIO, NamedTuple

from .errors import FormatError
from .erofs import layout as L
from .erofs.reader import ErofsImage, InodeInfo
from .erofs.writer import write_erofs
from .tree import Inode

FOOTER_MAGIC = b"RAFSBOOT"
FOOTER_VERSION = 1
FORMAT_VERSION = 1
# magic, footer version, flags (0), payload offset, payload size, sha256(payload)
FOOTER = struct.Struct("<8sIIQQ32s")
assert FOOTER.size == 64

COMPRESSORS = ("zstd", "lz4", "none")
DIGESTERS = ("sha256", "blake3")
MIN_CHUNK, MAX_CHUNK = 4096, 16 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class BlobInfo:
    """One blob = one EROFS device, in the same order."""
    blob_id: str                # hex sha256 of the whole blob file (its OCI digest without "sha256:")
    compressed_size: int        # blob file size
    uncompressed_size: int      # size of the uncompressed view (4 KiB multiple)
    chunk_count: int
    toc_offset: int
    toc_size: int
    toc_digest: str             # hex sha256 of the TOC bytes
    compressor: str             # "zstd" | "lz4" | "none"
    digester: str               # "sha256" | "blake3"


class PrefetchEntry(NamedTuple):
    """A file (or directory) to fetch first at mount: all of it, or `ranges` of a regular file."""
    path: bytes                                     # absolute
    ranges: tuple[tuple[int, int], ...] | None = None   # sorted, disjoint (offset, length); None: all


@dataclass
class RafsMeta:
    chunk_size: int
    compressor: str
    digester: str
    blobs: list[BlobInfo]
    prefetch: list[PrefetchEntry] = field(default_factory=list)   # a bare path (bytes) = PrefetchEntry(path)
    version: int = FORMAT_VERSION

    def __post_init__(self):
        self.prefetch = [PrefetchEntry(p) if isinstance(p, bytes) else p for p in self.prefetch]


class Extent(NamedTuple):
    """`length` bytes of a file at `file_offset`, found at `blob_offset` in the uncompressed
    view of blob `blob_index`; a hole (zeros) has blob_index and blob_offset -1."""
    file_offset: int
    length: int
    blob_index: int
    blob_offset: int


# --- validation and (de)serialization of the extension ----------------------


def _int(value, what: str, lo: int = 0) -> int:
    if type(value) is not int or value < lo:
        raise FormatError(f"RAFS extension: {what} must be an integer >= {lo}, got {value!r}")
    return value


def _choice(value, what: str, allowed) -> str:
    if value not in allowed:
        raise FormatError(f"RAFS extension: {what} {value!r} is not one of {', '.join(allowed)}")
    return value


def _hex(value, what: str) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise FormatError(f"RAFS extension: {what} must be 64 lowercase hex digits, got {value!r}")
    return value


def validate_meta(meta: RafsMeta) -> None:
    """FormatError unless `meta` is a well-formed version-1 RafsMeta."""
    if meta.version != FORMAT_VERSION:
        raise FormatError(f"RAFS format version {meta.version!r} not supported (expected {FORMAT_VERSION})")
    cs = _int(meta.chunk_size, "chunk_size", MIN_CHUNK)
    if cs & (cs - 1) or cs > MAX_CHUNK:
        raise FormatError(f"RAFS extension: chunk_size {cs} is not a power of two in 4 KiB..16 MiB")
    _choice(meta.compressor, "compressor", COMPRESSORS)
    _choice(meta.digester, "digester", DIGESTERS)
    for i, b in enumerate(meta.blobs):
        if not isinstance(b, BlobInfo):
            raise FormatError(f"RAFS extension: blob {i} is not a BlobInfo")
        _hex(b.blob_id, f"blob {i} blob_id")
        _hex(b.toc_digest, f"blob {i} toc_digest")
        for name in ("compressed_size", "uncompressed_size", "chunk_count", "toc_offset", "toc_size"):
            _int(getattr(b, name), f"blob {i} {name}")
        if b.uncompressed_size % L.BLKSZ or b.uncompressed_size // L.BLKSZ > 0xFFFFFFFF:
            raise FormatError(f"RAFS extension: blob {i} uncompressed_size {b.uncompressed_size} "
                              "is not a 4 KiB multiple below 16 TiB")
        _choice(b.compressor, f"blob {i} compressor", COMPRESSORS)
        _choice(b.digester, f"blob {i} digester", DIGESTERS)
    for e in meta.prefetch:
        if not isinstance(e, PrefetchEntry) or not isinstance(e.path, bytes) or not e.path.startswith(b"/"):
            raise FormatError(f"RAFS extension: prefetch entry {e!r} is not an absolute path (bytes)")
        if e.ranges is not None:
            _check_ranges(e)


_MAX_OFFSET = 1 << 63


def _check_ranges(e: PrefetchEntry) -> None:
    # Canonical (what the converter writes): sorted, disjoint, non-empty, so one entry has one encoding.
    if not isinstance(e.ranges, tuple) or not e.ranges:
        raise FormatError(f"RAFS extension: prefetch entry {e.path!r}: ranges must be a non-empty tuple")
    end = 0
    for r in e.ranges:
        if not (isinstance(r, tuple) and len(r) == 2 and all(type(v) is int for v in r)
                and end <= r[0] and 0 < r[1] and r[0] + r[1] <= _MAX_OFFSET):
            raise FormatError(f"RAFS extension: prefetch entry {e.path!r}: range {r!r} is not an "
                              "(offset, length > 0) pair after the previous range, below 2^63")
        end = r[0] + r[1]


def _encode_path(p: bytes):
    # JSON has no bytes: UTF-8 paths stay readable strings, others go base64.
    try:
        return p.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(p).decode("ascii")}


def _decode_path(v) -> bytes:
    if isinstance(v, str):
        return v.encode("utf-8")
    if isinstance(v, dict) and set(v) == {"base64"} and isinstance(v["base64"], str):
        try:
            return base64.b64decode(v["base64"], validate=True)
        except ValueError:
            pass
    raise FormatError(f"RAFS extension: bad prefetch entry {v!r}")


def _encode_entry(e: PrefetchEntry):
    # A whole file stays a bare path, as before ranges existed.
    if e.ranges is None:
        return _encode_path(e.path)
    return {"path": _encode_path(e.path), "ranges": [list(r) for r in e.ranges]}


def _decode_entry(v) -> PrefetchEntry:
    if isinstance(v, dict) and set(v) == {"path", "ranges"}:
        rs = v["ranges"]
        if not isinstance(rs, list) or not all(isinstance(r, list) for r in rs):
            raise FormatError(f"RAFS extension: bad prefetch ranges {rs!r}")
        return PrefetchEntry(_decode_path(v["path"]), tuple(tuple(r) for r in rs))
    return PrefetchEntry(_decode_path(v))


def encode_meta(meta: RafsMeta) -> bytes:
    validate_meta(meta)
    doc = {"version": meta.version, "chunk_size": meta.chunk_size, "compressor": meta.compressor,
           "digester": meta.digester, "blobs": [asdict(b) for b in meta.blobs],
           "prefetch": [_encode_entry(e) for e in meta.prefetch]}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def decode_meta(payload: bytes) -> RafsMeta:
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"RAFS extension payload is not JSON: {e}") from None
    keys = {"version", "chunk_size", "compressor", "digester", "blobs", "prefetch"}
    if not isinstance(doc, dict) or not keys <= set(doc):
        raise FormatError(f"RAFS extension payload lacks {sorted(keys - set(doc)) if isinstance(doc, dict) else keys}")
    if not isinstance(doc["blobs"], list) or not isinstance(doc["prefetch"], list):
        raise FormatError("RAFS extension: blobs and prefetch must be lists")
    blob_keys = set(BlobInfo.__dataclass_fields__)
    blobs = []
    for i, b in enumerate(doc["blobs"]):
        if not isinstance(b, dict) or set(b) != blob_keys:
            raise FormatError(f"RAFS extension: blob {i} must have exactly the fields {sorted(blob_keys)}")
        blobs.append(BlobInfo(**b))
    meta = RafsMeta(chunk_size=doc["chunk_size"], compressor=doc["compressor"], digester=doc["digester"],
                    blobs=blobs, prefetch=[_decode_entry(p) for p in doc["prefetch"]],
                    version=doc["version"])
    validate_meta(meta)
    return meta


# --- write ---------------------------------------------------------------------


def write_bootstrap(root: Inode, meta: RafsMeta, out: BinaryIO) -> None:
    """Write the EROFS image of `root` then the RAFS extension for `meta` to `out`."""
    payload = encode_meta(meta)
    devices = [(b.blob_id.encode("ascii"), b.uncompressed_size // L.BLKSZ) for b in meta.blobs]
    size = write_erofs(root, out, chunk_size=meta.chunk_size, devices=devices)
    out.write(payload)
    out.write(FOOTER.pack(FOOTER_MAGIC, FOOTER_VERSION, 0, size, len(payload),
                          hashlib.sha256(payload).digest()))


# --- read ----------------------------------------------------------------------


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
        n = len(data)
        if n < FOOTER.size:
            raise FormatError(f"bootstrap of {n} bytes is too short for a RAFS footer")
        magic, version, _flags, off, size, digest = FOOTER.unpack_from(data, n - FOOTER.size)
        if magic != FOOTER_MAGIC:
            raise FormatError(f"bad RAFS footer magic {magic!r} (expected {FOOTER_MAGIC!r}): "
                              "not a bootstrap, or truncated")
        if version != FOOTER_VERSION:
            raise FormatError(f"RAFS footer version {version} not supported (expected {FOOTER_VERSION})")
        if off % L.BLKSZ or off < L.BLKSZ or off + size + FOOTER.size != n:
            raise FormatError(f"RAFS footer says payload at {off} of {size} bytes, which does not fit "
                              f"a {n}-byte bootstrap (truncated or corrupt)")
        payload = bytes(data[off:off + size])
        if hashlib.sha256(payload).digest() != digest:
            raise FormatError("RAFS extension digest mismatch: the payload is corrupt")
        meta = decode_meta(payload)
        erofs = ErofsImage(memoryview(data)[:off])
        if erofs.blkszbits != L.BLKSZBITS:
            raise FormatError(f"EROFS block size {erofs.blksz}: bootstraps use 4096-byte blocks")
        if erofs.image_size != off:
            raise FormatError(f"EROFS part is {erofs.image_size} bytes but the RAFS extension starts at {off}")
        if len(erofs.devices) != len(meta.blobs):
            raise FormatError(f"EROFS device table has {len(erofs.devices)} devices, "
                              f"the blob table {len(meta.blobs)} blobs")
        for i, ((tag, blocks), b) in enumerate(zip(erofs.devices, meta.blobs)):
            if tag != b.blob_id.encode() or blocks * L.BLKSZ != b.uncompressed_size:
                raise FormatError(f"EROFS device {i + 1} ({tag!r}, {blocks} blocks) does not match "
                                  f"blob {i} ({b.blob_id}, {b.uncompressed_size} bytes)")
        return cls(erofs, meta)

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
        indexes = self.erofs.chunk_indexes(nid, first, (end - 1) // cs - first + 1)
        blobs = self.meta.blobs
        out: list[Extent] = []
        for k, idx in enumerate(indexes):
            cstart = (first + k) * cs
            lo, hi = max(offset, cstart), min(end, cstart + cs)
            if idx is None:
                blob, boff = -1, -1
            else:
                blob, boff = idx[0] - 1, (idx[1] << L.BLKSZBITS) + lo - cstart
                if not 0 <= blob < len(blobs) or boff + hi - lo > blobs[blob].uncompressed_size:
                    raise FormatError(f"nid {nid}: chunk {first + k} points at device {idx[0]} block "
                                      f"{idx[1]}, outside the blob table")
            if out:
                p = out[-1]
                if p.blob_index == blob and (blob < 0 or p.blob_offset + p.length == boff):
                    out[-1] = p._replace(length=p.length + hi - lo)
                    continue
            out.append(Extent(lo, hi - lo, blob, boff))
        return out
