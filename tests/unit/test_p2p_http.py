"""The peer HTTP transport: TCP_NODELAY on both ends, one write per response, keep-alive reuse.

Without these a keep-alive response written as headers, then body, waits on Nagle for the
client's delayed ACK (~40 ms per peer fetch, tracker claim or /ranges query on Linux). Asserted
structurally (socket options, counted writes and connections), never with wall-clock timings.
"""
from __future__ import annotations

import socket

import pytest
import requests

from p2p.peerclient import PeerClient, PeerMiss
from p2p.protocol import FRAME_SIZE
from p2p.server import TokenBucket
from p2p.service import P2PConfig, P2PService
from p2p.tracker import TrackerServer
from rafs.storage.backend import LocalFsBackend
from rafs.storage.factory import CacheConfig
from tests.conformance import make_blob


@pytest.fixture
def warm(tmp_path):
    """(service, blob): a peer serving a blob it holds in full."""
    blob = make_blob(21, chunks=24)
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / blob.blob_id).write_bytes(blob.data)
    svc = P2PService(P2PConfig(listen="127.0.0.1:0"), tmp_path / "p2p")
    mgr = svc.cache_manager(LocalFsBackend(origin), CacheConfig(dir=str(tmp_path / "cache")))
    assert mgr.open(blob.info).read(0, len(blob.view)) == blob.view
    yield svc, blob
    mgr.close()
    svc.close()


@pytest.fixture
def client():
    c = PeerClient()
    yield c
    c.close()


@pytest.fixture
def sends(monkeypatch):
    """sends(port) -> sizes of the sendall() calls made by sockets bound to local `port`."""
    log: list[tuple[int, int]] = []
    real = socket.socket.sendall

    def sendall(self, data, *args):
        log.append((self.getsockname()[1], len(memoryview(data).cast("B"))))
        return real(self, data, *args)
    monkeypatch.setattr(socket.socket, "sendall", sendall)
    return lambda port: [n for p, n in log if p == port]


def _nodelay(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_fetches_reuse_one_connection_with_nodelay_on_both_ends(warm, client):
    svc, blob = warm
    addr = svc.address
    for e in blob.entries[:10]:
        got = client.get(addr, blob.blob_id, e.compressed_offset, e.compressed_size)
        assert got == blob.data[e.compressed_offset:e.compressed_offset + e.compressed_size]
    client.ranges(addr, blob.blob_id)
    with pytest.raises(PeerMiss):
        client.get(addr, "0" * 64, 0, 10)                   # a 404 keeps the connection too
    client.get(addr, blob.blob_id, 0, 100)
    assert svc.server.accepted == 1

    server_socks = list(svc.server._httpd._conns)           # the open keep-alive connection
    assert len(server_socks) == 1 and _nodelay(server_socks[0])
    pm = client._session.get_adapter(f"http://{addr}/").poolmanager
    client_socks = [c.sock for key in pm.pools.keys() for c in pm.pools[key].pool.queue
                    if c is not None and c.sock is not None]
    assert client_socks and all(_nodelay(s) for s in client_socks)


def test_each_answer_is_one_write(warm, client, sends):
    svc, blob = warm
    addr = svc.address
    port = int(addr.rsplit(":", 1)[1])
    e = blob.entries[3]
    client.get(addr, blob.blob_id, e.compressed_offset, e.compressed_size)
    [n] = sends(port)                                       # status + headers + frame + bytes
    assert n > FRAME_SIZE + e.compressed_size
    client.ranges(addr, blob.blob_id)                       # JSON answers
    requests.get(f"http://{addr}/v1/blobs/{'0' * 64}?offset=0&size=1")
    assert len(sends(port)) == 3


def test_paced_uploads_still_deliver_every_byte(warm, client, sends):
    svc, blob = warm
    svc.server.bucket = TokenBucket(1 << 30)                # fast, but sent in paced pieces
    port = int(svc.address.rsplit(":", 1)[1])
    last = blob.entries[7]
    a, b = blob.entries[0].compressed_offset, last.compressed_offset + last.compressed_size
    assert client.get(svc.address, blob.blob_id, a, b - a) == blob.data[a:b]
    assert len(sends(port)) > 1


def test_tracker_answers_are_one_write_on_a_nodelay_socket(sends):
    with TrackerServer("127.0.0.1:0") as t:
        port = int(t.address.rsplit(":", 1)[1])
        with requests.Session() as s:
            for _ in range(3):
                assert s.get(f"http://{t.address}/v1/health").json()["ok"]
            [sock] = list(t._httpd._conns)
            assert _nodelay(sock)
        assert len(sends(port)) == 3
        assert t._httpd.accepted == 1
