"""Shaped links to the registry: a private network namespace, a veth pair with HTB, and a delay line.

This kernel has no `netem` (CONFIG_NET_SCH_NETEM unset) but has TBF, HTB, veth and
network namespaces, so a link is emulated in two parts:

* **rate**: everything that must go through the link (ctr's pull, the mount
  daemon, the snapshotter) runs in a network namespace the suite creates
  (bound to a file under the work dir, so nothing is written to /run/netns).
  A veth pair joins it to the host.  On the host end an HTB qdisc shapes the
  registry -> puller direction: traffic from the delay line's port goes to a
  class at the link rate, everything else (a peer on the host, for the p2p
  mode: a LAN next to a WAN link) to an unshaped 10 Gbit/s default class.
* **RTT**: a small asyncio TCP delay line listens on the host end of the veth
  and forwards to the registry on 127.0.0.1.  Every chunk is forwarded RTT/2
  after it arrived, in each direction, and a new connection waits one RTT
  before it connects upstream (the TCP handshake), so a first request costs
  2 RTT and a request on a kept-alive connection 1 RTT.  Each direction queues
  at most `MAX_QUEUED` bytes (back-pressure beyond that).

`lo` is never shaped: other sessions on the machine use it.

    with Cleanup() as c:
        link = ShapedLink(LINKS["100mbit"], "127.0.0.1:5000", workdir, c).up()
        link.registry_host   # "10.213.N.1:PORT", reachable from inside link.netns only
        run([...], netns=link.netns)

Limitation: the client <-> proxy TCP sees ~0 RTT, so slow-start at 4 ms is
not emulated; only request latency and the shifted data stream are.

The delay line alone: `python -m benchmarks.netshape proxy --listen A:P --upstream B:Q --rtt-ms 4`.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from testbed.process import free_port, run, stop_process

from .sysutil import Cleanup, umount

log = logging.getLogger("benchmarks.netshape")

MAX_QUEUED = 4 << 20
READ_SIZE = 256 << 10
SUBNET_BASE = ipaddress.ip_network("10.213.0.0/16")


@dataclass(frozen=True)
class LinkSpec:
    name: str
    rate: str | None           # tc rate ("100mbit"), None: not shaped (loopback)
    rtt_ms: float
    rate_bps: float | None     # nominal bits per second

    @property
    def label(self) -> str:
        return "loopback" if self.rate is None else f"{self.rate} + {self.rtt_ms:g} ms RTT"


LINKS: dict[str, LinkSpec] = {
    "lo": LinkSpec("lo", None, 0.0, None),
    "1gbit": LinkSpec("1gbit", "1gbit", 4.0, 1e9),
    "100mbit": LinkSpec("100mbit", "100mbit", 4.0, 1e8),
}


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = []
    r = run(["ip", "-4", "-o", "addr", "show"], check=False)
    for line in r.stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            out.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    r = run(["ip", "-4", "route", "show", "table", "all"], check=False)
    for line in r.stdout.splitlines():
        tok = line.split()[0] if line.split() else ""
        try:
            if "/" in tok:
                out.append(ipaddress.ip_network(tok, strict=False))
        except ValueError:
            pass
    return out


def _pick_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    start = os.getpid() % 16384
    subnets = list(SUBNET_BASE.subnets(new_prefix=30))
    for i in range(len(subnets)):
        cand = subnets[(start + i) % len(subnets)]
        if not any(cand.overlaps(u) for u in used):
            return cand
    raise RuntimeError("no free /30 in 10.213.0.0/16")


def _wait_listening(host: str, port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"delay proxy exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout} s")


class ShapedLink:
    """One benchmark link; `up()` builds it (registering every undo with `cleanup`).

    Results are taken with the HTB setup above; the note's TBF measurements
    (936 / 95.6 Mbit/s goodput) were the model, and `measure_throughput`
    records this setup's own goodput in every report.
    """

    def __init__(self, spec: LinkSpec, registry_host: str, workdir: str | os.PathLike, cleanup: Cleanup):
        self.spec = spec
        self.upstream = registry_host
        self.workdir = Path(workdir)
        self.cleanup = cleanup
        self.netns: str | None = None
        self.registry_host = registry_host
        self.host_ip = "127.0.0.1"          # where a peer on "the host" listens, reachable from the netns
        self.proxy: subprocess.Popen | None = None
        tag = f"{os.getpid() % 100000}"
        self.host_if, self.ns_if = f"pnb{tag}h", f"pnb{tag}n"

    def up(self) -> "ShapedLink":
        if self.spec.rate is None:
            return self
        nsdir = self.workdir / "netns"
        nsdir.mkdir(parents=True, exist_ok=True)
        nsfile = nsdir / f"{self.spec.name}-{os.getpid()}"
        nsfile.touch()
        self.cleanup.push(lambda: nsfile.unlink(missing_ok=True), f"rm {nsfile}")
        run(["unshare", f"--net={nsfile}", "true"])
        self.cleanup.push(lambda: umount(nsfile), f"umount netns {nsfile}")
        self.netns = str(nsfile)
        net = _pick_subnet()
        host_ip, ns_ip = str(net[1]), str(net[2])
        # create the pair inside the namespace with the peer in PID 1's (the host's) namespace
        run(["ip", "link", "add", self.ns_if, "type", "veth", "peer", "name", self.host_if, "netns", "1"],
            netns=self.netns)
        self.cleanup.push(lambda: run(["ip", "link", "del", self.host_if], check=False), f"ip link del {self.host_if}")
        run(["ip", "addr", "add", f"{host_ip}/30", "dev", self.host_if])
        run(["ip", "link", "set", self.host_if, "up"])
        run(["ip", "addr", "add", f"{ns_ip}/30", "dev", self.ns_if], netns=self.netns)
        run(["ip", "link", "set", self.ns_if, "up"], netns=self.netns)
        run(["ip", "link", "set", "lo", "up"], netns=self.netns)
        port = free_port(host_ip)
        dev = ["dev", self.host_if]
        run(["tc", "qdisc", "replace", *dev, "root", "handle", "1:", "htb", "default", "10"])
        run(["tc", "class", "add", *dev, "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit"])
        run(["tc", "class", "add", *dev, "parent", "1:", "classid", "1:20", "htb", "rate", self.spec.rate,
             "ceil", self.spec.rate, "burst", "256kb", "cburst", "256kb"])
        run(["tc", "filter", "add", *dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
             "match", "ip", "sport", str(port), "0xffff", "flowid", "1:20"])
        self.host_ip = host_ip
        logf = open(self.workdir / f"delayproxy-{self.spec.name}.log", "ab")
        try:
            self.proxy = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.netshape", "proxy", "--listen", f"{host_ip}:{port}",
                 "--upstream", self.upstream, "--rtt-ms", str(self.spec.rtt_ms)],
                stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
        finally:
            logf.close()
        proxy = self.proxy
        self.cleanup.push(lambda: stop_process(proxy), f"stop delay proxy pid {proxy.pid}")
        _wait_listening(host_ip, port, proc=proxy)
        self.registry_host = f"{host_ip}:{port}"
        log.info("link %s up: netns %s, %s -> %s (HTB %s on %s)", self.spec.name, self.netns, self.registry_host,
                 self.upstream, self.spec.rate, self.host_if)
        return self

    def describe(self) -> dict:
        return {"name": self.spec.name, "label": self.spec.label, "rate": self.spec.rate,
                "rtt_ms": self.spec.rtt_ms, "netns": bool(self.netns), "registry_host": self.registry_host}


def measure_throughput(url: str, netns: str | None) -> dict:
    """GET `url` (a big blob) with curl from the puller's side: bytes, seconds, bits per second."""
    r = run(["curl", "-sf", "-o", "/dev/null", "-w", "%{size_download} %{time_total} %{time_starttransfer}", url],
            netns=netns, timeout=600)
    size, total, ttfb = r.stdout.split()
    size, total = int(size), float(total)
    return {"bytes": size, "seconds": total, "ttfb_s": float(ttfb),
            "bits_per_s": size * 8 / total if total > 0 else 0.0}


