"""A docker-token-auth front for a real registry, for tests only.

Distribution can do token auth itself, but it allows 60 s of clock-skew leeway
on token expiry, so a test could not watch a token expire.  This proxy sits in
front of an unauthenticated real registry and:

* answers ``/token?service=..&scope=..`` (HTTP basic credentials checked when
  ``users`` is given) with opaque tokens living ``token_ttl`` seconds (the
  answer may advertise a different ``expires_in``, to force the 401 path);
* requires ``Authorization: Bearer <token>`` with the right scope on ``/v2/``
  requests, else ``401`` + ``WWW-Authenticate: Bearer realm=..,service=..,scope=..``;
* forwards everything else, streaming, to the registry (the Host header is
  kept, so the registry's Location URLs point back at the proxy).

Fault options (a registry's CDN / mirror behaviours):
``redirect_blobs`` answers blob GETs with a 307 to ``localhost:PORT`` (a
different host name for the same proxy, standing for object storage: no token
needed there, and any Authorization header that arrives is recorded in
``leaked_auth``); ``ignore_range`` drops the Range header (server answers 200
with the whole blob); ``cut_blob_after`` closes the connection after that many
body bytes of a blob GET, ``cuts`` times; ``stall_blob_gets`` sleeps that many
seconds before answering a blob GET.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

SERVICE = "pynydus-test-registry"
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-authenticate", "proxy-authorization",
        "te", "trailer", "upgrade"}
_REPO_PATH = re.compile(r"^/v2/(?P<repo>.+?)/(?P<kind>blobs|manifests|tags)/")


class TokenProxy:
    def __init__(self, upstream: str, *, users: dict[str, str] | None = None, token_ttl: float = 60.0,
                 advertised_ttl: float | None = None, redirect_blobs: bool = False, ignore_range: bool = False,
                 cut_blob_after: int | None = None, cuts: int = 1, stall_blob_gets: float = 0.0):
        self.upstream = upstream
        self.users = users
        self.token_ttl = token_ttl
        self.advertised_ttl = advertised_ttl
        self.redirect_blobs = redirect_blobs
        self.ignore_range = ignore_range
        self.cut_blob_after = cut_blob_after
        self.cuts_left = cuts
        self.stall_blob_gets = stall_blob_gets
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[float, set[str]]] = {}
        self.tokens_issued = 0
        self.token_requests: list[dict] = []     # {user, scopes, status}
        self.log: list[tuple[str, str, int]] = []  # (method, path, status) of /v2 requests
        self.leaked_auth: list[str] = []         # Authorization headers seen on the "storage" host
        self._server: ThreadingHTTPServer | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> "TokenProxy":
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "TokenProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        return f"http://{self.host}/token"

    def revoke_all(self) -> None:
        """Forget every token (as if they expired early, or the signing key rotated)."""
        with self._lock:
            self._tokens.clear()

    # -- token logic
    def _issue(self, scopes: set[str]) -> str:
        tok = secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[tok] = (time.monotonic() + self.token_ttl, scopes)
            self.tokens_issued += 1
        return tok

    def _allowed(self, auth: str | None, needed: str | None) -> bool:
        if not auth or not auth.startswith("Bearer "):
            return False
        with self._lock:
            entry = self._tokens.get(auth[7:].strip())
        if entry is None or time.monotonic() >= entry[0]:
            return False
        if needed is None:
            return True
        repo, _, actions = needed.rpartition(":")
        granted: set[str] = set()
        for s in entry[1]:
            r, _, acts = s.rpartition(":")
            if r == repo:
                granted |= set(acts.split(","))
        return set(actions.split(",")) <= granted


class _Handler(BaseHTTPRequestHandler):
    owner: TokenProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet
        pass

    def _reply(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drain_body(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        while n > 0:
            b = self.rfile.read(min(n, 1 << 20))
            if not b:
                break
            n -= len(b)

    def do_GET(self):
        self._handle()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _handle(self) -> None:
        p = self.owner
        url = urlsplit(self.path)
        if url.path == "/token":
            return self._token(url)
        if not url.path.startswith("/v2"):
            self._drain_body()
            return self._reply(404, b"not found")
        host_hdr = self.headers.get("Host", "")
        is_storage = host_hdr.startswith("localhost:")
        m = _REPO_PATH.match(url.path)
        if is_storage:
            if self.headers.get("Authorization"):
                p.leaked_auth.append(self.headers["Authorization"])
            return self._forward(url)
        needed = None
        if m:
            action = "pull" if self.command in ("GET", "HEAD") else "pull,push"
            needed = f"repository:{m.group('repo')}:{action}"
        if not p._allowed(self.headers.get("Authorization"), needed):
            self._drain_body()
            chal = f'Bearer realm="{p.realm}",service="{SERVICE}"'
            if needed:
                chal += f',scope="{needed}"'
            body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}).encode()
            p.log.append((self.command, url.path, 401))
            return self._reply(401, body, {"WWW-Authenticate": chal, "Content-Type": "application/json"})
        if (p.redirect_blobs and self.command == "GET" and m and m.group("kind") == "blobs"
                and "/uploads/" not in url.path):
            p.log.append((self.command, url.path, 307))
            return self._reply(307, b"", {"Location": f"http://localhost:{p.port}{self.path}"})
        self._forward(url)

    def _token(self, url) -> None:
        p = self.owner
        q = parse_qs(url.query)
        scopes = set()
        for s in q.get("scope", []):
            scopes |= set(s.split())
        user = None
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            except Exception:
                user, pw = None, None
            if p.users is not None and p.users.get(user) != pw:
                user = None
        ok = p.users is None or user is not None
        p.token_requests.append({"user": user, "scopes": sorted(scopes), "status": 200 if ok else 401})
        if not ok:
            return self._reply(401, b'{"details":"bad credentials"}', {"Content-Type": "application/json"})
        tok = p._issue(scopes)
        ttl = p.advertised_ttl if p.advertised_ttl is not None else p.token_ttl
        body = json.dumps({"token": tok, "access_token": tok, "expires_in": ttl,
                           "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
        self._reply(200, body, {"Content-Type": "application/json"})

    def _forward(self, url) -> None:
        p = self.owner
        if p.stall_blob_gets and self.command == "GET" and "/blobs/sha256:" in url.path:
            if p._stopping.wait(p.stall_blob_gets):
                self.close_connection = True
                return
        conn = http.client.HTTPConnection(p.upstream, timeout=30)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                lk = k.lower()
                if lk in _HOP or lk == "authorization" or (lk == "range" and p.ignore_range):
                    continue
                conn.putheader(k, v)
            conn.endheaders()
            n = int(self.headers.get("Content-Length") or 0)
            while n > 0:
                b = self.rfile.read(min(n, 1 << 20))
                if not b:
                    break
                conn.send(b)
                n -= len(b)
            resp = conn.getresponse()
            p.log.append((self.command, url.path, resp.status))
            self.send_response(resp.status)
            length = resp.getheader("Content-Length")
            for k, v in resp.getheaders():
                if k.lower() not in _HOP:
                    self.send_header(k, v)
            body = None
            if length is None and self.command != "HEAD":
                body = resp.read()
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if body is not None:
                self.wfile.write(body)
                return
            cut = None
            if (p.cut_blob_after is not None and self.command == "GET" and "/blobs/sha256:" in url.path
                    and resp.status in (200, 206)):
                with p._lock:
                    if p.cuts_left > 0:
                        p.cuts_left -= 1
                        cut = p.cut_blob_after
            sent = 0
            while True:
                chunk = resp.read(1 << 16)
                if not chunk:
                    break
                if cut is not None and sent + len(chunk) >= cut:
                    self.wfile.write(chunk[:cut - sent])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except OSError as e:  # upstream gone
            self.close_connection = True
            try:
                self._reply(502, f"upstream: {e}".encode())
            except OSError:
                pass
        finally:
            conn.close()
