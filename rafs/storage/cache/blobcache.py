"""The blob cache: a blob's uncompressed view, fetched lazily, verified, kept on disk across restarts.

`BlobCache` puts together the pieces, one module each: `files` (the files and
their locks), `reader` (the read path: fetch, verify through
`rafs.blob.decode_chunk`, store), `flush` (which chunks are ready, and the
chunk-map flush; the file format is `state`) and `prefetch` (the background
scheduler and the demand gate). `manager.CacheManager` holds one per blob.

`BlobCache.read(offset, size)` serves any range of a blob's uncompressed view
(the FUSE daemon's file reads and the erofs mode's device-file reads both end
here). It maps the range to chunks, serves ready chunks from the cache file,
and fetches the missing ones from the backend.

Where the chunks are comes from the bootstrap, never from the blob: `info`
is the bootstrap's blob-table entry (`rafs.bootstrap.BlobInfo`) and
`info.entries` the chunks its chunk table records for the blob (trusted: the
manifest digest covers the bootstrap). Opening a cache reads nothing from the
backend. The entries may be a subset of the blob's chunks (a chunk-dict blob
that other images use too) and need not be back to back in the blob file;
view bytes outside every entry read as zeros.

Files in `cache_dir`, per blob (`<id>` = hex sha256 of the blob):

* `<id>.blob`: a sparse file of the uncompressed view (size = view size);
  chunk k's plain bytes are pwritten at its view offset, never-fetched chunks
  and the alignment padding between chunks are holes (read as zeros).
* `<id>.chunkmap`: which chunks of `<id>.blob` are ready, by ci index, with
  an xxh64 of each (`state.ChunkMap`), replaced atomically after the data file
  was fdatasync'd; flushed every `flush_interval` seconds or `flush_chunks`
  chunks while fetching, and on close.
* `<id>.lock`: an empty file whose exclusive flock serializes, between
  processes, the short steps that must not interleave (opening, and the
  read-merge-replace of `<id>.chunkmap`).

Sharing a cache directory between processes (two mounts of one image):

* Every BlobCache holds a *shared* flock on `<id>.blob` for its lifetime. At
  open, under the `<id>.lock` lock, it first tries an exclusive one: only a
  process that gets it (nobody else uses the blob) may discard the data file
  (truncate it when the chunkmap is unusable); others never shrink it.
* Data writes are pwrites of verified chunks at their fixed view offsets, so
  two processes writing one chunk write identical bytes; a process only
  serves bytes it verified itself, or that a chunkmap vouches for and that
  pass their xxh64 re-check on first read.
* A chunkmap flush takes the `<id>.lock` lock, reads the map on disk, ORs its
  ready bits into the in-memory map (their xxh64 with them; chunks this
  process found changed on disk are left out), and replaces the file: no
  process's update is lost. Before fetching a missing chunk a cache looks at
  the on-disk map again (when the file changed) and adopts chunks another
  process made ready (they are re-checked with xxh64 before being served).
* Within one process there is one BlobCache per blob (the CacheManager shares
  it); a second one raises `CacheInUse`. So does an exclusive lock held by a
  process that does not share (an older pynydus).

Trust and faults:

* Every fetched chunk is decompressed and checked against its digest in the
  bootstrap's chunk table (`rafs.blob.decode_chunk`, with the blob's
  compressor and digester) *before* it is served or written. Only bytes inside
  an entry are ever decoded: bytes a merged request carries between entries
  are dropped. A mismatch raises `IntegrityError` and logs one line naming the
  blob and chunk; the chunk is not written and not marked ready. If the
  backend can re-read from an authoritative source (`read_from_origin`: a
  mirror or peer served the bytes) that is tried once first.
* After a restart, chunks the chunkmap vouches for are re-checked with xxh64
  (seeded with the chunk digest) on their first read and fetched again if the
  data file changed, or if the bytes were verified against another digest (a
  process mounting another bootstrap of the blob). An
  unusable chunkmap (torn, corrupt, another blob) means an empty cache and a
  warning, never an error and never wrong bytes.
* Backend failures surface as `BackendError` once the backend's own retries
  are spent; nothing is marked ready, and the next read tries again.

Fetching:

* Missing chunks adjacent in the blob are fetched with one range request of
  at most `merge_size` bytes; entries separated by a gap of at most
  `MAX_MERGE_GAP` bytes (chunks of the blob this bootstrap does not use) are
  still merged, the gap bytes fetched and discarded (`read_sparse` lets a
  backend skip them). A read that misses extends its last
  request over the following missing chunks (neighbours in the blob are
  usually read next): up to `merge_size` with `readahead`, else up to
  `amplify` bytes: a number, or "auto" for the backend's measured
  bandwidth-delay product (amplify.py), or 0 for not at all.
* Thread-safe. A chunk being fetched is in an in-flight map; other readers of
  it wait for that fetch and get its result or its error (one fetch per
  chunk). At most `max_inflight` backend requests per blob run at a time; a
  read needing several requests issues them in parallel.
* `prefetch(ranges)` / `prefetch_all()` run in one background thread per blob.
  Low-priority jobs (the default, and `prefetch_all`) are streamed one merged
  request at a time, each started only while no on-demand read is waiting for
  a fetch (a `DemandGate`, shared by all blobs of a `CacheManager`) and no
  high-priority job is queued. High-priority jobs (`low_priority=False`, the
  FUSE layer's sequential read-ahead) jump ahead of every low-priority job and
  are fetched like an on-demand read (merged, in parallel); they wait for at
  most the one low-priority request in progress. `close()` stops prefetch
  between requests.
"""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Iterable, Iterator

