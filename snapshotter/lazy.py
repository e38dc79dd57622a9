"""Lazy RAFS mounts: one mount daemon per distinct image, started, watched, repaired and freed here.

The core asks ``ensure(sid, image_ref, bootstrap)`` for the bootstrap snapshot
``sid`` whenever a container snapshot above it is prepared or mounted, and gets
the mountpoint to use as the overlay's lowerdir. With ``mount_at = "pull"`` the
core already asks once when the bootstrap snapshot is committed (in the
background, without the full-pull fallback), so the first container finds the
mount up.

* A mount is keyed by the bootstrap's digest (``sha256[:16]``): the same image
  pulled into two namespaces (two bootstrap snapshots) shares one mount.
* Its daemon (``snapshotter.mountd`` -> ``rafs.daemon.MountDaemon``) runs in
  its own session: it outlives snapshotter restarts, and a restarted
  snapshotter re-attaches to it (``recover``) instead of mounting again.
* Blob chunks are cached under ``cache_dir/<key>/`` (the cache files of a blob
  are locked by the daemon that has them open, so mounts do not share them);
  ``release`` (the bootstrap snapshot was removed) and ``cleanup`` unmount,
  stop the daemon and delete that cache.
* A monitor thread notices a dead daemon and starts a new one at the same
  mountpoint (the stale mount is cleared first).
* Starts go through a *standby* launcher when one is ready (``daemon.standby``,
  standby.py): a ``mountd --standby`` process that has imported everything a
  start needs and waits for one start's arguments on stdin, so a start costs
  ~30 ms instead of ~0.2 s. The next standby is started once the start is done.
* A healthy daemon whose start was never recorded (its launcher was killed or
  timed out after forking it, e.g. the snapshotter was killed mid-start) is
  adopted by the next ``ensure`` rather than mounted over.

Disk layout::

    ROOT/rafs/<key>/mnt           the RAFS mountpoint (erofs or fuse mode)
    ROOT/rafs/<key>/daemon.pid
    RUN_DIR/mounts/<hash>/        the daemon's state: info.json, api.sock, daemon.log (rafs.daemon)
    RUN_DIR/standby.pid           the ready standby launcher
    CACHE_DIR/<key>/              blob cache (<blob id>.blob, .chunkmap, .toc)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from rafs.osutil import is_mountpoint

from . import metastore as ms
from .config import Config
from .errors import Unavailable
from .fallback import materialize, materialized
from .mounts import Layout, dir_usage, remove_dir, unmount_all
from .standby import StandbyPool

log = logging.getLogger("nydus-snapshotter")

MONITOR_INTERVAL = 2.0


def default_run_dir(root: str | os.PathLike) -> str:
    """Short (unix socket paths are limited to 107 bytes) and per snapshotter root."""
    tag = hashlib.sha256(os.fsencode(os.path.realpath(root))).hexdigest()[:12]
    return f"/run/nydus-snapshotter/{tag}"


def bootstrap_key(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:16]


class RafsMounts:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = getattr(cfg.daemon, "run_dir", "") or default_run_dir(cfg.root)
        self.store: ms.MetaStore | None = None
        self.layout: Layout | None = None
        self._keys: dict[int, str] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._monitor: threading.Thread | None = None
        self._stop = threading.Event()
        self._standby: StandbyPool | None = None

    def bind(self, store: ms.MetaStore, layout: Layout) -> None:
        self.store, self.layout = store, layout

    # -- paths --------------------------------------------------------------------------------
    def mount_dir(self, key: str) -> Path:
        return self.layout.rafs / key

    def mountpoint(self, key: str) -> Path:
        return self.layout.rafs / key / "mnt"

    def cache_dir(self, key: str) -> Path:
        return Path(self.cfg.cache_dir) / key

    def state_paths(self, key: str):
        from rafs.mounttab import state_paths
        return state_paths(str(self.mountpoint(key)), self.run_dir)

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_lock:
            return self._locks.setdefault(key, threading.Lock())

    # -- health -------------------------------------------------------------------------------
    def daemon_info(self, key: str) -> dict | None:
        from rafs.mounttab import daemon_alive, read_info
        info = read_info(self.state_paths(key))
        return info if daemon_alive(info) else None

    def healthy(self, key: str) -> bool:
        mnt = self.mountpoint(key)
        if not is_mountpoint(mnt):
            return False
        if self.daemon_info(key) is None:
            # under a holder (rafs.holder) a dead daemon is replaced on the same connection within a
            # second: the mount is healthy as long as its holder lives (no restart-for-new-containers)
            from rafs.mounttab import read_holder
            return read_holder(self.state_paths(key)) is not None
        try:
            os.stat(mnt)
        except OSError:
            return False
        return True

    # -- the interface the core uses -------------------------------------------------------------
    def _key_for(self, sid: int, bootstrap: Path) -> str:
        key = self._keys.get(sid)
        if key is None:
            with self.store.transaction() as tx:
                key = ms.rafs_user_key(tx, sid)
            if key is None:
                if not bootstrap.is_file():
                    raise Unavailable(f"bootstrap {bootstrap} is missing: the bootstrap layer was not unpacked")
                key = bootstrap_key(bootstrap)
            self._keys[sid] = key
        return key

    def ensure(self, sid: int, image_ref: str, bootstrap: Path, *, why: str = "", fallback: bool = True) -> Path:
        """The mountpoint (or full-pull tree) of bootstrap snapshot ``sid``; ``fallback=False``: never pull
        in full here (a failed start raises Unavailable, recorded as ``failed``, and the next call retries)."""
        key = self._key_for(sid, bootstrap)
        with self._lock(key):
            with self.store.transaction() as tx:
                known = ms.rafs_user_key(tx, sid) == key
                row = ms.get_rafs_mount(tx, key)
            if not known:
                with self.store.transaction(write=True) as tx:
                    ms.set_rafs_user(tx, sid, key)
            if row is not None and row.state == "mounted" and self.healthy(key):
                return self.mountpoint(key)
            if (row is None or row.state == "failed") and self.healthy(key):
                return self._adopt(key, image_ref, row)
            if row is not None and row.state == "full" and materialized(self.mount_dir(key)):
                return materialized(self.mount_dir(key))
            if row is not None and row.state == "mounted":
                why = why or f"its mount daemon (pid {row.pid}) is gone"
                log.warning("lazy mount of %s at %s: %s; starting a new daemon", image_ref,
                            self.mountpoint(key), why)
            try:
                return self._start(key, image_ref, bootstrap, row)
            except Unavailable as e:
                if not (fallback and self.cfg.daemon.fallback):
                    raise
                return self._fall_back(key, image_ref, bootstrap, str(e))

    def _fall_back(self, key: str, image_ref: str, bootstrap: Path, reason: str) -> Path:
        """The lazy mount failed: pull the image in full (blobs downloaded, tree unpacked) and use that."""
        from rafs.image.refs import parse_ref
        log.warning("image %s: cannot be served lazily (%s); falling back to a full pull", image_ref,
                    reason.splitlines()[-1] if reason else "")
        t0 = time.monotonic()
        host = parse_ref(image_ref).host
        docker_dir = os.path.dirname(os.path.abspath(self.cfg.backend.docker_config)) \
            if self.cfg.backend.docker_config else None
        row = ms.RafsMountRow(key=key, image_ref=image_ref, mountpoint="", mode="full")
        try:
            tree, downloaded = materialize(bootstrap, image_ref, self.mount_dir(key),
                                           plain_http=self.cfg.backend.is_plain_http(host),
                                           docker_config_dir=docker_dir,
                                           hosts_dir=self.cfg.backend.hosts_dir or None,
                                           mirrors=self.cfg.backend.mirrors_for(host))
        except Exception as e:
            row.state, row.error = "failed", f"lazy: {reason}; full pull: {e}"
            with self.store.transaction(write=True) as tx:
                ms.put_rafs_mount(tx, row)
                ms.set_image_status(tx, image_ref, "failed", f"lazy mount and full-pull fallback failed: {e}")
            log.error("image %s: FAILED: lazy mount and the full-pull fallback failed: %s", image_ref, e)
            raise Unavailable(f"{image_ref}: lazy mount failed ({reason}); full pull failed: {e}") from None
        row.state, row.mountpoint, row.error = "full", str(tree), reason
        with self.store.transaction(write=True) as tx:
            ms.put_rafs_mount(tx, row)
            ms.set_image_status(tx, image_ref, "full",
                                f"fell back to a full pull ({downloaded} blob bytes): lazy mount failed: "
                                f"{reason.splitlines()[-1] if reason else ''}")
        log.warning("image %s: fell back to a full pull: %.2f MB of blobs downloaded, tree at %s in %.2f s",
                    image_ref, downloaded / 1e6, tree, time.monotonic() - t0)
        return tree

    def _start(self, key: str, image_ref: str, bootstrap: Path, row: ms.RafsMountRow | None) -> Path:
        mnt = self.mountpoint(key)
        mnt.mkdir(parents=True, exist_ok=True)
        from rafs.image.refs import parse_ref
        host = parse_ref(image_ref).host
        launcher = list(self.cfg.daemon.command) or [sys.executable, "-m", "snapshotter.mountd"]
        standby = self._standby.take(self._standby_cmd()) if self._standby is not None else None
        desc = {"snapshotter_mount": key, **({"standby": standby.pid} if standby is not None else {})}
        args = ["--bootstrap", str(bootstrap), "--ref", image_ref,
                "--mountpoint", str(mnt), "--cache-dir", str(self.cache_dir(key)), "--run-dir", self.run_dir,
                "--pid-file", str(self.mount_dir(key) / "daemon.pid"), "--mode", self.cfg.daemon.mode,
                "--description", json.dumps(desc)]
        if self.cfg.backend.is_plain_http(host):
            args.append("--plain-http")
        if self.cfg.daemon.prefetch:
            args.append("--prefetch-all")
        args += ["--learn", self.cfg.daemon.learn, "--learn-window", str(self.cfg.daemon.learn_window)]
        args += self.cfg.p2p.daemon_args()
        args += self.cfg.backend.mirror_args(host)
        args += self.cfg.cache.daemon_args(self.cfg.cache_dir)     # the node's one cache limit
        if self.cfg.backend.hosts_dir:
            args += ["--hosts-dir", os.path.abspath(self.cfg.backend.hosts_dir)]
        if self.cfg.backend.docker_config:
            args += ["--docker-config", os.path.dirname(os.path.abspath(self.cfg.backend.docker_config))]
        t0 = time.monotonic()
        try:
            if standby is not None:     # the same start, by a launcher that has imported everything already
                proc = standby
                stdout, stderr = proc.communicate(json.dumps(args) + "\n", timeout=self.cfg.daemon.startup_timeout)
            else:
                # own process group: the signal that stops the snapshotter (to its group) must not cut a start
                # short, which would orphan a daemon mid-mount; shutdown waits for the start instead
                proc = subprocess.Popen([*launcher, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, errors="replace", process_group=0)
                stdout, stderr = proc.communicate(timeout=self.cfg.daemon.startup_timeout)
            ok, out = proc.returncode == 0, (stdout.strip().splitlines() or [""])[-1]
            err = (stdout + stderr).strip()[-2000:] or f"the mount daemon exited with status {proc.returncode}"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            ok, out, err = False, "", f"the mount daemon did not come up within {self.cfg.daemon.startup_timeout} s"
        except OSError as e:
            ok, out, err = False, "", f"cannot start the mount daemon {launcher[0]}: {e}"
        finally:
            if self._standby is not None:
                self._standby.refill()
        restarts = (row.restarts + 1) if row is not None and row.state == "mounted" else \
            (row.restarts if row is not None else 0)
        new = ms.RafsMountRow(key=key, image_ref=image_ref, mountpoint=str(mnt), restarts=restarts)
        if not ok:
            new.state, new.error = "failed", err
            with self.store.transaction(write=True) as tx:
                ms.put_rafs_mount(tx, new)
                ms.set_image_status(tx, image_ref, "failed", f"lazy mount failed: {err.splitlines()[-1] if err else ''}")
            log.error("image %s: lazy mount FAILED: %s", image_ref, err)
            raise Unavailable(f"lazy mount of {image_ref} failed: {err}")
        try:
            info = json.loads(out)
        except ValueError:
            info = {"mode": "?", "pid": 0, "reason": out}
        new.state, new.mode, new.pid = "mounted", info.get("mode", ""), int(info.get("pid") or 0)
        self._record_mounted(new)
        log.info("image %s: served lazily, %s mode (%s), daemon pid %d%s, mounted at %s in %.2f s%s", image_ref,
                 new.mode, info.get("reason", ""), new.pid,
                 f" (started by standby pid {standby.pid})" if standby is not None else "", mnt,
                 time.monotonic() - t0, f" (restart #{restarts})" if restarts else "")
        return mnt

    def _adopt(self, key: str, image_ref: str, row: ms.RafsMountRow | None) -> Path:
        """A healthy daemon serves ``key`` but its start was never recorded (its launcher was killed or timed
        out after the fork): keep it rather than fail to mount over it."""
        info = self.daemon_info(key) or {}
        new = ms.RafsMountRow(key=key, image_ref=image_ref, mountpoint=str(self.mountpoint(key)), state="mounted",
                              mode=info.get("mode") or "", pid=int(info.get("pid") or 0),
                              restarts=row.restarts if row is not None else 0)
        self._record_mounted(new)
        log.info("image %s: adopted the running mount daemon pid %d (%s mode) at %s", image_ref, new.pid,
                 new.mode, new.mountpoint)
        return self.mountpoint(key)

    def _record_mounted(self, row: ms.RafsMountRow) -> None:
        with self.store.transaction(write=True) as tx:
            ms.put_rafs_mount(tx, row)
            ms.set_image_status(tx, row.image_ref, "lazy", f"RAFS mounted in {row.mode} mode at {row.mountpoint}")

    def release(self, sid: int) -> None:
        with self.store.transaction(write=True) as tx:
            key = ms.rafs_user_key(tx, sid)
            if key is None:
                return
            ms.delete_rafs_user(tx, sid)
            still_used = key in ms.rafs_users(tx).values()
        self._keys.pop(sid, None)
        if not still_used:
            self._free(key)

    def _free(self, key: str) -> None:
        """Unmount, stop the daemon, delete the cache and the dirs of mount ``key``."""
        from rafs.mounttab import request_umount
        with self._lock(key):
            with self.store.transaction() as tx:
                row = ms.get_rafs_mount(tx, key)
            mnt = self.mountpoint(key)
            try:
                msg = request_umount(str(mnt), run_dir_override=self.run_dir)
                log.info("unmounted lazy mount %s (%s): %s", key, row.image_ref if row else "?", msg)
            except Exception as e:
                log.info("lazy mount %s: %s", key, e)
            unmount_all(mnt)
            cache = self.cache_dir(key)
            freed = dir_usage(cache)[0] if cache.exists() else 0
            remove_dir(cache)
            remove_dir(self.mount_dir(key))
            with self.store.transaction(write=True) as tx:
                ms.delete_rafs_mount(tx, key)
            log.info("freed lazy mount %s: cache %.2f MB deleted", key, freed / 1e6)

    def cleanup(self, live_ids: set[int]) -> None:
        with self.store.transaction(write=True) as tx:
            users = ms.rafs_users(tx)
            for sid in [s for s in users if s not in live_ids]:
                ms.delete_rafs_user(tx, sid)
                self._keys.pop(sid, None)
            used = set(ms.rafs_users(tx).values())
            rows = ms.list_rafs_mounts(tx)
        for row in rows:
            if row.key not in used:
                self._free(row.key)
        known = {r.key for r in rows if r.key in used}
        for d in (list(self.layout.rafs.iterdir()) if self.layout.rafs.exists() else []):
            if d.name not in known:
                unmount_all(d / "mnt")
                remove_dir(d)
        cache_root = Path(self.cfg.cache_dir)
        if cache_root.exists():
            for d in cache_root.iterdir():
                if d.is_dir() and d.name not in known:
                    remove_dir(d)

    def recover(self, wanted: dict[int, tuple[str, Path]]) -> None:
        for sid, (image_ref, bootstrap) in wanted.items():
            try:
                key = self._key_for(sid, bootstrap)
                attached = self.healthy(key)
                where = self.ensure(sid, image_ref, bootstrap, why="found dead after a snapshotter restart")
                if where != self.mountpoint(key):
                    log.info("image %s: served from its full-pull tree %s", image_ref, where)
                elif attached:
                    info = self.daemon_info(key) or {}
                    log.info("image %s: re-attached to its lazy mount (daemon pid %s, %s mode) at %s",
                             image_ref, info.get("pid"), info.get("mode"), self.mountpoint(key))
                else:
                    log.info("image %s: re-mounted lazily after restart at %s", image_ref, self.mountpoint(key))
            except Exception as e:
                log.error("recovering the lazy mount of %s: %s", image_ref, e)

    # -- standby launcher ------------------------------------------------------------------------
    def standby_pid_file(self) -> Path:
        return Path(self.run_dir) / "standby.pid"

    def _standby_cmd(self) -> list[str]:
        """The standby for this config: P2P's imports only when P2P is on, the erofs probe unless fuse mode.
        ``--root`` does nothing but name its snapshotter: the daemons it forks keep this command line, and
        whoever finds processes by their arguments (ps, benchmarks/ctd.py, tests) still sees whose they are."""
        return [sys.executable, "-m", "snapshotter.mountd", "--standby", "--root", os.path.abspath(self.cfg.root),
                *(["--p2p"] if self.cfg.p2p.daemon_args() else []),
                *(["--probe-erofs"] if self.cfg.daemon.mode != "fuse" else [])]

    def start_standby(self) -> None:
        """Keep a pre-imported launcher ready (``daemon.standby``; only the default launcher has the mode)."""
        if self.cfg.daemon.standby and not self.cfg.daemon.command and self._standby is None:
            self._standby = StandbyPool(self._standby_cmd(), self.standby_pid_file())
            self._standby.refill()

    def close(self) -> None:
        """Stop the standby (after the last start: call once the snapshotter's starts are done)."""
        if self._standby is not None:
            self._standby.close()

    # -- monitor ---------------------------------------------------------------------------------
    def start_monitor(self, core) -> None:
        if not self.cfg.daemon.restart or self._monitor is not None:
            return
        self._stop.clear()
        self._monitor = threading.Thread(target=self._watch, args=(core,), name="rafs-monitor", daemon=True)
        self._monitor.start()

    def stop_monitor(self) -> None:
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(10)
            self._monitor = None

    def _watch(self, core) -> None:
        last_gc = time.monotonic()
        while not self._stop.wait(MONITOR_INTERVAL):
            try:
                self.check_all(core)
            except Exception:
                log.exception("checking lazy mounts")
            if time.monotonic() - last_gc >= self.cfg.cache.gc_interval:
                last_gc = time.monotonic()
                try:
                    self.gc_caches()
                except Exception:
                    log.exception("cache GC")

    def gc_caches(self) -> list[str]:
        """The periodic cache GC: remove the cache dirs of no known mount that no daemon has open."""
        from rafs.storage.cache.evict import remove_orphans
        with self.store.transaction() as tx:
            keep = {r.key for r in ms.list_rafs_mounts(tx)} | set(ms.rafs_users(tx).values())
        removed = remove_orphans(self.cfg.cache_dir, keep | set(self._keys.values()))
        if removed:
            log.info("cache GC: removed the caches of %d images no mount uses: %s", len(removed), ", ".join(removed))
        return removed

    def check_all(self, core) -> None:
        """Restart the daemon of every mounted image whose daemon died (repairing its mount)."""
        with self.store.transaction() as tx:
            rows = [r for r in ms.list_rafs_mounts(tx) if r.state == "mounted"]
            users = ms.rafs_users(tx)
        for row in rows:
            if self._stop.is_set() or self.healthy(row.key):
                continue
            sids = [s for s, k in users.items() if k == row.key]
            if not sids:
                continue
            sid = sids[0]
            try:
                self.ensure(sid, row.image_ref, core.layout.fs(sid) / "image/image.boot")
            except Exception as e:
                log.error("repairing the lazy mount of %s: %s", row.image_ref, e)

    # -- status ----------------------------------------------------------------------------------
    def stats(self, key: str) -> dict | None:
        from rafs.api import ApiClient, ApiError
        if self.daemon_info(key) is None:
            return None
        try:
            return ApiClient(self.state_paths(key).api_sock, timeout=5).stats()
        except ApiError:
            return None
