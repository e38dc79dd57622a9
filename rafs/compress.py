"""Chunk compressors of the RAFS blob format: zstd (default), lz4 (frame format), none.

Every chunk is compressed on its own, so any chunk can be fetched and
decompressed without its neighbours. Both functions are thread-safe: zstd
contexts are kept one per thread (a `zstandard` context must not be shared
between threads) and the C libraries release the GIL while they work, so a
thread pool compresses chunks in parallel.

`decompress` never trusts the compressed stream: the output is bounded by the
plain size the (digest-checked) TOC promises, and a stream that is corrupt,
truncated, followed by extra bytes or of the wrong decompressed size raises
`IntegrityError`. A lying frame header cannot make it allocate more than
`plain_size` bytes.
"""
from __future__ import annotations

import threading

from .errors import IntegrityError

COMPRESSORS = ("zstd", "lz4", "none")
# Ids stored in the blob footer. Never renumber: they are on disk.
COMPRESSOR_IDS = {"none": 0, "zstd": 1, "lz4": 2}
COMPRESSOR_NAMES = {v: k for k, v in COMPRESSOR_IDS.items()}
ZSTD_LEVEL = 3

_local = threading.local()


def check_compressor(name: str) -> str:
    """Return `name` if it is a known compressor, else raise ValueError listing the choices."""
    if name not in COMPRESSOR_IDS:
        raise ValueError(
            f"unknown compressor {name!r}; choose one of: {', '.join(COMPRESSORS)}")
    return name


def _zstd_compressor():
    c = getattr(_local, "zc", None)
    if c is None:
        import zstandard
        # Content size in the frame header lets the reader check the frame
        # against the TOC before allocating; no frame checksum (the chunk
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
        import lz4.frame
        return lz4.frame.compress(data, store_size=True, content_checksum=False)
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
    check_compressor(name)
    if plain_size < 0:
        raise ValueError(f"plain_size must be >= 0, got {plain_size}")
    if name == "none":
        if len(data) != plain_size:
            raise IntegrityError(
                f"stored chunk is {len(data)} bytes, expected {plain_size}")
        return bytes(data)
    if name == "zstd":
        out = _zstd_decompress(data, plain_size)
    else:
        out = _lz4_decompress(data, plain_size)
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
    import lz4.frame
    d = lz4.frame.LZ4FrameDecompressor()
    try:
        # Ask for one byte more than promised so an over-long stream shows.
        out = d.decompress(data, max_length=plain_size + 1)
    except RuntimeError as e:                   # python-lz4 reports LZ4F errors so
        raise IntegrityError(f"corrupt lz4 chunk: {e}") from None
    if len(out) > plain_size:
        raise IntegrityError(
            f"lz4 chunk decompresses to more than the expected {plain_size} bytes")
    if not d.eof:
        raise IntegrityError("corrupt lz4 chunk: the frame is truncated")
    if d.unused_data:
        raise IntegrityError(
            f"corrupt lz4 chunk: {len(d.unused_data)} extra bytes after the frame")
    return out
