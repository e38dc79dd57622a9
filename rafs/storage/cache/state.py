"""Persistent chunk ready-state of one cached blob: the `<blob_id>.chunkmap` file.

The blob cache keeps a blob's uncompressed view in a sparse data file
(`<blob_id>.blob`); this file records which chunks of it hold verified bytes.
Chunks are numbered by their index in the blob's compression-info array (the
ci index the bootstrap's chunk table records), so mounts of different images
that use different chunks of one blob (a chunk-dict blob) share one map. For
each chunk: a ready bit and the xxh64 of the chunk's plain bytes, seeded with
the first 8 bytes of the chunk digest the bytes were verified against
(`chunk_xxh64`), so bytes vouched for under one bootstrap's digest never pass
the re-check under another's. The whole
file is covered by a sha256, and it is only ever replaced atomically
(`rafs.osutil.atomic_write`: a temp file in the same directory, fsync,
rename, fsync the directory), after the
data file was fdatasync'd, so a ready bit on disk always vouches for bytes
that reached the disk before it. Several processes may share one cache
directory (see `blobcache`): each replaces the file only under an exclusive
lock, after merging what is on disk into its own map (`merge_from`, done by
`flush.ReadyState`), so no process's ready bits are lost.

Layout (little-endian)::

    header, 128 bytes (CHUNKMAP_HEADER):
        magic        8s   b"RAFSCMAP"
        version      u32  2
        flags        u32  0
        chunk_count  u64  chunks of the blob (its ci entries, the blob table's chunk_count)
        view_size    u64  bytes of the uncompressed view (= data file size)
        blob_id      32s  sha256 of the blob (raw)
        reserved     64s  zeros
    ready bitmap     ceil(chunk_count / 64) * 8 bytes; bit i (byte i//8, bit i%8) = chunk i ready
    xxh64            chunk_count x u64 (`chunk_xxh64`); 0 for chunks that are not ready
    checksum         32s  sha256 of everything above

A file that is missing, truncated, fails its checksum, has another version,
or describes another blob / chunk count / view size is *not* an error: `load`
returns an empty map and the reason, and the cache starts empty (it logs a
warning). xxh64 is not a trust anchor (see DESIGN "Trust chain"): it only
detects a data file that changed behind the cache's back (or bytes verified
against another digest); chunks are trusted because they were verified
against their chunk digest (from the bootstrap) before being written.
"""
from __future__ import annotations

import hashlib
import os
import struct
import sys
from array import array

import xxhash

from rafs.osutil import atomic_write

CHUNKMAP_MAGIC = b"RAFSCMAP"
CHUNKMAP_VERSION = 2
CHUNKMAP_HEADER = struct.Struct("<8sIIQQ32s64s")
CHUNKMAP_HEADER_SIZE = CHUNKMAP_HEADER.size
assert CHUNKMAP_HEADER_SIZE == 128, CHUNKMAP_HEADER_SIZE
CHECKSUM_SIZE = 32                 # sha256 trailer

MAX_CHUNKS = 1 << 32               # sanity bound on chunk_count read from disk


def chunk_xxh64(plain: bytes, digest: bytes) -> int:
    """The xxh64 a chunkmap records for a chunk's plain bytes verified against `digest`."""
    return xxhash.xxh64_intdigest(plain, int.from_bytes(digest[:8], "little"))


