"""A private containerd and our snapshotter as real processes, for tests and benchmarks.

    with run_snapshotter(tmp / "snap") as snap:                      # nydus-snapshotter
        with run_containerd(tmp / "ctd", snapshotter=snap) as ctd:   # Debian's containerd
            ctd.ctr("images", "ls")
            ctd.ctr_run("127.0.0.1:5000/img:tag", "c1", "cat", "/etc/hello.txt", snapshotter="nydus")

containerd gets its own state, sockets, config and opt dir under its work dir (its root there
too unless given elsewhere) and its own namespace, so it never meets the machine's other
containerd daemons; our snapshotter (`python -m snapshotter.cli`, what the `nydus-snapshotter`
script runs) is one of its proxy plugins. Each runs in its own session, tied to our life
(`testbed.process.spawn`), and is stopped by pid (SIGTERM, then SIGKILL); `stop()` also
kills containerd's tasks and shims and unmounts what is left under its dirs; the snapshotter's
`teardown()` also stops the mount daemons it started (their pid files under its work dir) and
unmounts its lazy mounts. Logs stay in the work dirs (`log_path`) and are appended to the error
of a failing `ctr`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

from rafs.osutil import MNT_DETACH, mounts_below, umount2

from .process import CommandError, kill_pid_files, netns_prefix, run, spawn, stop_process, tail

REPO = Path(__file__).resolve().parents[1]
CONTAINERD_BIN = "/usr/bin/containerd"
CTR_BIN = "/usr/bin/ctr"
SNAPSHOTTER_NAME = "nydus"


def mounts_under(path: str | os.PathLike) -> list[str]:
    """Mount points at or below `path` (deepest first)."""
    return sorted(mounts_below(path), key=len, reverse=True)


def unmount_under(path: str | os.PathLike) -> list[str]:
    """Unmount (lazily if busy) everything mounted at or below `path`; returns what was mounted."""
    found = mounts_under(path)
    for mp in found:
        try:
            umount2(mp)
        except OSError:
            try:
                umount2(mp, MNT_DETACH)
            except OSError:
                pass
    return found


@contextmanager
def running_node(snap: "SnapshotterProcess", ctd: "Containerd", leak_root: str | os.PathLike | None = None
         ) -> Iterator[tuple["SnapshotterProcess", "Containerd"]]:
    """A node: start the snapshotter, then containerd; stop containerd, then the snapshotter with its mount
    daemons and mounts, also on failure. With `leak_root`, fail if any mount is left below it."""
    try:
        snap.start()
        ctd.start()
        yield snap, ctd
    finally:
        try:
            ctd.stop()
        finally:
            snap.teardown()
        if leak_root is not None:
            left = mounts_under(leak_root)
            assert not left, f"mounts left behind: {left}"


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):                             # an inline table (e.g. a list of mirror tables)
        return "{" + ", ".join(f"{_toml(str(k))} = {_toml(x)}" for k, x in v.items()) + "}"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


# ------------------------------------------------------------------------------ snapshotter

class SnapshotterProcess:
    """`python -m snapshotter.cli` as a subprocess, with root, cache and config under `workdir`.

    `config`: top-level keys and tables ({"daemon": {...}, "p2p": {...}}; the daemon's `cache_dir`
    defaults to WORKDIR/cache). `address` defaults to WORKDIR/snapshotter.sock (a unix socket
    path must stay under 108 bytes: give a short one for a deep work dir). `start(netns=...)`
    runs it (and so the mount daemons it starts) in that network namespace.
    """

    def __init__(self, workdir: str | os.PathLike, *, lazy: bool = True, config: dict | None = None,
                 log_level: str = "debug", address: str | None = None,
                 log_path: str | os.PathLike | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root = self.workdir / "root"
        self.cache = self.workdir / "cache"
        self.address = address or str(self.workdir / "snapshotter.sock")
        self.log_path = Path(log_path) if log_path else self.workdir / "snapshotter.log"
        self.config_path = self.workdir / "config.toml"
        self.lazy = lazy
        self.log_level = log_level
        self.netns: str | None = None
        self.proc: subprocess.Popen | None = None
        self._write_config(config or {})

    def _write_config(self, config: dict) -> None:
        lines = []
        # learned prefetch off unless a test asks for it: tests and benchmarks count exact fetches and
        # registry requests, and a record left by an earlier test would prefetch more
        tables = {"daemon": {"cache_dir": str(self.cache), "learn": "off", **config.get("daemon", {})},
                  "backend": config.get("backend", {})}
        for k, v in config.items():
            if isinstance(v, dict):
                tables.setdefault(k, v)          # [p2p], ...: any other table, as given
            else:
                lines.append(f"{k} = {_toml(v)}")
        for name, table in tables.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "snapshotter.cli", "--root", str(self.root), "--address", self.address,
               "--config", str(self.config_path), "--log-level", self.log_level]
        return cmd + ([] if self.lazy else ["--no-lazy"])

    def start(self, timeout: float = 30, netns: str | None = None) -> "SnapshotterProcess":
        """Start it (in network namespace `netns`) and wait until its socket accepts."""
        if self.running:
            return self
        self.netns = netns
        try:
            os.unlink(self.address)
        except FileNotFoundError:
            pass
        self.proc = spawn(self.command, self.log_path, cwd=REPO, netns=netns)
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.address):     # the socket appears once it accepts
            if self.proc.poll() is not None:
                raise RuntimeError(f"nydus-snapshotter exited ({self.proc.returncode}):\n{tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nydus-snapshotter did not listen on {self.address}:\n{tail(self.log_path)}")
            time.sleep(0.02)
        return self

    def stop(self, *, kill: bool = False) -> None:
        """Stop the snapshotter process only (`kill`: SIGKILL at once); its mount daemons live on."""
        if kill and self.running:
            self.proc.kill()
            self.proc.wait(timeout=10)
        stop_process(self.proc, group=True)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start(netns=self.netns)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def teardown(self) -> None:
        """Stop the snapshotter, its mount daemons and every mount under its work dir; remove its
        run dir (under /run)."""
        self.stop()
        self.stop_daemons()
        unmount_under(self.workdir)
        from snapshotter.lazy import default_run_dir
        run_dir = Path(default_run_dir(self.root))
        unmount_under(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
        try:
            run_dir.parent.rmdir()                  # /run/nydus-snapshotter, if nothing else uses it
        except OSError:
            pass

    def stop_daemons(self) -> list[int]:
        """Stop the processes the snapshotter started (mount daemons, standby: pid files under the
        work dir; only while their command line names it); returns their pids."""
        return kill_pid_files(self.workdir.rglob("*.pid"), expect=str(self.workdir))

    def daemon_pids(self) -> list[int]:
        """Pids of the mount daemons (ROOT/rafs/<key>/daemon.pid)."""
        out = []
        for f in sorted((self.root / "rafs").glob("*/daemon.pid")):
            try:
                out.append(int(f.read_text().strip()))
            except (OSError, ValueError):
                pass
        return out

    # -- talking to it
    def client(self, **kw):
        from snapshotter.client import SnapshotsClient
        return SnapshotsClient.connect(self.address, SNAPSHOTTER_NAME, **kw)

    def cli(self, *args, timeout: float = 60, netns: str | None = None) -> subprocess.CompletedProcess:
        """`nydus-snapshotter ARGS` (e.g. status --root ...), never raising on failure."""
        return run([sys.executable, "-m", "snapshotter.cli", *args], check=False, timeout=timeout,
                   cwd=REPO, netns=netns)

    def status(self) -> dict:
        """`nydus-snapshotter status --root ROOT --json` (what it finds through ROOT/runtime.json)."""
        r = self.cli("status", "--root", self.root, "--json")
        if r.returncode != 0:
            raise CommandError(["nydus-snapshotter", "status"], r.returncode, r.stdout, r.stderr)
        return json.loads(r.stdout)

    # -- its log
    def log(self) -> str:
        return tail(self.log_path, 200_000)

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def wait_log(self, text: str, timeout: float = 20, since: int = 0) -> bool:
        """Wait until `text` appears in the log (after byte `since`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_path.read_text(errors="replace")[since:]:
                return True
            time.sleep(0.1)
        return False


@contextmanager
def run_snapshotter(workdir: str | os.PathLike, **kw) -> Iterator[SnapshotterProcess]:
    snap = SnapshotterProcess(workdir, **kw)
    try:
        snap.start()
        yield snap
    finally:
        snap.teardown()


# ------------------------------------------------------------------------------ containerd

CAP_SYS_RESOURCE = 24


def _has_cap(cap: int) -> bool:
    """Whether this process has capability `cap` (bit number) in its effective set."""
    try:
        with open("/proc/self/status") as f:
            eff = next(int(l.split()[1], 16) for l in f if l.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return True
    return bool(eff >> cap & 1)


_NOT_NEEDED_WITHOUT_CRI = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
                           "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
                           "io.containerd.snapshotter.v1.devmapper"]


class Containerd:
    """Debian's containerd with its own state, sockets, config and namespace under `workdir`.

    `root`: its content and snapshots (default WORKDIR/root; a benchmark puts it on a fast disk).
    `snapshotter`: our SnapshotterProcess as the proxy plugin "nydus" (and the CRI plugin's
    snapshotter); `snapshotters`: more proxy plugins, {name: socket}. `cri=False` disables the
    CRI plugin (no stream-server port) and the snapshotters nobody uses here. `sandbox_image`: the
    CRI plugin's pause image (RunPodSandbox pulls it from there; default containerd's registry.k8s.io
    one, unreachable offline). `ctr` failures raise CommandError with the tails of containerd's and
    the snapshotter's logs.
    """

    def __init__(self, workdir: str | os.PathLike, *, root: str | os.PathLike | None = None,
                 snapshotter: SnapshotterProcess | None = None, snapshotters: Mapping[str, str] | None = None,
                 namespace: str | None = None, cri: bool = True, registry_host: str | None = None,
                 cri_annotations: bool = True, sandbox_image: str | None = None, log_level: str = "debug",
                 log_path: str | os.PathLike | None = None, ctr_timeout: float = 120):
        self.workdir = Path(workdir)
        self.root = Path(root) if root else self.workdir / "root"
        self.state = self.workdir / "state"
        self.address = str(self.workdir / "containerd.sock")
        self.config_path = self.workdir / "config.toml"
        self.log_path = Path(log_path) if log_path else self.workdir / "containerd.log"
        self.snapshotter = snapshotter
        self.snapshotters = dict(snapshotters or {})
        if snapshotter is not None:
            self.snapshotters = {SNAPSHOTTER_NAME: snapshotter.address, **self.snapshotters}
        self.namespace = namespace or "t" + uuid.uuid4().hex[:10]      # unique per instance
        self.cri = cri
        self.registry_host = registry_host
        self.cri_annotations = cri_annotations
        self.sandbox_image = sandbox_image
        self.log_level = log_level
        self.ctr_timeout = ctr_timeout
        self.proc: subprocess.Popen | None = None

    def config(self) -> str:
        w, q = self.workdir, _toml
        cfg = ["version = 2", f"root = {q(self.root)}", f"state = {q(self.state)}"]
        if not self.cri:
            cfg.append(f"disabled_plugins = {q(_NOT_NEEDED_WITHOUT_CRI)}")
        cfg += ["[grpc]", f"  address = {q(self.address)}",
                "[ttrpc]", f"  address = {q(self.address + '.ttrpc')}",
                "[debug]", f"  level = {q(self.log_level)}"]
        for name, sock in self.snapshotters.items():
            cfg += [f"[proxy_plugins.{q(name)}]", '  type = "snapshot"', f"  address = {q(sock)}"]
        cfg += ['[plugins."io.containerd.internal.v1.opt"]', f"  path = {q(w / 'opt')}"]
        if self.cri:
            cfg += [
                '[plugins."io.containerd.grpc.v1.cri"]',
                "  disable_tcp_service = true",
                '  stream_server_address = "127.0.0.1"',
                '  stream_server_port = "0"',
                *([f"  sandbox_image = {q(self.sandbox_image)}"] if self.sandbox_image else []),
                # the sandbox's oom_score_adj -998 needs CAP_SYS_RESOURCE, which a containerized CI lacks
                f"  restrict_oom_score_adj = {q(not _has_cap(CAP_SYS_RESOURCE))}",
                '  [plugins."io.containerd.grpc.v1.cri".containerd]',
                f"    snapshotter = {q(SNAPSHOTTER_NAME if self.snapshotter else 'overlayfs')}",
                f"    disable_snapshot_annotations = {q(not self.cri_annotations)}",
                '  [plugins."io.containerd.grpc.v1.cri".cni]',
                f"    bin_dir = {q(w / 'cni' / 'bin')}",
                f"    conf_dir = {q(w / 'cni' / 'conf')}",
            ]
            if self.registry_host:
                cfg += [f'  [plugins."io.containerd.grpc.v1.cri".registry.mirrors.{q(self.registry_host)}]',
                        f"    endpoint = {q(['http://' + self.registry_host])}"]
        return "\n".join(cfg) + "\n"

    def start(self, timeout: float = 30) -> "Containerd":
        """Start it and wait until `ctr version` answers."""
        if not os.path.exists(CONTAINERD_BIN):
            raise RuntimeError(f"{CONTAINERD_BIN} missing (apt-get install containerd)")
        for d in (self.workdir, self.root, self.workdir / "cni" / "bin", self.workdir / "cni" / "conf"):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        self.proc = spawn([CONTAINERD_BIN, "--config", self.config_path], self.log_path)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited ({self.proc.returncode}):\n{tail(self.log_path)}")
            if os.path.exists(self.address) and self.ctr("version", check=False, timeout=20).returncode == 0:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"containerd did not come up:\n{tail(self.log_path)}")
            time.sleep(0.1)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Kill every task of every namespace (so the shims exit), stop containerd, its shims, and
        unmount what is left under its dirs."""
        if self.running:
            for ns in self.namespaces():
                self.kill_tasks(ns)
        stop_process(self.proc, 15, group=True)
        self.proc = None
        self._stop_shims()
        unmount_under(self.state)
        unmount_under(self.root)

    def namespaces(self) -> list[str]:
        r = run([CTR_BIN, "-a", self.address, "namespaces", "ls", "-q"], check=False, timeout=20)
        return r.stdout.split() if r.returncode == 0 else []

    def kill_tasks(self, namespace: str | None = None) -> None:
        """SIGKILL and delete every task of `namespace` (default: ours)."""
        ns = namespace or self.namespace
        for task in self.ctr("tasks", "ls", "-q", namespace=ns, check=False, timeout=20).stdout.split():
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=ns, check=False, timeout=20)
            self.ctr("tasks", "rm", "-f", task, namespace=ns, check=False, timeout=20)

    def _stop_shims(self) -> None:
        """containerd-shim-runc-v2 processes of this containerd (their bundles live under `state`)."""
        tasks = self.state / "io.containerd.runtime.v2.task"
        if not tasks.exists():
            return
        for pid_file in list(tasks.glob("*/*/shim.pid")) + list(tasks.glob("*/*/init.pid")):
            try:
                os.kill(int(pid_file.read_text().strip()), 9)
            except (OSError, ValueError):
                pass

    # -- ctr
    def ctr_cmd(self, *args, namespace: str | None = None) -> list[str]:
        return [CTR_BIN, "-a", self.address, "-n", namespace or self.namespace, *map(str, args)]

    def ctr(self, *args, namespace: str | None = None, check: bool = True, timeout: float | None = None,
            input: str | None = None, netns: str | None = None) -> subprocess.CompletedProcess:
        """`ctr ARGS` in our namespace (or `namespace`), run in network namespace `netns`."""
        cmd = self.ctr_cmd(*args, namespace=namespace)
        r = run(cmd, check=False, timeout=timeout or self.ctr_timeout, input=input, netns=netns)
        if check and r.returncode != 0:
            logs = f"--- containerd log:\n{tail(self.log_path, 3000)}"
            if self.snapshotter is not None:
                logs += f"\n--- snapshotter log:\n{tail(self.snapshotter.log_path, 3000)}"
            raise CommandError([*netns_prefix(netns), *cmd], r.returncode, r.stdout, r.stderr, logs)
        return r

    def ctr_run(self, image: str, cid: str, *cmd, snapshotter: str = SNAPSHOTTER_NAME, rm: bool = True,
                namespace: str | None = None, timeout: float = 120, check: bool = True,
                extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        args = ["run", *(["--rm"] if rm else []), "--snapshotter", snapshotter, *extra, image, cid, *cmd]
        return self.ctr(*args, namespace=namespace, timeout=timeout, check=check)

    def wait_snapshotter(self, name: str = SNAPSHOTTER_NAME, timeout: float = 15) -> float:
        """Wait until containerd reaches the proxy snapshotter `name` again (after a snapshotter
        restart containerd's gRPC client is in backoff, at most 3 s in 1.6); returns the seconds
        waited. `ctr snapshots usage` of a proxy reaches it."""
        t0 = time.monotonic()
        while True:
            r = self.ctr("snapshots", "--snapshotter", name, "usage", check=False, timeout=30)
            if r.returncode == 0 or time.monotonic() - t0 > timeout:
                return time.monotonic() - t0
            time.sleep(0.2)

    def channel(self):
        from snapshotter.client import unix_channel
        return unix_channel(self.address)

    def log(self) -> str:
        return tail(self.log_path, 200_000)

    def __enter__(self) -> "Containerd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def run_containerd(workdir: str | os.PathLike, **kw) -> Iterator[Containerd]:
    ctd = Containerd(workdir, **kw)
    try:
        ctd.start()
        yield ctd
    finally:
        ctd.stop()
