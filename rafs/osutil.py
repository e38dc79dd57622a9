"""The OS layer at the bottom: atomic file replacement, mount(2)/umount2(2) and the mount table.

* `atomic_write` / `atomic_file`: one guarantee everywhere. The data goes to a
  temp file in the target's directory (`.<name>.<pid>-<thread>.tmp`), which is
  fsynced, renamed over the target, and then the directory is fsynced: after a
  crash the target holds the old content or the new, never a mix, and once the
  call returns the new content survives a power cut. On an error the temp file
  is removed and the target is untouched.
* `mount` / `umount2`: the libc calls, raising `OSError` with the errno (and the
  paths in the message) on failure.
* `mountinfo`: /proc/self/mountinfo parsed, every octal escape decoded (the
  kernel escapes space, tab, newline and backslash; any `\\NNN` is decoded),
  non-UTF-8 bytes kept as surrogates (`os.fsdecode`), so a target compares equal
  to `os.path.realpath` of the same path. `is_mountpoint` and `mounts_below`
  build on it.

Nothing here imports from the rest of the project.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import re
import threading
from dataclasses import dataclass
from typing import BinaryIO, Iterator

__all__ = [
    "MS_RDONLY", "MS_REMOUNT", "MS_BIND", "MS_REC", "MNT_DETACH",
    "atomic_file", "atomic_write", "fsync_dir",
    "mount", "umount2",
    "MountEntry", "unescape_mount_field", "parse_mountinfo", "mountinfo", "is_mountpoint", "mounts_below",
]

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MNT_DETACH = 2

MOUNTINFO = "/proc/self/mountinfo"

# --------------------------------------------------------------------------- atomic writes

def fsync_dir(path) -> None:
    """fsync(2) a directory (makes a rename or a create in it durable).

    A file system that cannot fsync directories (EINVAL) is taken as having nothing to flush.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _create_temp(path: str, mode: int) -> tuple[int, str]:
    d, name = os.path.split(path)
    tmp = os.path.join(d, f".{name}.{os.getpid()}-{threading.get_ident()}.tmp")   # unique among live writers
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        return os.open(tmp, flags, mode), tmp
    except FileExistsError:                     # left by a dead process that had our pid and thread id
        os.unlink(tmp)
        return os.open(tmp, flags, mode), tmp


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@contextlib.contextmanager
def atomic_file(path, *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file to fill that replaces `path` when the with-block ends without an exception.

    The file is created with `mode` (less the umask) next to `path`; on a normal
    exit it is flushed, fsynced, renamed over `path` and the directory is fsynced.
    On an exception it is removed and `path` is left as it was.
    """
    path = os.fsdecode(os.fspath(path))
    fd, tmp = _create_temp(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def atomic_write(path, data: bytes | bytearray | memoryview | str, *, mode: int = 0o644) -> None:
    """Replace `path` with `data` (str is written as UTF-8) so that a crash leaves the old or the new
    content, never a mix; durable once this returns (see `atomic_file`)."""
    if isinstance(data, str):
        data = data.encode()
    with atomic_file(path, mode=mode) as f:
        view = memoryview(data)
        while view.nbytes:
            view = view[f.write(view):]


# --------------------------------------------------------------------------- disk use, holes

def tree_usage(root: str | os.PathLike, *, size_without_blocks: bool = False) -> tuple[int, int]:
    """(bytes, inodes) of the tree at `root` as `du -x` counts them: st_blocks * 512, hard links once, never
    crossing into another filesystem. `size_without_blocks`: a file whose filesystem reports no blocks
    counts its size instead (what containerd's Usage does)."""
    size = inodes = 0
    seen: set[int] = set()
    try:
        dev = os.lstat(root).st_dev
    except OSError:
        return 0, 0
    stack = [os.fspath(root)]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_dev != dev or st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
                inodes += 1
                size += st.st_blocks * 512 if st.st_blocks or not size_without_blocks else st.st_size
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return size, inodes


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the bytes [offset, offset+length) of a file (they then read as zeros), keeping its size."""
    if length <= 0:
        return
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# --------------------------------------------------------------------------- mount(2), umount2(2)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def _arg(v) -> bytes | None:
    if v is None:
        return None
    return v if isinstance(v, bytes) else os.fsencode(v)


def mount(source, target, fstype: str | bytes | None, flags: int = 0, data: str | bytes | None = None) -> None:
    """mount(2). An empty or None `fstype` / `data` is passed as NULL (bind mounts, remounts).

    Raises OSError(errno, "mount FSTYPE SOURCE on TARGET (DATA): strerror").
    """
    src = _arg(os.fspath(source)) if source is not None else None
    tgt = _arg(os.fspath(target))
    if _libc.mount(src, tgt, _arg(fstype) or None, flags, _arg(data) or None) != 0:
        err = ctypes.get_errno()
        text = lambda v: os.fsdecode(v) if v else ""                      # noqa: E731
        raise OSError(err, f"mount {text(fstype)} {text(src)} on {text(tgt)} ({text(data)}): "
                           f"{os.strerror(err)}")


def umount2(target, flags: int = 0) -> None:
    """umount2(2); `flags` = MNT_DETACH detaches now and frees when the last user goes.

    Raises OSError(errno, "umount TARGET: strerror") (EINVAL: not a mount point).
    """
    tgt = _arg(os.fspath(target))
    if _libc.umount2(tgt, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {os.fsdecode(tgt)}: {os.strerror(err)}")


# --------------------------------------------------------------------------- the mount table

@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo (proc(5)); paths decoded, everything else as text."""
    mount_id: int
    target: str
    fstype: str
    source: str
    parent_id: int = 0
    devno: str = ""             # "major:minor"
    root: str = ""              # the mounted root within its file system
    options: str = ""           # per-mount options (ro, nosuid, ...)
    super_options: str = ""     # per-superblock options


_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> bytes:
    return _ESCAPE.sub(lambda m: bytes([int(m[1], 8) & 0xFF]), field)


def unescape_mount_field(field: str | bytes) -> str:
    """Decode the kernel's octal escapes (`\\040` ...) in a mountinfo field; bytes that are not
    UTF-8 come back as surrogates, as from `os.fsdecode`."""
    if isinstance(field, str):
        field = os.fsencode(field)
    return os.fsdecode(_unescape(field))


def parse_mountinfo(data: bytes | str) -> list[MountEntry]:
    """Parse the text of a mountinfo file; malformed lines are skipped."""
    if isinstance(data, str):
        data = os.fsencode(data)
    out = []
    for line in data.split(b"\n"):
        parts = line.split(b" ")
        try:
            sep = parts.index(b"-", 6)
            dec = lambda b: b.decode("utf-8", "surrogateescape")          # noqa: E731
            out.append(MountEntry(
                mount_id=int(parts[0]), target=os.fsdecode(_unescape(parts[4])),
                fstype=dec(_unescape(parts[sep + 1])), source=os.fsdecode(_unescape(parts[sep + 2])),
                parent_id=int(parts[1]), devno=dec(parts[2]), root=os.fsdecode(_unescape(parts[3])),
                options=dec(parts[5]), super_options=dec(_unescape(parts[sep + 3])) if len(parts) > sep + 3
                else ""))
        except (ValueError, IndexError):
            continue
    return out


def mountinfo(path: str = MOUNTINFO) -> list[MountEntry]:
    """This mount namespace's mounts, in mount order (parents before what is mounted over them)."""
    with open(path, "rb") as f:
        return parse_mountinfo(f.read())


def _resolved(path) -> str:
    return os.path.realpath(os.fsdecode(os.fspath(path)))


def is_mountpoint(path) -> bool:
    """Whether something is mounted at `path` (symlinks resolved); False if the table cannot be read.

    Unlike os.path.ismount this sees bind mounts within one file system.
    """
    p = _resolved(path)
    try:
        return any(m.target == p for m in mountinfo())
    except OSError:
        return False


def mounts_below(path) -> list[str]:
    """Mount points at or below `path` (symlinks resolved), in mount order: unmount in reverse."""
    p = _resolved(path)
    root = p.rstrip("/") + "/"
    return [m.target for m in mountinfo() if m.target == p or m.target.startswith(root)]


def process_starttime(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart);
    None if there is no such process or it is a zombie (dead, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


@contextlib.contextmanager
def flocked(thread_lock, fd: int) -> Iterator[None]:
    """Hold `thread_lock` (this process's threads) and an exclusive flock on `fd` (other processes)."""
    with thread_lock:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