# --------------------------------------------------------------------------- the delay line

class _Direction:
    def __init__(self, half_rtt: float):
        self.half = half_rtt
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.cond = asyncio.Condition()
        self.eof = False


async def _pump_in(reader: asyncio.StreamReader, d: _Direction) -> None:
    try:
        while True:
            data = await reader.read(READ_SIZE)
            async with d.cond:
                if not data:
                    d.eof = True
                    d.cond.notify_all()
                    return
                while d.queued >= MAX_QUEUED:
                    await d.cond.wait()
                d.queue.append((time.monotonic(), data))
                d.queued += len(data)
                d.cond.notify_all()
    except (ConnectionError, OSError):
        async with d.cond:
            d.eof = True
            d.cond.notify_all()


async def _pump_out(writer: asyncio.StreamWriter, d: _Direction, not_before: float) -> None:
    loop_time = time.monotonic
    try:
        while True:
            async with d.cond:
                while not d.queue and not d.eof:
                    await d.cond.wait()
                if not d.queue and d.eof:
                    break
                t, data = d.queue.popleft()
                d.queued -= len(data)
                d.cond.notify_all()
            delay = max(t, not_before) + d.half - loop_time()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


async def _handle(client_r, client_w, upstream: tuple[str, int], rtt: float) -> None:
    up_dir, down_dir = _Direction(rtt / 2), _Direction(rtt / 2)
    t_in = asyncio.create_task(_pump_in(client_r, up_dir))
    server_w = None
    try:
        await asyncio.sleep(rtt)                        # the handshake the client did not pay
        server_r, server_w = await asyncio.open_connection(*upstream)
        connected = time.monotonic()
        tasks = [t_in, asyncio.create_task(_pump_out(server_w, up_dir, connected)),
                 asyncio.create_task(_pump_in(server_r, down_dir)),
                 asyncio.create_task(_pump_out(client_w, down_dir, connected))]
        await asyncio.gather(*tasks, return_exceptions=True)
    except (ConnectionError, OSError) as e:
        log.warning("upstream %s: %s", upstream, e)
        t_in.cancel()
    finally:
        for w in (client_w, server_w):
            if w is not None:
                w.close()


async def _serve(listen: tuple[str, int], upstream: tuple[str, int], rtt: float) -> None:
    server = await asyncio.start_server(lambda r, w: _handle(r, w, upstream, rtt), *listen,
                                        reuse_address=True, backlog=256)
    async with server:
        await server.serve_forever()


def _hostport(s: str) -> tuple[str, int]:
    h, _, p = s.rpartition(":")
    return h, int(p)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.netshape")
    sub = p.add_subparsers(dest="cmd", required=True)
    px = sub.add_parser("proxy", help="run the TCP delay line in the foreground")
    px.add_argument("--listen", required=True)
    px.add_argument("--upstream", required=True)
    px.add_argument("--rtt-ms", type=float, default=4.0)
    sub.add_parser("links", help="list the link presets")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.cmd == "links":
        print(json.dumps({k: v.__dict__ for k, v in LINKS.items()}, indent=1))
        return 0
    try:
        asyncio.run(_serve(_hostport(args.listen), _hostport(args.upstream), args.rtt_ms / 1000.0))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
