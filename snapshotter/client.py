"""A Snapshots API client with the snapshotter interface (containerd's ``snapshots/proxy``).

Talks to our server, or to containerd's own Snapshots service (then
``snapshotter`` names the plugin and ``namespace`` the containerd namespace):

    with SnapshotsClient.connect("/run/nydus-snapshotter/snapshotter.sock") as sn:
        mounts = sn.prepare("k", "")
        sn.commit("layer1", "k")

gRPC errors come back as the classes of ``snapshotter.errors``.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import grpc
from google.protobuf import field_mask_pb2

from .errors import from_grpc
from .mounts import Mount
from .proto import snapshots_pb2, snapshots_pb2_grpc
from .service import info_from_pb, info_to_pb
from .snapshots import Info, Usage


def unix_channel(address: str) -> grpc.Channel:
    target = address if address.startswith("unix:") else f"unix://{os.path.abspath(address)}"
    return grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 16 << 20),
                                                  ("grpc.max_send_message_length", 16 << 20)])


def _native_errors(fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except grpc.RpcError as e:
            raise from_grpc(e) from None
    return wrapper


class SnapshotsClient:
    def __init__(self, channel: grpc.Channel, snapshotter: str = "nydus", *, namespace: str | None = None,
                 lease: str | None = None, timeout: float | None = 120.0, own_channel: bool = False):
        self.channel = channel
        self.name = snapshotter
        self.stub = snapshots_pb2_grpc.SnapshotsStub(channel)
        self.metadata = []
        if namespace:
            self.metadata.append(("containerd-namespace", namespace))
        if lease:
            self.metadata.append(("containerd-lease", lease))
        self.timeout = timeout
        self._own = own_channel
        self._closed = False

    @classmethod
    def connect(cls, address: str, snapshotter: str = "nydus", **kw) -> "SnapshotsClient":
        return cls(unix_channel(address), snapshotter, own_channel=True, **kw)

    def __enter__(self) -> "SnapshotsClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Idempotent (containerd's suite checks CloseTwice)."""
        if not self._closed:
            self._closed = True
            if self._own:
                self.channel.close()

    def _kw(self) -> dict:
        return {"metadata": self.metadata, "timeout": self.timeout}

    @_native_errors
    def stat(self, key: str) -> Info:
        r = self.stub.Stat(snapshots_pb2.StatSnapshotRequest(snapshotter=self.name, key=key), **self._kw())
        return info_from_pb(r.info)

    @_native_errors
    def update(self, info: Info, fieldpaths: list[str] | None = None) -> Info:
        req = snapshots_pb2.UpdateSnapshotRequest(snapshotter=self.name, info=info_to_pb(info))
        if fieldpaths:
            req.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=list(fieldpaths)))
        return info_from_pb(self.stub.Update(req, **self._kw()).info)

    @_native_errors
    def usage(self, key: str) -> Usage:
        r = self.stub.Usage(snapshots_pb2.UsageRequest(snapshotter=self.name, key=key), **self._kw())
        return Usage(r.size, r.inodes)

    @_native_errors
    def mounts(self, key: str) -> list[Mount]:
        r = self.stub.Mounts(snapshots_pb2.MountsRequest(snapshotter=self.name, key=key), **self._kw())
        return _mounts(r.mounts)

    @_native_errors
    def prepare(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Mount]:
        r = self.stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(snapshotter=self.name, key=key, parent=parent,
                                                                   labels=labels or {}), **self._kw())
        return _mounts(r.mounts)

    @_native_errors
    def view(self, key: str, parent: str = "", labels: dict[str, str] | None = None) -> list[Mount]:
        r = self.stub.View(snapshots_pb2.ViewSnapshotRequest(snapshotter=self.name, key=key, parent=parent,
                                                             labels=labels or {}), **self._kw())
        return _mounts(r.mounts)

    @_native_errors
    def commit(self, name: str, key: str, labels: dict[str, str] | None = None) -> None:
        self.stub.Commit(snapshots_pb2.CommitSnapshotRequest(snapshotter=self.name, name=name, key=key,
                                                             labels=labels or {}), **self._kw())

    @_native_errors
    def remove(self, key: str) -> None:
        self.stub.Remove(snapshots_pb2.RemoveSnapshotRequest(snapshotter=self.name, key=key), **self._kw())

    @_native_errors
    def walk(self, fn: Callable[[Info], None], filters: list[str] | None = None) -> None:
        req = snapshots_pb2.ListSnapshotsRequest(snapshotter=self.name, filters=list(filters or []))
        for resp in self.stub.List(req, **self._kw()):
            for pb in resp.info:
                fn(info_from_pb(pb))

    def list(self, filters: list[str] | None = None) -> list[Info]:
        out: list[Info] = []
        self.walk(out.append, filters)
        return out

    @_native_errors
    def cleanup(self) -> None:
        self.stub.Cleanup(snapshots_pb2.CleanupRequest(snapshotter=self.name), **self._kw())


def _mounts(pbs) -> list[Mount]:
    return [Mount(m.type, m.source, list(m.options), m.target) for m in pbs]
