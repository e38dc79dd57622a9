"""gRPC handlers of ``containerd.services.snapshots.v1.Snapshots``: translation and error mapping only.

    server = serve(snapshotter, "/run/nydus-snapshotter/snapshotter.sock")
    ...
    server.stop(grace=2)
"""
from __future__ import annotations

import functools
import logging
import os
import time
from concurrent import futures

import grpc
from google.protobuf import empty_pb2

from . import errors
from .proto import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from .snapshots import Info, Kind, Snapshotter

log = logging.getLogger("nydus-snapshotter")

_CODES = [
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
]


def status_code(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.UNKNOWN


def _handler(fn):
    """Run a handler; map our errors to gRPC codes and log each call at debug level."""
    @functools.wraps(fn)
    def wrapper(self, request, context):
        t0 = time.monotonic()
        try:
            return fn(self, request, context)
        except errors.SnapshotterError as e:
            code = status_code(e)
            log.debug("%s -> %s: %s", fn.__name__, code.name, e)
            context.abort(code, str(e))
        except Exception as e:  # a bug or an OS error: UNKNOWN with the message
            log.exception("%s failed", fn.__name__)
            context.abort(grpc.StatusCode.UNKNOWN, f"{type(e).__name__}: {e}")
        finally:
            log.debug("%s %s (%.1f ms)", fn.__name__, _brief(request), (time.monotonic() - t0) * 1000)
    return wrapper


def _brief(request) -> str:
    parts = []
    for f in ("key", "name", "parent"):
        if hasattr(request, f) and getattr(request, f):
            parts.append(f"{f}={getattr(request, f)!r}")
    return " ".join(parts)


def _ts(msg, ns: int) -> None:
    msg.seconds, msg.nanos = divmod(ns, 1_000_000_000)


def info_to_pb(info: Info) -> snapshots_pb2.Info:
    pb = snapshots_pb2.Info(name=info.name, parent=info.parent, kind=int(info.kind), labels=info.labels)
    _ts(pb.created_at, info.created_ns)
    _ts(pb.updated_at, info.updated_ns)
    return pb


def info_from_pb(pb) -> Info:
    return Info(name=pb.name, parent=pb.parent, kind=Kind(pb.kind), labels=dict(pb.labels),
                created_ns=pb.created_at.seconds * 1_000_000_000 + pb.created_at.nanos,
                updated_ns=pb.updated_at.seconds * 1_000_000_000 + pb.updated_at.nanos)


def _mounts_pb(mounts) -> list:
    return [mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options) for m in mounts]


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, sn: Snapshotter):
        self.sn = sn

    @_handler
    def Prepare(self, request, context):
        mounts = self.sn.prepare(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts_pb(mounts))

    @_handler
    def View(self, request, context):
        mounts = self.sn.view(request.key, request.parent, dict(request.labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts_pb(mounts))

    @_handler
    def Mounts(self, request, context):
        return snapshots_pb2.MountsResponse(mounts=_mounts_pb(self.sn.mounts(request.key)))

    @_handler
    def Commit(self, request, context):
        self.sn.commit(request.name, request.key, dict(request.labels))
        return empty_pb2.Empty()

    @_handler
    def Remove(self, request, context):
        self.sn.remove(request.key)
        return empty_pb2.Empty()

    @_handler
    def Stat(self, request, context):
        return snapshots_pb2.StatSnapshotResponse(info=info_to_pb(self.sn.stat(request.key)))

    @_handler
    def Update(self, request, context):
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = self.sn.update(info_from_pb(request.info), paths)
        return snapshots_pb2.UpdateSnapshotResponse(info=info_to_pb(info))

    @_handler
    def List(self, request, context):
        infos: list[Info] = []
        self.sn.walk(infos.append, list(request.filters))
        # containerd's own service sends batches; 100 infos per message stays far below 4 MiB
        return iter([snapshots_pb2.ListSnapshotsResponse(info=[info_to_pb(i) for i in infos[k:k + 100]])
                     for k in range(0, len(infos), 100)])

    @_handler
    def Usage(self, request, context):
        u = self.sn.usage(request.key)
        return snapshots_pb2.UsageResponse(size=u.size, inodes=u.inodes)

    @_handler
    def Cleanup(self, request, context):
        self.sn.cleanup()
        return empty_pb2.Empty()


def serve(sn: Snapshotter, address: str, *, workers: int = 16) -> grpc.Server:
    """Listen on the unix socket ``address`` (a stale socket file is replaced)."""
    address = os.path.abspath(address)
    binding = address + "~"
    if len(os.fsencode(binding)) > 107:
        raise ValueError(f"socket path {address} is {len(os.fsencode(address))} bytes; at most 106 fit "
                         "(unix sockets allow 107, and it is bound as PATH~ first)")
    os.makedirs(os.path.dirname(address), exist_ok=True)
    for stale in (address, binding):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                         options=[("grpc.max_receive_message_length", 16 << 20),
                                  ("grpc.max_send_message_length", 16 << 20)])
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsService(sn), server)
    # Bind under a temporary name and rename once serving: the socket path appears only when a connect
    # succeeds, so whoever waits for it (containerd, scripts, tests) never meets ECONNREFUSED.
    server.add_insecure_port(f"unix://{binding}")
    server.start()
    os.rename(binding, address)
    return server
