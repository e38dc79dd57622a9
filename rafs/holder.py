"""The holder: keeps a mount's /dev/fuse fd and (re)starts the mount daemon that serves it.

    python -m rafs.holder --state DIR --log LOG [--report-fd W] -- CMD...

opens /dev/fuse and runs CMD (a mount daemon in the foreground, e.g. `python -m converter.cli mount
... --daemon`) with the fd; the daemon mounts it and serves it (`rafs.fuseproto`). When the daemon
dies — SIGKILL, OOM, a crash — and the connection is still mounted, the holder starts CMD again with
the same fd, adopting it: the new daemon asks the kernel to resend what the dead one had taken, and
readers see a pause, never an error. The daemon's clean stop (umount) ends the holder too.

Environment handed to the daemon: PYNYDUS_FUSE_FD (the fd), PYNYDUS_FUSE_ADOPT (1: the
connection is initialised and mounted already), PYNYDUS_NOTIFY_FD (a pipe: one JSON line
{"ok", "message"} once the mount is served), PYNYDUS_HOLDER_PID.

Signals: SIGUSR2 = hot upgrade (start a new daemon, tell the old one to hand over with SIGUSR1: it
stops answering, flushes, exits without unmounting; the new one resends what it left). SIGTERM is
passed on to the daemon (a clean stop).

The holder is restartable: `--adopt-daemon PID` (with --fuse-fd) takes over a daemon that is
already serving; the daemon starts such a holder (with its copy of the fd) when its holder is
gone. CMD and its environment are kept in `<state>/holder.json` for that.

Imports are the standard library only: the holder must be small and must start fast.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time

RESTART_BACKOFF = (0.0, 0.05, 0.2, 0.5, 1.0, 2.0)


def _log(msg: str) -> None:
    sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} holder[{os.getpid()}]: {msg}\n")
    sys.stderr.flush()


def connection_alive(fd: int) -> bool:
    """Whether the FUSE connection of `fd` is still mounted (POLLERR once it is aborted/unmounted)."""
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLERR)
    for _, ev in p.poll(0):
        if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            return False
    return True


class Daemon:
    """One mount daemon: a child (Popen) or a process we adopted (pidfd only)."""

    def __init__(self, pid: int, popen: subprocess.Popen | None, notify_r: int | None):
        self.pid = pid
        self.popen = popen
        self.pidfd = os.pidfd_open(pid)
        self.notify_r = notify_r
        self.notify_buf = b""
        self.ready = notify_r is None
        self.started = time.monotonic()
        self.retiring = False

    def exited(self) -> tuple[bool, int | None]:
        """(gone, exit status if known: a returncode; negative = killed by that signal)."""
        if self.popen is not None:
            rc = self.popen.poll()
            return rc is not None, rc
        r, _, _ = select.select([self.pidfd], [], [], 0)
        return bool(r), None

    def close(self) -> None:
        for fd in (self.pidfd, self.notify_r):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.pidfd = self.notify_r = None


class Holder:
    def __init__(self, fd: int, cmd: list[str], env: dict, cwd: str, state: str, log_path: str,
                 report_fd: int | None):
        self.fd = fd
        self.cmd = cmd
        self.env = env
        self.cwd = cwd
        self.state = state
        self.log_path = log_path
        self.report_fd = report_fd
        self.current: Daemon | None = None
        self.retiring: list[Daemon] = []
        self.upgrade_wanted = False
        self.stop_signal: int | None = None
        self.restarts = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ------------------------------------------------------------ state
    def save(self) -> None:
        data = {"pid": os.getpid(), "cmd": self.cmd, "env": self.env, "cwd": self.cwd, "log": self.log_path,
                "restarts": self.restarts}
        path = os.path.join(self.state, "holder.json")
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            os.makedirs(self.state, mode=0o700, exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        except OSError as e:
            _log(f"cannot save {path}: {e}")

    # ------------------------------------------------------------ daemons
    def spawn(self, adopt: bool) -> Daemon:
        r, w = os.pipe2(os.O_CLOEXEC)
        env = {**os.environ, **self.env, "PYNYDUS_FUSE_FD": str(self.fd), "PYNYDUS_FUSE_ADOPT": "1" if adopt else "0",
               "PYNYDUS_NOTIFY_FD": str(w), "PYNYDUS_HOLDER_PID": str(os.getpid())}
        out = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            p = subprocess.Popen(self.cmd, env=env, cwd=self.cwd, pass_fds=(self.fd, w), stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=out)
        finally:
            os.close(out)
            os.close(w)
        os.set_blocking(r, False)
        _log(f"started daemon pid {p.pid}" + (" (adopting the mounted connection)" if adopt else ""))
        return Daemon(p.pid, p, r)

    def _read_notify(self, d: Daemon) -> dict | None:
        try:
            chunk = os.read(d.notify_r, 65536)
        except BlockingIOError:
            return None
        except OSError:
            chunk = b""
        if chunk:
            d.notify_buf += chunk
            return None
        os.close(d.notify_r)          # EOF: the message is complete (or the daemon died first)
        d.notify_r = None
        try:
            return json.loads(d.notify_buf)
        except ValueError:
            return {"ok": False, "message": "the daemon exited before the mount was ready"}

    def report(self, ok: bool, message: str) -> None:
        if self.report_fd is None:
            return
        try:
            os.write(self.report_fd, json.dumps({"ok": ok, "message": message}).encode())
        except OSError:
            pass
        try:
            os.close(self.report_fd)
        except OSError:
            pass
        self.report_fd = None

    # ------------------------------------------------------------ signals
    def _on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGUSR2:
            self.upgrade_wanted = True
        else:
            self.stop_signal = signum
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # ------------------------------------------------------------ the loop
    def run(self, adopted_pid: int | None = None) -> int:
        for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        if adopted_pid is not None:
            self.current = Daemon(adopted_pid, None, None)
            _log(f"holding the connection of daemon pid {adopted_pid}")
        else:
            self.current = self.spawn(adopt=False)
        self.save()
        fails = 0
        while True:
            if self.stop_signal is not None and self.current is not None:
                try:
                    os.kill(self.current.pid, self.stop_signal)
                except ProcessLookupError:
                    pass
                self.stop_signal = None
            if self.upgrade_wanted:
                self.upgrade_wanted = False
                self.upgrade()
            fds = [self._wake_r]
            for d in [self.current, *self.retiring]:
                if d is not None:
                    fds.append(d.pidfd)
                    if d.notify_r is not None:
                        fds.append(d.notify_r)
            try:
                readable, _, _ = select.select(fds, [], [], 1.0)
            except InterruptedError:
                continue
            if self._wake_r in readable:
                try:
                    os.read(self._wake_r, 64)
                except BlockingIOError:
                    pass
            for d in list(self.retiring):
                if d.notify_r is not None and d.notify_r in readable:
                    self._read_notify(d)
                gone, _ = d.exited()
                if gone:
                    _log(f"old daemon pid {d.pid} has handed over")
                    d.close()
                    self.retiring.remove(d)
            d = self.current
            if d is None:
                return 0
            if d.notify_r is not None and d.notify_r in readable:
                msg = self._read_notify(d)
                if msg is not None:
                    d.ready = bool(msg.get("ok"))
                    if d.ready:
                        fails = 0
                    self.report(bool(msg.get("ok")), str(msg.get("message")))
            gone, rc = d.exited()
            if not gone:
                continue
            if d.notify_r is not None:            # drain what it said before dying
                msg = self._read_notify(d)
                if msg is None:
                    msg = self._read_notify(d)
                if msg is not None and msg.get("ok") is False:
                    self.report(False, str(msg.get("message")))
            d.close()
            info_gone = not os.path.exists(os.path.join(self.state, "info.json"))
            alive = connection_alive(self.fd)
            if rc == 0 or info_gone or not alive:
                _log(f"daemon pid {d.pid} exited ({'status ' + str(rc) if rc is not None else 'not our child'}"
                     f"{', mount gone' if not alive else ''}); the holder leaves")
                self.report(False, "the daemon exited before the mount was ready")
                self.current = None
                self._cleanup()
                return 0 if rc in (0, None) else 1
            if not d.ready and self.report_fd is not None:
                _log(f"daemon pid {d.pid} failed before its first mount was ready (status {rc})")
                self.report(False, "the daemon exited before the mount was ready")
                return 1
            fails = fails + 1 if time.monotonic() - d.started < 2.0 else 0
            delay = RESTART_BACKOFF[min(fails, len(RESTART_BACKOFF) - 1)]
            _log(f"daemon pid {d.pid} died ({'signal ' + str(-rc) if rc is not None and rc < 0 else rc}); "
                 f"restarting it on the same connection" + (f" in {delay} s" if delay else ""))
            if delay:
                time.sleep(delay)
            self.restarts += 1
            self.current = self.spawn(adopt=True)
            self.save()

    def upgrade(self) -> None:
        """Start a new daemon on the connection, then tell the old one to hand over (SIGUSR1)."""
        old = self.current
        if old is None:
            return
        _log(f"hot upgrade: replacing daemon pid {old.pid}")
        self.current = self.spawn(adopt=True)
        old.retiring = True
        self.retiring.append(old)
        try:
            os.kill(old.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass
        self.save()

    def _cleanup(self) -> None:
        try:
            os.unlink(os.path.join(self.state, "holder.json"))
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rafs.holder")
    p.add_argument("--state", required=True, help="the mount's state directory")
    p.add_argument("--log", required=True, help="the daemons' log")
    p.add_argument("--report-fd", type=int, help="write the first daemon's report here, then close it")
    p.add_argument("--fuse-fd", type=int, help="the /dev/fuse fd (with --adopt-daemon)")
    p.add_argument("--adopt-daemon", type=int, metavar="PID", help="hold the connection PID serves")
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.adopt_daemon is not None:
        with open(os.path.join(args.state, "holder.json")) as f:
            saved = json.load(f)
        h = Holder(args.fuse_fd, saved["cmd"], saved.get("env", {}), saved["cwd"], args.state, args.log, None)
        h.restarts = saved.get("restarts", 0)
        return h.run(adopted_pid=args.adopt_daemon)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    fd = os.open("/dev/fuse", os.O_RDWR)
    os.set_inheritable(fd, True)
    env = {k: v for k, v in os.environ.items() if k.startswith(("PYNYDUS_", "PYTHON"))}
    h = Holder(fd, cmd, env, os.getcwd(), args.state, args.log, args.report_fd)
    return h.run()


if __name__ == "__main__":
    sys.exit(main())
