"""P2P nodes in one process: real peer servers and a real tracker on 127.0.0.1, blob caches over
a counting local origin. The multi-process, real-registry, real-mount tests are in
tests/integration/test_p2p_*.py."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import requests

from p2p.protocol import FRAME_SIZE
from p2p.service import P2PConfig, P2PService
from p2p.tracker import TrackerServer
from rafs.storage.backend import LocalFsBackend
from rafs.storage.factory import CacheConfig
from tests.conformance import make_blob
from tests.fakes.backends import CountingBackend
from testbed.p2pcluster import in_parallel
from testbed.process import free_port


class Node:
    """One node: a P2PService with a peer server, a cache manager over a counting origin."""

    def __init__(self, root: Path, origin_dir: Path, name: str, **p2p):
        self.origin = CountingBackend(LocalFsBackend(origin_dir))
        p2p.setdefault("listen", "127.0.0.1:0")
        self.svc = P2PService(P2PConfig(**p2p), root / name / "p2p")
        self.mgr = self.svc.cache_manager(self.origin, CacheConfig(dir=str(root / name / "cache")))

    @property
    def addr(self) -> str:
        return self.svc.address

    def read_all(self, blob) -> bytes:
        cache = self.mgr.open(blob.info)
        return cache.read(0, len(blob.view))

    def origin_bytes(self) -> int:
        return sum(n for _, _, n in self.origin.calls)

    def close(self) -> None:
        self.mgr.close()
        self.svc.close()


@pytest.fixture
def origin_dir(tmp_path):
    d = tmp_path / "origin"
    d.mkdir()
    return d


def _put(origin_dir: Path, blob) -> None:
    (origin_dir / blob.blob_id).write_bytes(blob.data)


@pytest.fixture
def tracker():
    with TrackerServer("127.0.0.1:0") as t:
        yield t


@pytest.fixture
def cluster(tmp_path, origin_dir):
    nodes: list[Node] = []

    def make(name: str, **p2p) -> Node:
        n = Node(tmp_path, origin_dir, name, **p2p)
        nodes.append(n)
        return n
    yield make
    for n in nodes:
        n.close()


# --------------------------------------------------------------------------- egress

def test_four_nodes_at_once_fetch_each_byte_from_the_origin_once(cluster, tracker, origin_dir):
    blob = make_blob(11, chunks=120)
    _put(origin_dir, blob)
    nodes = [cluster(f"n{i}", tracker=tracker.address) for i in range(4)]
    for n in nodes:
        n.origin.delay = 0.01                 # make the fetches overlap
    got = in_parallel([lambda n=n: n.read_all(blob) for n in nodes])
    assert all(g == blob.view for g in got)
    total = sum(n.origin_bytes() for n in nodes)
    assert total == blob.data_end, (total, blob.data_end)     # chunk data only, each byte once
    st = nodes[1].mgr.stats()
    per = st["metrics"]["sources"]["p2p"]["blobs"][blob.blob_id]
    assert per["peer"] + per["registry"] + per["mirror"] + per.get("origin", 0) > 0
    assert st["blobs"][blob.blob_id]["sources"] == per
    assert st["metrics"]["verify_failures"] == 0


def test_one_after_another_later_nodes_never_touch_the_origin(cluster, tracker, origin_dir):
    blob = make_blob(12, chunks=60)
    _put(origin_dir, blob)
    first = cluster("a", tracker=tracker.address)
    assert first.read_all(blob) == blob.view
    for name in "bcd":
        n = cluster(name, tracker=tracker.address)
        assert n.read_all(blob) == blob.view
        assert n.origin_bytes() == 0          # nothing is read from the blob but chunks
        per = n.mgr.backend.blob_stats()[blob.blob_id]
        assert per["peer"] >= blob.data_end


def test_static_peer_list_without_tracker(cluster, origin_dir):
    blob = make_blob(13, chunks=30)
    _put(origin_dir, blob)
    a = cluster("a")
    b = cluster("b", peers=[a.addr])
    assert a.read_all(blob) == blob.view
    assert b.read_all(blob) == blob.view
    assert b.origin_bytes() == 0


# --------------------------------------------------------------------------- faults

def _corrupting(node: Node) -> None:
    """Make node's peer service serve every range with one byte flipped (framed correctly)."""
    for st in node.svc.node.blobs():
        real = st.read_range

        def bad(start, end, real=real):
            data = real(start, end)
            if data is None or not data:
                return data
            return bytes([data[0] ^ 0xFF]) + data[1:]
        st.read_range = bad


