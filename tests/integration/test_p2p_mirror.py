"""Registry mirror / pull-through cache mode against a real one: nginx `proxy_cache` + `slice`
(Debian package `nginx`) in front of a real docker-registry, both on 127.0.0.1.

Nodes here are in-process storage stacks (each its own cache directory and P2P service, no
peers): the manifest and bootstrap are read through nginx by digest, blob chunks through a
`MirrorBackend` (nginx first, the registry as fallback) under the `P2PBackend`, which counts
bytes per blob and source. Also: registry credentials never reach a peer.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from converter.nydus_image import load_from_store
from p2p.service import P2PConfig, P2PService
from rafs.image.auth import ANONYMOUS, Credentials
from rafs.image.client import RegistryClient
from rafs.image.store import open_store
from rafs.storage.factory import BackendConfig, CacheConfig, MirrorConfig, build_backend
from tests.helpers import nginx
from testbed.process import free_port
from testbed.registry import run_registry
from tests.integration.test_p2p_cluster import build_image, convert_push

_n = itertools.count(1)
pytestmark = pytest.mark.skipif(nginx.available() is not None or
                                not os.path.exists("/usr/bin/docker-registry"),
                                reason="needs nginx and docker-registry")


@pytest.fixture(scope="module")
def pushed(registry_session, tmp_path_factory):
    """(registry, repo, manifest digest, expected blob views) of one converted image."""
    reg = registry_session
    work = tmp_path_factory.mktemp("p2p-mirror")
    image, _ = build_image(work / "src", seed=99, files=6, size=2 << 20)
    repo = "p2p/mirror"
    convert_push(image, f"{reg.host}/{repo}:v1")
    with RegistryClient(reg.host, repo, plain_http=True, auth=ANONYMOUS) as c:
        _, _, digest = c.get_manifest("v1")
    return reg, repo, digest


def _node(tmp: Path, name: str, meta_host: str, reg, repo: str, digest: str,
          mirrors: list[str], p2p: P2PConfig | None = None, auth: Credentials = ANONYMOUS):
    """Read every blob's whole uncompressed view like a node would; returns (views sha, stats)."""
    with open_store(f"{meta_host}/{repo}@{digest}", plain_http=True, auth=auth) as store:
        image = load_from_store(store)
    svc = P2PService(p2p or P2PConfig(), tmp / name / "p2p")
    origin = build_backend(BackendConfig(
        host=reg.host, repo=repo, plain_http=True, auth=auth, retries=0,
        mirrors=[MirrorConfig("http://" + m) for m in mirrors]))
    mgr = svc.cache_manager(origin, CacheConfig(dir=str(tmp / name / "cache")),
                            owns_service=True)
    try:
        shas = []
        for info in image.bootstrap.meta.blobs:
            cache = mgr.open(info)
            shas.append(hashlib.sha256(cache.read(0, cache.view_size)).hexdigest())
        return shas, mgr.stats()
    finally:
        mgr.close()


def _reference_views(reg, repo, digest) -> list[str]:
    with open_store(f"{reg.host}/{repo}@{digest}", plain_http=True, auth=ANONYMOUS) as store:
        image = load_from_store(store)
        out = []
        for i, info in enumerate(image.bootstrap.meta.blobs):
            r = image.blob_reader(i)
            out.append(hashlib.sha256(r.read_range(0, info.uncompressed_size)).hexdigest())
        return out


