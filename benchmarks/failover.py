"""Failover benchmark: how long readers pause when a mount daemon is SIGKILLed (issue #12).

    python -m benchmarks.failover [--workdir DIR] [--kills 10] [--modes erofs fuse] [--json FILE]

A small image (64 files of 256 KiB, random) is pushed to a docker-registry on 127.0.0.1,
converted and mounted with `nydusify mount --daemon` (a holder keeps the FUSE connection). Its
files are read once (the blob cache is warm: the pause measured is the daemon's, not the
registry's). Then, --kills times: the serving daemon is SIGKILLed and one file's page cache is
dropped and a 4 KiB pread of it issued at once; the time from the kill to that read's answer is
the pause (the holder sees the death, starts a new daemon on the same connection, which asks the
kernel to resend what the dead one had taken). Reports the median and the maximum; goal < 1 s.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

from benchmarks.mount import build_layout, nydusify
from benchmarks.prereq import require

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WORKDIR = "/var/tmp/pynydus-failoverbench"
GOAL_S = 1.0


def build_tree(root: Path, files: int = 64, size: int = 256 << 10) -> None:
    if (root / ".stamp").exists():
        return
    (root / "data").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / "data" / f"f{i:03d}").write_bytes(os.urandom(size))
    (root / ".stamp").write_text("1")


def serving_pid(state) -> int:
    from rafs.mounttab import daemon_alive, read_info
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = read_info(state)
        if daemon_alive(info):
            return info["pid"]
        time.sleep(0.01)
    raise RuntimeError("no daemon serves the mount")


def bench_mode(mode: str, ref: str, work: Path, kills: int) -> dict:
    from rafs.mounttab import state_paths
    mnt, cache, run = work / f"mnt-{mode}", work / f"cache-{mode}", work / "run"
    for d in (mnt, cache):
        d.mkdir(parents=True, exist_ok=True)
    r = nydusify("mount", ref, mnt, "--mode", mode, "--cache-dir", cache, "--run-dir", run, "--daemon",
                 "--plain-http", "--holder", "on")
    if r.returncode != 0:
        raise RuntimeError(f"mount failed: {r.stdout}{r.stderr}")
    state = state_paths(str(mnt), str(run))
    pauses = []
    try:
        names = sorted(os.listdir(mnt / "data"))
        for n in names:                                   # warm the blob cache
            (mnt / "data" / n).read_bytes()
        for k in range(kills):
            pid = serving_pid(state)
            path = mnt / "data" / names[k % len(names)]
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                t0 = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                os.pread(fd, 4096, 4096 * k)
                pauses.append(time.monotonic() - t0)
            finally:
                os.close(fd)
            time.sleep(0.3)
    finally:
        nydusify("umount", mnt, "--run-dir", run)
    return {"mode": mode, "kills": kills, "median_s": statistics.median(pauses), "max_s": max(pauses),
            "pauses_s": pauses}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.failover", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=DEFAULT_WORKDIR)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--modes", nargs="+", default=["erofs", "fuse"], choices=["erofs", "fuse"])
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("benchmarks.failover needs root (FUSE and kernel mounts)", file=sys.stderr)
        return 2
    require("python -m benchmarks.failover", ["docker-registry"])
    sys.path.insert(0, str(REPO_ROOT))
    from converter.convert import ConvertOptions, convert
    from testbed.registry import Registry, push_image

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    build_tree(work / "tree")
    layout = build_layout(work / "tree", work / "layout")
    reg = Registry(work / "registry").start()
    results = []
    try:
        src, dst = f"{reg.host}/bench/failover:src", f"{reg.host}/bench/failover:nydus"
        push_image(layout, src)
        convert(src, dst, ConvertOptions(plain_http=True))
        for mode in args.modes:
            results.append(bench_mode(mode, dst, work, args.kills))
    finally:
        reg.stop()
    print(f"{'mode':6} {'kills':>5} {'median':>9} {'max':>9}   goal < {GOAL_S:.0f} s")
    for r in results:
        print(f"{r['mode']:6} {r['kills']:5d} {r['median_s'] * 1000:7.0f} ms {r['max_s'] * 1000:7.0f} ms")
    doc = {"results": results, "goal_s": GOAL_S, "kernel": os.uname().release, "cpus": os.cpu_count()}
    out = Path(args.json) if args.json else work / "failover-bench.json"
    out.write_text(json.dumps(doc, indent=2))
    print(f"(JSON: {out})")
    return 0 if all(r["median_s"] < GOAL_S for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
