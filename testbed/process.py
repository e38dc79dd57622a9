"""Processes the test bed starts, runs and stops: once, for tests and benchmarks alike.

* `run(cmd, netns=...)`: a command to completion, output captured; `CommandError` on failure.
* `netns_prefix(netns)`: `nsenter --net=FILE` in front of a command that must run in a namespace.
* `spawn(argv, log_path, ...)`: a long-running child in its own session, its output appended to a
  log file, and SIGTERM for it when we die (`die_with_parent`), so nothing outlives a killed run.
  (The kernel sends that signal when the *thread* that forked dies: spawn from a thread that outlives
  the child, or pass `tied=False`.)
* `stop_process(proc)`: a child we started, by its pid (or its process group): SIGTERM, then SIGKILL.
* `kill_pid(pid, expect=...)`: a process we did not fork ourselves (its pid read from a pid file),
  signalled only while its command line still names `expect`: pids are recycled.
* `cmdline(pid)`, `tail(path)`, `free_port()`.

Processes are only ever found through what we started or the pid files they wrote, never by name.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import suppress
from pathlib import Path
from typing import Mapping, Sequence


class CommandError(RuntimeError):
    """A command failed: its argv, exit code and output (and what else explains it, `context`)."""

    def __init__(self, cmd: Sequence, rc: int, out: str, err: str, context: str = ""):
        self.cmd, self.rc, self.out, self.err = [str(c) for c in cmd], rc, out, err
        tail = (err or out)[-3000:]
        super().__init__(f"{' '.join(self.cmd)} failed (rc={rc}):\n{tail}" + (f"\n{context}" if context else ""))


def netns_prefix(netns: str | os.PathLike | None) -> list[str]:
    """`nsenter --net=FILE` in front of a command that must run in network namespace `netns`."""
    return ["nsenter", f"--net={netns}"] if netns else []


def run(cmd: Sequence, *, check: bool = True, timeout: float | None = 600, netns=None, env=None,
        cwd=None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run a command to completion, capturing text output; raise CommandError on failure if `check`."""
    full = [*netns_prefix(netns), *map(str, cmd)]
    r = subprocess.run(full, capture_output=True, text=True, errors="replace", timeout=timeout, env=env,
                       cwd=cwd, input=input, stdin=None if input is not None else subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise CommandError(full, r.returncode, r.stdout, r.stderr)
    return r


def die_with_parent() -> None:
    """`preexec_fn`: the child gets SIGTERM when the process that started it dies (Linux prctl)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except Exception:
        pass


def spawn(argv: Sequence, log_path: str | os.PathLike, *, stdout_path: str | os.PathLike | None = None,
          cwd: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
          netns: str | None = None, tied: bool = True) -> subprocess.Popen:
    """Start `argv` in its own session, output appended to `log_path` (stdout to `stdout_path` when
    given, e.g. an access log), stdin from /dev/null; `tied`: SIGTERM for it if we die first."""
    err = open(log_path, "ab")
    out = open(stdout_path, "ab") if stdout_path is not None else None
    try:
        return subprocess.Popen([*netns_prefix(netns), *map(str, argv)], stdout=out or err,
                                stderr=err if out else subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=cwd, env=None if env is None else dict(env), start_new_session=True,
                                preexec_fn=die_with_parent if tied else None)
    finally:
        err.close()
        if out is not None:
            out.close()


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0, *, sig: int = signal.SIGTERM,
                 group: bool = False) -> None:
    """Stop a child we started (by its pid; `group`: its whole process group, for a child started in
    its own session): `sig`, then SIGKILL if it lingers past `timeout` seconds. Reaps it."""
    if proc is None or proc.poll() is not None:
        return

    def send(s: int) -> None:
        with suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, s)
            else:
                os.kill(proc.pid, s)

    send(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(timeout=timeout)


def cmdline(pid: int) -> str:
    """The command line of process `pid`, arguments joined by spaces ("" if it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_pid(pid: int, *, expect: str, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Terminate one process we did not fork (its pid read from a pid file), escalating to SIGKILL.

    pids are recycled quickly (pid_max 32768): `pid` is only signalled while its command line still
    contains `expect` (a path only our process has in its arguments).
    """
    if not expect or expect not in cmdline(pid):
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.05)
    if expect in cmdline(pid):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def kill_pid_files(pid_files, *, expect: str, timeout: float = 10.0) -> list[int]:
    """`kill_pid` for the pid in each of `pid_files` (unreadable ones are skipped); returns the pids."""
    pids = []
    for f in pid_files:
        try:
            pids.append(int(Path(f).read_text().strip()))
        except (OSError, ValueError):
            continue
    for pid in pids:
        kill_pid(pid, expect=expect, timeout=timeout)
    return pids


def tail(path: str | os.PathLike, n: int = 4000) -> str:
    """The last `n` characters of a (log) file; "" if it cannot be read."""
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return ""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for a process about to bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
