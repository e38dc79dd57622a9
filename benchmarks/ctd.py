"""A private containerd for the benchmark, and the `ctr` calls the modes make.

Its root lives on the suite's loop-mounted ext4 (next to pynydus's cache), its
state, sockets and opt dir under /run/pynydus-bench/PID, the CRI plugin is
disabled (no stream-server port), and it uses its own namespace, so it never
meets the machine's other containerd daemons.  With `snapshotters` it
also knows the proxy snapshotters `nydus-fuse` / `nydus-erofs`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

from .sysutil import Cleanup, run, stop_process, umount_all_below

log = logging.getLogger("benchmarks.ctd")

NAMESPACE = "pnbench"
SNAPSHOTTER = "nydus"


class Containerd:
    def __init__(self, root: str | os.PathLike, *, run_dir: str | os.PathLike | None = None,
                 snapshotters: dict[str, str] | None = None, namespace: str = NAMESPACE):
        self.root = Path(root)
        self.run_dir = Path(run_dir or f"/run/pynydus-bench/{os.getpid()}/containerd")
        self.socket = str(self.run_dir / "containerd.sock")
        self.snapshotters = snapshotters or {}          # proxy plugin name -> socket
        self.namespace = namespace
        self.proc: subprocess.Popen | None = None
        self.log_path = self.root.parent / "containerd.log"
        self.events: dict[tuple[str, str], float] = {}      # (topic, container id) -> monotonic arrival
        self._events_proc: subprocess.Popen | None = None

    def _config(self) -> str:
        q = lambda s: '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'  # noqa: E731
        lines = [
            "version = 2",
            f"root = {q(self.root)}",
            f"state = {q(self.run_dir / 'state')}",
            'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", '
            '"io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", '
            '"io.containerd.snapshotter.v1.devmapper"]',
            "[grpc]", f"  address = {q(self.socket)}",
            "[ttrpc]", f"  address = {q(self.socket + '.ttrpc')}",
            "[debug]", '  level = "info"',
            '[plugins."io.containerd.internal.v1.opt"]', f"  path = {q(self.run_dir / 'opt')}",
        ]
        for name, sock in self.snapshotters.items():
            lines += [f'[proxy_plugins."{name}"]', '  type = "snapshot"', f"  address = {q(sock)}"]
        return "\n".join(lines) + "\n"

    def start(self, cleanup: Cleanup, timeout: float = 20.0) -> "Containerd":
        self.root.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cleanup.push(lambda: shutil.rmtree(self.run_dir, ignore_errors=True), f"rm {self.run_dir}")
        cfg = self.run_dir / "config.toml"
        cfg.write_text(self._config())
        logf = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(["containerd", "--config", str(cfg)], stdout=logf, stderr=logf,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            logf.close()
        cleanup.push(self.stop, f"stop containerd pid {self.proc.pid}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited ({self.proc.returncode}); see {self.log_path}")
            if os.path.exists(self.socket) and self.ctr("version", check=False).returncode == 0:
                self._watch_events()
                return self
            time.sleep(0.1)
        raise RuntimeError(f"containerd did not come up in {timeout} s; see {self.log_path}")

    _EVENT_RE = re.compile(r"\s(/[a-z/]+)\s(\{.*\})\s*$")

    def _watch_events(self) -> None:
        """`ctr events` in the background: when each task was started / exited (arrival time)."""
        self._events_proc = subprocess.Popen(["ctr", "-a", self.socket, "events"], stdout=subprocess.PIPE,
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
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.remove_all()
            except Exception as e:  # noqa: BLE001 - still stop the daemon
                log.warning("removing containers: %s", e)
        stop_process(self._events_proc)
        self._events_proc = None
        stop_process(self.proc)
        self.proc = None
        # task rootfs mounts live under the state dir; nothing should remain, but never leave one behind
        umount_all_below(self.run_dir)

    # ------------------------------------------------------------------ ctr
    def ctr_cmd(self, *args) -> list[str]:
        return ["ctr", "-a", self.socket, "-n", self.namespace, *map(str, args)]

    def ctr(self, *args, check: bool = True, timeout: float | None = 900, netns=None) -> subprocess.CompletedProcess:
        return run(self.ctr_cmd(*args), check=check, timeout=timeout, netns=netns)

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


class NydusSnapshotter:
    """`nydus-snapshotter` for one mount mode, as the containerd proxy plugin `nydus-MODE`.

    Started inside the link's network namespace (its mount daemons inherit it,
    so every chunk crosses the shaped link), with root and cache on the suite's
    fast disk.  `reset()` makes the node cold again: stop it and the mount
    daemons it started (pid files under its root), unmount, wipe root and
    cache, start again.
    """

    def __init__(self, fsmode: str, base: str | os.PathLike, socket: str):
        self.fsmode = fsmode
        self.name = f"{SNAPSHOTTER}-{fsmode}"
        self.base = Path(base)
        self.root = self.base / "root"
        self.cache = self.base / "cache"
        self.socket = socket
        self.config_path = self.base / "config.toml"
        self.log_path = self.base.parent / f"snapshotter-{fsmode}.log"
        self.proc: subprocess.Popen | None = None
        self.netns: str | None = None

    def _write_config(self) -> None:
        self.config_path.write_text("\n".join([
            "[daemon]", f'mode = "{self.fsmode}"', f'cache_dir = "{self.cache}"', "prefetch = false",
            "[backend]", "plain_http = true", ""]))

    def start(self, cleanup: Cleanup | None = None, netns: str | None = None, timeout: float = 30) -> "NydusSnapshotter":
        import sys
        from .sysutil import netns_prefix
        self.netns = netns
        self.base.mkdir(parents=True, exist_ok=True)
        self._write_config()
        try:
            os.unlink(self.socket)
        except FileNotFoundError:
            pass
        logf = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [*netns_prefix(netns), sys.executable, "-m", "snapshotter.cli", "--root", str(self.root),
                 "--address", self.socket, "--config", str(self.config_path), "--log-level", "info"],
                cwd=Path(__file__).resolve().parents[1], stdout=logf, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            logf.close()
        if cleanup is not None:
            cleanup.push(self.stop, f"stop {self.name}")
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not come up; see {self.log_path}")
            time.sleep(0.02)
        return self

    def _daemon_pids(self) -> list[int]:
        out = []
        for f in self.root.glob("rafs/*/daemon.pid"):
            try:
                out.append(int(f.read_text().strip()))
            except (OSError, ValueError):
                pass
        return out

    def stop(self) -> None:
        from .sysutil import kill_pid
        stop_process(self.proc)
        self.proc = None
        for pid in self._daemon_pids():          # daemons outlive the snapshotter by design
            kill_pid(pid, expect=str(self.root))
        umount_all_below(self.base)
        try:
            from snapshotter.lazy import default_run_dir
            rd = Path(default_run_dir(self.root))
            umount_all_below(rd)
            shutil.rmtree(rd, ignore_errors=True)
            try:
                rd.parent.rmdir()                  # /run/nydus-snapshotter, if nothing else uses it
            except OSError:
                pass
        except ImportError:
            pass

    def is_clean(self) -> list[str]:
        """What keeps this node from being cold ([] = cold): cached files, lazy mounts, live daemons."""
        from .sysutil import mounts_below
        left = [str(p) for p in self.cache.rglob("*") if p.is_file()][:3]
        left += mounts_below(self.root)
        from .sysutil import cmdline
        for pid in self._daemon_pids():
            if str(self.root) in cmdline(pid):
                left.append(f"daemon pid {pid}")
        return left

    def reset(self, netns: str | None, ctd: "Containerd | None" = None, wait: float = 5.0) -> str:
        """Make the node cold for this snapshotter; returns how ("clean" or "restarted").

        After `ctr images rm --sync` the snapshotter itself should have unmounted, stopped the
        daemon and deleted the cache (that is its Remove/Cleanup contract).  If it did not, or the
        link's netns changed, it is stopped, wiped and started again in `netns`.
        """
        if self.proc is not None and self.proc.poll() is None and netns == self.netns:
            deadline = time.monotonic() + wait
            while self.is_clean() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not self.is_clean():
                return "clean"
            log.warning("%s not cold after image removal (%s): restarting it", self.name, self.is_clean())
        self.stop()
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
        import sys
        return run([sys.executable, "-m", "snapshotter.cli", "rpull", "--address", ctd.socket, "--namespace",
                    ctd.namespace, "--snapshotter", self.name, "--plain-http", ref], netns=self.netns,
                   timeout=timeout, cwd=Path(__file__).resolve().parents[1])

    def stats(self) -> dict:
        import json
        import sys
        r = run([sys.executable, "-m", "snapshotter.cli", "status", "--root", str(self.root), "--config",
                 str(self.config_path), "--json"], check=False, timeout=60, cwd=Path(__file__).resolve().parents[1])
        try:
            st = json.loads(r.stdout)
        except ValueError:
            return {"error": (r.stderr or r.stdout)[-300:]}
        return {"images": st.get("images"), "mounts": st.get("mounts")}
