"""Mirror backend: try mirrors (registry mirrors, HTTP proxies, Dragonfly dfdaemon) first, then the origin.

Reads go to the first mirror that is not penalized; on any `BackendError`
the next one is tried and finally the origin, whose answer (or error) is
final. A mirror that failed is skipped for `penalty` seconds (a short time:
long enough not to pay a refused connection or a 500 on every chunk, short
enough to come back soon after the mirror recovers). A mirror that does not
have a blob (404) is skipped for that blob only, for the same time.

Mirrors are untrusted like every backend: the blob cache verifies each
chunk, and when bytes fail verification it calls `read_from_origin`, which
penalizes the mirror that served them (if this thread's last read of that
range came from one) and reads the origin directly.

`source_stats()` reports bytes / requests / errors per mirror and for the
origin (keys "mirror <name>" and "origin <name>"), so a mount's stats show
how much the mirrors saved.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence

from rafs.errors import BackendError, NotFound

from .base import BlobBackend

log = logging.getLogger(__name__)

DEFAULT_PENALTY = 5.0


class MirrorBackend(BlobBackend):
    """`mirrors` in order of preference, then `origin`. Owns (closes) all of them."""

    retry = None                       # the wrapped backends retry on their own

    def __init__(self, mirrors: Sequence[BlobBackend], origin: BlobBackend, *,
                 penalty: float = DEFAULT_PENALTY, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        if penalty < 0:
            raise ValueError(f"penalty must be >= 0 seconds, got {penalty}")
        self.mirrors = list(mirrors)
        self.origin = origin
        self.penalty = penalty
        self._clock = clock
        self._lock = threading.Lock()
        self._down_until = [0.0] * len(self.mirrors)          # mirror index -> clock time
        self._missing: dict[tuple[int, str], float] = {}      # (mirror, blob) -> clock time
        self._fallbacks = 0                                   # reads the origin served
        self._tls = threading.local()                         # last (blob, offset, size, mirror)

    @property
    def name(self) -> str:
        names = ", ".join(m.name for m in self.mirrors)
        return f"mirrors [{names}] -> {self.origin.name}"

    # -- mirror health
    def _usable(self, i: int, blob_id: str, now: float) -> bool:
        with self._lock:
            if self._down_until[i] > now:
                return False
            until = self._missing.get((i, blob_id))
            if until is not None:
                if until > now:
                    return False
                del self._missing[(i, blob_id)]
            return True

    def _penalize(self, i: int, blob_id: str, e: BackendError) -> None:
        until = self._clock() + self.penalty
        with self._lock:
            if isinstance(e, NotFound):
                self._missing[(i, blob_id)] = until
            else:
                self._down_until[i] = until
        log.warning("mirror %s failed (%s); using the next source, skipping it for %.0fs",
                    self.mirrors[i].name, e, self.penalty)

    def _through(self, blob_id: str, call: Callable[[BlobBackend], object], remember=None):
        now = self._clock()
        for i, m in enumerate(self.mirrors):
            if not self._usable(i, blob_id, now):
                continue
            try:
                result = call(m)
            except BackendError as e:
                self._penalize(i, blob_id, e)
                continue
            self._tls.last = (remember, i) if remember is not None else None
            return result
        with self._lock:
            self._fallbacks += 1
        self._tls.last = None
        return call(self.origin)

    # -- BlobBackend
    def _read_range(self, blob_id: str, offset: int, size: int) -> bytes:
        return self._through(blob_id, lambda b: b.read_range(blob_id, offset, size),
                             remember=(blob_id, offset, size))

    def _blob_size(self, blob_id: str) -> int:
        return self._through(blob_id, lambda b: b.blob_size(blob_id))

    def read_from_origin(self, blob_id: str, offset: int, size: int) -> bytes | None:
        last = getattr(self._tls, "last", None)
        if last is not None:
            (b, o, s), i = last
            if b == blob_id and o <= offset and offset + size <= o + s:
                self._penalize(i, blob_id, BackendError(
                    f"served bytes of blob sha256:{blob_id} that failed verification"))
        self._tls.last = None
        return self.origin.read_range(blob_id, offset, size)

    def source_stats(self) -> dict:
        now = self._clock()
        out = {}
        for i, m in enumerate(self.mirrors):
            for name, st in m.source_stats().items():
                with self._lock:
                    st["penalized"] = self._down_until[i] > now
                out[f"mirror {name}"] = st
        for name, st in self.origin.source_stats().items():
            with self._lock:
                st["fallbacks"] = self._fallbacks
            out[f"origin {name}"] = st
        return out

    def close(self) -> None:
        for b in [*self.mirrors, self.origin]:
            try:
                b.close()
            except Exception as e:              # closing must not hide the others
                log.warning("closing %s: %s", b.name, e)
