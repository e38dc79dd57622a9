"""erofs mode's device files: `/N` is blob N's uncompressed view, read-only, fetched on demand.

The kernel's EROFS mounts the bootstrap with `device=<blobfs>/0,...`; every
data read of the image then arrives here as a (large) read of one of these
files, and goes to `RafsFs.read_blob` -> the blob cache. A chunk that cannot
be fetched or fails verification is EIO to the kernel, which hands EIO to the
reader.

Cached data does not come here (see `MountDaemon._kernel_plan`): a blob whose cache is complete and
verified is mounted with its cache data file as the EROFS device itself, and under a holder
(`rafs.fuseproto`) the chunks of a partial cache are stored into the blob files' page cache at
mount. This libfuse path (no holder) gets the first only.
"""
from __future__ import annotations

import errno
import stat

from .fs import RafsFs
from .fuse import LONG_TIMEOUT, MAX_READ, FuseOSError, _Base, big_reads, translated


class BlobFsOps(_Base):
    """A flat directory of blob views: names "0".."N-1", sizes from the bootstrap's blob table."""

    def __init__(self, fs: RafsFs, mtime_ns: int = 0):
        super().__init__()
        self.fs = fs
        self.count = len(fs.blobs)
        self._t = mtime_ns

    def _index(self, path: str) -> int:
        name = path.lstrip("/")
        if name.isdigit() and str(int(name)) == name and int(name) < self.count:
            return int(name)
        raise FuseOSError(errno.ENOENT)

    def getattr(self, path, fh=None):
        t = self._t
        if path in ("/", None) and fh is None:
            return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2, "st_ino": 1, "st_size": 0,
                    "st_atime": t, "st_mtime": t, "st_ctime": t}
        i = fh if path is None else self._index(path)
        size = self.fs.blobs[i].uncompressed_size
        return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_ino": i + 2, "st_size": size,
                "st_blocks": size // 512, "st_blksize": MAX_READ,
                "st_atime": t, "st_mtime": t, "st_ctime": t}

    def readdir(self, path, fh):
        return [".", ".."] + [str(i) for i in range(self.count)]

    def open(self, path, flags):
        if flags & (0o3 | 0o1000 | 0o2000):       # O_WRONLY|O_RDWR, O_TRUNC, O_APPEND
            raise FuseOSError(errno.EROFS)
        return self._index(path)

    @translated
    def read(self, path, size, offset, fh):
        return self.fs.read_blob(fh, offset, size)

    def release(self, path, fh):
        return 0

    def statfs(self, path):
        return self.fs.statfs()


def blobfs_options(fsname: str, direct_io: bool = False) -> dict:
    """Mount options of the device-file filesystem: read-only, big reads, page cache kept."""
    opts = dict(fsname=fsname, subtype="pynydus-blobs", ro=True, default_permissions=True,
                kernel_cache=True, entry_timeout=LONG_TIMEOUT, attr_timeout=LONG_TIMEOUT,
                **big_reads())
    if direct_io:
        opts["direct_io"] = True
    return opts
