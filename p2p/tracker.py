"""The tracker: which node holds, and which node is fetching, which ranges of which blob.

It is soft state only. Nodes announce everything they hold every few seconds
and the announcement expires unless renewed, so a restarted tracker refills
itself from the nodes' next messages (any message re-registers its sender),
and a node that died drops out after its TTL. Each answer carries the
tracker's `epoch` (random per start): a node that sees it change announces
its full state at once.

HTTP/JSON API (ranges are lists of [start, end) pairs of stored-blob offsets)::

    POST /v1/announce  {"node", "addr", "ttl", "blobs": {id: {"held": R, "fetching": R}}}
         -> {"epoch", "interval"}
         Replaces what the node holds (claims stay until released or expired; announced
         "fetching" ranges become claims). "addr" is null for a node that does not serve.
    POST /v1/claim     {"node", "addr", "ttl", "blob", "ranges": R, "exclude": [addr...],
                        "claim_ttl"}
         -> {"epoch", "held": [{"addr", "ranges"}], "fetching": [{"addr", "ranges"}],
             "granted": R}
         Atomically: the parts of R other nodes hold, the parts other nodes are
         fetching right now (and hold not), and the rest, which is granted to
         the caller and recorded as being fetched by it for `claim_ttl`
         seconds (if it serves). Nodes whose addr is in "exclude" (the caller
         found them bad) are ignored. So when every node asks for the same
         range at the same moment, exactly one is told to fetch it from the
         registry and the others wait for that one.
    POST /v1/update    {"node", "addr", "ttl", "blob", "held": R, "released": R}
         -> {"epoch"}   adds held ranges; ends claims (done or failed).
    POST /v1/leave     {"node"}      forget the node now (clean shutdown).
    GET  /v1/blobs/<id>  -> {"peers": [{"node", "addr", "held", "fetching", "expires_in"}]}
    GET  /v1/stats       -> node / blob / claim counts
    GET  /v1/health      -> {"ok": true, "epoch"}

The tracker never sees blob bytes and needs no credentials; a lying node can
only make others waste a bounded wait (fetchers verify everything and
penalize bad peers).
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from rafs.image.digests import normalize_blob_id

from .httpbase import Handler, HTTPServer
from .protocol import API_PREFIX, normalize_addr
from .ranges import RangeSet

log = logging.getLogger(__name__)

DEFAULT_TTL = 15.0             # seconds an announcement lives unless renewed
DEFAULT_INTERVAL = 5.0         # how often nodes should announce
DEFAULT_CLAIM_TTL = 30.0       # seconds a claim ("I am fetching this") lives
MAX_TTL = 600.0
MAX_BODY = 8 << 20


@dataclass
class _Claim:
    ranges: RangeSet
    expires: float


@dataclass
class _BlobRec:
    held: RangeSet = field(default_factory=RangeSet)
    claims: list[_Claim] = field(default_factory=list)

    def fetching(self, now: float) -> RangeSet:
        self.claims = [c for c in self.claims if c.expires > now]
        out = RangeSet()
        for c in self.claims:
            out = out | c.ranges
        return out - self.held


@dataclass
class _NodeRec:
    addr: str | None
    expires: float
    blobs: dict[str, _BlobRec] = field(default_factory=dict)


class TrackerState:
    """The tracker's tables and rules, without HTTP (thread-safe; `clock` injectable for tests)."""

    def __init__(self, *, interval: float = DEFAULT_INTERVAL, claim_ttl: float = DEFAULT_CLAIM_TTL,
                 clock: Callable[[], float] = time.monotonic):
        self.epoch = uuid.uuid4().hex[:16]
        self.interval = interval
        self.claim_ttl = claim_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._nodes: dict[str, _NodeRec] = {}
        self.counts = {"announce": 0, "claim": 0, "update": 0, "granted_bytes": 0,
                       "waits_told": 0}

    # -- helpers (locked)
    def _touch(self, node: str, addr: str | None, ttl: float) -> _NodeRec:
        now = self._clock()
        ttl = min(max(ttl, 1.0), MAX_TTL)
        rec = self._nodes.get(node)
        if rec is None:
            rec = self._nodes[node] = _NodeRec(addr, now + ttl)
        rec.addr = addr
        rec.expires = now + ttl
        return rec

    def _expire(self) -> None:
        now = self._clock()
        for k in [k for k, r in self._nodes.items() if r.expires <= now]:
            del self._nodes[k]

    # -- operations
    def announce(self, node: str, addr: str | None, ttl: float, blobs: dict) -> dict:
        with self._lock:
            self.counts["announce"] += 1
            self._expire()
            rec = self._touch(node, addr, ttl)
            now = self._clock()
            new: dict[str, _BlobRec] = {}
            for blob_id, st in blobs.items():
                b = _BlobRec(RangeSet.from_json(st.get("held", [])))
                old = rec.blobs.get(blob_id)
                if old is not None:    # claims live until released or expired, whatever the
                    b.claims = [c for c in old.claims if c.expires > now]   # snapshot says
                fetching = RangeSet.from_json(st.get("fetching", [])) - b.held
                for c in b.claims:
                    fetching = fetching - c.ranges
                if fetching and addr:
                    b.claims.append(_Claim(fetching, now + self.claim_ttl))
                new[blob_id] = b
            for blob_id, old in rec.blobs.items():      # blobs missing from the snapshot keep
                if blob_id not in new:                  # their live claims only
                    claims = [c for c in old.claims if c.expires > now]
                    if claims:
                        new[blob_id] = _BlobRec(claims=claims)
            rec.blobs = new
            return {"epoch": self.epoch, "interval": self.interval}

    def claim(self, node: str, addr: str | None, ttl: float, blob_id: str, ranges: RangeSet,
              exclude: set[str], claim_ttl: float | None = None) -> dict:
        with self._lock:
            self.counts["claim"] += 1
            self._expire()
            me = self._touch(node, addr, ttl)
            now = self._clock()
            held, fetching = [], []
            rest = ranges
            others = [r for k, r in self._nodes.items()
                      if k != node and r.addr and r.addr not in exclude and blob_id in r.blobs]
            for r in others:
                part = r.blobs[blob_id].held & ranges
                if part:
                    held.append({"addr": r.addr, "ranges": part.to_json()})
                    rest = rest - part
            for r in others:
                part = r.blobs[blob_id].fetching(now) & rest
                if part:
                    fetching.append({"addr": r.addr, "ranges": part.to_json()})
            busy = RangeSet()
            for f in fetching:
                busy = busy | RangeSet.from_json(f["ranges"])
            granted = rest - busy
            if granted and addr:
                b = me.blobs.setdefault(blob_id, _BlobRec())
                ct = min(max(claim_ttl or self.claim_ttl, 1.0), MAX_TTL)
                b.claims.append(_Claim(granted, now + ct))
            self.counts["granted_bytes"] += granted.size
            self.counts["waits_told"] += bool(fetching)
            return {"epoch": self.epoch, "held": held, "fetching": fetching,
                    "granted": granted.to_json()}

    def update(self, node: str, addr: str | None, ttl: float, blob_id: str, held: RangeSet,
               released: RangeSet) -> dict:
        with self._lock:
            self.counts["update"] += 1
            rec = self._touch(node, addr, ttl)
            b = rec.blobs.setdefault(blob_id, _BlobRec())
            b.held = b.held | held
            done = released | held
            if done:
                kept = []
                for c in b.claims:
                    left = c.ranges - done
                    if left:
                        kept.append(_Claim(left, c.expires))
                b.claims = kept
            return {"epoch": self.epoch}

    def leave(self, node: str) -> dict:
        with self._lock:
            self._nodes.pop(node, None)
            return {"epoch": self.epoch}

    def peers(self, blob_id: str) -> list[dict]:
        with self._lock:
            self._expire()
            now = self._clock()
            out = []
            for k, r in self._nodes.items():
                b = r.blobs.get(blob_id)
                if b is None:
                    continue
                out.append({"node": k, "addr": r.addr, "held": b.held.to_json(),
                            "fetching": b.fetching(now).to_json(),
                            "expires_in": round(r.expires - now, 3)})
            return out

    def stats(self) -> dict:
        with self._lock:
            self._expire()
            blobs = {b for r in self._nodes.values() for b in r.blobs}
            return {"epoch": self.epoch, "nodes": len(self._nodes), "blobs": len(blobs),
                    **self.counts}