def test_corrupt_peer_is_penalized_and_readers_get_correct_bytes(cluster, tracker, origin_dir):
    blob = make_blob(14, chunks=40)
    _put(origin_dir, blob)
    bad = cluster("bad", tracker=tracker.address)
    assert bad.read_all(blob) == blob.view
    _corrupting(bad)
    good = cluster("good", tracker=tracker.address)
    assert good.read_all(blob) == blob.view
    peers = good.mgr.backend.client.stats()
    assert peers[bad.addr]["penalized"], peers
    assert "failed verification" in peers[bad.addr]["penalty_reason"]
    per = good.mgr.backend.blob_stats()[blob.blob_id]     # the origin served the bad units
    assert good.origin_bytes() > 0 and per["peer"] + per["origin"] >= blob.data_end
    assert good.mgr.stats()["metrics"]["verify_failures"] == 0   # nothing bad reached the cache
    # the corrupt bytes were never stored: a third node gets everything right from "good"
    third = cluster("third", tracker=tracker.address)
    assert third.read_all(blob) == blob.view
    assert third.origin_bytes() == 0


def test_slow_peer_is_abandoned_within_bounds(cluster, tracker, origin_dir):
    blob = make_blob(15, chunks=40)
    _put(origin_dir, blob)
    slow = cluster("slow", tracker=tracker.address, upload_rate=50_000)
    assert slow.read_all(blob) == blob.view
    fast = cluster("fast", tracker=tracker.address, min_rate=1 << 20, read_timeout=0.5)
    t0 = time.monotonic()
    assert fast.read_all(blob) == blob.view
    assert time.monotonic() - t0 < 10
    assert fast.mgr.backend.client.stats()[slow.addr]["penalized"]


def test_tracker_down_means_registry_and_no_error(cluster, origin_dir):
    blob = make_blob(16, chunks=30)
    _put(origin_dir, blob)
    dead = f"127.0.0.1:{free_port()}"
    n = cluster("n", tracker=dead)
    t0 = time.monotonic()
    assert n.read_all(blob) == blob.view
    assert time.monotonic() - t0 < 5
    assert n.origin_bytes() == blob.data_end
    assert n.mgr.backend.discovery.stats()["errors"] >= 1


def test_waiting_for_a_fetching_peer_that_fails_falls_back(cluster, tracker, origin_dir):
    blob = make_blob(17, chunks=20)
    _put(origin_dir, blob)
    a = cluster("a", tracker=tracker.address)
    b = cluster("b", tracker=tracker.address, wait_timeout=2.0)
    a.origin.gate = threading.Event()         # a's origin hangs: a claims, b must wait for it
    result = []
    ta = threading.Thread(target=lambda: result.append(a.read_all(blob)))
    ta.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    assert b.read_all(blob) == blob.view      # waited (bounded), then fetched itself
    assert 2.0 <= time.monotonic() - t0 < 15
    assert b.mgr.backend.blob_stats()[blob.blob_id]["waits"] >= 1
    a.origin.gate.set()
    ta.join()
    assert result == [blob.view]


# --------------------------------------------------------------------------- the peer service

