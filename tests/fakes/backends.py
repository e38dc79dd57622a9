"""A wrapper around a real BlobBackend that records every request and can inject faults.

    spy = CountingBackend(LocalFsBackend(d))
    spy.calls                       # [(blob_id, offset, size), ...] of successful-or-not reads
    spy.fail_next(2)                # the next 2 reads raise BackendError (before reaching the inner)
    spy.corrupt(offset)             # flip the byte at this blob offset in every answer covering it
    spy.delay = 0.05                # sleep before every read (to make fetches overlap)
    spy.gate = threading.Event()    # block every read until the event is set

It keeps the inner backend's name, so source stats look like the real thing.
"""
from __future__ import annotations

import threading
import time

from rafs.errors import BackendError
from rafs.storage.backend.base import BlobBackend


class CountingBackend(BlobBackend):
    retry = None

    def __init__(self, inner: BlobBackend):
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[str, int, int]] = []
        self.size_calls = 0
        self.delay = 0.0
        self.gate: threading.Event | None = None
        self._lock = threading.Lock()
        self._fail = 0
        self._fail_exc = BackendError
        self._corrupt: set[int] = set()
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def name(self) -> str:
        return self.inner.name

    # -- fault control
    def fail_next(self, n: int = 1, exc: type[BackendError] = BackendError) -> None:
        with self._lock:
            self._fail, self._fail_exc = n, exc

    def corrupt(self, offset: int) -> None:
        with self._lock:
            self._corrupt.add(offset)

    def heal(self) -> None:
        with self._lock:
            self._fail = 0
            self._corrupt.clear()

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self.size_calls = 0
            self.max_in_flight = self.in_flight

    def data_calls(self, data_end: int) -> list[tuple[str, int, int]]:
        """Calls that read chunk data (start before `data_end`, the TOC offset)."""
        with self._lock:
            return [c for c in self.calls if c[1] < data_end]

    # -- BlobBackend
    def _read_range(self, blob_id: str, offset: int, size: int) -> bytes:
        with self._lock:
            self.calls.append((blob_id, offset, size))
            fail = self._fail > 0
            if fail:
                self._fail -= 1
            corrupt = [o for o in self._corrupt if offset <= o < offset + size]
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                self.gate.wait(30)
            if self.delay:
                time.sleep(self.delay)
            if fail:
                raise self._fail_exc(f"{self.name}: injected failure reading {size} bytes at {offset}")
            data = self.inner.read_range(blob_id, offset, size)
            if corrupt:
                b = bytearray(data)
                for o in corrupt:
                    b[o - offset] ^= 0xFF
                data = bytes(b)
            return data
        finally:
            with self._lock:
                self.in_flight -= 1

    def _blob_size(self, blob_id: str) -> int:
        with self._lock:
            self.size_calls += 1
        return self.inner.blob_size(blob_id)

    def read_from_origin(self, blob_id: str, offset: int, size: int) -> bytes | None:
        return self.inner.read_from_origin(blob_id, offset, size)

    def source_stats(self) -> dict:
        return self.inner.source_stats()

    def close(self) -> None:
        self.inner.close()