from rafs.blob import ChunkEntry
from rafs.image.digests import normalize_blob_id

from ..backend.base import BlobBackend
from ..chunks import blob_chunks
from ..metrics import StorageMetrics
from .amplify import FetchCostModel
from .files import CacheClosed, CacheFiles
from .flush import DEFAULT_FLUSH_CHUNKS, DEFAULT_FLUSH_INTERVAL, MISSING, ReadyState
from .prefetch import DemandGate, Prefetcher
from .evict import CacheBudget
from .reader import ChunkReader, Pending, disk_span

log = logging.getLogger(__name__)

DEFAULT_MERGE_SIZE = 1 << 20
MERGE_SIZE_MIN = 4 << 10
MERGE_SIZE_MAX = 64 << 20
DEFAULT_MAX_INFLIGHT = 4


class BlobCache:
    """Lazily fetched, verified, persistent uncompressed view of one blob (see the module docstring).

    `info` is the bootstrap's record of the blob (`rafs.bootstrap.BlobInfo`:
    `blob_id`, `compressed_size`, `uncompressed_size`, `chunk_count`,
    `compressor`, `digester` and `entries`, checked by `chunks.blob_chunks`).
    `entries` (sorted by view offset) are the chunks this cache serves; chunk
    positions in it (`chunk_ready(k)`, `entries[k]`) are this cache's chunk
    numbers, the chunkmap numbers chunks by ci index (`entry.index`).
    """

    def __init__(self, cache_dir: str | os.PathLike, info, backend: BlobBackend, *,
                 merge_size: int = DEFAULT_MERGE_SIZE, max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 readahead: bool = True, amplify: int | str = 0, metrics: StorageMetrics | None = None,
                 gate: DemandGate | None = None, cost_model: FetchCostModel | None = None,
                 flush_interval: float = DEFAULT_FLUSH_INTERVAL, flush_chunks: int = DEFAULT_FLUSH_CHUNKS,
                 budget: CacheBudget | None = None):
        if not MERGE_SIZE_MIN <= merge_size <= MERGE_SIZE_MAX:
            raise ValueError(f"merge_size must be {MERGE_SIZE_MIN}..{MERGE_SIZE_MAX} bytes, "
                             f"got {merge_size}")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        if amplify != "auto" and not (isinstance(amplify, int) and amplify >= 0):
            raise ValueError(f"amplify must be a number of bytes >= 0 or 'auto', got {amplify!r}")
        if flush_interval <= 0 or flush_chunks < 1:
            raise ValueError("flush_interval must be > 0 and flush_chunks >= 1")
        self.blob_id = normalize_blob_id(info.blob_id)
        self.info = info
        self.backend = backend
        self.merge_size = merge_size
        self.max_inflight = max_inflight
        self.readahead = readahead
        self.amplify = amplify
        self.cost_model = cost_model if cost_model is not None else FetchCostModel()
        self.metrics = metrics if metrics is not None else StorageMetrics(backend.source_stats)
        self.gate = gate if gate is not None else DemandGate()
        self.flush_interval = flush_interval
        self.flush_chunks = flush_chunks
        self.budget = budget
        self.name = f"blob sha256:{self.blob_id}"
        self._files = CacheFiles(cache_dir, self.blob_id, self.name)
        self.dir = self._files.dir
        self.data_path = self._files.data_path
        self.map_path = self._files.map_path
        self.lock_path = self._files.lock_path

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._active = 0                   # reads / prefetch batches using the data file
        self._closing = False

        chunks = blob_chunks(info, self.name)   # FormatError if the bootstrap's record is bad
        self.entries: list[ChunkEntry] = chunks.entries
        self.compressor = chunks.compressor
        self.digester = chunks.digester
        self.chunk_count = chunks.chunk_count     # of the blob: the chunkmap's size
        self.view_size = chunks.view_size
        self.total_bytes = sum(e.uncompressed_size for e in self.entries)

        inflight: dict[int, Pending] = {}         # chunk position -> its fetch / re-check
        self._ready = ReadyState(self._files, self.entries, chunk_count=self.chunk_count,
                                 view_size=self.view_size, cond=self._cond, inflight=inflight,
                                 flush_interval=flush_interval, flush_chunks=flush_chunks)
        self._reader = ChunkReader(chunks, self._files, self._ready, backend, lock=self._lock,
                                   inflight=inflight, merge_size=merge_size,
                                   max_inflight=max_inflight, readahead=readahead,
                                   amplify=amplify, metrics=self.metrics, gate=self.gate,
                                   cost_model=self.cost_model, budget=budget, tenant=self)
        self._prefetcher = Prefetcher(self.name, f"prefetch-{self.blob_id[:12]}", self.gate,
                                      fetch_all=self._fetch_all, fetch_next=self._fetch_next)
        self._files.open(self._ready.load)
        if budget is not None:             # what the data file holds already is the least recently used
            budget.register(self)
            for k, e in enumerate(self.entries):
                if self._ready.state[k] != MISSING:
                    budget.present(self, k, disk_span(e.uncompressed_offset, e.uncompressed_size))

    def covers(self, info) -> bool:
        """True if this cache serves every chunk of `info` (another record of the same blob)."""
        if info is self.info or getattr(info, "entries", None) is getattr(self.info, "entries", None):
            return True
        for e in info.entries:
            k = self._ready.positions.get(e.index)
            if k is None or self.entries[k] != e:
                return False
        return True

    # ------------------------------------------------------------------ lifecycle
    @contextmanager
    def _using(self) -> Iterator[None]:
        with self._lock:
            if self._closing:
                raise CacheClosed(f"{self.name}: the blob cache is closed")
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if not self._active:
                    self._cond.notify_all()

    def close(self) -> None:
        """Stop background work, wait for reads in progress, flush the state, release the files."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._ready.stop()
            self._cond.notify_all()
        self._prefetcher.close()
        self._ready.join()
        with self._lock:
            while self._active:
                self._cond.wait()
        self._reader.shutdown()
        if self.budget is not None:
            self.budget.unregister(self)
        try:
            self.flush()
        except OSError as e:               # a full disk: the map on disk stays as it was (never wrong)
            log.warning("%s: cannot write cache state %s: %s", self.name, self.map_path, e)
        finally:
            self._files.release()          # releases the flocks too

    def __enter__(self) -> "BlobCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def read(self, offset: int, size: int) -> bytes:
        """`size` bytes of the uncompressed view at `offset` (fewer only at the end of the view).

        Bytes between chunks read as zeros. Raises IntegrityError (a chunk failed
        verification) or BackendError (it could not be fetched); never wrong bytes.
        """
        if offset < 0 or size < 0:
            raise ValueError(f"bad range: offset {offset}, size {size}")
        end = min(offset + size, self.view_size)
        if offset >= end:
            return b""
        with self._using():
            out, hits, misses = self._reader.read(offset, end)
        self.metrics.read(len(out), hits, misses)
        return out

    def flush(self) -> None:
        """Persist the ready-state: fdatasync the data file, then atomically replace the chunkmap
        (merged with the map on disk under the cross-process lock)."""
        self._ready.flush()

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, ranges: Iterable[tuple[int, int]], low_priority: bool = True) -> Future:
        """Fetch the chunks of view ranges `ranges` ((offset, size) pairs) in the background.

        Returns a Future of the number of chunks fetched; cancelling it (or
        `close()`) stops the prefetch before its next request.
        Low priority (default): one request at a time, only while no on-demand
        read waits and no high-priority job is queued. Otherwise the job goes
        ahead of every low-priority one and its chunks are fetched like an
        on-demand read.
        """
        wanted: set[int] = set()
        for off, size in ranges:
            if off < 0 or size < 0:
                raise ValueError(f"bad prefetch range: offset {off}, size {size}")
            end = min(off + size, self.view_size)
            if off < end:
                wanted.update(self._reader.span(off, end))
        with self._lock:
            closing = self._closing
        if closing:
            fut: Future = Future()
            fut.cancel()
            return fut
        return self._prefetcher.submit(sorted(wanted), low_priority)

    def prefetch_all(self) -> Future:
        """Prefetch the whole blob in the background (low priority)."""
        return self.prefetch([(0, self.view_size)])

    def _fetch_all(self, indices: list[int]) -> int:
        with self._using():
            _, _, fetched = self._reader.ensure(indices, urgent=False, keep=False)
        return fetched

    def _fetch_next(self, indices: list[int], pos: int) -> tuple[int, int]:
        with self._using():
            return self._reader.fetch_next(indices, pos)

    # ------------------------------------------------------------------ eviction (the size limit)
    def evict(self, i: int) -> int | None:
        """Drop chunk `entries[i]` from the cache to make room (`evict.CacheBudget`): mark it MISSING
        (in the chunk map too) and punch its bytes out of the data file. None, and nothing done, if a
        read has it pinned, a fetch or re-check has it in flight, or another process shares the data
        file (it may be serving those bytes); else the bytes the data file shrank by."""
        files = self._files
        with files.sole_use() as sole:
            if not sole:
                return None
            with self._lock:
                if self._closing or self._ready.state[i] == MISSING or i in self._reader.inflight \
                        or self._reader.pins.get(i):
                    return None
                e = self.entries[i]
                before = files.disk_bytes()
                # MISSING first (under the lock: no read can see it READY from now on), then the bytes go
                self._ready.forget(i, e, self._ready.map.xxh64(e.index))
                files.punch(e.uncompressed_offset, e.uncompressed_size)
                freed = max(0, before - files.disk_bytes())
        self.metrics.evicted(1)
        return freed

    # ------------------------------------------------------------------ reporting
    def usage(self) -> dict:
        """Disk and chunk usage: `disk_bytes` is what the sparse data file really occupies."""
        disk_bytes = self._files.disk_bytes()
        with self._lock:
            ready = self._ready.ready_count
            ready_bytes = self._ready.ready_bytes
            inflight = len(self._reader.inflight)
        return {
            "blob_id": self.blob_id,
            "disk_bytes": disk_bytes,
            "view_size": self.view_size,
            "chunks_total": len(self.entries),
            "chunks_ready": ready,
            "bytes_total": self.total_bytes,
            "bytes_ready": ready_bytes,
            "chunks_inflight": inflight,
            "complete": ready == len(self.entries),
            "write_error": self._reader.write_error,
        }

    def chunk_ready(self, i: int) -> bool:
        """True if chunk `entries[i]`'s bytes are in the data file (verified, or vouched for by
        the chunkmap)."""
        with self._lock:
            return self._ready.state[i] != MISSING