def test_serves_only_shared_blobs_and_held_ranges(cluster, tracker, origin_dir):
    blob, other = make_blob(18, chunks=80), make_blob(19, chunks=5)
    _put(origin_dir, blob)
    _put(origin_dir, other)
    a = cluster("a", tracker=tracker.address)
    cache = a.mgr.open(blob.info)
    cache.read(0, 4096)                       # chunk 0 (and what the cache reads ahead)
    base = f"http://{a.addr}/v1/blobs"
    s = requests.Session()
    s.trust_env = False
    e0 = blob.entries[0]
    r = s.get(f"{base}/{blob.blob_id}", params={"offset": 0, "size": e0.compressed_size})
    assert r.status_code == 200 and len(r.content) == FRAME_SIZE + e0.compressed_size
    assert r.content[FRAME_SIZE:] == blob.data[:e0.compressed_size]
    held = a.svc.node.get(blob.blob_id).held()
    assert held.covers(0, e0.compressed_size)
    e = next(e for e in blob.entries if not held.covers(e.compressed_offset, e.compressed_end))
    r = s.get(f"{base}/{blob.blob_id}", params={"offset": e.compressed_offset, "size": 10})
    assert r.status_code == 404 and r.json()["held"] == held.to_json()
    r = s.get(f"{base}/{other.blob_id}", params={"offset": 0, "size": 10})
    assert r.status_code == 404                # never opened here: not shared
    r = s.get(f"{base}/{blob.blob_id}", params={"offset": 0, "size": len(blob.data) + 1})
    assert r.status_code == 400
    r = s.get(f"{base}/{blob.blob_id}", params={"offset": blob.data_end, "size": 512})
    assert r.status_code == 404                # the blob's metadata: never served by peers
    r = s.get(f"{base}/{blob.blob_id}/ranges")
    assert r.status_code == 200 and r.json()["held"] == held.to_json()
    s.close()


def test_upload_slots_bound_concurrency(cluster, tracker, origin_dir):
    blob = make_blob(20, chunks=40)
    _put(origin_dir, blob)
    a = cluster("a", tracker=tracker.address, upload_slots=1, upload_rate=400_000)
    assert a.read_all(blob) == blob.view
    url = f"http://{a.addr}/v1/blobs/{blob.blob_id}"
    size = blob.entries[8].compressed_end
    s1, s2 = requests.Session(), requests.Session()
    s1.trust_env = s2.trust_env = False
    slow = threading.Thread(target=lambda: s1.get(url, params={"offset": 0, "size": size}))
    slow.start()
    time.sleep(0.3)
    r = s2.get(url, params={"offset": 0, "size": 100})
    assert r.status_code == 503 and r.headers["Retry-After"]
    slow.join()
    assert a.svc.server.stats.snapshot()["busy"] >= 1
    s1.close()
    s2.close()


def test_payload_store_survives_a_restart_and_is_rechecked(tmp_path, origin_dir, tracker):
    blob = make_blob(21, chunks=20)
    _put(origin_dir, blob)
    a = Node(tmp_path, origin_dir, "a", tracker=tracker.address)
    assert a.read_all(blob) == blob.view
    a.close()
    payload = tmp_path / "a" / "p2p" / f"{blob.blob_id}.payload"
    with open(payload, "r+b") as f:          # damage chunk 3 on disk
        f.seek(blob.entries[3].compressed_offset + 7)
        f.write(b"\x00\xff\x00")
    a = Node(tmp_path, origin_dir, "a", tracker=tracker.address)
    try:
        st = a.svc.node.expect(blob.info)
        assert st.unit_count() == len(blob.entries)
        assert all(st.present(u) for u in range(len(blob.entries)))   # candidates, unchecked
        assert st.read_unit(2) is not None
        assert st.read_unit(3) is None and not st.present(3)
    finally:
        a.close()


def test_forgotten_blobs_are_not_served_and_their_payload_is_gone(cluster, tracker, origin_dir):
    blob = make_blob(22, chunks=10)
    _put(origin_dir, blob)
    a = cluster("a", tracker=tracker.address)
    assert a.read_all(blob) == blob.view
    payload = Path(a.svc.node.get(blob.blob_id).file.path)
    assert payload.exists()
    assert a.svc.forget(blob.blob_id)
    assert not payload.exists() and a.svc.node.get(blob.blob_id) is None
    s = requests.Session()
    s.trust_env = False
    r = s.get(f"http://{a.addr}/v1/blobs/{blob.blob_id}", params={"offset": 0, "size": 10})
    assert r.status_code == 404
    s.close()


