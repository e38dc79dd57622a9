"""Chunk staging and blob layout.

Layers convert concurrently, each compressing its distinct chunks into a
staging file. Then, in layer order, `pack_blobs` writes the final blobs by
copying compressed bytes: a chunk goes into the blob of the lowest layer that
has it, unless a chunk dict already holds it. Output is therefore the same
whatever order the layers finished in, and nothing is compressed twice.

With a prefetch list, each blob starts with the chunks it owns that the list
reads, in list order, then the rest in staging order: the mount's prefetch is
then one contiguous run per blob, i.e. a few large range requests.
"""
from __future__ import annotations

import collections
import os
from concurrent.futures import Executor
from dataclasses import dataclass, field

from rafs import blob as rblob
from rafs.bootstrap import BlobInfo
from rafs.tree import Inode, walk

_MAX_IN_FLIGHT = 8          # batches being compressed per layer
_BATCH_BYTES = 1 << 20      # small chunks go to the pool together: one hand-off per ~1 MiB, not per chunk
# Memory per layer stays bounded by ~8 batches of ~1 MiB (or of one chunk, if chunks are larger).


@dataclass(frozen=True)
class StagedChunk:
    digest: bytes
    plain_size: int
    offset: int          # in the staging file
    size: int
    flags: int


def _prepare_batch(batch: list[tuple[bytes, bytes]], compressor: str) -> list[rblob.PreparedChunk]:
    return [rblob.prepare_chunk(data, compressor, chunk_digest=digest) for data, digest in batch]


class ChunkStage:
    """A `ChunkSink` that compresses chunks on a shared pool into a staging file, in order."""

    def __init__(self, path: str, compressor: str, pool: Executor):
        self.path = path
        self.compressor = compressor
        self.pool = pool
        self.chunks: list[StagedChunk] = []
        self._file = open(path, "wb")
        self._pending: collections.deque = collections.deque()
        self._batch: list[tuple[bytes, bytes]] = []
        self._batch_bytes = 0

    def add(self, data: bytes, digest: bytes) -> None:
        self._batch.append((data, digest))
        self._batch_bytes += len(data)
        if self._batch_bytes >= _BATCH_BYTES:
            self._submit()

    def _submit(self) -> None:
        if self._batch:
            self._pending.append(self.pool.submit(_prepare_batch, self._batch, self.compressor))
            self._batch, self._batch_bytes = [], 0
        if len(self._pending) >= _MAX_IN_FLIGHT:
            self._drain_one()

    def _drain_one(self) -> None:
        for chunk in self._pending.popleft().result():
            offset = self._file.tell()
            self._file.write(chunk.payload)
            self.chunks.append(StagedChunk(chunk.digest, chunk.plain_size, offset, len(chunk.payload), chunk.flags))

    def close(self) -> None:
        try:
            self._submit()
            while self._pending:
                self._drain_one()
        finally:
            self._file.close()


@dataclass
class PackedBlob:
    info: BlobInfo
    path: str | None         # local file of a blob this conversion wrote; None for chunk-dict blobs


@dataclass
class ChunkDict:
    """Chunks another image already stores: digest -> (blob id, uncompressed offset)."""
    blobs: dict[str, BlobInfo] = field(default_factory=dict)
    chunks: dict[bytes, tuple[str, int]] = field(default_factory=dict)
    store: object = None     # the ImageStore holding the dict's blobs, to copy them to a target

    def add_blob(self, info: BlobInfo, toc: list[rblob.ChunkEntry]) -> None:
        self.blobs[info.blob_id] = info
        for entry in toc:
            self.chunks.setdefault(entry.digest, (info.blob_id, entry.uncompressed_offset))


def pack_blobs(stages: list[ChunkStage], workdir: str, compressor: str, digester: str,
               chunk_dict: ChunkDict | None = None, head: list[bytes] = ()
               ) -> tuple[list[PackedBlob], dict[bytes, tuple[str, int]]]:
    """Write one blob per layer holding the chunks no lower layer or dict holds.

    `head`: digests to put first in whichever blob owns them, in this order (the prefetch list's).
    Returns the blobs this conversion made and `owner`: digest -> (blob id, offset).
    Layers that add no chunk get no blob.
    """
    owner: dict[bytes, tuple[str, int]] = dict(chunk_dict.chunks) if chunk_dict else {}
    packed: list[PackedBlob] = []
    for i, stage in enumerate(stages):
        tmp = os.path.join(workdir, f"blob-{i}.tmp")
        placed: list[tuple[bytes, int]] = []
        with open(stage.path, "rb") as src, open(tmp, "wb") as out:
            writer = rblob.BlobWriter(out, compressor=compressor, digester=digester)
            for sc in _head_first(stage.chunks, head):
                if sc.digest in owner:
                    continue
                src.seek(sc.offset)
                entry = writer.add_compressed(src.read(sc.size), sc.plain_size, sc.digest, sc.flags)
                placed.append((sc.digest, entry.uncompressed_offset))
                owner[sc.digest] = ("", -1)   # claimed; blob id known after finish()
            summary = writer.finish() if placed else None
        if summary is None:
            os.unlink(tmp)
            continue
        for d, off in placed:
            owner[d] = (summary.blob_id, off)
        path = os.path.join(workdir, f"blob-{summary.blob_id}")
        os.replace(tmp, path)
        packed.append(PackedBlob(blob_info(summary), path))
    return packed, owner


def _head_first(chunks: list[StagedChunk], head: list[bytes]) -> list[StagedChunk]:
    """`chunks` with those named in `head` moved to the front, in `head` order."""
    if not head:
        return chunks
    by_digest = {sc.digest: sc for sc in chunks}
    first = [by_digest[d] for d in head if d in by_digest]
    moved = {sc.digest for sc in first}
    return first + [sc for sc in chunks if sc.digest not in moved]


def blob_info(summary) -> BlobInfo:
    return BlobInfo(blob_id=summary.blob_id, compressed_size=summary.compressed_size,
                    uncompressed_size=summary.uncompressed_size, chunk_count=summary.chunk_count,
                    toc_offset=summary.toc_offset, toc_size=summary.toc_size,
                    toc_digest=summary.toc_digest, compressor=summary.compressor,
                    digester=summary.digester)


def resolve_chunks(root: Inode, own: list[PackedBlob], owner: dict[bytes, tuple[str, int]],
                   chunk_dict: ChunkDict | None) -> list[PackedBlob]:
    """Point every chunk of the tree at its blob; returns the blob table (own blobs, then dict blobs used)."""
    table = list(own)
    index = {b.info.blob_id: i for i, b in enumerate(table)}
    for _, node in walk(root):
        for ref in node.chunks:
            if ref is None:
                continue
            blob_id, offset = owner[ref.digest]
            if blob_id not in index:          # a chunk-dict blob, first use
                index[blob_id] = len(table)
                table.append(PackedBlob(chunk_dict.blobs[blob_id], None))
            ref.blob_index, ref.offset = index[blob_id], offset
    return table
