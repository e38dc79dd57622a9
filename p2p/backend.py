"""The P2P backend: blob ranges from peers first, the registry (or its mirrors) otherwise.

A `BlobBackend` in front of the usual origin backend (a `RegistryBackend`, or
a `MirrorBackend` with mirrors and the registry behind it). The blob cache
asks it for stored-blob ranges exactly as it asks the registry; it answers
from, in order:

1. its own payload store (units it already holds, re-checked);
2. peers that hold the units (several pieces in parallel, from different
   holders, each with a bounded time; a busy holder is asked again after a
   short pause; the last piece asks for up to `peer_readahead` bytes more,
   which the holder adds if it has them, so a reader behind the wave makes few
   round trips; read-ahead never goes to the registry);
3. a peer that is fetching the units right now: wait for it (bounded by
   `wait_timeout`) instead of asking the registry too, so a chunk leaves the
   registry about once even when every node starts at the same moment;
4. the origin, for what the tracker granted this node (nobody holds or fetches
   it) and as the fallback for everything that failed above.

Verification is airtight by construction: every unit (a chunk payload of the
bootstrap's chunk table, `node`) that comes from a peer is verified here
against its digest there before it is stored, re-served or returned; a peer whose bytes fail is
penalized (`bad_data_penalty` seconds) and the unit is fetched from the
origin. The blob cache then verifies every chunk once more, as it does for
every backend. Only units verified here are stored and served to others.
Bytes outside every unit (chunks of the blob this image does not use, the
blob's own metadata) are origin-only; `read_sparse` (what the blob cache
calls) does not fetch them at all when the caller does not need them. Blobs
the node was not told about (`PeerNode.expect`) go straight to the origin. Registry credentials live in the origin backend's client; peers are
reached by a separate, credential-free client (`PeerClient`).

Stats (`source_stats()["p2p"]`): bytes from peers / mirrors / the registry per
blob, per-peer counters and penalties, discovery and upload counters.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from rafs.errors import BackendError, IntegrityError
from rafs.image.digests import normalize_blob_id
from rafs.storage.backend import BlobBackend, MirrorBackend, RegistryBackend
from rafs.storage.chunks import MAX_MERGE_GAP

from .discovery import Discovery, Plan
from .node import BlobState, PeerNode
from .peerclient import PeerBusy, PeerClient, PeerFailed, PeerMiss
from .ranges import RangeSet

log = logging.getLogger(__name__)

DEFAULT_WAIT_TIMEOUT = 10.0
DEFAULT_PIECE_SIZE = 512 << 10
DEFAULT_MAX_PARALLEL = 8
DEFAULT_PEER_READAHEAD = 1 << 20
BAD_DATA_PENALTY = 120.0
FAILURE_PENALTY = 10.0
_HOLDER_TRIES = 3
_BUSY_PAUSE = 0.05                  # first pause before asking a busy peer again


class _Tap(BlobBackend):
    """Forwards to `inner`, recording bytes per blob under `kind` ("mirror" / "registry")."""

    retry = None

    def __init__(self, inner: BlobBackend, kind: str, record: Callable[[str, str, int], None]):
        super().__init__()
        self.inner = inner
        self.kind = kind
        self._record = record

    @property
    def name(self) -> str:
        return self.inner.name

    def _read_range(self, blob_id: str, offset: int, size: int) -> bytes:
        data = self.inner.read_range(blob_id, offset, size)
        self._record(blob_id, self.kind, len(data))
        return data

    def _blob_size(self, blob_id: str) -> int:
        return self.inner.blob_size(blob_id)

    def read_from_origin(self, blob_id: str, offset: int, size: int) -> bytes | None:
        return self.inner.read_from_origin(blob_id, offset, size)

    def source_stats(self) -> dict:
        return self.inner.source_stats()

    def close(self) -> None:
        self.inner.close()


def _runs(units: list[int], st: BlobState, limit: int, gap: int = 0) -> list[list[int]]:
    """Split units (in blob order) into runs that are contiguous in the blob and span at most
    `limit` bytes (a single unit may exceed it). With `gap` (origin requests), a run may also
    step over up to `gap` bytes that belong to no unit (never over another unit's bytes, which
    may come from a peer); peers are asked for gap-free runs only, they serve nothing else."""
    out: list[list[int]] = []
    start = 0
    for u in units:
        a, b = st.extent(u)
        if out and b - start <= limit:
            prev = out[-1][-1]
            d = a - st.extent(prev)[1]
            if d == 0 or (0 < d <= gap and st.after(prev) == u):
                out[-1].append(u)
                continue
        out.append([u])
        start = a
    return out


class P2PBackend(BlobBackend):
    """Peers first, then `origin` (see the module docstring). Owns `origin` and `client`."""

    retry = None                            # peers are tried once each; the origin retries itself

    def __init__(self, origin: BlobBackend, node: PeerNode, discovery: Discovery, *,
                 client: PeerClient | None = None, wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
                 piece_size: int = DEFAULT_PIECE_SIZE, max_parallel: int = DEFAULT_MAX_PARALLEL,
                 peer_readahead: int = DEFAULT_PEER_READAHEAD,
                 bad_data_penalty: float = BAD_DATA_PENALTY,
                 failure_penalty: float = FAILURE_PENALTY):
        super().__init__()
        if wait_timeout < 0 or piece_size < 1 or max_parallel < 1 or peer_readahead < 0:
            raise ValueError("wait_timeout >= 0, piece_size >= 1, max_parallel >= 1 and "
                             "peer_readahead >= 0")
        self.node = node
        self.discovery = discovery
        self.client = client or PeerClient()
        self.wait_timeout = wait_timeout
        self.piece_size = piece_size
        self.peer_readahead = peer_readahead
        self.local_wait = wait_timeout + 30.0   # bound on waiting for another local fetch
        self.bad_data_penalty = bad_data_penalty
        self.failure_penalty = failure_penalty
        self._stats_lock = threading.Lock()
        self._per_blob: dict[str, dict[str, int]] = {}
        self.origin = self._tap(origin)
        self._pool = ThreadPoolExecutor(max_parallel, thread_name_prefix="p2p-fetch")
        self.upload_stats: Callable[[], dict] | None = None     # set by the service

    # ------------------------------------------------------------------ stats
    def _record(self, blob_id: str, kind: str, nbytes: int) -> None:
        with self._stats_lock:
            d = self._per_blob.get(blob_id)
            if d is None:
                d = self._per_blob[blob_id] = {"peer": 0, "mirror": 0, "registry": 0,
                                               "waits": 0, "peer_failures": 0}
            d[kind] = d.get(kind, 0) + nbytes

    def _tap(self, origin: BlobBackend) -> BlobBackend:
        if isinstance(origin, MirrorBackend):
            origin.mirrors = [_Tap(m, "mirror", self._record) for m in origin.mirrors]
            origin.origin = _Tap(origin.origin, "registry", self._record)
            return origin
        kind = "registry" if isinstance(origin, RegistryBackend) else "origin"
        return _Tap(origin, kind, self._record)

    def blob_stats(self) -> dict:
        with self._stats_lock:
            return {k: dict(v) for k, v in self._per_blob.items()}

    def source_stats(self) -> dict:
        out = dict(self.origin.source_stats())
        per_blob = self.blob_stats()
        peers = self.client.stats()
        out["p2p"] = {
            "bytes": sum(v["peer"] for v in per_blob.values()),
            "requests": sum(p["requests"] for p in peers.values()),
            "errors": sum(p["errors"] for p in peers.values()),
            "blobs": per_blob,
            "peers": peers,
            "discovery": self.discovery.stats(),
            "uploads": self.upload_stats() if self.upload_stats else {},
        }
        return out

    # ------------------------------------------------------------------ BlobBackend
    @property
    def name(self) -> str:
        return f"p2p ({self.discovery.kind}) -> {self.origin.name}"

    def _blob_size(self, blob_id: str) -> int:
        st = self.node.get(blob_id)
        return st.size if st is not None else self.origin.blob_size(blob_id)

    def read_from_origin(self, blob_id: str, offset: int, size: int) -> bytes | None:
        again = self.origin.read_from_origin(blob_id, offset, size)
        return again if again is not None else self.origin.read_range(blob_id, offset, size)

    def _read_range(self, blob_id: str, offset: int, size: int) -> bytes:
        return self._read(blob_id, offset, size, None)

    def read_sparse(self, blob_id: str, offset: int, size: int,
                    wanted: list[tuple[int, int]]) -> bytes:
        """Only the units overlapping `wanted` are fetched; the other bytes are zeros."""
        hex_id = normalize_blob_id(blob_id)
        if offset < 0 or size < 0:
            raise ValueError(f"bad range: offset {offset}, size {size}")
        if size == 0:
            return b""
        try:
            data = self._read(hex_id, offset, size, RangeSet(wanted))
        except BackendError:
            self.counters.error()
            raise
        self.counters.ok(size)
        return data

    def _read(self, blob_id: str, offset: int, size: int, wanted: RangeSet | None) -> bytes:
        """Bytes [offset, offset+size): units from peers / the origin (verified), bytes outside
        the units from the origin; with `wanted`, only what overlaps it (the rest zeros)."""
        st = self.node.get(blob_id)
        if st is None:                       # not a shared blob: the origin only
            return self.origin.read_range(blob_id, offset, size)
        end = offset + size
        if end > st.size:
            raise BackendError(f"{self.name}: [{offset}, {end}) runs past the end of blob "
                               f"sha256:{blob_id} ({st.size} bytes)")
        need = RangeSet.single(offset, end)
        if wanted is not None:
            need = need & wanted
        units: list[int] = []
        seen: set[int] = set()
        for a, b in need:
            for u in st.units_for(a, b):
                if u not in seen:
                    seen.add(u)
                    units.append(u)
        outside = need - st.ranges_of(units)      # bytes of no unit: origin-only
        if wanted is None and not outside and units:
            got = self._ensure(st, units)
            base = st.extent(units[0])[0]
            buf = got[units[0]] if len(units) == 1 else b"".join(got[u] for u in units)
            return buf[offset - base:end - base]
        out = bytearray(size)
        for a, b in outside:
            out[a - offset:b - offset] = self.origin.read_range(blob_id, a, b - a)
        if units:
            got = self._ensure(st, units)
            for u in units:
                a, b = st.extent(u)
                lo, hi = max(a, offset), min(b, end)
                out[lo - offset:hi - offset] = memoryview(got[u])[lo - a:hi - a]
        return bytes(out)

    # ------------------------------------------------------------------ fetching
    def _ensure(self, st: BlobState, units: list[int]) -> dict[int, bytes]:
        """Bytes of every unit: held, fetched by another local thread, or fetched now."""
        out: dict[int, bytes] = {}
        for _ in range(2):
            pending = [u for u in units if u not in out]
            mine, others = st.begin(pending)
            try:
                for u in pending:
                    if u not in mine:
                        data = st.read_unit(u)
                        if data is not None:
                            out[u] = data
                if mine:
                    out.update(self._fetch(st, mine))
            finally:
                st.end(mine)
            for ev in others:
                ev.wait(self.local_wait)
            for u in units:
                if u not in out:
                    data = st.read_unit(u)
                    if data is not None:
                        out[u] = data
            if len(out) == len(units):
                return out
        # Another local fetch failed or hung: fetch the rest from the origin ourselves.
        for u, (data, verified) in self._from_origin(st, [u for u in units if u not in out]).items():
            if verified:
                st.put_unit(u, data)
            out[u] = data
        return out

    def _fetch(self, st: BlobState, units: list[int]) -> dict[int, bytes]:
        """Fetch `units` (marked in flight by us): plan with discovery, run the pieces in parallel."""
        wanted = st.ranges_of(units)
        plan = self.discovery.claim(st.blob_id, wanted, self.client.penalized_peers())
        claimed = plan.granted if plan.claimed else RangeSet()
        extras: list[int] = []                # read-ahead units marked in flight by _tasks
        results: dict[int, bytes] = {}
        stored: list[int] = []
        error: BaseException | None = None
        try:
            tasks = self._tasks(st, units, plan, extras)
            futures = [self._pool.submit(fn) for fn in tasks[1:]]
            outcomes = []
            if tasks:
                try:
                    outcomes.append(tasks[0]())
                except BaseException as e:
                    error = e
            for f in futures:                 # wait for every piece, even after an error
                try:
                    outcomes.append(f.result())
                except BaseException as e:
                    error = error or e
            for part, extra_claims in outcomes:
                claimed = claimed | extra_claims
                for u, (data, verified) in part.items():
                    results[u] = data
                    if verified and st.put_unit(u, data):
                        stored.append(u)
        finally:
            st.end(extras)                    # stored ones are held now; the rest released
            self.discovery.update(st.blob_id, st.ranges_of(stored), claimed)
        if error is not None:
            raise error
        return results

    def _readahead(self, st: BlobState, last: int, wanted: set[int], extras: list[int]
                   ) -> list[int]:
        """Chunks right after `last` (not wanted now, not held, not in flight here) to ask a
        holder for in the same GET, up to `peer_readahead` bytes; marked in flight (`extras`)."""
        if not self.peer_readahead:
            return []
        cand = []
        size = 0
        u = st.next_unit(last)
        while u is not None and u not in wanted:
            a, b = st.extent(u)
            if size + b - a > self.peer_readahead:
                break
            cand.append(u)
            size += b - a
            u = st.next_unit(u)
        mine, _ = st.begin(cand)
        out = []
        for u in cand:                        # only the contiguous prefix we could mark
            if u not in mine:
                break
            out.append(u)
        st.end([u for u in mine if u not in out])
        extras.extend(out)
        return out

    def _tasks(self, st: BlobState, units: list[int], plan: Plan, extras: list[int]
               ) -> list[Callable]:
        holders: dict[int, list[str]] = {}
        waits: dict[int, str] = {}
        for u in units:
            a, b = st.extent(u)
            hs = [addr for addr, rs in plan.held if rs.covers(a, b)]
            if hs:
                holders[u] = hs
                continue
            for addr, rs in plan.fetching:
                if rs.covers(a, b):
                    waits[u] = addr
                    break
        tasks: list[Callable] = []
        # from holders: pieces of <= piece_size, spread round-robin over the holders
        rot = 0
        held_units = [u for u in units if u in holders]
        for run in _runs(held_units, st, self.piece_size):
            piece: list[int] = []
            common: list[str] = []
            for u in run:
                nxt = [h for h in (common or holders[u]) if h in holders[u]]
                if piece and not nxt:
                    tasks.append(self._holder_task(st, piece, common, rot))
                    rot += 1
                    piece, nxt = [], holders[u]
                piece.append(u)
                common = nxt
            if piece:
                ahead = self._readahead(st, piece[-1], set(units), extras)
                tasks.append(self._holder_task(st, piece, common, rot, ahead))
                rot += 1
        # from peers fetching right now: one waiting request per peer and run
        by_peer: dict[str, list[int]] = {}
        for u in units:
            if u in waits:
                by_peer.setdefault(waits[u], []).append(u)
        for addr, us in by_peer.items():
            for run in _runs(us, st, 1 << 62):
                ahead = self._readahead(st, run[-1], set(units), extras)
                tasks.append(lambda run=run, addr=addr, ahead=ahead:
                             self._wait_task(st, run, addr, ahead))
        # from the origin: what was granted, and anything the plan left out
        rest = [u for u in units if u not in holders and u not in waits]
        for run in _runs(rest, st, 1 << 62, MAX_MERGE_GAP):
            tasks.append(lambda run=run: (self._from_origin(st, run), RangeSet()))
        return tasks

    def _holder_task(self, st: BlobState, piece: list[int], holders: list[str], rot: int,
                     ahead: list[int] = ()):
        order = holders[rot % len(holders):] + holders[:rot % len(holders)]
        return lambda: self._from_holders(st, piece, order, ahead)

    # -- sources
    def _split(self, st: BlobState, units: list[int], data: bytes, source: str
               ) -> tuple[dict[int, tuple[bytes, bool]], list[int]]:
        """Cut `data` (the bytes of contiguous `units`) into units and verify each:
        ({unit: (bytes, True)} for good ones, [bad units])."""
        base = st.extent(units[0])[0]
        good, bad = {}, []
        for u in units:
            a, b = st.extent(u)
            chunk = data[a - base:b - base]
            try:
                st.verify(u, chunk)
            except IntegrityError as e:
                log.warning("blob sha256:%s: unit %d from %s failed verification: %s",
                            st.blob_id, u, source, e)
                bad.append(u)
                continue
            good[u] = (chunk, True)
        return good, bad

    def _from_holders(self, st: BlobState, units: list[int], order: list[str],
                      ahead: list[int] = ()):
        """Units from the first holder that delivers good bytes; the origin for the rest.

        Holders that are only busy (upload slots full) are asked again after a short,
        growing pause until `wait_timeout`: a busy peer frees up much sooner than the
        registry would deliver.
        """
        got: dict[int, tuple[bytes, bool]] = {}
        deadline = time.monotonic() + self.wait_timeout
        tries = 0
        todo = list(units)
        pause = _BUSY_PAUSE
        while True:
            busy = False
            for addr in order:
                todo = [u for u in units if u not in got]
                if not todo or tries >= _HOLDER_TRIES:
                    break
                if self.client.penalized(addr):
                    continue
                for run in _runs(todo, st, 1 << 62):
                    extra = ahead if run[-1] == units[-1] and not any(u in got for u in ahead) \
                        else ()
                    ok, bad, status = self._peer_get(st, run, addr, wait=0.0, extra=extra)
                    got.update(ok)
                    if status == "busy":
                        busy = True
                    elif status != "ok" or bad:
                        tries += 1
                    if status != "ok" or bad:
                        break
            todo = [u for u in units if u not in got]
            if not todo or not busy or tries >= _HOLDER_TRIES or \
                    time.monotonic() + pause > deadline:
                break
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, 1.0)
        extra = RangeSet()
        if todo:
            more, extra = self._fallback(st, todo, set(order))
            got.update(more)
        return got, extra

    def _peer_get(self, st: BlobState, run: list[int], addr: str, wait: float,
                  extra: list[int] = ()) -> tuple[dict[int, tuple[bytes, bool]], list[int], str]:
        """(good units, bad units, status) of one GET; status is "ok", "miss", "busy" or
        "failed" (then nothing was delivered). `extra`: units right after `run` the peer may
        add if it holds them (read-ahead; good ones are returned too)."""
        a, b = st.extent(run[0])[0], st.extent(run[-1])[1]
        end = st.extent(extra[-1])[1] if extra else b
        try:
            data = self.client.get(addr, st.blob_id, a, end - a, wait=wait, min_size=b - a)
        except PeerMiss:
            return {}, [], "miss"
        except PeerBusy:
            return {}, [], "busy"
        except PeerFailed as e:
            self.client.penalize(addr, self.failure_penalty, str(e))
            self._record(st.blob_id, "peer_failures", 1)
            return {}, [], "failed"
        run = run + [u for u in extra if st.extent(u)[1] <= a + len(data)]
        ok, bad = self._split(st, run, data, f"peer {addr}")
        if bad:
            self.client.penalize(addr, self.bad_data_penalty,
                                 f"served bytes of blob sha256:{st.blob_id} that failed "
                                 "verification")
            self._record(st.blob_id, "peer_failures", 1)
        self._record(st.blob_id, "peer", sum(len(v[0]) for v in ok.values()))
        return ok, bad, "ok"

    def _wait_task(self, st: BlobState, run: list[int], addr: str, ahead: list[int] = ()):
        """Wait (bounded) for a peer that is fetching `run` right now; fall back if it fails."""
        self._record(st.blob_id, "waits", 1)
        got: dict[int, tuple[bytes, bool]] = {}
        deadline = time.monotonic() + self.wait_timeout
        pause = _BUSY_PAUSE
        while not self.client.penalized(addr):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ok, _, status = self._peer_get(st, run, addr, wait=left, extra=ahead)
            got.update(ok)
            if status != "busy" or time.monotonic() + pause > deadline:
                break
            time.sleep(pause * (0.5 + random.random()))     # it has the bytes, but is busy
            pause = min(pause * 2, 1.0)
        todo = [u for u in run if u not in got]
        extra = RangeSet()
        if todo:
            more, extra = self._fallback(st, todo, {addr})
            got.update(more)
        return got, extra

    def _fallback(self, st: BlobState, units: list[int], tried: set[str]):
        """Second chance without waiting: holders the tracker knows now (not `tried`), then the
        origin. Returns (units, ranges claimed from the tracker on the way)."""
        got: dict[int, tuple[bytes, bool]] = {}
        wanted = st.ranges_of(units)
        plan = self.discovery.claim(st.blob_id, wanted, self.client.penalized_peers() | tried)
        claimed = plan.granted if plan.claimed else RangeSet()
        for addr, rs in plan.held:
            todo = [u for u in units if u not in got and rs.covers(*st.extent(u))]
            if not todo or self.client.penalized(addr):
                continue
            for run in _runs(todo, st, 1 << 62):
                ok, _, _ = self._peer_get(st, run, addr, wait=0.0)
                got.update(ok)
        todo = [u for u in units if u not in got]
        if todo:
            got.update(self._from_origin(st, todo))
        return got, claimed

    def _from_origin(self, st: BlobState, units: list[int]) -> dict[int, tuple[bytes, bool]]:
        """Units from the origin; ones that fail verification are passed on unverified (the
        blob cache reports the corrupt blob), never stored or served."""
        out: dict[int, tuple[bytes, bool]] = {}
        for run in _runs(sorted(units, key=lambda u: st.extent(u)[0]), st, 1 << 62,
                         MAX_MERGE_GAP):
            a, b = st.extent(run[0])[0], st.extent(run[-1])[1]
            data = self.origin.read_range(st.blob_id, a, b - a)
            ok, bad = self._split(st, run, data, "the origin")
            out.update(ok)
            for u in bad:
                x, y = st.extent(u)
                out[u] = (data[x - a:y - a], False)
        return out

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()
        self.origin.close()
