"""The one place that builds storage backends and blob caches from typed config.

    cfg = StorageConfig(
        backend=BackendConfig(kind="registry", host="127.0.0.1:5000", repo="library/app",
                              plain_http=True, mirrors=[MirrorConfig("127.0.0.1:65001")]),
        cache=CacheConfig(dir="/var/lib/pynydus/cache"))
    with build_storage(cfg) as manager:          # a CacheManager owning the backend
        cache = manager.open(blob_info)
        data = cache.read(0, 4096)

Config files (TOML / JSON / flags) are parsed by the CLI and daemon entry
points into these dataclasses; nothing here reads files or the environment
(except docker's config.json for registry credentials, via RegistryClient).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import requests

from rafs.image.auth import Credentials
from rafs.image.client import BACKOFF, RETRIES, RegistryClient

from .backend import BlobBackend, LocalFsBackend, MirrorBackend, RegistryBackend
from .backend.mirror import DEFAULT_PENALTY
from .cache import (DEFAULT_FLUSH_CHUNKS, DEFAULT_FLUSH_INTERVAL, DEFAULT_MAX_INFLIGHT,
                    DEFAULT_MERGE_SIZE, MERGE_SIZE_MAX, MERGE_SIZE_MIN, CacheManager)
from .metrics import StorageMetrics

BACKEND_KINDS = ("registry", "localfs")
MIRROR_KINDS = ("registry", "proxy")


@dataclass
class MirrorConfig:
    """A source tried before the origin.

    kind "registry": a registry mirror / pull-through cache (nginx, Harbor,
    Dragonfly dfdaemon in registry-mirror mode) at `address` ("host:port"),
    serving the same repository paths. kind "proxy": an HTTP proxy (dfdaemon
    as HTTP proxy) at `address` ("http://host:port") through which the origin
    is reached.
    """
    address: str
    kind: str = "registry"
    plain_http: bool = False       # registry mirrors: http:// instead of https://

    def __post_init__(self) -> None:
        if self.kind not in MIRROR_KINDS:
            raise ValueError(f"mirror kind must be one of {MIRROR_KINDS}, got {self.kind!r}")
        if not self.address:
            raise ValueError("a mirror needs an address")


@dataclass
class BackendConfig:
    """Where blobs come from. kind "registry" uses host/repo/plain_http/auth; "localfs" uses dir."""
    kind: str = "registry"
    host: str = ""
    repo: str = ""
    plain_http: bool = False
    dir: str = ""
    mirrors: list[MirrorConfig] = field(default_factory=list)
    mirror_penalty: float = DEFAULT_PENALTY    # seconds a failed mirror is skipped
    connect_timeout: float = 3.0
    read_timeout: float = 3.0                  # per socket read (a stall), not per request:
                                               # (retries + 1) x this bounds a stalled registry
    retries: int = RETRIES                     # retries of transient failures (origin)
    backoff: float = BACKOFF                   # first retry delay, doubled each time
    mirror_retries: int = 0                    # a failing mirror falls back at once
    auth: Credentials | None = None            # None: docker's config.json
    docker_config_dir: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in BACKEND_KINDS:
            raise ValueError(f"backend kind must be one of {BACKEND_KINDS}, got {self.kind!r}")
        if self.kind == "registry" and not (self.host and self.repo):
            raise ValueError("a registry backend needs host and repo")
        if self.kind == "localfs" and not self.dir:
            raise ValueError("a localfs backend needs dir")
        if self.kind == "localfs" and self.mirrors:
            raise ValueError("mirrors are for registry backends")
        self.mirrors = [m if isinstance(m, MirrorConfig) else MirrorConfig(str(m))
                        for m in self.mirrors]
        if min(self.connect_timeout, self.read_timeout) <= 0:
            raise ValueError("timeouts must be > 0 seconds")
        if self.retries < 0 or self.mirror_retries < 0 or self.backoff < 0 or self.mirror_penalty < 0:
            raise ValueError("retries, backoff and mirror_penalty must be >= 0")


@dataclass
class CacheConfig:
    """The blob cache: directory, request merging, parallelism, readahead, state flushing."""
    dir: str
    merge_size: int = DEFAULT_MERGE_SIZE       # max compressed bytes per merged range request
    max_inflight: int = DEFAULT_MAX_INFLIGHT   # parallel backend requests per blob
    readahead: bool = True                     # widen a miss up to merge_size (else by `amplify`)
    amplify: int | str = 0                     # widen a miss by this many bytes, or "auto" (measured)
    flush_interval: float = DEFAULT_FLUSH_INTERVAL
    flush_chunks: int = DEFAULT_FLUSH_CHUNKS

    def __post_init__(self) -> None:
        if not self.dir:
            raise ValueError("the cache needs a directory")
        if not MERGE_SIZE_MIN <= self.merge_size <= MERGE_SIZE_MAX:
            raise ValueError(f"merge_size must be {MERGE_SIZE_MIN}..{MERGE_SIZE_MAX}, "
                             f"got {self.merge_size}")
        if self.max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {self.max_inflight}")


@dataclass
class StorageConfig:
    backend: BackendConfig
    cache: CacheConfig


class _ProxiedRegistryBackend(RegistryBackend):
    """A RegistryBackend whose client goes through an HTTP proxy session it owns."""

    def __init__(self, client: RegistryClient, session: requests.Session, label: str):
        super().__init__(client, label=label)
        self._session = session

    def close(self) -> None:
        super().close()
        self._session.close()


def _client(cfg: BackendConfig, host: str, *, plain_http: bool, retries: int,
            session: requests.Session | None = None) -> RegistryClient:
    return RegistryClient(host, cfg.repo, plain_http=plain_http, auth=cfg.auth,
                          timeout=(cfg.connect_timeout, cfg.read_timeout), retries=retries,
                          backoff=cfg.backoff, config_dir=cfg.docker_config_dir, session=session)


def _mirror(cfg: BackendConfig, m: MirrorConfig) -> BlobBackend:
    if m.kind == "registry":
        client = _client(cfg, m.address, plain_http=m.plain_http, retries=cfg.mirror_retries)
        return RegistryBackend(client, label=f"registry {m.address}/{cfg.repo}")
    session = requests.Session()
    session.proxies = {"http": m.address, "https": m.address}
    session.trust_env = False
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=16, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    client = _client(cfg, cfg.host, plain_http=cfg.plain_http, retries=cfg.mirror_retries,
                     session=session)
    return _ProxiedRegistryBackend(client, session, f"proxy {m.address} -> {cfg.host}/{cfg.repo}")


def build_backend(cfg: BackendConfig) -> BlobBackend:
    """A backend for `cfg`: LocalFsBackend, RegistryBackend, or a MirrorBackend around it."""
    if cfg.kind == "localfs":
        return LocalFsBackend(cfg.dir)
    origin = RegistryBackend(_client(cfg, cfg.host, plain_http=cfg.plain_http,
                                     retries=cfg.retries))
    if not cfg.mirrors:
        return origin
    return MirrorBackend([_mirror(cfg, m) for m in cfg.mirrors], origin,
                         penalty=cfg.mirror_penalty)


def build_cache_manager(cfg: CacheConfig, backend: BlobBackend, *,
                        metrics: StorageMetrics | None = None) -> CacheManager:
    """A CacheManager over `backend` (which it then owns and closes)."""
    return CacheManager(os.path.abspath(cfg.dir), backend, metrics=metrics,
                        merge_size=cfg.merge_size, max_inflight=cfg.max_inflight,
                        readahead=cfg.readahead, amplify=cfg.amplify, flush_interval=cfg.flush_interval,
                        flush_chunks=cfg.flush_chunks)


def build_storage(cfg: StorageConfig) -> CacheManager:
    """Backend + cache manager for one mount; closing the manager closes the backend."""
    backend = build_backend(cfg.backend)
    try:
        return build_cache_manager(cfg.cache, backend,
                                   metrics=StorageMetrics(backend.source_stats))
    except BaseException:
        backend.close()
        raise
