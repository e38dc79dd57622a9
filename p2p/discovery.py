"""Finding peers: a tracker (`TrackerDiscovery`) or a static peer list (`StaticDiscovery`).

Both answer one question for the fetcher, `claim(blob, ranges, exclude)`:
which parts of `ranges` other nodes hold (fetch from them), which parts other
nodes are fetching right now (wait for them, bounded), and which parts this
node should fetch from the registry itself (`Plan.granted`). Both keep the
tracker / peers informed of what this node holds (`update`, and a periodic
full announcement).

With a tracker the claim is atomic, so when every node asks at once exactly
one is granted each range. A static list has no coordinator: the node asks
each peer what it holds and fetches (cached for `view_ttl` seconds), so two
nodes starting at the same instant may both go to the registry; fine for
small clusters. Either way a failure here is never an error for the reader:
an unreachable tracker means "fetch from the registry" (and the tracker is
skipped for `down_backoff` seconds so reads do not pay its timeout).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests

from .node import PeerNode
from .peerclient import PeerClient, PeerError, http_session
from .protocol import API_PREFIX, normalize_addr
from .ranges import RangeSet
from .tracker import DEFAULT_CLAIM_TTL, DEFAULT_INTERVAL

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """Where each part of the wanted ranges should come from."""
    held: list[tuple[str, RangeSet]] = field(default_factory=list)       # (peer addr, ranges)
    fetching: list[tuple[str, RangeSet]] = field(default_factory=list)   # (peer addr, ranges)
    granted: RangeSet = field(default_factory=RangeSet)                  # from the registry
    claimed: bool = False          # True if `granted` is recorded as ours (release it later)


class Discovery:
    """Base class: a node's view of its peers."""

    kind = "none"

    def start(self) -> None:
        """Start background announcing."""

    def claim(self, blob_id: str, ranges: RangeSet, exclude: set[str]) -> Plan:
        return Plan(granted=ranges)

    def update(self, blob_id: str, held: RangeSet, released: RangeSet) -> None:
        """This node now holds `held` and stopped fetching `released` (asynchronous)."""

    def stats(self) -> dict:
        return {"kind": self.kind}

    def close(self) -> None:
        pass


class TrackerDiscovery(Discovery):
    """Peers from a tracker (`p2p.tracker`)."""

    kind = "tracker"

    def __init__(self, url: str, node: PeerNode, *, interval: float = DEFAULT_INTERVAL,
                 ttl: float | None = None, claim_ttl: float = DEFAULT_CLAIM_TTL,
                 connect_timeout: float = 0.5, read_timeout: float = 2.0,
                 down_backoff: float = 2.0):
        self.url = ("http://" + normalize_addr(url)).rstrip("/")
        self.node = node
        self.interval = interval
        self.ttl = ttl if ttl is not None else 3 * interval
        self.claim_ttl = claim_ttl
        self.timeout = (connect_timeout, read_timeout)
        self.down_backoff = down_backoff
        self._session = http_session()
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._epoch: str | None = None
        self._kick = threading.Event()
        self._updates: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self.counts = {"claims": 0, "errors": 0, "announces": 0, "updates": 0, "skipped": 0}

    # -- plumbing
    def _base(self) -> dict:
        return {"node": self.node.node_id, "addr": self.node.advertise, "ttl": self.ttl}

    def _post(self, path: str, body: dict) -> dict | None:
        """POST to the tracker; None (and a short back-off) if it is down."""
        if time.monotonic() < self._down_until:
            self.counts["skipped"] += 1
            return None
        try:
            r = self._session.post(self.url + API_PREFIX + path, json=body, timeout=self.timeout)
            if r.status_code != 200:
                raise ValueError(f"HTTP {r.status_code}: {r.text[:200]}")
            out = r.json()
        except (requests.RequestException, ValueError) as e:
            with self._lock:
                self.counts["errors"] += 1
                first = time.monotonic() >= self._down_until
                self._down_until = time.monotonic() + self.down_backoff
            if first:
                log.warning("tracker %s unreachable (%s); fetching from the registry, "
                            "retrying in %.0fs", self.url, e, self.down_backoff)
            return None
        epoch = out.get("epoch")
        if epoch != self._epoch:
            if self._epoch is not None:
                log.info("tracker %s restarted (epoch %s); announcing everything", self.url, epoch)
                self._kick.set()
                self._updates.put(())
            self._epoch = epoch
        return out

    def start(self) -> None:
        t = threading.Thread(target=self._loop, name="p2p-announce", daemon=True)
        t.start()
        self._threads.append(t)

    def announce_now(self) -> bool:
        """Send this node's full state (computed now)."""
        self.counts["announces"] += 1
        return self._post("/announce", {**self._base(), "blobs": self.node.state()}) is not None

    def _loop(self) -> None:
        """One thread sends announcements and updates, in order: a full announcement (a snapshot
        taken when it is sent) can then never overwrite a newer update at the tracker."""
        next_announce = 0.0
        while True:
            timeout = max(0.0, next_announce - time.monotonic())
            try:
                item = self._updates.get(timeout=timeout)
            except queue.Empty:
                item = ()
            if item is None:
                return
            batch = [item] if item else []
            while True:                             # coalesce what queued up meanwhile
                try:
                    nxt = self._updates.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._updates.put(None)
                    break
                if nxt:
                    batch.append(nxt)
            merged: dict[str, tuple[RangeSet, RangeSet]] = {}
            for blob_id, held, released in batch:
                h, r = merged.get(blob_id, (RangeSet(), RangeSet()))
                merged[blob_id] = (h | held, r | released)
            for blob_id, (held, released) in merged.items():
                self.counts["updates"] += 1
                self._post("/update", {**self._base(), "blob": blob_id, "held": held.to_json(),
                                       "released": released.to_json()})
            if self._kick.is_set() or time.monotonic() >= next_announce:
                self._kick.clear()
                self.announce_now()
                next_announce = time.monotonic() + self.interval

    # -- Discovery
    def claim(self, blob_id: str, ranges: RangeSet, exclude: set[str]) -> Plan:
        self.counts["claims"] += 1
        out = self._post("/claim", {**self._base(), "blob": blob_id, "ranges": ranges.to_json(),
                                    "exclude": sorted(exclude), "claim_ttl": self.claim_ttl})
        if out is None:
            return Plan(granted=ranges)
        try:
            me = self.node.advertise
            held = [(normalize_addr(h["addr"]), RangeSet.from_json(h["ranges"]) & ranges)
                    for h in out.get("held", []) if h.get("addr") != me]
            fetching = [(normalize_addr(h["addr"]), RangeSet.from_json(h["ranges"]) & ranges)
                        for h in out.get("fetching", []) if h.get("addr") != me]
            granted = RangeSet.from_json(out.get("granted", [])) & ranges
        except (KeyError, TypeError, ValueError) as e:
            log.warning("tracker %s: bad claim answer (%s); fetching from the registry", self.url, e)
            return Plan(granted=ranges)
        covered = granted
        for _, r in held + fetching:
            covered = covered | r
        # whatever the tracker left out is ours too (never leave a byte unplanned)
        return Plan(held, fetching, granted | (ranges - covered), claimed=bool(me))

    def update(self, blob_id: str, held: RangeSet, released: RangeSet) -> None:
        if held or released:
            self._updates.put((blob_id, held, released))

    def stats(self) -> dict:
        return {"kind": self.kind, "url": self.url, "epoch": self._epoch,
                "down": time.monotonic() < self._down_until, **self.counts}

    def close(self) -> None:
        self._updates.put(None)
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        if self.node.advertise:
            try:
                self._session.post(self.url + API_PREFIX + "/leave",
                                   json={"node": self.node.node_id}, timeout=self.timeout)
            except requests.RequestException:
                pass
        self._session.close()


