"""The payload store: the stored (compressed) bytes of blobs this node fetched, kept to serve peers.

A node's blob cache keeps each chunk's *plain* bytes; a peer needs the bytes
as stored in the blob (compressed chunk payloads) so that the fetcher
can hand them to its own cache exactly as the registry would. So the P2P
layer keeps a sparse copy of every blob it fetched through itself:

* `<dir>/<blob id>.payload`: a sparse file as long as the blob; a unit (a
  chunk payload) is pwritten at its blob offset once it was verified against
  its digest in the bootstrap's chunk table. Never-fetched units, and the
  bytes outside every unit, are holes.

There is no state file: after a restart the data extents of the file
(SEEK_DATA / SEEK_HOLE) say which units *may* be there, and each is verified
again on first use (`node.BlobState`). The file is flock'ed: one node per
directory. Disk cost: the compressed size of what the node fetched (the blob
cache holds the same data uncompressed).

Under a cache size limit (`rafs.storage.cache.evict`: the payload directory lies under the limited
cache root) every unit is written within the budget's room, and units are evicted like cache chunks,
least recently written first: their bytes are punched out (a read of an evicted unit returns None;
`node.BlobState` re-verifies every unit it reads anyway, so a hole is never served).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading

from rafs.errors import RafsError

from .ranges import RangeSet

log = logging.getLogger(__name__)


class StoreInUse(RafsError):
    """Another node holds the payload file of this blob (two nodes on one store directory)."""


class PayloadFile:
    """The sparse payload file of one blob; thread-safe (pread / pwrite only)."""

    def __init__(self, directory: str | os.PathLike, blob_id: str, size: int):
        self.path = os.path.join(os.fspath(directory), blob_id + ".payload")
        self.size = size
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreInUse(f"payload file {self.path} is in use by another peer node") from None
        try:
            if os.fstat(fd).st_size != size:
                if os.fstat(fd).st_size:
                    log.warning("%s has the wrong size; starting it empty", self.path)
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.write_failed = False
        self._budget = None                # the cache size limit covering this file, once looked up
        self._looked_up = False
        self._lock = threading.Lock()
        self._evicted: set[int] = set()    # offsets of units punched out since they were written
        self._unit_length: dict[int, int] = {}   # offset -> length of the units written here

    def data_extents(self) -> RangeSet:
        """Byte ranges of the file that are not holes (where units may have been written)."""
        out = []
        pos = 0
        try:
            while pos < self.size:
                try:
                    start = os.lseek(self._fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:
                        break
                    raise
                end = os.lseek(self._fd, start, os.SEEK_HOLE)
                out.append((start, min(end, self.size)))
                pos = end
        except OSError as e:           # a filesystem without SEEK_DATA: treat all as candidate
            log.debug("%s: SEEK_DATA failed (%s); checking every unit", self.path, e)
            return RangeSet.single(0, self.size)
        return RangeSet(out)

    def read(self, offset: int, size: int) -> bytes | None:
        """The bytes at [offset, offset+size), or None if they cannot be read (or were evicted)."""
        with self._lock:
            if offset in self._evicted:
                return None
        try:
            parts = []
            got = 0
            while got < size:
                b = os.pread(self._fd, size - got, offset + got)
                if not b:
                    return None
                parts.append(b)
                got += len(b)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        except OSError as e:
            log.warning("%s: cannot read [%d, %d): %s", self.path, offset, offset + size, e)
            return None

    def write(self, offset: int, data: bytes) -> bool:
        """Write verified bytes at `offset`; False (logged once) if the disk refuses them, or the
        cache size limit leaves no room."""
        budget = self._budget_now()
        if budget is None:
            return self._write(offset, data)
        from rafs.storage.cache.reader import disk_span
        span = disk_span(offset, len(data))
        with budget.room(span) as ok:
            if not ok or not self._write(offset, data):
                return False
            with self._lock:
                self._evicted.discard(offset)
        budget.present(self, offset, span)
        return True

    def _budget_now(self):
        """The size limit covering this file (looked up once: it is made with the cache manager, after
        the P2P service); what the file held already is registered as least recently used."""
        if not self._looked_up:
            from rafs.storage.cache.evict import budget_covering
            budget = budget_covering(self.path)
            with self._lock:
                if self._looked_up:
                    return self._budget
                self._looked_up, self._budget = True, budget
            if budget is not None:
                budget.register(self)
                for start, end in self.data_extents():
                    budget.present(self, (start, end - start), end - start)
        return self._budget

    def evict(self, key) -> int | None:
        """Punch unit `key` (its offset; or (offset, length) of an extent found at open) out of the file
        (the size limit's eviction); returns the bytes freed."""
        offset, length = key if isinstance(key, tuple) else (key, None)
        with self._lock:
            if self._fd < 0:
                return None
            if length is None:
                length = self._unit_length.get(offset)
                if length is None:
                    return None
            before = os.fstat(self._fd).st_blocks * 512
            self._evicted.add(offset)
            from rafs.osutil import punch_hole
            punch_hole(self._fd, offset, length)
            return max(0, before - os.fstat(self._fd).st_blocks * 512)

    def _write(self, offset: int, data: bytes) -> bool:
        try:
            view = memoryview(data)
            start = offset
            while view.nbytes:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
            with self._lock:
                self._unit_length[start] = len(data)
            return True
        except OSError as e:
            if not self.write_failed:
                self.write_failed = True
                log.warning("%s: cannot write (%s); this node will not serve what it could "
                            "not store", self.path, os.strerror(e.errno) if e.errno else e)
            return False

    def close(self) -> None:
        if self._budget is not None:
            self._budget.unregister(self)
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
