"""The FUSE edge: serve a `RafsFs` through mfusepy; nothing here but translation.

`RafsFuseOps` (fuse mode: the whole tree) and `rafs.blobfs.BlobFsOps` (erofs
mode: one file per blob view) are thin: paths become bytes, `None` from the
core becomes ENOENT, a `RafsError` (a failed fetch, a chunk that failed
verification) becomes EIO — the blob cache has already logged why.
`FuseServer` runs one mount in a background thread, so the daemon's main
thread keeps its signal handlers and can unmount in the right order.

libfuse 3 is preferred (it negotiates up to 1 MiB requests, libfuse 2 stays at
128 KiB); PYNYDUS_FUSE_LIB=fuse (2) or fuse3 chooses, for measurements.
"""
from __future__ import annotations

import ctypes.util
import errno
import functools
import logging
import os
import threading

from .errors import RafsError
from .fs import RafsFs

if "FUSE_LIBRARY_NAME" not in os.environ and "FUSE_LIBRARY_PATH" not in os.environ:
    _want = os.environ.get("PYNYDUS_FUSE_LIB") or ("fuse3" if ctypes.util.find_library("fuse3") else "fuse")
    os.environ["FUSE_LIBRARY_NAME"] = _want

import mfusepy  # noqa: E402  (the library is chosen by the environment at import)
from mfusepy import FuseOSError  # noqa: E402

log = logging.getLogger(__name__)

FUSE_VERSION = (mfusepy.fuse_version_major, mfusepy.fuse_version_minor)
ENOATTR = getattr(errno, "ENOATTR", errno.ENODATA)
LONG_TIMEOUT = 86400.0           # read-only: the kernel may keep entries and attributes a day
MAX_READ = 1 << 20               # largest read request asked for (libfuse 3 + kernel max_pages)


