"""Mirrors from configuration, in the shape Nydus users write them (rafs/storage/backend/mirror.py):
the `--mirror` spec and nydusd's JSON fields, the snapshotter's `[[backend.mirrors]]` down to a mount
daemon's arguments, failure_limit and the health check, and over real HTTP: a mirror's headers go to
the mirror only and the origin's credentials never do."""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rafs.errors import BackendError, NotFound
from rafs.image.auth import ANONYMOUS, Credentials
from rafs.storage.backend import LocalFsBackend, MirrorBackend
from rafs.storage.backend.mirror import MirrorConfig, MirrorHealth, parse_mirror, parse_mirrors
from rafs.storage.cache import BlobCache
from rafs.storage.factory import BackendConfig, build_backend
from snapshotter.config import load_config
from tests.conformance import make_blob
from tests.fakes.backends import CountingBackend

DF = "X-Dragonfly-Registry"


# --------------------------------------------------------------------------- config forms

def test_spec_forms_agree():
    kv = parse_mirror(f"host=http://127.0.0.1:65001,header={DF}:https://index.docker.io,auth_through=true,"
                      "ping_url=http://127.0.0.1:40901/server/ping?x=1,health_check_interval=2.5,failure_limit=3")
    assert kv == MirrorConfig(host="http://127.0.0.1:65001", headers={DF: "https://index.docker.io"},
                              auth_through=True, ping_url="http://127.0.0.1:40901/server/ping?x=1",
                              health_check_interval=2.5, failure_limit=3)
    nydusd = {"host": "http://127.0.0.1:65001", "headers": {DF: "https://index.docker.io"}, "auth_through": True,
              "ping_url": "http://127.0.0.1:40901/server/ping?x=1", "health_check_interval": 2.5, "failure_limit": 3}
    assert parse_mirror(json.dumps(nydusd)) == kv == MirrorConfig.from_dict(nydusd)
    assert parse_mirror(kv.to_json()) == kv
    bare = parse_mirror("http://127.0.0.1:65001")
    assert (bare.host, bare.headers, bare.auth_through, bare.failure_limit, bare.health_check_interval) == \
        ("http://127.0.0.1:65001", {}, False, 5, 5.0)                 # nydusd's defaults
    assert bare.plain_http and bare.address == "127.0.0.1:65001" and bare.health_url == "http://127.0.0.1:65001/v2/"
    https = parse_mirror("mirror.example.com:5000")
    assert https.host == "https://mirror.example.com:5000" and not https.plain_http
    assert parse_mirror("host=http://m,capabilities=pull").capabilities == ["pull"]
    assert [m.host for m in parse_mirrors(["http://a:1", "host=http://b:2"])] == ["http://a:1", "http://b:2"]


@pytest.mark.parametrize("spec, why", [
    ("host=http://m,colour=blue", "not one of"),
    ("host=http://m,header=NoColon", "NAME:VALUE"),
    ("host=http://m,failure_limit=0", "failure_limit"),
    ("host=http://m,health_check_interval=-1", "health_check_interval"),
    ("host=ftp://m", "want http"),
    ("host=http://m,auth_through=maybe", "true or false"),
    ("host=http://m,ping_url=/v2/", "ping_url"),
    ("host=http://m,capabilities=push+fly", "capabilities"),
    ('{"host": "http://m", "header": {}}', "unknown keys"),
    ('{"headers": {}}', "needs a host"),
    ('{"host": "http://m", "headers": {"Bad Name": "x"}}', "bad header"),
    ("host=http://m,host=http://n", "twice"),
])
def test_bad_specs_say_what_is_wrong(spec, why):
    with pytest.raises(ValueError, match=why):
        parse_mirror(spec)


