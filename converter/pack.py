"""Chunk staging and blob layout.

Layers convert concurrently (`layerproc`), each compressing its distinct chunks
into a staging file. Then, in layer order, `pack_blobs` writes the final blobs by
copying compressed bytes: a chunk goes into the blob of the lowest layer that
has it, unless a chunk dict already holds it. Output is therefore the same
whatever order the layers finished in, and nothing is compressed twice.

With a prefetch list, each blob starts with the chunks it owns that the list
reads, in list order, then the rest in staging order: the mount's prefetch is
then one contiguous run per blob, i.e. a few large range requests.
"""
from __future__ import annotations

import dataclasses
import mmap
import os
from dataclasses import dataclass, field

from rafs import blob as rblob
from rafs import compress as rcompress
from rafs.bootstrap import BlobInfo
from rafs.tree import Inode, walk

@dataclass(frozen=True)
class StagedChunk:
    digest: bytes
    plain_size: int
    offset: int          # in the staging file
    size: int
    flags: int


@dataclass
class StagedLayer:
    """A layer's staging file and the chunks in it, in staging order (what `pack_blobs` reads)."""
    path: str
    chunks: list[StagedChunk] = field(default_factory=list)


def stage_payload(plain, compressor: str) -> tuple[bytes, int]:
    """(payload, flags) of one chunk as a blob stores it: compressed alone, or plain when
    compression does not shrink it (`rblob.prepare_chunk`'s rule)."""
    if compressor != "none":
        packed = rcompress.compress(compressor, plain)
        if len(packed) < len(plain):
            return packed, rblob.FLAG_COMPRESSED
    return plain, 0


@dataclass
class PackedBlob:
    info: BlobInfo           # blob-table entry, with the chunks this image uses in `info.entries`
    path: str | None         # local file of a blob this conversion wrote; None for chunk-dict blobs
    blob_meta: bytes = b""   # of a blob written here: its `<id>.blob.meta` (ci array padded to 4 KiB + ci header)


Owner = tuple[str, rblob.ChunkEntry]     # (blob id, the chunk's entry in that blob)


@dataclass
class ChunkDict:
    """Chunks another image already stores: digest -> (blob id, its ChunkEntry).

    Filled from a bootstrap's blob table and chunk table (`BlobInfo.entries`): no blob is read.
    """
    blobs: dict[str, BlobInfo] = field(default_factory=dict)
    chunks: dict[bytes, Owner] = field(default_factory=dict)
    store: object = None     # the ImageStore holding the dict's blobs, to copy them to a target

    def add_blob(self, info: BlobInfo) -> None:
        """Every chunk `info.entries` lists becomes reusable; the first blob to offer a digest keeps it."""
        self.blobs.setdefault(info.blob_id, info)
        for entry in info.entries:
            self.chunks.setdefault(entry.digest, (info.blob_id, entry))


def pack_blobs(stages: list[StagedLayer], workdir: str, compressor: str, digester: str,
               chunk_dict: ChunkDict | None = None, head: list[bytes] = (), *,
               chunk_size: int = rblob.CHUNK_SIZE_DEFAULT) -> tuple[list[PackedBlob], dict[bytes, Owner]]:
    """Write one blob per layer holding the chunks no lower layer or dict holds.

    `head`: digests to put first in whichever blob owns them, in this order (the prefetch list's).
    Returns the blobs this conversion made and `owner`: digest -> (blob id, ChunkEntry).
    Layers that add no chunk get no blob.
    """
    owner: dict[bytes, Owner] = dict(chunk_dict.chunks) if chunk_dict else {}
    claimed: set[bytes] = set()
    packed: list[PackedBlob] = []
    for i, stage in enumerate(stages):
        tmp = os.path.join(workdir, f"blob-{i}.tmp")
        placed: list[rblob.ChunkEntry] = []
        with open(stage.path, "rb") as src, open(tmp, "wb", buffering=1 << 20) as out:
            # the staging file mapped: payloads are slices of it, not a seek and a read each
            staged = mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) if stage.chunks else b""
            view = memoryview(staged)
            try:
                writer = rblob.BlobWriter(out, compressor=compressor, digester=digester)
                for sc in _head_first(stage.chunks, head):
                    if sc.digest in owner or sc.digest in claimed:
                        continue
                    placed.append(writer.add_compressed(view[sc.offset:sc.offset + sc.size], sc.plain_size,
                                                        sc.digest, sc.flags))
                    claimed.add(sc.digest)      # blob id known after finish()
                summary = writer.finish() if placed else None
                blob_meta = writer.blob_meta_file if placed else b""
            finally:
                view.release()
                if stage.chunks:
                    staged.close()
        if summary is None:
            os.unlink(tmp)
            continue
        for entry in summary.entries:
            owner[entry.digest] = (summary.blob_id, entry)
        path = os.path.join(workdir, f"blob-{summary.blob_id}")
        os.replace(tmp, path)
        packed.append(PackedBlob(BlobInfo.from_summary(summary, chunk_size), path, blob_meta))
    return packed, owner


def _head_first(chunks: list[StagedChunk], head: list[bytes]) -> list[StagedChunk]:
    """`chunks` with those named in `head` moved to the front, in `head` order."""
    if not head:
        return chunks
    by_digest = {sc.digest: sc for sc in chunks}
    first = [by_digest[d] for d in head if d in by_digest]
    moved = {sc.digest for sc in first}
    return first + [sc for sc in chunks if sc.digest not in moved]


def resolve_chunks(root: Inode, own: list[PackedBlob], owner: dict[bytes, Owner],
                   chunk_dict: ChunkDict | None) -> list[PackedBlob]:
    """Point every chunk of the tree at its blob; returns the blob table: the blobs written here
    that the tree uses, in layer order, then the chunk-dict blobs it uses, in first-use order.

    Each blob's `info.entries` becomes the chunks the tree references, in uncompressed-offset
    order: what the bootstrap's chunk table lists, as Nydus's (a layer blob may also hold chunks
    of files an upper layer replaced; a chunk-dict blob holds another image's chunks).
    `chunk_count` stays the blob's own count (its ci array's length). A blob written here that
    no file uses (every chunk of it replaced by an upper layer) is left out.
    """
    used: dict[str, dict[int, rblob.ChunkEntry]] = {}       # blob id -> ci index -> entry, first use order
    refs = []
    for _, node in walk(root):
        for ref in node.chunks:
            if ref is None:                 # the converter makes no holes; a tree may still hold one
                continue
            blob_id, entry = owner[ref.digest]
            used.setdefault(blob_id, {})[entry.index] = entry
            refs.append((ref, blob_id, entry))
    own_ids = {b.info.blob_id for b in own}
    table = [b for b in own if b.info.blob_id in used]
    table += [PackedBlob(chunk_dict.blobs[i], None) for i in used if i not in own_ids]
    index = {b.info.blob_id: i for i, b in enumerate(table)}
    for ref, blob_id, entry in refs:
        ref.blob_index, ref.offset, ref.ci_index = index[blob_id], entry.uncompressed_offset, entry.index
    for b in table:
        entries = sorted(used[b.info.blob_id].values(), key=lambda e: e.uncompressed_offset)
        b.info = dataclasses.replace(b.info, entries=entries)
    return table
