"""One error vocabulary for rafs; the CLI and FUSE edges translate it."""


class RafsError(Exception):
    """Base class of every error rafs raises on bad input or a failed backend."""


class FormatError(RafsError):
    """Bytes that are not a valid bootstrap, blob, TOC or footer (bad magic, bounds, sizes)."""


class IntegrityError(RafsError):
    """Data whose digest does not match the digest it is trusted by."""


class BackendError(RafsError):
    """A storage backend (registry, directory, peer) could not deliver the bytes asked for."""


class NotFound(BackendError):
    """The source does not have the blob, manifest or tag asked for at all (a registry's 404, a missing
    file): never retried; a mirror falls back to the origin."""
