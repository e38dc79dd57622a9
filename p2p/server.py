"""The peer service: serves verified blob bytes of the blobs this node shares (`protocol`).

* Only blobs registered with the `PeerNode` are served; anything else is 404.
* Only units the node holds verified are served (`node.BlobState.read_range`
  re-checks each unit's xxh64, or its digest after a restart); a range with
  any missing unit is 404, with what the node holds and is fetching.
* `wait` lets a peer wait (bounded) for a range this node is fetching right
  now instead of going to the registry itself.
* Bounded upload concurrency: at most `upload_slots` responses are being
  sent at once; more get 503 + Retry-After (they ask another holder).
* Optional bandwidth cap: `upload_rate` bytes/s over all uploads (token
  bucket), so serving peers cannot starve the node's own workload.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from urllib.parse import parse_qs

from .httpbase import Handler, HTTPServer
from .node import PeerNode
from .protocol import API_PREFIX, FRAME_SIZE, MAX_REQUEST, MAX_WAIT, pack_frame

log = logging.getLogger(__name__)

DEFAULT_UPLOAD_SLOTS = 8
_SEND_PIECE = 64 << 10
_PATH = re.compile(r"^/v1/blobs/(?:sha256:)?([0-9a-fA-F]{64})(/ranges)?$")


class TokenBucket:
    """`rate` bytes per second with a burst of `burst` bytes; `take(n)` blocks until allowed."""

    def __init__(self, rate: float, burst: float | None = None):
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate / 10, 2 * _SEND_PIECE))
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:                     # one sender at a time: FIFO-ish fairness
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            debt = -self._tokens
            if debt > 0:
                time.sleep(debt / self.rate)


class UploadStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.requests = 0
        self.misses = 0
        self.busy = 0
        self.waits = 0
        self.active = 0

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def snapshot(self) -> dict:
        with self._lock:
            return {"bytes": self.bytes, "requests": self.requests, "misses": self.misses,
                    "busy": self.busy, "waits": self.waits, "active": self.active}


class _Handler(Handler):
    server_version = "nydus-peer/1"
    svc: "PeerServer"

    def _json(self, code: int, obj, headers: dict | None = None) -> None:
        self.reply(code, "application/json", json.dumps(obj).encode(), headers=headers)

    def do_GET(self) -> None:
        svc = self.svc
        path, _, query = self.path.partition("?")
        if path == f"{API_PREFIX}/health":
            return self._json(200, {"ok": True, "node": svc.node.node_id})
        if path == f"{API_PREFIX}/blobs":
            return self._json(200, {"blobs": svc.node.state()})
        m = _PATH.match(path)
        if not m:
            return self._json(404, {"error": f"no such endpoint {path}"})
        st = svc.node.get(m.group(1))
        if st is None:
            svc.stats.add(requests=1, misses=1)
            return self._json(404, {"error": "blob not shared", "held": [], "fetching": []})
        if m.group(2):
            return self._json(200, {"held": st.held().to_json(), "fetching": st.fetching().to_json()})
        try:
            q = parse_qs(query, strict_parsing=True)
            offset = int(q["offset"][0])
            size = int(q["size"][0])
            need = int(q.get("min", [size])[0])
            wait = float(q.get("wait", ["0"])[0])
        except (KeyError, ValueError, IndexError):
            return self._json(400, {"error": "want ?offset=N&size=N[&min=N][&wait=SECONDS]"})
        if offset < 0 or size <= 0 or size > MAX_REQUEST or offset + size > st.size \
                or not 0 < need <= size or not 0 <= wait <= 1e6:
            return self._json(400, {"error": f"bad range [{offset}, {offset + size}) of a "
                                             f"{st.size}-byte blob (at most {MAX_REQUEST} bytes)"})
        svc.stats.add(requests=1)
        end = offset + size
        if wait > 0:
            svc.stats.add(waits=1)
            st.wait_available(offset, offset + need, min(wait, svc.max_wait))
        if need < size:                       # serve the longest held prefix (>= need bytes)
            end = max(st.held_prefix(offset, end), offset + need)
            size = end - offset
        data = st.read_range(offset, end)
        if data is None:
            svc.stats.add(misses=1)
            return self._json(404, {"error": "range not held", "held": st.held().to_json(),
                                    "fetching": st.fetching().to_json()})
        if not svc.slots.acquire(blocking=False):
            svc.stats.add(busy=1)
            return self._json(503, {"error": "upload slots full"}, {"Retry-After": "1"})
        svc.stats.add(active=1)
        try:
            frame = pack_frame(offset, data)
            view = memoryview(data)
            step = _SEND_PIECE if svc.bucket is not None else size   # paced, or all at once
            for pos in range(0, size, step):
                piece = view[pos:pos + step]
                if svc.bucket is not None:
                    svc.bucket.take(len(piece))
                if pos == 0:                  # headers, frame and the first piece: one write
                    self.reply(200, "application/octet-stream", frame, piece,
                               length=FRAME_SIZE + size)
                else:
                    self.wfile.write(piece)
            svc.stats.add(bytes=size)
        finally:
            svc.stats.add(active=-1)
            svc.slots.release()


class PeerServer:
    """Serves `node`'s shared blobs on `listen` ("host:port"; port 0 picks one)."""

    def __init__(self, node: PeerNode, listen: str, *, upload_slots: int = DEFAULT_UPLOAD_SLOTS,
                 upload_rate: float = 0, max_wait: float = MAX_WAIT):
        if upload_slots < 1:
            raise ValueError("upload_slots must be >= 1")
        self.node = node
        self.slots = threading.BoundedSemaphore(upload_slots)
        self.bucket = TokenBucket(upload_rate) if upload_rate else None
        self.max_wait = max_wait
        self.stats = UploadStats()
        handler = type("PeerHandler", (_Handler,), {"svc": self})
        self._httpd = HTTPServer(listen, handler)

    @property
    def address(self) -> str:
        return self._httpd.address

    @property
    def accepted(self) -> int:
        """Connections accepted so far (peers reuse keep-alive connections: few per peer)."""
        return self._httpd.accepted

    def start(self) -> "PeerServer":
        self._httpd.start("p2p-peer-server")
        return self

    def close(self) -> None:
        self._httpd.close()

    def __enter__(self) -> "PeerServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
