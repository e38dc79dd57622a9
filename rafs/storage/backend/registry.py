"""Registry backend: blob ranges by HTTP Range GETs through a `RegistryClient`.

Connection pooling, bounded timeouts, redirects (blob GETs are often
redirected to object storage), basic / bearer-token auth with refresh, and
retries with backoff of transient failures all come from the client
(`rafs.image.client`), so this backend does not retry again (`retry =
None`): the client's `retries`, `backoff` and `timeout` bound how long a read
of an unreachable registry takes (with the factory's defaults, a few seconds).
The client's 404 is `rafs.errors.NotFound`, the backends' own "no such blob".

A mirror or an HTTP proxy (Dragonfly dfdaemon, an nginx pull-through cache)
is a `RegistryBackend` too: a client for the mirror's host with the same
repository, or a client whose `requests.Session` has the proxy set; see
`rafs.storage.factory`.
"""
from __future__ import annotations

from rafs.errors import BackendError, NotFound
from rafs.image.client import RegistryClient

from .base import BlobBackend


class RegistryBackend(BlobBackend):
    """Blobs of one repository on one registry. Owns `client` unless `owns_client=False`."""

    retry = None                       # the client retries (with backoff) on its own

    def __init__(self, client: RegistryClient, *, label: str | None = None, owns_client: bool = True):
        super().__init__()
        self.client = client
        self._label = label or f"registry {client.name}"
        self._owns = owns_client

    @property
    def name(self) -> str:
        return self._label

    def _read_range(self, blob_id: str, offset: int, size: int) -> bytes:
        try:
            return self.client.read_range("sha256:" + blob_id, offset, size)
        except NotFound as e:
            raise NotFound(f"{self.name}: {e}") from None
        except BackendError as e:
            raise BackendError(f"{self.name}: {e}") from e

    def _blob_size(self, blob_id: str) -> int:
        try:
            size = self.client.head_blob("sha256:" + blob_id)
        except BackendError as e:
            raise BackendError(f"{self.name}: {e}") from e
        if size is None:
            raise NotFound(f"{self.name}: blob sha256:{blob_id} not found "
                           f"(HEAD {self.client.api}/{self.client.repo}/blobs/... answered 404)")
        return size

    def close(self) -> None:
        if self._owns:
            self.client.close()
