"""The blob cache of the lazy mount: verified chunks of each blob's uncompressed view, on disk.

`BlobCache` (one blob), `CacheManager` (all blobs of a mount) in `blobcache`;
the persistent per-chunk ready-state (`<blob_id>.chunkmap`) in `state`.
"""
from ..chunks import MAX_MERGE_GAP
from .blobcache import (DEFAULT_MAX_INFLIGHT, DEFAULT_MERGE_SIZE, BlobCache, CacheClosed,
                        CacheInUse, CacheManager, DemandGate)
from .state import ChunkMap, ChunkMapError

__all__ = [
    "BlobCache", "CacheManager", "CacheClosed", "CacheInUse", "DemandGate", "ChunkMap",
    "ChunkMapError", "DEFAULT_MERGE_SIZE", "DEFAULT_MAX_INFLIGHT", "MAX_MERGE_GAP",
]
