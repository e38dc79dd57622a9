"""The mount daemon's local API: HTTP/1.1 + JSON on a unix socket (`<state dir>/api.sock`).

Endpoints (all answers are JSON objects; errors are {"error": "..."} with a 4xx/5xx status):

    GET  /api/v1/daemon    pid, mode, mountpoint, state dir, reference, uptime, state
    GET  /api/v1/stats     the daemon fields + storage metrics (bytes fetched, chunks hit /
                           missed, fetch latency percentiles, per-source bytes) + cache use
    POST /api/v1/umount    unmount and exit (202 at once; the daemon exits when done)

The socket is created mode 0600 in a 0700 directory: only root (the snapshotter)
talks to it. `ApiClient` is the client the CLI (`nydusify stats/umount`) and
the snapshotter use.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from typing import Callable

from .errors import RafsError

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
Handler = Callable[[], "tuple[int, dict]"]


class ApiError(RafsError):
    """The daemon could not be reached, or answered with an error."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False
    routes: dict[tuple[str, str], Handler]


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pynydus-daemon"

    def _dispatch(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        route = self.server.routes.get((method, path))
        if route is None:
            known = any(p == path for _, p in self.server.routes)
            status, body = (405, {"error": f"{method} not allowed on {path}"}) if known else \
                (404, {"error": f"no such endpoint: {path}"})
        else:
            try:
                status, body = route()
            except Exception as e:          # the API must not take the daemon down
                log.exception("API %s %s failed", method, path)
                status, body = 500, {"error": str(e)}
        data = json.dumps(body, sort_keys=True).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(min(length, 1 << 16))
        self._dispatch("POST")

    def address_string(self) -> str:        # unix peers have no (host, port)
        return "local"

    def log_message(self, fmt: str, *args) -> None:
        log.debug("api: " + fmt, *args)


class ApiServer:
    """Serves `routes` {(method, path): handler() -> (status, dict)} on unix socket `path`."""

    def __init__(self, path: str, routes: dict[tuple[str, str], Handler]):
        self.path = path
        if os.path.exists(path):
            os.unlink(path)                 # a stale socket of a dead daemon
        old = os.umask(0o177)
        try:
            self._server = _Server(path, _RequestHandler)
        finally:
            os.umask(old)
        self._server.routes = {(m, API_PREFIX + p): h for (m, p), h in routes.items()}
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="api", daemon=True)

    def start(self) -> "ApiServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


class ApiClient:
    """Talks to one daemon's API socket."""

    def __init__(self, sock_path: str, timeout: float = 10.0):
        self.sock_path = sock_path
        self.timeout = timeout

    def request(self, method: str, path: str) -> dict:
        conn = _UnixConnection(self.sock_path, self.timeout)
        try:
            conn.request(method, API_PREFIX + path, body=b"" if method == "POST" else None)
            resp = conn.getresponse()
            raw = resp.read()
        except OSError as e:
            raise ApiError(f"cannot reach the mount daemon at {self.sock_path}: "
                           f"{e.strerror or e}") from None
        finally:
            conn.close()
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(f"the daemon at {self.sock_path} answered {resp.status} with non-JSON "
                           f"{raw[:200]!r}", resp.status) from None
        if resp.status >= 400:
            raise ApiError(f"{method} {path}: {body.get('error', resp.reason)}", resp.status)
        return body

    def daemon(self) -> dict:
        return self.request("GET", "/daemon")

    def stats(self) -> dict:
        return self.request("GET", "/stats")

    def files(self) -> list[dict]:
        """The access audit (rafs.access): files read, in first-access order."""
        return self.request("GET", "/files")["files"]

    def umount(self) -> dict:
        return self.request("POST", "/umount")
