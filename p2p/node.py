"""What one node knows and holds of each blob it shares: units, their state, the payload file.

A blob, as stored, holds the chunk payloads the bootstrap's chunk table lists
(and, Nydus-style, tar headers, the compression-info array, digests, a ToC
and maybe a bootstrap after them). The P2P layer moves *units*: unit u is the
stored payload of the chunk with ci index u, [compressed_offset,
compressed_end), taken from `BlobInfo.entries` (the bootstrap's chunk table,
trusted: the manifest digest covers the bootstrap) and verified on its own
against the chunk digest there (`rafs.blob.decode_chunk`). Units need not be
back to back in the blob: bytes outside every unit (a chunk-dict blob's
chunks this image does not use, the blob's metadata) are never stored, served
or asked from peers; they are origin-only.

Several bootstraps may use one blob (different chunks of a chunk-dict blob):
`BlobState.add(info)` adds the units of another record of the blob; a unit
that contradicts one already known (other bytes or digest for a ci index,
or overlapping bytes) is left out, with a warning.

`BlobState` tracks, per unit, MISSING / UNCHECKED (a payload file from an
earlier run may hold it; verified on first use) / VERIFIED (checked in this
process; its xxh64 is kept to catch a file that changed behind our back), and
which units this node is fetching right now (`inflight`, so that a peer asking
for them can wait). `PeerNode` is the set of blobs a node shares: only those
are ever served.
"""
from __future__ import annotations

import bisect
import logging
import os
import threading
import time
import uuid
from typing import Iterable

import xxhash

from rafs.blob import ChunkEntry, decode_chunk
from rafs.errors import FormatError, IntegrityError
from rafs.image.digests import normalize_blob_id
from rafs.storage.chunks import blob_chunks

from .ranges import RangeSet
from .store import PayloadFile

log = logging.getLogger(__name__)

MISSING, UNCHECKED, VERIFIED = 0, 1, 2


