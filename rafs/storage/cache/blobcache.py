"""The blob cache: a blob's uncompressed view, fetched lazily, verified, kept on disk across restarts.

`BlobCache.read(offset, size)` serves any range of a blob's uncompressed view
(the FUSE daemon's file reads and the erofs mode's device-file reads both end
here). It maps the range to TOC entries, serves ready chunks from the cache
file, and fetches the missing ones from the backend.

Files in `cache_dir`, per blob (`<id>` = hex sha256 of the blob):

* `<id>.blob`: a sparse file of the uncompressed view (size = view size);
  chunk k's plain bytes are pwritten at its view offset, never-fetched chunks
  and the alignment padding between chunks are holes (read as zeros).
* `<id>.chunkmap`: which chunks of `<id>.blob` are ready, with the xxh64 of
  each (`state.ChunkMap`), replaced atomically after the data file was
  fdatasync'd; flushed every `flush_interval` seconds or `flush_chunks`
  chunks while fetching, and on close.
* `<id>.toc`: the blob's TOC + footer as fetched (TOC bytes then the 128-byte
  footer), so a warm re-open needs no request at all. Re-verified against the
  trusted TOC digest at every open; a bad one is fetched again.

Trust and faults:

* Every fetched chunk is decompressed and checked against its TOC digest
  (the TOC itself against the bootstrap's `toc_digest`) *before* it is served
  or written. A mismatch raises `IntegrityError` and logs one line naming the
  blob and chunk; the chunk is not written and not marked ready. If the
  backend can re-read from an authoritative source (`read_from_origin`: a
  mirror or peer served the bytes) that is tried once first.
* After a restart, chunks the chunkmap vouches for are re-checked with xxh64
  on their first read and fetched again if the data file changed. An
  unusable chunkmap (torn, corrupt, another blob) means an empty cache and a
  warning, never an error and never wrong bytes.
* Backend failures surface as `BackendError` once the backend's own retries
  are spent; nothing is marked ready, and the next read tries again.

Fetching:

* Missing chunks adjacent in the blob are fetched with one range request of
  at most `merge_size` compressed bytes; with `readahead`, a read that misses
  extends its last request over the following missing chunks up to
  `merge_size`.
* Thread-safe. A chunk being fetched is in an in-flight map; other readers of
  it wait for that fetch and get its result or its error (one fetch per
  chunk). At most `max_inflight` backend requests per blob run at a time; a
  read needing several requests issues them in parallel.
* `prefetch(ranges)` / `prefetch_all()` run in one background thread per blob
  at low priority: one background request at a time, started only while no
  on-demand read is waiting for a fetch (a `DemandGate`, shared by all blobs of
  a `CacheManager`). `close()` stops it between requests.
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
from contextlib import ExitStack, contextmanager
from typing import Iterable, Iterator, Sequence

import xxhash

from rafs.blob import FOOTER_SIZE, ChunkEntry, Footer, parse_toc, read_footer
from rafs.compress import decompress
from rafs.digest import digest as digest_of
from rafs.errors import BackendError, FormatError, IntegrityError, RafsError

from ..backend.base import BlobBackend, normalize_blob_id
from ..metrics import StorageMetrics
from .state import ChunkMap, write_atomic

log = logging.getLogger(__name__)

DEFAULT_MERGE_SIZE = 1 << 20
MERGE_SIZE_MIN = 4 << 10
MERGE_SIZE_MAX = 64 << 20
DEFAULT_MAX_INFLIGHT = 4
DEFAULT_FLUSH_INTERVAL = 1.0       # seconds between chunkmap flushes while chunks arrive
DEFAULT_FLUSH_CHUNKS = 64          # ... or after this many newly ready chunks
_TAIL_HINT = 64 << 10              # first TOC read: footer + up to 64 KiB of TOC

# per-chunk state in memory
MISSING = 0                        # not in the data file (or not trusted)
UNCHECKED = 1                      # the chunkmap on disk says ready; xxh64 not re-checked yet
READY = 2                          # verified in this process (fetched, or re-checked)


class CacheInUse(RafsError):
    """The cache files of a blob are locked by another BlobCache (another daemon)."""


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

    def wait_idle(self, stop: threading.Event, poll: float = 0.05) -> bool:
        """Block until no on-demand read waits; False if `stop` was set meanwhile."""
        with self._cond:
            while self._waiting and not stop.is_set():
                self._cond.wait(poll)
        return not stop.is_set()


class _Pending:
    """One in-flight operation on some chunks: a fetch batch or an xxh64 re-check.

    `results[i]` is the chunk's plain bytes or the exception it failed with;
    absent if the operation only learned that chunk i must be fetched again.
    """
    __slots__ = ("event", "results")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.results: dict[int, bytes | BaseException] = {}


class BlobCache:
    """Lazily fetched, verified, persistent uncompressed view of one blob (see the module docstring).

    `info` is the bootstrap's record of the blob (`rafs.bootstrap.BlobInfo`, or
    anything with `blob_id`, `compressed_size`, `toc_digest` and optionally
    `uncompressed_size`, `chunk_count`, `toc_offset`, `toc_size`, `compressor`,
    `digester`, which are checked against the blob's footer).
    """

    def __init__(self, cache_dir: str | os.PathLike, info, backend: BlobBackend, *,
                 merge_size: int = DEFAULT_MERGE_SIZE, max_inflight: int = DEFAULT_MAX_INFLIGHT,
                 readahead: bool = True, metrics: StorageMetrics | None = None,
                 gate: DemandGate | None = None, flush_interval: float = DEFAULT_FLUSH_INTERVAL,
                 flush_chunks: int = DEFAULT_FLUSH_CHUNKS):
        if not MERGE_SIZE_MIN <= merge_size <= MERGE_SIZE_MAX:
            raise ValueError(f"merge_size must be {MERGE_SIZE_MIN}..{MERGE_SIZE_MAX} bytes, "
                             f"got {merge_size}")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        if flush_interval <= 0 or flush_chunks < 1:
            raise ValueError("flush_interval must be > 0 and flush_chunks >= 1")
        self.blob_id = normalize_blob_id(info.blob_id)
        self.info = info
        self.backend = backend
        self.merge_size = merge_size
        self.max_inflight = max_inflight
        self.readahead = readahead
        self.metrics = metrics if metrics is not None else StorageMetrics(backend.source_stats)
        self.gate = gate if gate is not None else DemandGate()
        self.flush_interval = flush_interval
        self.flush_chunks = flush_chunks
        self.name = f"blob sha256:{self.blob_id}"
        self.dir = os.fspath(cache_dir)
        os.makedirs(self.dir, exist_ok=True)
        self.data_path = os.path.join(self.dir, self.blob_id + ".blob")
        self.map_path = os.path.join(self.dir, self.blob_id + ".chunkmap")
        self.toc_path = os.path.join(self.dir, self.blob_id + ".toc")

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
        self._prefetch_jobs: deque[tuple[list[int], Future, bool]] = deque()
        self._prefetcher: threading.Thread | None = None
        self._write_failed = False

        self._fd = self._open_data_file()     # locked first: one cache user per blob
        try:
            self.footer, self.toc = self._load_toc()
            self._offsets = [e.uncompressed_offset for e in self.toc]
            self.view_size = self.footer.uncompressed_size
            self.total_bytes = sum(e.uncompressed_size for e in self.toc)
            self._map, self._state, self._ready_bytes = self._load_state()
        except BaseException:
            os.close(self._fd)
            raise

    # ------------------------------------------------------------------ opening
    def _load_toc(self) -> tuple[Footer, list[ChunkEntry]]:
        blob_size = self.info.compressed_size
        try:
            with open(self.toc_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = None
        except OSError as e:
            log.warning("%s: cannot read cached TOC %s (%s); fetching it again", self.name,
                        self.toc_path, e)
            data = None
        if data is not None:
            try:
                footer = read_footer(data, blob_size)
                toc = parse_toc(data[:-FOOTER_SIZE], footer, trusted_digest=self.info.toc_digest)
                self._check_info(footer)
                return footer, toc
            except (FormatError, IntegrityError) as e:
                log.warning("%s: cached TOC %s is unusable (%s); fetching it again", self.name,
                            self.toc_path, e)
        try:
            tail_len = min(blob_size, FOOTER_SIZE + _TAIL_HINT)
            tail = self.backend.read_range(self.blob_id, blob_size - tail_len, tail_len)
            footer = read_footer(tail, blob_size)
            if footer.toc_size + FOOTER_SIZE <= tail_len:
                toc_bytes = tail[tail_len - FOOTER_SIZE - footer.toc_size:tail_len - FOOTER_SIZE]
            else:
                toc_bytes = self.backend.read_range(self.blob_id, footer.toc_offset,
                                                    footer.toc_size)
            toc = parse_toc(toc_bytes, footer, trusted_digest=self.info.toc_digest)
        except (FormatError, IntegrityError) as e:
            raise type(e)(f"{self.name}: {e}") from None
        self._check_info(footer)
        write_atomic(self.toc_path, bytes(toc_bytes) + tail[-FOOTER_SIZE:])
        return footer, toc

    def _check_info(self, footer: Footer) -> None:
        """The bootstrap's blob record must agree with the (TOC-digest-checked) footer."""
        checks = {"uncompressed_size": footer.uncompressed_size, "chunk_count": footer.chunk_count,
                  "toc_offset": footer.toc_offset, "toc_size": footer.toc_size,
                  "compressor": footer.compressor, "digester": footer.digester}
        for field, actual in checks.items():
            want = getattr(self.info, field, None)
            if want is not None and want != actual:
                raise FormatError(f"{self.name}: the bootstrap says {field} is {want!r} but the "
                                  f"blob's footer says {actual!r}: the bootstrap does not match "
                                  "this blob")

    def _open_data_file(self) -> int:
        fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CacheInUse(f"{self.name}: cache file {self.data_path} is in use by another "
                             "blob cache (another daemon on the same cache directory?)") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _load_state(self) -> tuple[ChunkMap, bytearray, int]:
        n = len(self.toc)
        kw = dict(chunk_count=n, blob_id=self.blob_id, toc_digest=self.footer.toc_digest,
                  view_size=self.view_size)
        existed = os.path.exists(self.map_path)
        cmap, reason = ChunkMap.load(self.map_path, **kw)
        if reason is None and os.fstat(self._fd).st_size != self.view_size:
            cmap, reason = ChunkMap(**kw), (f"the data file is {os.fstat(self._fd).st_size} "
                                            f"bytes, not {self.view_size}")
        if reason is not None:
            if existed:
                log.warning("%s: ignoring cache state %s (%s); starting with an empty cache",
                            self.name, self.map_path, reason)
            # Drop whatever the data file held: nothing vouches for it.
            os.ftruncate(self._fd, 0)
            os.ftruncate(self._fd, self.view_size)
        state = bytearray(n)
        ready_bytes = 0
        for i in cmap.ready_indices():
            state[i] = UNCHECKED
            ready_bytes += self.toc[i].uncompressed_size
        return cmap, state, ready_bytes

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
            jobs = list(self._prefetch_jobs)
            self._prefetch_jobs.clear()
            self._cond.notify_all()
        for _, fut, _ in jobs:
            fut.cancel()
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
            os.close(self._fd)             # releases the flock too

    def __enter__(self) -> "BlobCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def _span(self, offset: int, end: int) -> range:
        """Indices of the chunks overlapping view range [offset, end)."""
        lo = bisect.bisect_right(self._offsets, offset) - 1
        if lo < 0 or self.toc[lo].uncompressed_end <= offset:
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
            if mem:                          # chunks that could not be written to the data file
                buf = bytearray(out)
                for i, plain in mem.items():
                    e = self.toc[i]
                    lo, hi = max(offset, e.uncompressed_offset), min(end, e.uncompressed_end)
                    buf[lo - offset:hi - offset] = plain[lo - e.uncompressed_offset:
                                                         hi - e.uncompressed_offset]
                out = bytes(buf)
        self.metrics.read(len(out), hits, misses)
        return out

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
                        batches = self._plan(missing, readahead=urgent and self.readahead)
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

    def _plan(self, missing: list[int], *, readahead: bool) -> list[tuple[list[int], _Pending]]:
        """Group sorted missing chunk indices into merged requests and mark them in flight (locked)."""
        groups: list[list[int]] = []
        size = 0
        for i in missing:
            c = self.toc[i].compressed_size
            if groups and groups[-1][-1] == i - 1 and size + c <= self.merge_size:
                groups[-1].append(i)
                size += c
            else:
                groups.append([i])
                size = c
        if readahead and groups:
            last = groups[-1]
            j = last[-1] + 1
            while (j < len(self.toc) and self._state[j] == MISSING and j not in self._inflight
                   and size + self.toc[j].compressed_size <= self.merge_size):
                last.append(j)
                size += self.toc[j].compressed_size
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
        """Fetch one merged range, verify each chunk, write and mark the good ones; completes `p`."""
        try:
            entries = [self.toc[i] for i in batch]
            start = entries[0].compressed_offset
            length = entries[-1].compressed_end - start
            with self._slots:
                t0 = time.monotonic()
                try:
                    data = memoryview(self.backend.read_range(self.blob_id, start, length))
                except BaseException:
                    self.metrics.fetch_error()
                    raise
                self.metrics.fetch_ok(length, len(batch), time.monotonic() - t0, prefetch=prefetch)
            for i, e in zip(batch, entries):
                rel = e.compressed_offset - start
                try:
                    plain = self._verified(i, e, data[rel:rel + e.compressed_size])
                except IntegrityError as err:
                    p.results[i] = err
                    continue
                self._store(i, e, plain)
                p.results[i] = plain
        except BaseException as err:
            for i in batch:
                p.results.setdefault(i, err)
        finally:
            with self._lock:
                for i in batch:
                    if self._inflight.get(i) is p:
                        del self._inflight[i]
            p.event.set()

    def _decode(self, i: int, e: ChunkEntry, payload) -> bytes:
        """Plain bytes of chunk `i` from its payload; IntegrityError if they fail the TOC digest."""
        if e.compressed:
            plain = decompress(self.footer.compressor, payload, e.uncompressed_size)
        else:
            plain = bytes(payload)
        got = digest_of(self.footer.digester, plain)
        if got != e.digest:
            raise IntegrityError(f"{self.footer.digester} digest is {got.hex()}, "
                                 f"the TOC says {e.digest.hex()}")
        return plain

    def _verified(self, i: int, e: ChunkEntry, payload) -> bytes:
        """Decode and verify chunk `i`; one retry from the backend's origin; logs one line on failure."""
        where = (f"{self.name}: chunk #{i} (view offset {e.uncompressed_offset}, "
                 f"{e.uncompressed_size} bytes; blob bytes [{e.compressed_offset}, "
                 f"{e.compressed_end}))")
        try:
            return self._decode(i, e, payload)
        except IntegrityError as err:
            self.metrics.verify_failure()
            first = err
        try:
            again = self.backend.read_from_origin(self.blob_id, e.compressed_offset,
                                                  e.compressed_size)
        except BackendError as err:
            again = None
            log.debug("%s: re-reading from the origin failed: %s", where, err)
        if again is not None:
            try:
                plain = self._decode(i, e, again)
                log.warning("%s: a mirror served corrupt bytes (%s); the origin's are good",
                            where, first)
                return plain
            except IntegrityError as err:
                self.metrics.verify_failure()
                first = err
        msg = (f"{where} failed verification: {first}; the blob is corrupt or was tampered "
               "with, the chunk is not cached")
        log.error("%s", msg)
        raise IntegrityError(msg) from None

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
                            "memory without caching them", self.name, i, self.data_path,
                            os.strerror(err.errno) if err.errno else err)
            return
        h = xxhash.xxh64_intdigest(plain)
        with self._lock:
            if self._state[i] != READY:
                self._ready_bytes += 0 if self._map.ready(i) else e.uncompressed_size
                self._map.mark_ready(i, h)
                self._state[i] = READY
                self._note_dirty()

    def _recheck(self, i: int, p: _Pending) -> None:
        """First read of a chunk after a restart: compare its bytes with the recorded xxh64."""
        e = self.toc[i]
        try:
            try:
                data = os.pread(self._fd, e.uncompressed_size, e.uncompressed_offset)
            except OSError as err:
                data, why = None, f"cannot read it: {err}"
            else:
                why = "its xxh64 does not match the cache state"
            with self._lock:
                expected = self._map.xxh64(i)
            if data is not None and len(data) == e.uncompressed_size \
                    and xxhash.xxh64_intdigest(data) == expected:
                with self._lock:
                    self._state[i] = READY
                return
            log.warning("%s: cached chunk #%d (view offset %d) changed on disk (%s); fetching "
                        "it again", self.name, i, e.uncompressed_offset, why)
            self.metrics.recheck_failure()
            with self._lock:
                if self._map.ready(i):
                    self._ready_bytes -= e.uncompressed_size
                self._map.clear(i)
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
        """Persist the ready-state: fdatasync the data file, then atomically replace the chunkmap."""
        with self._flush_lock:
            with self._lock:
                if not self._dirty:
                    return
                encoded = self._map.encode()
                dirty, self._dirty = self._dirty, 0
            try:
                os.fdatasync(self._fd)
                write_atomic(self.map_path, encoded)
            except BaseException:
                with self._lock:
                    self._dirty += dirty
                raise

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, ranges: Iterable[tuple[int, int]], low_priority: bool = True) -> Future:
        """Fetch the chunks of view ranges `ranges` ((offset, size) pairs) in the background.

        Returns a Future of the number of chunks fetched; cancelling it (or
        `close()`) stops the prefetch before its next request.
        Low priority (default): one request at a time, only while no on-demand
        read waits. Otherwise the chunks are fetched like an on-demand read.
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
            self._prefetch_jobs.append((sorted(wanted), fut, low_priority))
            if self._prefetcher is None:
                self._prefetcher = threading.Thread(target=self._prefetch_loop, daemon=True,
                                                    name=f"prefetch-{self.blob_id[:12]}")
                self._prefetcher.start()
        return fut

    def prefetch_all(self) -> Future:
        """Prefetch the whole blob in the background (low priority)."""
        return self.prefetch([(0, self.view_size)])

    def _prefetch_loop(self) -> None:
        while True:
            with self._lock:
                if not self._prefetch_jobs or self._closing:
                    self._prefetcher = None
                    return
                indices, fut, low = self._prefetch_jobs.popleft()
            if fut.cancelled():
                continue
            try:
                outcome, failed = self._prefetch_job(indices, low, fut), False
            except CacheClosed:
                fut.cancel()
                continue
            except BaseException as e:
                log.warning("%s: prefetch stopped: %s", self.name, e)
                outcome, failed = e, True
            try:                               # the Future is never marked running, so a
                if failed:                     # caller's cancel() stops the job: done maybe
                    fut.set_exception(outcome)
                else:
                    fut.set_result(outcome)
            except InvalidStateError:
                pass

    def _prefetch_job(self, indices: list[int], low_priority: bool, fut: Future) -> int:
        if not low_priority:
            with self._using():
                _, _, misses = self._ensure(indices, urgent=False, keep=False)
                return misses
        fetched = 0
        pos = 0
        while pos < len(indices) and not fut.cancelled():
            if not self.gate.wait_idle(self._stop):
                raise CacheClosed(f"{self.name}: closed during prefetch")
            with self._using():
                with self._lock:
                    batch: list[int] = []
                    size = 0
                    while pos < len(indices):
                        i = indices[pos]
                        if self._state[i] != MISSING or i in self._inflight:
                            if batch:
                                break
                            pos += 1
                            continue
                        c = self.toc[i].compressed_size
                        if batch and (i != batch[-1] + 1 or size + c > self.merge_size):
                            break
                        batch.append(i)
                        size += c
                        pos += 1
                    if not batch:
                        break
                    p = _Pending()
                    for i in batch:
                        self._inflight[i] = p
                self._fetch(batch, p, prefetch=True)
            for i in batch:
                r = p.results.get(i)
                if isinstance(r, IntegrityError):
                    continue               # logged; the chunk stays missing, go on with the rest
                if isinstance(r, BaseException):
                    raise r
                fetched += 1
        return fetched

    # ------------------------------------------------------------------ reporting
    def usage(self) -> dict:
        """Disk and chunk usage: `disk_bytes` is what the sparse data file really occupies."""
        st = os.fstat(self._fd)
        with self._lock:
            ready = self._map.ready_count
            ready_bytes = self._ready_bytes
            inflight = len(self._inflight)
        return {
            "blob_id": self.blob_id,
            "disk_bytes": st.st_blocks * 512,
            "view_size": self.view_size,
            "chunks_total": len(self.toc),
            "chunks_ready": ready,
            "bytes_total": self.total_bytes,
            "bytes_ready": ready_bytes,
            "chunks_inflight": inflight,
            "complete": ready == len(self.toc),
        }

    def chunk_ready(self, i: int) -> bool:
        """True if chunk i's bytes are in the data file (verified, or vouched for by the chunkmap)."""
        with self._lock:
            return self._state[i] != MISSING