# --------------------------------------------------------------------------- HTTP

_BLOB_PATH = re.compile(r"^/v1/blobs/([0-9a-fA-F]{64}|sha256:[0-9a-fA-F]{64})$")


def _node_fields(body: dict) -> tuple[str, str | None, float]:
    node = body.get("node")
    if not isinstance(node, str) or not 0 < len(node) <= 128:
        raise ValueError("'node' must be a non-empty string")
    addr = body.get("addr")
    if addr is not None:
        addr = normalize_addr(addr)
    ttl = body.get("ttl", DEFAULT_TTL)
    if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0:
        raise ValueError("'ttl' must be a positive number")
    return node, addr, float(ttl)


class _Handler(Handler):
    server_version = "nydus-peer-tracker/1"
    state: TrackerState                        # set on the subclass made per server

    def _reply(self, code: int, obj) -> None:
        self.reply(code, "application/json", json.dumps(obj).encode())

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        if not 0 <= n <= MAX_BODY:
            raise ValueError("request body too large")
        obj = json.loads(self.rfile.read(n) or b"{}")
        if not isinstance(obj, dict):
            raise ValueError("request body must be a JSON object")
        return obj

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == f"{API_PREFIX}/health":
            return self._reply(200, {"ok": True, "epoch": self.state.epoch})
        if path == f"{API_PREFIX}/stats":
            return self._reply(200, self.state.stats())
        m = _BLOB_PATH.match(path)
        if m:
            return self._reply(200, {"peers": self.state.peers(normalize_blob_id(m.group(1)))})
        self._reply(404, {"error": f"no such endpoint {path}"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            body = self._body()
            if path == f"{API_PREFIX}/leave":
                node = body.get("node")
                if not isinstance(node, str):
                    raise ValueError("'node' must be a string")
                return self._reply(200, self.state.leave(node))
            node, addr, ttl = _node_fields(body)
            if path == f"{API_PREFIX}/announce":
                blobs = body.get("blobs", {})
                if not isinstance(blobs, dict) or not all(isinstance(v, dict) for v in blobs.values()):
                    raise ValueError("'blobs' must map blob ids to {held, fetching}")
                blobs = {normalize_blob_id(k): v for k, v in blobs.items()}
                return self._reply(200, self.state.announce(node, addr, ttl, blobs))
            blob_id = normalize_blob_id(body.get("blob", ""))
            if path == f"{API_PREFIX}/claim":
                exclude = body.get("exclude", [])
                if not isinstance(exclude, list) or not all(isinstance(a, str) for a in exclude):
                    raise ValueError("'exclude' must be a list of addresses")
                claim_ttl = body.get("claim_ttl")
                if claim_ttl is not None and (not isinstance(claim_ttl, (int, float))
                                              or claim_ttl <= 0):
                    raise ValueError("'claim_ttl' must be a positive number")
                return self._reply(200, self.state.claim(
                    node, addr, ttl, blob_id, RangeSet.from_json(body.get("ranges")),
                    set(exclude), claim_ttl))
            if path == f"{API_PREFIX}/update":
                return self._reply(200, self.state.update(
                    node, addr, ttl, blob_id, RangeSet.from_json(body.get("held", [])),
                    RangeSet.from_json(body.get("released", []))))
        except (ValueError, TypeError) as e:
            return self._reply(400, {"error": str(e)})
        self._reply(404, {"error": f"no such endpoint {path}"})


class TrackerServer:
    """The tracker over HTTP on `listen` ("host:port"; port 0 picks one). `start()` / `close()`."""

    def __init__(self, listen: str, state: TrackerState | None = None):
        self.state = state or TrackerState()
        handler = type("TrackerHandler", (_Handler,), {"state": self.state})
        self._httpd = HTTPServer(listen, handler)

    @property
    def address(self) -> str:
        return self._httpd.address

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> "TrackerServer":
        self._httpd.start("p2p-tracker")
        return self

    def close(self) -> None:
        self._httpd.close()

    def __enter__(self) -> "TrackerServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