class StaticDiscovery(Discovery):
    """A fixed list of peer addresses, asked directly what they hold (no coordinator)."""

    kind = "static"

    def __init__(self, peers: list[str], node: PeerNode, client: PeerClient, *,
                 view_ttl: float = 0.5, failure_penalty: float = 5.0):
        me = node.advertise
        self.peers = [p for p in dict.fromkeys(normalize_addr(p) for p in peers) if p != me]
        self.node = node
        self.client = client
        self.view_ttl = view_ttl
        self.failure_penalty = failure_penalty
        self._lock = threading.Lock()
        self._views: dict[tuple[str, str], tuple[float, RangeSet, RangeSet]] = {}
        self._pool = ThreadPoolExecutor(max(1, min(16, len(self.peers))),
                                        thread_name_prefix="p2p-static")

    def _view(self, addr: str, blob_id: str) -> tuple[RangeSet, RangeSet]:
        now = time.monotonic()
        with self._lock:
            v = self._views.get((addr, blob_id))
        if v is not None and v[0] > now:
            return v[1], v[2]
        try:
            held, fetching = self.client.ranges(addr, blob_id)
        except PeerError as e:
            self.client.penalize(addr, self.failure_penalty, str(e))
            held, fetching = RangeSet(), RangeSet()
        with self._lock:
            self._views[(addr, blob_id)] = (now + self.view_ttl, held, fetching)
        return held, fetching

    def claim(self, blob_id: str, ranges: RangeSet, exclude: set[str]) -> Plan:
        peers = [p for p in self.peers if p not in exclude and not self.client.penalized(p)]
        views = list(zip(peers, self._pool.map(lambda p: self._view(p, blob_id), peers)))
        plan = Plan()
        rest = ranges
        for addr, (held, _) in views:
            part = held & ranges
            if part:
                plan.held.append((addr, part))
                rest = rest - part
        busy = RangeSet()
        for addr, (_, fetching) in views:
            part = fetching & rest
            if part:
                plan.fetching.append((addr, part))
                busy = busy | part
        plan.granted = rest - busy
        return plan

    def update(self, blob_id: str, held: RangeSet, released: RangeSet) -> None:
        pass                        # peers ask us directly

    def stats(self) -> dict:
        return {"kind": self.kind, "peers": list(self.peers)}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
