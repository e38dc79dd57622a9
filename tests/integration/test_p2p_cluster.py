"""P2P end to end: four nodes, each in its own network namespace, a real docker-registry, a real
tracker process, real mounts (the rafs mount daemon, FUSE / EROFS), bytes counted from the
registry's access log.

Each node is `nydusify mount REF MNT --p2p-...`; a node that serves corrupted bytes runs the
same daemon through testbed/p2pcluster.py with the fault injected.

Topology (testbed/netns.py): the registry listens on the host's veth address, the tracker
runs in the hub namespace, node i in namespace i at 10.213.K.(10+i); nothing else on the host
changes. The test process reads the mounted files (FUSE requests go to the daemons).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from testbed.p2pcluster import (REPO, MiB, Cluster, build_image, convert_push, egress, in_parallel,
                                next_serial, p2p_args)


# =========================================================================== fixtures

def _skip_reason() -> str | None:
    from testbed import netns
    why = netns.available()
    if why:
        return why
    if not os.path.exists("/dev/fuse"):
        return "needs /dev/fuse"
    if not os.path.exists("/usr/bin/docker-registry"):
        return "needs docker-registry"
    return None


@pytest.fixture(scope="module")
def lab():
    why = _skip_reason()
    if why:
        pytest.skip(why)
    from testbed.netns import NetLab
    with NetLab(nodes=4) as lab:
        yield lab


@pytest.fixture(scope="module")
def lab_registry(lab, tmp_path_factory):
    """A docker-registry on the host's lab address (reachable from every node namespace)."""
    from testbed.registry import Registry
    reg = Registry(tmp_path_factory.mktemp("p2p-registry"), ip=lab.host_ip)
    reg.start()
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def images(lab_registry, tmp_path_factory):
    """images(name) -> (ref, expected files): converted and pushed once per name."""
    cache = {}
    work = tmp_path_factory.mktemp("p2p-images")

    def get(name: str):
        if name not in cache:
            image, expect = build_image(work / name, seed=len(cache) + 1)
            ref = f"{lab_registry.host}/p2p/{name}:v1"
            convert_push(image, ref)
            cache[name] = (ref, expect)
        return cache[name]
    return get


