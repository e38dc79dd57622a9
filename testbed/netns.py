"""A small private network for multi-node tests: network namespaces, veth pairs, one bridge.

    with NetLab(nodes=4) as lab:                 # needs root and iproute2
        lab.host_ip                              # "10.213.K.1": the host's end (run the registry here)
        lab.hub_ip                               # "10.213.K.2": the bridge's own address (the tracker)
        lab.node_ip(i)                           # "10.213.K.(10+i)"
        lab.popen(i, [...])                      # a process in node i's namespace (nsenter --net)
        lab.popen("hub", [...])
        lab.shape(rate="100mbit")                # TBF on the host's veth: registry -> nodes only

Topology: namespace `hub` holds a bridge; the host and every node namespace
hang off it through a veth pair, all in one /24, so no routing or forwarding
is needed (nothing on the host changes but one veth with an address and a
route to the private subnet). Namespaces are named `pn<tag>-...` (ip netns),
processes run with `nsenter --net=/run/netns/NAME`, which switches the
network namespace only: FUSE mounts made inside are visible to the test.

`close()` kills the processes this lab started (by pid), deletes the
namespaces (which deletes their veths) and the host's veth. Traffic never
leaves the lab's own addresses; `lo` is never shaped.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import time
from typing import Sequence

from .process import stop_process

IP = shutil.which("ip") or "/usr/sbin/ip"
TC = shutil.which("tc") or "/usr/sbin/tc"
NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"


def available() -> str | None:
    """None if a NetLab can be built here, else why not."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for exe in (IP, TC, NSENTER):
        if not os.path.exists(exe):
            return f"{exe} missing (apt-get install iproute2 util-linux)"
    return None


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _free_subnet() -> ipaddress.IPv4Network:
    used = _run(IP, "-4", "route", "show").stdout + _run(IP, "-4", "addr", "show").stdout
    for _ in range(64):
        net = ipaddress.ip_network(f"10.213.{secrets.randbelow(250) + 1}.0/24")
        if str(net.network_address)[:-1] not in used:
            return net
    raise RuntimeError("no free 10.213.x.0/24 subnet")


class NetLab:
    """`nodes` network namespaces plus a hub with a bridge, wired to the host (see module doc)."""

    def __init__(self, nodes: int):
        why = available()
        if why:
            raise RuntimeError(why)
        self.n = nodes
        self.tag = secrets.token_hex(2)
        self.net = _free_subnet()
        base = self.net.network_address
        self.host_ip = str(base + 1)
        self.hub_ip = str(base + 2)
        self.hub = f"pn{self.tag}-hub"
        self.nodes = [f"pn{self.tag}-n{i}" for i in range(nodes)]
        self.host_if = f"pn{self.tag}h"
        self._procs: list[subprocess.Popen] = []
        self._up = False

    def node_ip(self, i: int) -> str:
        return str(self.net.network_address + 10 + i)

    def ns_path(self, which: int | str) -> str:
        name = self.hub if which == "hub" else self.nodes[which]
        return f"/run/netns/{name}"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "NetLab":
        try:
            self._up = True
            plen = self.net.prefixlen
            _run(IP, "netns", "add", self.hub)
            _run(IP, "-n", self.hub, "link", "add", "br0", "type", "bridge")
            _run(IP, "-n", self.hub, "addr", "add", f"{self.hub_ip}/{plen}", "dev", "br0")
            _run(IP, "-n", self.hub, "link", "set", "br0", "up")
            _run(IP, "-n", self.hub, "link", "set", "lo", "up")
            _run(IP, "link", "add", self.host_if, "type", "veth", "peer", "name", "host0",
                 "netns", self.hub)
            _run(IP, "-n", self.hub, "link", "set", "host0", "master", "br0", "up")
            _run(IP, "addr", "add", f"{self.host_ip}/{plen}", "dev", self.host_if)
            _run(IP, "link", "set", self.host_if, "up")
            for i, ns in enumerate(self.nodes):
                _run(IP, "netns", "add", ns)
                _run(IP, "-n", self.hub, "link", "add", f"port{i}", "type", "veth", "peer", "name",
                     "eth0", "netns", ns)
                _run(IP, "-n", self.hub, "link", "set", f"port{i}", "master", "br0", "up")
                _run(IP, "-n", ns, "addr", "add", f"{self.node_ip(i)}/{plen}", "dev", "eth0")
                _run(IP, "-n", ns, "link", "set", "eth0", "up")
                _run(IP, "-n", ns, "link", "set", "lo", "up")
            self._wait_reachable()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_reachable(self, timeout: float = 5.0) -> None:
        """Wait for the bridge ports to forward (they start in STP 'listening' otherwise)."""
        import socket
        deadline = time.monotonic() + timeout
        with socket.socket() as srv:
            srv.bind((self.host_ip, 0))
            srv.listen(8)
            port = srv.getsockname()[1]
            for i in range(self.n):
                while True:
                    r = subprocess.run([NSENTER, f"--net={self.ns_path(i)}", "python3", "-c",
                                        "import socket,sys; socket.create_connection("
                                        f"('{self.host_ip}', {port}), timeout=0.5)"],
                                       capture_output=True)
                    if r.returncode == 0:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"node {i} cannot reach the host: {r.stderr[-300:]}")
                    time.sleep(0.1)

    def close(self) -> None:
        for p in reversed(self._procs):
            self.stop(p)
        self._procs.clear()
        if not self._up:
            return
        self._up = False
        for ns in self.nodes + [self.hub]:
            _run(IP, "netns", "del", ns, check=False)
        _run(IP, "link", "del", self.host_if, check=False)

    def __enter__(self) -> "NetLab":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ processes
    def command(self, which: int | str, argv: Sequence[str]) -> list[str]:
        return [NSENTER, f"--net={self.ns_path(which)}", "--", *map(str, argv)]

    def popen(self, which: int | str, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start `argv` in namespace `which` (a node index or "hub"); stopped by close()."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        p = subprocess.Popen(self.command(which, argv), **kw)
        self._procs.append(p)
        return p

    def run(self, which: int | str, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.command(which, argv), **kw)

    @staticmethod
    def stop(p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop one process this lab started (by its pid only)."""
        stop_process(p, timeout, sig=sig)

    # ------------------------------------------------------------------ shaping
    def shape(self, rate: str | None, burst: str = "256kb", latency: str = "20ms") -> None:
        """TBF on the host's veth (egress = registry -> lab); rate None removes it."""
        if rate is None:
            _run(TC, "qdisc", "del", "dev", self.host_if, "root", check=False)
            return
        _run(TC, "qdisc", "replace", "dev", self.host_if, "root", "tbf", "rate", rate,
             "burst", burst, "latency", latency)
