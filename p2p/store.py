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
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os

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
        """The bytes at [offset, offset+size), or None if they cannot be read."""
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
        """Write verified bytes at `offset`; False (logged once) if the disk refuses them."""
        try:
            view = memoryview(data)
            while view.nbytes:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
            return True
        except OSError as e:
            if not self.write_failed:
                self.write_failed = True
                log.warning("%s: cannot write (%s); this node will not serve what it could "
                            "not store", self.path, os.strerror(e.errno) if e.errno else e)
            return False

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
