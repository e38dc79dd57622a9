"""The kernel reading a blob cache's data file directly: seals (verified once) and pins (never punched).

erofs mode mounts a blob whose cache is complete with `device=<cache>/<id>.blob` (the data file IS the
blob's uncompressed view), so the kernel reads it with no daemon in the path and no check per read.
Two rules make that safe:

* **Seal** (`<id>.seal`): the kernel may read a data file only after every chunk of it was verified
  (fetched and checked against its digest, or re-checked with the chunkmap's xxh64 seeded with the
  digest: the cache's own trust rule). The verification is recorded with the data file's identity
  (device, inode, size, mtime and ctime in ns) and a key of the chunks it covered (ci index, view
  offset, size and digest of each); a later mount whose chunks and data file are the same trusts it
  without reading the file again. Any write, punch or truncate of the data file changes its
  mtime/ctime, and so breaks the seal: the next mount verifies again.
* **Pin** (`<id>.kpin/<token>`, one file per mount that reads the data file directly): while a pin is
  live, no process evicts (punches) a chunk of the data file or discards it at open. A pin names the
  mount (mountpoint, image path) and the processes keeping it (the mount daemon and its holder, with
  their start times); it is live while one of them runs or the mount is in this namespace's mount
  table. Dead pins are removed by whoever finds them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from typing import Sequence

from rafs.osutil import atomic_write, process_starttime

log = logging.getLogger(__name__)

SEAL_VERSION = 1
_ENTRY_KEY = struct.Struct("<IQI")


def entries_key(entries: Sequence) -> str:
    """What a seal covers: every chunk's ci index, view offset, size and digest."""
    h = hashlib.sha256()
    for e in entries:
        h.update(_ENTRY_KEY.pack(e.index, e.uncompressed_offset, e.uncompressed_size))
        h.update(e.digest)
    return h.hexdigest()


def file_identity(fd: int) -> list[int]:
    st = os.fstat(fd)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def seal_path(data_path: str) -> str:
    return data_path[:-len(".blob")] + ".seal" if data_path.endswith(".blob") else data_path + ".seal"


def write_seal(data_path: str, fd: int, key: str) -> None:
    """Record that every chunk of `key` in the data file (open as `fd`, fdatasync'd) was verified."""
    atomic_write(seal_path(data_path),
                 json.dumps({"version": SEAL_VERSION, "key": key, "identity": file_identity(fd)}) + "\n",
                 mode=0o644)


def sealed(data_path: str, fd: int, key: str) -> bool:
    """True if a seal vouches for the data file as it is now, for chunks `key`."""
    try:
        with open(seal_path(data_path)) as f:
            seal = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(seal, dict) and seal.get("version") == SEAL_VERSION and seal.get("key") == key \
        and seal.get("identity") == file_identity(fd)


def drop_seal(data_path: str) -> None:
    try:
        os.unlink(seal_path(data_path))
    except FileNotFoundError:
        pass


# filesystems whose files a file-backed EROFS may not sit on without exceeding the kernel's stacking
# limit once an overlay (the container's rootfs) goes on top (FILESYSTEM_MAX_STACK_DEPTH = 2)
STACKED_FS = {b"overlay", b"erofs", b"ecryptfs", b"fuse", b"fuseblk"}


def stackable(path: str) -> bool:
    """True if the filesystem holding `path` is not itself stacked (overlayfs, EROFS, FUSE, ...): an
    EROFS over a file of it, and an overlay over that EROFS, stay within the kernel's stacking limit."""
    try:
        dev = os.stat(path).st_dev
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    want = f"{os.major(dev)}:{os.minor(dev)}".encode()
    for line in reversed(lines):              # the last mount of that device is the one on top
        pre, _, post = line.partition(b" - ")
        fields, tail = pre.split(), post.split()
        if len(fields) >= 3 and fields[2] == want and tail:
            return tail[0].split(b".")[0] not in STACKED_FS
    return False


# --------------------------------------------------------------------------- pins

def pin_dir(data_path: str) -> str:
    return data_path[:-len(".blob")] + ".kpin" if data_path.endswith(".blob") else data_path + ".kpin"


def erofs_mounted_at(mountpoint: str, image: str) -> bool:
    """Is `image` mounted (EROFS) at `mountpoint` in this mount namespace?"""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return True                        # cannot tell: keep the pin
    mp, src = os.fsencode(mountpoint), os.fsencode(image)
    for line in lines:
        pre, _, post = line.partition(b" - ")
        fields, tail = pre.split(), post.split()
        if len(fields) >= 5 and len(tail) >= 2 and tail[0] == b"erofs" \
                and fields[4].replace(b"\\040", b" ") == mp and tail[1].replace(b"\\040", b" ") == src:
            return True
    return False


def add_pin(data_path: str, token: str, *, mountpoint: str, image: str, pids: Sequence[int]) -> str:
    """Pin the data file for the mount `token` (kept by processes `pids`); returns the pin's path."""
    d = pin_dir(data_path)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, token)
    procs = [[p, process_starttime(p)] for p in pids if p]
    atomic_write(path, json.dumps({"mountpoint": mountpoint, "image": image,
                                   "procs": [p for p in procs if p[1] is not None]}) + "\n", mode=0o644)
    return path


def remove_pin(data_path: str, token: str) -> None:
    d = pin_dir(data_path)
    try:
        os.unlink(os.path.join(d, token))
    except FileNotFoundError:
        pass
    try:
        os.rmdir(d)
    except OSError:
        pass


def _live(pin: dict) -> bool:
    for pid, start in pin.get("procs") or []:
        if process_starttime(int(pid)) == start:
            return True
    mp, image = pin.get("mountpoint"), pin.get("image")
    return bool(mp and image) and erofs_mounted_at(mp, image)


def pinned(data_path: str) -> bool:
    """True if some live mount reads the data file directly (dead pins are removed on the way)."""
    d = pin_dir(data_path)
    try:
        names = os.listdir(d)
    except OSError:
        return False
    live = False
    for n in names:
        path = os.path.join(d, n)
        try:
            with open(path) as f:
                pin = json.load(f)
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            try:                           # being written (atomic_write makes that brief)? keep it; torn
                young = time.time() - os.stat(path).st_mtime < 60
            except OSError:
                continue
            if young:
                return True
            pin = None                     # a torn pin long after: dead
        if isinstance(pin, dict) and _live(pin):
            live = True
            continue
        log.info("removing the dead kernel pin %s", path)
        try:
            os.unlink(path)
        except OSError:
            pass
    if not live:
        try:
            os.rmdir(d)
        except OSError:
            pass
    return live
