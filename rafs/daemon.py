"""The mount daemon: one lazily fetched RAFS image mounted at one mountpoint, from start to unmount.

Modes (`choose_mode`):

* **erofs**: the kernel mounts the bootstrap (saved as `<state>/image.boot`)
  as file-backed EROFS with `device=<state>/blobs/N`, files of a small FUSE
  filesystem (`rafs.blobfs`) serving each blob's uncompressed view. Metadata
  runs in the kernel; Python only sees blob reads. Needs Linux >= 6.12 and
  root; probed at run time by really mounting a tiny image.
* **fuse**: a FUSE filesystem (`rafs.fuse`) serves the whole tree.
* **auto**: erofs when the probe succeeds (and the real mount works), else fuse.

State lives in a per-mountpoint directory, `<run dir>/mounts/<sha256(realpath)[:16]>/`
(run dir: $PYNYDUS_RUN_DIR or /run/pynydus): `pid`, `info.json`, `api.sock`
(`rafs.api`), `image.boot` and `blobs/` (erofs mode), `daemon.log` (--daemon).

Lifecycle: `MountDaemon.start()` clears a stale mount left by a killed daemon
(lazy umount2, then `fusermount -uz`), mounts, starts the API and the
background prefetch, and returns once the mount is usable; `run()` blocks
until SIGTERM / SIGINT / SIGHUP, an API umount request, or someone else
unmounting it; `stop()` unmounts the EROFS mount first, then the FUSE mount,
and closes the cache (its state is flushed, so the next mount starts warm).

Signal handlers are installed (main thread only) *before* libfuse starts:
libfuse then leaves them alone, and the unmount order stays ours.

Every entry point runs it through `rafs.launcher` (spawn, caches, start, report, run); the state
directory and the mount table are `rafs.mounttab`'s.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import select
import signal
import threading
import time
from dataclasses import dataclass, field

from .bootstrap import Bootstrap
from .errors import RafsError
from .fs import RafsFs
from .kmount import erofs_file_backed_supported, mount_erofs
from .mounttab import (MountBusy, clear_stale, erofs_bdis, is_ours, mountinfo, mounts_at, process_starttime,
                       read_info, state_paths, unmount)
from .osutil import atomic_write

log = logging.getLogger(__name__)

MODES = ("auto", "fuse", "erofs")


# --------------------------------------------------------------------------- mode

def choose_mode(requested: str) -> tuple[str, str]:
    """(mode, why) for `requested` in MODES; RafsError if it cannot work here."""
    if requested not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {requested!r}")
    if not os.path.exists("/dev/fuse"):
        raise RafsError("/dev/fuse is missing: both mount modes need FUSE (modprobe fuse)")
    if requested == "fuse":
        return "fuse", "requested"
    if erofs_file_backed_supported():
        return "erofs", "requested" if requested == "erofs" else "the kernel mounts file-backed EROFS"
    if requested == "erofs":
        raise RafsError("erofs mode needs root and a kernel with file-backed EROFS mounts (Linux >= 6.12, "
                        "CONFIG_EROFS_FS_BACKED_BY_FILE); use --mode fuse")
    return "fuse", "no file-backed EROFS mounts here (needs Linux >= 6.12 and root)"


# --------------------------------------------------------------------------- the daemon

@dataclass
class MountConfig:
    mountpoint: str
    mode: str = "auto"
    prefetch_all: bool = False
    run_dir: str | None = None
    pid_file: str | None = None
    read_ahead_kb: int | None = 1024    # kernel readahead of the mount (None: the kernel's default)
    description: dict = field(default_factory=dict)     # ref, cache dir, backend (shown by stats)


class MountDaemon:
    """Mounts `bootstrap` (raw bytes) at `cfg.mountpoint`, reading blobs through `caches`
    (a CacheManager, owned and closed by the daemon)."""

    def __init__(self, bootstrap: bytes, caches, cfg: MountConfig):
        self.raw = bootstrap
        self.boot = Bootstrap.from_bytes(bootstrap)
        self.caches = caches
        self.cfg = cfg
        self.mountpoint = os.path.abspath(cfg.mountpoint)
        self.paths = state_paths(self.mountpoint, cfg.run_dir)
        self.fs = RafsFs(self.boot, caches)
        self.mode: str | None = None
        self.mode_reason = ""
        self.started = time.time()
        self.stop_reason: str | None = None
        self._fuse = None              # FuseServer: the tree (fuse) or the blob files (erofs)
        self._kernel_mounted = False
        self._mount_id: int | None = None
        self._api = None
        self._stopped = False
        self._owns_state = False       # set once the state dir is ours (no live daemon holds it)
        self._stop_lock = threading.Lock()
        self._lock_fd: int | None = None  # flock on <state>/lock, held while this daemon lives
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._prefetch_thread: threading.Thread | None = None
        self.prefetch_state = "none"

    # ------------------------------------------------------------------ start
    def start(self) -> str:
        """Mount and serve; returns the mode once the mount is usable."""
        self._install_signal_handlers()
        if not os.path.isdir(self.mountpoint):
            try:
                os.stat(self.mountpoint)
            except OSError as e:
                if e.errno != errno.ENOTCONN:
                    raise RafsError(f"mountpoint {self.mountpoint}: {e.strerror}") from None
        try:
            os.makedirs(self.paths.dir, mode=0o700, exist_ok=True)
            self._take_lock()
            for line in clear_stale(self.mountpoint, self.paths):
                print(f"{self.mountpoint}: {line}", flush=True)
            self._owns_state = True
            self._write_info()
            atomic_write(self.paths.pid, f"{os.getpid()}\n")
            mode, why = choose_mode(self.cfg.mode)
            if mode == "erofs":
                try:
                    self._mount_erofs()
                except (OSError, RafsError) as e:
                    if self.cfg.mode == "erofs":
                        raise
                    log.warning("erofs mode failed (%s); falling back to fuse mode", e)
                    self._teardown_mounts()
                    mode, why = "fuse", f"erofs mount failed: {e}"
            if mode == "fuse":
                self._mount_fuse()
            self.mode, self.mode_reason = mode, why
            self._mount_id = self._find_mount_id()
            self._write_info()
            self._start_api()
            self._start_prefetch()
            if self.cfg.pid_file:
                atomic_write(self.cfg.pid_file, f"{os.getpid()}\n")
        except BaseException:
            self.stop()
            raise
        return mode

    def _take_lock(self) -> None:
        """One daemon per mountpoint: an exclusive flock the kernel drops when we die, even by SIGKILL."""
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            info = read_info(self.paths) or {}
            raise MountBusy(f"{self.mountpoint} is already mounted by pynydus daemon pid "
                            f"{info.get('pid', '?')} (nydusify umount {self.mountpoint})") from None
        self._lock_fd = fd

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.request_stop(signal.Signals(signum).name)

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def _fsname(self) -> str:
        ref = self.cfg.description.get("ref") or "image"
        return f"pynydus:{ref}"

    def _mount_fuse(self) -> None:
        from .fuse import FuseServer, RafsFuseOps, fuse_mode_options
        self._fuse = FuseServer(RafsFuseOps(self.fs), self.mountpoint, fuse_mode_options(self._fsname()))
        self._fuse.start()
        dev = os.stat(self.mountpoint).st_dev
        self._set_read_ahead(f"{os.major(dev)}:{os.minor(dev)}")

    def _set_read_ahead(self, bdi: str) -> None:
        if not self.cfg.read_ahead_kb:
            return
        try:
            with open(f"/sys/class/bdi/{bdi}/read_ahead_kb", "w") as f:
                f.write(str(self.cfg.read_ahead_kb))
        except OSError as e:
            log.debug("cannot set the readahead of bdi %s: %s", bdi, e)

    def _mount_erofs(self) -> None:
        from .blobfs import BlobFsOps, blobfs_options
        from .fuse import FuseServer
        atomic_write(self.paths.image, self.raw, mode=0o600)
        os.makedirs(self.paths.blobs, mode=0o700, exist_ok=True)
        self._fuse = FuseServer(BlobFsOps(self.fs, int(self.started * 1e9)), self.paths.blobs,
                                blobfs_options(self._fsname(), direct_io=True))
        self._fuse.start()
        devices = [os.path.join(self.paths.blobs, str(i)) for i in range(len(self.boot.meta.blobs))]
        before = erofs_bdis()
        mount_erofs(self.paths.image, devices, self.mountpoint)
        self._kernel_mounted = True
        new = erofs_bdis() - before
        if len(new) == 1:          # EROFS's own readahead sizes the (direct) reads Python sees
            self._set_read_ahead(new.pop())

    def _find_mount_id(self) -> int | None:
        found = [m for m in mounts_at(self.mountpoint) if is_ours(m, self.paths)]
        return found[-1].mount_id if found else None

    def _start_api(self) -> None:
        from .api import ApiServer

        def umount_route():
            self.request_stop("API umount request")
            return 202, {"status": "unmounting"}

        self._api = ApiServer(self.paths.api_sock, {
            ("GET", "/daemon"): lambda: (200, self.describe()),
            ("GET", "/stats"): lambda: (200, self.stats()),
            ("POST", "/umount"): umount_route,
        }).start()

    def _start_prefetch(self) -> None:
        entries = list(self.boot.meta.prefetch)
        if not entries and not self.cfg.prefetch_all:
            return

        def work():
            try:
                self.prefetch_state = "running"
                futures = self.fs.prefetch(entries) if entries else []
                if self.cfg.prefetch_all:
                    futures += self.fs.prefetch_all()
                for f in futures:
                    try:
                        f.result()
                    except Exception as e:              # logged by the cache; keep the rest going
                        log.debug("prefetch: %s", e)
                self.prefetch_state = "done"
            except Exception as e:
                self.prefetch_state = f"failed: {e}"
                if not self._stopped:
                    log.warning("prefetch failed: %s", e)

        self._prefetch_thread = threading.Thread(target=work, name="prefetch", daemon=True)
        self._prefetch_thread.start()

    # ------------------------------------------------------------------ reporting
    def describe(self) -> dict:
        return {
            "pid": os.getpid(), "mode": self.mode, "mode_reason": self.mode_reason,
            "mountpoint": self.mountpoint, "state_dir": self.paths.dir,
            "uptime_s": round(time.time() - self.started, 3), "started": self.started,
            "state": "stopping" if self.stop_reason else ("running" if self.mode else "starting"),
            "prefetch": self.prefetch_state, "prefetch_files": len(self.boot.meta.prefetch),
            "blobs": len(self.boot.meta.blobs), **self.cfg.description,
        }

    def stats(self) -> dict:
        st = self.caches.stats()
        m = st["metrics"]
        out = self.describe()
        out.update({k: m[k] for k in ("bytes_fetched", "requests", "request_errors", "chunks_fetched",
                                       "chunks_hit", "chunks_missed", "verify_failures",
                                       "prefetch_bytes", "prefetch_requests", "bytes_read",
                                       "fetch_latency_ms")})
        out["prefetch_ranged_files"] = sum(e.ranges is not None for e in self.boot.meta.prefetch)
        out["backend_bytes"] = sum(s.get("bytes", 0) for s in m.get("sources", {}).values())
        out["requests_served"] = self.fs.counters.snapshot()
        out["cache"] = st["totals"]
        out["link"] = st["link"]
        out["image_bytes"] = sum(b.compressed_size for b in self.boot.meta.blobs)
        out["storage"] = st
        return out

    def _write_info(self) -> None:
        info = {"pid": os.getpid(), "starttime": process_starttime(os.getpid()), "mode": self.mode,
                "mountpoint": self.mountpoint, "api": self.paths.api_sock, **self.cfg.description}
        atomic_write(self.paths.info, json.dumps(info, sort_keys=True))

    # ------------------------------------------------------------------ run and stop
    def run(self) -> str:
        """Serve until a signal, an API umount, or an external unmount; then stop(). Returns why."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        mi = open("/proc/self/mountinfo", "rb")
        try:
            mi.read()
            poller.register(mi.fileno(), select.POLLPRI | select.POLLERR)
            while self.stop_reason is None:
                events = poller.poll(1000)
                for fd, _ in events:
                    if fd == mi.fileno():
                        mi.seek(0)
                        mi.read()
                        if self._mount_id is not None and \
                                all(m.mount_id != self._mount_id for m in mountinfo()):
                            self.stop_reason = "unmounted externally"
                    elif fd == self._wake_r:
                        try:
                            os.read(self._wake_r, 64)
                        except BlockingIOError:
                            pass
                if self._fuse is not None and not self._fuse.running and self.stop_reason is None:
                    self.stop_reason = "FUSE session ended (unmounted externally)"
        finally:
            mi.close()
        log.info("stopping: %s", self.stop_reason)
        self.stop()
        return self.stop_reason or "stopped"

    def _teardown_mounts(self) -> None:
        if self._kernel_mounted:
            unmount(self.mountpoint)
            self._kernel_mounted = False
        if self._fuse is not None:
            if not self._fuse.done.is_set():
                unmount(self._fuse.mountpoint, fuse=True)
                if not self._fuse.join(10):
                    log.warning("the FUSE loop at %s did not end", self._fuse.mountpoint)
            self._fuse = None

    def stop(self) -> None:
        """Unmount (EROFS first, then FUSE), stop the API, flush and close the cache, clean the state."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        errors = []
        try:
            self._teardown_mounts()
        except OSError as e:
            errors.append(e)
            log.error("unmounting %s: %s", self.mountpoint, e)
        if self._api is not None:
            self._api.close()
        try:
            self.caches.close()
        except Exception as e:
            errors.append(e)
            log.error("closing the cache: %s", e)
        owned = (self.paths.pid, self.paths.info, self.paths.image) if self._owns_state else ()
        for p in (*owned, self.cfg.pid_file if self.mode else None):
            if p:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
        if self._owns_state:
            try:
                os.rmdir(self.paths.blobs)
            except OSError:
                pass
        if self._owns_state and self._lock_fd is not None:
            try:                            # the next daemon makes a fresh one; an empty dir goes
                os.unlink(self.paths.lock)
                os.rmdir(self.paths.dir)    # (kept when it holds daemon.log)
            except OSError:
                pass
        fds = (self._wake_r, self._wake_w, self._lock_fd)
        self._wake_r = self._wake_w = -1
        self._lock_fd = None               # closing it releases the mountpoint to the next daemon
        for fd in fds:
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if errors:
            raise errors[0]
