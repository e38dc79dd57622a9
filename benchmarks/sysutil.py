"""Small system helpers for the benchmark suite: mounts, cleanup, page-cache residency (commands and
processes: testbed.process).

Everything a benchmark sets up (mounts, processes, namespaces, qdiscs) is
registered with a `Cleanup` stack right after it exists, so it is undone in
reverse order on normal exit, on an exception, on Ctrl-C and on SIGTERM/SIGHUP
(turned into SystemExit so `finally` blocks run), and as a last resort from
`atexit`.
"""
from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import signal
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Iterable

from rafs import osutil
from rafs.osutil import is_mountpoint, mounts_below  # noqa: F401  (mounts_below: used through here)
from testbed.process import run

log = logging.getLogger(__name__)

PAGE = os.sysconf("SC_PAGE_SIZE")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.posix_fadvise.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value
POSIX_FADV_DONTNEED = 4


def run_root() -> Path:
    """Short per-process state dir under /run (unix socket paths must stay < 108 bytes)."""
    return Path(f"/run/pynydus-bench/{os.getpid()}")


# --------------------------------------------------------------------------- cleanup

class Cleanup:
    """A LIFO stack of undo actions, run once, whatever happens.

        with Cleanup() as cleanup:
            mount(...); cleanup.push(lambda: umount(...), "umount x")
    """

    def __init__(self) -> None:
        self._stack: list[tuple[Callable[[], None], str]] = []
        self._lock = threading.Lock()
        self._old_handlers: dict[int, object] = {}
        _LIVE.add(self)

    def push(self, fn: Callable[[], None], what: str = "") -> Callable[[], None]:
        with self._lock:
            self._stack.append((fn, what))
        return fn

    def pop_run(self, fn: Callable[[], None]) -> None:
        """Run one registered action now (and forget it)."""
        with self._lock:
            for i in range(len(self._stack) - 1, -1, -1):
                if self._stack[i][0] is fn:
                    del self._stack[i]
                    break
        fn()

    def close(self) -> list[str]:
        errors = []
        while True:
            with self._lock:
                if not self._stack:
                    break
                fn, what = self._stack.pop()
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - keep undoing the rest
                errors.append(f"{what}: {e}")
                log.warning("cleanup %s failed: %s", what, e)
        return errors

    def __enter__(self) -> "Cleanup":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._old_handlers[sig] = signal.signal(sig, _exit_on_signal)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        finally:
            for sig, h in self._old_handlers.items():
                signal.signal(sig, h)
            self._old_handlers.clear()


def _exit_on_signal(signum, frame):  # noqa: ARG001
    print(f"received signal {signum} ({signal.Signals(signum).name}): undoing everything and exiting",
          file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


_LIVE: "weakref.WeakSet[Cleanup]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Last resort: undo whatever a Cleanup still holds when the interpreter exits."""
    for c in list(_LIVE):
        c.close()


# --------------------------------------------------------------------------- mounts

def mount(fstype: str, source: str, target: str | os.PathLike, options: str = "") -> None:
    cmd = ["mount", "-t", fstype]
    if options:
        cmd += ["-o", options]
    run([*cmd, source, str(target)], timeout=60)


def bind_mount(source: str | os.PathLike, target: str | os.PathLike, readonly: bool = False) -> None:
    run(["mount", "--bind", str(source), str(target)], timeout=60)
    if readonly:
        run(["mount", "-o", "remount,bind,ro", str(target)], timeout=60)


def umount(target: str | os.PathLike, *, retries: int = 20) -> None:
    """Unmount `target`; retry EBUSY for a while, then detach lazily.  Not mounted: no-op."""
    t = os.path.realpath(target)
    for i in range(retries):
        try:
            osutil.umount2(t)
            return
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more)
                return
            if e.errno != errno.EBUSY:
                break
        time.sleep(0.1 * (i + 1) if i < 5 else 0.5)
    try:
        osutil.umount2(t, osutil.MNT_DETACH)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOENT):
            raise
    log.warning("%s was busy: detached lazily", target)


def umount_all_below(path: str | os.PathLike) -> None:
    for mp in reversed(mounts_below(path)):
        umount(mp)


class LoopExt4:
    """A fresh ext4 file system in a sparse image file, loop-mounted at `mountpoint`.

    The VM's root disk costs ~1 ms of system time per file created; containerd's
    root and pynydus's cache both live here so neither side pays it.
    """

    def __init__(self, image: str | os.PathLike, mountpoint: str | os.PathLike, size: str = "12G"):
        self.image, self.mountpoint, self.size = Path(image), Path(mountpoint), size

    def create(self, cleanup: Cleanup) -> Path:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if is_mountpoint(self.mountpoint):
            raise RuntimeError(f"{self.mountpoint} is already mounted (another run?)")
        self.image.unlink(missing_ok=True)
        run(["truncate", "-s", self.size, str(self.image)])
        cleanup.push(lambda: self.image.unlink(missing_ok=True), f"rm {self.image}")
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(self.image)])
        run(["mount", "-o", "loop,noatime", str(self.image), str(self.mountpoint)])
        cleanup.push(self.destroy_mount, f"umount {self.mountpoint}")
        return self.mountpoint

    def destroy_mount(self) -> None:
        umount_all_below(self.mountpoint)


# --------------------------------------------------------------------------- page cache

def resident_pages(path: str | os.PathLike) -> tuple[int, list[int]]:
    """(file size, indexes of the file's pages now in the page cache) via mmap + mincore(2)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, []
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            raise OSError(ctypes.get_errno(), f"mmap {path}")
        try:
            n = (size + PAGE - 1) // PAGE
            vec = ctypes.create_string_buffer(n)
            if _libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}")
            raw = vec.raw
        finally:
            _libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
    return size, [i for i, b in enumerate(raw) if b & 1]


def drop_file_cache(paths: Iterable[str | os.PathLike]) -> None:
    """Evict clean pages of these files (POSIX_FADV_DONTNEED); cheaper and more polite than drop_caches."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            _libc.posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_all_caches() -> None:
    """Global drop_caches: affects everyone on the machine, so only on request (--drop-caches)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()
