"""An HTTP server that only fails: a broken registry mirror / HTTP proxy for tests.

    with FaultyHTTPServer("500") as srv:        # or "reset", "stall"
        srv.host                                # "127.0.0.1:PORT"
        srv.requests                            # how many requests it got

Modes: "500" answers every request with HTTP 500 and a registry-style error
body; "reset" closes the connection without answering (an RST, via SO_LINGER
0); "stall" reads the request and answers nothing until stopped.
"""
from __future__ import annotations

import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODES = ("500", "reset", "stall")


class FaultyHTTPServer:
    def __init__(self, mode: str = "500"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.requests = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):          # quiet
                pass

            def _any(self):
                with owner._lock:
                    owner.requests += 1
                if owner.mode == "500":
                    body = b'{"errors":[{"code":"UNKNOWN","message":"injected failure"}]}'
                    self.send_response(500)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(body)
                elif owner.mode == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.close_connection = True
                else:
                    owner._stop.wait()
                    self.close_connection = True

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True,
                                        name=f"faulty-http-{mode}")

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "FaultyHTTPServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "FaultyHTTPServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
