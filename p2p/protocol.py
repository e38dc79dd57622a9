"""The peer wire protocol (HTTP/1.1, plain): how one node asks another for blob bytes.

Peers serve ranges of a blob *as stored* (compressed chunk payloads; only the
chunks of the bootstrap's chunk table, never the bytes between or after them),
addressed like the registry's own Range GETs::

    GET /v1/blobs/<blob hex id>?offset=O&size=S[&min=M][&wait=SECONDS]

* 200: a 32-byte frame header (`FRAME`) then exactly S bytes, or with `min`
  the longest held prefix of the range that is at least M bytes (read-ahead
  between peers: the fetcher asks for a little more than it needs). The header
  repeats offset and size and carries the xxh64 of the S bytes: a cheap check
  against truncation and transfer corruption, *not* a trust anchor. The
  fetcher verifies every chunk payload against its digest in the bootstrap's
  chunk table before using or re-serving it; peers are untrusted.
* 404 (JSON `{"error", "held", "fetching"}`): the peer does not share this
  blob, or does not hold every byte of the range verified (a range reaching
  outside the chunks is never held). With `wait` the
  peer first waits (at most `MAX_WAIT` seconds) for a range it is fetching
  itself right now to arrive, then answers 200 or 404.
* 503 (`Retry-After`): all upload slots are busy; ask another holder.
* 400: a malformed request (bad id, range outside the blob, too large).

    GET /v1/blobs/<id>/ranges  -> {"held": [[a, b], ...], "fetching": [[a, b], ...]}
    GET /v1/blobs              -> {"blobs": {id: {"held": ..., "fetching": ...}}}
    GET /v1/health             -> {"ok": true, "node": NODE_ID}

Ranges are lists of [start, end) pairs of stored-blob offsets (`ranges.RangeSet`).
No request ever carries registry credentials: peers are reached with a
separate HTTP session that has no auth, no cookies and ignores proxy
environment variables.
"""
from __future__ import annotations

import struct

import xxhash

FRAME_MAGIC = b"NYP2"
FRAME_VERSION = 1
#: magic, version u16, flags u16, offset u64, size u64, xxh64 of the payload u64.
FRAME = struct.Struct("<4sHHQQQ")
FRAME_SIZE = FRAME.size
assert FRAME_SIZE == 32, FRAME_SIZE

MAX_REQUEST = 64 << 20          # largest range one GET may ask for
MAX_WAIT = 30.0                 # longest a server holds a waiting request open

API_PREFIX = "/v1"


class FrameError(ValueError):
    """A peer's answer does not frame the bytes it was asked for."""


def pack_frame(offset: int, payload: bytes | memoryview) -> bytes:
    return FRAME.pack(FRAME_MAGIC, FRAME_VERSION, 0, offset, len(payload),
                      xxhash.xxh64_intdigest(payload))


def parse_frame(header: bytes) -> tuple[int, int, int]:
    """(offset, size, xxh64) of a frame header; FrameError if it is not one."""
    if len(header) != FRAME_SIZE:
        raise FrameError(f"short frame header ({len(header)} bytes)")
    magic, version, flags, off, n, h = FRAME.unpack(header)
    if magic != FRAME_MAGIC or version != FRAME_VERSION or flags:
        raise FrameError(f"bad frame header (magic {magic!r}, version {version}, flags {flags})")
    return off, n, h


def check_frame(header: bytes, payload: bytes, offset: int, size: int) -> None:
    """Raise FrameError unless `header` frames exactly `payload` as [offset, offset+size)."""
    if len(header) != FRAME_SIZE:
        raise FrameError(f"short frame header ({len(header)} bytes)")
    magic, version, flags, off, n, h = FRAME.unpack(header)
    if magic != FRAME_MAGIC or version != FRAME_VERSION or flags:
        raise FrameError(f"bad frame header (magic {magic!r}, version {version}, flags {flags})")
    if off != offset or n != size:
        raise FrameError(f"frame is for [{off}, {off + n}), asked for [{offset}, {offset + size})")
    if len(payload) != size:
        raise FrameError(f"frame holds {len(payload)} bytes, expected {size}")
    if xxhash.xxh64_intdigest(payload) != h:
        raise FrameError("frame checksum (xxh64) mismatch: the bytes were damaged in transit")


def normalize_addr(addr: str, *, listen: bool = False) -> str:
    """'host:port' (what nodes announce and dial; port 0 only for a `listen` address);
    ValueError for anything else."""
    if not isinstance(addr, str):
        raise ValueError(f"an address is a 'host:port' string, got {addr!r}")
    a = addr.strip()
    for prefix in ("http://", "https://"):
        if a.startswith(prefix):
            a = a[len(prefix):]
    a = a.rstrip("/")
    host, sep, port = a.rpartition(":")
    low = 0 if listen else 1
    if not sep or not host or "/" in host or not port.isdigit() or not low <= int(port) < 65536:
        raise ValueError(f"bad address {addr!r}: want HOST:PORT")
    return a


def split_addr(addr: str) -> tuple[str, int]:
    """A listen address "host:port" (port 0: any free port) -> (host, port) for bind()."""
    host, _, port = normalize_addr(addr, listen=True).rpartition(":")
    return host.strip("[]"), int(port)
