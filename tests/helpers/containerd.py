"""Real containerd + our snapshotter for tests.

    with run_snapshotter(tmp / "snap") as snap:              # nydus-snapshotter as a subprocess
        with run_containerd(tmp / "ctd", snapshotter=snap) as ctd:   # Debian's containerd, own root/state/socket
            ctd.ctr("images", "ls")
            ctd.ctr_run("127.0.0.1:5000/img:tag", "c1", "cat", "/etc/hello.txt", snapshotter="nydus")

Every process is started in its own session and stopped (SIGTERM, then SIGKILL)
on exit, even when the test fails; containerd's leftover task mounts and the
snapshotter's lazy mounts under the test dirs are unmounted; each test uses its
own containerd namespace(s). Logs stay in the work dirs (``ctd.log_path``,
``snap.log_path``) and are appended to failure messages.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]
CONTAINERD_BIN = "/usr/bin/containerd"
CTR_BIN = "/usr/bin/ctr"
SNAPSHOTTER_NAME = "nydus"


def _die_with_parent() -> None:
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen | None, timeout: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (deepest first)."""
    root = os.path.realpath(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == root or mp.startswith(root + "/"):
                out.append(mp)
    return sorted(out, key=len, reverse=True)


def unmount_under(path: Path) -> list[str]:
    """Unmount (lazily if busy) everything mounted below ``path``; returns what was mounted."""
    from snapshotter.mounts import unmount
    found = mounts_under(path)
    for mp in found:
        try:
            unmount(mp)
        except OSError:
            try:
                unmount(mp, lazy=True)
            except OSError:
                pass
    return found


# ------------------------------------------------------------------------------ snapshotter

class SnapshotterProcess:
    """``python -m snapshotter.cli`` (what the ``nydus-snapshotter`` script runs) as a subprocess."""

    def __init__(self, workdir: str | os.PathLike, *, lazy: bool = True, config: dict | None = None,
                 log_level: str = "debug"):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root = self.workdir / "root"
        self.address = str(self.workdir / "snapshotter.sock")
        self.log_path = self.workdir / "snapshotter.log"
        self.config_path = self.workdir / "config.toml"
        self.lazy = lazy
        self.log_level = log_level
        self.proc: subprocess.Popen | None = None
        self._write_config(config or {})

    def _write_config(self, config: dict) -> None:
        lines = []
        daemon = {"cache_dir": str(self.workdir / "cache"), **config.get("daemon", {})}
        backend = config.get("backend", {})
        for k, v in config.items():
            if k not in ("daemon", "backend"):
                lines.append(f"{k} = {_toml(v)}")
        lines.append("[daemon]")
        lines += [f"{k} = {_toml(v)}" for k, v in daemon.items()]
        lines.append("[backend]")
        lines += [f"{k} = {_toml(v)}" for k, v in backend.items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "snapshotter.cli", "--root", str(self.root), "--address", self.address,
               "--config", str(self.config_path), "--log-level", self.log_level]
        return cmd + ([] if self.lazy else ["--no-lazy"])

    def start(self, timeout: float = 30) -> "SnapshotterProcess":
        if self.proc is not None and self.proc.poll() is None:
            return self
        try:
            os.unlink(self.address)
        except FileNotFoundError:
            pass
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(self.command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.address):
            if self.proc.poll() is not None:
                raise RuntimeError(f"nydus-snapshotter exited ({self.proc.returncode}):\n{_tail(self.log_path)}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"nydus-snapshotter did not listen on {self.address}:\n{_tail(self.log_path)}")
            time.sleep(0.02)
        return self

    def stop(self, *, kill: bool = False) -> None:
        if kill and self.proc is not None and self.proc.poll() is None:
            self.proc.kill()                 # only the snapshotter: its mount daemons live on
            self.proc.wait(timeout=10)
        _stop(self.proc)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, **kw):
        from snapshotter.client import SnapshotsClient
        return SnapshotsClient.connect(self.address, SNAPSHOTTER_NAME, **kw)

    def cli(self, *args, timeout: float = 60) -> subprocess.CompletedProcess:
        """``nydus-snapshotter ARGS`` (e.g. status --root ...)."""
        return subprocess.run([sys.executable, "-m", "snapshotter.cli", *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def log(self) -> str:
        return _tail(self.log_path, 200_000)

    def teardown(self) -> None:
        """Stop the snapshotter, its mount daemons and every mount under its work dir."""
        self.stop()
        _stop_daemons(self.workdir)
        unmount_under(self.workdir)
        from snapshotter.lazy import default_run_dir
        import shutil
        shutil.rmtree(default_run_dir(self.root), ignore_errors=True)

    def daemon_pids(self) -> list[int]:
        """Pids of the mount daemons (ROOT/rafs/<key>/daemon.pid)."""
        out = []
        for f in sorted((self.root / "rafs").glob("*/daemon.pid")):
            try:
                out.append(int(f.read_text().strip()))
            except (OSError, ValueError):
                pass
        return out

    def status(self) -> dict:
        import json
        r = self.cli("status", "--root", self.root, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def wait_log(self, text: str, timeout: float = 20, since: int = 0) -> bool:
        """Wait until ``text`` appears in the log (after byte ``since``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log_path.read_text(errors="replace")[since:]:
                return True
            time.sleep(0.1)
        return False

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0


def _stop_daemons(workdir: Path) -> None:
    """Stop the mount daemons the snapshotter started (their pid files are under its root)."""
    for pidfile in workdir.rglob("*.pid"):
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


@contextmanager
def run_snapshotter(workdir: str | os.PathLike, **kw) -> Iterator[SnapshotterProcess]:
    snap = SnapshotterProcess(workdir, **kw)
    try:
        snap.start()
        yield snap
    finally:
        snap.teardown()


# ------------------------------------------------------------------------------ containerd

class Containerd:
    """Debian's containerd with its own root, state and socket (and our snapshotter as proxy plugin)."""

    def __init__(self, workdir: str | os.PathLike, *, snapshotter: SnapshotterProcess | None = None,
                 registry_host: str | None = None, cri_annotations: bool = True):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.address = str(self.workdir / "containerd.sock")
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        self.snapshotter = snapshotter
        self.registry_host = registry_host
        self.cri_annotations = cri_annotations
        self.proc: subprocess.Popen | None = None
        self.namespace = "t" + uuid.uuid4().hex[:10]      # unique per fixture
        self._write_config()

    def _write_config(self) -> None:
        w = self.workdir
        (w / "cni" / "bin").mkdir(parents=True, exist_ok=True)
        (w / "cni" / "conf").mkdir(parents=True, exist_ok=True)
        cfg = [
            "version = 2",
            f'root = "{self.root}"',
            f'state = "{self.state}"',
            "[grpc]",
            f'  address = "{self.address}"',
            "[ttrpc]",
            f'  address = "{self.address}.ttrpc"',
            "[debug]",
            '  level = "debug"',
        ]
        if self.snapshotter is not None:
            cfg += ["[proxy_plugins]", f"  [proxy_plugins.{SNAPSHOTTER_NAME}]", '    type = "snapshot"',
                    f'    address = "{self.snapshotter.address}"']
        cfg += [
            "[plugins]",
            '  [plugins."io.containerd.internal.v1.opt"]',
            f'    path = "{w / "opt"}"',
            '  [plugins."io.containerd.grpc.v1.cri"]',
            "    disable_tcp_service = true",
            '    stream_server_address = "127.0.0.1"',
            '    stream_server_port = "0"',
            '    [plugins."io.containerd.grpc.v1.cri".containerd]',
            f'      snapshotter = "{SNAPSHOTTER_NAME if self.snapshotter else "overlayfs"}"',
            f"      disable_snapshot_annotations = {'false' if self.cri_annotations else 'true'}",
            '    [plugins."io.containerd.grpc.v1.cri".cni]',
            f'      bin_dir = "{w / "cni" / "bin"}"',
            f'      conf_dir = "{w / "cni" / "conf"}"',
        ]
        if self.registry_host:
            cfg += [f'    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{self.registry_host}"]',
                    f'      endpoint = ["http://{self.registry_host}"]']
        self.config_path.write_text("\n".join(cfg) + "\n")

    def start(self, timeout: float = 30) -> "Containerd":
        if not os.path.exists(CONTAINERD_BIN):
            raise RuntimeError(f"{CONTAINERD_BIN} missing (apt-get install containerd)")
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen([CONTAINERD_BIN, "--config", str(self.config_path)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited ({self.proc.returncode}):\n{_tail(self.log_path)}")
            if os.path.exists(self.address):
                r = subprocess.run([CTR_BIN, "-a", self.address, "version"], capture_output=True, text=True)
                if r.returncode == 0:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"containerd did not come up:\n{_tail(self.log_path)}")
            time.sleep(0.1)

    def stop(self) -> None:
        # tasks first: kill every container of our namespaces so the shims exit
        if self.proc is not None and self.proc.poll() is None:
            for ns in self.namespaces():
                self._kill_tasks(ns)
        _stop(self.proc, timeout=15)
        self.proc = None
        _stop_shims(self.state)
        unmount_under(self.state)
        unmount_under(self.root)

    def namespaces(self) -> list[str]:
        r = subprocess.run([CTR_BIN, "-a", self.address, "namespaces", "ls", "-q"], capture_output=True,
                           text=True, timeout=20)
        return r.stdout.split() if r.returncode == 0 else []

    def _kill_tasks(self, ns: str) -> None:
        r = subprocess.run([CTR_BIN, "-a", self.address, "-n", ns, "tasks", "ls", "-q"], capture_output=True,
                           text=True, timeout=20)
        for task in r.stdout.split():
            subprocess.run([CTR_BIN, "-a", self.address, "-n", ns, "tasks", "kill", "-s", "SIGKILL", task],
                           capture_output=True, timeout=20)
            subprocess.run([CTR_BIN, "-a", self.address, "-n", ns, "tasks", "rm", "-f", task],
                           capture_output=True, timeout=20)

    def ctr(self, *args, namespace: str | None = None, check: bool = True, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess:
        cmd = [CTR_BIN, "-a", self.address, "-n", namespace or self.namespace, *map(str, args)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, errors="replace",
                           stdin=None if input is not None else subprocess.DEVNULL, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}: rc={r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}\n"
                                 f"--- containerd log:\n{_tail(self.log_path, 3000)}"
                                 + (f"\n--- snapshotter log:\n{_tail(self.snapshotter.log_path, 3000)}"
                                    if self.snapshotter else ""))
        return r

    def ctr_run(self, image: str, cid: str, *cmd, snapshotter: str = SNAPSHOTTER_NAME, rm: bool = True,
                namespace: str | None = None, timeout: float = 120, check: bool = True,
                extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        args = ["run", *(["--rm"] if rm else []), "--snapshotter", snapshotter, *extra, image, cid, *cmd]
        return self.ctr(*args, namespace=namespace, timeout=timeout, check=check)

    def wait_snapshotter(self, timeout: float = 15) -> float:
        """Wait until containerd reaches the proxy snapshotter again (after a snapshotter restart containerd's
        gRPC client is in backoff, at most 3 s in 1.6); returns the seconds waited."""
        t0 = time.monotonic()
        while True:
            r = self.ctr("snapshots", "--snapshotter", SNAPSHOTTER_NAME, "usage", check=False, timeout=30)
            if r.returncode == 0 or time.monotonic() - t0 > timeout:
                return time.monotonic() - t0
            time.sleep(0.2)

    def channel(self):
        from snapshotter.client import unix_channel
        return unix_channel(self.address)

    def log(self) -> str:
        return _tail(self.log_path, 200_000)

    def __enter__(self) -> "Containerd":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _stop_shims(state: Path) -> None:
    """containerd-shim-runc-v2 processes of this containerd (their bundles live under ``state``)."""
    tasks = state / "io.containerd.runtime.v2.task"
    if not tasks.exists():
        return
    for pid_file in list(tasks.glob("*/*/shim.pid")) + list(tasks.glob("*/*/init.pid")):
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass


@contextmanager
def run_containerd(workdir: str | os.PathLike, **kw) -> Iterator[Containerd]:
    ctd = Containerd(workdir, **kw)
    try:
        ctd.start()
        yield ctd
    finally:
        ctd.stop()