def test_second_node_through_nginx_leaves_the_registry_untouched(pushed, tmp_path):
    reg, repo, digest = pushed
    want = _reference_views(reg, repo, digest)
    with nginx.run_nginx_cache(tmp_path / "nginx", upstream=reg.host) as ng:
        mark = reg.mark()
        got, st = _node(tmp_path, "a", ng.host, reg, repo, digest, [ng.host])
        assert got == want
        first = reg.access_log(mark)
        assert any(e.is_blob_get for e in first)         # nginx filled itself from the registry
        mark = reg.mark()
        got, st = _node(tmp_path, "b", ng.host, reg, repo, digest, [ng.host])
        assert got == want
        assert reg.access_log(mark) == []                 # not one request reached the registry
        per = [b["sources"] for b in st["blobs"].values()]
        assert all(p["mirror"] > 0 and p["registry"] == 0 and p["peer"] == 0 for p in per), per
        hits = [e for e in ng.access_log() if e.cache == "HIT"]
        assert hits and all(e.status in (200, 206) for e in hits)
        sources = st["metrics"]["sources"]
        assert any(k.startswith("mirror ") and v["bytes"] > 0 for k, v in sources.items())
    # nginx is gone: the next node falls back to the registry, still correct bytes, no error
    got, st = _node(tmp_path, "c", reg.host, reg, repo, digest, [ng.host])
    assert got == want
    per = [b["sources"] for b in st["blobs"].values()]
    assert all(p["registry"] > 0 and p["mirror"] == 0 for p in per), per
    mirror = [v for k, v in st["metrics"]["sources"].items() if k.startswith("mirror ")]
    assert mirror and mirror[0]["errors"] >= 1


class _RecordingPeer(ThreadingHTTPServer):
    """A 'peer' that records every request it gets and holds nothing (404)."""
    daemon_threads = True

    def __init__(self):
        self.seen: list[tuple[str, dict]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.seen.append((self.path, dict(self.headers)))
                body = json.dumps({"held": [], "fetching": []}).encode()
                self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
        super().__init__(("127.0.0.1", free_port()), H)


def test_registry_credentials_never_reach_peers(tmp_path):
    secret = "s3cret-p2p"
    with run_registry(tmp_path / "reg", htpasswd={"alice": secret}) as reg:
        creds = Credentials("alice", secret)
        image, _ = build_image(tmp_path / "src", seed=7, files=2, size=1 << 20)
        repo = "p2p/private"
        env = dict(os.environ, DOCKER_CONFIG=str(tmp_path / "docker"))
        from testbed.registry import write_docker_config
        write_docker_config(tmp_path / "docker", {reg.host: ("alice", secret)})
        import subprocess
        import sys
        r = subprocess.run([sys.executable, "-m", "converter.cli", "convert", "--source", image.ref,
                            "--target", f"{reg.host}/{repo}:v1", "--plain-http"],
                           capture_output=True, text=True, env=env,
                           cwd=Path(__file__).resolve().parents[2])
        assert r.returncode == 0, r.stderr
        with RegistryClient(reg.host, repo, plain_http=True, auth=creds) as c:
            _, _, digest = c.get_manifest("v1")
        peer = _RecordingPeer()
        t = threading.Thread(target=peer.serve_forever, args=(0.05,), daemon=True)
        t.start()
        try:
            addr = f"127.0.0.1:{peer.server_address[1]}"
            got, st = _node(tmp_path, "n", reg.host, reg, repo, digest, [],
                            p2p=P2PConfig(peers=[addr]), auth=creds)
        finally:
            peer.shutdown()
            peer.server_close()
        assert got == _views_with(reg, repo, digest, creds)
        assert peer.seen, "the node never asked the peer"
        import base64
        token = base64.b64encode(f"alice:{secret}".encode()).decode()
        for path, headers in peer.seen:
            flat = json.dumps(headers) + path
            assert "authorization" not in {k.lower() for k in headers}, headers
            assert secret not in flat and token not in flat and "alice" not in flat


def _views_with(reg, repo, digest, creds) -> list[str]:
    with open_store(f"{reg.host}/{repo}@{digest}", plain_http=True, auth=creds) as store:
        image = load_from_store(store)
        return [hashlib.sha256(image.blob_reader(i).read_range(0, info.uncompressed_size))
                .hexdigest() for i, info in enumerate(image.bootstrap.meta.blobs)]
