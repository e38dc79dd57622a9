"""The blob cache: a blob's uncompressed view, fetched lazily, verified, kept on disk across restarts.

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

import bisect
import fcntl
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterable, Iterator, Sequence

from rafs.blob import ChunkEntry, decode_chunk
from rafs.errors import BackendError, IntegrityError, RafsError

from ..backend.base import BlobBackend, normalize_blob_id
from ..chunks import blob_chunks, joinable
from ..metrics import StorageMetrics
from .amplify import FetchCostModel
from .state import ChunkMap, chunk_xxh64, write_atomic

log = logging.getLogger(__name__)

DEFAULT_MERGE_SIZE = 1 << 20
MERGE_SIZE_MIN = 4 << 10
MERGE_SIZE_MAX = 64 << 20
DEFAULT_MAX_INFLIGHT = 4
DEFAULT_FLUSH_INTERVAL = 1.0       # seconds between chunkmap flushes while chunks arrive
DEFAULT_FLUSH_CHUNKS = 64          # ... or after this many newly ready chunks

# per-chunk state in memory
MISSING = 0                        # not in the data file (or not trusted)
UNCHECKED = 1                      # the chunkmap on disk says ready; xxh64 not re-checked yet
READY = 2                          # verified in this process (fetched, or re-checked)


class CacheInUse(RafsError):
    """The cache files of a blob cannot be shared: this process already has a BlobCache of the
    blob there, or a process that does not share holds them exclusively."""


# (st_dev, st_ino) of the data files this process has a BlobCache on: one per blob and process
_open_here: set[tuple[int, int]] = set()
_open_here_lock = threading.Lock()


class CacheClosed(RafsError):
    """The BlobCache was closed."""


class DemandGate:
    """Counts on-demand reads waiting for fetches; background prefetch runs only while there are none."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting = 0

    @property
    def waiting(self) -> int:
        return self._waiting

    @contextmanager
    def demand(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
        try:
            yield
        finally:
            with self._cond:
                self._waiting -= 1
                if not self._waiting:
                    self._cond.notify_all()

    def wait_idle(self, stop: threading.Event, poll: float = 0.05,
                  wake: Callable[[], bool] | None = None) -> bool:
        """Block until no on-demand read waits (or `wake()` is true); False if `stop` was set."""
        with self._cond:
            while self._waiting and not stop.is_set() and not (wake is not None and wake()):
                self._cond.wait(poll)
        return not stop.is_set()

    def poke(self) -> None:
        """Wake the waiters of `wait_idle` so that they re-check `stop` / `wake`."""
        with self._cond:
            self._cond.notify_all()


class _Pending:
    """One in-flight operation on some chunks: a fetch batch or an xxh64 re-check.

    `results[i]` is the chunk's plain bytes or the exception it failed with;
    absent if the operation only learned that chunk i must be fetched again.
    """
    __slots__ = ("event", "results")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.results: dict[int, bytes | BaseException] = {}


class _PrefetchJob:
    """One `prefetch` call: its sorted chunk indices, how far it got, its Future."""
    __slots__ = ("indices", "pos", "fut", "low", "fetched")

    def __init__(self, indices: list[int], fut: Future, low: bool):
        self.indices = indices
        self.pos = 0
        self.fut = fut
        self.low = low
        self.fetched = 0


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
                 flush_interval: float = DEFAULT_FLUSH_INTERVAL, flush_chunks: int = DEFAULT_FLUSH_CHUNKS):
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
        self.name = f"blob sha256:{self.blob_id}"
        self.dir = os.fspath(cache_dir)
        os.makedirs(self.dir, exist_ok=True)
        self.data_path = os.path.join(self.dir, self.blob_id + ".blob")
        self.map_path = os.path.join(self.dir, self.blob_id + ".chunkmap")
        self.lock_path = os.path.join(self.dir, self.blob_id + ".lock")

        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._inflight: dict[int, _Pending] = {}
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._pool: ThreadPoolExecutor | None = None
        self._active = 0                   # reads / prefetch batches using the data file
        self._closing = False
        self._stop = threading.Event()     # stops background work
        self._dirty = 0                    # chunks marked ready since the last flush
        self._dirty_since = 0.0
        self._flush_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._urgent_jobs: deque[_PrefetchJob] = deque()   # high priority: before any low one
        self._background_jobs: deque[_PrefetchJob] = deque()
        self._prefetcher: threading.Thread | None = None
        self._write_failed = False
        self._cleared: dict[int, int] = {}   # ci index -> xxh64 its bytes on disk failed (not ready)
        self._map_seen: tuple | None = None  # identity of the chunkmap file last read / written

        chunks = blob_chunks(info, self.name)   # FormatError if the bootstrap's record is bad
        self.entries: list[ChunkEntry] = chunks.entries
        self.compressor = chunks.compressor
        self.digester = chunks.digester
        self.chunk_count = chunks.chunk_count     # of the blob: the chunkmap's size
        self.view_size = chunks.view_size
        self._offsets = [e.uncompressed_offset for e in self.entries]
        self._pos = {e.index: k for k, e in enumerate(self.entries)}   # ci index -> position
        self.total_bytes = sum(e.uncompressed_size for e in self.entries)
        self._partial = len(self.entries) < self.chunk_count   # a subset: mask the others' bytes
        self._ready_count = 0                     # entries of this cache ready (chunkmap says so)
        self._ready_bytes = 0

        self._fd = self._lock_fd = -1
        self._key = self._claim()             # first: one BlobCache per blob in this process
        try:
            self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            with self._xlock():
                self._fd, sole = self._open_data_file()
                self._map, self._state = self._load_state(sole)
                if sole:                       # keep only a shared lock: others may join now
                    self._flock_shared(self._fd)
        except BaseException:
            self._release_files()
            raise

    # ------------------------------------------------------------------ opening
    def covers(self, info) -> bool:
        """True if this cache serves every chunk of `info` (another record of the same blob)."""
        if info is self.info or getattr(info, "entries", None) is getattr(self.info, "entries", None):
            return True
        for e in info.entries:
            k = self._pos.get(e.index)
            if k is None or self.entries[k] != e:
                return False
        return True

    def _claim(self) -> tuple:
        """Register this BlobCache as the one of its blob in this process (CacheInUse if taken)."""
        st = os.stat(self.dir)
        key = (st.st_dev, st.st_ino, self.blob_id)
        with _open_here_lock:
            if key in _open_here:
                raise CacheInUse(f"{self.name}: this process already has a blob cache on "
                                 f"{self.data_path}; share it (CacheManager.open) instead of "
                                 "opening a second one")
            _open_here.add(key)
        return key

    def _release_files(self) -> None:
        """Close the files (releasing the flocks) and the in-process claim; idempotent."""
        for attr in ("_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)
        with _open_here_lock:
            _open_here.discard(self._key)

    @contextmanager
    def _xlock(self) -> Iterator[None]:
        """The exclusive cross-process lock of this blob's cache files (short steps only)."""
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _in_use_by_other(self) -> CacheInUse:
        return CacheInUse(f"{self.name}: cache file {self.data_path} is locked exclusively by "
                          "another process that does not share its cache directory (an older "
                          "pynydus daemon?); give each mount its own --cache-dir")

    def _flock_shared(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._in_use_by_other() from None

    def _open_data_file(self) -> tuple[int, bool]:
        """Open and flock the data file (called under `_xlock`): (fd, True if no other user)."""
        fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd, True
            except BlockingIOError:
                pass
            self._flock_shared(fd)           # other processes use it: share it with them
            return fd, False
        except BaseException:
            os.close(fd)
            raise

    def _map_kw(self) -> dict:
        return dict(chunk_count=self.chunk_count, blob_id=self.blob_id, view_size=self.view_size)

    def _map_identity(self) -> tuple | None:
        try:
            st = os.stat(self.map_path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)

    def _load_state(self, sole: bool) -> tuple[ChunkMap, bytearray]:
        n = len(self.entries)
        kw = self._map_kw()
        existed = os.path.exists(self.map_path)
        self._map_seen = self._map_identity()
        cmap, reason = ChunkMap.load(self.map_path, **kw)
        size = os.fstat(self._fd).st_size
        if reason is None and size != self.view_size:
            cmap, reason = ChunkMap(**kw), f"the data file is {size} bytes, not {self.view_size}"
        if reason is not None:
            if existed:
                log.warning("%s: ignoring cache state %s (%s); starting with an empty cache",
                            self.name, self.map_path, reason)
            if sole:
                # Drop whatever the data file held: nothing vouches for it.
                os.ftruncate(self._fd, 0)
                os.ftruncate(self._fd, self.view_size)
            elif size < self.view_size:
                # Another process uses the file (and may not have flushed its map yet): its
                # chunks must stay; we just start empty. Growing never destroys a byte.
                os.ftruncate(self._fd, self.view_size)
        state = bytearray(n)
        for k, e in enumerate(self.entries):
            if cmap.ready(e.index):
                state[k] = UNCHECKED
                self._ready_count += 1
                self._ready_bytes += e.uncompressed_size
        return cmap, state

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
            self._stop.set()
            jobs = list(self._urgent_jobs) + list(self._background_jobs)
            self._urgent_jobs.clear()
            self._background_jobs.clear()
            self._cond.notify_all()
        for job in jobs:
            job.fut.cancel()
        self.gate.poke()
        for t in (self._prefetcher, self._flusher):
            if t is not None and t is not threading.current_thread():
                t.join()
        with self._lock:
            while self._active:
                self._cond.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        try:
            self.flush()
        finally:
            self._release_files()          # releases the flocks too

    def __enter__(self) -> "BlobCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def _span(self, offset: int, end: int) -> range:
        """Indices of the chunks overlapping view range [offset, end)."""
        lo = bisect.bisect_right(self._offsets, offset) - 1
        if lo < 0 or self.entries[lo].uncompressed_end <= offset:
            lo += 1
        hi = bisect.bisect_left(self._offsets, end)
        return range(lo, max(lo, hi))

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
            mem, hits, misses = self._ensure(self._span(offset, end), urgent=True)
            out = os.pread(self._fd, end - offset, offset)
            while len(out) < end - offset:   # only for reads > 2 GiB (Linux caps one read)
                more = os.pread(self._fd, end - offset - len(out), offset + len(out))
                if not more:                 # cannot happen: the file is view_size long
                    raise RafsError(f"{self.name}: cache file {self.data_path} is truncated")
                out += more
            if mem or self._partial:
                buf = bytearray(out)
                for i, plain in mem.items():  # chunks that could not be written to the data file
                    e = self.entries[i]
                    lo, hi = max(offset, e.uncompressed_offset), min(end, e.uncompressed_end)
                    buf[lo - offset:hi - offset] = plain[lo - e.uncompressed_offset:
                                                         hi - e.uncompressed_offset]
                if self._partial:
                    self._zero_outside(buf, offset, end)
                out = bytes(buf)
        self.metrics.read(len(out), hits, misses)
        return out

    def _zero_outside(self, buf: bytearray, offset: int, end: int) -> None:
        """Zero the bytes of view range [offset, end) (in `buf`) that lie in none of this cache's
        entries: the data file may hold chunks another bootstrap of the blob fetched there, and
        this one's view is the same whoever shares the cache."""
        pos = offset
        for i in self._span(offset, end):
            e = self.entries[i]
            if e.uncompressed_offset > pos:
                buf[pos - offset:e.uncompressed_offset - offset] = bytes(e.uncompressed_offset - pos)
            pos = max(pos, e.uncompressed_end)
        if pos < end:
            buf[pos - offset:] = bytes(end - pos)

    def _ensure(self, indices: Sequence[int], *, urgent: bool,
                keep: bool = True) -> tuple[dict[int, bytes], int, int]:
        """Make chunks `indices` ready; returns (memory-only chunks, hits, misses).

        Re-checks UNCHECKED chunks, fetches MISSING ones (merged, with readahead
        when `urgent`), waits for chunks other threads are fetching; raises the
        error of any chunk that cannot be made ready. The first dict holds the
        plain bytes of chunks that were fetched but could not be written to the
        data file (only if `keep`).
        """
        wanted = indices if isinstance(indices, range) else set(indices)
        with self._lock:
            stale = any(self._state[i] == MISSING and i not in self._inflight for i in indices)
        if stale:          # about to fetch: another process sharing the cache may have them
            self._refresh_from_disk()
        mem: dict[int, bytes] = {}
        served: set[int] = set()           # delivered from memory (write failed)
        hits = misses = 0
        first = True
        with ExitStack() as stack:
            in_demand = False
            while True:
                checks: list[tuple[int, _Pending]] = []
                waits: list[tuple[int, _Pending]] = []
                batches: list[tuple[list[int], _Pending]] = []
                with self._lock:
                    missing = []
                    for i in indices:
                        if i in served:
                            continue
                        st = self._state[i]
                        if st == READY:
                            hits += first
                            continue
                        p = self._inflight.get(i)
                        if p is not None:
                            misses += first
                            waits.append((i, p))
                        elif st == UNCHECKED:
                            hits += first
                            p = self._inflight[i] = _Pending()
                            checks.append((i, p))
                        else:
                            misses += first
                            missing.append(i)
                    if missing:
                        batches = self._plan(missing, widen=self._widen_limit() if urgent else 0)
                first = False
                if not (checks or waits or batches):
                    break
                if urgent and not in_demand:
                    stack.enter_context(self.gate.demand())
                    in_demand = True
                for i, p in checks:
                    self._recheck(i, p)
                    waits.append((i, p))
                if batches:
                    self._run_batches(batches)
                    waits.extend((i, p) for b, p in batches for i in b if i in wanted)
                error: BaseException | None = None
                for i, p in waits:
                    p.event.wait()
                    r = p.results.get(i)
                    if isinstance(r, BaseException):
                        error = error or r
                    elif r is not None and self._state[i] != READY:
                        served.add(i)
                        if keep:
                            mem[i] = r
                if error is not None:
                    raise error
        return mem, hits, misses

    def _widen_limit(self) -> int:
        """Compressed bytes a demand request may grow to over the missing chunks after it."""
        if self.readahead:
            return self.merge_size
        if self.amplify == "auto":
            return min(self.merge_size, self.cost_model.amplify_bytes())
        return min(self.merge_size, self.amplify)

    def _plan(self, missing: list[int], *, widen: int) -> list[tuple[list[int], _Pending]]:
        """Group sorted missing chunk positions into merged requests and mark them in flight
        (locked); the last request grows over the following missing chunks up to `widen` bytes.

        A request spans neighbours in `entries` that follow each other in the blob file
        (`chunks.joinable`: at most MAX_MERGE_GAP bytes apart), at most `merge_size` bytes
        from its first byte to its last (a single chunk may be larger)."""
        ents = self.entries
        groups: list[list[int]] = []
        for i in missing:
            if groups:
                g = groups[-1]
                if g[-1] == i - 1 and joinable(ents[i - 1], ents[i]) \
                        and ents[i].compressed_end - ents[g[0]].compressed_offset <= self.merge_size:
                    g.append(i)
                    continue
            groups.append([i])
        if widen and groups:
            last = groups[-1]
            start = ents[last[0]].compressed_offset
            j = last[-1] + 1
            while (j < len(ents) and self._state[j] == MISSING and j not in self._inflight
                   and joinable(ents[j - 1], ents[j])
                   and ents[j].compressed_end - start <= widen):
                last.append(j)
                j += 1
        out = []
        for g in groups:
            p = _Pending()
            for i in g:
                self._inflight[i] = p
            out.append((g, p))
        return out

    def _run_batches(self, batches: list[tuple[list[int], _Pending]], *, prefetch: bool = False) -> None:
        """Fetch the batches (the first in this thread, the others in parallel in the pool)."""
        futures = []
        if len(batches) > 1:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.max_inflight,
                                                    thread_name_prefix=f"fetch-{self.blob_id[:12]}")
                pool = self._pool
            futures = [pool.submit(self._fetch, b, p, prefetch) for b, p in batches[1:]]
        self._fetch(*batches[0], prefetch)
        for f in futures:
            f.result()                     # _fetch never raises; completes its _Pending

    # ------------------------------------------------------------------ fetching
    def _fetch(self, batch: list[int], p: _Pending, prefetch: bool = False) -> None:
        """Fetch one merged range, verify each chunk, write and mark the good ones; completes `p`.

        Only the entries' own bytes are decoded; bytes between them (a gap of chunks this
        bootstrap does not use) are dropped, and the backend need not even fetch them."""
        try:
            entries = [self.entries[i] for i in batch]
            start = entries[0].compressed_offset
            length = entries[-1].compressed_end - start
            wanted = [(e.compressed_offset, e.compressed_end) for e in entries]
            with self._slots:
                t0 = time.monotonic()
                try:
                    data = memoryview(self.backend.read_sparse(self.blob_id, start, length, wanted))
                except BaseException:
                    self.metrics.fetch_error()
                    raise
                self.metrics.fetch_ok(length, len(batch), time.monotonic() - t0, prefetch=prefetch)
            for i, e in zip(batch, entries):
                rel = e.compressed_offset - start
                try:
                    plain = self._verified(e, data[rel:rel + e.compressed_size])
                except IntegrityError as err:
                    p.results[i] = err
                    continue
                self._store(i, e, plain)
                p.results[i] = plain
            # what a request of this size costs until its bytes are usable (sizes the next widening)
            self.cost_model.observe(length, time.monotonic() - t0)
        except BaseException as err:
            for i in batch:
                p.results.setdefault(i, err)
        finally:
            with self._lock:
                for i in batch:
                    if self._inflight.get(i) is p:
                        del self._inflight[i]
            p.event.set()

    def _decode(self, e: ChunkEntry, payload) -> bytes:
        """Plain bytes of chunk `e` from its payload; IntegrityError unless they match its digest."""
        return decode_chunk(e, payload, self.compressor, self.digester, name=self.name)

    def _where(self, e: ChunkEntry) -> str:
        return (f"{self.name}: chunk #{e.index} (view offset {e.uncompressed_offset}, "
                f"{e.uncompressed_size} bytes; blob bytes [{e.compressed_offset}, "
                f"{e.compressed_end}))")

    def _verified(self, e: ChunkEntry, payload) -> bytes:
        """Decode and verify chunk `e`; one retry from the backend's origin; logs one line on failure."""
        try:
            return self._decode(e, payload)
        except IntegrityError as err:
            self.metrics.verify_failure()
            first = err
        try:
            again = self.backend.read_from_origin(self.blob_id, e.compressed_offset,
                                                  e.compressed_size)
        except BackendError as err:
            again = None
            log.debug("%s: re-reading from the origin failed: %s", self._where(e), err)
        if again is not None:
            try:
                plain = self._decode(e, again)
                log.warning("%s: a mirror served corrupt bytes (%s); the origin's are good",
                            self._where(e), first)
                return plain
            except IntegrityError as err:
                self.metrics.verify_failure()
                first = err
        msg = f"{self.name}: chunk #{e.index} failed verification and is not cached: {first}"
        log.error("%s", msg)
        raise IntegrityError(msg) from None

    def _mark(self, i: int, e: ChunkEntry, h: int) -> None:
        """Locked: chunk position `i` holds verified bytes with chunkmap hash `h`."""
        self._cleared.pop(e.index, None)
        if not self._map.ready(e.index):
            self._ready_count += 1
            self._ready_bytes += e.uncompressed_size
        self._map.mark_ready(e.index, h)
        self._state[i] = READY
        self._note_dirty()

    def _store(self, i: int, e: ChunkEntry, plain: bytes) -> None:
        """Write a verified chunk at its view offset and mark it ready (unless the write fails)."""
        try:
            view = memoryview(plain)
            off = e.uncompressed_offset
            while view.nbytes:
                n = os.pwrite(self._fd, view, off)
                view, off = view[n:], off + n
        except OSError as err:
            if not self._write_failed:
                self._write_failed = True
                log.warning("%s: cannot write chunk #%d to %s (%s); serving fetched chunks from "
                            "memory without caching them", self.name, e.index, self.data_path,
                            os.strerror(err.errno) if err.errno else err)
            return
        h = chunk_xxh64(plain, e.digest)
        with self._lock:
            if self._state[i] != READY:
                self._mark(i, e, h)

    def _recheck(self, i: int, p: _Pending) -> None:
        """First read of a chunk after a restart: compare its bytes with the recorded xxh64
        (seeded with the chunk digest: bytes verified against another digest fail too)."""
        e = self.entries[i]
        try:
            try:
                data = os.pread(self._fd, e.uncompressed_size, e.uncompressed_offset)
            except OSError as err:
                data, why = None, f"cannot read it: {err}"
            else:
                why = "its xxh64 does not match the cache state"
            with self._lock:
                expected = self._map.xxh64(e.index)
            if data is not None and len(data) == e.uncompressed_size \
                    and chunk_xxh64(data, e.digest) == expected:
                with self._lock:
                    self._state[i] = READY
                return
            log.warning("%s: cached chunk #%d (view offset %d) changed on disk (%s); fetching "
                        "it again", self.name, e.index, e.uncompressed_offset, why)
            self.metrics.recheck_failure()
            with self._lock:
                if self._map.ready(e.index):
                    self._ready_count -= 1
                    self._ready_bytes -= e.uncompressed_size
                self._cleared[e.index] = expected   # a shared map may still vouch for these bytes
                self._map.clear(e.index)
                self._state[i] = MISSING
                self._note_dirty()
        finally:
            with self._lock:
                if self._inflight.get(i) is p:
                    del self._inflight[i]
            p.event.set()

    # ------------------------------------------------------------------ state flushing
    def _note_dirty(self) -> None:
        """Called locked after the chunkmap changed: make sure the flusher will write it."""
        if not self._dirty:
            self._dirty_since = time.monotonic()
        self._dirty += 1
        if self._closing:
            return
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                             name=f"flush-{self.blob_id[:12]}")
            self._flusher.start()
        elif self._dirty >= self.flush_chunks:
            self._cond.notify_all()

    def _flush_loop(self) -> None:
        """Flush after `flush_interval` or `flush_chunks` chunks; exit when nothing is dirty."""
        while True:
            with self._lock:
                while not self._closing:
                    if not self._dirty:
                        self._flusher = None   # _note_dirty starts a new one when needed
                        return
                    left = self._dirty_since + self.flush_interval - time.monotonic()
                    if self._dirty >= self.flush_chunks or left <= 0:
                        break
                    self._cond.wait(left)
                if self._closing:
                    return
            try:
                self.flush()
            except OSError as e:
                log.warning("%s: cannot write cache state %s: %s", self.name, self.map_path, e)
                time.sleep(self.flush_interval)

    def flush(self) -> None:
        """Persist the ready-state: fdatasync the data file, then atomically replace the chunkmap.

        Under the cross-process lock, the map on disk (other processes' chunks) is merged
        in first, so that no process's ready bits are lost.
        """
        with self._flush_lock:
            with self._lock:
                if not self._dirty:
                    return
            with self._xlock():
                disk, reason = ChunkMap.load(self.map_path, **self._map_kw())
                with self._lock:
                    if reason is None:
                        self._adopt(disk)
                    encoded = self._map.encode()
                    dirty, self._dirty = self._dirty, 0
                try:
                    os.fdatasync(self._fd)
                    write_atomic(self.map_path, encoded)
                except BaseException:
                    with self._lock:
                        self._dirty += dirty
                    raise
                seen = self._map_identity()
                with self._lock:
                    self._map_seen = seen

    def _refresh_from_disk(self) -> int:
        """Adopt chunks another process made ready since the chunkmap was last read (they are
        re-checked with xxh64 before being served); returns how many."""
        seen = self._map_identity()
        with self._lock:
            if seen is None or seen == self._map_seen:
                return 0
        disk, reason = ChunkMap.load(self.map_path, **self._map_kw())
        with self._lock:
            self._map_seen = seen
            return 0 if reason is not None else self._adopt(disk)

    def _adopt(self, disk: ChunkMap) -> int:
        """Merge the on-disk map into ours (locked): its ready chunks we lack become UNCHECKED
        (or stay in flight here); chunks whose bytes we found changed are left out."""
        n = 0
        for ci in self._map.merge_from(disk, self._cleared):
            i = self._pos.get(ci)
            if i is None:                      # a chunk of the blob this bootstrap does not use
                continue
            n += 1
            self._ready_count += 1
            self._ready_bytes += self.entries[i].uncompressed_size
            if self._state[i] == MISSING and i not in self._inflight:
                self._state[i] = UNCHECKED
        return n

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
                wanted.update(self._span(off, end))
        fut: Future = Future()
        with self._lock:
            if self._closing:
                fut.cancel()
                return fut
            job = _PrefetchJob(sorted(wanted), fut, low_priority)
            (self._background_jobs if low_priority else self._urgent_jobs).append(job)
            if self._prefetcher is None:
                self._prefetcher = threading.Thread(target=self._prefetch_loop, daemon=True,
                                                    name=f"prefetch-{self.blob_id[:12]}")
                self._prefetcher.start()
        if not low_priority:
            self.gate.poke()                   # a low-priority job may be waiting for the gate
        return fut

    def prefetch_all(self) -> Future:
        """Prefetch the whole blob in the background (low priority)."""
        return self.prefetch([(0, self.view_size)])

    def _urgent_waiting(self) -> bool:
        return bool(self._urgent_jobs)

    def _prefetch_loop(self) -> None:
        """Run urgent jobs first (each whole), then low-priority ones one request at a time."""
        while True:
            with self._lock:
                for q in (self._urgent_jobs, self._background_jobs):
                    while q and q[0].fut.cancelled():
                        q.popleft()
                if self._closing or not (self._urgent_jobs or self._background_jobs):
                    self._prefetcher = None
                    return
                job = (self._urgent_jobs.popleft() if self._urgent_jobs
                       else self._background_jobs[0])
            if not job.low:
                self._settle(job, self._prefetch_urgent)
                continue
            if not self.gate.wait_idle(self._stop, wake=self._urgent_waiting):
                continue                       # closing: the loop ends above
            with self._lock:
                if self._urgent_jobs:
                    continue                   # one arrived while we waited: it goes first
            self._settle(job, self._prefetch_step)

    def _settle(self, job: _PrefetchJob, step: Callable[[_PrefetchJob], bool]) -> None:
        """Run `step(job)`; when it says the job is done (or fails), complete the job's Future."""
        try:
            done, failed, outcome = step(job), False, None
        except CacheClosed:
            done, failed, outcome = True, None, None
        except BaseException as e:
            log.warning("%s: prefetch stopped: %s", self.name, e)
            done, failed, outcome = True, True, e
        if not done:
            return
        with self._lock:
            if job.low and job in self._background_jobs:
                self._background_jobs.remove(job)
        try:                                   # the Future is never marked running, so a
            if failed is None:                 # caller's cancel() stops the job: done maybe
                job.fut.cancel()
            elif failed:
                job.fut.set_exception(outcome)
            else:
                job.fut.set_result(job.fetched)
        except InvalidStateError:
            pass

    def _prefetch_urgent(self, job: _PrefetchJob) -> bool:
        with self._using():
            _, _, job.fetched = self._ensure(job.indices, urgent=False, keep=False)
        return True

    def _prefetch_step(self, job: _PrefetchJob) -> bool:
        """Fetch the next merged request of a low-priority job; True when the job is done."""
        with self._using():
            self._refresh_from_disk()          # chunks another process fetched meanwhile
            with self._lock:
                batch: list[int] = []
                ents = self.entries
                indices = job.indices
                while job.pos < len(indices):
                    i = indices[job.pos]
                    if self._state[i] != MISSING or i in self._inflight:
                        if batch:
                            break
                        job.pos += 1
                        continue
                    if batch and (i != batch[-1] + 1 or not joinable(ents[i - 1], ents[i])
                                  or ents[i].compressed_end - ents[batch[0]].compressed_offset
                                  > self.merge_size):
                        break
                    batch.append(i)
                    job.pos += 1
                if not batch:
                    return True
                p = _Pending()
                for i in batch:
                    self._inflight[i] = p
            self._fetch(batch, p, prefetch=True)
        for i in batch:
            r = p.results.get(i)
            if isinstance(r, IntegrityError):
                continue                       # logged; the chunk stays missing, go on with the rest
            if isinstance(r, BaseException):
                raise r
            job.fetched += 1
        return job.pos >= len(job.indices)

    # ------------------------------------------------------------------ reporting
    def usage(self) -> dict:
        """Disk and chunk usage: `disk_bytes` is what the sparse data file really occupies."""
        st = os.fstat(self._fd)
        with self._lock:
            ready = self._ready_count
            ready_bytes = self._ready_bytes
            inflight = len(self._inflight)
        return {
            "blob_id": self.blob_id,
            "disk_bytes": st.st_blocks * 512,
            "view_size": self.view_size,
            "chunks_total": len(self.entries),
            "chunks_ready": ready,
            "bytes_total": self.total_bytes,
            "bytes_ready": ready_bytes,
            "chunks_inflight": inflight,
            "complete": ready == len(self.entries),
        }

    def chunk_ready(self, i: int) -> bool:
        """True if chunk `entries[i]`'s bytes are in the data file (verified, or vouched for by
        the chunkmap)."""
        with self._lock:
            return self._state[i] != MISSING


