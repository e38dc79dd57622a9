"""Failover and hot upgrade of mount daemons (issue #12): readers see a pause, never an error.

A reader process keeps reading every file of a lazily mounted image and checking its md5 against
the source, with each file's page cache dropped first (POSIX_FADV_DONTNEED), so reads reach the
daemon, while the daemon serving the mount is SIGKILLed five times (the holder restarts it on the
same FUSE connection) or replaced by `nydusify upgrade`. Zero errors, zero wrong bytes. The same under
the snapshotter and containerd: a running busybox container checks its files in a loop while its mount
daemon is SIGKILLed five times and then replaced by `nydus-snapshotter upgrade-daemons`. The statistics
carry over (`<state>/stats.json`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rafs.mounttab import clear_stale, read_holder, read_info
from tests.helpers.mounts import MODES, REPO, convert_into, lazy_source, mounter, nydusify, pid_alive  # noqa: F401

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE and kernel mounts)"),
              pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo")]

KILLS = 5


@pytest.fixture(scope="module")
def failover_ref(lazy_source, registry_session) -> str:
    return convert_into(registry_session, lazy_source.ref, "failover/lazy")


class Reader:
    def __init__(self, root: Path, files: dict, work: Path):
        self.work = work
        self.stop = work / "stop"
        self.result = work / "result.json"
        expected = work / "expected.json"
        expected.write_text(json.dumps({p: hashlib.md5(c.read()).hexdigest() for p, c in files.items()}))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.reader", str(root), str(expected),
                                      str(self.stop), str(self.result)], cwd=REPO)

    def finish(self, timeout: float = 60) -> dict:
        self.stop.touch()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("the reader hung")
        return json.loads(self.result.read_text())


def serving_pid(m) -> int | None:
    info = read_info(m.state) or {}
    pid = info.get("pid")
    return pid if isinstance(pid, int) and pid_alive(pid) else None


def wait_new_daemon(m, old: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = serving_pid(m)
        if pid and pid != old:
            try:
                if m.api().daemon()["pid"] == pid:
                    return pid
            except Exception:       # noqa: BLE001 - not answering yet
                pass
        time.sleep(0.02)
    raise AssertionError(f"no new daemon after {old}:\n{Path(m.state.log).read_text(errors='replace')[-3000:]}")


def hard_cleanup(m) -> None:
    """Whatever a failed test left: the mount, its holder and daemon."""
    if m is None:
        return
    pid = serving_pid(m)
    if pid:
        m.pid = pid                 # the mounter's cleanup unmounts through the serving daemon
        return
    holder = read_holder(m.state)
    if holder:
        os.kill(holder["pid"], signal.SIGKILL)
    try:
        clear_stale(str(m.path), m.state)
    except Exception:               # noqa: BLE001
        pass


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_five_times_under_readers(mode, mounter, failover_ref, lazy_source, tmp_path):
    m = mounter.mount(failover_ref, mode=mode, extra=("--holder", "on"))
    reader = None
    try:
        holder = read_holder(m.state)
        assert holder and pid_alive(holder["pid"]), "no holder"
        reader = Reader(m.path, lazy_source.files, tmp_path)
        pid = m.pid
        assert m.stats()["pid"] == pid
        for n in range(KILLS):
            time.sleep(0.6)
            os.kill(pid, signal.SIGKILL)
            pid = wait_new_daemon(m, pid)
            m.pid = pid
            st = m.stats()
            assert st["pid"] == pid and st["mode"] == mode
        time.sleep(0.6)
        res = reader.finish()
        reader = None
        assert res["errors"] == 0 and res["wrong"] == 0, res["error_list"]
        assert res["reads"] > len(lazy_source.files) * 2, res["reads"]
        assert read_holder(m.state)["pid"] == holder["pid"]
    finally:
        if reader is not None:
            reader.finish()
        hard_cleanup(m)


@pytest.mark.parametrize("mode", MODES)
def test_upgrade_under_readers(mode, mounter, failover_ref, lazy_source, tmp_path):
    m = mounter.mount(failover_ref, mode=mode, extra=("--holder", "on"))
    reader = None
    try:
        reader = Reader(m.path, lazy_source.files, tmp_path)
        for _ in range(2):
            time.sleep(0.6)
            old = m.pid
            r = nydusify("upgrade", m.path, "--run-dir", m.run_dir)
            assert r.returncode == 0, r.stdout + r.stderr
            m.pid = wait_new_daemon(m, old)
            assert not pid_alive(old)
        time.sleep(0.6)
        res = reader.finish()
        reader = None
        assert res["errors"] == 0 and res["wrong"] == 0, res["error_list"]
    finally:
        if reader is not None:
            reader.finish()
        hard_cleanup(m)


def test_umount_ends_the_holder(mounter, failover_ref):
    m = mounter.mount(failover_ref, mode="fuse", extra=("--holder", "on"))
    holder = read_holder(m.state)
    os.kill(m.pid, signal.SIGKILL)
    m.pid = wait_new_daemon(m, m.pid)
    m.umount()
    deadline = time.monotonic() + 10
    while pid_alive(holder["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(holder["pid"])
    assert not os.path.ismount(m.path)


def test_holder_is_restartable(mounter, failover_ref, lazy_source, tmp_path):
    """SIGKILL the holder: the daemon starts a new one with its copy of the fd; then SIGKILL the daemon:
    the new holder restarts it on the same connection. The reader sees nothing."""
    m = mounter.mount(failover_ref, mode="fuse", extra=("--holder", "on"))
    reader = None
    try:
        reader = Reader(m.path, lazy_source.files, tmp_path)
        first = read_holder(m.state)["pid"]
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            h = read_holder(m.state)
            if h and h["pid"] != first:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("no new holder:\n" + Path(m.state.log).read_text(errors="replace")[-3000:])
        time.sleep(0.5)
        os.kill(m.pid, signal.SIGKILL)
        m.pid = wait_new_daemon(m, m.pid)
        time.sleep(0.6)
        res = reader.finish()
        reader = None
        assert res["errors"] == 0 and res["wrong"] == 0, res["error_list"]
    finally:
        if reader is not None:
            reader.finish()
        hard_cleanup(m)


# ------------------------------------------------------------------ under the snapshotter and containerd

NODE_TOOLS = all(shutil.which(b) for b in ("containerd", "ctr", "runc")) and os.path.isfile("/bin/busybox")
CTD_FILES = {f"data/f{i}": i for i in range(4)}       # 512 KiB of random bytes each, 64 KiB chunks

# the container's loop: `md5sum -c` of every data file against the expected digests, until /out/stop
# exists; a pass bumps /out/ok, a failure (wrong bytes or a read error) appends md5sum's output to /out/fails
CTD_LOOP = ("n=0; while [ ! -e /out/stop ]; do "
            "if md5sum -c /out/expected > /out/last 2>&1; then n=$((n+1)); echo $n > /out/ok; "
            "else cat /out/last >> /out/fails; fi; done; echo $n > /out/done")


@pytest.fixture(scope="module")
def ctd_image(registry_session, tmp_path_factory):
    """A busybox image with /data/f0..f3 (random, read by no container's start), converted to nydus."""
    from converter.convert import ConvertOptions, convert
    from tests.helpers import images as im
    import uuid
    work = tmp_path_factory.mktemp("failover-ctd")
    blobs = {name: im.random(512 << 10, seed=100 + i) for name, i in CTD_FILES.items()}
    layers = im.busybox_image_layers() + [[im.Entry.dir("data")] +
                                           [im.Entry.file(n, b) for n, b in blobs.items()]]
    layout = im.build_oci_layout(work / "layout", "bb", layers, config_overrides=im.BUSYBOX_CONFIG)
    ref = f"{registry_session.host}/failover-{uuid.uuid4().hex[:8]}:nydus"
    convert(layout.ref, ref, ConvertOptions(plain_http=True, chunk_size=64 << 10))
    expected = "".join(f"{hashlib.md5(b.read()).hexdigest()}  /{n}\n" for n, b in blobs.items())
    return ref, expected


class ContainerReader:
    """A container running CTD_LOOP, with /out bound to a host directory, and a host thread that drops
    the page cache of every file of the snapshotter's mounts (POSIX_FADV_DONTNEED) so reads reach the daemon."""

    def __init__(self, ctd, snap, ref: str, expected: str, work: Path, cid: str):
        import threading
        from snapshotter.lazy import default_run_dir
        self.ctd, self.cid, self.out = ctd, cid, work / "out"
        self.out.mkdir()
        (self.out / "expected").write_text(expected)
        self.roots = [str(snap.workdir), default_run_dir(snap.root)]
        ctd.ctr("run", "-d", "--snapshotter", "nydus", "--mount",
                f"type=bind,src={self.out},dst=/out,options=rbind:rw", ref, cid, "sh", "-c", CTD_LOOP)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._drop, daemon=True)
        self.thread.start()

    def _drop(self) -> None:
        from testbed.containerd import mounts_under
        while not self.done.is_set():
            for root in self.roots:
                for mp in mounts_under(root) if os.path.isdir(root) else []:
                    for d, _, names in os.walk(mp):
                        for n in names:
                            try:
                                fd = os.open(os.path.join(d, n), os.O_RDONLY | os.O_NONBLOCK)
                            except OSError:
                                continue
                            try:
                                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                            except OSError:
                                pass
                            finally:
                                os.close(fd)
            self.done.wait(0.05)

    def passes(self) -> int:
        try:
            return int((self.out / "ok").read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def wait_passes(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.passes() < n:
            assert time.monotonic() < deadline, f"the container passed {self.passes()} times, not {n}"
            assert not (self.out / "fails").exists(), (self.out / "fails").read_text()
            time.sleep(0.05)

    def finish(self) -> tuple[int, str]:
        (self.out / "stop").touch()
        deadline = time.monotonic() + 60
        while not (self.out / "done").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.done.set()
        self.thread.join(10)
        self.ctd.ctr("tasks", "kill", "-s", "SIGKILL", self.cid, check=False)
        fails = (self.out / "fails").read_text() if (self.out / "fails").exists() else ""
        assert (self.out / "done").exists(), "the container's loop did not stop"
        return self.passes(), fails


def _node(tmp_path, mode: str, images_host: str):
    from testbed.containerd import Containerd, SnapshotterProcess
    snap = SnapshotterProcess(tmp_path / "snap", config={"daemon": {"mode": mode}})
    ctd = Containerd(tmp_path / "ctd", snapshotter=snap, registry_host=images_host)
    return snap, ctd


def _mount_pid(snap) -> int:
    [m] = snap.status()["mounts"]
    return m["pid"]


def _wait_mount_pid(snap, old: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            [m] = snap.status()["mounts"]
            if m["pid"] != old and m.get("daemon_alive", True) and pid_alive(m["pid"]):
                return m["pid"]
        except Exception:           # noqa: BLE001 - status between two daemons
            pass
        time.sleep(0.05)
    raise AssertionError(f"no new mount daemon after {old}:\n{snap.log()[-3000:]}")


@pytest.mark.skipif(not NODE_TOOLS, reason="needs containerd, ctr, runc and busybox-static")
@pytest.mark.parametrize("mode", MODES)
def test_container_reads_through_daemon_kills_and_upgrade(mode, ctd_image, registry_session, tmp_path):
    """Under the snapshotter: a running container keeps checking its files while its mount daemon is
    SIGKILLed five times, then while `nydus-snapshotter upgrade-daemons` replaces it: zero errors, zero
    wrong bytes (each failure of `md5sum -c` in the container would be recorded)."""
    from testbed.containerd import running_node
    ref, expected = ctd_image
    snap, ctd = _node(tmp_path, mode, registry_session.host)
    with running_node(snap, ctd, tmp_path):
        r = snap.cli("rpull", "--address", ctd.address, "--namespace", ctd.namespace, "--plain-http", ref,
                     timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        reader = ContainerReader(ctd, snap, ref, expected, tmp_path, "failover1")
        finished = False
        try:
            reader.wait_passes(1)
            [m] = snap.status()["mounts"]
            assert m["mode"] == mode
            pid = m["pid"]
            for _ in range(KILLS):
                time.sleep(0.6)
                before = reader.passes()
                os.kill(pid, signal.SIGKILL)
                pid = _wait_mount_pid(snap, pid)
                reader.wait_passes(before + 1)          # the container keeps reading through each kill
            r = snap.cli("upgrade-daemons", "--root", snap.root, "--config", snap.config_path, timeout=120)
            assert r.returncode == 0, r.stdout + r.stderr + snap.log()[-3000:]
            assert "upgraded 1 of 1" in r.stdout, r.stdout
            new = _mount_pid(snap)
            assert new != pid and not pid_alive(pid)
            reader.wait_passes(reader.passes() + 2)
            passes, fails = reader.finish()
            finished = True
            assert fails == "", fails
            assert passes >= KILLS + 3
        finally:
            if not finished:
                try:
                    reader.finish()
                except AssertionError:
                    pass


def test_statistics_survive_a_kill_and_an_upgrade(mounter, failover_ref, lazy_source):
    """The daemon persists its counters (<state>/stats.json, every second); the one that adopts the
    mount after a SIGKILL (or a hot upgrade) continues them: `nydusify stats` never goes backwards."""
    m = mounter.mount(failover_ref, mode="fuse", extra=("--holder", "on"))
    try:
        for name, content in lazy_source.files.items():
            assert hashlib.md5((m.path / name).read_bytes()).digest() == hashlib.md5(content.read()).digest()
        time.sleep(1.5)                                   # past one save interval
        before = m.stats()
        assert before["bytes_fetched"] > 0 and before["requests_served"]["file_reads"] > 0
        os.kill(m.pid, signal.SIGKILL)
        m.pid = wait_new_daemon(m, m.pid)
        after = m.stats()
        assert after["pid"] == m.pid != before["pid"]
        for k in ("bytes_fetched", "requests", "chunks_fetched", "bytes_read"):
            assert after[k] >= before[k], (k, before[k], after[k])
        assert after["requests_served"]["file_reads"] >= before["requests_served"]["file_reads"]
        r = nydusify("stats", m.path, "--json", "--run-dir", m.run_dir)
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["bytes_fetched"] >= before["bytes_fetched"]
        r = nydusify("upgrade", m.path, "--run-dir", m.run_dir)
        assert r.returncode == 0, r.stdout + r.stderr
        old = m.pid
        m.pid = wait_new_daemon(m, old)
        upgraded = m.stats()
        assert upgraded["bytes_fetched"] >= after["bytes_fetched"] > 0
        stats_file = Path(m.state.dir) / "stats.json"
        assert stats_file.exists()
        r = m.umount()
        assert r.returncode == 0, r.stdout + r.stderr
        assert not stats_file.exists()                    # a clean umount leaves no counters behind
    finally:
        hard_cleanup(m)
