"""Where a mount's state lives, whether its daemon lives, what is mounted, and unmounting.

* The state directory of a mountpoint: `<run dir>/mounts/<sha256(realpath)[:16]>/` (run
  dir: $PYNYDUS_RUN_DIR or /run/pynydus) with `pid`, `info.json`, `lock`, `api.sock`,
  `image.boot`, `blobs/` and `daemon.log` (`StatePaths`).
* Liveness: `info.json` holds the daemon's pid and start time (`daemon_alive`); the
  daemon also holds an exclusive flock on `lock` for its whole life.
* The mount table (/proc/self/mountinfo), unmounting with a grace period for busy
  mounts (`unmount`), and `clear_stale`: what a daemon killed with SIGKILL left behind
  ("transport endpoint is not connected") is detached, EROFS first, then FUSE.
* `request_umount`: `nydusify umount` and the snapshotter stop a daemon from outside.

The names in `__all__` are this module's API: the daemon (`rafs.daemon`), the launchers
(`rafs.launcher`, `nydusify umount | stats`), the snapshotter and tests import them from here.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

from .errors import RafsError
from .kmount import umount
from .osutil import MountEntry, mountinfo, process_starttime  # noqa: F401  (part of this API)

__all__ = ["DEFAULT_RUN_DIR", "BUSY_GRACE", "MountBusy", "StatePaths", "run_dir", "state_paths", "read_info",
           "process_starttime", "daemon_alive", "MountEntry", "mountinfo", "mounts_at", "erofs_bdis", "is_ours",
           "unmount", "clear_stale", "request_umount",
           "read_holder", "request_upgrade"]

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = "/run/pynydus"
BUSY_GRACE = 3.0               # seconds an unmount retries a busy mount before detaching it lazily


class MountBusy(RafsError):
    """The mountpoint is served by a live daemon already."""


# --------------------------------------------------------------------------- state directory

@dataclass(frozen=True)
class StatePaths:
    dir: str

    @property
    def pid(self) -> str:
        return os.path.join(self.dir, "pid")

    @property
    def info(self) -> str:
        return os.path.join(self.dir, "info.json")

    @property
    def api_sock(self) -> str:
        return os.path.join(self.dir, "api.sock")

    @property
    def image(self) -> str:
        return os.path.join(self.dir, "image.boot")

    @property
    def blobs(self) -> str:
        return os.path.join(self.dir, "blobs")

    @property
    def log(self) -> str:
        return os.path.join(self.dir, "daemon.log")

    @property
    def lock(self) -> str:
        return os.path.join(self.dir, "lock")


def run_dir(override: str | None = None) -> str:
    return override or os.environ.get("PYNYDUS_RUN_DIR") or DEFAULT_RUN_DIR


def state_paths(mountpoint: str, run_dir_override: str | None = None) -> StatePaths:
    """The state directory of `mountpoint` (not created)."""
    key = hashlib.sha256(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:16]
    return StatePaths(os.path.join(run_dir(run_dir_override), "mounts", key))


def read_info(paths: StatePaths) -> dict | None:
    try:
        with open(paths.info, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- processes and mounts

def erofs_bdis() -> set[str]:
    """The backing devices (/sys/class/bdi) of the EROFS mounts now (a new mount's is the one added)."""
    try:
        return {n for n in os.listdir("/sys/class/bdi") if n.startswith("erofs-")}
    except OSError:
        return set()


def daemon_alive(info: dict | None) -> bool:
    """Whether the daemon described by `info` (info.json) is still running."""
    if not info or not isinstance(info.get("pid"), int):
        return False
    st = process_starttime(info["pid"])
    return st is not None and st == info.get("starttime", st)


def mounts_at(path: str) -> list[MountEntry]:
    target = os.path.realpath(path) if os.path.isabs(path) else os.path.abspath(path)
    return [m for m in mountinfo() if m.target == target or m.target == os.path.abspath(path)]


def is_ours(m: MountEntry, paths: StatePaths) -> bool:
    """Whether mount `m` is a pynydus mount (FUSE, or EROFS over the blob files of the state dir `paths`)."""
    return (m.fstype.startswith("fuse.pynydus") or m.fstype == "fuse" and m.source.startswith("pynydus")
            or m.fstype == "erofs" and m.source.startswith(paths.dir + os.sep))


def unmount(path: str, *, grace: float = BUSY_GRACE, fuse: bool = False) -> str:
    """Unmount `path`: retry while busy for `grace` s, then detach lazily. Returns what happened."""
    deadline = time.monotonic() + grace
    while True:
        try:
            umount(path)
            return "unmounted"
        except OSError as e:
            if e.errno == errno.EINVAL:
                return "not mounted"
            if e.errno == errno.ENOENT:
                return "gone"
            if e.errno == errno.EBUSY and time.monotonic() < deadline:
                time.sleep(0.1)
                continue
            if e.errno == errno.EPERM and fuse:
                return _fusermount(path, lazy=False)
            if e.errno != errno.EBUSY:
                raise
        log.warning("%s is busy; detaching it lazily (open files keep it until closed)", path)
        umount(path, lazy=True)
        return "detached"


def _fusermount(path: str, lazy: bool) -> str:
    for exe in ("fusermount3", "fusermount"):
        if shutil.which(exe):
            r = subprocess.run([exe, "-uz" if lazy else "-u", path], capture_output=True, text=True)
            if r.returncode == 0:
                return "unmounted by " + exe
            last = r.stderr.strip()
    raise OSError(errno.EBUSY, f"cannot unmount {path}: {last if 'last' in locals() else 'no fusermount'}")


def clear_stale(mountpoint: str, paths: StatePaths) -> list[str]:
    """Undo what a dead daemon left at `mountpoint` and in its state dir; MountBusy if it lives.

    A daemon killed with SIGKILL leaves its mounts behind ("transport endpoint
    is not connected"): each is detached (umount2 MNT_DETACH, then
    `fusermount -uz`), EROFS first, then the blob FUSE mount.
    """
    info = read_info(paths)
    if daemon_alive(info):
        raise MountBusy(f"{mountpoint} is already mounted by pynydus daemon pid {info['pid']} "
                        f"(nydusify umount {mountpoint})")
    done = []
    for target in (mountpoint, paths.blobs):
        for _ in range(16):                     # stacked mounts: one at a time, top first
            stale = [m for m in mounts_at(target) if is_ours(m, paths)]
            dead = False
            if not stale:
                try:
                    os.stat(target)
                except OSError as e:
                    dead = e.errno == errno.ENOTCONN
            if not stale and not dead:
                break
            what = f"{stale[-1].fstype} at {target}" if stale else f"dead mount at {target}"
            try:
                umount(target, lazy=True)
            except OSError:
                _fusermount(target, lazy=True)
            done.append(f"cleared stale {what}")
            log.warning("cleared a stale %s (its daemon is gone)", what)
    for p in (paths.pid, paths.info, paths.api_sock):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    return done


# --------------------------------------------------------------------------- umount from outside

def request_umount(mountpoint: str, *, timeout: float = 30.0, run_dir_override: str | None = None) -> str:
    """Stop the daemon of `mountpoint` (API, then SIGTERM) and wait; clear a stale mount otherwise."""
    from .api import ApiClient, ApiError
    paths = state_paths(mountpoint, run_dir_override)
    info = read_info(paths)
    if daemon_alive(info):
        pid = info["pid"]
        try:
            ApiClient(paths.api_sock, timeout=5).umount()
        except ApiError:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while daemon_alive(info):
            if time.monotonic() > deadline:
                raise RafsError(f"daemon pid {pid} did not exit within {timeout:.0f} s")
            time.sleep(0.05)
        return f"unmounted {mountpoint} (daemon pid {pid} exited)"
    done = clear_stale(mountpoint, paths)
    if not done:
        raise RafsError(f"{mountpoint} is not mounted by pynydus")
    return "; ".join(done)


# --------------------------------------------------------------------------- holder (failover, hot upgrade)

def read_holder(paths: StatePaths) -> dict | None:
    """`<state>/holder.json` of a mount run under a holder (rafs.holder): its pid, the daemon command."""
    try:
        with open(os.path.join(paths.dir, "holder.json"), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data.get("pid"), int) and process_starttime(data["pid"]) is not None else None


def request_upgrade(mountpoint: str, *, timeout: float = 60.0, run_dir_override: str | None = None) -> str:
    """Hot upgrade: the holder of `mountpoint` starts a new daemon on the connection, the old one hands
    over; returns once the new daemon serves (its API answers)."""
    from .api import ApiClient, ApiError
    paths = state_paths(mountpoint, run_dir_override)
    holder = read_holder(paths)
    if holder is None:
        raise RafsError(f"{mountpoint} has no holder (mounted without one, or not mounted): cannot upgrade "
                        f"in place; remount it")
    before = (read_info(paths) or {}).get("pid")
    os.kill(holder["pid"], signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = read_info(paths)
        if info and info.get("pid") != before and daemon_alive(info) and \
                not (isinstance(before, int) and process_starttime(before) is not None):
            try:
                ApiClient(paths.api_sock, timeout=5).daemon()
                return f"upgraded {mountpoint}: daemon pid {before} -> {info['pid']}"
            except (ApiError, OSError):
                pass
        time.sleep(0.05)
    raise RafsError(f"the upgrade of {mountpoint} did not finish within {timeout:.0f} s (see {paths.log})")