class CacheManager:
    """One `BlobCache` per blob of a mount, over one backend, sharing metrics and the demand gate.

    Owns the backend (closed by `close()`) unless `owns_backend=False`. Options
    (`merge_size`, `max_inflight`, `readahead`, `amplify`, `flush_interval`,
    `flush_chunks`) are passed to every BlobCache; the blobs share one
    FetchCostModel (they share the backend and its link).
    """

    def __init__(self, cache_dir: str | os.PathLike, backend: BlobBackend, *,
                 metrics: StorageMetrics | None = None, owns_backend: bool = True, **cache_options):
        self.dir = os.fspath(cache_dir)
        os.makedirs(self.dir, exist_ok=True)
        self.backend = backend
        self.metrics = metrics if metrics is not None else StorageMetrics(backend.source_stats)
        self.gate = DemandGate()
        self.cost_model = FetchCostModel()
        self._options = cache_options
        self._owns_backend = owns_backend
        self._lock = threading.Lock()
        self._caches: dict[str, BlobCache] = {}
        self._opening: dict[str, Future] = {}     # blob id -> the BlobCache being opened
        self._closed = False

    def open(self, info) -> BlobCache:
        """The BlobCache of blob `info` (a BlobInfo), opened on first use (reads its chunkmap;
        nothing is fetched).

        Opening happens without holding the manager's lock: opening one blob never waits
        for another's. Concurrent opens of one blob share one BlobCache (or its error). A
        manager serves one bootstrap: a record of an open blob with chunks its cache does not
        serve raises CacheInUse.
        """
        blob_id = normalize_blob_id(info.blob_id)
        with self._lock:
            if self._closed:
                raise CacheClosed(f"cache manager of {self.dir} is closed")
            cache = self._caches.get(blob_id)
            if cache is not None:
                return self._same(cache, info)
            pending = self._opening.get(blob_id)
            mine = pending is None
            if mine:
                pending = self._opening[blob_id] = Future()
        if not mine:
            return self._same(pending.result(), info)   # the other opener's cache, or its error
        try:
            cache = BlobCache(self.dir, info, self.backend, metrics=self.metrics,
                              gate=self.gate, cost_model=self.cost_model, **self._options)
        except BaseException as e:
            with self._lock:
                del self._opening[blob_id]
            pending.set_exception(e)
            raise
        with self._lock:
            del self._opening[blob_id]
            closed = self._closed
            if not closed:
                self._caches[blob_id] = cache
        if closed:                             # the manager closed while we opened it
            cache.close()
            err = CacheClosed(f"cache manager of {self.dir} is closed")
            pending.set_exception(err)
            raise err
        pending.set_result(cache)
        return cache

    @staticmethod
    def _same(cache: BlobCache, info) -> BlobCache:
        if not cache.covers(info):
            raise CacheInUse(f"{cache.name} is open for another bootstrap whose chunk table "
                             "lists other chunks of it; use one cache manager per image")
        return cache

    def get(self, blob_id: str) -> BlobCache | None:
        with self._lock:
            return self._caches.get(normalize_blob_id(blob_id))

    def caches(self) -> list[BlobCache]:
        with self._lock:
            return list(self._caches.values())

    def prefetch_all(self) -> list[Future]:
        """Background prefetch of every open blob (one low-priority request per blob at a time)."""
        return [c.prefetch_all() for c in self.caches()]

    def flush(self) -> None:
        for c in self.caches():
            c.flush()

    def stats(self) -> dict:
        """{"metrics": StorageMetrics snapshot (with per-source bytes), "blobs": usage per blob,
        "totals": the usage summed}; JSON-ready."""
        blobs = {c.blob_id: c.usage() for c in self.caches()}
        keys = ("disk_bytes", "view_size", "chunks_total", "chunks_ready", "bytes_total",
                "bytes_ready", "chunks_inflight")
        totals = {k: sum(u[k] for u in blobs.values()) for k in keys}
        totals["blobs"] = len(blobs)
        return {"metrics": self.metrics.snapshot(), "blobs": blobs, "totals": totals,
                "link": self.cost_model.snapshot()}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            opening = list(self._opening.values())
        wait_futures(opening)                  # opens in progress finish (and close their cache)
        with self._lock:
            caches = list(self._caches.values())
        errors = []
        for c in caches:
            try:
                c.close()
            except Exception as e:          # close the others anyway
                errors.append(e)
                log.warning("closing %s: %s", c.name, e)
        if self._owns_backend:
            self.backend.close()
        if errors:
            raise errors[0]

    def __enter__(self) -> "CacheManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
