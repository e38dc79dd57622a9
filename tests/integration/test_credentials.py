"""Registry credentials from a docker credential helper, against a real docker-registry with htpasswd auth.

`nydusify convert`, `inspect` and `check` (subprocesses) find the registry's credentials only through
``credHelpers`` in ``$DOCKER_CONFIG/config.json`` and a ``docker-credential-*`` program this test writes
(tests/helpers/credhelper.py): no ``auths`` entry anywhere. Errors are one line without the secret.

Where the credentials must never go, shown with small recording HTTP relays in front of the real
registry: object storage a blob GET is redirected to (another origin), and a registry mirror (which
would pass any Authorization it got on to the registry, so a leak would even "work").
"""
from __future__ import annotations

import base64
import http.client
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rafs.image.auth import Credentials
from rafs.image.client import RegistryClient
from rafs.storage.backend.mirror import MirrorConfig
from rafs.storage.factory import BackendConfig, build_backend
from testbed.p2pcluster import build_image
from testbed.registry import run_registry, skopeo_copy
from tests.helpers.credhelper import CredHelper, write_config

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cret-from-the-helper-7f3a"
HELPER = "pynydus-test"

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/docker-registry"), reason="needs docker-registry")


def _basic(user: str, pw: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()


def _nydusify(env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "converter.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, errors="replace", timeout=300, stdin=subprocess.DEVNULL)


def _ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"rc={r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


def _one_line_error(r: subprocess.CompletedProcess, pattern: str) -> str:
    assert r.returncode == 1, f"rc={r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _no_secret(*texts: str) -> None:
    token = base64.b64encode(f"alice:{SECRET}".encode()).decode()
    for t in texts:
        assert SECRET not in t and token not in t


class Relay(ThreadingHTTPServer):
    """An HTTP relay to `upstream` (host:port) that records every request's headers.

    ``upstream_auth``: the Authorization it sends upstream itself (object storage behind a presigned
    URL); otherwise it passes on whatever Authorization it got (a mirror relaying a client's
    credentials). ``redirect_blobs_to``: authenticated blob GETs are answered with a 307 to
    ``http://THAT/store/...`` (a registry sending blob reads to object storage, another origin)."""

    daemon_threads = True

    def __init__(self, upstream: str, *, upstream_auth: str | None = None, redirect_blobs_to: str | None = None):
        relay = self
        self.upstream, self.upstream_auth, self.redirect_blobs_to = upstream, upstream_auth, redirect_blobs_to
        self.seen: list[tuple[str, str, dict]] = []

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                relay.seen.append((self.command, self.path, dict(self.headers)))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path[len("/store"):] if self.path.startswith("/store/") else self.path
                if (relay.redirect_blobs_to and self.command == "GET" and "Authorization" in self.headers
                        and re.match(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$", path)):
                    self.send_response(307)
                    self.send_header("Location", f"http://{relay.redirect_blobs_to}/store{path}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                hdrs = {k: v for k, v in self.headers.items()
                        if k.lower() not in ("host", "connection", "authorization", "content-length")}
                auth = relay.upstream_auth or self.headers.get("Authorization")
                if auth:
                    hdrs["Authorization"] = auth
                conn = http.client.HTTPConnection(relay.upstream, timeout=30)
                try:
                    conn.request(self.command, path, body=body or None, headers=hdrs)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("connection", "transfer-encoding", "keep-alive") and \
                                not (k.lower() == "content-length" and self.command != "HEAD"):
                            self.send_header(k, v)
                    if self.command != "HEAD":
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        super().__init__(("127.0.0.1", 0), H)
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> "Relay":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    def authorizations(self) -> list[str]:
        return [h[k] for _, _, h in self.seen for k in h if k.lower() == "authorization"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A real htpasswd registry holding an OCI image (src/app:v1), a credential helper that knows the
    registry's password, and a docker config whose only entry points at the helper."""
    work = tmp_path_factory.mktemp("creds")
    with run_registry(work / "reg", htpasswd={"alice": SECRET}) as reg:
        image, _ = build_image(work / "src", seed=5, files=4, size=1 << 20)
        skopeo_copy(image.ref, f"docker://{reg.host}/src/app:v1", dest_creds=f"alice:{SECRET}")
        helper = CredHelper(work / "bin", HELPER, {reg.host: ("alice", SECRET)})
        cfg = work / "docker"
        write_config(cfg, {"credHelpers": {reg.host: HELPER}})
        env = dict(os.environ, DOCKER_CONFIG=str(cfg), PATH=helper.path_env())
        yield reg, helper, cfg, env


@pytest.fixture
def helper_table(setup, monkeypatch):
    """Each test starts with the helper knowing the registry's password (and ends so); the helper is
    on this process's PATH too (for the clients the tests make in-process)."""
    reg, helper, _, env = setup
    monkeypatch.setenv("PATH", env["PATH"])
    helper.set({reg.host: ("alice", SECRET)})
    yield helper
    helper.set({reg.host: ("alice", SECRET)})


def test_nydusify_gets_credentials_only_from_a_cred_helper(setup, helper_table):
    reg, helper, cfg, env = setup
    assert "auths" not in json.loads((cfg / "config.json").read_text())
    src, dst = f"{reg.host}/src/app:v1", f"{reg.host}/nydus/app:v1"
    before = len(helper.calls())
    conv = _nydusify(env, "convert", "--source", src, "--target", dst, "--plain-http", "--chunk-size", "256K")
    out = _ok(conv)
    assert f"{dst} written" in out
    insp = _nydusify(env, "--debug", "inspect", dst, "--plain-http")
    _ok(insp)
    chk = _nydusify(env, "check", "--source", src, "--target", dst, "--plain-http")
    assert "check OK" in _ok(chk)
    calls = helper.calls()[before:]
    assert calls and all(c == {"argv": ["get"], "stdin": reg.host} for c in calls), calls
    _no_secret(conv.stdout, conv.stderr, insp.stdout, insp.stderr, chk.stdout, chk.stderr)

    # and without the helper's answer the registry is closed: one line, no traceback
    helper.set({})
    r = _nydusify(env, "inspect", dst, "--plain-http")
    _one_line_error(r, rf"^nydusify inspect: error: unauthorized: .*\(no credentials for {re.escape(reg.host)} "
                       r"in docker config\)")
    helper.set({reg.host: ("alice", "wrong-password")})
    r = _nydusify(env, "convert", "--source", src, "--target", f"{reg.host}/nydus/other:v1", "--plain-http")
    _one_line_error(r, r"^nydusify convert: error: unauthorized: .*as 'alice'")
    helper.set({reg.host: "fail"})
    r = _nydusify(env, "inspect", dst, "--plain-http")
    line = _one_line_error(r, rf"^nydusify inspect: error: credential helper docker-credential-{HELPER} "
                              rf"\(credHelpers in {re.escape(str(cfg / 'config.json'))}\) for "
                              rf"{re.escape(reg.host)}: failed \(exit status 3\): the keychain is locked$")
    _no_secret(line)


def test_credentials_never_follow_a_redirect_to_object_storage(setup, helper_table, tmp_path):
    """The registry (behind a front that sends blob GETs to "object storage" on another origin) gets the
    helper's credentials; object storage never sees an Authorization header, and the reads work."""
    reg, helper, _, env = setup
    _ok(_nydusify(env, "convert", "--source", f"{reg.host}/src/app:v1", "--target", f"{reg.host}/nydus/redir:v1",
                  "--plain-http", "--chunk-size", "256K"))
    with Relay(reg.host, upstream_auth=_basic("alice", SECRET)) as storage, \
            Relay(reg.host, redirect_blobs_to=storage.host) as front:
        cfg = tmp_path / "docker"
        write_config(cfg, {"credHelpers": {front.host: HELPER}})
        helper.set({front.host: ("alice", SECRET)})
        env2 = dict(env, DOCKER_CONFIG=str(cfg))
        chk = _nydusify(env2, "check", "--source", f"{front.host}/src/app:v1",
                        "--target", f"{front.host}/nydus/redir:v1", "--plain-http")
        assert "check OK" in _ok(chk)
        with RegistryClient(front.host, "nydus/redir", plain_http=True, config_dir=str(cfg)) as c:
            manifest = json.loads(c.get_manifest("v1")[0])
            layer = manifest["layers"][0]["digest"]
            whole = c.get_blob(layer, max_size=64 << 20)
            assert c.read_range(layer, 1000, 4096) == whole[1000:5096]
        assert _basic("alice", SECRET) in front.authorizations()            # the registry got them ...
        blob_reads = [p for m, p, _ in storage.seen if m == "GET"]
        assert blob_reads and all(p.startswith("/store/v2/") for p in blob_reads)
        assert storage.authorizations() == []                               # ... object storage never
        _no_secret(json.dumps(storage.seen), chk.stdout, chk.stderr)


@pytest.mark.parametrize("auth_through", [False, True])
@pytest.mark.parametrize("explicit", [False, True], ids=["docker-config", "explicit-creds"])
def test_origin_credentials_never_reach_a_mirror(setup, helper_table, auth_through, explicit):
    """A mirror in front of the same registry, passing on whatever Authorization it gets: it is asked
    first, gets no credentials (the helper has none for the mirror's host), so reads come from the origin."""
    reg, helper, cfg, env = setup
    _ok(_nydusify(env, "convert", "--source", f"{reg.host}/src/app:v1", "--target", f"{reg.host}/nydus/mirror:v1",
                  "--plain-http", "--chunk-size", "256K"))
    with RegistryClient(reg.host, "nydus/mirror", plain_http=True, config_dir=str(cfg)) as c:
        layer = json.loads(c.get_manifest("v1")[0])["layers"][0]
        expect = c.read_range(layer["digest"], 0, 8192)
    helper.set({reg.host: ("alice", SECRET)})
    with Relay(reg.host) as mirror:
        backend = build_backend(BackendConfig(
            host=reg.host, repo="nydus/mirror", plain_http=True, retries=0, docker_config_dir=str(cfg),
            auth=Credentials("alice", SECRET) if explicit else None,
            mirrors=[MirrorConfig(f"http://{mirror.host}", auth_through=auth_through)]))
        with backend:
            assert backend.read_range(layer["digest"].split(":", 1)[1], 0, 8192) == expect
        assert mirror.seen, "the mirror was never asked"
        assert mirror.authorizations() == []
        _no_secret(json.dumps(mirror.seen))
    asked = [c["stdin"] for c in helper.calls()]
    assert mirror.host not in asked or auth_through                          # only auth_through looks it up
