"""The storage backend interface: where blob bytes come from.

A backend answers two questions about a blob, named by its id (the hex
sha256 of the whole blob, i.e. its OCI digest without "sha256:"; the
"sha256:<hex>" form is accepted too):

* `read_range(blob_id, offset, size)`: exactly `size` bytes from `offset`
  of the *compressed* blob as stored, or `BackendError`. Never fewer bytes,
  never a partial answer; a range past the end is an error.
* `read_sparse(blob_id, offset, size, wanted)`: the same, except that only
  the bytes inside `wanted` (the chunks a merged request is for) must be the
  blob's; the rest may be anything. The default is `read_range`; the P2P
  backend fills the rest with zeros instead of fetching bytes nobody reads.
* `blob_size(blob_id)`: the blob's size in bytes (`rafs.errors.NotFound` if absent).

Backends do not verify anything: a range has no digest of its own. The blob
cache checks every chunk against its digest in the bootstrap's chunk table
before serving it, so a backend (a mirror, a peer) may be untrusted.

Implementations subclass `BlobBackend` and provide `_read_range` and
`_blob_size`; the public methods are provided on top: argument checks,
exact-length check, per-source counters, and retry with exponential backoff
(`RetryPolicy`) for backends that do not retry themselves (a backend whose
transport already retries, like the registry client, sets `retry = None`).
Only `TransientBackendError` is retried; everything else is final.

Backends are thread-safe and long-lived; `close()` releases connections and
files, and a backend is a context manager.
"""
from __future__ import annotations

import logging
import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from rafs.errors import BackendError
from rafs.image.digests import normalize_blob_id

from ..metrics import SourceCounters

log = logging.getLogger(__name__)

class TransientBackendError(BackendError):
    """A failure worth another try (I/O hiccup, refused or reset connection, 5xx, timeout)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient failures: `retries` more attempts, sleeping backoff * 2**n (jittered,
    capped at `max_backoff`), never past `deadline` seconds after the first attempt."""
    retries: int = 3
    backoff: float = 0.1
    max_backoff: float = 2.0
    deadline: float = 10.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.max_backoff < 0 or self.deadline <= 0:
            raise ValueError(f"bad retry policy {self!r}: counts and times must be >= 0 "
                             "(deadline > 0)")

    def delay(self, attempt: int) -> float:
        """Sleep before retry number `attempt` (1-based)."""
        base = min(self.backoff * (2 ** (attempt - 1)), self.max_backoff)
        return base * (0.75 + random.random() / 2)


class BlobBackend(ABC):
    """Random access to blobs, by id. Subclasses implement `_read_range` and `_blob_size`."""

    #: Retry policy applied by `read_range` / `blob_size`; None if the transport retries itself.
    retry: RetryPolicy | None = RetryPolicy()

    def __init__(self) -> None:
        self.counters = SourceCounters()
        self._sizes: dict[str, int] = {}       # blobs are content-addressed: sizes never change

    # -- to implement
    @property
    @abstractmethod
    def name(self) -> str:
        """Human-readable source name for errors and stats ("registry HOST/REPO", "localfs DIR")."""

    @abstractmethod
    def _read_range(self, blob_id: str, offset: int, size: int) -> bytes:
        """`size` (> 0) bytes at `offset` of blob `blob_id` (normalised hex).

        Raise NotFound, TransientBackendError (retried) or BackendError. A
        short answer is turned into a BackendError by the caller.
        """

    @abstractmethod
    def _blob_size(self, blob_id: str) -> int:
        """Size of blob `blob_id` (normalised hex); NotFound if the backend lacks it."""

    def close(self) -> None:
        """Release connections / files. Idempotent."""

    # -- provided
    def read_range(self, blob_id: str, offset: int, size: int) -> bytes:
        """Exactly `size` bytes at `offset` of the stored (compressed) blob; BackendError otherwise."""
        hex_id = normalize_blob_id(blob_id)
        if offset < 0 or size < 0:
            raise ValueError(f"bad range: offset {offset}, size {size}")
        if size == 0:
            return b""
        what = f"{self.name}: read {size} bytes at offset {offset} of blob sha256:{hex_id}"

        def attempt() -> bytes:
            data = self._read_range(hex_id, offset, size)
            if len(data) != size:
                raise BackendError(f"{what}: got {len(data)} bytes; the range runs past the end "
                                   "of the blob or the blob is truncated")
            return data

        try:
            data = self._retrying(what, attempt)
        except BackendError:
            self.counters.error()
            raise
        self.counters.ok(size)
        return data

    def read_sparse(self, blob_id: str, offset: int, size: int,
                    wanted: list[tuple[int, int]]) -> bytes:
        """`size` bytes at `offset` of which only those inside `wanted` ((start, end) blob
        ranges, sorted, disjoint, inside the range) must be the blob's; the others may be
        anything (callers never look at them). Default: `read_range`."""
        return self.read_range(blob_id, offset, size)

    def blob_size(self, blob_id: str) -> int:
        """Size in bytes of the stored blob; NotFound if the backend does not have it."""
        hex_id = normalize_blob_id(blob_id)
        size = self._sizes.get(hex_id)
        if size is None:
            size = self._retrying(f"{self.name}: size of blob sha256:{hex_id}",
                                  lambda: self._blob_size(hex_id))
            self._sizes[hex_id] = size
        return size

    def read_from_origin(self, blob_id: str, offset: int, size: int) -> bytes | None:
        """The same bytes again from the authoritative source, bypassing untrusted ones
        (mirrors, peers); None if this backend has no other source to offer.

        The blob cache calls this once when bytes fail verification.
        """
        return None

    def source_stats(self) -> dict:
        """Per-source counters, {source name: {"bytes", "requests", "errors"}}."""
        return {self.name: self.counters.snapshot()}

    def _retrying(self, what: str, fn):
        policy = self.retry
        if policy is None:
            return fn()
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                return fn()
            except TransientBackendError as e:
                attempt += 1
                delay = policy.delay(attempt)
                if attempt > policy.retries or time.monotonic() - start + delay > policy.deadline:
                    raise BackendError(f"{e} (gave up after {attempt} attempts in "
                                       f"{time.monotonic() - start:.1f}s)") from e
                log.debug("%s: %s; retry %d in %.2fs", what, e, attempt, delay)
                time.sleep(delay)

    def __enter__(self) -> "BlobBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
