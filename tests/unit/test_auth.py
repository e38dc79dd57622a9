"""Registry credentials as docker finds them (rafs.image.auth): config.json ``auths`` (``auth``,
``username``/``password``, ``identitytoken``), ``credsStore`` / ``credHelpers`` through a real
helper program the test writes (tests/helpers/credhelper.py), the OAuth2 refresh-token grant
for identity tokens, and where credentials must never go.

The registries here are small in-process HTTP servers (what a token server answers is the point,
and distribution has no token server of its own); tests/integration/test_credentials.py runs the
same credentials against a real docker-registry with htpasswd auth.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import re
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from rafs.errors import BackendError
from rafs.image.auth import (ANONYMOUS, DOCKER_HUB_SERVER_URL, Credentials, docker_config_path,
                             load_docker_credentials, run_credential_helper)
from rafs.image.client import RegistryClient
from rafs.image.digests import sha256_digest
from tests.helpers.credhelper import CredHelper, write_config

SECRET = "hunter2-Sup3r-s3cret"
TOKEN = "idtok-" + "q" * 24


def _b64(user: str, pw: str) -> str:
    return base64.b64encode(f"{user}:{pw}".encode()).decode()


@pytest.fixture
def cfgdir(tmp_path, monkeypatch):
    """An empty DOCKER_CONFIG directory (the real ~/.docker is never read)."""
    d = tmp_path / "docker"
    d.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    return d


@pytest.fixture
def helper(tmp_path, monkeypatch):
    """docker-credential-pytest on PATH, knowing nothing yet (`helper.set(table)`)."""
    h = CredHelper(tmp_path / "bin", "pytest", {})
    monkeypatch.setenv("PATH", h.path_env())
    return h


# --------------------------------------------------------------------------- config.json

def test_auths_entries(cfgdir):
    write_config(cfgdir, {"auths": {
        "https://reg.example.com:5000/v1/": {"auth": _b64("u", "p:w")},
        "plain.example.com": {"username": "bob", "password": SECRET},
        "https://index.docker.io/v1/": {"auth": _b64("hub", "x"), "email": "a@b"},
        "idt.example.com": {"auth": _b64("carol", ""), "identitytoken": TOKEN},
        "tokenonly.example.com": {"identitytoken": TOKEN},
        "empty.example.com": {},
        "bad.example.com": {"auth": "%%% not base64"},
    }})
    assert load_docker_credentials("reg.example.com:5000") == Credentials("u", "p:w")
    assert load_docker_credentials("REG.example.com:5000") == Credentials("u", "p:w")
    assert load_docker_credentials("plain.example.com") == Credentials("bob", SECRET)
    for hub in ("registry-1.docker.io", "docker.io", "index.docker.io"):
        assert load_docker_credentials(hub) == Credentials("hub", "x")
    assert load_docker_credentials("idt.example.com") == Credentials("carol", "", TOKEN)
    assert load_docker_credentials("tokenonly.example.com") == Credentials("", "", TOKEN)
    assert load_docker_credentials("empty.example.com") is None         # docker login with a credsStore
    assert load_docker_credentials("bad.example.com") is None
    assert load_docker_credentials("reg.example.com") is None           # the port is part of the key
    assert load_docker_credentials("other.example.com") is None


def test_config_location_as_docker_finds_it(tmp_path, monkeypatch):
    home, env, explicit = tmp_path / "home", tmp_path / "env", tmp_path / "explicit"
    write_config(home / ".docker", {"auths": {"h.io": {"auth": _b64("home", "1")}}})
    write_config(env, {"auths": {"h.io": {"auth": _b64("env", "2")}}})
    write_config(explicit, {"auths": {"h.io": {"auth": _b64("explicit", "3")}}})
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    assert docker_config_path() == str(home / ".docker" / "config.json")
    assert load_docker_credentials("h.io").username == "home"
    monkeypatch.setenv("DOCKER_CONFIG", "")                              # empty: as if unset
    assert load_docker_credentials("h.io").username == "home"
    monkeypatch.setenv("DOCKER_CONFIG", str(env))
    assert load_docker_credentials("h.io").username == "env"
    assert load_docker_credentials("h.io", config_dir=str(explicit)).username == "explicit"  # like --config
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "nowhere"))
    assert load_docker_credentials("h.io") is None


def test_unreadable_config_is_anonymous_and_quiet_about_secrets(cfgdir, caplog):
    (cfgdir / "config.json").write_text('{"auths": {"h.io": {"auth": "' + _b64("u", SECRET) + '"')
    with caplog.at_level(logging.DEBUG):
        assert load_docker_credentials("h.io") is None
    assert "unreadable docker config" in caplog.text and SECRET not in caplog.text
    (cfgdir / "config.json").write_text("[1, 2]")
    assert load_docker_credentials("h.io") is None


def test_secrets_never_in_repr():
    c = Credentials("alice", SECRET, TOKEN)
    assert SECRET not in repr(c) and TOKEN not in repr(c) and "alice" in repr(c)
    assert SECRET not in c.describe() and TOKEN not in c.describe()


# --------------------------------------------------------------------------- credential helpers

def test_cred_helper_protocol(cfgdir, helper):
    helper.set({"reg.example.com:5000": ("alice", SECRET), "other.example.com": ("store-user", "pw2"),
                DOCKER_HUB_SERVER_URL: ("hubuser", "pw3")})
    write_config(cfgdir, {
        "auths": {"reg.example.com:5000": {"auth": _b64("from-auths", "x")},
                  "plain.example.com": {"auth": _b64("plain", "y")}},
        "credHelpers": {"reg.example.com:5000": "pytest", "docker.io": "pytest"},
    })
    assert load_docker_credentials("reg.example.com:5000") == Credentials("alice", SECRET)  # helper wins
    assert helper.calls() == [{"argv": ["get"], "stdin": "reg.example.com:5000"}]
    assert load_docker_credentials("registry-1.docker.io") == Credentials("hubuser", "pw3")
    assert helper.calls()[-1]["stdin"] == DOCKER_HUB_SERVER_URL           # docker's name for the Hub
    assert load_docker_credentials("plain.example.com") == Credentials("plain", "y")  # no helper: auths
    assert len(helper.calls()) == 2

    # credsStore: every host without a credHelpers entry goes to the store, auths entries are not used
    write_config(cfgdir, {"auths": {"plain.example.com": {}}, "credsStore": "pytest",
                          "credHelpers": {"reg.example.com:5000": "nonexistent-helper"}})
    assert load_docker_credentials("other.example.com") == Credentials("store-user", "pw2")
    assert helper.calls()[-1] == {"argv": ["get"], "stdin": "other.example.com"}
    assert load_docker_credentials("plain.example.com") is None           # the store has none: anonymous
    with pytest.raises(BackendError, match="docker-credential-nonexistent-helper .*not on PATH"):
        load_docker_credentials("reg.example.com:5000")                   # credHelpers before credsStore


def test_cred_helper_identity_token(cfgdir, helper):
    helper.set({"reg.example.com": ("<token>", TOKEN)})
    write_config(cfgdir, {"credHelpers": {"https://reg.example.com": "pytest"}})
    assert load_docker_credentials("reg.example.com") == Credentials("", "", TOKEN)


def test_cred_helper_not_found_is_anonymous(cfgdir, helper):
    write_config(cfgdir, {"credsStore": "pytest", "auths": {"reg.example.com": {"auth": _b64("a", "b")}}})
    assert load_docker_credentials("reg.example.com") is None
    assert helper.calls() == [{"argv": ["get"], "stdin": "reg.example.com"}]
    helper.set({"reg.example.com": ("", "")})                             # an empty answer: anonymous too
    assert load_docker_credentials("reg.example.com") is None


@pytest.mark.parametrize("answer, message", [
    ("fail", r"failed \(exit status 3\): the keychain is locked$"),
    ("garbage", "answer is not JSON$"),
    (("alice", SECRET, "leaky-fail"), r"failed \(exit status 1\)$"),
])
def test_cred_helper_errors_are_one_clear_line(cfgdir, helper, answer, message):
    helper.set({"reg.example.com": answer})
    write_config(cfgdir, {"credHelpers": {"reg.example.com": "pytest"}})
    with pytest.raises(BackendError) as ei:
        load_docker_credentials("reg.example.com")
    text = str(ei.value)
    assert "\n" not in text and SECRET not in text, text
    assert text.startswith(f"credential helper docker-credential-pytest (credHelpers in "
                           f"{cfgdir / 'config.json'}) for reg.example.com: "), text
    assert re.search(message, text), text


def test_cred_helper_missing_or_broken_program(cfgdir, tmp_path, monkeypatch):
    write_config(cfgdir, {"credsStore": "desktop"})
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(BackendError, match=r"^credential helper docker-credential-desktop \(credsStore in .*"
                                           r"\) for reg\.example\.com: docker-credential-desktop is not on PATH; "
                                           r"install it, or remove it from the docker config$"):
        load_docker_credentials("reg.example.com")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker-credential-desktop").write_text("#!/nonexistent/interpreter\n")
    (bin_dir / "docker-credential-desktop").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(BackendError, match="docker-credential-desktop.*cannot run it"):
        load_docker_credentials("reg.example.com")


def test_cred_helper_timeout(tmp_path, monkeypatch):
    (tmp_path / "docker-credential-slow").write_text("#!/bin/sh\nexec sleep 30\n")
    (tmp_path / "docker-credential-slow").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(BackendError, match=r"docker-credential-slow .* no answer within 0.3 s$"):
        run_credential_helper("slow", "h.io", timeout=0.3)


# --------------------------------------------------------------------------- in-process registries

class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler):
        super().__init__(("127.0.0.1", 0), handler)
        self.seen: list[tuple[str, str, dict, bytes]] = []   # method, path, headers, body
        self._t = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._t.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def auth_headers(self) -> list[str]:
        return [h["Authorization"] for _, _, h, _ in self.seen if "Authorization" in h]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def reply(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append((self.command, self.path, dict(self.headers), body))
        self.handle_request(urlsplit(self.path), body)

    do_HEAD = do_POST = do_GET


class BearerRegistry:
    """/v2/ behind a bearer challenge whose realm is this server's /token: POST (OAuth2, the
    refresh-token grant; each answer hands back a new refresh token) and GET (basic)."""

    def __init__(self, *, oauth: bool = True, users: dict | None = None, post_redirect: str | None = None):
        self.refresh_tokens = {TOKEN}
        self.access_tokens: set[str] = set()
        self.oauth = oauth
        self.users = users or {}
        self.post_redirect = post_redirect
        reg = self

        class H(_Handler):
            def handle_request(self, url, body):
                if url.path == "/token":
                    return reg.token(self, url, body)
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Bearer ") and auth[7:] in reg.access_tokens:
                    return self.reply(200, b"{}", {"Content-Type": "application/json"})
                self.reply(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                           {"WWW-Authenticate": f'Bearer realm="http://{reg.server.host}/token",service="fake"',
                            "Content-Type": "application/json"})

        self.server = _Server(H)

    def token(self, h, url, body):
        if h.command == "POST":
            if self.post_redirect:
                return h.reply(307, b"", {"Location": self.post_redirect})
            if not self.oauth:
                return h.reply(404, b"not found")
            form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
            if (form.get("grant_type") != "refresh_token" or form.get("refresh_token") not in self.refresh_tokens
                    or not form.get("client_id") or form.get("service") != "fake" or not form.get("scope")):
                return h.reply(401, b'{"error":"invalid_grant"}', {"Content-Type": "application/json"})
            self.refresh_tokens = {f"rt-{secrets.token_hex(8)}"}          # rotate: the old one is spent
            [rt] = self.refresh_tokens
            return self.issue(h, refresh_token=rt)
        auth = h.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(user) != pw:
                return h.reply(401, b"{}")
        return self.issue(h)

    def issue(self, h, **extra):
        tok = secrets.token_hex(8)
        self.access_tokens.add(tok)
        h.reply(200, json.dumps({"access_token": tok, "expires_in": 300, **extra}).encode(),
                {"Content-Type": "application/json"})

    def token_requests(self):
        return [(m, p, hd, b) for m, p, hd, b in self.server.seen if p.startswith("/token")]


@pytest.fixture
def servers():
    made = []
    yield made
    for s in made:
        s.stop()


def _bearer(servers, **kw) -> BearerRegistry:
    reg = BearerRegistry(**kw)
    servers.append(reg.server)
    return reg


def test_identitytoken_is_an_oauth2_refresh_token(cfgdir, servers, caplog):
    reg = _bearer(servers)
    write_config(cfgdir, {"auths": {reg.server.host: {"auth": _b64("carol", ""), "identitytoken": TOKEN}}})
    with caplog.at_level(logging.DEBUG), RegistryClient(reg.server.host, "team/app", plain_http=True) as c:
        c.ping()
        [(method, _, headers, body)] = reg.token_requests()
        assert method == "POST" and "Authorization" not in headers
        assert headers["Content-Type"] == "application/x-www-form-urlencoded"
        form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        assert form == {"grant_type": "refresh_token", "refresh_token": TOKEN, "service": "fake",
                        "scope": "repository:team/app:pull", "client_id": "pynydus"}
        # tokens die (key rotation): the next token comes from the refresh token the server handed back
        reg.access_tokens.clear()
        [rotated] = reg.refresh_tokens
        c.ping()
        form = {k: v[0] for k, v in parse_qs(reg.token_requests()[-1][3].decode()).items()}
        assert form["refresh_token"] == rotated
    assert TOKEN not in caplog.text and rotated not in caplog.text


def test_identity_token_from_a_helper(cfgdir, helper, servers):
    reg = _bearer(servers)
    helper.set({reg.server.host: ("<token>", TOKEN)})
    write_config(cfgdir, {"credHelpers": {reg.server.host: "pytest"}})
    with RegistryClient(reg.server.host, "team/app", plain_http=True) as c:
        c.ping()
        assert c.tokens_fetched == 1
    assert [m for m, *_ in reg.token_requests()] == ["POST"]


def test_identitytoken_falls_back_to_get_without_oauth(cfgdir, servers):
    reg = _bearer(servers, oauth=False, users={"carol": "pw"})
    write_config(cfgdir, {"auths": {reg.server.host: {"auth": _b64("carol", "pw"), "identitytoken": TOKEN}}})
    with RegistryClient(reg.server.host, "team/app", plain_http=True) as c:
        c.ping()
    (m1, *_), (m2, _, headers, _) = reg.token_requests()
    assert (m1, m2) == ("POST", "GET") and headers["Authorization"] == "Basic " + _b64("carol", "pw")


def test_refused_identitytoken_is_one_line_without_it(cfgdir, servers):
    reg = _bearer(servers)
    write_config(cfgdir, {"auths": {reg.server.host: {"identitytoken": "expired-" + TOKEN}}})
    with RegistryClient(reg.server.host, "team/app", plain_http=True, retries=0) as c, \
            pytest.raises(BackendError) as ei:
        c.ping()
    text = str(ei.value)
    assert text.startswith(f"unauthorized: token server http://{reg.server.host}/token refused with an "
                           f"identity token for {reg.server.host}/team/app (HTTP 401)"), text
    assert "\n" not in text and TOKEN not in text


def test_oauth_post_is_not_redirected(cfgdir, servers):
    elsewhere = _Server(type("H", (_Handler,), {"handle_request": lambda self, url, body: self.reply(200, b"{}")}))
    servers.append(elsewhere)
    reg = _bearer(servers, post_redirect=f"http://{elsewhere.host}/token")
    write_config(cfgdir, {"auths": {reg.server.host: {"identitytoken": TOKEN}}})
    with RegistryClient(reg.server.host, "team/app", plain_http=True, retries=0) as c, \
            pytest.raises(BackendError, match="HTTP 307"):
        c.ping()
    assert elsewhere.seen == []


class BasicRegistry:
    """/v2/ behind basic auth; blob GETs are redirected to `storage` (another origin) when given."""

    def __init__(self, user: str, pw: str, blobs: dict[str, bytes], storage: "_Server | None" = None):
        want = "Basic " + _b64(user, pw)
        reg = self

        class H(_Handler):
            def handle_request(self, url, body):
                if self.headers.get("Authorization") != want:
                    return self.reply(401, b"{}", {"WWW-Authenticate": 'Basic realm="fake"'})
                m = re.match(r"^/v2/.+/blobs/(sha256:[0-9a-f]{64})$", url.path)
                if m and m.group(1) in blobs:
                    if reg.storage is not None:
                        return self.reply(307, b"", {"Location": f"http://{reg.storage.host}/store/{m.group(1)}"})
                    return self.reply(200, blobs[m.group(1)])
                self.reply(200 if url.path == "/v2/" else 404, b"{}")

        self.storage = storage
        self.server = _Server(H)


def test_lookup_is_lazy_and_once(cfgdir, helper, servers):
    data = b"layer bytes" * 100
    dg = sha256_digest(data)
    reg = BasicRegistry("alice", SECRET, {dg: data})
    servers.append(reg.server)
    open_reg = _Server(type("H", (_Handler,), {"handle_request": lambda self, url, body: self.reply(200, b"{}")}))
    servers.append(open_reg)
    helper.set({reg.server.host: ("alice", SECRET), open_reg.host: ("alice", SECRET)})
    write_config(cfgdir, {"credsStore": "pytest"})
    with RegistryClient(open_reg.host, "pub/app", plain_http=True) as c:
        c.ping()
    assert helper.calls() == [] and open_reg.auth_headers() == []           # nobody asked: none asked for
    with RegistryClient(reg.server.host, "priv/app", plain_http=True) as c:
        assert helper.calls() == []
        c.ping()
        assert c.get_blob(dg) == data
        assert c.head_blob(dg) is not None
    assert helper.calls() == [{"argv": ["get"], "stdin": reg.server.host}]


def test_authorization_stays_on_the_registry_origin(cfgdir, helper, servers, caplog):
    """A blob GET redirected to object storage (another origin) arrives there without credentials."""
    data = os.urandom(5000)
    dg = sha256_digest(data)
    storage = _Server(type("H", (_Handler,), {
        "handle_request": lambda self, url, body: self.reply(200, data) if url.path == f"/store/{dg}"
        else self.reply(404)}))
    servers.append(storage)
    reg = BasicRegistry("alice", SECRET, {dg: data}, storage=storage)
    servers.append(reg.server)
    helper.set({reg.server.host: ("alice", SECRET)})
    write_config(cfgdir, {"credHelpers": {reg.server.host: "pytest"}})
    with caplog.at_level(logging.DEBUG), RegistryClient(reg.server.host, "priv/app", plain_http=True) as c:
        assert c.get_blob(dg) == data
        assert c.read_range(dg, 100, 50) == data[100:150]
    assert [p for _, p, _, _ in storage.seen] == [f"/store/{dg}"] * 2
    assert storage.auth_headers() == []
    assert "Basic " + _b64("alice", SECRET) in reg.server.auth_headers()
    assert SECRET not in caplog.text and _b64("alice", SECRET) not in caplog.text


def test_explicit_anonymous_never_reads_the_config(cfgdir, helper, servers):
    reg = BasicRegistry("alice", SECRET, {})
    servers.append(reg.server)
    helper.set({reg.server.host: ("alice", SECRET)})
    write_config(cfgdir, {"credsStore": "pytest"})
    with RegistryClient(reg.server.host, "priv/app", plain_http=True, auth=ANONYMOUS) as c, \
            pytest.raises(BackendError, match=r"^unauthorized: ping .* \(no credentials for "):
        c.ping()
    assert helper.calls() == []
