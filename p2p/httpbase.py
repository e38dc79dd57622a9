"""The threaded HTTP server under the peer service and the tracker.

A `ThreadingHTTPServer` that also tracks its open connections, so that
`close()` really ends service: HTTP/1.1 keep-alive connections would otherwise
go on being served by their handler threads after the listening socket is
closed (a stopped tracker answering with stale state, a stopped peer still
uploading). Lost clients are logged at debug level, not as tracebacks.

Latency: every accepted socket gets TCP_NODELAY, and `Handler.reply` sends the
status line, headers and body in one write. Without both, a small header
write followed by the body is held back by Nagle until the client's delayed
ACK (~40 ms on Linux) on every keep-alive response: peer fetches on a fast
link took ~42 ms instead of ~0.6 ms.
"""
from __future__ import annotations

import logging
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .protocol import split_addr

log = logging.getLogger(__name__)


class HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, listen: str, handler):
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.accepted = 0                       # connections accepted (keep-alive reuse shows here)
        super().__init__(split_addr(listen), handler)

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        return f"{host}:{port}"

    def get_request(self):
        sock, addr = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)    # see the module docstring
        self.accepted += 1                      # only the serve_forever thread accepts
        return sock, addr

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        e = sys.exc_info()[1]
        if isinstance(e, (ConnectionError, TimeoutError, OSError)):
            log.debug("%s: connection lost: %s", client_address, e)     # the client went away
        else:
            log.exception("error serving %s", client_address)

    def start(self, name: str) -> None:
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), name=name,
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, end every open connection, release the port."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive request handler whose responses go out in as few writes as possible."""

    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):          # access log to the logger, not stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    def reply(self, code: int, content_type: str, *body, headers: dict | None = None,
              length: int | None = None) -> None:
        """Send status, headers and the `body` buffers in one write. `length`: the
        Content-Length when more body follows (the caller then writes it to `wfile`)."""
        if length is None:
            length = sum(len(b) for b in body)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.request_version == "HTTP/0.9":  # body only: nothing was buffered
            self.wfile.write(b"".join(body))
            return
        self._headers_buffer += [b"\r\n", *body]
        self.flush_headers()                    # one write of the joined buffer
