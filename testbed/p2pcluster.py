"""A P2P cluster: nodes (mount daemons with their own cache and peer port), optionally each in
its own network namespace (testbed/netns.py). Shared by tests/integration/test_p2p_cluster.py
and benchmarks/p2p.py.

Nodes run `nydusify mount --p2p-...`. A node that must misbehave (serve corrupted bytes to peers)
runs `python -m testbed.p2pcluster mount REF MNT --corrupt-serving ...` (below, `main`): the same
`open_image`, storage and launcher (`rafs.launcher`) as `nydusify mount`, plus the fault.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .process import stop_process

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
_n = itertools.count(1)


def next_serial() -> int:
    """1, 2, 3, ...: unique node names (and ports) within this process."""
    return next(_n)


# =========================================================================== the node driver

def main(argv: list[str] | None = None) -> int:
    """`mount REF MNT --cache-dir D [--run-dir R] [--mode M] [--p2p-...] [--corrupt-serving]`: in the
    foreground, reporting `READY MODE LISTEN` once mounted."""
    from converter.mount_cli import open_image
    from p2p.cli import MOUNT_CACHES, mount_config
    from rafs.launcher import add_mount_options, launch

    ap = argparse.ArgumentParser(prog="p2p-node")
    ap.add_argument("cmd", choices=["mount"])
    ap.add_argument("ref")
    ap.add_argument("mountpoint")
    ap.add_argument("--plain-http", action="store_true")
    ap.add_argument("--corrupt-serving", action="store_true",
                    help="test only: serve every range to peers with its first byte flipped")
    add_mount_options(ap, caches=MOUNT_CACHES)
    args = ap.parse_args(argv)
    if args.corrupt_serving:
        from p2p.node import BlobState
        real = BlobState.read_range

        def corrupt(self, start, end):
            data = real(self, start, end)
            return bytes([data[0] ^ 0xFF]) + data[1:] if data else data
        BlobState.read_range = corrupt
    p2p_cfg = mount_config(args)
    return launch(args, lambda: open_image(args.ref, plain_http=args.plain_http), caches=MOUNT_CACHES,
                  report=lambda daemon: f"READY {daemon.mode} {p2p_cfg.listen if p2p_cfg else '-'}")


# =========================================================================== the cluster

def _mount_cli_has_p2p() -> bool:
    r = subprocess.run([sys.executable, "-m", "converter.cli", "mount", "--help"], cwd=REPO,
                       capture_output=True, text=True)
    return "--p2p-tracker" in r.stdout


def build_image(layout_dir: Path, seed: int, *, files: int = 8, size: int = 3 * MiB):
    """An image whose files are half random, half compressible (so chunks are both stored
    and zstd-compressed); returns (ImageInfo, {path: sha256})."""
    from testbed import images as im
    entries = [im.Entry.dir("data")]
    expect = {}
    for i in range(files):
        if i % 2:
            c = im.random(size, seed * 1000 + i)
        else:
            c = im.repeat(im.concat(im.random(4096, seed * 1000 + i), im.zeros(4096)),
                          size // 8192)
        entries.append(im.Entry.file(f"data/f{i}", c))
        expect[f"data/f{i}"] = c.sha256()
    return im.build_oci_layout(layout_dir, "v1", [entries]), expect


def convert_push(image, target: str) -> None:
    r = subprocess.run([sys.executable, "-m", "converter.cli", "convert", "--source", image.ref,
                        "--target", target, "--plain-http", "--chunk-size", "256K"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout


def egress(reg, since: int) -> int:
    """Body bytes the registry sent since mark `since` (every request: manifests, blobs, ...)."""
    return sum(e.bytes for e in reg.access_log(since))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)


@dataclass
class Node:
    """One mount daemon process (in a namespace, or on the host when lab is None)."""
    proc: subprocess.Popen
    mountpoint: Path
    run_dir: Path
    addr: str | None
    log: Path

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.exists() and "READY" in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"node did not mount:\n{self.log.read_text(errors='replace')[-3000:]}")

    def read_all(self, expect: dict[str, str]) -> None:
        for rel, sha in sorted(expect.items()):
            got = sha256_file(self.mountpoint / rel)
            assert got == sha, f"{self.mountpoint / rel}: wrong bytes"

    def stats(self) -> dict:
        from rafs.api import ApiClient
        from rafs.mounttab import state_paths
        return ApiClient(state_paths(str(self.mountpoint), str(self.run_dir)).api_sock).stats()

    def p2p(self) -> dict:
        return self.stats()["storage"]["metrics"]["sources"]["p2p"]


class Cluster:
    """Starts and always stops nodes; every mount is gone afterwards."""

    def __init__(self, root: Path, lab=None):
        self.root = root
        self.lab = lab
        self.nodes: list[Node] = []
        self.cli_has_p2p = _mount_cli_has_p2p()
        self.run_root = Path(tempfile.mkdtemp(prefix="pn-"))   # unix socket paths are short

    def start(self, index: int, ref: str, *, p2p: list[str], extra: tuple[str, ...] = (),
              name: str | None = None) -> Node:
        name = name or f"node{index}-{next_serial()}"
        d = self.root / name
        mnt = d / "mnt"
        mnt.mkdir(parents=True)
        log = d / "node.log"
        if self.cli_has_p2p and not extra:
            argv = [sys.executable, "-m", "converter.cli", "mount", ref, str(mnt)]
            print_ready = False
        else:
            argv = [sys.executable, "-m", "testbed.p2pcluster", "mount", ref,
                    str(mnt)]
            print_ready = True
        run_dir = self.run_root / name
        argv += ["--cache-dir", str(d / "cache"), "--run-dir", str(run_dir), "--plain-http", "--learn", "off",
                 *p2p, *extra]
        out = open(log, "wb")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        try:
            if self.lab is not None:
                proc = self.lab.popen(index, argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                      env=env)
            else:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                        env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            out.close()
        addr = None
        if "--p2p-listen" in p2p:
            addr = p2p[p2p.index("--p2p-listen") + 1]
        node = Node(proc, mnt, run_dir, addr, log)
        self.nodes.append(node)
        if print_ready:
            node.wait_ready()
        else:
            self._wait_mounted(node)
        return node

    @staticmethod
    def _wait_mounted(node: Node, timeout: float = 60.0) -> None:
        from rafs.mounttab import mounts_at
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if mounts_at(str(node.mountpoint)):
                return
            if node.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"node did not mount:\n{node.log.read_text(errors='replace')[-3000:]}")

    def stop(self, node: Node, sig: int = signal.SIGTERM) -> None:
        from rafs.mounttab import mounts_at, request_umount
        stop_process(node.proc, 20, sig=sig)
        if mounts_at(str(node.mountpoint)):           # killed: clear what it left
            try:
                request_umount(str(node.mountpoint), run_dir_override=str(node.run_dir))
            except Exception:
                subprocess.run(["umount", "-l", str(node.mountpoint)], capture_output=True)
        assert not mounts_at(str(node.mountpoint)), f"{node.mountpoint} still mounted"

    def close(self) -> None:
        errors = []
        for node in reversed(self.nodes):
            try:
                self.stop(node)
            except Exception as e:
                errors.append(e)
        self.nodes.clear()
        shutil.rmtree(self.run_root, ignore_errors=True)
        assert not errors, errors


def in_parallel(fns) -> list:
    out, errors = [None] * len(fns), []

    def run(i):
        try:
            out[i] = fns[i]()
        except BaseException as e:
            errors.append(e)
    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    return out


def p2p_args(lab, i: int, tracker=None, peers=None, **kw) -> list[str]:
    out = ["--p2p-listen", f"{lab.node_ip(i)}:7070"]
    if tracker is not None:
        out += ["--p2p-tracker", tracker.addr]
    if peers:
        out += ["--p2p-peers", ",".join(peers)]
    for k, v in kw.items():
        out += [f"--p2p-{k.replace('_', '-')}", str(v)]
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
