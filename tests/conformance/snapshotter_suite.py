"""Checks every snapshotter must pass (containerd's snapshot semantics), over the interface.

Use: subclass `SnapshotterConformance` in a test module and provide a
`snapshotter_env` fixture returning a `SnapshotterEnv` (a fresh, empty
snapshotter plus a scratch dir for mount points), parametrized over the
implementations; ids then read `TestSnapshotterConformance::test_transitivity[grpc]`.

Checks that mount (views, layers, 128 lowers) need root; every mount is undone
in a finally block, even when the check fails.
"""
from __future__ import annotations

import errno
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from snapshotter.mounts import mount_all, unmount_all
from snapshotter.snapshots import Info, Kind

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")


@dataclass
class SnapshotterEnv:
    sn: object                      # the snapshotter (snapshotter.snapshots.Snapshotter interface)
    work: Path                      # scratch dir for mount points
    reopen: Callable[[], object] | None = None   # a second client of the same snapshotter, if any


@contextmanager
def mounted(mounts, where: Path):
    where.mkdir(parents=True, exist_ok=True)
    mount_all(mounts, where)
    try:
        yield where
    finally:
        unmount_all(where)


def _list(sn, filters=None) -> list[Info]:
    out: list[Info] = []
    sn.walk(out.append, filters)
    return out


def _names(sn, filters=None) -> set[str]:
    return {i.name for i in _list(sn, filters)}


def _layer(env: SnapshotterEnv, name: str, parent: str, files: dict[str, bytes],
           remove: tuple[str, ...] = (), labels: dict[str, str] | None = None) -> str:
    """prepare + write files (+ delete paths) + commit, like an unpack."""
    key = f"{name}-active"
    mounts = env.sn.prepare(key, parent)
    with mounted(mounts, env.work / f"m-{name}") as root:
        for rel, data in files.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        for rel in remove:
            p = root / rel
            if p.is_dir():
                import shutil
                shutil.rmtree(p)
            else:
                p.unlink()
    env.sn.commit(name, key, labels)
    return name


