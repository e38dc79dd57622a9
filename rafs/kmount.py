"""Mount a bootstrap with the kernel's EROFS (file-backed, Linux >= 6.12), blobs as devices.

mount(8) would attach the image to a loop device, and the kernel only accepts
file `device=` paths when the primary is a file too, so we call mount(2)
directly: source = the image path, data = "device=BLOB1,device=BLOB2".
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import stat
import tempfile
from typing import Iterator, Sequence

from . import osutil
from .erofs import layout as L
from .erofs.writer import write_erofs
from .errors import FormatError
from .tree import ChunkRef, Inode, new_dir

def _path(p) -> bytes:
    return os.fsencode(os.path.abspath(os.fspath(p)))


def mount_erofs(image, devices: Sequence, mountpoint) -> None:
    """Mount `image` (a file) read-only at `mountpoint`, with `devices` as its blob devices in order.

    Raises OSError(errno) with the paths in the message; the kernel log (dmesg)
    says more for EINVAL.
    """
    src, target = _path(image), _path(mountpoint)
    devs = [_path(d) for d in devices]
    for d in devs:
        if b"," in d:  # the option parser splits on commas
            raise OSError(errno.EINVAL, f"device path {os.fsdecode(d)!r} contains ',' and cannot be "
                          "passed as a mount option")
    expected = _device_count(src)
    if expected is not None and expected != len(devs):
        # With no device= at all the kernel would silently read blob blocks from the
        # bootstrap itself ("flat" mode); a wrong count it refuses with a bare EINVAL.
        raise OSError(errno.EINVAL, f"{os.fsdecode(src)} has {expected} blob device(s), "
                      f"{len(devs)} given")
    data = b",".join(b"device=" + d for d in devs)
    try:
        osutil.mount(src, target, "erofs", osutil.MS_RDONLY, data or None)
    except OSError as e:
        err = e.errno
        hint = {errno.ENODEV: " (no erofs in this kernel)",
                errno.ENOTBLK: " (kernel without file-backed EROFS mounts, needs Linux >= 6.12)",
                errno.EPERM: " (needs CAP_SYS_ADMIN)",
                errno.EINVAL: " (see dmesg for the kernel's reason)"}.get(err, "")
        raise OSError(err, f"mount erofs {os.fsdecode(src)} on {os.fsdecode(target)} with "
                      f"{len(devs)} device(s) failed: {os.strerror(err)}{hint}") from None


def _device_count(image: bytes) -> int | None:
    """The image's extra device count, or None if it cannot be read (the kernel will say why)."""
    try:
        with open(image, "rb") as f:
            sb = L.Superblock.unpack(f.read(L.SUPER_OFFSET + L.SUPERBLOCK.size))
    except (OSError, FormatError):
        return None
    return sb.extra_devices if sb.feature_incompat & L.FEATURE_INCOMPAT_DEVICE_TABLE else 0


def umount(mountpoint, lazy: bool = False) -> None:
    """umount2(2); `lazy` detaches now and frees when the last user goes (MNT_DETACH)."""
    target = _path(mountpoint)
    try:
        osutil.umount2(target, osutil.MNT_DETACH if lazy else 0)
    except OSError as e:
        raise OSError(e.errno, f"umount {os.fsdecode(target)} failed: {os.strerror(e.errno)}") from None


@contextlib.contextmanager
def erofs_mounted(image, devices: Sequence, mountpoint) -> Iterator[str]:
    """Mount for the duration of a with-block; unmount after, lazily if still busy."""
    mount_erofs(image, devices, mountpoint)
    try:
        yield os.fspath(mountpoint)
    finally:
        try:
            umount(mountpoint)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            umount(mountpoint, lazy=True)


@functools.lru_cache(maxsize=1)
def erofs_file_backed_supported() -> bool:
    """Whether this process can mount a file-backed EROFS image with a file device.

    Probed once by really doing it (a 2-block image, a 1-block device, one read):
    kernel version, config options, module autoloading and privileges all matter.
    """
    try:
        with tempfile.TemporaryDirectory(prefix="pynydus-erofs-probe-") as tmp:
            root = new_dir()
            root.entries[b"f"] = Inode(stat.S_IFREG | 0o644, size=1, chunks=[ChunkRef(b"", 1, 0, 0)])
            image, dev, mnt = (os.path.join(tmp, n) for n in ("image", "dev", "mnt"))
            with open(image, "wb") as f:
                write_erofs(root, f, chunk_size=4096, devices=[(b"probe", 1)])
            with open(dev, "wb") as f:
                f.write(b"P" + bytes(4095))
            os.mkdir(mnt)
            with erofs_mounted(image, [dev], mnt):
                with open(os.path.join(mnt, "f"), "rb") as f:
                    return f.read() == b"P"
    except OSError:
        return False
