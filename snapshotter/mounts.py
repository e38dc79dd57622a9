"""Snapshot directories and the mounts that expose them (containerd's overlayfs snapshotter layout).

Disk layout under the snapshotter root::

    ROOT/metadata.db                 SQLite (metastore.py)
    ROOT/snapshots/<id>/fs           the snapshot's files (upperdir of an active one), mode 0755
    ROOT/snapshots/<id>/work         overlay workdir (active snapshots)
    ROOT/snapshots/new-XXXX          a snapshot being created (renamed to <id> when its row commits)
    ROOT/snapshots/rm-<id>           a removed snapshot's dir, deleted right after (or by Cleanup)
    ROOT/rafs/<id>/                  the lazy RAFS mount of bootstrap snapshot <id> (lazy.py)

Keys contain spaces and slashes, so they are never used as file names: dirs
are named by the integer snapshot id.

Mounts returned to containerd (what it mounts is exactly this):
* active, no parent:         bind  fs  [rw, rbind]
* view, no parent:           bind  fs  [ro, rbind]
* view, one lower:           bind  lower  [ro, rbind]
* view, several lowers:      overlay  [lowerdir=l1:l2:...]          (nearest first)
* active with lowers:        overlay  [index=off?, workdir=, upperdir=, lowerdir=l1:...]
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from rafs import osutil

SNAPSHOTS_DIR = "snapshots"
RAFS_DIR = "rafs"
NEW_PREFIX = "new-"
REMOVED_PREFIX = "rm-"


@dataclass
class Mount:
    type: str
    source: str
    options: list[str] = field(default_factory=list)
    target: str = ""

    def to_dict(self) -> dict:
        return {"type": self.type, "source": self.source, "options": list(self.options)}


class Layout:
    """The disk layout of one snapshotter root (all paths in one place)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.snapshots = self.root / SNAPSHOTS_DIR
        self.rafs = self.root / RAFS_DIR

    def ensure(self) -> None:
        for d in (self.root, self.snapshots, self.rafs):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    @property
    def db_path(self) -> Path:
        return self.root / "metadata.db"

    def snapshot_dir(self, sid: int) -> Path:
        return self.snapshots / str(sid)

    def fs(self, sid: int) -> Path:
        return self.snapshots / str(sid) / "fs"

    def work(self, sid: int) -> Path:
        return self.snapshots / str(sid) / "work"

    def rafs_dir(self, sid: int) -> Path:
        return self.rafs / str(sid)

    # -- creation: temp dir + rename ----------------------------------------------------
    def new_snapshot_dir(self, active: bool, owner_of: Path | None = None) -> Path:
        """A filled temp dir (fs/ mode 0755 owned like ``owner_of``, work/ for actives)."""
        tmp = Path(tempfile.mkdtemp(prefix=NEW_PREFIX, dir=self.snapshots))
        try:
            os.mkdir(tmp / "fs", 0o755)
            os.chmod(tmp / "fs", 0o755)        # umask-proof: the suite checks the root's mode
            if active:
                os.mkdir(tmp / "work", 0o711)
            if owner_of is not None:
                st = os.lstat(owner_of)
                os.lchown(tmp / "fs", st.st_uid, st.st_gid)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def publish(self, tmp: Path, sid: int) -> None:
        os.rename(tmp, self.snapshot_dir(sid))

    # -- removal ------------------------------------------------------------------------
    def retire(self, sid: int) -> Path | None:
        """Rename a snapshot's dir out of the way (cheap, inside the transaction)."""
        src = self.snapshot_dir(sid)
        dst = self.snapshots / f"{REMOVED_PREFIX}{sid}"
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            return None
        return dst

    def orphans(self, live_ids: set[int]) -> list[Path]:
        """Dirs under snapshots/ that no snapshot row owns (left by crashes and removals)."""
        out = []
        for entry in os.scandir(self.snapshots):
            name = entry.name
            if name.isdigit() and int(name) in live_ids:
                continue
            out.append(Path(entry.path))
        return out


