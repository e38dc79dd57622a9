"""P2P through the snapshotter, end to end: two nodes, each a containerd + nydus-snapshotter pair with
`[p2p]` in the snapshotter's config, lazily run the same nydus image; the second node's chunks come
from the first node's mount daemon, not from the registry.

Real parts: a network lab (testbed/netns.py) — each snapshotter (and so the mount daemons it
starts, which serve peers on a free port at `[p2p] listen_host`) runs in its own network
namespace, the tracker (`nydus-peer tracker`) in the hub namespace, a real docker-registry on the
host's lab address —, Debian's containerd 1.6 + runc per node (on the host; it reaches its
snapshotter over the unix socket), real lazy mounts. Bytes are counted twice: the registry's
access log (range GETs of the nydus blobs while each node's container runs) and the second
node's mount daemon (`storage.metrics.sources.p2p`: bytes from peers vs. the registry).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from converter.convert import ConvertOptions, convert
from rafs.image.store import open_store
from snapshotter.snapshots import LABEL_NYDUS_BLOB
from testbed.containerd import REPO, Containerd, SnapshotterProcess, mounts_under
from testbed.registry import Registry
from tests.helpers import images as im

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="containerd, runc, mounts and network namespaces need root"),
    pytest.mark.skipif(not all(shutil.which(b) for b in ("containerd", "ctr", "runc")),
                       reason="needs containerd and runc (apt)"),
    pytest.mark.skipif(not os.path.isfile("/bin/busybox"), reason="needs busybox-static"),
    pytest.mark.skipif(not os.path.exists("/usr/bin/docker-registry"), reason="needs docker-registry"),
]

MiB = 1 << 20
BIG = im.random(6 * MiB, seed=21)                       # random: stored as is, every byte a chunk byte
TEXT = im.repeat(im.concat(im.random(4096, seed=22), im.zeros(4096)), 256)   # 2 MiB, compressible
READ = "cat /etc/hello.txt; md5sum /data/big /data/text"


def _expected() -> str:
    return (im.BUSYBOX_HELLO.decode() + f"{hashlib.md5(BIG.read()).hexdigest()}  /data/big\n"
            f"{hashlib.md5(TEXT.read()).hexdigest()}  /data/text\n")


@pytest.fixture(scope="module")
def lab():
    from testbed import netns
    why = netns.available()
    if why:
        pytest.skip(why)
    with netns.NetLab(nodes=2) as lab:
        yield lab


@pytest.fixture(scope="module")
def lab_registry(lab, tmp_path_factory):
    """A docker-registry on the host's lab address: reachable from the host (containerd) and every node."""
    reg = Registry(tmp_path_factory.mktemp("p2p-snap-registry"), ip=lab.host_ip)
    reg.start()
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def image(lab_registry, tmp_path_factory):
    """(ref, repo, {nydus blob digest: size}): busybox + /data/big and /data/text, converted and pushed."""
    work = tmp_path_factory.mktemp("p2p-snap-image")
    layers = im.busybox_image_layers() + [[im.Entry.dir("data"), im.Entry.file("data/big", BIG),
                                           im.Entry.file("data/text", TEXT)]]
    layout = im.build_oci_layout(work / "layout", "app", layers, config_overrides=im.BUSYBOX_CONFIG)
    repo = f"p2p-snap-{uuid.uuid4().hex[:8]}"
    ref = f"{lab_registry.host}/{repo}:nydus"
    convert(layout.ref, ref, ConvertOptions(plain_http=True, chunk_size=256 << 10))
    with open_store(ref, plain_http=True) as store:
        manifest = json.loads(store.get_bytes(store.resolve().digest))
    blobs = {l["digest"]: l["size"] for l in manifest["layers"]
             if (l.get("annotations") or {}).get(LABEL_NYDUS_BLOB) == "true"}
    assert blobs
    return ref, repo, blobs


