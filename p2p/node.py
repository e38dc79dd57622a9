"""What one node knows and holds of each blob it shares: units, their state, the payload file.

A blob, as stored, is cut into *units* that can each be verified on their own:

* unit i < chunk_count: chunk i's stored payload, [compressed_offset,
  compressed_end), trusted through the chunk digest in the TOC;
* the meta unit (index `META`, -1): the TOC and the footer, [toc_offset,
  blob_size), trusted through the TOC digest in the bootstrap's blob table
  (and the footer must be byte-for-byte what its parsed fields pack to).

Chunks are stored back to back, then the TOC, then the footer (`rafs.blob`),
so the units tile the whole blob: any byte range of it can be served and
verified unit by unit.

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

from rafs.blob import FOOTER_SIZE, ChunkEntry, Footer, parse_toc, read_footer
from rafs.compress import decompress
from rafs.digest import digest as digest_of
from rafs.errors import FormatError, IntegrityError
from rafs.storage.backend.base import normalize_blob_id

from .ranges import RangeSet
from .store import PayloadFile

log = logging.getLogger(__name__)

MISSING, UNCHECKED, VERIFIED = 0, 1, 2
META = -1                          # unit id of the TOC + footer (chunks are 0..chunk_count-1)

_INFO_FIELDS = ("uncompressed_size", "chunk_count", "toc_offset", "toc_size", "compressor",
                "digester")


def check_meta(info, data: bytes) -> tuple[Footer, list[ChunkEntry]]:
    """Verify the meta unit (TOC + footer bytes) of blob `info`; returns (footer, TOC).

    Raises IntegrityError / FormatError. Trust comes from `info.toc_digest`
    (the bootstrap); the footer must also be canonical (exactly what its
    fields pack to) and agree with every field the bootstrap records.
    """
    if len(data) < FOOTER_SIZE:
        raise FormatError(f"meta unit is {len(data)} bytes, shorter than a footer")
    tail = data[-FOOTER_SIZE:]
    footer = read_footer(tail, info.compressed_size)
    if footer.pack() != bytes(tail):
        raise IntegrityError("blob footer bytes are not canonical")
    for field in _INFO_FIELDS:
        want = getattr(info, field, None)
        if want is not None and want != getattr(footer, field):
            raise IntegrityError(f"blob footer says {field} is {getattr(footer, field)!r}, "
                                 f"the bootstrap says {want!r}")
    toc = parse_toc(bytes(data[:-FOOTER_SIZE]), footer, trusted_digest=info.toc_digest)
    return footer, toc


class BlobState:
    """One shared blob on one node: its units, their state and its payload file (thread-safe)."""

    def __init__(self, info, store_dir: str | os.PathLike):
        self.blob_id = normalize_blob_id(info.blob_id)
        self.info = info
        self.size = int(info.compressed_size)
        self.toc_offset = int(info.toc_offset)
        if not 0 <= self.toc_offset < self.size:
            raise FormatError(f"blob sha256:{self.blob_id}: TOC offset {self.toc_offset} is "
                              f"outside the blob ({self.size} bytes)")
        self.file = PayloadFile(store_dir, self.blob_id, self.size)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.footer: Footer | None = None
        self.toc: list[ChunkEntry] | None = None
        self._starts: list[int] = []
        # unit state: chunks in _state/_xxh (empty until the TOC is known), the meta unit apart
        self._state = bytearray()
        self._xxh: list[int] = []
        self._meta_state = MISSING
        self._meta_xxh = 0
        self.inflight: dict[int, threading.Event] = {}
        self._candidates = self.file.data_extents()
        if self._candidates.covers(self.toc_offset, self.size):
            self._meta_state = UNCHECKED
            if self.read_unit(META) is None:     # learns the TOC if the stored meta unit is good
                log.info("blob sha256:%s: stored TOC unusable, starting empty", self.blob_id)

    # ------------------------------------------------------------------ units
    def extent(self, u: int) -> tuple[int, int]:
        if u == META:
            return self.toc_offset, self.size
        e = self.toc[u]
        return e.compressed_offset, e.compressed_end

    def units_for(self, start: int, end: int) -> list[int]:
        """Units overlapping [start, end), in blob order (chunks, then META).

        LookupError if the range reaches into the data area while the TOC is not known.
        """
        with self.lock:
            return self._units_locked(start, end)

    def _units_locked(self, start: int, end: int) -> list[int]:
        if start >= end:
            return []
        if self.toc is None:
            if start < self.toc_offset:
                raise LookupError("the TOC is not known yet")
            return [META]
        out = []
        if start < self.toc_offset:
            lo = bisect.bisect_right(self._starts, start) - 1
            hi = bisect.bisect_left(self._starts, min(end, self.toc_offset))
            out = list(range(max(lo, 0), hi))
        if end > self.toc_offset:
            out.append(META)
        return out

    def ranges_of(self, units: Iterable[int]) -> RangeSet:
        return RangeSet(self.extent(u) for u in units)

    def _get(self, u: int) -> int:
        return self._meta_state if u == META else self._state[u]

    def _set(self, u: int, st: int, h: int = 0) -> None:
        if u == META:
            self._meta_state, self._meta_xxh = st, h
        else:
            self._state[u], self._xxh[u] = st, h

    def _set_meta(self, footer: Footer, toc: list[ChunkEntry]) -> None:
        """Learn the (verified) TOC: the chunk units appear."""
        with self.lock:
            if self.toc is not None:
                return
            self._state = bytearray(len(toc))
            self._xxh = [0] * len(toc)
            for i, e in enumerate(toc):
                if self._candidates.covers(e.compressed_offset, e.compressed_end):
                    self._state[i] = UNCHECKED
            self._starts = [e.compressed_offset for e in toc]
            self.footer = footer
            self.toc = toc
            self.cond.notify_all()

    def verify(self, u: int, data: bytes) -> None:
        """Raise IntegrityError / FormatError unless `data` is unit `u`'s exact trusted bytes."""
        if u == META:
            footer, toc = check_meta(self.info, data)
            self._set_meta(footer, toc)
            return
        e = self.toc[u]
        if len(data) != e.compressed_size:
            raise IntegrityError(f"chunk #{u}: got {len(data)} bytes, expected {e.compressed_size}")
        plain = decompress(self.footer.compressor, data, e.uncompressed_size) if e.compressed \
            else data
        got = digest_of(self.footer.digester, plain)
        if got != e.digest:
            raise IntegrityError(f"chunk #{u}: {self.footer.digester} digest {got.hex()} does "
                                 f"not match the TOC's {e.digest.hex()}")

    # ------------------------------------------------------------------ state
    def present(self, u: int) -> bool:
        with self.lock:
            return self._get(u) != MISSING

    def held(self) -> RangeSet:
        """Ranges of every unit this node holds (verified, or stored before a restart)."""
        with self.lock:
            out = [self.extent(u) for u in range(len(self._state)) if self._state[u]]
            if self._meta_state:
                out.append(self.extent(META))
            return RangeSet(out)

    def fetching(self) -> RangeSet:
        with self.lock:
            return RangeSet(self.extent(u) for u in self.inflight
                            if u == META or self.toc is not None)

    def put_unit(self, u: int, data: bytes) -> bool:
        """Store a unit that passed `verify`; it is then held and served. False if not stored."""
        if not self.file.write(self.extent(u)[0], data):
            return False
        h = xxhash.xxh64_intdigest(data)
        with self.lock:
            self._set(u, VERIFIED, h)
            self.cond.notify_all()
        return True

    def read_unit(self, u: int) -> bytes | None:
        """Unit `u`'s bytes from the payload file if held and still good, else None (and forgotten)."""
        with self.lock:
            st = self._get(u)
            want = self._meta_xxh if u == META else self._xxh[u]
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
            except (IntegrityError, FormatError) as e:
                log.info("blob sha256:%s: stored unit %d is not good (%s); dropping it",
                         self.blob_id, u, e)
                ok = False
        with self.lock:
            if not ok:
                if st == VERIFIED:
                    log.warning("blob sha256:%s: stored unit %d [%d, %d) changed on disk; "
                                "dropping it", self.blob_id, u, start, end)
                if self._get(u) == st:
                    self._set(u, MISSING)
                return None
            if st == UNCHECKED and self._get(u) == UNCHECKED:
                self._set(u, VERIFIED, xxhash.xxh64_intdigest(data))
        return data

    def read_range(self, start: int, end: int) -> bytes | None:
        """Bytes [start, end) if every unit overlapping it is held and good, else None."""
        try:
            units = self.units_for(start, end)
        except LookupError:
            return None
        parts = []
        for u in units:
            data = self.read_unit(u)
            if data is None:
                return None
            parts.append(data)
        if not parts:
            return b""
        base = self.extent(units[0])[0]
        buf = parts[0] if len(parts) == 1 else b"".join(parts)
        return buf[start - base:end - base]

    def held_prefix(self, start: int, end: int) -> int:
        """End of the longest prefix of [start, end) whose units are all held (start if none)."""
        with self.lock:
            try:
                units = self._units_locked(start, end)
            except LookupError:
                return start
            pos = start
            for u in units:
                if not self._get(u):
                    break
                pos = min(self.extent(u)[1], end)
            return pos

    def wait_available(self, start: int, end: int, timeout: float) -> bool:
        """Wait until every unit of [start, end) is held; False at once if some unit is neither
        held nor being fetched by this node, or when `timeout` runs out."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                try:
                    units = self._units_locked(start, end)
                except LookupError:            # TOC unknown: only a META fetch can change that
                    units = None
                if units is not None and all(self._get(u) for u in units):
                    return True
                if units is None:
                    waiting = META in self.inflight
                else:
                    waiting = all(u in self.inflight for u in units if not self._get(u))
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
                if self._get(u):
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

    `expect(info)` registers a blob from the bootstrap's blob table (before
    the blob cache opens it, so that even the TOC can come from peers);
    `share(cache)` registers a `BlobCache` that is already open.
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

    def share(self, cache) -> BlobState:
        """Share an open BlobCache's blob; its (verified) TOC is stored as the meta unit if needed."""
        st = self.expect(cache.info)
        if not st.present(META):
            try:
                with open(cache.toc_path, "rb") as f:
                    meta = f.read()
                st.verify(META, meta)
                st.put_unit(META, meta)
            except (OSError, IntegrityError, FormatError) as e:
                log.debug("blob sha256:%s: cannot take the TOC from the cache: %s", st.blob_id, e)
        return st

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