class CacheManager:
    """One `BlobCache` per blob of a mount, over one backend, sharing metrics and the demand gate.

    Owns the backend (closed by `close()`) unless `owns_backend=False`. Options
    (`merge_size`, `max_inflight`, `readahead`, `flush_interval`,
    `flush_chunks`) are passed to every BlobCache.
    """

    def __init__(self, cache_dir: str | os.PathLike, backend: BlobBackend, *,
                 metrics: StorageMetrics | None = None, owns_backend: bool = True, **cache_options):
        self.dir = os.fspath(cache_dir)
        os.makedirs(self.dir, exist_ok=True)
        self.backend = backend
        self.metrics = metrics if metrics is not None else StorageMetrics(backend.source_stats)
        self.gate = DemandGate()
        self._options = cache_options
        self._owns_backend = owns_backend
        self._lock = threading.Lock()
        self._caches: dict[str, BlobCache] = {}
        self._closed = False

    def open(self, info) -> BlobCache:
        """The BlobCache of blob `info` (a BlobInfo), opened on first use (fetches its TOC if needed)."""
        blob_id = normalize_blob_id(info.blob_id)
        with self._lock:
            if self._closed:
                raise CacheClosed(f"cache manager of {self.dir} is closed")
            cache = self._caches.get(blob_id)
            if cache is None:
                cache = BlobCache(self.dir, info, self.backend, metrics=self.metrics,
                                  gate=self.gate, **self._options)
                self._caches[blob_id] = cache
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
        return {"metrics": self.metrics.snapshot(), "blobs": blobs, "totals": totals}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
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
