"""The FUSE kernel protocol spoken directly over a /dev/fuse fd, for a read-only filesystem.

Why not libfuse: a libfuse session cannot be adopted once initialised, so a daemon that dies takes
its mount with it. Here the /dev/fuse fd is kept by a holder process (`rafs.holder`) and a new daemon
serves the same kernel connection (`adopt=True`: no INIT, the kernel has had its answer) after telling
the kernel to queue again what the dead one had taken (FUSE_NOTIFY_RESEND, Linux >= 6.9).

For that every answer is stateless: node ids are derived from the image (nid; root = 1), file
handles carry nothing a new daemon would not know, and FORGET / RELEASE keep no state.

Served: INIT (fresh connections), LOOKUP, FORGET, BATCH_FORGET, GETATTR, READLINK, OPEN, READ,
RELEASE, OPENDIR, READDIR, RELEASEDIR, STATFS, GETXATTR, LISTXATTR, ACCESS, FLUSH, INTERRUPT,
DESTROY; writes get EROFS and anything else ENOSYS. Sent: FUSE_NOTIFY_RESEND (adoption) and
FUSE_NOTIFY_STORE (`notify_store`: erofs mode puts the blob cache's verified chunks into the kernel's
page cache of the blob files at mount, so reading cached data costs no request).

The filesystems: `TreeInodes` (fuse mode: the image's tree from a `RafsFs`) and `BlobInodes`
(erofs mode: the blob-view files "0".."N-1" that kernel EROFS reads). `FuseConnServer` runs a pool
of worker threads on the fd; `mount_fuse` mount(2)s a FUSE filesystem on a fresh /dev/fuse fd.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import threading

from .errors import RafsError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- protocol constants (linux/fuse.h)
KERNEL_MAJOR, KERNEL_MINOR = 7, 40
ROOT_ID = 1
UNIQUE_RESEND = 1 << 63

LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE = 8, 9, 10, 11, 12, 13, 14, 15, 16
STATFS, RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH = 17, 18, 20, 21, 22, 23, 24, 25
INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, ACCESS, CREATE, INTERRUPT = 26, 27, 28, 29, 30, 34, 35, 36
DESTROY, BATCH_FORGET, FALLOCATE, RENAME2, COPY_FILE_RANGE, TMPFILE = 38, 42, 43, 45, 47, 51
WRITES = {SETATTR, SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, WRITE, SETXATTR, REMOVEXATTR,
          CREATE, FALLOCATE, RENAME2, COPY_FILE_RANGE, TMPFILE, FSYNC, FSYNCDIR}
NO_REPLY = {FORGET, BATCH_FORGET, INTERRUPT}

NOTIFY_STORE, NOTIFY_RESEND = 4, 7

# INIT flags we ask for (those the kernel offers)
ASYNC_READ, BIG_WRITES, ASYNC_DIO, PARALLEL_DIROPS = 1 << 0, 1 << 5, 1 << 15, 1 << 18
MAX_PAGES, CACHE_SYMLINKS = 1 << 22, 1 << 23
WANTED_FLAGS = ASYNC_READ | BIG_WRITES | ASYNC_DIO | PARALLEL_DIROPS | MAX_PAGES | CACHE_SYMLINKS

FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE, FOPEN_CACHE_DIR = 1 << 0, 1 << 1, 1 << 3

IN_HEADER = struct.Struct("<IIQQIIIHH")        # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("<IiQ")             # len error unique
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")      # fuse_attr
ENTRY_HEAD = struct.Struct("<QQQQII")          # nodeid generation entry_valid attr_valid (+nsec)
ATTR_HEAD = struct.Struct("<QII")              # attr_valid attr_valid_nsec dummy
OPEN_OUT = struct.Struct("<QIi")               # fh open_flags backing_id
READ_IN = struct.Struct("<QQI")                # fh offset size
INIT_IN = struct.Struct("<IIII")               # major minor max_readahead flags
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")   # ... max_pages map_alignment flags2 max_stack_depth unused
KSTATFS = struct.Struct("<QQQQQIII4x24x")
DIRENT = struct.Struct("<QQII")                # ino off namelen type
XATTR_IN = struct.Struct("<II")                # size padding
XATTR_OUT = struct.Struct("<II")
ACCESS_IN = struct.Struct("<I")
OPEN_IN = struct.Struct("<I")
NOTIFY_STORE_OUT = struct.Struct("<QQII")      # nodeid offset size padding

MAX_WRITE = 1 << 20
MAX_PAGES_N = 256                              # 1 MiB requests
BUFSIZE = MAX_WRITE + 8192
LONG_TIMEOUT = 86400                           # read-only: entries and attributes kept a day


def _ns(t: int) -> tuple[int, int]:
    return t // 1_000_000_000, t % 1_000_000_000


def pack_attr(st: dict) -> bytes:
    a, an = _ns(int(st.get("st_atime", 0)))
    m, mn = _ns(int(st.get("st_mtime", 0)))
    c, cn = _ns(int(st.get("st_ctime", 0)))
    size = st.get("st_size", 0)
    return ATTR.pack(st.get("st_ino", 0), size, st.get("st_blocks", (size + 511) // 512), a, m, c, an, mn, cn,
                     st["st_mode"], st.get("st_nlink", 1), st.get("st_uid", 0), st.get("st_gid", 0),
                     st.get("st_rdev", 0), st.get("st_blksize", 4096), 0)


# ---------------------------------------------------------------- the filesystems (inode level)

class TreeInodes:
    """fuse mode: the whole tree of `fs` (a RafsFs). Node id 1 is the root; any other nid n is n + 2
    (stable across daemons: derived from the image only)."""
    dir_flags = FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR

    def open_flags(self, node: int) -> int:
        return FOPEN_KEEP_CACHE

    def __init__(self, fs):
        self.fs = fs
        self.root = fs.boot.root_nid

    def nid(self, node: int) -> int:
        return self.root if node == ROOT_ID else node - 2

    def node(self, nid: int) -> int:
        return ROOT_ID if nid == self.root else nid + 2

    def lookup(self, parent: int, name: bytes) -> tuple[int, dict]:
        pnid = self.nid(parent)
        if not self.fs.inode(pnid).is_dir():
            raise OSError(errno.ENOTDIR, "not a directory")
        nid = self.fs.boot.lookup(pnid, name)
        if nid is None:
            raise OSError(errno.ENOENT, "no such entry")
        return self.node(nid), self.fs.stat(nid)

    def getattr(self, node: int) -> dict:
        return self.fs.stat(self.nid(node))

    def readlink(self, node: int) -> bytes:
        return self.fs.readlink(self.nid(node))

    def open(self, node: int) -> None:
        i = self.fs.inode(self.nid(node))
        if not i.is_reg():
            raise OSError(errno.EISDIR if i.is_dir() else errno.EINVAL, "not a regular file")

    def read(self, node: int, offset: int, size: int) -> bytes:
        return self.fs.read(self.nid(node), offset, size)

    def opendir(self, node: int) -> None:
        if not self.fs.inode(self.nid(node)).is_dir():
            raise OSError(errno.ENOTDIR, "not a directory")

    def readdir(self, node: int) -> list[tuple[bytes, int, int]]:
        """[(name, st_ino, mode type bits)] with '.' and '..' first."""
        nid = self.nid(node)
        return [(b".", nid, stat.S_IFDIR), (b"..", nid, stat.S_IFDIR)] + self.fs.readdir(nid)

    def xattrs(self, node: int) -> dict[bytes, bytes]:
        return self.fs.xattrs(self.nid(node))

    def statfs(self) -> dict:
        return self.fs.statfs()


class BlobInodes:
    """erofs mode: a flat directory of blob views, "0".."N-1" (node id i + 2), read-only.

    A blob file is opened with direct I/O (EROFS caches what it reads in its own page cache; a
    second copy in the blob file's would be waste), except the blobs in `cached` (indexes): those
    are opened through the page cache and kept (FOPEN_KEEP_CACHE), so that the chunks the daemon
    stores there at mount (`FuseConnServer.notify_store`: the blob cache's verified chunks) are
    read by the kernel without a request. The erofs mount opens each blob file once, at mount."""
    dir_flags = 0

    def __init__(self, fs, mtime_ns: int = 0, cached=()):
        self.fs = fs
        self.count = len(fs.blobs)
        self.t = mtime_ns
        self.cached = set(cached)

    def open_flags(self, node: int) -> int:
        return FOPEN_KEEP_CACHE if node - 2 in self.cached else FOPEN_DIRECT_IO

    def _index(self, node: int) -> int:
        i = node - 2
        if not 0 <= i < self.count:
            raise OSError(errno.ENOENT, "no such blob")
        return i

    def lookup(self, parent: int, name: bytes) -> tuple[int, dict]:
        if parent != ROOT_ID:
            raise OSError(errno.ENOTDIR, "not a directory")
        if not (name.isdigit() and str(int(name)).encode() == name and int(name) < self.count):
            raise OSError(errno.ENOENT, "no such blob")
        node = int(name) + 2
        return node, self.getattr(node)

    def getattr(self, node: int) -> dict:
        t = self.t
        if node == ROOT_ID:
            return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, "st_ino": 1, "st_size": 0,
                    "st_atime": t, "st_mtime": t, "st_ctime": t}
        size = self.fs.blobs[self._index(node)].uncompressed_size
        return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_ino": node, "st_size": size,
                "st_blocks": size // 512, "st_blksize": 1 << 20, "st_atime": t, "st_mtime": t, "st_ctime": t}

    def readlink(self, node: int) -> bytes:
        raise OSError(errno.EINVAL, "not a symlink")

    def open(self, node: int) -> None:
        if node == ROOT_ID:
            raise OSError(errno.EISDIR, "a directory")
        self._index(node)

    def read(self, node: int, offset: int, size: int) -> bytes:
        return self.fs.read_blob(self._index(node), offset, size)

    def opendir(self, node: int) -> None:
        if node != ROOT_ID:
            raise OSError(errno.ENOTDIR, "not a directory")

    def readdir(self, node: int) -> list[tuple[bytes, int, int]]:
        return [(b".", 1, stat.S_IFDIR), (b"..", 1, stat.S_IFDIR)] + \
            [(str(i).encode(), i + 2, stat.S_IFREG) for i in range(self.count)]

    def xattrs(self, node: int) -> dict[bytes, bytes]:
        return {}

    def statfs(self) -> dict:
        return self.fs.statfs()


# ---------------------------------------------------------------- mounting

def open_dev_fuse() -> int:
    """A fresh /dev/fuse fd (inheritable: it is handed to daemons)."""
    fd = os.open("/dev/fuse", os.O_RDWR)
    os.set_inheritable(fd, True)
    return fd


def mount_fuse(fd: int, mountpoint: str, fsname: str, subtype: str) -> None:
    """mount(2) a read-only FUSE filesystem served over `fd` at `mountpoint` (root only)."""
    from .osutil import MS_RDONLY, mount
    ms_nosuid, ms_nodev = 2, 4
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
    name = "".join(c if c.isalnum() or c in "._-/:@" else "_" for c in fsname)[:200] or "pynydus"
    mount(name, mountpoint, f"fuse.{subtype}", MS_RDONLY | ms_nosuid | ms_nodev, opts)


# ---------------------------------------------------------------- the server

class FuseConnServer:
    """Serve `inodes` over the FUSE connection of `fd` with `threads` workers.

    Fresh (`adopt=False`): the first request is INIT, answered here; `start()` waits for it (the
    caller mounts after constructing, before `start()` — or passes `mount` to do it in between).
    Adopted: the workers start reading, then FUSE_NOTIFY_RESEND asks the kernel to queue again what
    a dead daemon had read and not answered. `done` is set once the connection is gone (unmounted
    or aborted); `mountpoint` is where it is mounted (for unmounting)."""

    def __init__(self, inodes, fd: int, mountpoint: str, *, adopt: bool = False, threads: int = 8):
        self.inodes = inodes
        self.fd = fd
        self.mountpoint = os.path.abspath(mountpoint)
        self.adopt = adopt
        self.threads = threads
        self.initialized = threading.Event()
        self.done = threading.Event()
        self.draining = False            # handover: requests read from now on are left to the next daemon
        self.error: BaseException | None = None
        self._workers: list[threading.Thread] = []
        self._alive = 0
        self._busy = 0
        self._lock = threading.Lock()
        self.proto_minor = KERNEL_MINOR
        if adopt:
            self.initialized.set()

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30.0, mount=None) -> None:
        """Start the workers; `mount()` (fresh connections) runs once they read; returns once the
        connection is initialised (fresh) or the RESEND was sent (adopted)."""
        self._alive = self.threads
        for n in range(self.threads):
            t = threading.Thread(target=self._work, name=f"fuse{n} {self.mountpoint}", daemon=True)
            t.start()
            self._workers.append(t)
        if self.adopt:
            self.resend()
            return
        if mount is not None:
            try:
                mount()
            except BaseException as e:
                self.error = e
                raise
        if not self.initialized.wait(timeout) or self.done.is_set() and not self.initialized.is_set():
            raise RafsError(f"FUSE mount at {self.mountpoint} failed: {self.error or 'no INIT from the kernel'}")

    def resend(self) -> bool:
        """FUSE_NOTIFY_RESEND: requests read by a daemon that is gone come again (unique | 1<<63)."""
        try:
            os.write(self.fd, OUT_HEADER.pack(OUT_HEADER.size, NOTIFY_RESEND, 0))
            return True
        except OSError as e:
            log.warning("FUSE_NOTIFY_RESEND failed (%s): requests a dead daemon held may hang", e)
            return False

    def notify_store(self, node: int, offset: int, data) -> None:
        """FUSE_NOTIFY_STORE: put `data` into the kernel's page cache of `node` at `offset` (the
        kernel then reads those pages without asking). Only for files opened without direct I/O
        and kept cached; OSError if the kernel refuses (ENOENT: it does not know the node)."""
        view = memoryview(data)
        while view.nbytes:
            part = view[:MAX_WRITE]
            n = part.nbytes
            os.writev(self.fd, [OUT_HEADER.pack(OUT_HEADER.size + NOTIFY_STORE_OUT.size + n, NOTIFY_STORE, 0),
                                NOTIFY_STORE_OUT.pack(node, offset, n, 0), part])
            view, offset = view[n:], offset + n

    @property
    def running(self) -> bool:
        return bool(self._workers) and not self.done.is_set()

    def join(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def drain(self, timeout: float = 10.0) -> bool:
        """Handover: stop answering new requests (the next daemon gets them by RESEND) and wait for
        the ones being answered."""
        import time
        self.draining = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._busy == 0:
                    return True
            time.sleep(0.005)
        return False

    # ------------------------------------------------------------ the loop
    def _work(self) -> None:
        buf = bytearray(BUFSIZE)
        view = memoryview(buf)
        try:
            while True:
                try:
                    n = os.readv(self.fd, [buf])
                except InterruptedError:
                    continue
                except OSError as e:
                    if e.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):   # ENOENT: interrupted before read
                        continue
                    if e.errno != errno.ENODEV:
                        log.error("reading /dev/fuse: %s", e)
                        self.error = e
                    return                                           # ENODEV: unmounted / aborted
                if n < IN_HEADER.size or self.draining:
                    continue
                with self._lock:
                    self._busy += 1
                try:
                    if not self.draining:
                        self._handle(view[:n])
                finally:
                    with self._lock:
                        self._busy -= 1
        finally:
            with self._lock:
                self._alive -= 1
                last = self._alive == 0
            if last:
                self.done.set()

    def _reply(self, unique: int, data: bytes | list = b"", error: int = 0) -> None:
        parts = data if isinstance(data, list) else ([data] if data else [])
        size = OUT_HEADER.size + sum(len(p) for p in parts)
        try:
            os.writev(self.fd, [OUT_HEADER.pack(size, -error, unique), *parts])
        except OSError as e:
            # ENOENT: the request was interrupted, or answered already (resent); ENODEV: gone
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("answering FUSE request %#x: %s", unique, e)

    def _handle(self, req: memoryview) -> None:
        _, opcode, unique, node, _uid, _gid, _pid, _ext, _ = IN_HEADER.unpack_from(req)
        arg = req[IN_HEADER.size:]
        if opcode in NO_REPLY:
            return
        try:
            data = self._dispatch(opcode, node, arg)
        except OSError as e:
            err = e.errno or errno.EIO
            if err not in (errno.ENOENT, errno.ENODATA, errno.ENOSYS, errno.ERANGE):
                log.debug("FUSE op %d node %d: %s", opcode, node, e)
            self._reply(unique, error=err)
            return
        except RafsError as e:          # a failed fetch or a chunk that failed verification: EIO
            log.error("FUSE op %d node %d: %s -> EIO", opcode, node, e)
            self._reply(unique, error=errno.EIO)
            return
        except Exception as e:          # a bug: EIO, never a hang
            log.exception("FUSE op %d node %d: %s -> EIO", opcode, node, e)
            self._reply(unique, error=errno.EIO)
            return
        self._reply(unique, data)

    def _entry(self, node: int, st: dict) -> bytes:
        return ENTRY_HEAD.pack(node, 0, LONG_TIMEOUT, LONG_TIMEOUT, 0, 0) + pack_attr(st)

    def _dispatch(self, opcode: int, node: int, arg: memoryview):
        fs = self.inodes
        if opcode == READ:
            _fh, offset, size = READ_IN.unpack_from(arg)
            return fs.read(node, offset, size)
        if opcode == LOOKUP:
            name = bytes(arg).split(b"\0", 1)[0]
            child, st = fs.lookup(node, name)
            return self._entry(child, st)
        if opcode == GETATTR:
            return ATTR_HEAD.pack(LONG_TIMEOUT, 0, 0) + pack_attr(fs.getattr(node))
        if opcode == OPEN:
            (flags,) = OPEN_IN.unpack_from(arg)
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
                raise OSError(errno.EROFS, "read-only")
            fs.open(node)
            return OPEN_OUT.pack(node, fs.open_flags(node), 0)
        if opcode == OPENDIR:
            fs.opendir(node)
            return OPEN_OUT.pack(node, fs.dir_flags, 0)
        if opcode == READDIR:
            _fh, offset, size = READ_IN.unpack_from(arg)
            return self._readdir(fs.readdir(node), offset, size)
        if opcode in (RELEASE, RELEASEDIR, FLUSH):
            return b""
        if opcode == READLINK:
            return fs.readlink(node)
        if opcode == STATFS:
            s = fs.statfs()
            return KSTATFS.pack(s["f_blocks"], s["f_bfree"], s["f_bavail"], s["f_files"], s["f_ffree"],
                                s["f_bsize"], s["f_namemax"], s["f_frsize"])
        if opcode == GETXATTR:
            (size, _) = XATTR_IN.unpack_from(arg)
            name = bytes(arg[XATTR_IN.size:]).split(b"\0", 1)[0]
            value = fs.xattrs(node).get(name)
            if value is None:
                raise OSError(errno.ENODATA, "no such attribute")
            return self._sized(value, size)
        if opcode == LISTXATTR:
            (size, _) = XATTR_IN.unpack_from(arg)
            return self._sized(b"".join(k + b"\0" for k in fs.xattrs(node)), size)
        if opcode == ACCESS:
            (mask,) = ACCESS_IN.unpack_from(arg)
            if mask & os.W_OK:
                raise OSError(errno.EROFS, "read-only")
            fs.getattr(node)
            return b""
        if opcode == INIT:
            return self._init(arg)
        if opcode == DESTROY:
            return b""
        if opcode in WRITES:
            raise OSError(errno.EROFS, "read-only")
        raise OSError(errno.ENOSYS, "not implemented")

    @staticmethod
    def _sized(value: bytes, size: int) -> bytes:
        if size == 0:
            return XATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        return value

    @staticmethod
    def _readdir(entries, offset: int, size: int) -> bytes:
        out = []
        used = 0
        for i in range(offset, len(entries)):
            name, ino, mode = entries[i]
            rec = DIRENT.pack(ino, i + 1, len(name), (mode & 0o170000) >> 12) + name
            rec += b"\0" * (-len(rec) % 8)
            if used + len(rec) > size:
                break
            out.append(rec)
            used += len(rec)
        return b"".join(out)

    def _init(self, arg: memoryview) -> bytes:
        major, minor, max_readahead, flags = INIT_IN.unpack_from(arg)
        if major != KERNEL_MAJOR:
            raise OSError(errno.EPROTO, f"FUSE protocol {major}.{minor} is not ours")
        self.proto_minor = min(minor, KERNEL_MINOR)
        out = INIT_OUT.pack(KERNEL_MAJOR, KERNEL_MINOR, max_readahead, flags & WANTED_FLAGS, 16, 12,
                            MAX_WRITE, 1, MAX_PAGES_N, 0, 0, 0)
        self.initialized.set()
        return out
