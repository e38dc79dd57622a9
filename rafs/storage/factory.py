"""The one place that builds storage backends and blob caches from typed config.

    cfg = StorageConfig(
        backend=BackendConfig(kind="registry", host="127.0.0.1:5000", repo="library/app",
                              plain_http=True, mirrors=[MirrorConfig("http://127.0.0.1:65001")]),
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

from rafs.image.auth import ANONYMOUS, Credentials
from rafs.image.client import BACKOFF, RETRIES, RegistryClient
from rafs.image.hosts import RegistryHost, resolve_hosts
from rafs.image.tls import new_session

from .backend import BlobBackend, LocalFsBackend, MirrorBackend, RegistryBackend
from .backend.mirror import DEFAULT_PENALTY, MIRROR_KINDS, MirrorConfig, MirrorHealth, parse_mirror
from .cache import (DEFAULT_FLUSH_CHUNKS, DEFAULT_FLUSH_INTERVAL, DEFAULT_MAX_INFLIGHT,
                    DEFAULT_MERGE_SIZE, MERGE_SIZE_MAX, MERGE_SIZE_MIN, CacheManager)
from .cache.evict import parse_size
from .metrics import StorageMetrics

BACKEND_KINDS = ("registry", "localfs")
__all__ = ["BACKEND_KINDS", "MIRROR_KINDS", "BackendConfig", "CacheConfig", "MirrorConfig", "StorageConfig",
           "build_backend", "build_cache_manager", "build_storage"]


@dataclass
class BackendConfig:
    """Where blobs come from. kind "registry" uses host/repo/plain_http/auth; "localfs" uses dir."""
    kind: str = "registry"
    host: str = ""
    repo: str = ""
    plain_http: bool = False
    dir: str = ""
    mirrors: list[MirrorConfig] = field(default_factory=list)   # (or --mirror specs, or dicts: nydusd's fields)
    mirror_penalty: float = DEFAULT_PENALTY    # seconds a failed mirror is skipped (until failure_limit)
    connect_timeout: float = 3.0
    read_timeout: float = 3.0                  # per socket read (a stall), not per request:
                                               # (retries + 1) x this bounds a stalled registry
    retries: int = RETRIES                     # retries of transient failures (origin)
    backoff: float = BACKOFF                   # first retry delay, doubled each time
    mirror_retries: int = 0                    # a failing mirror falls back at once
    auth: Credentials | None = None            # None: docker's config.json
    docker_config_dir: str | None = None
    hosts_dir: str | None = None               # containerd's hosts directory (rafs.image.hosts): the
                                               # origin's server and TLS, its [host] entries as mirrors
    insecure: bool = False                     # skip TLS verification; a plain-HTTP answer switches to http

    def __post_init__(self) -> None:
        if self.kind not in BACKEND_KINDS:
            raise ValueError(f"backend kind must be one of {BACKEND_KINDS}, got {self.kind!r}")
        if self.kind == "registry" and not (self.host and self.repo):
            raise ValueError("a registry backend needs host and repo")
        if self.kind == "localfs" and not self.dir:
            raise ValueError("a localfs backend needs dir")
        if self.kind == "localfs" and self.mirrors:
            raise ValueError("mirrors are for registry backends")
        self.mirrors = [m if isinstance(m, MirrorConfig) else
                        MirrorConfig.from_dict(m) if isinstance(m, dict) else parse_mirror(str(m))
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
    max_size: int | str = 0                    # disk limit of budget_root's files ("64M", "2G"; 0 = none)
    budget_root: str = ""                      # the directory the limit covers (default: dir); the
                                               # snapshotter's cache root: one limit for all its images

    def __post_init__(self) -> None:
        if not self.dir:
            raise ValueError("the cache needs a directory")
        self.max_size = parse_size(self.max_size)
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
            session: requests.Session | None = None, auth: Credentials | None | str = "origin",
            headers: dict[str, str] | None = None, endpoint: RegistryHost | None = None) -> RegistryClient:
    return RegistryClient(host, cfg.repo, plain_http=plain_http, auth=cfg.auth if auth == "origin" else auth,
                          timeout=(cfg.connect_timeout, cfg.read_timeout), retries=retries,
                          backoff=cfg.backoff, config_dir=cfg.docker_config_dir, session=session,
                          headers=headers, endpoint=endpoint)


def mirror_endpoint(m: MirrorConfig) -> RegistryHost:
    """A registry mirror's place and TLS as the client takes them (scheme, host, API root, ca, client),
    its capabilities and headers (for an image store reading through it too: `store_hosts`)."""
    return RegistryHost(host=m.address, scheme=m.scheme, path=m.api_root, ca=tuple(m.ca),
                        client=tuple((c[0], c[1] if len(c) > 1 else "") for c in m.client),
                        skip_verify=True if m.skip_verify else None, mirror=True,
                        capabilities=frozenset(c for c in m.capabilities if c != "push"),
                        header=tuple((k, (v,)) for k, v in m.headers.items()))


def store_hosts(host: str, mirrors=(), *, hosts_dir: str | None = None, plain_http: bool = False,
                insecure: bool = False) -> list[RegistryHost]:
    """The hosts an image store (`rafs.image.store.RegistryStore(hosts=...)`) reads registry `host`
    through: the configured registry mirrors (`MirrorConfig`s, e.g. `--mirror`), then containerd's
    (hosts.toml's mirrors, the origin last). Manifests by digest and blobs are verified wherever they
    come from; a mirror that fails is left for the next host."""
    return [*(mirror_endpoint(m) for m in mirrors if m.kind == "registry"),
            *resolve_hosts(host, hosts_dir, plain_http=plain_http, insecure=insecure)]


def hosts_mirror(h: RegistryHost) -> MirrorConfig:
    """A hosts.toml [host."…"] entry as a mirror: its own host's credentials (containerd looks them up
    by the host it contacts), its capabilities, TLS and headers; health checks with the defaults."""
    if h.path.endswith("/v2"):
        host, override = h.origin + h.path[:-len("/v2")], False
    else:
        host, override = h.origin + h.path, True
    return MirrorConfig(host=host, headers=h.headers(), auth_through=True,
                        capabilities=[c for c in ("pull", "resolve", "push") if h.can(c)],
                        skip_verify=bool(h.skip_verify), ca=list(h.ca),
                        client=[[c, k] if k else [c] for c, k in h.client], override_path=override)


def _mirror(cfg: BackendConfig, m: MirrorConfig, endpoint: RegistryHost, origin: RegistryHost) -> BlobBackend:
    if m.kind == "registry":
        # the origin's credentials never go to a mirror: with auth_through the mirror's own challenge is
        # answered with what docker's config holds for the mirror's host; else it gets none
        client = _client(cfg, m.address, plain_http=m.plain_http, retries=cfg.mirror_retries,
                         auth=None if m.auth_through else ANONYMOUS, headers=m.headers, endpoint=endpoint)
        return RegistryBackend(client, label=f"registry {m.address}/{cfg.repo}")
    session = new_session(origin)             # the origin's TLS, through the proxy
    session.proxies = {"http": m.host, "https": m.host}
    session.trust_env = False
    client = _client(cfg, cfg.host, plain_http=cfg.plain_http, retries=cfg.mirror_retries,
                     session=session, headers=m.headers, endpoint=origin)
    return _ProxiedRegistryBackend(client, session, f"proxy {m.host} -> {cfg.host}/{cfg.repo}")


def _health(cfg: BackendConfig, m: MirrorConfig, endpoint: RegistryHost) -> MirrorHealth:
    """Nydus's health check: a disabled mirror is pinged (GET ping_url, default its /v2/) every
    health_check_interval seconds; any answer below 500 enables it again. A proxy without a ping_url
    is tried again after that interval instead."""
    if m.kind == "proxy" and not m.ping_url:
        return MirrorHealth(m.failure_limit, m.health_check_interval, None)
    url, headers = m.health_url, dict(m.headers)

    def ping() -> bool:
        with new_session(endpoint) as s:      # the mirror's TLS: system store + its ca, client, skip_verify
            s.trust_env = False
            r = s.get(url, headers=headers, timeout=(cfg.connect_timeout, cfg.read_timeout),
                      allow_redirects=False)
            r.close()
            return r.status_code < 500
    return MirrorHealth(m.failure_limit, m.health_check_interval, ping)


def build_backend(cfg: BackendConfig) -> BlobBackend:
    """A backend for `cfg`: LocalFsBackend, RegistryBackend, or a MirrorBackend around it."""
    if cfg.kind == "localfs":
        return LocalFsBackend(cfg.dir)
    # containerd's hosts directory: the origin (server, TLS) last, its [host."…"] mirrors before it
    hosts = resolve_hosts(cfg.host, cfg.hosts_dir, plain_http=cfg.plain_http, insecure=cfg.insecure)
    home = hosts[-1]
    origin = RegistryBackend(_client(cfg, home.host, plain_http=cfg.plain_http, retries=cfg.retries,
                                     endpoint=home))
    # the configured (Nydus) mirrors first, then hosts.toml's in its order
    specs = [(m, mirror_endpoint(m)) for m in cfg.mirrors] + [(hosts_mirror(h), h) for h in hosts[:-1]]
    usable = [(m, ep) for m, ep in specs if m.can("pull")]
    if not usable:
        return origin
    mirrors: list[BlobBackend] = []
    try:
        for m, ep in usable:
            mirrors.append(_mirror(cfg, m, ep, home))
    except BaseException:
        for b in [*mirrors, origin]:
            b.close()
        raise
    return MirrorBackend(mirrors, origin, penalty=cfg.mirror_penalty,
                         health=[_health(cfg, m, ep) for m, ep in usable])


def build_cache_manager(cfg: CacheConfig, backend: BlobBackend, *,
                        metrics: StorageMetrics | None = None) -> CacheManager:
    """A CacheManager over `backend` (which it then owns and closes)."""
    return CacheManager(os.path.abspath(cfg.dir), backend, metrics=metrics,
                        merge_size=cfg.merge_size, max_inflight=cfg.max_inflight,
                        readahead=cfg.readahead, amplify=cfg.amplify, flush_interval=cfg.flush_interval,
                        flush_chunks=cfg.flush_chunks, max_size=cfg.max_size,
                        budget_root=os.path.abspath(cfg.budget_root) if cfg.budget_root else None)


def build_storage(cfg: StorageConfig) -> CacheManager:
    """Backend + cache manager for one mount; closing the manager closes the backend."""
    backend = build_backend(cfg.backend)
    try:
        return build_cache_manager(cfg.cache, backend,
                                   metrics=StorageMetrics(backend.source_stats))
    except BaseException:
        backend.close()
        raise
