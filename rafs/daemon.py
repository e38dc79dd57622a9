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
# the counters that survive a failover: the daemon writes them to <state>/stats.json every
# STATS_SAVE_INTERVAL seconds (and when it hands over); a daemon adopting the mount starts from them
STATS_FILE = "stats.json"
STATS_SAVE_INTERVAL = 1.0
STATS_COUNTERS = ("bytes_fetched", "requests", "request_errors", "chunks_fetched", "chunks_hit", "chunks_missed",
                  "verify_failures", "recheck_failures", "prefetch_bytes", "prefetch_requests", "bytes_read",
                  "evictions")
READ_COUNTERS = ("file_reads", "blob_reads", "bytes")


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
    fuse_fd: int | None = None      # a /dev/fuse fd from the holder (rafs.holder): serve it with rafs.fuseproto
    adopt: bool = False             # ... whose connection is mounted and initialised already (failover)
    learner: object | None = None   # rafs.learned.Learner: the learned prefetch record to use and publish
    learn_window: float = 30.0      # seconds from the first read that count as the container's start


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
        self._stats_saved: dict | None = None   # what save_stats() wrote last
        self.fs.access.window = cfg.learn_window
        self.fs.access.enabled = not cfg.adopt     # an adopting daemon came in mid-run: not a start
        self._file_index = None                    # rafs.access.FileIndex, built by the first audit request
        self._learn_done = threading.Event()
        self.handover = False          # stop without unmounting: a new daemon serves the connection

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
            if self.cfg.adopt:
                return self._adopt()
            self._take_lock()
            for line in clear_stale(self.mountpoint, self.paths):
                print(f"{self.mountpoint}: {line}", flush=True)
            self._owns_state = True
            try:
                os.unlink(self._stats_path())       # a new mount starts from zero
            except FileNotFoundError:
                pass
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
            if self.cfg.adopt:
                self.handover = True    # a failed adoption leaves the mounts to the next try
            self.stop()
            raise
        return mode

    def _adopt(self) -> str:
        """Failover / hot upgrade: serve the mounted, initialised connection of the holder's fd. The
        mounts stay as they are (EROFS over the blob files, or the tree); the previous daemon's
        requests come again (FUSE_NOTIFY_RESEND). Waits for the previous daemon's lock (a hot
        upgrade: it is handing over)."""
        info = read_info(self.paths) or {}
        mode = info.get("mode")
        if mode not in ("fuse", "erofs"):
            raise RafsError(f"cannot adopt the mount at {self.mountpoint}: no mode in {self.paths.info}")
        self.mode_reason = info.get("mode_reason") or "adopted"
        self._take_lock(wait=30.0)
        self._owns_state = True
        self._restore_stats()
        from .fuseproto import BlobInodes, FuseConnServer, TreeInodes
        if mode == "erofs":
            inodes = BlobInodes(self.fs, int(info.get("blobs_mtime_ns", 0)))
            where = self.paths.blobs
            self._kernel_mounted = True
        else:
            inodes = TreeInodes(self.fs)
            where = self.mountpoint
        self._fuse = FuseConnServer(inodes, self.cfg.fuse_fd, where, adopt=True)
        self._fuse.start()
        self.mode = mode
        self._mount_id = self._find_mount_id()
        self._write_info()
        atomic_write(self.paths.pid, f"{os.getpid()}\n")
        self._start_api()
        self._start_prefetch()          # what the previous daemon fetched is in the cache: cheap
        if self.cfg.pid_file:
            atomic_write(self.cfg.pid_file, f"{os.getpid()}\n")
        return mode

    # ------------------------------------------------------------------ statistics across failovers
    def _stats_path(self) -> str:
        return os.path.join(self.paths.dir, STATS_FILE)

    def _saved_stats(self) -> dict:
        metrics = getattr(self.caches, "metrics", None)
        m = metrics.snapshot() if metrics is not None else {}
        reads = self.fs.counters.snapshot()
        return {"counters": {k: m[k] for k in STATS_COUNTERS if k in m},
                "reads": {"file_reads": reads["file_reads"], "blob_reads": reads["blob_reads"],
                          "bytes": reads["bytes_requested"], "largest": reads["largest_request"]}}

    def save_stats(self) -> None:
        """Persist the cumulative counters (`<state>/stats.json`), so that the daemon that adopts the
        mount after this one dies (even by SIGKILL) continues them; at most STATS_SAVE_INTERVAL old."""
        data = self._saved_stats()
        if data == self._stats_saved:
            return
        try:
            atomic_write(self._stats_path(), json.dumps(data, sort_keys=True))
            self._stats_saved = data
        except OSError as e:
            log.warning("cannot save the statistics to %s: %s", self._stats_path(), e)

    def _restore_stats(self) -> None:
        """Adoption: start from the previous daemon's counters (before anything is served)."""
        try:
            with open(self._stats_path(), encoding="utf-8") as f:
                saved = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            log.warning("the previous daemon's statistics are unreadable (%s): starting from zero", e)
            return
        metrics = getattr(self.caches, "metrics", None)
        # nothing is served yet (no FUSE loop, no prefetch, no API): no other thread touches them
        if metrics is not None:
            for k, v in (saved.get("counters") or {}).items():
                if k in STATS_COUNTERS and isinstance(v, int):
                    setattr(metrics, k, getattr(metrics, k) + v)
        reads, counters = saved.get("reads") or {}, self.fs.counters
        for k in READ_COUNTERS:
            if isinstance(reads.get(k), int):
                setattr(counters, k, getattr(counters, k) + reads[k])
        if isinstance(reads.get("largest"), int):
            counters.largest = max(counters.largest, reads["largest"])
        log.info("continuing the previous daemon's statistics (%s bytes fetched)",
                 (saved.get("counters") or {}).get("bytes_fetched"))

    def _take_lock(self, wait: float = 0.0) -> None:
        """One daemon per mountpoint: an exclusive flock the kernel drops when we die, even by SIGKILL."""
        fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.005)
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
        if self.cfg.fuse_fd is not None:
            signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGUSR1:
            self.handover = True
            self.request_stop("handover to a new daemon (hot upgrade)")
            return
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

    def _serve_fd(self, inodes, where: str, subtype: str) -> None:
        """Mount the holder's fresh /dev/fuse fd at `where` and serve it (rafs.fuseproto)."""
        from .fuseproto import FuseConnServer, mount_fuse
        mount_fuse(self.cfg.fuse_fd, where, self._fsname(), subtype)
        self._fuse = FuseConnServer(inodes, self.cfg.fuse_fd, where)
        self._fuse.start()

    def _mount_fuse(self) -> None:
        if self.cfg.fuse_fd is not None:
            from .fuseproto import TreeInodes
            self._serve_fd(TreeInodes(self.fs), self.mountpoint, "pynydus")
            dev = os.stat(self.mountpoint).st_dev
            self._set_read_ahead(f"{os.major(dev)}:{os.minor(dev)}")
            return
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
        direct, stored = self._kernel_plan()
        try:
            if self.cfg.fuse_fd is not None:
                from .fuseproto import BlobInodes
                self._serve_fd(BlobInodes(self.fs, int(self.started * 1e9), cached=stored), self.paths.blobs,
                               "pynydus-blobs")
            else:
                self._fuse = FuseServer(BlobFsOps(self.fs, int(self.started * 1e9)), self.paths.blobs,
                                        blobfs_options(self._fsname(), direct_io=True))
                self._fuse.start()
            devices = [direct.get(i) or os.path.join(self.paths.blobs, str(i))
                       for i in range(len(self.boot.meta.blobs))]
            before = erofs_bdis()
            try:
                mount_erofs(self.paths.image, devices, self.mountpoint)
            except OSError as e:
                if not direct:
                    raise
                log.warning("mounting with cache files as devices failed (%s); all blobs through FUSE", e)
                self._kernel_unpin(direct)
                direct = {}
                mount_erofs(self.paths.image, [os.path.join(self.paths.blobs, str(i))
                                               for i in range(len(self.boot.meta.blobs))], self.mountpoint)
        except BaseException:
            self._kernel_unpin(direct)
            raise
        self._kernel_mounted = True
        new = erofs_bdis() - before
        if len(new) == 1:          # EROFS's own readahead sizes the (direct) reads Python sees
            self._set_read_ahead(new.pop())
        unsealed = [i for i in range(len(self.fs.blobs)) if i not in direct]
        if stored:
            self._kernel_fill_state("running")
        # in the background: the mount is usable now (reads that come before their chunk is stored ask)
        threading.Thread(target=self._kernel_background, args=(stored, unsealed), daemon=True,
                         name=f"kernel-fill {self.mountpoint}").start()

    # Cached data at kernel speed (erofs mode). A blob whose cache is complete and sealed is the EROFS
    # device itself (`device=<cache>/<id>.blob`, pinned against eviction while mounted:
    # rafs.storage.cache.kernel). A cache is sealed once every chunk of it was verified: at the close of
    # a daemon that verified them all, or by the background thread of a mount that finds it complete
    # but unsealed (that mount still reads it through FUSE). The chunks a partial cache holds are
    # stored into the kernel's page cache of their blob file by a background thread started right
    # after the mount (FUSE_NOTIFY_STORE,
    # holder connections only; a read that comes before its chunk is stored is answered as usual), at
    # most KERNEL_FILL_MAX bytes ($PYNYDUS_KERNEL_FILL_MAX overrides it; 0: none). Either way a read of
    # cached data never reaches this process.
    KERNEL_FILL_MAX = 512 << 20

    def _kernel_fill_max(self) -> int:
        v = os.environ.get("PYNYDUS_KERNEL_FILL_MAX", "")
        try:
            return int(v) if v else self.KERNEL_FILL_MAX
        except ValueError:
            return self.KERNEL_FILL_MAX

    def _kernel_token(self) -> str:
        return os.path.basename(self.paths.dir.rstrip("/")) or "mount"

    def _kernel_plan(self) -> tuple[dict[int, str], dict[int, list]]:
        """({blob index: cache data file the kernel reads directly}, {blob index: view spans of a
        partial cache to store into the kernel's page cache})."""
        direct: dict[int, str] = {}
        stored: dict[int, list] = {}
        holder = os.environ.get("PYNYDUS_HOLDER_PID", "")
        pids = [os.getpid()] + ([int(holder)] if holder.isdigit() else [])
        for i in range(len(self.fs.blobs)):
            try:
                cache = self.fs.blob_cache(i)
            except (OSError, RafsError) as e:
                log.debug("blob #%d: no cache to read directly: %s", i, e)
                continue
            device = getattr(cache, "kernel_device", None)
            path = device(self._kernel_token(), mountpoint=self.mountpoint, image=self.paths.image,
                          pids=pids, verify=False) if device is not None else None
            if path is not None and "," not in path:
                direct[i] = path
                continue
            if path is not None:
                cache.kernel_release(self._kernel_token())
            if self.cfg.fuse_fd is not None and hasattr(cache, "present_spans") and self._kernel_fill_max() > 0:
                spans = cache.present_spans()
                if spans:
                    stored[i] = spans
        if direct:
            log.info("%s: %d of %d blob(s) read by the kernel from the cache directly", self.mountpoint,
                     len(direct), len(self.fs.blobs))
        return direct, stored

    def _kernel_fill_state(self, state: str) -> None:
        if hasattr(self.caches, "kernel_fill"):
            self.caches.kernel_fill = state

    def _kernel_unpin(self, direct: dict[int, str]) -> None:
        for i in direct:
            try:
                self.fs.blob_cache(i).kernel_release(self._kernel_token())
            except (OSError, RafsError):
                pass

    def _kernel_background(self, stored: dict[int, list], unsealed: list[int]) -> None:
        """Fill the kernel's page cache with the cached chunks of `stored`; then seal the blobs of
        `unsealed` whose cache is complete (verifying what is not verified yet), so that the next mount
        reads them without this process."""
        try:
            if stored:
                self._fill_kernel_cache(stored)
            for i in unsealed:
                if self._stopped or self.handover:
                    return
                cache = self.fs.blob_cache(i)
                if hasattr(cache, "seal") and cache.seal():
                    log.info("%s: blob #%d is complete and verified: the next mount reads it from %s",
                             self.mountpoint, i, cache.data_path)
        except Exception as e:            # noqa: BLE001 - never take the daemon down (closing, a bad chunk)
            if not self._stopped:
                log.warning("%s: filling / sealing the kernel's cached data: %s", self.mountpoint, e)

    def _fill_kernel_cache(self, stored: dict[int, list]) -> None:
        """Store the cached chunks of `stored` ({blob index: view spans}) into the kernel's page cache
        of their blob files (read through the cache: verified), up to KERNEL_FILL_MAX bytes."""
        t0 = time.monotonic()
        total = 0
        limit = self._kernel_fill_max()
        fuse = self._fuse
        for i, spans in stored.items():
            cache = self.fs.blob_cache(i)
            for off, size in spans:
                if total + size > limit or self._stopped or self.handover or fuse.done.is_set():
                    break
                try:
                    data = cache.read_cached(off, size)
                except RafsError as e:          # the kernel will ask for it (and get the error)
                    log.debug("blob #%d: not storing %d+%d: %s", i, off, size, e)
                    if self._stopped:
                        break
                    continue
                try:
                    fuse.notify_store(i + 2, off, data)
                except OSError as e:
                    if not fuse.done.is_set():
                        log.warning("blob #%d: the kernel refused cached data (%s); reads ask the daemon", i, e)
                    break
                total += len(data)
                cache.note_kernel_stored(len(data))
        self._kernel_fill_state("done")
        log.info("%s: %d bytes of cached chunks stored in the kernel's page cache in %.3f s", self.mountpoint,
                 total, time.monotonic() - t0)

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
            ("GET", "/files"): lambda: (200, {"files": self.file_accesses()}),
            ("POST", "/umount"): umount_route,
        }).start()

    def _start_prefetch(self) -> None:
        entries = list(self.boot.meta.prefetch)
        learner = self.cfg.learner if not self.cfg.adopt else None
        if learner is not None and learner.mode == "auto":
            threading.Thread(target=self._learn_window, name="learn", daemon=True).start()
        if not entries and not self.cfg.prefetch_all and (learner is None or learner.mode == "off"):
            return

        def work():
            try:
                self.prefetch_state = "running"
                futures = self.fs.prefetch(entries) if entries else []
                if not entries and learner is not None:
                    rec = learner.load()       # the image's own list wins; else what earlier starts read
                    if rec is not None:
                        self.prefetch_state = "running (learned)"
                        self._prefetch_learned(rec)
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

    # ------------------------------------------------------------------ learned prefetch, audit
    def _prefetch_learned(self, rec) -> None:
        """Fetch what earlier starts read, wave after wave in first-access order; the chunks are
        scattered over the blobs, so each wave's requests go in parallel (one at a time, as a
        low-priority prefetch goes, would cost a round trip each)."""
        for wave in rec.plan(self.boot):
            if self._stopped:
                return
            for f in self.fs.prefetch_wave(wave):
                try:
                    f.result()
                except Exception as e:          # logged by the cache; the next wave still helps
                    log.debug("learned prefetch: %s", e)

    def _learn_window(self) -> None:
        """Publish this start's reads once its window is over (or at stop, whichever is first)."""
        access = self.fs.access
        while not self._learn_done.wait(0.5):
            if access.window_over():
                self._publish_learned()
                return

    def _publish_learned(self) -> None:
        learner = self.cfg.learner
        if learner is None or self.cfg.adopt or learner.mode != "auto" or not self.fs.access.started:
            return
        self._learn_done.set()
        try:
            learner.publish(self.boot, self.fs.access.start_events(), self.file_accesses())
        except Exception as e:                   # a record is never worth a failed unmount
            log.warning("learned prefetch: %s", e)

    def file_accesses(self) -> list[dict]:
        """The access audit: the files read so far, in first-access order (rafs.access)."""
        from .access import FileIndex, file_accesses
        erofs = self.mode == "erofs"
        if self._file_index is None or (erofs and not self._file_index.extents):
            self._file_index = FileIndex(self.boot, extents=erofs)
        return file_accesses(self.fs.access, self._file_index, from_blobs=erofs)

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
        out["access"] = self.fs.access.summary()
        if self.cfg.learner is not None:
            out["learned"] = dict(self.cfg.learner.state)
        return out

    def _write_info(self) -> None:
        info = {"pid": os.getpid(), "starttime": process_starttime(os.getpid()), "mode": self.mode,
                "mode_reason": self.mode_reason, "blobs_mtime_ns": int(self.started * 1e9),
                "mountpoint": self.mountpoint, "api": self.paths.api_sock, **self.cfg.description}
        if self.cfg.fuse_fd is not None:
            info["holder_pid"] = int(os.environ.get("PYNYDUS_HOLDER_PID") or 0) or None
        old = read_info(self.paths) if self.cfg.adopt else None
        if old and old.get("blobs_mtime_ns"):
            info["blobs_mtime_ns"] = old["blobs_mtime_ns"]      # the blob files keep their times
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
            holder_fd = self._watch_holder(poller)
            saved_at = 0.0
            while self.stop_reason is None:
                if self.cfg.fuse_fd is not None and time.monotonic() - saved_at >= STATS_SAVE_INTERVAL:
                    self.save_stats()           # under a holder: a successor may need them
                    saved_at = time.monotonic()
                events = poller.poll(int(STATS_SAVE_INTERVAL * 1000))
                for fd, _ in events:
                    if fd == holder_fd:
                        poller.unregister(fd)
                        os.close(fd)
                        holder_fd = None
                        if self.stop_reason is None:
                            self._restart_holder()
                            holder_fd = self._watch_holder(poller)
                    elif fd == mi.fileno():
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

    def _watch_holder(self, poller) -> int | None:
        """A pidfd of our holder (rafs.holder), registered in `poller`: it tells when the holder dies."""
        pid = int(os.environ.get("PYNYDUS_HOLDER_PID") or 0)
        if self.cfg.fuse_fd is None or not pid:
            return None
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            self._restart_holder()
            return self._watch_holder(poller) if os.environ.get("PYNYDUS_HOLDER_PID") != str(pid) else None
        poller.register(fd, select.POLLIN)
        return fd

    def _restart_holder(self) -> None:
        """Our holder is gone: start a new one holding our copy of the fd (it restarts us if we die)."""
        import subprocess
        import sys
        env = {k: v for k, v in os.environ.items() if k not in ("PYNYDUS_FUSE_FD", "PYNYDUS_FUSE_ADOPT",
                                                                "PYNYDUS_NOTIFY_FD", "PYNYDUS_HOLDER_PID")}
        try:
            out = os.open(self.paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                p = subprocess.Popen([sys.executable, "-m", "rafs.holder", "--state", self.paths.dir, "--log",
                                      self.paths.log, "--fuse-fd", str(self.cfg.fuse_fd),
                                      "--adopt-daemon", str(os.getpid())],
                                     pass_fds=(self.cfg.fuse_fd,), start_new_session=True, env=env, cwd="/",
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            finally:
                os.close(out)
        except OSError as e:
            log.error("our holder is gone and a new one cannot start: %s", e)
            os.environ.pop("PYNYDUS_HOLDER_PID", None)
            return
        log.warning("the holder of %s died; started a new one, pid %d", self.mountpoint, p.pid)
        os.environ["PYNYDUS_HOLDER_PID"] = str(p.pid)
        threading.Thread(target=p.wait, daemon=True).start()     # reap it if it leaves before us
        try:
            self._write_info()
        except OSError:
            pass

    def _end_holder(self) -> None:
        """A clean stop of a served mount: the holder has nothing left to hold; it goes before we do (so
        whoever waits for this daemon to exit finds no holder either)."""
        pid = int(os.environ.get("PYNYDUS_HOLDER_PID") or 0)
        if self.cfg.fuse_fd is None or not pid or not self.mode or self.handover:
            return
        try:
            os.unlink(os.path.join(self.paths.dir, "holder.json"))
        except OSError:
            pass
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass

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

    def _hand_over(self) -> None:
        """Hot upgrade: stop answering (the next daemon gets what is left by RESEND), flush and close the
        cache, release the lock; the mounts and the state stay for the next daemon."""
        if self._fuse is not None and hasattr(self._fuse, "drain"):
            self._fuse.drain()
        self.save_stats()                   # the next daemon continues from here
        if self._api is not None:
            self._api.close()
        try:
            self.caches.close()
        except Exception as e:
            log.error("closing the cache: %s", e)
        self._close_fds()

    def _close_fds(self) -> None:
        """Close the wake pipe and the state lock (closing it releases the mountpoint to the next daemon)."""
        fds = (self._wake_r, self._wake_w, self._lock_fd)
        self._wake_r = self._wake_w = -1
        self._lock_fd = None
        for fd in fds:
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def stop(self) -> None:
        """Unmount (EROFS first, then FUSE), stop the API, flush and close the cache, clean the state."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        errors = []
        self._learn_done.set()
        if self.handover:
            return self._hand_over()
        try:
            self._teardown_mounts()
        except OSError as e:
            errors.append(e)
            log.error("unmounting %s: %s", self.mountpoint, e)
        if self.mode:
            self._publish_learned()              # a start shorter than its window
        self._end_holder()
        if self._api is not None:
            self._api.close()
        try:
            self.caches.close()
        except Exception as e:
            errors.append(e)
            log.error("closing the cache: %s", e)
        owned = (self.paths.pid, self.paths.info, self.paths.image, self._stats_path()) if self._owns_state else ()
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
        self._close_fds()
        if errors:
            raise errors[0]
