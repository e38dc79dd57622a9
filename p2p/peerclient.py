"""HTTP client for other nodes' peer services (`protocol`), with bounded time and peer penalties.

Every GET has a deadline: connect timeout + the asked `wait` + read timeout
+ size / `min_rate` (a peer that trickles bytes is as bad as a dead one).
Errors are typed so the fetcher can react: `PeerMiss` (404: not there),
`PeerBusy` (503: upload slots full), `PeerFailed` (refused, reset, timed
out, malformed or damaged frame). Callers penalize a peer with
`penalize(addr, seconds, why)`; a penalized peer is skipped until then.

The session is the peers' own: no credentials, no cookies, no proxies from the
environment, so nothing meant for the registry can ever reach a peer.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable

import requests
import urllib3

from rafs.errors import BackendError
from rafs.storage.metrics import SourceCounters

from .protocol import (API_PREFIX, FRAME_SIZE, FrameError, check_frame, normalize_addr,
                       parse_frame)
from .ranges import RangeSet

log = logging.getLogger(__name__)

_READ_PIECE = 256 << 10


class PeerError(BackendError):
    """A peer did not deliver (base class)."""


class PeerMiss(PeerError):
    """The peer does not hold (all of) the range; `held` / `fetching` say what it has."""

    def __init__(self, msg: str, held: RangeSet | None = None, fetching: RangeSet | None = None):
        super().__init__(msg)
        self.held = held or RangeSet()
        self.fetching = fetching or RangeSet()


class PeerBusy(PeerError):
    """The peer's upload slots are full."""


class PeerFailed(PeerError):
    """Refused, reset, timed out, or answered something malformed."""


def _no_auth(r):
    r.headers.pop("Authorization", None)
    return r


class _NoDelayAdapter(requests.adapters.HTTPAdapter):
    """Pooled keep-alive connections with TCP_NODELAY: small requests go out at once instead of
    waiting on Nagle for the last answer's delayed ACK (urllib3's default today; made explicit)."""

    def init_poolmanager(self, *args, **kw):
        kw["socket_options"] = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
        super().init_poolmanager(*args, **kw)


def http_session(pool_size: int = 32) -> requests.Session:
    """A session for peers and the tracker: keep-alive, TCP_NODELAY, no retries, nothing from
    the environment (proxies, netrc)."""
    s = requests.Session()
    s.trust_env = False
    adapter = _NoDelayAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
    s.mount("http://", adapter)
    return s


