"""Storage backends: where the lazy mount gets blob bytes from (see `base.BlobBackend`).

`LocalFsBackend` (a directory or OCI layout), `RegistryBackend` (HTTP Range
GETs through `rafs.storage.registry.RegistryClient`) and `MirrorBackend`
(mirrors / HTTP proxies first, then the origin). Build them from config with
`rafs.storage.factory`.
"""
from .base import (BlobBackend, BlobNotFound, RetryPolicy, TransientBackendError,
                   normalize_blob_id)
from .localfs import LocalFsBackend
from .mirror import MirrorBackend
from .registry import RegistryBackend

__all__ = [
    "BlobBackend", "BlobNotFound", "RetryPolicy", "TransientBackendError", "normalize_blob_id",
    "LocalFsBackend", "MirrorBackend", "RegistryBackend",
]
