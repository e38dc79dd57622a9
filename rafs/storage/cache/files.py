"""The files of one cached blob and the locks on them (see `blobcache` for how they are shared).

In `cache_dir`, per blob (`<id>` = hex sha256 of the blob):

* `<id>.blob`: the sparse data file, the blob's uncompressed view. Every
  BlobCache holds a *shared* flock on it for its lifetime; at open, under the
  lock file's lock, it first tries an exclusive one: only a process that gets
  it (nobody else uses the blob) may discard the data file, others never
  shrink it.
* `<id>.chunkmap`: which chunks of the data file are ready (`state.ChunkMap`;
  read and replaced by `flush.ReadyState`).
* `<id>.lock`: an empty file whose exclusive flock (`xlock`) serializes, between
  processes, the short steps that must not interleave (opening, and the
  read-merge-replace of `<id>.chunkmap`).

Within one process there is one BlobCache per blob: `CacheFiles.open` claims the
blob and raises `CacheInUse` if it is taken. So does an exclusive lock held by a
process that does not share (an older pynydus).
"""
from __future__ import annotations

import fcntl
import os
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

from rafs.errors import RafsError
from rafs.osutil import flocked

T = TypeVar("T")


class CacheInUse(RafsError):
    """The cache files of a blob cannot be shared: this process already has a BlobCache of the
    blob there, or a process that does not share holds them exclusively."""


class CacheClosed(RafsError):
    """The BlobCache was closed."""


# (st_dev, st_ino) of the data files this process has a BlobCache on: one per blob and process
_open_here: set[tuple[int, int]] = set()
_open_here_lock = threading.Lock()


class CacheFiles:
    """The data, chunkmap and lock files of blob `blob_id` in `cache_dir`, and I/O on the data file.

    Nothing is opened until `open`; `release` closes everything (idempotent).
    """

    def __init__(self, cache_dir: str | os.PathLike, blob_id: str, name: str):
        self.blob_id = blob_id
        self.name = name
        self.dir = os.fspath(cache_dir)
        os.makedirs(self.dir, exist_ok=True)
        self.data_path = os.path.join(self.dir, blob_id + ".blob")
        self.map_path = os.path.join(self.dir, blob_id + ".chunkmap")
        self.lock_path = os.path.join(self.dir, blob_id + ".lock")
        self._fd = self._lock_fd = -1
        self._key: tuple | None = None
        self._xlock_here = threading.Lock()     # flock does not exclude threads sharing one fd

    # ------------------------------------------------------------------ opening
    def open(self, load: Callable[[bool], T]) -> T:
        """Claim the blob for this process, open and flock the files, and return `load(sole)`.

        `load` runs under the cross-process lock once the data file is open; `sole` is
        True if no other process uses it (then `load` may discard it). Afterwards only a
        shared flock is kept, so that others may join. On any error everything is released.
        """
        self._key = self._claim()             # first: one BlobCache per blob in this process
        try:
            self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            with self.xlock():
                self._fd, sole = self._open_data_file()
                loaded = load(sole)
                if sole:                       # keep only a shared lock: others may join now
                    self._flock_shared(self._fd)
            return loaded
        except BaseException:
            self.release()
            raise

    def _claim(self) -> tuple:
        """Register this blob's cache in this process (CacheInUse if taken)."""
        st = os.stat(self.dir)
        key = (st.st_dev, st.st_ino, self.blob_id)
        with _open_here_lock:
            if key in _open_here:
                raise CacheInUse(f"{self.name}: this process already has a blob cache on "
                                 f"{self.data_path}; share it (CacheManager.open) instead of "
                                 "opening a second one")
            _open_here.add(key)
        return key

    def release(self) -> None:
        """Close the files (releasing the flocks) and the in-process claim; idempotent."""
        for attr in ("_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)
        if self._key is not None:
            with _open_here_lock:
                _open_here.discard(self._key)

    @contextmanager
    def xlock(self) -> Iterator[None]:
        """The exclusive cross-process (and cross-thread) lock of this blob's cache files (short steps
        only)."""
        with flocked(self._xlock_here, self._lock_fd):
            yield

    @contextmanager
    def sole_use(self) -> Iterator[bool]:
        """Under `xlock`: yields True, holding the data file exclusively, if no other process uses it
        (then its bytes may be punched out: nobody else serves them); False if others share it.
        Afterwards only the shared flock is kept again."""
        with self.xlock():
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                sole = True
            except BlockingIOError:
                sole = False
            try:
                yield sole
            finally:
                # a failed conversion dropped our shared lock too (flock(2)): take it again either way;
                # nobody opens the blob meanwhile (that happens under xlock)
                self._flock_shared(self._fd)

    def _in_use_by_other(self) -> CacheInUse:
        return CacheInUse(f"{self.name}: cache file {self.data_path} is locked exclusively by "
                          "another process that does not share its cache directory (an older "
                          "pynydus daemon?); give each mount its own --cache-dir")

    def _flock_shared(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._in_use_by_other() from None

    def _open_data_file(self) -> tuple[int, bool]:
        """Open and flock the data file (called under `xlock`): (fd, True if no other user)."""
        fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd, True
            except BlockingIOError:
                pass
            self._flock_shared(fd)           # other processes use it: share it with them
            return fd, False
        except BaseException:
            os.close(fd)
            raise

    # ------------------------------------------------------------------ the data file
    def fileno(self) -> int:
        return self._fd

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def disk_bytes(self) -> int:
        """What the sparse data file really occupies."""
        return os.fstat(self._fd).st_blocks * 512

    def resize(self, size: int, *, discard: bool) -> None:
        """Make the data file `size` bytes; `discard` drops every byte it held first (holes)."""
        if discard:
            os.ftruncate(self._fd, 0)
        os.ftruncate(self._fd, size)

    def pread(self, size: int, offset: int) -> bytes:
        """One pread(2) of the data file (it may return fewer bytes)."""
        return os.pread(self._fd, size, offset)

    def write_at(self, data: bytes, offset: int) -> None:
        """pwrite all of `data` at `offset` (OSError if the disk refuses)."""
        view = memoryview(data)
        while view.nbytes:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def punch(self, offset: int, length: int) -> None:
        """Free [offset, offset+length) of the data file (it reads as zeros; the size stays)."""
        from rafs.osutil import punch_hole
        punch_hole(self._fd, offset, length)

    def sync(self) -> None:
        """fdatasync the data file (before a chunkmap may vouch for its bytes)."""
        os.fdatasync(self._fd)

    # ------------------------------------------------------------------ the chunkmap file
    def map_identity(self) -> tuple | None:
        """What identifies the chunkmap file's current version (None if there is none)."""
        try:
            st = os.stat(self.map_path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)
