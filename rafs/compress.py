"""Chunk compressors of RAFS v6 blobs, with Nydus's ids and formats: zstd (default), lz4_block, none,
and gzip (read only: Nydus can write it, we never do).

zstd is one frame that records its content size (as nydus-image writes it); "lz4" is
Nydus's `lz4_block`: a raw LZ4 block, no frame and no size (the plain size comes from
the chunk info). gzip is a gzip stream.

Every chunk is compressed on its own, so any chunk can be fetched and
decompressed without its neighbours. Both functions are thread-safe: zstd
contexts are kept one per thread (a `zstandard` context must not be shared
between threads) and the C libraries release the GIL while they work, so a
thread pool compresses chunks in parallel.

`decompress` never trusts the compressed stream: the output is bounded by the
plain size the (digest-checked) chunk info promises, and a stream that is corrupt,
truncated, followed by extra bytes or of the wrong decompressed size raises
`IntegrityError`. A lying frame header cannot make it allocate more than
`plain_size` bytes.
"""
from __future__ import annotations

import threading

from .errors import IntegrityError

COMPRESSORS = ("zstd", "lz4", "none")          # what we write
READ_ONLY = ("gzip",)                          # what we also read
# Nydus's ids (utils/src/compress/mod.rs: None 0, Lz4Block 1, GZip 2, Zstd 3): blob table, ci header.
COMPRESSOR_IDS = {"none": 0, "lz4": 1, "gzip": 2, "zstd": 3}
COMPRESSOR_NAMES = {v: k for k, v in COMPRESSOR_IDS.items()}
_ALIASES = {"lz4_block": "lz4", "lz4-block": "lz4"}      # Nydus's own spelling
ZSTD_LEVEL = 3

_local = threading.local()


def canonical_compressor(name: str) -> str:
    """`name` with Nydus's spellings mapped to ours ('lz4_block' -> 'lz4')."""
    return _ALIASES.get(name, name)


def check_compressor(name: str, *, reading: bool = False) -> str:
    """Return `name` if we write it (or, with reading=True, read it); else ValueError listing the choices."""
    known = COMPRESSORS + READ_ONLY if reading else COMPRESSORS
    if name not in known:
        raise ValueError(
            f"unknown compressor {name!r}; choose one of: {', '.join(known)}")
    return name


def _zstd_compressor():
    c = getattr(_local, "zc", None)
    if c is None:
        import zstandard
        # Content size in the frame header lets the reader check the frame
        # against the chunk info before allocating; no frame checksum (the chunk
        # digest covers the plain bytes).
        c = _local.zc = zstandard.ZstdCompressor(
            level=ZSTD_LEVEL, write_content_size=True, write_checksum=False)
    return c


def _zstd_decompressor():
    d = getattr(_local, "zd", None)
    if d is None:
        import zstandard
        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def compress(name: str, data: bytes) -> bytes:
    """Compress one chunk with compressor `name` ("none" returns the bytes unchanged)."""
    if name == "zstd":
        return _zstd_compressor().compress(data)
    if name == "lz4":
        import lz4.block
        return lz4.block.compress(data, store_size=False)
    if name == "none":
        return bytes(data)
    check_compressor(name)
    raise AssertionError("unreachable")


def decompress(name: str, data: bytes, plain_size: int) -> bytes:
    """Decompress one chunk that must expand to exactly `plain_size` bytes.

    Raises IntegrityError when `data` is not one complete, valid stream of
    `name` that decodes to `plain_size` bytes; ValueError for an unknown
    compressor name or a negative size (caller bugs).
    """
    check_compressor(name, reading=True)
    if plain_size < 0:
        raise ValueError(f"plain_size must be >= 0, got {plain_size}")
    if name == "none":
        if len(data) != plain_size:
            raise IntegrityError(
                f"stored chunk is {len(data)} bytes, expected {plain_size}")
        return bytes(data)
    if name == "zstd":
        out = _zstd_decompress(data, plain_size)
    elif name == "lz4":
        out = _lz4_decompress(data, plain_size)
    else:
        out = _gzip_decompress(data, plain_size)
    if len(out) != plain_size:
        raise IntegrityError(
            f"{name} chunk decompressed to {len(out)} bytes, expected {plain_size}")
    return out


def _zstd_decompress(data: bytes, plain_size: int) -> bytes:
    import zstandard
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"corrupt zstd chunk: not a zstd frame ({e})") from None
    if declared == -1:
        raise IntegrityError(
            "corrupt zstd chunk: the frame does not record its decompressed size "
            "(RAFS blob writers always record it)")
    if declared != plain_size:
        raise IntegrityError(
            f"zstd chunk declares {declared} decompressed bytes, expected {plain_size}")
    d = _zstd_decompressor()
    try:
        try:
            # One frame, nothing after it; output buffer sized from the
            # (already checked) frame header, so it is at most plain_size.
            return d.decompress(data, allow_extra_data=False)
        except TypeError:                       # zstandard < 0.23: no allow_extra_data
            obj = d.decompressobj()
            out = obj.decompress(data)
            if not obj.eof:
                raise IntegrityError("corrupt zstd chunk: the frame is truncated") from None
            if obj.unused_data:
                raise IntegrityError(
                    f"corrupt zstd chunk: {len(obj.unused_data)} extra bytes after the frame"
                ) from None
            return out
    except zstandard.ZstdError as e:
        raise IntegrityError(f"corrupt zstd chunk: {e}") from None


def _lz4_decompress(data: bytes, plain_size: int) -> bytes:
    import lz4.block
    try:
        # The block decoder writes into a buffer of exactly plain_size bytes: a lying
        # stream fails instead of growing it; a short one shows in the length check.
        return lz4.block.decompress(data, uncompressed_size=plain_size)
    except lz4.block.LZ4BlockError as e:
        raise IntegrityError(f"corrupt lz4 chunk: {e}") from None


def _gzip_decompress(data: bytes, plain_size: int) -> bytes:
    import zlib
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(data, plain_size + 1)     # one byte more than promised, so an over-long stream shows
    except zlib.error as e:
        raise IntegrityError(f"corrupt gzip chunk: {e}") from None
    if len(out) > plain_size:
        raise IntegrityError(f"gzip chunk decompresses to more than the expected {plain_size} bytes")
    if not d.eof:
        raise IntegrityError("corrupt gzip chunk: the stream is truncated")
    if d.unused_data:
        raise IntegrityError(f"corrupt gzip chunk: {len(d.unused_data)} extra bytes after the stream")
    return out