def _b(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _s(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


def translated(fn):
    """Core errors -> errnos: RafsError -> EIO (logged once here, with the operation)."""
    @functools.wraps(fn)
    def wrapper(self, *args):
        try:
            return fn(self, *args)
        except FuseOSError:
            raise
        except RafsError as e:
            log.error("%s%r: %s -> EIO", fn.__name__, args[:1], e)
            raise FuseOSError(errno.EIO) from None
        except OSError as e:
            if e.errno:
                raise FuseOSError(e.errno) from None
            raise FuseOSError(errno.EIO) from None
    return wrapper


class _Base:
    """What both filesystems share: nanosecond times, the init hook, read-only answers."""
    use_ns = True

    def __init__(self) -> None:
        self.initialized = threading.Event()

    def init(self, path) -> None:
        self.initialized.set()

    def destroy(self, path) -> None:
        pass


class RafsFuseOps(_Base):
    """fuse mode: the image's whole tree (read-only) from `fs`."""
    cache_readdir = True

    def __init__(self, fs: RafsFs):
        super().__init__()
        self.fs = fs

    def _nid(self, path: str | None, fh: int | None = None) -> int:
        if path is None:
            if fh is None:
                raise FuseOSError(errno.EBADF)
            return fh
        nid = self.fs.resolve(_b(path))
        if nid is None:
            raise FuseOSError(errno.ENOENT)
        return nid

    @translated
    def getattr(self, path, fh=None):
        return self.fs.stat(self._nid(path, fh))

    @translated
    def opendir(self, path):
        nid = self._nid(path)
        if not self.fs.inode(nid).is_dir():
            raise FuseOSError(errno.ENOTDIR)
        return nid

    @translated
    def readdir(self, path, fh):
        nid = fh if fh else self._nid(path)
        out: list = [".", ".."]
        for name, child, kind in self.fs.readdir(nid):
            out.append((_s(name), {"st_mode": kind, "st_ino": child}, 0))
        return out

    def releasedir(self, path, fh):
        return 0

    @translated
    def open(self, path, flags):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FuseOSError(errno.EROFS)
        nid = self._nid(path)
        if not self.fs.inode(nid).is_reg():
            raise FuseOSError(errno.EISDIR if self.fs.inode(nid).is_dir() else errno.EINVAL)
        return nid

    @translated
    def read(self, path, size, offset, fh):
        return self.fs.read(fh if fh else self._nid(path), offset, size)

    def release(self, path, fh):
        return 0

    @translated
    def readlink(self, path):
        return _s(self.fs.readlink(self._nid(path)))

    @translated
    def listxattr(self, path):
        return [_s(k) for k in self.fs.xattrs(self._nid(path))]

    @translated
    def getxattr(self, path, name, position=0):
        value = self.fs.xattrs(self._nid(path)).get(_b(name))
        if value is None:
            raise FuseOSError(ENOATTR)
        return value

    @translated
    def statfs(self, path):
        return self.fs.statfs()


def fuse_mode_options(fsname: str) -> dict:
    """Mount options of the fuse-mode tree: read-only, cached for long, hardlinks share st_ino."""
    # allow_other: containers run as any uid (root may always set it; others need
    # user_allow_other in /etc/fuse.conf, so they get a mount only they can use)
    return dict(fsname=fsname, subtype="pynydus", ro=True, default_permissions=True,
                allow_other=os.geteuid() == 0, use_ino=True, kernel_cache=True,
                entry_timeout=LONG_TIMEOUT, attr_timeout=LONG_TIMEOUT,
                negative_timeout=LONG_TIMEOUT, **big_reads())


def big_reads() -> dict:
    """Options for large read requests. libfuse 3 negotiates max_pages (1 MiB requests) by itself
    and refuses a max_read its init did not repeat; libfuse 2 takes max_read as a mount option."""
    if FUSE_VERSION[0] >= 3:
        return {}
    return {"max_read": MAX_READ, "max_readahead": MAX_READ}


def _clean_fsname(name: str) -> str:
    # option values are split on ',' and may not hold '=' safely in every libfuse
    return "".join(c if c.isalnum() or c in "._-/:@" else "_" for c in name)[:200] or "pynydus"


class _FUSE(mfusepy.FUSE):
    """mfusepy's FUSE, letting the kernel keep directory listings (FOPEN_CACHE_DIR | KEEP_CACHE)
    of read-only trees: a warm walk then never calls readdir in Python again."""

    def opendir(self, path, fip):
        ret = super().opendir(path, fip)
        if getattr(self.operations, "cache_readdir", False) and FUSE_VERSION >= (3, 5):
            fip.contents.cache_readdir = 1
            fip.contents.keep_cache = 1
        return ret


class FuseServer:
    """One FUSE mount of `ops` at `mountpoint`, served by libfuse's multithreaded loop in a thread.

    `start()` returns once the kernel's INIT reached the filesystem (the mount
    is usable) or raises if mounting failed. The loop ends when the mount goes
    away (`unmount()`, or anybody's umount); `done` is set then.
    """

    def __init__(self, ops, mountpoint: str, options: dict):
        self.ops = ops
        self.mountpoint = os.path.abspath(mountpoint)
        self.options = dict(options)
        if "fsname" in self.options:
            self.options["fsname"] = _clean_fsname(self.options["fsname"])
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> None:
        self._thread = threading.Thread(target=self._serve, name=f"fuse {self.mountpoint}", daemon=True)
        self._thread.start()
        waited = 0.0
        while not self.ops.initialized.wait(0.05):
            waited += 0.05
            if self.done.is_set() or waited > timeout:
                raise RafsError(f"FUSE mount at {self.mountpoint} failed: "
                                f"{self.error or 'no INIT from the kernel in time'}")
        # INIT reached the filesystem; the mount is usable once the reply got through
        parent = os.stat(os.path.dirname(self.mountpoint) or "/").st_dev
        while not self.done.is_set():
            try:
                if os.stat(self.mountpoint).st_dev != parent:
                    return
            except OSError:
                pass
            waited += 0.01
            if waited > timeout:
                break
            self.done.wait(0.01)
        raise RafsError(f"FUSE mount at {self.mountpoint} failed: {self.error or 'the session ended'}")

    def _serve(self) -> None:
        try:
            _FUSE(self.ops, self.mountpoint, foreground=True, nothreads=False, **self.options)
        except BaseException as e:       # a failed mount: reported by start()
            self.error = e
            log.debug("FUSE loop at %s ended: %s", self.mountpoint, e)
        finally:
            self.done.set()

    @property
    def running(self) -> bool:
        return self._thread is not None and not self.done.is_set()

    def join(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)
