"""A blob's chunks as the bootstrap records them: what the blob cache and P2P trust.

The bootstrap's blob table gives a blob's compressor, digester, sizes and
chunk count; its chunk table gives the chunks (`BlobInfo.entries`: where each
chunk's plain bytes sit in the uncompressed view, where its payload sits in
the blob file, its digest, its ci index). The manifest digest covers the
bootstrap, so these are trusted; nothing about chunks is ever read from the
blob itself. `blob_chunks` checks that they are consistent (sorted, inside the
blob, unique ci indices) so that no later step can be led astray by a
malformed bootstrap.
"""
from __future__ import annotations

from dataclasses import dataclass

from rafs.blob import ChunkEntry
from rafs.compress import canonical_compressor, check_compressor
from rafs.digest import check_digester
from rafs.errors import FormatError

MAX_MERGE_GAP = 64 << 10           # bytes between two entries one request may span (and drop)


@dataclass(frozen=True)
class BlobChunks:
    """The checked chunk list of one blob (`entries` sorted by uncompressed offset)."""
    entries: list[ChunkEntry]
    compressor: str
    digester: str
    chunk_count: int               # chunks in the blob (its ci array), >= len(entries)
    view_size: int                 # the blob's uncompressed view
    blob_size: int                 # the blob file


def _where(name: str, e) -> str:
    return (f"{name}: the bootstrap's chunk #{e.index} (view [{e.uncompressed_offset}, "
            f"{e.uncompressed_end}), blob bytes [{e.compressed_offset}, {e.compressed_end}))")


def blob_chunks(info, name: str) -> BlobChunks:
    """Check `info` (a BlobInfo) and its `entries`; FormatError naming the blob otherwise."""
    try:
        compressor = check_compressor(canonical_compressor(info.compressor), reading=True)
        digester = check_digester(info.digester)
    except ValueError as e:
        raise FormatError(f"{name}: not supported: {e}") from None
    entries = list(getattr(info, "entries", None) or ())
    view, size = int(info.uncompressed_size), int(info.compressed_size)
    count = int(info.chunk_count)
    seen: set[int] = set()
    prev_end = 0
    for e in entries:
        # (the message is built only on error: a bootstrap may list tens of thousands of chunks)
        if e.uncompressed_size <= 0 or e.compressed_size <= 0 or e.compressed_offset < 0:
            raise FormatError(f"{_where(name, e)} is empty or negative")
        if e.uncompressed_offset < prev_end:
            raise FormatError(f"{_where(name, e)} overlaps the previous chunk or is out of order")
        if e.uncompressed_end > view:
            raise FormatError(f"{_where(name, e)} runs past the blob's view ({view} bytes)")
        if e.compressed_end > size:
            raise FormatError(f"{_where(name, e)} runs past the end of the blob ({size} bytes)")
        if not 0 <= e.index < count or e.index in seen:
            raise FormatError(f"{_where(name, e)}: its ci index is outside the blob's {count} chunks "
                              "or appears twice")
        seen.add(e.index)
        prev_end = e.uncompressed_end
    return BlobChunks(entries, compressor, digester, count, view, size)


def joinable(prev: ChunkEntry, nxt: ChunkEntry) -> bool:
    """True if one range request may carry `prev` and then `nxt`: `nxt` follows `prev` in
    the blob file, at most MAX_MERGE_GAP bytes after it."""
    return 0 <= nxt.compressed_offset - prev.compressed_end <= MAX_MERGE_GAP
