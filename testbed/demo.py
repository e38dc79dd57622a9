"""The README's main job: sample image -> local registry -> nydusify convert -> check -> lazy mount -> run.

python3 -m testbed.demo [--workdir DIR] [--mode auto|fuse|erofs]

Builds the sample image from local files, pushes it to a docker-registry
started on 127.0.0.1, converts it registry to registry, checks and inspects
the conversion, then mounts it lazily (`nydusify mount --daemon`, as a user
would), runs a command from it with chroot, and prints what was fetched —
counted by the registry's access log and by the daemon's stats — against
the image size. Everything it started is stopped and removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from converter.check import check
from converter.convert import ConvertOptions, convert
from converter.inspect import render, summarize
from converter.nydus_image import open_nydus_image

from .registry import push_image, run_registry
from .sample import build_sample_layout

COMMAND = ("cat /etc/hello.txt; echo \"$(ls /usr/lib/python3.11 | wc -l) entries in /usr/lib/python3.11\"; "
           "head -c 300 /usr/lib/python3.11/this.py | wc -c; sha256sum /bin/busybox")


def _step(title: str):
    print(f"== {title}", flush=True)
    return time.monotonic()


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _nydusify(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "converter.cli", *args], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m testbed.demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="where to build (default: a temporary directory, removed afterwards)")
    p.add_argument("--mode", choices=("auto", "fuse", "erofs"), default="auto", help="mount mode")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="pynydus-demo-")
    try:
        t = _step("building the sample OCI image from local files")
        source_layout = build_sample_layout(os.path.join(workdir, "source"), "sample")
        print(f"   {source_layout} ({time.monotonic() - t:.1f} s)")
        with run_registry(os.path.join(workdir, "registry")) as reg:
            return _with_registry(reg, source_layout, workdir, args.mode)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _with_registry(reg, source_layout: str, workdir: str, mode: str) -> int:
    t = _step(f"pushing it to a local docker-registry at {reg.host}")
    source = f"{reg.host}/demo/sample:latest"
    push_image(source_layout, source)
    print(f"   {source} ({time.monotonic() - t:.1f} s)")

    t = _step("nydusify convert (registry to registry)")
    target = f"{reg.host}/demo/sample:nydus"
    results = convert(source, target, ConvertOptions(progress=True, plain_http=True))
    r = results[0]
    image_size = sum(b.info.compressed_size for b in r.blobs)
    print(f"   {target}: {len(r.blobs)} blobs, {_mb(image_size)} from {_mb(r.source_bytes)} "
          f"of gzip layers ({time.monotonic() - t:.1f} s)")

    t = _step("nydusify check")
    problems, stats = check(source, target, plain_http=True)
    if problems:
        print("   check FAILED:\n" + "\n".join("   " + p for p in problems[:50]))
        return 1
    print(f"   OK: {stats['entries']} entries equal, {stats['chunks_verified']} chunks verified "
          f"({time.monotonic() - t:.1f} s)")

    _step("nydusify inspect")
    with open_nydus_image(target, plain_http=True) as image:
        print("   " + render(summarize(image)).replace("\n", "\n   "))

    if os.geteuid() != 0:
        print("== lazy mount skipped: mounting needs root")
        return 0
    return _lazy_run(reg, target, workdir, mode, image_size)


def _lazy_run(reg, target: str, workdir: str, mode: str, image_size: int) -> int:
    mnt = os.path.join(workdir, "mnt")
    os.makedirs(mnt, exist_ok=True)
    cache = os.path.join(workdir, "cache")
    run_dir = os.path.join(workdir, "run")          # the daemon's state (and log) stay in the workdir
    _step(f"nydusify mount {target} {mnt} --mode {mode} --daemon")
    mark = reg.mark()
    start = time.monotonic()
    m = _nydusify("mount", target, mnt, "--plain-http", "--mode", mode, "--daemon", "--cache-dir", cache,
                  "--run-dir", run_dir)
    if m.returncode != 0:
        print(f"   mount FAILED:\n{m.stdout}{m.stderr}")
        return 1
    ready = time.monotonic() - start
    print(f"   {m.stdout.strip()}\n   ready in {ready:.2f} s")
    try:
        at_mount = reg.blob_gets(since=mark)
        _step(f"chroot {mnt} /bin/sh -c '...'")
        t0 = time.monotonic()
        run = subprocess.run(["chroot", mnt, "/bin/sh", "-c", COMMAND], capture_output=True, text=True)
        ran = time.monotonic() - t0
        print("   " + (run.stdout + run.stderr).strip().replace("\n", "\n   "))
        print(f"   exit {run.returncode} in {ran:.2f} s")
        gets = reg.blob_gets(since=mark)
        boot_bytes = sum(e.bytes for e in at_mount)
        data_gets = gets[len(at_mount):]
        data_bytes = sum(e.bytes for e in data_gets)
        st = _nydusify("stats", mnt, "--json", "--run-dir", run_dir)
        stats = json.loads(st.stdout) if st.returncode == 0 else {}
        _step("what was fetched")
        print(f"   registry access log: bootstrap {_mb(boot_bytes)} at mount; then {len(data_gets)} blob "
              f"range GETs, {_mb(data_bytes)} of data")
        if stats:
            print(f"   daemon stats ({stats['mode']} mode): {_mb(stats['backend_bytes'])} from the registry, "
                  f"chunks {_mb(stats['bytes_fetched'])} in {stats['requests']} requests, "
                  f"{stats['chunks_fetched']} chunks fetched, {stats['chunks_hit']} hit; "
                  f"fetch latency p50 {stats['fetch_latency_ms']['p50']} ms")
        print(f"   image: {_mb(image_size)} of blobs -> fetched {100 * data_bytes / max(image_size, 1):.1f}% "
              f"of it; mount + command took {ready + ran:.2f} s")
        return 0 if run.returncode == 0 else 1
    finally:
        _step(f"nydusify umount {mnt}")
        u = _nydusify("umount", mnt, "--run-dir", run_dir)
        print("   " + (u.stdout + u.stderr).strip())


if __name__ == "__main__":
    sys.exit(main())