class SnapshotterConformance:
    """Named checks over the `snapshotter_env` fixture."""

    # -- lifecycle ------------------------------------------------------------------------
    @needs_root
    def test_lifecycle(self, snapshotter_env: SnapshotterEnv):
        env, sn = snapshotter_env, snapshotter_env.sn
        mounts = sn.prepare("prep-1", "")
        assert mounts and mounts[0].type == "bind" and "rw" in mounts[0].options
        with mounted(mounts, env.work / "a") as root:
            (root / "foo").write_bytes(b"foo\n")
            (root / "dir").mkdir()
            (root / "dir" / "bar").write_bytes(b"bar\n")
        sn.commit("layer-1", "prep-1")
        with pytest.raises(NotFound):
            sn.stat("prep-1")                       # the active key is gone after commit
        assert sn.stat("layer-1").kind == Kind.COMMITTED
        mounts = sn.prepare("prep-2", "layer-1")
        with mounted(mounts, env.work / "b") as root:
            assert (root / "foo").read_bytes() == b"foo\n"
            (root / "dir" / "bar").unlink()
            (root / "baz").write_bytes(b"baz\n")
        sn.commit("layer-2", "prep-2")
        with mounted(sn.view("view-2", "layer-2"), env.work / "c") as root:
            assert sorted(os.listdir(root)) == ["baz", "dir", "foo"]
            assert os.listdir(root / "dir") == []
        info = sn.stat("layer-2")
        assert (info.kind, info.parent) == (Kind.COMMITTED, "layer-1")
        sn.remove("view-2")
        sn.remove("layer-2")
        sn.remove("layer-1")
        assert _names(sn) == set()

    def test_stat_active(self, snapshotter_env: SnapshotterEnv):
        sn = snapshotter_env.sn
        before = time.time_ns()
        sn.prepare("active-1", "", {"l": "v"})
        after = time.time_ns()
        info = sn.stat("active-1")
        assert (info.name, info.parent, info.kind, info.labels) == ("active-1", "", Kind.ACTIVE, {"l": "v"})
        assert info.created_ns == info.updated_ns
        assert before <= info.created_ns <= after

    def test_stat_committed(self, snapshotter_env: SnapshotterEnv):
        sn = snapshotter_env.sn
        sn.prepare("k", "")
        sn.commit("c", "k", {"x": "1"})
        info = sn.stat("c")
        assert (info.name, info.parent, info.kind, info.labels) == ("c", "", Kind.COMMITTED, {"x": "1"})
        assert info.created_ns == info.updated_ns
        with pytest.raises(NotFound):
            sn.stat("does-not-exist")

    @needs_root
    def test_transitivity(self, snapshotter_env: SnapshotterEnv):
        env = snapshotter_env
        _layer(env, "a", "", {"a.txt": b"from a\n", "shared": b"a\n"})
        _layer(env, "b", "a", {"b.txt": b"from b\n", "shared": b"b\n"})
        _layer(env, "c", "b", {"c.txt": b"from c\n"}, remove=("a.txt",))
        with mounted(env.sn.view("v", "c"), env.work / "v") as root:
            assert sorted(os.listdir(root)) == ["b.txt", "c.txt", "shared"]
            assert (root / "shared").read_bytes() == b"b\n"
        assert env.sn.stat("c").parent == "b" and env.sn.stat("b").parent == "a"

    def test_prepare_view_conflicts(self, snapshotter_env: SnapshotterEnv):
        sn = snapshotter_env.sn
        sn.prepare("k1", "")
        with pytest.raises(AlreadyExists):
            sn.prepare("k1", "")
        with pytest.raises(AlreadyExists):
            sn.view("k1", "")
        with pytest.raises(NotFound):
            sn.prepare("k2", "no-such-parent")
        with pytest.raises(InvalidArgument):       # a parent must be committed
            sn.prepare("k3", "k1")
        with pytest.raises(InvalidArgument):
            sn.prepare("", "")
        sn.commit("c1", "k1")
        with pytest.raises(AlreadyExists):         # keys and names share one namespace
            sn.prepare("c1", "")
        assert _names(sn) == {"c1"}                # failed calls left nothing behind

    # -- commit ---------------------------------------------------------------------------
    def test_commit_semantics(self, snapshotter_env: SnapshotterEnv):
        sn = snapshotter_env.sn
        sn.prepare("k", "", {"from-prepare": "1"})
        sn.commit("c", "k", {"from-commit": "2"})
        assert sn.stat("c").labels == {"from-commit": "2"}        # commit replaces labels
        sn.view("v", "c")
        with pytest.raises(FailedPrecondition):
            sn.commit("c2", "v")                                   # a view never commits
        with pytest.raises(FailedPrecondition):
            sn.commit("c3", "c")                                   # nor does a committed one
        with pytest.raises(NotFound):
            sn.commit("c4", "missing")
        sn.prepare("k2", "c")
        with pytest.raises(AlreadyExists):
            sn.commit("c", "k2")                                   # name taken
        assert sn.stat("k2").kind == Kind.ACTIVE                   # and k2 is untouched
        sn.commit("c5", "k2")
        assert sn.stat("c5").parent == "c"

    def test_mounts_only_for_active_and_view(self, snapshotter_env: SnapshotterEnv):
        sn = snapshotter_env.sn
        sn.prepare("k", "")
        assert sn.mounts("k")[0].options[0] == "rw"
        sn.commit("c", "k")
        with pytest.raises(FailedPrecondition):
            sn.mounts("c")
        with pytest.raises(NotFound):
            sn.mounts("k")
        sn.prepare("k2", "c")
        m = sn.mounts("k2")[0]
        assert m.type == "overlay" and any(o.startswith("upperdir=") for o in m.options)

    # -- remove -------------------------------------------------------------------------
    def test_remove_with_children(self, snapshotter_env: SnapshotterEnv):
        sn = snapshotter_env.sn
        sn.prepare("k1", "")
        sn.commit("base", "k1")
        sn.prepare("k2", "base")
        sn.commit("mid", "k2")
        sn.prepare("top", "mid")
        with pytest.raises(FailedPrecondition):
            sn.remove("base")
        with pytest.raises(FailedPrecondition):
            sn.remove("mid")
        with pytest.raises(NotFound):
            sn.remove("missing")
        sn.remove("top")
        sn.remove("mid")
        sn.remove("base")
        with pytest.raises(NotFound):
            sn.remove("base")
        assert _names(sn) == set()
        sn.cleanup()                               # nothing left to clean, no error

    # -- walk / list -----------------------------------------------------------------------
    def test_walk_filters(self, snapshotter_env: SnapshotterEnv):
        sn = snapshotter_env.sn
        sn.prepare("k-base", "", {"containerd.io/snapshot.ref": "sha256:aaa", "team": "x"})
        sn.commit("sha256:aaa", "k-base", {"containerd.io/snapshot.ref": "sha256:aaa", "team": "x"})
        sn.prepare("k-child", "sha256:aaa")
        sn.commit("ns/2/sha256:bbb", "k-child", {"team": "y"})
        sn.prepare("active", "ns/2/sha256:bbb", {"team": "x"})
        sn.view("a view", "sha256:aaa")
        assert _names(sn) == {"sha256:aaa", "ns/2/sha256:bbb", "active", "a view"}
        assert _names(sn, ['parent==""']) == {"sha256:aaa"}
        assert _names(sn, ['parent=="sha256:aaa"']) == {"ns/2/sha256:bbb", "a view"}
        assert _names(sn, ["kind==committed"]) == {"sha256:aaa", "ns/2/sha256:bbb"}
        assert _names(sn, ["kind==view"]) == {"a view"}
        assert _names(sn, ["labels.team==x"]) == {"sha256:aaa", "active"}
        assert _names(sn, ["labels.team!=x"]) == {"ns/2/sha256:bbb", "a view"}
        assert _names(sn, ["labels.team"]) == {"sha256:aaa", "ns/2/sha256:bbb", "active"}
        # containerd's own remote-snapshot lookup (metadata/snapshot.go)
        assert _names(sn, ['labels."containerd.io/snapshot.ref"==sha256:aaa,parent==""']) == {"sha256:aaa"}
        assert _names(sn, ['labels."containerd.io/snapshot.ref"==sha256:aaa,parent=="x"']) == set()
        assert _names(sn, ["name~=^ns/", "kind==view"]) == {"ns/2/sha256:bbb", "a view"}   # OR of filters
        assert _names(sn, ['name~="b{3}$"']) == {"ns/2/sha256:bbb"}
        assert _names(sn, ['name=="a view"']) == {"a view"}
        for bad in ["labels.team===x", "kind==", '"unterminated', ",", "name~=("]:
            with pytest.raises(InvalidArgument):
                _list(sn, [bad])

    # -- update ----------------------------------------------------------------------------
    def test_update_masks(self, snapshotter_env: SnapshotterEnv):
        sn = snapshotter_env.sn
        sn.prepare("k", "", {"a": "1", "b": "2"})
        created = sn.stat("k")

        def upd(labels, paths):
            return sn.update(Info(name="k", labels=labels), paths)
        got = upd({"c": "3"}, [])
        assert got.labels == {"c": "3"}                            # no mask: replace all
        assert got.created_ns == created.created_ns and got.updated_ns > created.updated_ns
        assert upd({"d": "4", "c": "ignored"}, ["labels.d"]).labels == {"c": "3", "d": "4"}
        assert upd({}, ["labels.c"]).labels == {"d": "4"}          # empty value deletes
        assert upd({"e": "5"}, ["labels"]).labels == {"e": "5"}
        assert sn.stat("k").labels == {"e": "5"}
        for path in ["name", "parent", "kind", "created_at"]:
            with pytest.raises(InvalidArgument):
                upd({"e": "6"}, [path])
        assert sn.stat("k").labels == {"e": "5"}                   # a rejected update changes nothing
        with pytest.raises(NotFound):
            sn.update(Info(name="missing", labels={"x": "1"}), [])
        sn.commit("c", "k")
        assert sn.update(Info(name="c", labels={"z": "9"}), ["labels.z"]).labels == {"z": "9"}

    # -- views -----------------------------------------------------------------------------
    @needs_root
    def test_view_readonly(self, snapshotter_env: SnapshotterEnv):
        env = snapshotter_env
        _layer(env, "base", "", {"f": b"data\n"})
        _layer(env, "second", "base", {"g": b"more\n"})
        for key, parent in (("view-one", "base"), ("view-two", "second")):
            mounts = env.sn.view(key, parent)
            assert env.sn.stat(key).kind == Kind.VIEW
            with mounted(mounts, env.work / key) as root:
                assert (root / "f").read_bytes() == b"data\n"
                with pytest.raises(OSError) as ei:
                    (root / "new").write_bytes(b"x")
                assert ei.value.errno == errno.EROFS
        with mounted(env.sn.view("view-none", ""), env.work / "vn") as root:
            assert os.listdir(root) == []
            with pytest.raises(OSError):
                (root / "new").write_bytes(b"x")

    def test_usage(self, snapshotter_env: SnapshotterEnv):
        sn = snapshotter_env.sn
        sn.prepare("k", "")
        u = sn.usage("k")
        assert u.size >= 0 and u.inodes >= 0
        sn.commit("c", "k")
        assert sn.usage("c").size >= 0
        with pytest.raises(NotFound):
            sn.usage("missing")

    @needs_root
    def test_usage_counts_data(self, snapshotter_env: SnapshotterEnv):
        env = snapshotter_env
        mounts = env.sn.prepare("k", "")
        with mounted(mounts, env.work / "u") as root:
            (root / "big").write_bytes(os.urandom(256 * 1024))
        u = env.sn.usage("k")
        assert u.size >= 256 * 1024 and u.inodes >= 1
        env.sn.commit("c", "k")
        assert env.sn.usage("c").size == u.size

    # -- client lifetime --------------------------------------------------------------------
    def test_close_twice(self, snapshotter_env: SnapshotterEnv):
        env = snapshotter_env
        if env.reopen is None:                 # in-process: the snapshotter itself closes twice
            env.sn.prepare("k", "")
            env.sn.close()
            env.sn.close()
            return
        c = env.reopen()
        c.prepare("k", "")
        c.close()
        c.close()
        assert env.sn.stat("k").kind == Kind.ACTIVE   # the server is unaffected

    # -- many layers ----------------------------------------------------------------------
    @needs_root
    def test_128_layer_mount(self, snapshotter_env: SnapshotterEnv):
        env = snapshotter_env
        parent = ""
        for i in range(128):
            key = f"layer-{i}-active"
            mounts = env.sn.prepare(key, parent)
            if i == 0:
                with mounted(mounts, env.work / "l0") as root:
                    (root / "bottom").write_bytes(b"0\n")
            env.sn.commit(f"layer-{i}", key)
            parent = f"layer-{i}"
        # write one file into the top layer through its upperdir (cheaper than 127 more mounts)
        mounts = env.sn.prepare("top", parent)
        opts = mounts[0].options
        assert sum(o.startswith("lowerdir=") for o in opts) == 1
        assert len(next(o for o in opts if o.startswith("lowerdir=")).split(":")) == 128
        with mounted(mounts, env.work / "top") as root:
            assert (root / "bottom").read_bytes() == b"0\n"
            (root / "written").write_bytes(b"top\n")
            assert (root / "written").read_bytes() == b"top\n"
