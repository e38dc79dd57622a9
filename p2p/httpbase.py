"""The threaded HTTP server under the peer service and the tracker.

A `ThreadingHTTPServer` that also tracks its open connections, so that
`close()` really ends service: HTTP/1.1 keep-alive connections would otherwise
go on being served by their handler threads after the listening socket is
closed (a stopped tracker answering with stale state, a stopped peer still
uploading). Lost clients are logged at debug level, not as tracebacks.
"""
from __future__ import annotations

import logging
import socket
import sys
import threading
from http.server import ThreadingHTTPServer

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
        super().__init__(split_addr(listen), handler)

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        return f"{host}:{port}"

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
