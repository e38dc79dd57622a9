"""Conformance suites: named checks every implementation of an interface must pass.

* `backend_suite.BackendConformance`: every `BlobBackend` (fixture `backend_env`).
* `cache_suite.CacheConformance`: the `BlobCache` over any backend (fixture `cache_env`).

A test module subclasses the suite class (pytest collects the inherited
`test_*` methods) and provides the fixture, parametrized over its
implementations; only checks specific to one implementation live in that
module. Test blobs are built here with the real `rafs.blob.BlobWriter`.
"""
from __future__ import annotations

import io
import random
from dataclasses import dataclass

from rafs.blob import BlobSummary, BlobWriter, ChunkEntry

CHUNK = 64 << 10


@dataclass(frozen=True)
class TestBlob:
    __test__ = False                   # not a pytest test class

    data: bytes                        # the blob as stored (compressed chunks + TOC + footer)
    summary: BlobSummary               # what the bootstrap's blob table holds (BlobInfo's fields)
    entries: tuple[ChunkEntry, ...]
    view: bytes                        # the expected uncompressed view

    @property
    def blob_id(self) -> str:
        return self.summary.blob_id

    @property
    def digest(self) -> str:
        return "sha256:" + self.summary.blob_id

    def chunks_in(self, offset: int, size: int) -> list[int]:
        """Indices of the chunks whose compressed bytes [offset, offset+size) covers."""
        end = offset + size
        return [i for i, e in enumerate(self.entries)
                if e.compressed_offset < end and offset < e.compressed_end]


def make_blob(seed: int, chunks: int = 40, *, compressor: str = "zstd",
              short_every: int = 11) -> TestBlob:
    """A blob of `chunks` chunks of 64 KiB (every `short_every`-th one 40000 bytes, so the view
    has padding), alternating incompressible and half-compressible content; unique per seed."""
    rng = random.Random(seed)
    out = io.BytesIO()
    w = BlobWriter(out, compressor=compressor)
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
    for e, c in zip(w.entries, plains):
        view[e.uncompressed_offset:e.uncompressed_end] = c
    return TestBlob(out.getvalue(), summary, w.entries, bytes(view))
