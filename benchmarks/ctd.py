"""A private containerd for the benchmark, and the `ctr` calls the modes make.

Its root lives on the suite's loop-mounted ext4 (next to pynydus's cache), its
state, sockets and opt dir under /run/pynydus-bench/PID, the CRI plugin is
disabled (no stream-server port), and it uses its own namespace, so it never
meets the machine's other containerd daemons.  With `snapshotters` it
also knows the proxy snapshotters `nydus-fuse` / `nydus-erofs`.

The processes are testbed.containerd's (as in the tests); what the benchmark
adds: both register with its `Cleanup`, containerd reports when each task
started and exited (`ctr events`), and both can be made cold again and checked.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from rafs.osutil import mounts_below
from testbed import containerd as tb
from testbed.process import cmdline, run, stop_process

from .sysutil import Cleanup

log = logging.getLogger("benchmarks.ctd")

NAMESPACE = "pnbench"
SNAPSHOTTER = "nydus"


class Containerd(tb.Containerd):
    def __init__(self, root: str | os.PathLike, *, run_dir: str | os.PathLike | None = None,
                 snapshotters: dict[str, str] | None = None, namespace: str = NAMESPACE):
        super().__init__(run_dir or f"/run/pynydus-bench/{os.getpid()}/containerd", root=root,
                         snapshotters=snapshotters, namespace=namespace, cri=False, log_level="info",
                         log_path=Path(root).parent / "containerd.log", ctr_timeout=900)
        self.events: dict[tuple[str, str], float] = {}      # (topic, container id) -> monotonic arrival
        self._events_proc: subprocess.Popen | None = None

    def start(self, cleanup: Cleanup, timeout: float = 20.0) -> "Containerd":
        self.workdir.mkdir(parents=True, exist_ok=True)
        cleanup.push(lambda: shutil.rmtree(self.workdir, ignore_errors=True), f"rm {self.workdir}")
        super().start(timeout)
        cleanup.push(self.stop, f"stop containerd pid {self.proc.pid}")
        self._watch_events()
        return self

    _EVENT_RE = re.compile(r"\s(/[a-z/]+)\s(\{.*\})\s*$")

    def _watch_events(self) -> None:
        """`ctr events` in the background: when each task was started / exited (arrival time)."""
        self._events_proc = subprocess.Popen([tb.CTR_BIN, "-a", self.address, "events"], stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)

        def reader(stream):
            for line in stream:
                t = time.monotonic()
                m = self._EVENT_RE.search(line)
                if not m:
                    continue
                try:
                    cid = json.loads(m.group(2)).get("container_id")
                except ValueError:
                    continue
                if cid:
                    self.events[(m.group(1), cid)] = t
        threading.Thread(target=reader, args=(self._events_proc.stdout,), daemon=True).start()

    def event_time(self, topic: str, cid: str, wait: float = 1.0) -> float | None:
        """Arrival time of `topic` for container `cid` (waits a little: events trail the call)."""
        deadline = time.monotonic() + wait
        while (topic, cid) not in self.events and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.events.get((topic, cid))

    def stop(self) -> None:
        """Remove every container and image first (so the snapshotters release their mounts), then
        stop containerd (testbed.containerd.Containerd.stop)."""
        if self.running:
            try:
                self.remove_all()
            except Exception as e:  # noqa: BLE001 - still stop the daemon
                log.warning("removing containers: %s", e)
        stop_process(self._events_proc)
        self._events_proc = None
        super().stop()

    # ------------------------------------------------------------------ ctr
    def images(self) -> list[str]:
        return [l for l in self.ctr("images", "ls", "-q").stdout.split() if l]

    def remove_all(self) -> None:
        """Kill and delete every task and container, remove every image (synchronous GC)."""
        for cid in self.ctr("containers", "ls", "-q", check=False).stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False, timeout=30)
            for _ in range(50):
                if self.ctr("tasks", "delete", cid, check=False, timeout=30).returncode == 0:
                    break
                if "not found" in self.ctr("tasks", "ls", check=False).stdout:
                    break
                time.sleep(0.1)
            self.ctr("containers", "delete", cid, check=False, timeout=30)
        imgs = self.images()
        if imgs:
            self.ctr("images", "rm", "--sync", *imgs, check=False, timeout=300)

    def assert_cold(self, snapshotter: str = "overlayfs") -> None:
        left = self.ctr("content", "ls", "-q").stdout.split()
        snaps = self.ctr("snapshots", "--snapshotter", snapshotter, "ls", check=False).stdout.strip().splitlines()[1:]
        if left or snaps:
            raise RuntimeError(f"containerd not cold: {len(left)} blobs, {len(snaps)} {snapshotter} snapshots left")


class NydusSnapshotter(tb.SnapshotterProcess):
    """`nydus-snapshotter` for one mount mode, as the containerd proxy plugin `nydus-MODE`.

    Started inside the link's network namespace (its mount daemons inherit it,
    so every chunk crosses the shaped link), with root and cache on the suite's
    fast disk.  `reset()` makes the node cold again: stop it and the mount
    daemons it started (pid files under its root), unmount, wipe root and
    cache, start again.
    """

    def __init__(self, fsmode: str, base: str | os.PathLike, socket: str, *, learn: str = "off"):
        # learn (rafs.learned, `[daemon] learn`): "off" for every mode but erofs+learned, whose own
        # snapshotter has "use" -- a record published by one mode must not prefetch for another
        suffix = "" if learn == "off" else f"-learn{learn}"
        super().__init__(base, config={"daemon": {"mode": fsmode, "prefetch": False, "learn": learn},
                                       "backend": {"plain_http": True}},
                         log_level="info", address=socket,
                         log_path=Path(base).parent / f"snapshotter-{fsmode}{suffix}.log")
        self.fsmode = fsmode
        self.learn = learn
        self.name = f"{SNAPSHOTTER}-{fsmode}{suffix}"

    def start(self, cleanup: Cleanup | None = None, netns: str | None = None,
              timeout: float = 30) -> "NydusSnapshotter":
        super().start(timeout=timeout, netns=netns)
        if cleanup is not None:
            cleanup.push(self.teardown, f"stop {self.name}")
        return self

    def is_clean(self) -> list[str]:
        """What keeps this node from being cold ([] = cold): cached files, lazy mounts, live daemons."""
        left = [str(p) for p in self.cache.rglob("*") if p.is_file()][:3]
        left += mounts_below(self.root)
        for pid in self.daemon_pids():
            if str(self.root) in cmdline(pid):
                left.append(f"daemon pid {pid}")
        return left

    def reset(self, netns: str | None, ctd: "Containerd | None" = None, wait: float = 5.0) -> str:
        """Make the node cold for this snapshotter; returns how ("clean" or "restarted").

        After `ctr images rm --sync` the snapshotter itself should have unmounted, stopped the
        daemon and deleted the cache (that is its Remove/Cleanup contract).  If it did not, or the
        link's netns changed, it is stopped, wiped and started again in `netns`.
        """
        if self.running and netns == self.netns:
            deadline = time.monotonic() + wait
            while self.is_clean() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not self.is_clean():
                return "clean"
            log.warning("%s not cold after image removal (%s): restarting it", self.name, self.is_clean())
        self.teardown()
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.cache, ignore_errors=True)
        self.start(netns=netns)
        if ctd is not None:
            self.wait_ready(ctd)
        return "restarted"

    def wait_ready(self, ctd: "Containerd", timeout: float = 60.0) -> None:
        """Until containerd's proxy connection reaches the snapshotter (gRPC reconnects with backoff).

        `ctr snapshots ls` of an empty snapshotter never reaches the backend, so the probe is a
        Prepare (and Remove) of a throwaway active snapshot.
        """
        deadline = time.monotonic() + timeout
        n = 0
        while True:
            n += 1
            key = f"pnb-probe-{os.getpid()}-{n}"
            r = ctd.ctr("snapshots", "--snapshotter", self.name, "prepare", key, check=False, timeout=30)
            if r.returncode == 0:
                ctd.ctr("snapshots", "--snapshotter", self.name, "rm", key, check=False, timeout=30)
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd cannot reach {self.name}: {r.stderr.strip()[-300:]}")
            time.sleep(0.3)

    def rpull(self, ctd: Containerd, ref: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return run([sys.executable, "-m", "snapshotter.cli", "rpull", "--address", ctd.address, "--namespace",
                    ctd.namespace, "--snapshotter", self.name, "--plain-http", ref], netns=self.netns,
                   timeout=timeout, cwd=tb.REPO)

    def stats(self) -> dict:
        r = self.cli("status", "--root", self.root, "--config", self.config_path, "--json")
        try:
            st = json.loads(r.stdout)
        except ValueError:
            return {"error": (r.stderr or r.stdout)[-300:]}
        return {"images": st.get("images"), "mounts": st.get("mounts")}

    def daemon_stats(self, key: str) -> dict | None:
        """The full stats of the mount daemon serving lazy mount `key` (its API), which `status`
        trims (e.g. `learned`, `prefetch_bytes`); None when it is not running."""
        from snapshotter.config import load_config
        from snapshotter.lazy import RafsMounts
        from snapshotter.mounts import Layout
        try:
            lazy = RafsMounts(load_config(str(self.config_path), root=str(self.root)))
            lazy.layout = Layout(str(self.root))
            return lazy.stats(key)
        except Exception as e:  # noqa: BLE001 - stats are a report's detail, never a failed run
            return {"error": f"{type(e).__name__}: {e}"[-300:]}
