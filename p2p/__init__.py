"""Peer-to-peer chunk distribution: a peer chunk service, a tracker and Dragonfly proxy support.

* `protocol`: the peer wire protocol (HTTP GETs of stored-blob ranges, xxh64-framed).
* `node`: what a node holds of each shared blob (verifiable units, payload store).
* `server`: the peer service (verified bytes only, bounded uploads, bandwidth cap);
  `httpbase`: the threaded HTTP server under it and the tracker.
* `tracker`: who holds / is fetching which ranges (soft state, announcements expire).
* `discovery`: a tracker client or a static peer list.
* `backend`: `P2PBackend`, a `BlobBackend` trying peers before the registry.
* `service`: config and wiring for daemons (`P2PConfig`, `P2PService`, `build_p2p_storage`).
* `cli`: `nydus-peer tracker|status`.

Registry mirrors and HTTP proxies (nginx pull-through caches, Dragonfly
dfdaemon) are `rafs.storage` mirrors (`MirrorConfig`); `P2PBackend` sits in
front of them and counts their bytes per blob.
"""
from .backend import P2PBackend
from .discovery import StaticDiscovery, TrackerDiscovery
from .node import PeerNode
from .server import PeerServer
from .service import P2PCacheManager, P2PConfig, P2PService, build_p2p_storage
from .tracker import TrackerServer, TrackerState

__all__ = [
    "P2PBackend", "PeerNode", "PeerServer", "StaticDiscovery", "TrackerDiscovery",
    "TrackerServer", "TrackerState", "P2PCacheManager", "P2PConfig", "P2PService",
    "build_p2p_storage",
]