def _raw32(value: str | bytes, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    else:
        v = value.lower()
        raw = bytes.fromhex(v[7:] if v.startswith("sha256:") else v)
    if len(raw) != 32:
        raise ValueError(f"{what} must be a sha256 (32 bytes), got {len(raw)} bytes")
    return raw


def _bitmap_size(chunk_count: int) -> int:
    return (chunk_count + 63) // 64 * 8


def file_size(chunk_count: int) -> int:
    """Size in bytes of the chunkmap file of a blob with `chunk_count` chunks."""
    return CHUNKMAP_HEADER_SIZE + _bitmap_size(chunk_count) + 8 * chunk_count + CHECKSUM_SIZE


class ChunkMapError(ValueError):
    """Why a chunkmap file cannot be used (the cache then starts empty)."""


class ChunkMap:
    """In-memory ready bits + xxh64 per chunk of one blob. Not locked: the owner locks."""

    def __init__(self, chunk_count: int, *, blob_id: str | bytes, view_size: int):
        if not 0 <= chunk_count < MAX_CHUNKS:
            raise ValueError(f"chunk_count {chunk_count} out of range")
        self.chunk_count = chunk_count
        self.view_size = view_size
        self.blob_id = _raw32(blob_id, "blob id")
        self._bits = bytearray(_bitmap_size(chunk_count))
        self._hashes = array("Q", bytes(8 * chunk_count))
        self._ready = 0

    # -- per chunk
    def ready(self, i: int) -> bool:
        return bool(self._bits[i >> 3] & (1 << (i & 7)))

    def xxh64(self, i: int) -> int:
        return self._hashes[i]

    def mark_ready(self, i: int, xxh64: int) -> None:
        if not self.ready(i):
            self._bits[i >> 3] |= 1 << (i & 7)
            self._ready += 1
        self._hashes[i] = xxh64

    def clear(self, i: int) -> None:
        if self.ready(i):
            self._bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
            self._ready -= 1
        self._hashes[i] = 0

    def merge_from(self, other: "ChunkMap", skip: dict[int, int] | None = None) -> list[int]:
        """OR `other`'s ready bits (same blob) into this map, taking its xxh64 for chunks only
        it has; chunks in `skip` whose xxh64 there equals `skip[i]` (bytes known to be bad)
        are left out. Returns the indices that became ready here."""
        if other.chunk_count != self.chunk_count:
            raise ValueError("merging chunk maps of different blobs")
        added = []
        bits, theirs = self._bits, other._bits
        for byte in range(len(theirs)):
            new = theirs[byte] & ~bits[byte] & 0xFF
            while new:
                low = new & -new
                i = byte * 8 + low.bit_length() - 1
                new ^= low
                h = other._hashes[i]
                if skip and skip.get(i) == h:
                    continue
                self.mark_ready(i, h)
                added.append(i)
        return added

    @property
    def ready_count(self) -> int:
        return self._ready

    def ready_indices(self) -> list[int]:
        return [i for i in range(self.chunk_count) if self._bits[i >> 3] & (1 << (i & 7))]

    # -- bytes
    def encode(self) -> bytes:
        header = CHUNKMAP_HEADER.pack(CHUNKMAP_MAGIC, CHUNKMAP_VERSION, 0, self.chunk_count,
                                      self.view_size, self.blob_id, bytes(64))
        hashes = self._hashes
        if sys.byteorder != "little":
            hashes = array("Q", hashes)
            hashes.byteswap()
        body = header + bytes(self._bits) + hashes.tobytes()
        return body + hashlib.sha256(body).digest()

    @classmethod
    def decode(cls, data: bytes, *, chunk_count: int, blob_id: str | bytes,
               view_size: int) -> "ChunkMap":
        """Parse a chunkmap file that must describe exactly this blob; ChunkMapError says why not."""
        if len(data) < CHUNKMAP_HEADER_SIZE + CHECKSUM_SIZE:
            raise ChunkMapError(f"file is {len(data)} bytes, too short for a chunkmap")
        body, checksum = data[:-CHECKSUM_SIZE], data[-CHECKSUM_SIZE:]
        if hashlib.sha256(body).digest() != checksum:
            raise ChunkMapError("checksum mismatch (torn write or corruption)")
        magic, version, flags, count, vsize, bid, reserved = CHUNKMAP_HEADER.unpack_from(body)
        if magic != CHUNKMAP_MAGIC:
            raise ChunkMapError(f"bad magic {magic!r}")
        if version != CHUNKMAP_VERSION or flags or any(reserved):
            raise ChunkMapError(f"unsupported chunkmap version {version} / flags {flags:#x}")
        m = cls(chunk_count, blob_id=blob_id, view_size=view_size)
        if (count, vsize, bid) != (m.chunk_count, m.view_size, m.blob_id):
            raise ChunkMapError("it describes another blob, chunk count or view size")
        if len(data) != file_size(count):
            raise ChunkMapError(f"file is {len(data)} bytes, expected {file_size(count)}")
        off = CHUNKMAP_HEADER_SIZE
        nbits = _bitmap_size(count)
        bits = bytearray(body[off:off + nbits])
        hashes = array("Q")
        hashes.frombytes(body[off + nbits:])
        if sys.byteorder != "little":
            hashes.byteswap()
        ready = 0
        for i in range(count):
            if bits[i >> 3] & (1 << (i & 7)):
                ready += 1
            elif hashes[i]:
                raise ChunkMapError(f"chunk #{i} has a hash but no ready bit")
        tail_bits = count & 7
        if (tail_bits and bits[count >> 3] >> tail_bits) or any(bits[(count + 7) >> 3:]):
            raise ChunkMapError("ready bits set beyond the last chunk")
        m._bits, m._hashes, m._ready = bits, hashes, ready
        return m

    @classmethod
    def load(cls, path: str | os.PathLike, *, chunk_count: int, blob_id: str | bytes,
             view_size: int) -> tuple["ChunkMap", str | None]:
        """(map, None) from `path`, or (empty map, reason) if the file is missing or unusable."""
        kw = dict(chunk_count=chunk_count, blob_id=blob_id, view_size=view_size)
        try:
            with open(path, "rb") as f:
                data = f.read(file_size(chunk_count) + 1)
        except FileNotFoundError:
            return cls(**kw), "no chunkmap file"
        except OSError as e:
            return cls(**kw), f"cannot read it: {e}"
        try:
            return cls.decode(data, **kw), None
        except ChunkMapError as e:
            return cls(**kw), str(e)

    def save(self, path: str | os.PathLike) -> None:
        """Atomically replace `path` with this map (`rafs.osutil.atomic_write`: tmp + fsync +
        rename + fsync of the directory)."""
        atomic_write(path, self.encode())

