"""Storage backends: where the lazy mount gets blob bytes from (see `base.BlobBackend`).

`LocalFsBackend` (a directory or OCI layout), `RegistryBackend` (HTTP Range
GETs through `rafs.image.client.RegistryClient`) and `MirrorBackend`
(mirrors / HTTP proxies first, then the origin). Build them from config with
`rafs.storage.factory`. A blob a backend does not have is `rafs.errors.NotFound`.
"""
from .base import BlobBackend, RetryPolicy, TransientBackendError
from .localfs import LocalFsBackend
from .mirror import MirrorBackend
from .registry import RegistryBackend

__all__ = [
    "BlobBackend", "RetryPolicy", "TransientBackendError",
    "LocalFsBackend", "MirrorBackend", "RegistryBackend",
]
