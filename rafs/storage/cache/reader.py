"""The read path of one blob cache: view ranges to chunks, ready chunks from the data file,
missing ones fetched, verified and stored.

Every fetched chunk is decoded and checked against its digest in the
bootstrap's chunk table by `rafs.blob.decode_chunk` (the one place chunks are
verified) *before* it is served or written; only bytes inside an entry are ever
decoded, bytes a merged request carries between entries are dropped. A
mismatch raises `IntegrityError` and logs one line naming the blob and chunk;
the chunk is not written and not marked ready. If the backend can re-read from
an authoritative source (`read_from_origin`: a mirror or peer served the
bytes) that is tried once first. A chunk the chunkmap vouches for is re-checked
with its xxh64 on first read (`state.chunk_xxh64`) and fetched again if its
bytes changed.

Fetching: missing chunks adjacent in the blob (`chunks.joinable`) are fetched
with one range request of at most `merge_size` bytes; a read that misses
extends its last request over the following missing chunks (`widen_limit`:
`merge_size` with readahead, else the `amplify` setting). A chunk being
fetched is in the in-flight map; other readers wait for that fetch (one fetch
per chunk). At most `max_inflight` backend requests run at a time; a read
needing several issues them in parallel.
"""
from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Sequence

from rafs.blob import ChunkEntry, decode_chunk
from rafs.errors import BackendError, IntegrityError, RafsError

from ..backend.base import BlobBackend
from ..chunks import BlobChunks, joinable
from ..metrics import StorageMetrics
from .amplify import FetchCostModel
from .files import CacheFiles
from .flush import MISSING, READY, UNCHECKED, ReadyState
from .prefetch import DemandGate
from .state import chunk_xxh64

log = logging.getLogger(__name__)

BLOCK = 4096                       # the unit the disk use of a chunk is estimated in


