"""snapshotter.standby + ``mountd --standby``: the pre-imported launcher's protocol and hand-over.

The mounts it makes are tested under real containerd (tests/integration/test_containerd.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from snapshotter.standby import StandbyPool, standby_pid

REPO = Path(__file__).resolve().parents[2]
STANDBY = [sys.executable, "-m", "snapshotter.mountd", "--standby"]


def _wait_for(pred, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while not (v := pred()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return v


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _popen(cmd):
    return subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_standby_imports_then_waits_and_eof_ends_it():
    p = _popen(STANDBY)
    try:
        assert p.stdout.readline() == "ready\n"
        out, err = p.communicate("", timeout=10)
        assert p.returncode == 0 and out == "", err
    finally:
        p.kill()
        p.wait()


def test_standby_request_is_an_ordinary_start(tmp_path):
    """A request runs the launcher's own code path: a missing bootstrap fails the same way, exit status 1."""
    p = _popen(STANDBY)
    try:
        assert p.stdout.readline() == "ready\n"
        args = ["--bootstrap", str(tmp_path / "missing.boot"), "--ref", "h:5000/r:t", "--mountpoint",
                str(tmp_path / "m"), "--cache-dir", str(tmp_path / "c"), "--run-dir", str(tmp_path / "r"),
                "--pid-file", str(tmp_path / "p")]
        out, err = p.communicate(json.dumps(args) + "\n", timeout=10)
        assert p.returncode == 1 and "missing.boot" in err
    finally:
        p.kill()
        p.wait()


def test_pool_hands_out_a_ready_standby_once(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    pid_file = tmp_path / "standby.pid"
    pool = StandbyPool(STANDBY, pid_file)
    taken = []
    try:
        pool.refill()
        proc = pool.take(STANDBY)
        assert proc is not None and proc.poll() is None
        taken.append(proc)
        assert pool.take(STANDBY) is None                  # one standby, one start
        pool.refill()
        proc2 = pool.take(STANDBY)
        assert proc2 is not None and proc2.pid != proc.pid
        taken.append(proc2)
        pool.refill()
        pid = _wait_for(lambda: standby_pid(pid_file))
        assert pid not in (None, proc.pid, proc2.pid)
        assert pool.take([*STANDBY, "--p2p"]) is None      # imported for another config: not used
        assert not pid_file.exists() and _wait_for(lambda: _gone(pid)), f"standby {pid} left running"
        pool.refill()                                      # the next one fits the new config
        proc3 = pool.take([*STANDBY, "--p2p"])
        assert proc3 is not None
        taken.append(proc3)
        pool.refill()
        last = _wait_for(lambda: standby_pid(pid_file))
        pool.close()                                       # EOF: it exits
        assert not pid_file.exists() and _gone(last)
        pool.refill()                                      # closed: no new standby
        assert pool.take(STANDBY) is None
    finally:
        pool.close()
        for p in taken:
            p.kill()
            p.wait()
