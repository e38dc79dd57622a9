"""P2P at start-up: N nodes mount and read the same image at once, registry egress shaped.

    python -m benchmarks.p2p [--nodes 1,2,4,8] [--rate 100mbit] [--repeat 3] [--mb 32]
                             [--out DIR]                    # needs root, iproute2, docker-registry

Setup (testbed/netns.py): every node in its own network namespace on one
bridge; the registry (docker-registry) on the host's veth, whose egress (registry ->
nodes) is shaped with TBF to `--rate`; the tracker (`nydus-peer tracker`) in the hub
namespace. Peer traffic between nodes is not shaped (a LAN). Each node is a real mount
daemon (`nydusify mount` with the P2P options, or the stand-in driver of
testbed/p2pcluster.py while the CLI lacks them) with its own fresh cache.

For N in --nodes, with and without P2P, --repeat times: start all N mounts at once,
then read every file of the image through each mount (one reader thread per node).
Reported per N and mode (medians over the repeats):

* time to ready: from the start of the mounts until the last node has read everything
  (also the median node);
* registry egress: body bytes in the registry's access log during the run, and its
  ratio to one node's egress (same mode, N = 1).

Goals (issue #6): with P2P, egress <= 1.5x one node's for every N, and the time for
8 nodes <= 2x one node's. The image: --mb MiB of files, 3/4 random (incompressible) and
1/4 compressible, 256 KiB chunks, so the link, not the CPU, should be the limit.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.prereq import require
from testbed import images as im
from testbed.netns import NetLab, available
from testbed.p2pcluster import REPO, Cluster, convert_push, egress, in_parallel, p2p_args
from testbed.registry import Registry

MiB = 1 << 20


def build_bench_image(layout: Path, mb: int, seed: int = 4242):
    entries = [im.Entry.dir("data")]
    expect = {}
    n = max(4, mb // 4)
    size = mb * MiB // n
    for i in range(n):
        if i % 4 == 3:
            c = im.repeat(im.concat(im.random(4096, seed + i), im.zeros(4096)), size // 8192)
        else:
            c = im.random(size, seed + i)
        entries.append(im.Entry.file(f"data/f{i:03d}", c))
        expect[f"data/f{i:03d}"] = c.sha256()
    return im.build_oci_layout(layout, "bench", [entries]), expect


def one_run(lab: NetLab, reg, ref: str, expect: dict, n: int, p2p: bool, root: Path) -> dict:
    import os
    import subprocess
    tracker = None
    if p2p:
        port = 7100 + int(time.monotonic() * 10) % 800
        tracker = lab.popen("hub", [sys.executable, "-m", "p2p.cli", "tracker", "--listen",
                                    f"{lab.hub_ip}:{port}"], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        tracker.stdout.readline()
        tracker.addr = f"{lab.hub_ip}:{port}"
    cluster = Cluster(root, lab)
    try:
        mark = reg.mark()
        t0 = time.monotonic()

        def node(i):
            nd = cluster.start(i, ref, p2p=p2p_args(lab, i, tracker) if p2p else [])
            nd.read_all(expect)
            return time.monotonic() - t0, nd
        results = in_parallel([lambda i=i: node(i) for i in range(n)])
        times = sorted(t for t, _ in results)
        out = {"nodes": n, "p2p": p2p, "ready_s": round(times[-1], 3),
               "ready_median_s": round(statistics.median(times), 3),
               "egress_bytes": egress(reg, mark)}
        if p2p:
            peer = registry_b = waits = failures = busy = 0
            for _, nd in results:
                st = nd.p2p()
                for b in st["blobs"].values():
                    peer += b["peer"]
                    registry_b += b["registry"]
                    waits += b["waits"]
                    failures += b["peer_failures"]
                busy += st["uploads"].get("busy", 0)
            out.update(peer_bytes=peer, registry_blob_bytes=registry_b, waits=waits,
                       peer_failures=failures, uploads_busy=busy)
        return out
    finally:
        cluster.close()
        if tracker is not None:
            lab.stop(tracker)
            tracker.stdout.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.p2p", description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="1,2,4,8")
    ap.add_argument("--rate", default="100mbit", help="TBF rate of the registry's link")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mb", type=int, default=32, help="MiB of file data in the image")
    ap.add_argument("--modes", default="p2p,registry", help="p2p, registry (no P2P), or both")
    ap.add_argument("--out", help="write results.json here")
    args = ap.parse_args(argv)
    require("python -m benchmarks.p2p", ["docker-registry", "ip", "tc", "nsenter", "libfuse3"])
    why = available()
    if why:
        print(f"benchmarks.p2p: {why}", file=sys.stderr)
        return 2
    counts = [int(x) for x in args.nodes.split(",")]
    modes = [m == "p2p" for m in args.modes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="p2p-bench-"))
    rows = []
    with NetLab(nodes=max(counts)) as lab:
        with Registry(root / "registry", ip=lab.host_ip) as reg:
            image, expect = build_bench_image(root / "src", args.mb)
            ref = f"{reg.host}/bench/p2p:v1"
            convert_push(image, ref)
            lab.shape(args.rate)
            try:
                for p2p in modes:
                    for n in counts:
                        for rep in range(args.repeat):
                            r = one_run(lab, reg, ref, expect, n, p2p, root / f"run-{len(rows)}")
                            r["rep"] = rep
                            rows.append(r)
                            print(json.dumps(r), flush=True)
            finally:
                lab.shape(None)
    summary = summarize(rows)
    print(render(summary, args))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    import shutil
    shutil.rmtree(root, ignore_errors=True)
    return 0


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for p2p in sorted({r["p2p"] for r in rows}, reverse=True):
        mine = [r for r in rows if r["p2p"] == p2p]
        base_e = base_t = None
        for n in sorted({r["nodes"] for r in mine}):
            rs = [r for r in mine if r["nodes"] == n]
            e = statistics.median(r["egress_bytes"] for r in rs)
            t = statistics.median(r["ready_s"] for r in rs)
            tm = statistics.median(r["ready_median_s"] for r in rs)
            if n == min(r["nodes"] for r in mine):
                base_e, base_t = e, t
            out.append({"mode": "p2p" if p2p else "registry", "nodes": n, "ready_s": t,
                        "ready_median_s": tm, "egress_mb": round(e / 1e6, 2),
                        "egress_x": round(e / base_e, 2), "time_x": round(t / base_t, 2),
                        "runs": len(rs)})
    return out


def render(summary: list[dict], args) -> str:
    lines = [f"registry link {args.rate}, image {args.mb} MiB of files; medians of {args.repeat}",
             "| mode | N | time to ready, last node (s) | median node (s) | time vs N=1 "
             "| registry egress (MB) | egress vs N=1 |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['mode']} | {s['nodes']} | {s['ready_s']:.2f} | {s['ready_median_s']:.2f} "
                     f"| {s['time_x']:.2f}x | {s['egress_mb']:.1f} | {s['egress_x']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