def disk_span(offset: int, size: int) -> int:
    """Bytes of whole blocks a chunk at view offset `offset` can occupy in the sparse data file."""
    return (-(-(offset + size) // BLOCK) - offset // BLOCK) * BLOCK if size else 0


class Pending:
    """One in-flight operation on some chunks: a fetch batch or an xxh64 re-check.

    `results[i]` is the chunk's plain bytes or the exception it failed with;
    absent if the operation only learned that chunk i must be fetched again.
    """
    __slots__ = ("event", "results")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.results: dict[int, bytes | BaseException] = {}


class ChunkReader:
    """The read path over `files` and `ready` (see the module docstring).

    `lock` is the BlobCache's lock (guarding `ready` and `inflight`); `inflight` maps chunk
    positions to the Pending operation on them. The owner keeps the cache open while any
    method runs, and calls `shutdown` once none does.
    """

    def __init__(self, chunks: BlobChunks, files: CacheFiles, ready: ReadyState,
                 backend: BlobBackend, *, lock: threading.Lock, inflight: dict[int, Pending],
                 merge_size: int, max_inflight: int, readahead: bool, amplify: int | str,
                 metrics: StorageMetrics, gate: DemandGate, cost_model: FetchCostModel,
                 budget=None, tenant=None):
        self.name = files.name
        self.blob_id = files.blob_id
        self.files = files
        self.ready = ready
        self.backend = backend
        self.entries: list[ChunkEntry] = chunks.entries
        self.compressor = chunks.compressor
        self.digester = chunks.digester
        self.view_size = chunks.view_size
        self.merge_size = merge_size
        self.max_inflight = max_inflight
        self.readahead = readahead
        self.amplify = amplify
        self.metrics = metrics
        self.gate = gate
        self.cost_model = cost_model
        self.inflight = inflight
        self._lock = lock
        self._offsets = [e.uncompressed_offset for e in self.entries]
        self._partial = len(self.entries) < chunks.chunk_count   # a subset: mask the others' bytes
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._pool: ThreadPoolExecutor | None = None
        self._write_failed = False
        self.write_error: str | None = None   # why the data file could not be written (once, for stats)
        # the size limit (`evict.CacheBudget`, None = none) and the BlobCache it evicts from; `pins`:
        # chunk position -> reads between ensuring it and reading its bytes (never evicted meanwhile)
        self.budget = budget
        self.tenant = tenant
        self.pins: dict[int, int] = {}

    def shutdown(self) -> None:
        """Stop the fetch pool (no read may be running)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # ------------------------------------------------------------------ reading
    def span(self, offset: int, end: int) -> range:
        """Indices of the chunks overlapping view range [offset, end)."""
        lo = bisect.bisect_right(self._offsets, offset) - 1
        if lo < 0 or self.entries[lo].uncompressed_end <= offset:
            lo += 1
        hi = bisect.bisect_left(self._offsets, end)
        return range(lo, max(lo, hi))

    def read(self, offset: int, end: int) -> tuple[bytes, int, int]:
        """(bytes of view range [offset, end), chunk hits, chunk misses); `end` <= view size.

        Bytes between chunks read as zeros. Raises IntegrityError (a chunk failed
        verification) or BackendError (it could not be fetched); never wrong bytes.
        """
        span = self.span(offset, end)
        pins = self.pins
        with self._lock:                 # no eviction between making them ready and reading them
            for i in span:
                pins[i] = pins.get(i, 0) + 1
        try:
            mem, hits, misses = self.ensure(span, urgent=True)
            out = self.files.pread(end - offset, offset)
            while len(out) < end - offset:   # only for reads > 2 GiB (Linux caps one read)
                more = self.files.pread(end - offset - len(out), offset + len(out))
                if not more:                 # cannot happen: the file is view_size long
                    raise RafsError(f"{self.name}: cache file {self.files.data_path} is truncated")
                out += more
        finally:
            self._unpin(span)
        if self.budget is not None:
            self.budget.touch(self.tenant, span)
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
        return out, hits, misses

    def read_cached(self, offset: int, end: int) -> bytes | None:
        """The bytes of view range [offset, end) if every chunk in it is in the data file, else None;
        never fetches. One pread; chunks the chunkmap vouches for (UNCHECKED) are re-checked on
        those very bytes (their xxh64), and None if one fails (`read` then fetches it again)."""
        span = self.span(offset, end)
        pins, state = self.pins, self.ready.state
        with self._lock:
            if any(state[i] == MISSING for i in span):
                return None
            for i in span:
                pins[i] = pins.get(i, 0) + 1
        try:
            out = self.files.pread(end - offset, offset)
            if len(out) != end - offset:
                return None
            view = memoryview(out)
            for i in span:
                if state[i] != UNCHECKED:
                    continue
                e = self.entries[i]
                with self._lock:
                    expected = self.ready.map.xxh64(e.index)
                lo = e.uncompressed_offset - offset
                if lo < 0 or e.uncompressed_end > end or \
                        chunk_xxh64(view[lo:lo + e.uncompressed_size], e.digest) != expected:
                    return None
                with self._lock:
                    if state[i] == UNCHECKED:
                        state[i] = READY
        finally:
            self._unpin(span)
        if self.budget is not None:
            self.budget.touch(self.tenant, span)
        if self._partial:
            buf = bytearray(out)
            self._zero_outside(buf, offset, end)
            out = bytes(buf)
        return out

    def _unpin(self, span: range) -> None:
        """Undo a read's pins of chunks `span` (evictable again once no read holds them)."""
        pins = self.pins
        with self._lock:
            for i in span:
                if pins[i] == 1:
                    del pins[i]
                else:
                    pins[i] -= 1

    def _zero_outside(self, buf: bytearray, offset: int, end: int) -> None:
        """Zero the bytes of view range [offset, end) (in `buf`) that lie in none of this cache's
        entries: the data file may hold chunks another bootstrap of the blob fetched there, and
        this one's view is the same whoever shares the cache."""
        pos = offset
        for i in self.span(offset, end):
            e = self.entries[i]
            if e.uncompressed_offset > pos:
                buf[pos - offset:e.uncompressed_offset - offset] = bytes(e.uncompressed_offset - pos)
            pos = max(pos, e.uncompressed_end)
        if pos < end:
            buf[pos - offset:] = bytes(end - pos)

    def ensure(self, indices: Sequence[int], *, urgent: bool, keep: bool = True,
               prefetch: bool = False) -> tuple[dict[int, bytes], int, int]:
        """Make chunks `indices` ready; returns (memory-only chunks, hits, misses).

        Re-checks UNCHECKED chunks, fetches MISSING ones (merged, with readahead
        when `urgent`), waits for chunks other threads are fetching; raises the
        error of any chunk that cannot be made ready (`prefetch`: no read asked for them, count
        them as prefetched). The first dict holds the
        plain bytes of chunks that were fetched but could not be written to the
        data file (only if `keep`).
        """
        state = self.ready.state
        wanted = indices if isinstance(indices, range) else set(indices)
        with self._lock:
            stale = any(state[i] == MISSING and i not in self.inflight for i in indices)
        if stale:          # about to fetch: another process sharing the cache may have them
            self.ready.refresh_from_disk()
        mem: dict[int, bytes] = {}
        served: set[int] = set()           # delivered from memory (write failed)
        hits = misses = 0
        first = True
        with ExitStack() as stack:
            in_demand = False
            while True:
                checks: list[tuple[int, Pending]] = []
                waits: list[tuple[int, Pending]] = []
                batches: list[tuple[list[int], Pending]] = []
                with self._lock:
                    missing = []
                    for i in indices:
                        if i in served:
                            continue
                        st = state[i]
                        if st == READY:
                            hits += first
                            continue
                        p = self.inflight.get(i)
                        if p is not None:
                            misses += first
                            waits.append((i, p))
                        elif st == UNCHECKED:
                            hits += first
                            p = self.inflight[i] = Pending()
                            checks.append((i, p))
                        else:
                            misses += first
                            missing.append(i)
                    if missing:
                        batches = self._plan(missing, widen=self.widen_limit() if urgent else 0)
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
                    self._run_batches(batches, prefetch=prefetch)
                    waits.extend((i, p) for b, p in batches for i in b if i in wanted)
                error: BaseException | None = None
                for i, p in waits:
                    p.event.wait()
                    r = p.results.get(i)
                    if isinstance(r, BaseException):
                        error = error or r
                    elif r is not None and state[i] != READY:
                        served.add(i)
                        if keep:
                            mem[i] = r
                if error is not None:
                    raise error
        return mem, hits, misses

    def fetch_next(self, indices: list[int], pos: int) -> tuple[int, int]:
        """Fetch the next merged request of the missing chunks of `indices[pos:]` (sorted
        positions): returns (where the next request starts, chunks fetched). A chunk failing
        verification is logged and skipped; any other error is raised."""
        self.ready.refresh_from_disk()         # chunks another process fetched meanwhile
        state = self.ready.state
        with self._lock:
            batch: list[int] = []
            ents = self.entries
            while pos < len(indices):
                i = indices[pos]
                if state[i] != MISSING or i in self.inflight:
                    if batch:
                        break
                    pos += 1
                    continue
                if batch and (i != batch[-1] + 1 or not joinable(ents[i - 1], ents[i])
                              or ents[i].compressed_end - ents[batch[0]].compressed_offset
                              > self.merge_size):
                    break
                batch.append(i)
                pos += 1
            if not batch:
                return pos, 0
            p = Pending()
            for i in batch:
                self.inflight[i] = p
        self._fetch(batch, p, prefetch=True)
        fetched = 0
        for i in batch:
            r = p.results.get(i)
            if isinstance(r, IntegrityError):
                continue                       # logged; the chunk stays missing, go on with the rest
            if isinstance(r, BaseException):
                raise r
            fetched += 1
        return pos, fetched

    def widen_limit(self) -> int:
        """Compressed bytes a demand request may grow to over the missing chunks after it."""
        if self.readahead:
            return self.merge_size
        if self.amplify == "auto":
            return min(self.merge_size, self.cost_model.amplify_bytes())
        return min(self.merge_size, self.amplify)

    def _plan(self, missing: list[int], *, widen: int) -> list[tuple[list[int], Pending]]:
        """Group sorted missing chunk positions into merged requests and mark them in flight
        (locked); the last request grows over the following missing chunks up to `widen` bytes.

        A request spans neighbours in `entries` that follow each other in the blob file
        (`chunks.joinable`: at most MAX_MERGE_GAP bytes apart), at most `merge_size` bytes
        from its first byte to its last (a single chunk may be larger)."""
        ents = self.entries
        state = self.ready.state
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
            while (j < len(ents) and state[j] == MISSING and j not in self.inflight
                   and joinable(ents[j - 1], ents[j])
                   and ents[j].compressed_end - start <= widen):
                last.append(j)
                j += 1
        out = []
        for g in groups:
            p = Pending()
            for i in g:
                self.inflight[i] = p
            out.append((g, p))
        return out

    def _run_batches(self, batches: list[tuple[list[int], Pending]], *, prefetch: bool = False) -> None:
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
            f.result()                     # _fetch never raises; completes its Pending

    # ------------------------------------------------------------------ fetching
    def _fetch(self, batch: list[int], p: Pending, prefetch: bool = False) -> None:
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
                    if self.inflight.get(i) is p:
                        del self.inflight[i]
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

    def _store(self, i: int, e: ChunkEntry, plain: bytes) -> None:
        """Write a verified chunk at its view offset and mark it ready (unless the write fails, or
        the size limit leaves no room for it: then it is served from memory, not cached)."""
        budget = self.budget
        if budget is None:
            if self._write(i, e, plain):
                self._mark(i, e, plain)
            return
        with budget.room(disk_span(e.uncompressed_offset, e.uncompressed_size)) as ok:
            if not ok or not self._write(i, e, plain):
                return
            self._mark(i, e, plain)        # within the room: an eviction never sees it half-marked
        budget.present(self.tenant, i, disk_span(e.uncompressed_offset, e.uncompressed_size))

    def _mark(self, i: int, e: ChunkEntry, plain: bytes) -> None:
        h = chunk_xxh64(plain, e.digest)
        with self._lock:
            if self.ready.state[i] != READY:
                self.ready.mark(i, e, h)

    def _write(self, i: int, e: ChunkEntry, plain: bytes) -> bool:
        try:
            self.files.write_at(plain, e.uncompressed_offset)
            return True
        except OSError as err:
            why = os.strerror(err.errno) if err.errno else str(err)
            if not self._write_failed:
                self._write_failed = True
                self.write_error = why
                log.warning("%s: cannot write chunk #%d to %s (%s); serving fetched chunks from "
                            "memory without caching them", self.name, e.index, self.files.data_path, why)
            try:                           # what a partial write allocated (nothing vouches for it)
                self.files.punch(e.uncompressed_offset, e.uncompressed_size)
            except OSError:
                pass
            return False

    def _recheck(self, i: int, p: Pending) -> None:
        """First read of a chunk after a restart: compare its bytes with the recorded xxh64
        (seeded with the chunk digest: bytes verified against another digest fail too)."""
        e = self.entries[i]
        ready = self.ready
        try:
            try:
                data = self.files.pread(e.uncompressed_size, e.uncompressed_offset)
            except OSError as err:
                data, why = None, f"cannot read it: {err}"
            else:
                why = "its xxh64 does not match the cache state"
            with self._lock:
                expected = ready.map.xxh64(e.index)
            if data is not None and len(data) == e.uncompressed_size \
                    and chunk_xxh64(data, e.digest) == expected:
                with self._lock:
                    if ready.state[i] != MISSING:     # (not evicted meanwhile)
                        ready.state[i] = READY
                return
            log.warning("%s: cached chunk #%d (view offset %d) changed on disk (%s); fetching "
                        "it again", self.name, e.index, e.uncompressed_offset, why)
            self.metrics.recheck_failure()
            with self._lock:
                ready.forget(i, e, expected)   # a shared map may still vouch for these bytes
            if self.budget is not None:
                self.budget.gone(self.tenant, i)
        finally:
            with self._lock:
                if self.inflight.get(i) is p:
                    del self.inflight[i]
            p.event.set()