def test_holders_add_read_ahead_and_serve_held_prefixes(tmp_path, origin_dir, tracker):
    blob = make_blob(23, chunks=60)
    _put(origin_dir, blob)
    a = Node(tmp_path, origin_dir, "a", tracker=tracker.address)
    b = Node(tmp_path, origin_dir, "b", tracker=tracker.address)
    try:
        assert a.read_all(blob) == blob.view
        deadline = time.monotonic() + 5                # a's last update reached the tracker
        while time.monotonic() < deadline and [p["held"] for p in tracker.state.peers(
                blob.blob_id)] != [[[0, blob.data_end]]]:
            time.sleep(0.02)
        # the held-prefix form of GET: ask for more than is held, get what is held (>= min)
        st_a = a.svc.node.get(blob.blob_id)
        e = blob.entries
        s = requests.Session()
        s.trust_env = False
        url = f"http://{a.addr}/v1/blobs/{blob.blob_id}"
        r = s.get(url, params={"offset": 0, "size": e[3].compressed_end,
                               "min": e[0].compressed_size})
        assert r.status_code == 200 and r.content[FRAME_SIZE:] == blob.data[:e[3].compressed_end]
        s.close()
        assert st_a.held_prefix(0, len(blob.data)) == blob.data_end
        # b reads one chunk without the cache's own readahead: a adds the next chunks
        b.mgr.close()
        b.mgr = b.svc.cache_manager(b.origin, CacheConfig(dir=str(tmp_path / "b" / "cache"),
                                                          readahead=False))
        cache = b.mgr.open(blob.info)
        assert cache.read(e[10].uncompressed_offset, 4096) == \
            blob.view[e[10].uncompressed_offset:e[10].uncompressed_offset + 4096]
        st_b = b.svc.node.get(blob.blob_id)
        assert st_b.present(10) and st_b.present(11) and st_b.present(12)   # read ahead
        assert b.origin_bytes() == 0
        before = sum(p["requests"] for p in b.mgr.backend.client.stats().values())
        cache.read(e[11].uncompressed_offset, 4096)                  # served locally
        assert sum(p["requests"] for p in b.mgr.backend.client.stats().values()) == before
    finally:
        b.close()
        a.close()


def test_a_hung_local_fetch_does_not_block_other_readers(cluster, tracker, origin_dir):
    blob = make_blob(24, chunks=10)
    _put(origin_dir, blob)
    n = cluster("n", tracker=tracker.address)
    n.mgr.open(blob.info)                          # the units are known now
    st = n.svc.node.get(blob.blob_id)
    hung, _ = st.begin([3])                           # "another thread" never finishes chunk 3
    backend = n.mgr.backend
    backend.local_wait = 0.2
    e = blob.entries[3]
    try:
        got = backend.read_range(blob.blob_id, e.compressed_offset, e.compressed_size)
        assert got == blob.data[e.compressed_offset:e.compressed_end]
        assert st.present(3)
    finally:
        st.end(hung)


def test_a_restarted_tracker_refills_itself_from_announcements(cluster, origin_dir):
    blob = make_blob(25, chunks=10)
    _put(origin_dir, blob)
    port = free_port()
    first = TrackerServer(f"127.0.0.1:{port}").start()
    a = cluster("a", tracker=f"127.0.0.1:{port}", announce_interval=0.2)
    assert a.read_all(blob) == blob.view
    first.close()                                     # the tracker dies: a's state is lost
    second = TrackerServer(f"127.0.0.1:{port}").start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not second.state.peers(blob.blob_id):
            time.sleep(0.05)
        (peer,) = second.state.peers(blob.blob_id)
        assert peer["addr"] == a.addr and peer["held"] == [[0, blob.data_end]]
        b = cluster("b", tracker=f"127.0.0.1:{port}")
        assert b.read_all(blob) == blob.view and b.origin_bytes() == 0
    finally:
        second.close()


