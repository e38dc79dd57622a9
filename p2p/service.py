"""Wiring P2P into a daemon: typed config, the per-process service, and a P2P-aware cache manager.

One `P2PService` per process (a mount daemon, or the snapshotter for all its
mounts): the `PeerNode` (what is shared), the `PeerServer` (if it listens),
the discovery (tracker or static peers) and the credential-free peer client.
Each mount gets its storage from `service.storage(storage_config)`: the
factory's usual origin backend (registry, mirrors) wrapped in a `P2PBackend`,
under a `P2PCacheManager` that registers every blob it opens with the node
(its units: the chunks of the bootstrap's chunk table) before the cache
fetches anything, and shares it afterwards.

    cfg = P2PConfig(listen="10.0.0.5:7070", tracker="10.0.0.1:7000")
    with P2PService(cfg, store_dir="/var/lib/pynydus/p2p") as svc:
        with svc.storage(storage_cfg) as manager:     # a CacheManager
            manager.open(blob_info).read(0, 4096)

or, for a daemon with one mount, `build_p2p_storage(storage_cfg, p2p_cfg)`,
which returns a manager that owns its service (closed with it).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from rafs.storage.backend import BlobBackend
from rafs.storage.cache import CacheManager
from rafs.storage.factory import CacheConfig, StorageConfig, build_backend
from rafs.storage.metrics import StorageMetrics

from .backend import (BAD_DATA_PENALTY, DEFAULT_MAX_PARALLEL, DEFAULT_PEER_READAHEAD,
                      DEFAULT_PIECE_SIZE, DEFAULT_WAIT_TIMEOUT, FAILURE_PENALTY, P2PBackend)
from .discovery import Discovery, StaticDiscovery, TrackerDiscovery
from .node import PeerNode
from .peerclient import PeerClient
from .protocol import normalize_addr
from .server import DEFAULT_UPLOAD_SLOTS, PeerServer
from .tracker import DEFAULT_INTERVAL

log = logging.getLogger(__name__)


@dataclass
class P2PConfig:
    """P2P settings of one node. With neither `tracker` nor `peers` the node only serves."""
    listen: str | None = None           # "host:port" to serve chunks on (port 0: any); None: no service
    advertise: str | None = None        # "host[:port]" peers dial (default: the bound address;
                                        # a host alone takes the bound port, e.g. with port 0)
    tracker: str | None = None          # "host:port" or "http://host:port"
    peers: list[str] = field(default_factory=list)   # static peer list, when there is no tracker
    upload_slots: int = DEFAULT_UPLOAD_SLOTS          # concurrent uploads; more get 503
    upload_rate: float = 0              # bytes/s for all uploads together; 0 = unlimited
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT        # longest wait for a peer that is fetching
    connect_timeout: float = 1.0        # to peers
    read_timeout: float = 2.0           # per socket read from a peer (a stall)
    min_rate: float = 2 << 20           # bytes/s below which a peer transfer is abandoned
    piece_size: int = DEFAULT_PIECE_SIZE              # bytes per request to one holder
    max_parallel: int = DEFAULT_MAX_PARALLEL          # peer / origin requests in flight per node
    peer_readahead: int = DEFAULT_PEER_READAHEAD      # bytes past a request a holder may add
    announce_interval: float = DEFAULT_INTERVAL       # full announcements to the tracker
    bad_data_penalty: float = BAD_DATA_PENALTY        # seconds a peer that served bad bytes is skipped
    failure_penalty: float = FAILURE_PENALTY          # ... one that failed or was too slow

    def __post_init__(self) -> None:
        if self.listen is not None:
            self.listen = normalize_addr(self.listen, listen=True)
        if self.advertise is not None:
            adv = self.advertise.strip()
            host, sep, port = adv.rpartition(":")
            if sep and port.isdigit() and host.count(":") == 0:
                adv = normalize_addr(adv)          # host:port
            elif not adv or "/" in adv:
                raise ValueError(f"bad advertise address {self.advertise!r}: want HOST[:PORT]")
            self.advertise = adv
        if self.tracker is not None:
            self.tracker = normalize_addr(self.tracker)
        if isinstance(self.peers, str):
            self.peers = [p for p in self.peers.split(",") if p.strip()]
        self.peers = [normalize_addr(p) for p in self.peers]
        if self.tracker and self.peers:
            raise ValueError("give a tracker or a static peer list, not both")
        if self.upload_slots < 1 or self.upload_rate < 0 or self.max_parallel < 1:
            raise ValueError("upload_slots and max_parallel must be >= 1, upload_rate >= 0")
        if min(self.connect_timeout, self.read_timeout, self.min_rate) <= 0 or self.wait_timeout < 0:
            raise ValueError("timeouts and min_rate must be > 0 (wait_timeout >= 0)")

    @property
    def enabled(self) -> bool:
        return bool(self.listen or self.tracker or self.peers)


def _advertised(advertise: str | None, bound: str) -> str:
    """The address peers dial: `advertise` ("host" takes the bound port), else the bound one."""
    host, _, port = bound.rpartition(":")
    if advertise is None:
        if host in ("0.0.0.0", "::", ""):
            raise ValueError(f"listening on {bound} (all addresses): give an address to advertise "
                             "to peers (--p2p-advertise HOST)")
        return bound
    if advertise.count(":") == 1 and advertise.rsplit(":", 1)[1].isdigit():
        return advertise
    return normalize_addr(f"{advertise}:{port}")


class P2PService:
    """Node, peer server, discovery and peer client of one process; a context manager."""

    def __init__(self, cfg: P2PConfig, store_dir: str | os.PathLike):
        self.cfg = cfg
        self.node = PeerNode(store_dir)
        self.server: PeerServer | None = None
        self.client = PeerClient(connect_timeout=cfg.connect_timeout,
                                 read_timeout=cfg.read_timeout, min_rate=cfg.min_rate)
        self.discovery: Discovery | None = None
        try:
            if cfg.listen:
                self.server = PeerServer(self.node, cfg.listen, upload_slots=cfg.upload_slots,
                                         upload_rate=cfg.upload_rate).start()
                self.node.advertise = _advertised(cfg.advertise, self.server.address)
            if cfg.tracker:
                self.discovery = TrackerDiscovery(cfg.tracker, self.node,
                                                  interval=cfg.announce_interval)
            elif cfg.peers:
                self.discovery = StaticDiscovery(cfg.peers, self.node, self.client)
            else:
                self.discovery = Discovery()
            self.discovery.start()
        except BaseException:
            self.close()
            raise
        log.info("p2p: node %s serving on %s, discovery %s", self.node.node_id,
                 self.node.advertise or "(not serving)", self.discovery.kind)

    @property
    def address(self) -> str | None:
        return self.node.advertise

    def backend(self, origin) -> P2PBackend:
        """A P2PBackend in front of `origin` (which it then owns). The peer client is shared."""
        cfg = self.cfg
        b = _SharedClientBackend(origin, self.node, self.discovery, client=self.client,
                                 wait_timeout=cfg.wait_timeout, piece_size=cfg.piece_size,
                                 max_parallel=cfg.max_parallel,
                                 peer_readahead=cfg.peer_readahead,
                                 bad_data_penalty=cfg.bad_data_penalty,
                                 failure_penalty=cfg.failure_penalty)
        if self.server is not None:
            b.upload_stats = self.server.stats.snapshot
        return b

    def storage(self, cfg: StorageConfig, *, owns_service: bool = False) -> "P2PCacheManager":
        """The CacheManager of one mount: the factory's origin backend behind a P2PBackend."""
        return self.cache_manager(build_backend(cfg.backend), cfg.cache, owns_service=owns_service)

    def cache_manager(self, origin: BlobBackend, cache: CacheConfig, *,
                      owns_service: bool = False) -> "P2PCacheManager":
        """A P2PCacheManager over `origin` (an already built backend, which it then owns)."""
        backend = self.backend(origin)
        try:
            return P2PCacheManager(os.path.abspath(cache.dir), backend, self,
                                   owns_service=owns_service,
                                   metrics=StorageMetrics(backend.source_stats),
                                   merge_size=cache.merge_size, max_inflight=cache.max_inflight,
                                   readahead=cache.readahead, flush_interval=cache.flush_interval,
                                   flush_chunks=cache.flush_chunks, max_size=cache.max_size,
                                   budget_root=cache.budget_root or None)
            # No miss amplification: the P2P backend reads ahead over the LAN itself (up to 1 MiB from the
            # holder); widening on top cost the lazy-start quick suite 1.37 -> 1.91 s (numpy, p2p, loopback).
        except BaseException:
            backend.close()
            raise

    def forget(self, blob_id: str) -> bool:
        """Stop sharing `blob_id` and delete its payload file (call when its cache is removed)."""
        return self.node.forget(blob_id)

    def stats(self) -> dict:
        return {"node": self.node.node_id, "address": self.node.advertise,
                "discovery": self.discovery.stats() if self.discovery else {},
                "uploads": self.server.stats.snapshot() if self.server else {},
                "peers": self.client.stats()}

    def close(self) -> None:
        if self.discovery is not None:
            self.discovery.close()
        if self.server is not None:
            self.server.close()
        self.node.close()
        self.client.close()

    def __enter__(self) -> "P2PService":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _SharedClientBackend(P2PBackend):
    """A P2PBackend whose peer client belongs to the service (not closed with the backend)."""

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.origin.close()


