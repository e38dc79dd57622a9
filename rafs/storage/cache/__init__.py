"""The blob cache of the lazy mount: verified chunks of each blob's uncompressed view, on disk.

`BlobCache` (one blob; `blobcache`) is put together from its seams, one module
each: `files` (the blob's cache files and their locks), `reader` (the read
path: fetch, verify through `rafs.blob.decode_chunk`, store), `flush` (which
chunks are ready, and the chunk-map flush), `state` (the `<blob_id>.chunkmap`
file format), `prefetch` (the background scheduler and the demand gate) and
`amplify` (how far a miss is widened), `evict` (the size limit: LRU eviction under a
budget shared by every process using one cache root). `CacheManager` (all blobs of a mount)
is in `manager`.
"""
from ..chunks import MAX_MERGE_GAP
from .blobcache import DEFAULT_MAX_INFLIGHT, DEFAULT_MERGE_SIZE, MERGE_SIZE_MAX, MERGE_SIZE_MIN, BlobCache
from .files import CacheClosed, CacheInUse
from .flush import DEFAULT_FLUSH_CHUNKS, DEFAULT_FLUSH_INTERVAL
from .manager import CacheManager
from .prefetch import DemandGate
from .state import ChunkMap, ChunkMapError

__all__ = [
    "BlobCache", "CacheManager", "CacheClosed", "CacheInUse", "DemandGate", "ChunkMap",
    "ChunkMapError", "DEFAULT_MERGE_SIZE", "DEFAULT_MAX_INFLIGHT", "MAX_MERGE_GAP",
    "MERGE_SIZE_MIN", "MERGE_SIZE_MAX", "DEFAULT_FLUSH_INTERVAL", "DEFAULT_FLUSH_CHUNKS",
]
