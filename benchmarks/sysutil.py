"""Small system helpers for the benchmark suite: commands, mounts, cleanup, page-cache residency.

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
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Iterable, Sequence

log = logging.getLogger(__name__)

PAGE = os.sysconf("SC_PAGE_SIZE")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.posix_fadvise.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value
MNT_DETACH = 2
POSIX_FADV_DONTNEED = 4


class CommandError(RuntimeError):
    def __init__(self, cmd: Sequence[str], rc: int, out: str, err: str):
        self.cmd, self.rc, self.out, self.err = list(cmd), rc, out, err
        tail = (err or out)[-3000:]
        super().__init__(f"{' '.join(map(str, cmd))} failed (rc={rc}):\n{tail}")


def run_root() -> Path:
    """Short per-process state dir under /run (unix socket paths must stay < 108 bytes)."""
    return Path(f"/run/pynydus-bench/{os.getpid()}")


def netns_prefix(netns: str | os.PathLike | None) -> list[str]:
    """`nsenter --net=FILE` in front of a command that must run in the benchmark's network namespace."""
    return ["nsenter", f"--net={netns}"] if netns else []


def run(cmd: Sequence, *, check: bool = True, timeout: float | None = 600, netns=None, env=None,
        cwd=None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run a command to completion, capturing text output; raise CommandError on failure if `check`."""
    full = [*netns_prefix(netns), *map(str, cmd)]
    r = subprocess.run(full, capture_output=True, text=True, errors="replace", timeout=timeout, env=env,
                       cwd=cwd, input=input, stdin=None if input is not None else subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise CommandError(full, r.returncode, r.stdout, r.stderr)
    return r


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

def is_mounted(path: str | os.PathLike) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == target:
                return True
    return False


def mounts_below(path: str | os.PathLike) -> list[str]:
    """Mount points at or below `path` (deepest last in mount order)."""
    root = os.path.realpath(path).rstrip("/") + "/"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if (mp + "/").startswith(root):
                out.append(mp)
    return out


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
    t = os.fsencode(os.path.realpath(target))
    for i in range(retries):
        if _libc.umount2(t, 0) == 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more)
            return
        if err != errno.EBUSY:
            break
        time.sleep(0.1 * (i + 1) if i < 5 else 0.5)
    if _libc.umount2(t, MNT_DETACH) != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        raise OSError(ctypes.get_errno(), f"umount {target}")
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
        if is_mounted(self.mountpoint):
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


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_pid(pid: int, *, expect: str, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Terminate one process we started (by pid), escalating to SIGKILL.

    pids are recycled quickly here (pid_max 32768): a pid read from a file is only signalled while
    its command line still contains `expect` (a path only our process has in its arguments).
    """
    if not expect or expect not in cmdline(pid):
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.05)
    if expect in cmdline(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
