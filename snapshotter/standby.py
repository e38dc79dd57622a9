"""One idle, pre-imported mount daemon launcher (``python -m snapshotter.mountd --standby``), kept ready.

A fresh launcher spends ~150 ms starting Python and importing the FUSE and
storage stack before the daemon's own ~30 ms of work; a standby has done that
already. ``take`` hands the ready standby to exactly one start (which writes
the start's arguments to it and reads its report, as from a fresh launcher)
and ``refill`` starts the next one in the background.

* It runs in its own session, like the daemons: the signal that stops the
  snapshotter (to its group) must not cut a start short.
* It exits by itself when the snapshotter goes away: EOF on its stdin (a pipe
  only the snapshotter holds).
* Its command line says what it imported (``--p2p``) and probed
  (``--probe-erofs``); a start that needs another command never uses it.
* ``RUN_DIR/standby.pid`` names the ready standby (for status and tests).
"""
from __future__ import annotations

import logging
import subprocess
import threading
from pathlib import Path

log = logging.getLogger("nydus-snapshotter")

BOOT_WAIT = 5.0     # a start waits this long for a standby still importing (a fresh launcher is no faster)


class _Standby:
    """One standby process, spawned (and awaited until ``ready``) in a background thread."""

    def __init__(self, cmd: list[str], on_ready):
        self.cmd = cmd
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self.settled = threading.Event()      # ready, or failed to come up
        threading.Thread(target=self._boot, args=(on_ready,), name="mountd-standby", daemon=True).start()

    def _boot(self, on_ready) -> None:
        try:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, errors="replace",
                                         start_new_session=True)
            self.ready = self.proc.stdout.readline().strip() == "ready"
            if self.ready:
                on_ready(self)
            else:
                log.warning("the standby mount daemon launcher (pid %d) did not come up: %s", self.proc.pid,
                            self.proc.stderr.read()[-2000:].strip() or f"exit status {self.proc.wait()}")
        except (OSError, ValueError) as e:
            log.warning("cannot start a standby mount daemon launcher: %s", e)
        finally:
            self.settled.set()

    def alive(self) -> bool:
        return self.ready and self.proc.poll() is None

    def stop(self) -> None:
        """EOF on its stdin ends it; kill it if it does not go (it may still be importing)."""
        self.settled.wait(BOOT_WAIT)
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(2)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


class StandbyPool:
    def __init__(self, cmd: list[str], pid_file: Path):
        self.cmd = cmd
        self.pid_file = pid_file
        self._lock = threading.Lock()
        self._next: _Standby | None = None
        self._closed = False

    def refill(self) -> None:
        """Start the next standby in the background, unless one is there (or we are closing)."""
        with self._lock:
            if self._closed or self._next is not None:
                return
            self._next = _Standby(self.cmd, self._record)

    def _record(self, sb: _Standby) -> None:
        with self._lock:
            if self._next is sb:
                try:
                    self.pid_file.parent.mkdir(parents=True, exist_ok=True)
                    self.pid_file.write_text(f"{sb.proc.pid}\n")
                except OSError as e:       # only status reads it
                    log.warning("writing %s: %s", self.pid_file, e)

    def take(self, cmd: list[str]) -> subprocess.Popen | None:
        """The ready standby for one start with standby command ``cmd`` (the caller owns it now), or None:
        use a fresh launcher. The caller calls ``refill`` once its start is done (not during it: the next
        standby's imports would compete with the start for CPU)."""
        with self._lock:
            sb, self._next = self._next, None
            self._forget_pid()
            self.cmd = cmd          # a standby that imported for another config (P2P turned on) is not used
        if sb is None:
            return None
        if sb.cmd == cmd:
            sb.settled.wait(BOOT_WAIT)
            if sb.alive():
                return sb.proc
            log.warning("the standby mount daemon launcher is gone; starting a fresh one for this mount")
        threading.Thread(target=sb.stop, daemon=True).start()
        return None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sb, self._next = self._next, None
            self._forget_pid()
        if sb is not None:
            sb.stop()

    def _forget_pid(self) -> None:
        try:
            self.pid_file.unlink()
        except FileNotFoundError:
            pass


def standby_pid(pid_file: Path) -> int | None:
    """The pid of the ready standby named in ``pid_file``, if that process still is one."""
    try:
        pid = int(pid_file.read_text().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return pid if b"--standby" in f.read().split(b"\0") else None
    except (OSError, ValueError):
        return None