@pytest.fixture
def tracker(lab):
    """`nydus-peer tracker` in the hub namespace (what every node's [p2p] tracker names)."""
    port = 7300 + int(uuid.uuid4().int % 500)
    proc = lab.popen("hub", [sys.executable, "-m", "p2p.cli", "tracker", "--listen", f"{lab.hub_ip}:{port}",
                             "--interval", "1"],
                     cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        line = proc.stdout.readline().decode()
        assert "listening" in line, line
        yield f"{lab.hub_ip}:{port}"
    finally:
        lab.stop(proc)
        proc.stdout.close()


class Node:
    """One machine: our snapshotter in the node's network namespace, with `[p2p]`, and a containerd using it."""

    def __init__(self, lab, i: int, work: Path, sock_dir: Path, registry: Registry, p2p: dict):
        self.lab, self.i = lab, i
        self.snap = SnapshotterProcess(work / f"snap{i}", address=str(sock_dir / f"s{i}.sock"), log_level="info",
                                       config={"backend": {"plain_http": [registry.host]}, "p2p": p2p})
        self.ctd = Containerd(work / f"ctd{i}", snapshotter=self.snap, cri=False)

    def start(self) -> "Node":
        self.snap.start(netns=self.lab.ns_path(self.i))
        self.ctd.start()
        return self

    def close(self) -> None:
        try:
            self.ctd.stop()
        finally:
            self.snap.teardown()

    def rpull(self, ref: str) -> str:
        r = self.snap.cli("rpull", "--address", self.ctd.address, "--namespace", self.ctd.namespace,
                          "--plain-http", ref, timeout=120)
        assert r.returncode == 0, f"rpull failed:\n{r.stdout}\n{r.stderr}\n{self.snap.log()[-3000:]}"
        return r.stdout

    def run(self, ref: str, cid: str, *cmd: str) -> str:
        return self.ctd.ctr_run(ref, cid, *cmd).stdout

    def p2p_stats(self) -> dict:
        """The image's mount daemon's P2P numbers (per blob: bytes from peers / the registry, ...)."""
        from rafs.api import ApiClient
        from rafs.mounttab import state_paths
        from snapshotter.lazy import default_run_dir
        [m] = self.snap.status()["mounts"]
        api = state_paths(m["mountpoint"], default_run_dir(self.snap.root)).api_sock
        return ApiClient(api, timeout=5).stats()["storage"]["metrics"]["sources"]["p2p"]


@pytest.fixture
def nodes(lab, lab_registry, tracker, tmp_path):
    """nodes(n) -> n started Nodes whose [p2p] names their own lab address and the tracker; all torn down."""
    made: list[Node] = []
    sock_dir = Path(tempfile.mkdtemp(prefix="p2ps-"))           # unix socket paths stay short

    def make(n: int) -> list[Node]:
        for i in range(n):
            node = Node(lab, i, tmp_path, sock_dir, lab_registry, {"listen_host": lab.node_ip(i), "tracker": tracker})
            made.append(node)
            node.start()
        return made
    try:
        yield make
    finally:
        errors = []
        for node in reversed(made):
            try:
                node.close()
            except Exception as e:          # keep tearing the others down
                errors.append(e)
        shutil.rmtree(sock_dir, ignore_errors=True)
        left = mounts_under(tmp_path)
        assert not errors and not left, f"teardown: {errors}, mounts left behind: {left}"


def _chunk_gets(reg: Registry, repo: str, blobs: dict, since: int) -> list:
    return [e for e in reg.access_log(since) if e.method == "GET" and e.path.startswith(f"/v2/{repo}/blobs/")
            and e.digest in blobs]


def test_second_node_gets_its_chunks_from_the_first(nodes, lab_registry, image, record_property):
    ref, repo, blobs = image
    reg = lab_registry
    a, b = nodes(2)
    expected = _expected()
    data = BIG.size + TEXT.size

    # node A: lazily, from the registry (range GETs only)
    a.rpull(ref)
    mark = reg.mark()
    assert a.run(ref, "a1", "sh", "-c", READ) == expected
    got_a = _chunk_gets(reg, repo, blobs, mark)
    assert got_a and all(e.status == 206 for e in got_a), [(e.path, e.status) for e in got_a]
    registry_a = sum(e.bytes for e in got_a)
    assert registry_a > BIG.size                      # the data really came from the registry to A
    pa = a.p2p_stats()
    assert sum(s["peer"] for s in pa["blobs"].values()) == 0

    # node B: the pull takes the bootstrap from the registry as always; the chunks come from A
    mark = reg.mark()
    out = b.rpull(ref)
    assert f"{len(blobs)} layer(s) served lazily" in out, out
    assert not _chunk_gets(reg, repo, blobs, mark), "the pull fetched nydus blob data"
    mark = reg.mark()
    assert b.run(ref, "b1", "sh", "-c", READ) == expected
    registry_b = sum(e.bytes for e in _chunk_gets(reg, repo, blobs, mark))
    pb = b.p2p_stats()
    peer_b = sum(s["peer"] for s in pb["blobs"].values())
    from_registry_b = sum(s["registry"] for s in pb["blobs"].values())
    record_property("registry_chunk_bytes_node_a", registry_a)
    record_property("registry_chunk_bytes_node_b", registry_b)
    record_property("peer_bytes_node_b", peer_b)
    assert peer_b > data // 2, pb                      # B's chunks came from A ...
    assert registry_b <= registry_a // 50, (registry_b, registry_a)   # ... and ~nothing from the registry
    assert from_registry_b <= registry_a // 50, pb
    peers = pb["peers"]
    assert [p for p in peers if p.startswith(f"{a.lab.node_ip(0)}:")], peers      # A, found through the tracker
    assert not any(p["penalized"] for p in peers.values()), peers
    [m] = b.snap.status()["mounts"]
    assert m["daemon_alive"] and m["verify_failures"] == 0
