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
from rafs.errors import RafsError
from rafs.image.digests import normalize_blob_id

from ..backend.base import BlobBackend
from ..chunks import blob_chunks
from ..metrics import StorageMetrics
from .amplify import FetchCostModel
from .files import CacheClosed, CacheFiles
from .flush import DEFAULT_FLUSH_CHUNKS, DEFAULT_FLUSH_INTERVAL, MISSING, READY, ReadyState
from .prefetch import DemandGate, Prefetcher
from .evict import CacheBudget
from .kernel import add_pin, entries_key, erofs_mounted_at, pinned, remove_pin, sealed, stackable, write_seal
from .reader import BLOCK, ChunkReader, Pending, disk_span

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
        # mount token -> (mountpoint, image): mounts that read the data file directly (kernel_device)
        self._kernel_pins: dict[str, tuple[str, str]] = {}
        self.kernel_stored = 0             # bytes a mount stored into the kernel's page cache (note_kernel_stored)
        # a live mount reading the data file directly: never discard it, whatever the chunkmap says
        self._files.open(lambda sole: self._ready.load(sole and not pinned(self.data_path)))
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
        self._drop_dead_pins()
        try:
            self.flush()
            self._seal_if_verified()
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
            _, _, fetched = self._reader.ensure(indices, urgent=False, keep=False, prefetch=True)
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
        if self._kernel_pins:              # a mount of ours reads the data file directly
            return None
        with files.sole_use() as sole:
            if not sole or pinned(self.data_path):     # ... or someone else's (a daemon in failover)
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

    # ------------------------------------------------------------------ the kernel reading the cache
    def present_spans(self, max_run: int = 4 << 20) -> list[tuple[int, int]]:
        """View ranges holding the chunks the data file has (ready or vouched for by the chunkmap),
        whole 4 KiB blocks (the padding after a chunk reads as zeros), neighbours merged up to
        `max_run` bytes; in view order."""
        with self._lock:
            state = bytes(self._ready.state)
        runs: list[list[int]] = []
        for k, e in enumerate(self.entries):
            if state[k] == MISSING or not e.uncompressed_size:
                continue
            lo = e.uncompressed_offset
            hi = min(-(-e.uncompressed_end // BLOCK) * BLOCK, self.view_size)
            if runs and runs[-1][1] == lo and hi - runs[-1][0] <= max_run:
                runs[-1][1] = hi
            else:
                runs.append([lo, hi])
        return [(lo, hi - lo) for lo, hi in runs]

    def read_cached(self, offset: int, size: int) -> bytes:
        """`read`, for data the cache holds (the spans of `present_spans`): one pread, the chunkmap's
        chunks re-checked on the bytes read; a chunk that is not there or fails its re-check is
        fetched (as `read` does). Counted as a read."""
        end = min(offset + size, self.view_size)
        if offset < 0 or offset >= end:
            return b""
        with self._using():
            out = self._reader.read_cached(offset, end)
        if out is None:
            return self.read(offset, size)
        n = len(self._reader.span(offset, end))
        self.metrics.read(len(out), n, 0)
        return out

    def kernel_device(self, token: str, *, mountpoint: str, image: str, pids=(), verify: bool = True) -> str | None:
        """The data file's path, for the kernel to read this blob from directly (EROFS `device=`),
        if every chunk is in it and verified; else None.

        Verified means sealed (`kernel.sealed`: checked before, the data file unchanged since) or, with
        `verify`, checked now (`seal`: every chunk re-checked, the data file read whole; a mount
        passes False and seals in the background for the next one). The data file is pinned first,
        for mount `token` (at `mountpoint`, of bootstrap `image`, kept by processes `pids`): from then
        on no process punches it or discards it; `kernel_release` (or the mount's end:
        `kernel.pinned`) unpins it."""
        with self._lock:
            if self._closing or not self.entries or self._ready.ready_count != len(self.entries):
                return None
        if not stackable(self.data_path):
            log.info("%s: %s is on a stacked filesystem; the kernel reads it through FUSE", self.name,
                     self.data_path)
            return None
        add_pin(self.data_path, token, mountpoint=mountpoint, image=image, pids=pids)
        self._kernel_pins[token] = (mountpoint, image)
        try:
            with self._using():
                fd = self._files.fileno()
                if not sealed(self.data_path, fd, entries_key(self.entries)):
                    if not verify:
                        self.kernel_release(token)
                        return None
                    if not self.seal():
                        raise RafsError("chunks went missing while verifying")
                if os.stat(self.data_path).st_ino != os.fstat(fd).st_ino:
                    raise RafsError(f"{self.data_path} was replaced")
        except (OSError, RafsError) as e:
            log.warning("%s: the kernel will not read %s directly: %s", self.name, self.data_path, e)
            self.kernel_release(token)
            return None
        return self.data_path

    def seal(self) -> bool:
        """If the cache is complete: verify every chunk not verified yet in this process (re-checked
        against the chunkmap's xxh64 on the bytes on disk; one that fails is fetched and verified
        again), fdatasync and write the seal (`kernel.write_seal`): the next mount may let the kernel
        read the data file directly. False if it is not complete (or a chunk went missing)."""
        with self._lock:
            if self._closing or not self.entries or self._ready.ready_count != len(self.entries):
                return False
        with self._using():
            fd = self._files.fileno()
            key = entries_key(self.entries)
            if sealed(self.data_path, fd, key):
                return True
            log.info("%s: verifying every chunk of %s for the kernel to read it", self.name, self.data_path)
            for lo in range(0, len(self.entries), 64):     # in steps: close() does not wait for all of it
                with self._lock:
                    if self._closing:
                        return False
                self._reader.ensure(range(lo, min(lo + 64, len(self.entries))), urgent=False, keep=False)
            with self._lock:
                if not all(st == READY for st in self._ready.state):
                    return False
            self.flush()                       # fdatasync: the seal names the bytes on disk
            write_seal(self.data_path, fd, key)
        return True

    def _seal_if_verified(self) -> None:
        """At close, after the flush: a complete cache whose every chunk this process verified (fetched
        and checked, or re-checked) is sealed, so the next mount lets the kernel read it without
        reading it all again first."""
        with self._lock:
            verified = bool(self.entries) and all(st == READY for st in self._ready.state)
        if verified:
            fd = self._files.fileno()
            key = entries_key(self.entries)
            if not sealed(self.data_path, fd, key):
                write_seal(self.data_path, fd, key)

    def kernel_release(self, token: str) -> None:
        """Mount `token` no longer reads the data file directly (it is unmounted)."""
        self._kernel_pins.pop(token, None)
        remove_pin(self.data_path, token)

    def note_kernel_stored(self, nbytes: int) -> None:
        """A mount stored `nbytes` of this cache's chunks into the kernel's page cache (reported)."""
        self.kernel_stored += nbytes

    @property
    def kernel_pinned(self) -> bool:
        return bool(self._kernel_pins)

    def _drop_dead_pins(self) -> None:
        """At close: the pins of our mounts that are gone (a handover keeps them: still mounted)."""
        for token, (mountpoint, image) in list(self._kernel_pins.items()):
            if not erofs_mounted_at(mountpoint, image):
                self.kernel_release(token)

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
            "kernel_direct": bool(self._kernel_pins),
            "kernel_stored_bytes": self.kernel_stored,
            "write_error": self._reader.write_error,
        }

    def chunk_ready(self, i: int) -> bool:
        """True if chunk `entries[i]`'s bytes are in the data file (verified, or vouched for by
        the chunkmap)."""
        with self._lock:
            return self._ready.state[i] != MISSING
