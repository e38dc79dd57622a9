"""Local directory backend: blobs as files, read with pread (never a whole file).

A blob `<id>` (hex sha256) is looked up as

* `DIR/blobs/sha256/<id>`: an OCI image layout (what `nydusify convert
  --target oci:DIR` writes), or
* `DIR/<id>`: a plain directory of blobs (what nydusd's localfs backend uses).

Each read opens the file, preads the range and closes it again: no file
descriptor outlives a call, so a blob replaced on disk (or a directory on an
NFS mount that was remounted) is simply picked up, and there is no descriptor
table to bound or race on. Open + close cost microseconds next to a chunk
read. EIO / EAGAIN / ESTALE / ETIMEDOUT / EINTR are retried (`RetryPolicy`); a
missing file is `NotFound`; a read past the end is a `BackendError`.
"""
from __future__ import annotations

import errno
import os

from rafs.errors import BackendError, NotFound

from .base import BlobBackend, RetryPolicy, TransientBackendError

_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.ESTALE, errno.ETIMEDOUT, errno.EINTR}


class LocalFsBackend(BlobBackend):
    """Blobs in a local directory (OCI layout or plain); see the module docstring."""

    retry = RetryPolicy(retries=2, backoff=0.05, max_backoff=0.5, deadline=5.0)

    def __init__(self, directory: str | os.PathLike):
        super().__init__()
        self.dir = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(self.dir):
            raise BackendError(f"localfs backend: {self.dir} is not a directory")

    @property
    def name(self) -> str:
        return f"localfs {self.dir}"

    def candidates(self, blob_id: str) -> tuple[str, str]:
        """The paths where blob `blob_id` (normalised hex) may be, in lookup order."""
        return (os.path.join(self.dir, "blobs", "sha256", blob_id), os.path.join(self.dir, blob_id))

    def _open(self, blob_id: str) -> int:
        for path in self.candidates(blob_id):
            try:
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise self._error(e, f"open {path}") from e
        a, b = self.candidates(blob_id)
        raise NotFound(f"{self.name}: blob sha256:{blob_id} not found (looked for {a} and {b})")

    def _error(self, e: OSError, what: str) -> BackendError:
        cls = TransientBackendError if e.errno in _TRANSIENT_ERRNOS else BackendError
        return cls(f"{self.name}: {what}: {e.strerror or e}")

    def _read_range(self, blob_id: str, offset: int, size: int) -> bytes:
        fd = self._open(blob_id)
        try:
            parts = []
            got = 0
            while got < size:
                try:
                    b = os.pread(fd, size - got, offset + got)
                except OSError as e:
                    raise self._error(e, f"read blob sha256:{blob_id} at {offset + got}") from e
                if not b:
                    total = os.fstat(fd).st_size
                    raise BackendError(
                        f"{self.name}: read {size} bytes at offset {offset} of blob "
                        f"sha256:{blob_id}: the range runs past the end of the blob ({total} bytes)")
                parts.append(b)
                got += len(b)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        finally:
            os.close(fd)

    def _blob_size(self, blob_id: str) -> int:
        fd = self._open(blob_id)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)