def test_mount_daemons_take_repeated_mirror_options(tmp_path, capsys):
    from snapshotter.mountd import build_parser
    args = build_parser(p2p=False).parse_args([
        "--bootstrap", "b", "--ref", "h/r:t", "--mountpoint", "m", "--cache-dir", "c", "--run-dir", "r",
        "--pid-file", "p", "--mirror", "http://a:1", "--mirror", f"host=http://b:2,header={DF}:https://h"])
    assert [m.host for m in parse_mirrors(args.mirror)] == ["http://a:1", "http://b:2"]
    # nydusify mount: a bad spec is one error line before anything is fetched or mounted
    from converter.cli import main
    rc = main(["mount", "127.0.0.1:9/r:t", str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "c"),
               "--mirror", "http://a:1", "--mirror", "host=ftp://b"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("nydusify mount: error: mirror host 'ftp://b'"), err
    assert not (tmp_path / "c").exists()


def test_snapshotter_mirrors_reach_its_mount_daemons(tmp_path):
    conf = tmp_path / "config.toml"
    conf.write_text(f"""
[backend]
[[backend.mirrors]]
host = "http://127.0.0.1:65001"
headers = {{ "{DF}" = "https://index.docker.io" }}
ping_url = "http://127.0.0.1:40901/server/ping"
failure_limit = 3
registries = ["docker.io"]

[[backend.mirrors]]
host = "http://127.0.0.1:8080"
auth_through = true
health_check_interval = 1
""")
    cfg = load_config(str(conf))
    docker = cfg.backend.mirrors_for("docker.io")
    assert [m.host for m in docker] == ["http://127.0.0.1:65001", "http://127.0.0.1:8080"]
    assert docker[0].headers == {DF: "https://index.docker.io"} and docker[0].failure_limit == 3
    assert [m.host for m in cfg.backend.mirrors_for("127.0.0.1:5000")] == ["http://127.0.0.1:8080"]
    argv = cfg.backend.mirror_args("docker.io")
    assert argv[0::2] == ["--mirror", "--mirror"]
    assert parse_mirrors(argv[1::2]) == docker             # what the daemon parses is what was configured
    assert load_config(None).backend.mirror_args("docker.io") == []


@pytest.mark.parametrize("table, why", [
    ('host = "http://m"\ncolour = "blue"', "unknown keys"),
    ('failure_limit = 2', "needs a host"),
    ('host = "http://m"\nregistries = 5', "registries"),
])
def test_bad_snapshotter_mirrors_fail_at_load(tmp_path, table, why):
    conf = tmp_path / "config.toml"
    conf.write_text(f"[[backend.mirrors]]\n{table}\n")
    with pytest.raises(ValueError, match=why):
        load_config(str(conf))


# --------------------------------------------------------------------------- failure_limit, health check

def _setup(tmp_path):
    blob = make_blob(41, chunks=8)
    for d in ("origin", "mirror"):
        p = tmp_path / d / "blobs" / "sha256" / blob.blob_id
        p.parent.mkdir(parents=True)
        p.write_bytes(blob.data)
    return blob, CountingBackend(LocalFsBackend(tmp_path / "mirror")), LocalFsBackend(tmp_path / "origin")


def test_failure_limit_disables_until_the_health_check_passes(tmp_path):
    blob, mirror, origin = _setup(tmp_path)
    now, healthy, pings = [0.0], [False], []

    def ping():
        pings.append(1)
        return healthy[0]
    m = MirrorBackend([mirror], origin, penalty=1, clock=lambda: now[0],
                      health=[MirrorHealth(failure_limit=3, interval=3600, ping=ping)])
    try:
        for k in range(3):                     # 3 failures in a row, each followed by the penalty
            mirror.fail_next(1)
            assert m.read_range(blob.blob_id, 0, 10) == blob.data[:10]
            now[0] += 2
        st = m.source_stats()[f"mirror {mirror.name}"]
        assert st["disabled"] and st["penalized"] and st["failures_in_a_row"] == 3
        calls = len(mirror.calls)
        now[0] += 10_000                       # disabled: time alone does not bring it back
        m.read_range(blob.blob_id, 0, 10)
        assert len(mirror.calls) == calls
        assert m.check_health() == [0] and not pings     # not due yet (the thread checks every interval)
        assert m.check_health(due_only=False) == [0] and pings and not healthy[0]
        healthy[0] = True
        assert m.check_health(due_only=False) == []
        m.read_range(blob.blob_id, 10, 10)
        assert len(mirror.calls) == calls + 1  # enabled again
        st = m.source_stats()[f"mirror {mirror.name}"]
        assert not st["disabled"] and st["failures_in_a_row"] == 0
    finally:
        m.close()


def test_success_resets_the_count_and_404_is_not_a_failure(tmp_path):
    blob, mirror, origin = _setup(tmp_path)
    now = [0.0]
    m = MirrorBackend([mirror], origin, penalty=1, clock=lambda: now[0],
                      health=[MirrorHealth(failure_limit=2, interval=5)])
    for _ in range(5):                         # fail, succeed, fail, ...: never 2 in a row
        mirror.fail_next(1)
        m.read_range(blob.blob_id, 0, 10)
        now[0] += 2
        m.read_range(blob.blob_id, 0, 10)
    assert not m.source_stats()[f"mirror {mirror.name}"]["disabled"]
    for _ in range(4):
        mirror.fail_next(1, NotFound)
        m.read_range(blob.blob_id, 0, 10)
        now[0] += 2
    assert m.source_stats()[f"mirror {mirror.name}"]["failures_in_a_row"] == 0
    # no ping: a disabled mirror is tried again once per interval
    for _ in range(2):
        mirror.fail_next(1)
        m.read_range(blob.blob_id, 0, 10)
        now[0] += 2
    assert m.source_stats()[f"mirror {mirror.name}"]["disabled"]
    calls = len(mirror.calls)
    m.read_range(blob.blob_id, 0, 10)
    assert len(mirror.calls) == calls
    now[0] += 5
    m.read_range(blob.blob_id, 0, 10)
    assert len(mirror.calls) == calls + 1 and not m.source_stats()[f"mirror {mirror.name}"]["disabled"]
    m.close()


def test_a_lying_mirror_counts_against_its_limit(tmp_path):
    blob, mirror, origin = _setup(tmp_path)
    mirror.corrupt(blob.entries[2].compressed_offset + 3)
    m = MirrorBackend([mirror], origin, health=[MirrorHealth(failure_limit=1, interval=3600)])
    with BlobCache(tmp_path / "cache", blob.info, m) as c:
        assert c.read(0, len(blob.view)) == blob.view        # every byte verified: the origin's won
    st = m.source_stats()[f"mirror {mirror.name}"]
    assert st["disabled"] and st["failures_in_a_row"] == 1


# --------------------------------------------------------------------------- over HTTP

class _BlobServer(ThreadingHTTPServer):
    """A registry that serves one blob (Range GETs, HEAD) and records every request's headers;
    `status` makes blob requests fail, `ping_status` answers GET /ping."""
    daemon_threads = True

    def __init__(self, data: bytes, digest: str):
        self.seen: list[tuple[str, str, dict]] = []
        self.status = 200
        self.ping_status = 200
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _answer(self, code: int, body: bytes = b"", headers: dict | None = None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self):
                outer.seen.append((self.command, self.path, dict(self.headers)))
                if self.path == "/ping":
                    return self._answer(outer.ping_status)
                if not self.path.endswith("/blobs/" + digest):
                    return self._answer(404)
                if outer.status != 200:
                    return self._answer(outer.status, b'{"errors":[]}')
                rng = self.headers.get("Range")
                if rng:
                    a, b = (int(x) for x in rng.removeprefix("bytes=").split("-"))
                    return self._answer(206, data[a:b + 1], {"Content-Range": f"bytes {a}-{b}/{len(data)}"})
                return self._answer(200, data)
            do_HEAD = do_GET
        super().__init__(("127.0.0.1", 0), H)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def stop(self):
        self.shutdown()
        self.server_close()


@pytest.fixture
def servers():
    blob = make_blob(42, chunks=6)
    made = [_BlobServer(blob.data, blob.digest) for _ in range(2)]
    yield blob, made[0], made[1]
    for s in made:
        s.stop()


def test_headers_go_to_the_mirror_and_credentials_never_do(servers):
    blob, origin, mirror = servers
    secret = Credentials("alice", "s3cret")
    b = build_backend(BackendConfig(host=origin.host, repo="app", plain_http=True, auth=secret, retries=0,
                                    mirrors=[f"host=http://{mirror.host},header={DF}:http://{origin.host}"]))
    try:
        assert b.read_range(blob.blob_id, 0, 100) == blob.data[:100]
        mirror.status = 500                     # now the origin answers
        assert b.read_range(blob.blob_id, 100, 100) == blob.data[100:200]
    finally:
        b.close()
    to_mirror = [h for m, p, h in mirror.seen if "/blobs/" in p]
    to_origin = [h for m, p, h in origin.seen if "/blobs/" in p]
    assert to_mirror and to_origin
    assert all(h.get(DF) == f"http://{origin.host}" and "Authorization" not in h for h in to_mirror)
    assert all(DF not in h for h in to_origin)
    # auth_through: the mirror is a registry of its own; still never the origin's credentials
    b = build_backend(BackendConfig(host=origin.host, repo="app", plain_http=True, auth=secret, retries=0,
                                    mirrors=[MirrorConfig(f"http://{mirror.host}", auth_through=True)]))
    mirror.status, mirror.seen[:] = 200, []
    try:
        b.read_range(blob.blob_id, 0, 10)
    finally:
        b.close()
    token = base64.b64encode(b"alice:s3cret").decode()
    assert mirror.seen and all(token not in json.dumps(h) for _, _, h in mirror.seen)


def test_health_check_pings_the_ping_url(servers):
    blob, origin, mirror = servers
    b = build_backend(BackendConfig(
        host=origin.host, repo="app", plain_http=True, auth=ANONYMOUS, retries=0, mirror_penalty=0,
        mirrors=[f"host=http://{mirror.host},ping_url=http://{mirror.host}/ping,failure_limit=2,"
                 "health_check_interval=0.2"]))
    try:
        mirror.status = mirror.ping_status = 503
        for k in range(2):
            assert b.read_range(blob.blob_id, 10 * k, 10) == blob.data[10 * k:10 * k + 10]
        assert b.source_stats()[f"mirror registry {mirror.host}/app"]["disabled"]
        mirror.status = 200                     # blobs fine, but the health check still says no
        import time
        time.sleep(0.6)
        assert b.source_stats()[f"mirror registry {mirror.host}/app"]["disabled"]
        assert any(p == "/ping" for _, p, _ in mirror.seen)
        mirror.ping_status = 200
        deadline = time.monotonic() + 5
        while b.source_stats()[f"mirror registry {mirror.host}/app"]["disabled"]:
            assert time.monotonic() < deadline, "the health check never enabled the mirror"
            time.sleep(0.05)
        n = len(mirror.seen)
        b.read_range(blob.blob_id, 50, 10)
        assert any("/blobs/" in p for _, p, _ in mirror.seen[n:])
    finally:
        b.close()
    assert not [t for t in threading.enumerate() if t.name == "mirror-health" and t.is_alive()]


def test_a_mirror_that_cannot_pull_is_not_used(servers):
    blob, origin, mirror = servers
    b = build_backend(BackendConfig(host=origin.host, repo="app", plain_http=True, auth=ANONYMOUS,
                                    mirrors=[MirrorConfig(f"http://{mirror.host}", capabilities=["resolve"])]))
    try:
        assert not isinstance(b, MirrorBackend)
        b.read_range(blob.blob_id, 0, 10)
    finally:
        b.close()
    assert mirror.seen == []
    with pytest.raises(BackendError):
        MirrorBackend([], origin=LocalFsBackend("/nonexistent")).read_range("ab" * 32, 0, 1)
