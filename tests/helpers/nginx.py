"""A real pull-through cache for tests: Debian's nginx with `proxy_cache` + `slice` in front of a registry.

    with run_nginx_cache(tmp_path, upstream="127.0.0.1:5000") as cache:
        cache.host                    # "127.0.0.1:PORT": use it as a registry mirror (plain http)
        cache.access_log()            # [NginxLogEntry(method, path, status, bytes, cache, range)]

Blob GETs (`/v2/<repo>/blobs/sha256:<hex>`) and manifests by digest are
immutable, so they are cached: blobs in 1 MiB slices (`slice 1m`, the cache key
is the digest plus the slice range, so a lazy reader's Range GETs are cached
without nginx pulling whole blobs, and a blob is cached once across
repositories); `proxy_cache_lock` makes concurrent misses for one slice go
upstream once. Everything else under /v2/ (tags, pings, uploads) is passed
through uncached. Only for anonymous pulls: cached blobs are served without
asking the registry whether the client may read them.

Package: `nginx` (Debian 12; `nginx-light` is a metapackage over it). It is
started as our own process (`daemon off; master_process off;`) on a free
loopback port with every path under the work dir; the Debian service is never
started.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import requests

from testbed.process import free_port, spawn, stop_process

NGINX_BIN = shutil.which("nginx") or "/usr/sbin/nginx"

_LOG_RE = re.compile(r'^(?P<method>[A-Z]+) (?P<path>\S+) (?P<status>\d{3}) (?P<bytes>\d+) '
                     r'(?P<cache>\S+) "(?P<range>[^"]*)"$')


def available() -> str | None:
    if not os.path.exists(NGINX_BIN):
        return f"{NGINX_BIN} missing (apt-get install nginx)"
    return None


@dataclass(frozen=True)
class NginxLogEntry:
    method: str
    path: str
    status: int
    bytes: int          # body bytes sent to the client
    cache: str          # $upstream_cache_status: HIT, MISS, ... or "-" (not cacheable)
    range: str          # the client's Range header ("" if none)


class NginxCache:
    """One nginx process proxying (and caching) a registry at `upstream` ("host:port")."""

    def __init__(self, workdir: str | os.PathLike, upstream: str, *, listen: str = "127.0.0.1",
                 port: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.upstream = upstream
        self.listen = listen
        self.port = port or free_port()
        self.conf = self.workdir / "nginx.conf"
        self.access_log_path = self.workdir / "access.log"
        self.error_log_path = self.workdir / "error.log"
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"{self.listen}:{self.port}"

    def _write_config(self) -> None:
        w = self.workdir
        for d in ("cache", "tmp"):
            (w / d).mkdir(exist_ok=True)
        self.conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {self.error_log_path} notice;
events {{ worker_connections 512; }}
http {{
    log_format pull '$request_method $uri $status $body_bytes_sent $upstream_cache_status "$http_range"';
    access_log {self.access_log_path} pull;
    client_body_temp_path {w}/tmp/body;
    proxy_temp_path {w}/tmp/proxy;
    fastcgi_temp_path {w}/tmp/fastcgi;
    uwsgi_temp_path {w}/tmp/uwsgi;
    scgi_temp_path {w}/tmp/scgi;
    proxy_cache_path {w}/cache levels=1:2 keys_zone=registry:16m max_size=4g inactive=7d
                     use_temp_path=off;
    client_max_body_size 0;
    upstream origin {{ server {self.upstream}; keepalive 16; }}
    server {{
        listen {self.listen}:{self.port};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_buffering on;

        # blobs are content-addressed: cache 1 MiB slices, keyed by digest + slice
        location ~ "^/v2/.+/blobs/(?<digest>sha256:[0-9a-f]{{64}})$" {{
            slice 1m;
            proxy_cache registry;
            proxy_cache_key $digest$slice_range;
            proxy_set_header Range $slice_range;
            proxy_cache_valid 200 206 7d;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 30s;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
            add_header X-Cache-Status $upstream_cache_status always;
            proxy_pass http://origin;
        }}
        # manifests by digest are immutable too (whole documents)
        location ~ "^/v2/.+/manifests/(?<mdigest>sha256:[0-9a-f]{{64}})$" {{
            proxy_cache registry;
            proxy_cache_key $mdigest$http_accept;
            proxy_cache_valid 200 7d;
            proxy_cache_lock on;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
            add_header X-Cache-Status $upstream_cache_status always;
            proxy_pass http://origin;
        }}
        location /v2/ {{
            proxy_pass http://origin;
        }}
    }}
}}
""")

    def start(self, timeout: float = 10.0) -> "NginxCache":
        if self.proc and self.proc.poll() is None:
            return self
        why = available()
        if why:
            raise RuntimeError(why)
        self._write_config()
        self.proc = spawn([NGINX_BIN, "-c", self.conf, "-p", self.workdir], self.workdir / "stderr.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                requests.get(f"http://{self.host}/v2/", timeout=1)
                return self
            except requests.RequestException:
                time.sleep(0.05)
        tail = (self.workdir / "stderr.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"nginx did not come up on {self.host}:\n{tail}")

    def stop(self) -> None:
        p, self.proc = self.proc, None
        stop_process(p)

    def access_log(self) -> list[NginxLogEntry]:
        if not self.access_log_path.exists():
            return []
        out = []
        for line in self.access_log_path.read_text(errors="replace").splitlines():
            m = _LOG_RE.match(line)
            if m:
                out.append(NginxLogEntry(m["method"], m["path"], int(m["status"]),
                                         int(m["bytes"]), m["cache"], m["range"]))
        return out

    def __enter__(self) -> "NginxCache":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def run_nginx_cache(workdir: str | os.PathLike, upstream: str, **kw) -> Iterator[NginxCache]:
    """An nginx pull-through cache in front of `upstream`; always stopped on exit."""
    cache = NginxCache(workdir, upstream, **kw)
    try:
        cache.start()
        yield cache
    finally:
        cache.stop()