class P2PCacheManager(CacheManager):
    """A CacheManager whose blobs are registered with the P2P node (before any chunk is fetched)
    and shared once open. `stats()` gains a "p2p" section (per-blob bytes by source)."""

    def __init__(self, cache_dir, backend: P2PBackend, service: P2PService, *,
                 owns_service: bool = False, **kw):
        super().__init__(cache_dir, backend, **kw)
        self.service = service
        self._owns_service = owns_service

    def open(self, info):
        self.service.node.expect(info)
        cache = super().open(info)
        self.service.node.share(cache)
        return cache

    def stats(self) -> dict:
        out = super().stats()
        per_blob = self.backend.blob_stats()
        for blob_id, usage in out["blobs"].items():
            usage["sources"] = per_blob.get(blob_id, {"peer": 0, "mirror": 0, "registry": 0})
        out["p2p"] = self.service.stats()
        return out

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self._owns_service:
                self.service.close()


def build_p2p_storage(cfg: StorageConfig, p2p: P2PConfig, *,
                      store_dir: str | os.PathLike | None = None) -> P2PCacheManager:
    """Storage for a one-mount daemon with P2P: a manager owning its own P2PService.

    The payload store defaults to `<cache dir>/p2p`.
    """
    svc = P2PService(p2p, store_dir or os.path.join(cfg.cache.dir, "p2p"))
    try:
        return svc.storage(cfg, owns_service=True)
    except BaseException:
        svc.close()
        raise


def p2p_cache_manager(origin: BlobBackend, cache: CacheConfig, p2p: P2PConfig, *,
                      store_dir: str | os.PathLike | None = None) -> P2PCacheManager:
    """Like `build_p2p_storage` for a daemon that built its origin backend already
    (`nydusify mount`): `origin` behind a P2PBackend, the service owned by the manager."""
    svc = P2PService(p2p, store_dir or os.path.join(cache.dir, "p2p"))
    try:
        return svc.cache_manager(origin, cache, owns_service=True)
    except BaseException:
        svc.close()
        origin.close()
        raise