# --------------------------------------------------------------------------- chunk subsets

def _read_info(node: Node, info, view: bytes) -> None:
    assert node.mgr.open(info).read(0, len(view)) == view


def test_units_are_the_chunk_tables_chunks_and_gaps_are_never_served(cluster, tracker, origin_dir):
    """A holds a chunk-dict style subset (gaps between its chunks); B uses the whole blob: B
    gets A's chunks from A, the others from the origin, and no peer serves bytes of no unit."""
    blob = make_blob(26, chunks=30)
    _put(origin_dir, blob)
    keep = [i for i in range(30) if i % 3 != 1]
    a = cluster("a", tracker=tracker.address)
    _read_info(a, blob.subset(keep), blob.view_of(keep))
    st = a.svc.node.get(blob.blob_id)
    assert st.unit_count() == len(keep)
    assert st.held() == st.ranges_of(e.index for e in blob.subset(keep).entries)
    gap = blob.entries[1]
    assert st.read_range(gap.compressed_offset, gap.compressed_end) is None
    assert st.read_range(0, blob.entries[2].compressed_end) is None      # spans a gap
    b = cluster("b", tracker=tracker.address)
    _read_info(b, blob.info, blob.view)
    others = sum(blob.entries[i].compressed_size for i in range(30) if i not in keep)
    assert b.origin_bytes() == others
    assert b.mgr.backend.blob_stats()[blob.blob_id]["peer"] == \
        sum(blob.entries[i].compressed_size for i in keep)


def test_a_gapped_subset_reads_from_peers_without_fetching_the_gaps(cluster, tracker, origin_dir):
    blob = make_blob(27, chunks=30)
    _put(origin_dir, blob)
    a = cluster("a", tracker=tracker.address)
    _read_info(a, blob.info, blob.view)
    keep = [i for i in range(30) if i % 2 == 0]       # one-chunk gaps: merged cache requests
    b = cluster("b", tracker=tracker.address)
    _read_info(b, blob.subset(keep), blob.view_of(keep))
    assert b.origin_bytes() == 0
    assert b.mgr.backend.blob_stats()[blob.blob_id]["peer"] == \
        sum(blob.entries[i].compressed_size for i in keep)      # gap bytes were not fetched
    assert b.mgr.stats()["metrics"]["verify_failures"] == 0


def test_a_node_shares_the_union_of_its_bootstraps_chunks(tmp_path, origin_dir):
    import dataclasses
    blob = make_blob(28, chunks=12)
    _put(origin_dir, blob)
    with P2PService(P2PConfig(), tmp_path / "p2p") as svc:
        st = svc.node.expect(blob.subset(range(0, 12, 2)))
        assert st.unit_count() == 6
        assert svc.node.expect(blob.subset(range(0, 12, 3))) is st
        assert st.unit_count() == len(set(range(0, 12, 2)) | set(range(0, 12, 3)))
        liar = dataclasses.replace(blob.entries[1], digest=bytes(32))   # contradicts no one yet
        st.add(dataclasses.replace(blob.info, entries=[liar]))
        e5 = dataclasses.replace(blob.entries[5], index=3)              # ci index 3 is known
        assert st.add(dataclasses.replace(blob.info, entries=[e5])) == 0
        assert st.extent(3) == (blob.entries[3].compressed_offset, blob.entries[3].compressed_end)
        with pytest.raises(Exception):
            st.verify(1, blob.data[blob.entries[1].compressed_offset:blob.entries[1].compressed_end])


def test_wildcard_listen_needs_an_advertised_host(tmp_path):
    with pytest.raises(ValueError, match="advertise"):
        P2PService(P2PConfig(listen="0.0.0.0:0"), tmp_path / "a")
    with P2PService(P2PConfig(listen="0.0.0.0:0", advertise="127.0.0.1"), tmp_path / "b") as svc:
        host, port = svc.address.split(":")
        assert host == "127.0.0.1" and int(port) > 0
