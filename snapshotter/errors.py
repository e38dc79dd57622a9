"""One error vocabulary for the snapshotter, mirroring containerd's errdefs.

Core code raises these with context ("snapshot %r: ..."); only the edges
translate them: ``service.py`` to gRPC status codes, the CLI to exit messages,
and ``rpull.py`` back from gRPC status codes (``from_grpc``).
"""
from __future__ import annotations


class SnapshotterError(Exception):
    """Base class; also what an unclassified failure becomes (gRPC UNKNOWN)."""


class NotFound(SnapshotterError):
    """No snapshot (or parent, image, mount) by that name."""


class AlreadyExists(SnapshotterError):
    """The key or name is taken; for a Prepare with ``containerd.io/snapshot.ref``,
    the target snapshot exists (possibly just created remotely)."""


class FailedPrecondition(SnapshotterError):
    """The operation is not valid in the snapshot's state (commit of a view, remove with children)."""


class InvalidArgument(SnapshotterError):
    """A malformed request: empty key, bad filter, unsupported update field, parent not committed."""


class Unavailable(SnapshotterError):
    """A dependency (mount daemon, registry, containerd) cannot be reached right now."""


def from_grpc(err) -> Exception:
    """A grpc.RpcError from a containerd API as one of our classes (same message)."""
    import grpc
    code = err.code() if hasattr(err, "code") else None
    msg = err.details() if hasattr(err, "details") else str(err)
    cls = {
        grpc.StatusCode.NOT_FOUND: NotFound,
        grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
        grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
        grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
        grpc.StatusCode.UNAVAILABLE: Unavailable,
    }.get(code, SnapshotterError)
    return cls(msg)
