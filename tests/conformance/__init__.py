"""Conformance suites: named checks every implementation of an interface must pass.

* `backend_suite.BackendConformance`: every `BlobBackend` (fixture `backend_env`): registry,
  local layout and directory, mirror chain, P2P (tests/integration/test_backends.py).
* `cache_suite.CacheConformance`: the `BlobCache` over any backend (fixture `cache_env`): a local
  layout (tests/unit/test_cache.py), the registry, and through the P2P cache manager
  (tests/integration/test_backends.py).
* `snapshotter_suite.SnapshotterConformance`: the snapshotter over gRPC (fixture
  `snapshotter_env`, tests/integration/test_snapshotter.py).

A test module subclasses the suite class (pytest collects the inherited
`test_*` methods) and provides the fixture, parametrized over its
implementations; only checks specific to one implementation live in that
module. Test blobs are built here with the real `rafs.blob.BlobWriter` (a
Nydus RAFS v6 blob: chunk data, then ci array, digests and ToC), and the
bootstrap's record of them with `BlobInfo.from_summary`, as the converter does.
"""
from __future__ import annotations

import dataclasses
import io
import random
from dataclasses import dataclass
from typing import Iterable

from rafs.blob import BlobSummary, BlobWriter, ChunkEntry
from rafs.bootstrap import BlobInfo

CHUNK = 64 << 10


@dataclass(frozen=True)
class TestBlob:
    __test__ = False                   # not a pytest test class

    data: bytes                        # the blob as stored (chunk data, then the blob's metadata)
    summary: BlobSummary               # what BlobWriter.finish reported
    info: BlobInfo                     # the bootstrap's record: blob table entry + chunk table
    entries: tuple[ChunkEntry, ...]
    view: bytes                        # the expected uncompressed view

    @property
    def blob_id(self) -> str:
        return self.summary.blob_id

    @property
    def digest(self) -> str:
        return "sha256:" + self.summary.blob_id

    @property
    def data_end(self) -> int:
        """End of the chunk data: bytes after it are the blob's metadata (ci, digests, ToC)."""
        return self.summary.data_size

    def chunks_in(self, offset: int, size: int) -> list[int]:
        """Indices of the chunks whose compressed bytes [offset, offset+size) covers."""
        end = offset + size
        return [i for i, e in enumerate(self.entries)
                if e.compressed_offset < end and offset < e.compressed_end]

    def subset(self, indices: Iterable[int]) -> "BlobInfo":
        """The record a bootstrap that uses only chunks `indices` of this blob holds (a chunk-dict
        blob: same blob table entry, fewer chunks in the chunk table)."""
        keep = sorted(set(indices))
        return dataclasses.replace(self.info, entries=[self.entries[i] for i in keep])

    def view_of(self, indices: Iterable[int]) -> bytes:
        """The view as a cache serving only chunks `indices` shows it (zeros elsewhere)."""
        out = bytearray(len(self.view))
        for i in indices:
            e = self.entries[i]
            out[e.uncompressed_offset:e.uncompressed_end] = \
                self.view[e.uncompressed_offset:e.uncompressed_end]
        return bytes(out)


def make_blob(seed: int, chunks: int = 40, *, compressor: str = "zstd", digester: str = "blake3",
              short_every: int = 11) -> TestBlob:
    """A blob of `chunks` chunks of 64 KiB (every `short_every`-th one 40000 bytes, so the view
    has padding), alternating incompressible and half-compressible content; unique per seed."""
    rng = random.Random(seed)
    out = io.BytesIO()
    w = BlobWriter(out, compressor=compressor, digester=digester)
    plains = []
    for k in range(chunks):
        n = 40000 if short_every and k % short_every == short_every - 1 else CHUNK
        if k % 2:
            c = rng.randbytes(n // 2) + bytes(n - n // 2)
        else:
            c = rng.randbytes(n)
        plains.append(c)
        w.add_chunk(c)
    summary = w.finish()
    view = bytearray(summary.uncompressed_size)
    for e, c in zip(summary.entries, plains):
        view[e.uncompressed_offset:e.uncompressed_end] = c
    info = BlobInfo.from_summary(summary, CHUNK)
    return TestBlob(out.getvalue(), summary, info, tuple(summary.entries), bytes(view))