@pytest.fixture
def tracker(lab):
    """A `nydus-peer tracker` process in the hub namespace; stoppable by the test."""
    port = 7000 + next_serial()
    proc = lab.popen("hub", [sys.executable, "-m", "p2p.cli", "tracker", "--listen",
                             f"{lab.hub_ip}:{port}", "--interval", "1"],
                     cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    line = proc.stdout.readline().decode()
    assert "listening" in line, line
    proc.addr = f"{lab.hub_ip}:{port}"
    yield proc
    lab.stop(proc)
    proc.stdout.close()


@pytest.fixture
def cluster(lab, tmp_path):
    c = Cluster(tmp_path, lab)
    yield c
    c.close()


# =========================================================================== tests

def test_four_nodes_one_after_another_then_all_at_once(lab, lab_registry, images, tracker,
                                                       cluster):
    reg = lab_registry
    # reference: what one node alone costs the registry (image "solo", same shape)
    ref, expect = images("solo")
    mark = reg.mark()
    solo = cluster.start(0, ref, p2p=[])
    solo.read_all(expect)
    one = egress(reg, mark)
    cluster.stop(solo)
    data = sum(3 * MiB for _ in expect)
    assert one > 0.5 * data                       # the files really came from the registry

    # one after another, with P2P
    ref, expect = images("sequential")
    mark = reg.mark()
    for i in range(4):
        node = cluster.start(i, ref, p2p=p2p_args(lab, i, tracker))
        node.read_all(expect)
    seq = egress(reg, mark)
    per = [n.p2p()["blobs"] for n in cluster.nodes[-4:]]
    peer_bytes = [sum(b["peer"] for b in p.values()) for p in per]
    for n in cluster.nodes[-4:]:
        cluster.stop(n)

    # all at once, with P2P
    ref, expect = images("together")
    mark = reg.mark()
    nodes = in_parallel([lambda i=i: cluster.start(i, ref, p2p=p2p_args(lab, i, tracker))
                         for i in range(4)])
    in_parallel([lambda n=n: n.read_all(expect) for n in nodes])
    together = egress(reg, mark)
    waits = sum(b["waits"] for n in nodes for b in n.p2p()["blobs"].values())
    print(f"\nregistry egress: one node {one} B; 4 nodes one after another {seq} B "
          f"({seq / one:.2f}x); 4 nodes at once {together} B ({together / one:.2f}x); "
          f"peer bytes (sequential) {peer_bytes}; waits for fetching peers (together) {waits}")
    assert seq <= 1.3 * one, (seq, one)
    assert together <= 1.3 * one, (together, one)
    assert all(b > 0.5 * data for b in peer_bytes[1:])


def test_corrupting_peer_is_penalized_and_readers_get_correct_bytes(lab, lab_registry, images,
                                                                    tracker, cluster):
    ref, expect = images("corrupt")
    bad = cluster.start(0, ref, p2p=p2p_args(lab, 0, tracker), extra=("--corrupt-serving",))
    bad.read_all(expect)                           # bad holds everything (and lies when serving)
    good = cluster.start(1, ref, p2p=p2p_args(lab, 1, tracker))
    good.read_all(expect)                          # correct bytes, from the registry
    p2p = good.p2p()
    assert p2p["peers"][bad.addr]["penalized"], p2p["peers"]
    assert "failed verification" in p2p["peers"][bad.addr]["penalty_reason"]
    blob_stats = list(p2p["blobs"].values())
    assert sum(b["registry"] for b in blob_stats) > 0
    assert sum(b["peer_failures"] for b in blob_stats) >= 1
    assert good.stats()["verify_failures"] == 0     # nothing bad got past the P2P layer


def test_peer_killed_mid_transfer_then_tracker_down(lab, lab_registry, images, tracker, cluster):
    ref, expect = images("killed")
    seed = cluster.start(0, ref, p2p=p2p_args(lab, 0, tracker, upload_rate=4 * MiB))
    seed.read_all(expect)
    reader = cluster.start(1, ref, p2p=p2p_args(lab, 1, tracker))
    done = threading.Event()

    def read():
        reader.read_all(expect)
        done.set()
    t = threading.Thread(target=read)
    t.start()
    time.sleep(1.0)                                # ~4 MiB of 24 came from the seed so far
    assert not done.is_set(), "the transfer finished before the seed could be killed"
    cluster.stop(seed, signal.SIGKILL)             # mid-transfer
    lab.stop(tracker, signal.SIGKILL)              # and the tracker is gone too
    t.join(timeout=120)
    assert done.is_set(), "the reader did not finish"
    p2p = reader.p2p()
    # Part came from the seed, the rest from the registry once seed and tracker were gone. (Whether
    # the kill hit a request in flight, and so counts as a peer error, depends on timing.)
    assert sum(b["peer"] for b in p2p["blobs"].values()) > 0
    assert sum(b["registry"] for b in p2p["blobs"].values()) > 0
    # a node that starts now, with neither seed nor tracker, still reads correct bytes
    late = cluster.start(2, ref, p2p=p2p_args(lab, 2, tracker))
    late.read_all(expect)
    assert late.p2p()["discovery"]["errors"] >= 1


def test_static_peer_list(lab, lab_registry, images, cluster):
    ref, expect = images("static")
    peers = [f"{lab.node_ip(i)}:7070" for i in range(2)]
    a = cluster.start(0, ref, p2p=p2p_args(lab, 0, peers=peers))
    a.read_all(expect)
    mark = lab_registry.mark()
    b = cluster.start(1, ref, p2p=p2p_args(lab, 1, peers=peers))
    b.read_all(expect)
    blob_bytes = sum(e.bytes for e in lab_registry.blob_gets(since=mark))
    assert blob_bytes < MiB, blob_bytes            # the bootstrap layer only; data from a
