"""nydus-snapshotter on its own (no containerd): the conformance suite over both the in-process
core and the gRPC server, plus checks only the gRPC server or the lazy path have.

containerd's Go conformance suite runs in test_snapshotter_gosuite.py; the
containerd-driven tests in test_containerd*.py.
"""
from __future__ import annotations

import os

import pytest

from snapshotter.core import NydusSnapshotter
from snapshotter.errors import AlreadyExists, NotFound
from snapshotter.snapshots import (LABEL_CRI_IMAGE_REF, LABEL_NYDUS_BLOB, LABEL_REMOTE, LABEL_SNAPSHOT_REF,
                                   Kind)
from tests.conformance.snapshotter_suite import SnapshotterConformance, SnapshotterEnv
from testbed.containerd import SnapshotterProcess, unmount_under


@pytest.fixture(params=["inprocess", "grpc"])
def snapshotter_env(request, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    if request.param == "inprocess":
        sn = NydusSnapshotter(tmp_path / "root")
        try:
            yield SnapshotterEnv(sn, work)
        finally:
            sn.close()
            unmount_under(tmp_path)
        return
    proc = SnapshotterProcess(tmp_path / "snap", log_level="info")
    clients = []
    try:
        proc.start()
        sn = proc.client()
        clients.append(sn)

        def reopen():
            c = proc.client()
            clients.append(c)
            return c
        yield SnapshotterEnv(sn, work, reopen)
    finally:
        for c in clients:
            c.close()
        unmount_under(tmp_path)
        proc.teardown()


class TestSnapshotterConformance(SnapshotterConformance):
    pass


# -- gRPC server specifics ----------------------------------------------------------------------

@pytest.fixture
def server(tmp_path):
    proc = SnapshotterProcess(tmp_path / "snap", log_level="info")
    try:
        yield proc.start()
    finally:
        proc.teardown()


def test_state_survives_restart(server):
    with server.client() as sn:
        sn.prepare("k1", "", {"a": "1"})
        sn.commit("c1", "k1", {"b": "2"})
        sn.prepare("ns/3/container", "c1")
        before = {i.name: i for i in sn.list()}
        mounts_before = sn.mounts("ns/3/container")
    server.restart()
    with server.client() as sn:
        after = {i.name: i for i in sn.list()}
        assert after == before
        # an active snapshot on a committed parent: an overlay of the parent's dir, the same after the restart
        mounts = sn.mounts("ns/3/container")
        assert [m.to_dict() for m in mounts] == [m.to_dict() for m in mounts_before]
        assert len(mounts) == 1 and mounts[0].type == "overlay", mounts
        opts = dict(o.split("=", 1) for o in mounts[0].options if "=" in o)
        assert {"lowerdir", "upperdir", "workdir"} <= set(opts), mounts[0].options
        assert os.path.isdir(opts["lowerdir"]) and os.path.isdir(opts["upperdir"])
        sn.remove("ns/3/container")
        sn.remove("c1")


def test_cleanup_removes_orphan_dirs(server):
    snaps = server.root / "snapshots"
    with server.client() as sn:
        sn.prepare("k", "")
        (snaps / "new-crashed").mkdir()          # a create interrupted by a crash
        (snaps / "999").mkdir()                  # a dir no row owns
        sn.cleanup()
        assert sorted(os.listdir(snaps)) == ["1"]


def test_list_streams_many(server):
    with server.client() as sn:
        for i in range(250):
            sn.prepare(f"k{i}", "")
        assert len(sn.list()) == 250
        assert len(sn.list(["name~=^k1"])) == 1 + 10 + 100


def test_grpc_codes(server):
    import grpc
    from snapshotter.proto import snapshots_pb2, snapshots_pb2_grpc
    from snapshotter.client import unix_channel
    ch = unix_channel(server.address)
    stub = snapshots_pb2_grpc.SnapshotsStub(ch)
    try:
        stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key="a"))
        cases = [
            (lambda: stub.Stat(snapshots_pb2.StatSnapshotRequest(key="nope")), grpc.StatusCode.NOT_FOUND),
            (lambda: stub.Prepare(snapshots_pb2.PrepareSnapshotRequest(key="a")), grpc.StatusCode.ALREADY_EXISTS),
            (lambda: stub.Commit(snapshots_pb2.CommitSnapshotRequest(name="c", key="nope")),
             grpc.StatusCode.NOT_FOUND),
            (lambda: list(stub.List(snapshots_pb2.ListSnapshotsRequest(filters=["kind=="]))),
             grpc.StatusCode.INVALID_ARGUMENT),
        ]
        stub.View(snapshots_pb2.ViewSnapshotRequest(key="v"))
        cases.append((lambda: stub.Commit(snapshots_pb2.CommitSnapshotRequest(name="c", key="v")),
                      grpc.StatusCode.FAILED_PRECONDITION))
        for call, code in cases:
            with pytest.raises(grpc.RpcError) as ei:
                call()
            assert ei.value.code() == code, ei.value.details()
    finally:
        ch.close()


# -- lazy path without containerd ------------------------------------------------------------------

def test_remote_prepare_needs_the_ref_label(tmp_path):
    """AlreadyExists is the answer only with containerd.io/snapshot.ref + a nydus blob + an image ref."""

    class NoMounts:
        def ensure(self, *a):
            raise AssertionError("no mount expected")

        def release(self, sid):
            pass

        def cleanup(self, live):
            pass

        def recover(self, wanted):
            pass

    sn = NydusSnapshotter(tmp_path / "root", lazy=NoMounts())
    try:
        blob = {LABEL_NYDUS_BLOB: "true", LABEL_CRI_IMAGE_REF: "127.0.0.1:5000/x:1"}
        sn.prepare("ns/1/extract a", "", blob)               # no snapshot.ref: an ordinary prepare
        assert sn.stat("ns/1/extract a").kind == Kind.ACTIVE
        with pytest.raises(AlreadyExists):
            sn.prepare("ns/2/extract b", "", {**blob, LABEL_SNAPSHOT_REF: "sha256:c1"})
        info = sn.stat("sha256:c1")
        assert info.kind == Kind.COMMITTED and info.labels[LABEL_REMOTE]
        with pytest.raises(NotFound):
            sn.stat("ns/2/extract b")                        # only the committed target remains
        with pytest.raises(AlreadyExists):                   # the same layer again (another namespace)
            sn.prepare("ns2/9/extract c", "", {**blob, LABEL_SNAPSHOT_REF: "sha256:c1"})
        with pytest.raises(AlreadyExists):                   # next layer: parent in the bare chain-id form
            sn.prepare("ns/3/extract d", "sha256:c1", {**blob, LABEL_SNAPSHOT_REF: "sha256:c2"})
        assert sn.stat("sha256:c2").parent == "sha256:c1"
        found = []
        sn.walk(found.append, ['labels."containerd.io/snapshot.ref"==sha256:c2,parent=="sha256:c1"'])
        assert [i.name for i in found] == ["sha256:c2"]
        # an ordinary layer with the ref label is prepared normally (containerd downloads it)
        sn.prepare("ns/4/extract e", "", {LABEL_SNAPSHOT_REF: "sha256:d1", LABEL_CRI_IMAGE_REF: "r/x:1"})
        assert sn.stat("ns/4/extract e").kind == Kind.ACTIVE
    finally:
        sn.close()