class PeerClient:
    """Talks to peers; thread-safe; keeps per-peer counters and penalties."""

    def __init__(self, *, connect_timeout: float = 1.0, read_timeout: float = 2.0,
                 min_rate: float = 2 << 20, pool_size: int = 32,
                 clock: Callable[[], float] = time.monotonic):
        if min(connect_timeout, read_timeout, min_rate) <= 0:
            raise ValueError("peer timeouts and min_rate must be > 0")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.min_rate = min_rate
        self._clock = clock
        self._session = http_session(pool_size)   # no proxies / netrc from the environment
        self._session.auth = _no_auth
        self._lock = threading.Lock()
        self._down: dict[str, tuple[float, str]] = {}       # addr -> (until, why)
        self._counters: dict[str, SourceCounters] = {}

    # ------------------------------------------------------------------ health
    def penalize(self, addr: str, seconds: float, why: str) -> None:
        until = self._clock() + seconds
        with self._lock:
            old = self._down.get(addr)
            if old is None or old[0] < until:
                self._down[addr] = (until, why)
        log.warning("peer %s penalized for %.0fs: %s", addr, seconds, why)

    def penalized(self, addr: str) -> bool:
        now = self._clock()
        with self._lock:
            d = self._down.get(addr)
            if d is None:
                return False
            if d[0] <= now:
                del self._down[addr]
                return False
            return True

    def penalized_peers(self) -> set[str]:
        now = self._clock()
        with self._lock:
            return {a for a, (until, _) in self._down.items() if until > now}

    def counters(self, addr: str) -> SourceCounters:
        with self._lock:
            c = self._counters.get(addr)
            if c is None:
                c = self._counters[addr] = SourceCounters()
            return c

    def stats(self) -> dict:
        now = self._clock()
        with self._lock:
            items = list(self._counters.items())
            down = dict(self._down)
        out = {}
        for addr, c in items:
            st = c.snapshot()
            d = down.get(addr)
            st["penalized"] = bool(d and d[0] > now)
            if d and d[0] > now:
                st["penalty_reason"] = d[1]
            out[addr] = st
        return out

    # ------------------------------------------------------------------ requests
    def _url(self, addr: str, path: str) -> str:
        return f"http://{normalize_addr(addr)}{API_PREFIX}{path}"

    def get(self, addr: str, blob_id: str, offset: int, size: int, *, wait: float = 0.0,
            min_size: int | None = None) -> bytes:
        """Framed bytes at `offset` of blob `blob_id` from peer `addr`: exactly `size`, or with
        `min_size` between min_size and size (the peer's longest held prefix)."""
        counters = self.counters(addr)
        try:
            data = self._get(addr, blob_id, offset, size, wait, min_size or size)
        except PeerMiss:
            raise                                 # a miss is not the peer's fault
        except PeerError:
            counters.error()
            raise
        counters.ok(len(data))
        return data

    def _get(self, addr: str, blob_id: str, offset: int, size: int, wait: float,
             need: int) -> bytes:
        what = f"peer {addr}: blob sha256:{blob_id[:12]}… [{offset}, {offset + size})"
        url = self._url(addr, f"/blobs/{blob_id}")
        params = {"offset": offset, "size": size}
        if need < size:
            params["min"] = need
        if wait > 0:
            params["wait"] = f"{wait:.3f}"
        start = self._clock()
        deadline = start + self.connect_timeout + wait + self.read_timeout + size / self.min_rate
        try:
            r = self._session.get(url, params=params, stream=True,
                                  timeout=(self.connect_timeout, wait + self.read_timeout))
        except requests.RequestException as e:
            raise PeerFailed(f"{what}: {type(e).__name__}: {e}") from None
        try:
            if r.status_code == 404:
                try:
                    body = r.json()
                    held = RangeSet.from_json(body.get("held", []))
                    fetching = RangeSet.from_json(body.get("fetching", []))
                except (ValueError, AttributeError):
                    held = fetching = None
                raise PeerMiss(f"{what}: not held", held, fetching)
            if r.status_code == 503:
                raise PeerBusy(f"{what}: busy (upload slots full)")
            if r.status_code != 200:
                raise PeerFailed(f"{what}: HTTP {r.status_code}")
            def read_exact(n: int, buf: bytearray) -> None:
                while len(buf) < n:
                    if self._clock() > deadline:
                        raise PeerFailed(f"{what}: too slow ({len(buf)} of {n} bytes after "
                                         f"{self._clock() - start:.1f}s)")
                    piece = r.raw.read(min(_READ_PIECE, n - len(buf)), decode_content=False)
                    if not piece:
                        raise PeerFailed(f"{what}: connection closed after {len(buf)} of "
                                         f"{n} bytes")
                    buf += piece

            header = bytearray()
            read_exact(FRAME_SIZE, header)
            try:
                off, n, _ = parse_frame(bytes(header))
                if off != offset or not need <= n <= size:
                    raise FrameError(f"frame is for [{off}, {off + n}), asked for [{offset}, "
                                     f"{offset + size}) (at least {need} bytes)")
                body = bytearray()
                read_exact(n, body)
                check_frame(bytes(header), body, offset, n)
            except FrameError as e:
                raise PeerFailed(f"{what}: {e}") from None
            return bytes(body)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
            raise PeerFailed(f"{what}: {type(e).__name__}: {e}") from None
        except OSError as e:                       # urllib3 may leak socket errors
            raise PeerFailed(f"{what}: {e}") from None
        finally:
            r.close()

    def ranges(self, addr: str, blob_id: str) -> tuple[RangeSet, RangeSet]:
        """(held, fetching) of peer `addr` for blob `blob_id`; PeerError if it cannot tell."""
        url = self._url(addr, f"/blobs/{blob_id}/ranges")
        try:
            r = self._session.get(url, timeout=(self.connect_timeout, self.read_timeout))
        except requests.RequestException as e:
            raise PeerFailed(f"peer {addr}: {type(e).__name__}: {e}") from None
        try:
            if r.status_code == 404:
                return RangeSet(), RangeSet()
            if r.status_code != 200:
                raise PeerFailed(f"peer {addr}: HTTP {r.status_code}")
            body = r.json()
            return RangeSet.from_json(body["held"]), RangeSet.from_json(body["fetching"])
        except (ValueError, KeyError, TypeError) as e:
            raise PeerFailed(f"peer {addr}: bad ranges answer: {e}") from None
        finally:
            r.close()

    def close(self) -> None:
        self._session.close()