def remove_dir(path: Path) -> None:
    """rm -rf that copes with read-only dirs and never follows mounts out of ``path``."""
    def onerror(func, p, exc):
        if isinstance(exc, OSError) and exc.errno == errno.EBUSY:
            raise exc
        try:
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
        except OSError:
            pass
    if path.exists() or path.is_symlink():
        shutil.rmtree(path, onerror=onerror)


def dir_usage(path: Path) -> tuple[int, int]:
    """(bytes, inodes) of a directory tree, hard links counted once; never crosses mounts."""
    return osutil.tree_usage(path, size_without_blocks=True)


# -- mount builders -----------------------------------------------------------------------

def overlay_index_off() -> bool:
    """containerd adds index=off when the overlay module has the ``index`` parameter."""
    return os.path.exists("/sys/module/overlay/parameters/index")


def build_mounts(*, active: bool, upper: Path, work: Path | None, lowers: list[Path],
                 index_off: bool = True) -> list[Mount]:
    """The mounts of a snapshot whose own dir is ``upper`` over ``lowers`` (nearest first)."""
    if not lowers:
        return [Mount("bind", str(upper), ["rw" if active else "ro", "rbind"])]
    if not active:
        if len(lowers) == 1:
            return [Mount("bind", str(lowers[0]), ["ro", "rbind"])]
        return [Mount("overlay", "overlay", ["lowerdir=" + ":".join(map(str, lowers))])]
    opts = ["index=off"] if index_off else []
    opts += [f"workdir={work}", f"upperdir={upper}", "lowerdir=" + ":".join(map(str, lowers))]
    return [Mount("overlay", "overlay", opts)]


# -- performing mounts (tests, the Python conformance suite, recovery checks) --------------

def mount_all(mounts: list[Mount], target: str | os.PathLike) -> None:
    """Mount like containerd's mount.All (bind with ro remount; overlay options over a page
    are shortened to paths relative to the lowerdirs' common parent, as containerd does)."""
    target = str(target)
    for m in mounts:
        opts = list(m.options)
        if m.type == "bind":
            flags = osutil.MS_BIND | (osutil.MS_REC if "rbind" in opts else 0)
            osutil.mount(m.source, target, "", flags, None)
            if "ro" in opts:
                osutil.mount("", target, "", osutil.MS_BIND | osutil.MS_RDONLY | osutil.MS_REMOUNT, None)
            continue
        ro = "ro" in opts
        data_opts = [o for o in opts if o not in ("ro", "rw")]
        data = ",".join(data_opts)
        if m.type == "overlay" and len(data) >= os.sysconf("SC_PAGESIZE") - 512:
            _mount_overlay_relative(data_opts, target, ro)
            continue
        osutil.mount(m.source, target, m.type, osutil.MS_RDONLY if ro else 0, data)


def _mount_overlay_relative(opts: list[str], target: str, ro: bool) -> None:
    lower = next(o for o in opts if o.startswith("lowerdir="))[len("lowerdir="):].split(":")
    dirs = [o.split("=", 1)[1] for o in opts if o.startswith(("upperdir=", "workdir="))] + lower
    common = os.path.commonpath(dirs)
    rel = []
    for o in opts:
        k, sep, v = o.partition("=")
        if k in ("upperdir", "workdir"):
            v = os.path.relpath(v, common)
        elif k == "lowerdir":
            v = ":".join(os.path.relpath(p, common) for p in v.split(":"))
        rel.append(k + sep + v)
    cmd = ["mount", "-t", "overlay", "overlay", "-o", ",".join(rel + (["ro"] if ro else [])),
           os.path.abspath(target)]
    r = subprocess.run(cmd, cwd=common, capture_output=True, text=True)
    if r.returncode != 0:
        raise OSError(errno.EINVAL, f"{' '.join(cmd[:5])} ...: {r.stderr.strip()}")


def unmount(target: str | os.PathLike, *, lazy: bool = False) -> None:
    osutil.umount2(target, osutil.MNT_DETACH if lazy else 0)


def unmount_all(target: str | os.PathLike) -> None:
    """Unmount everything stacked on ``target`` (EINVAL = not a mount point: done)."""
    for _ in range(32):
        try:
            unmount(target)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOENT):
                return
            if e.errno == errno.EBUSY:
                unmount(target, lazy=True)
                continue
            raise