class BlobState:
    """One shared blob on one node: its units, their state and its payload file (thread-safe)."""

    def __init__(self, info, store_dir: str | os.PathLike):
        self.blob_id = normalize_blob_id(info.blob_id)
        self.name = f"blob sha256:{self.blob_id}"
        chunks = blob_chunks(info, self.name)       # FormatError if the record is bad
        self.info = info
        self.size = chunks.blob_size
        self.compressor = chunks.compressor
        self.digester = chunks.digester
        self.file = PayloadFile(store_dir, self.blob_id, self.size)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self._units: dict[int, ChunkEntry] = {}     # unit id (ci index) -> its chunk
        self._starts: list[int] = []                # compressed offsets of the units, sorted
        self._order: list[int] = []                 # unit ids in blob order
        self._state: dict[int, int] = {}
        self._xxh: dict[int, int] = {}
        self.inflight: dict[int, threading.Event] = {}
        self._candidates = self.file.data_extents()
        self._add(chunks.entries)

    # ------------------------------------------------------------------ units
    def add(self, info) -> int:
        """Add the units of another record of this blob (another bootstrap's chunk table);
        returns how many were new. FormatError if the record does not describe this blob."""
        if normalize_blob_id(info.blob_id) != self.blob_id:
            raise ValueError(f"{self.name}: record of another blob")
        if info is self.info:
            return 0
        chunks = blob_chunks(info, self.name)
        if (chunks.blob_size, chunks.compressor, chunks.digester) != \
                (self.size, self.compressor, self.digester):
            raise FormatError(f"{self.name}: two bootstraps disagree about the blob's size, "
                              "compressor or digester")
        return self._add(chunks.entries)

    def _add(self, entries: Iterable[ChunkEntry]) -> int:
        added = 0
        with self.lock:
            new = [e for e in entries if self._known(e)]
            new.sort(key=lambda e: e.compressed_offset)
            bulk = not self._order                # the first record: build the lists at once
            for e in new:
                if bulk:
                    k = len(self._order)
                    prev = self._units[self._order[-1]] if self._order else None
                    nxt = None
                else:
                    k = bisect.bisect_left(self._starts, e.compressed_offset)
                    prev = self._units[self._order[k - 1]] if k else None
                    nxt = self._units[self._order[k]] if k < len(self._order) else None
                if (prev is not None and prev.compressed_end > e.compressed_offset) or \
                        (nxt is not None and nxt.compressed_offset < e.compressed_end):
                    log.warning("%s: chunk #%d overlaps another chunk's bytes; not shared",
                                self.name, e.index)
                    continue
                self._starts.insert(k, e.compressed_offset)
                self._order.insert(k, e.index)
                self._units[e.index] = e
                st = UNCHECKED if self._candidates.covers(e.compressed_offset,
                                                          e.compressed_end) else MISSING
                self._state[e.index] = st
                self._xxh[e.index] = 0
                added += 1
            if added:
                self.cond.notify_all()
        return added

    def _known(self, e: ChunkEntry) -> bool:
        """Locked: True if `e` is a new unit (False if its ci index is known; a warning if the
        two records of it disagree)."""
        known = self._units.get(e.index)
        if known is None:
            return True
        if known != e:
            log.warning("%s: two bootstraps disagree about chunk #%d; keeping the first",
                        self.name, e.index)
        return False

    def unit_count(self) -> int:
        with self.lock:
            return len(self._order)

    def extent(self, u: int) -> tuple[int, int]:
        e = self._units[u]
        return e.compressed_offset, e.compressed_end

    def after(self, u: int) -> int | None:
        """The unit after `u` in the blob (maybe after a gap), or None."""
        with self.lock:
            k = bisect.bisect_right(self._starts, self._units[u].compressed_offset)
            return self._order[k] if k < len(self._order) else None

    def next_unit(self, u: int) -> int | None:
        """The unit right after `u` in the blob, if it starts where `u` ends (no gap)."""
        v = self.after(u)
        if v is not None and self._units[v].compressed_offset == self._units[u].compressed_end:
            return v
        return None

    def units_for(self, start: int, end: int) -> list[int]:
        """Units overlapping [start, end), in blob order (bytes between units belong to none)."""
        with self.lock:
            return self._units_locked(start, end)

    def _units_locked(self, start: int, end: int) -> list[int]:
        if start >= end or not self._order:
            return []
        lo = bisect.bisect_right(self._starts, start) - 1
        if lo < 0 or self._units[self._order[lo]].compressed_end <= start:
            lo += 1
        hi = bisect.bisect_left(self._starts, end)
        return self._order[lo:hi]

    def _tiles(self, units: list[int], start: int, end: int) -> bool:
        """Locked: True if `units` (blob order) cover [start, end) with no byte outside them."""
        pos = start
        for u in units:
            a, b = self.extent(u)
            if a > pos:
                return False
            pos = max(pos, b)
        return pos >= end

    def ranges_of(self, units: Iterable[int]) -> RangeSet:
        return RangeSet(self.extent(u) for u in units)

    def verify(self, u: int, data: bytes) -> None:
        """Raise IntegrityError unless `data` is unit `u`'s exact trusted bytes (the payload whose
        plain bytes match the chunk digest in the bootstrap): `rafs.blob.decode_chunk`, the one
        place chunks are verified, as the blob cache does."""
        decode_chunk(self._units[u], data, self.compressor, self.digester, name=self.name)

    # ------------------------------------------------------------------ state
    def present(self, u: int) -> bool:
        with self.lock:
            return self._state.get(u, MISSING) != MISSING

    def held(self) -> RangeSet:
        """Ranges of every unit this node holds (verified, or stored before a restart)."""
        with self.lock:
            return RangeSet(self.extent(u) for u, st in self._state.items() if st)

    def fetching(self) -> RangeSet:
        with self.lock:
            return RangeSet(self.extent(u) for u in self.inflight)

    def put_unit(self, u: int, data: bytes) -> bool:
        """Store a unit that passed `verify`; it is then held and served. False if not stored."""
        if not self.file.write(self.extent(u)[0], data):
            return False
        h = xxhash.xxh64_intdigest(data)
        with self.lock:
            self._state[u], self._xxh[u] = VERIFIED, h
            self.cond.notify_all()
        return True

    def read_unit(self, u: int) -> bytes | None:
        """Unit `u`'s bytes from the payload file if held and still good, else None (and forgotten)."""
        with self.lock:
            st = self._state.get(u, MISSING)
            want = self._xxh.get(u, 0)
        if st == MISSING:
            return None
        start, end = self.extent(u)
        data = self.file.read(start, end - start)
        ok = data is not None
        if ok and st == VERIFIED:
            ok = xxhash.xxh64_intdigest(data) == want
        elif ok:
            try:
                self.verify(u, data)
            except IntegrityError as e:
                log.info("%s: stored unit %d is not good (%s); dropping it", self.name, u, e)
                ok = False
        with self.lock:
            if not ok:
                if st == VERIFIED:
                    log.warning("%s: stored unit %d [%d, %d) changed on disk; dropping it",
                                self.name, u, start, end)
                if self._state.get(u) == st:
                    self._state[u], self._xxh[u] = MISSING, 0
                return None
            if st == UNCHECKED and self._state.get(u) == UNCHECKED:
                self._state[u], self._xxh[u] = VERIFIED, xxhash.xxh64_intdigest(data)
        return data

    def read_range(self, start: int, end: int) -> bytes | None:
        """Bytes [start, end) if they lie inside units that are all held and good, else None
        (bytes outside every unit are never served)."""
        with self.lock:
            units = self._units_locked(start, end)
            if not units or not self._tiles(units, start, end):
                return None
        parts = []
        for u in units:
            data = self.read_unit(u)
            if data is None:
                return None
            parts.append(data)
        base = self.extent(units[0])[0]
        buf = parts[0] if len(parts) == 1 else b"".join(parts)
        return buf[start - base:end - base]

    def held_prefix(self, start: int, end: int) -> int:
        """End of the longest prefix of [start, end) whose bytes lie in held units (start if none)."""
        with self.lock:
            pos = start
            for u in self._units_locked(start, end):
                a, b = self.extent(u)
                if a > pos or not self._state[u]:
                    break
                pos = min(b, end)
            return pos

    def wait_available(self, start: int, end: int, timeout: float) -> bool:
        """Wait until every unit of [start, end) is held; False at once if the range has bytes
        outside the units, or some unit is neither held nor being fetched by this node, or when
        `timeout` runs out."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                units = self._units_locked(start, end)
                if not units or not self._tiles(units, start, end):
                    return False
                if all(self._state[u] for u in units):
                    return True
                waiting = all(u in self.inflight for u in units if not self._state[u])
                left = deadline - time.monotonic()
                if not waiting or left <= 0:
                    return False
                self.cond.wait(left)

    def begin(self, units: Iterable[int]) -> tuple[list[int], list[threading.Event]]:
        """Mark units this thread will fetch; returns (units now ours, events of units another
        thread of this node is fetching). Held units are neither."""
        mine, others = [], []
        with self.lock:
            for u in units:
                if self._state.get(u, MISSING):
                    continue
                ev = self.inflight.get(u)
                if ev is not None:
                    others.append(ev)
                else:
                    self.inflight[u] = threading.Event()
                    mine.append(u)
        return mine, others

    def end(self, units: Iterable[int]) -> None:
        """The fetch of `units` is over (stored or failed): wake local and remote waiters."""
        with self.lock:
            for u in units:
                ev = self.inflight.pop(u, None)
                if ev is not None:
                    ev.set()
            self.cond.notify_all()

    def close(self) -> None:
        with self.lock:
            for ev in self.inflight.values():
                ev.set()
            self.inflight.clear()
            self.cond.notify_all()
        self.file.close()


class PeerNode:
    """The blobs one node shares with its peers, and its identity.

    `expect(info)` registers a blob from the bootstrap's blob table and chunk
    table (before the blob cache opens it; a second record of the blob adds
    its units); `share(cache)` registers a `BlobCache` that is already open.
    """

    def __init__(self, store_dir: str | os.PathLike, *, node_id: str | None = None,
                 advertise: str | None = None):
        self.store_dir = os.path.abspath(os.fspath(store_dir))
        os.makedirs(self.store_dir, exist_ok=True)
        self.node_id = node_id or uuid.uuid4().hex[:16]
        self.advertise = advertise          # "host:port" peers dial, or None (fetch only)
        self._lock = threading.Lock()
        self._blobs: dict[str, BlobState] = {}
        self._closed = False

    def expect(self, info) -> BlobState:
        blob_id = normalize_blob_id(info.blob_id)
        with self._lock:
            if self._closed:
                raise RuntimeError("peer node is closed")
            st = self._blobs.get(blob_id)
            if st is None:
                st = self._blobs[blob_id] = BlobState(info, self.store_dir)
                return st
        st.add(info)
        return st

    def share(self, cache) -> BlobState:
        """Share an open BlobCache's blob (its chunks, as its bootstrap lists them)."""
        return self.expect(cache.info)

    def forget(self, blob_id: str, *, delete: bool = True) -> bool:
        """Stop sharing a blob (its cache was removed); `delete` also removes its payload file."""
        key = normalize_blob_id(blob_id)
        with self._lock:
            st = self._blobs.pop(key, None)
        if st is None:
            return False
        st.close()
        if delete:
            try:
                os.unlink(st.file.path)
            except FileNotFoundError:
                pass
        return True

    def get(self, blob_id: str) -> BlobState | None:
        try:
            key = normalize_blob_id(blob_id)
        except ValueError:
            return None
        with self._lock:
            return self._blobs.get(key)

    def blobs(self) -> list[BlobState]:
        with self._lock:
            return list(self._blobs.values())

    def state(self) -> dict:
        """{blob id: {"held": ranges, "fetching": ranges}} (announcement form)."""
        return {b.blob_id: {"held": b.held().to_json(), "fetching": b.fetching().to_json()}
                for b in self.blobs()}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            blobs = list(self._blobs.values())
            self._blobs.clear()
        for b in blobs:
            b.close()
