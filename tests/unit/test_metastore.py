"""The snapshotter's metadata store (snapshotter/metastore.py) on its own: a real SQLite file per test.

What its API promises: snapshots created / committed / updated / removed with the lifecycle rules of
snapshotter/snapshots.py and the error classes of snapshotter/errors.py; ids never reused (a dir of a
removed snapshot is never a new one's); one transaction per change (an exception rolls back, nested
use joins the outer one); everything survives closing and reopening; the lazy side's rows (RAFS
mounts, their users, image status); and a file that is not its database is refused at open,
naming the file.
"""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from snapshotter import metastore as ms
from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from snapshotter.filters import compile_filters
from snapshotter.snapshots import LABEL_MAX_BYTES, Info, Kind


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "meta" / "metadata.db"


@pytest.fixture
def store(db_path):
    db_path.parent.mkdir(parents=True, exist_ok=True)
    s = ms.MetaStore(db_path)
    yield s
    s.close()


def _layer(store, key: str, parent: str = "", labels=None, name: str | None = None) -> int:
    """An active snapshot committed as `name` (default: `key` + "-c"); returns its id."""
    with store.transaction(write=True) as tx:
        ms.create(tx, Kind.ACTIVE, key, parent, labels)
        return ms.commit(tx, key, name or key + "-c", labels)


def _names(store, match=None) -> list[str]:
    out: list[Info] = []
    with store.transaction() as tx:
        ms.walk(tx, out.append, match)
    return [i.name for i in out]


# --------------------------------------------------------------------------- create / get

def test_create_then_get(store):
    before = time.time_ns()
    with store.transaction(write=True) as tx:
        snap = ms.create(tx, Kind.ACTIVE, "a", "", {"x": "1"})
    with store.transaction() as tx:
        sid, info = ms.get_info(tx, "a")
    assert sid == snap.id and snap.kind == Kind.ACTIVE and snap.parent_ids == []
    assert (info.name, info.parent, info.kind, info.labels) == ("a", "", Kind.ACTIVE, {"x": "1"})
    assert before <= info.created_ns == info.updated_ns <= time.time_ns()


def test_get_of_a_missing_key_is_not_found(store):
    with store.transaction() as tx:
        with pytest.raises(NotFound, match="'nope'"):
            ms.get_info(tx, "nope")
        assert ms.find_info(tx, "nope") is None
        assert ms.info_by_id(tx, 12345) is None
        with pytest.raises(NotFound):
            ms.get_snapshot(tx, "nope")
        with pytest.raises(NotFound):
            ms.usage(tx, "nope")


@pytest.mark.parametrize("kind", [Kind.COMMITTED, Kind.UNKNOWN])
def test_only_active_and_view_snapshots_are_created(store, kind):
    with store.transaction(write=True) as tx:
        with pytest.raises(InvalidArgument):
            ms.create(tx, kind, "k", "", None)


def test_create_refuses_empty_key_taken_key_and_bad_parents(store):
    _layer(store, "base", name="base-c")
    with store.transaction(write=True) as tx:
        ms.create(tx, Kind.ACTIVE, "active", "", None)
        with pytest.raises(InvalidArgument):
            ms.create(tx, Kind.ACTIVE, "", "", None)
        with pytest.raises(AlreadyExists):
            ms.create(tx, Kind.VIEW, "active", "", None)
        with pytest.raises(AlreadyExists):            # keys and names share one namespace
            ms.create(tx, Kind.ACTIVE, "base-c", "", None)
        with pytest.raises(NotFound, match="missing parent"):
            ms.create(tx, Kind.ACTIVE, "child", "no-such-parent", None)
        with pytest.raises(InvalidArgument, match="not committed"):
            ms.create(tx, Kind.ACTIVE, "child", "active", None)
    assert sorted(_names(store)) == ["active", "base-c"]


def test_parent_chain_nearest_first(store):
    a = _layer(store, "a")
    b = _layer(store, "b", parent="a-c")
    c = _layer(store, "c", parent="b-c")
    with store.transaction(write=True) as tx:
        snap = ms.create(tx, Kind.VIEW, "view", "c-c", None)
        assert snap.parent_ids == [c, b, a]
        got = ms.get_snapshot(tx, "view")
        assert (got.id, got.kind, got.parent_ids) == (snap.id, Kind.VIEW, [c, b, a])
        assert ms.parent_ids(tx, b) == [a]
        _, info = ms.get_info(tx, "view")
        assert info.parent == "c-c"
        with pytest.raises(FailedPrecondition):     # mounts of a committed snapshot
            ms.get_snapshot(tx, "c-c")


# --------------------------------------------------------------------------- commit

def test_commit_keeps_the_id_and_replaces_key_labels_and_times(store):
    with store.transaction(write=True) as tx:
        sid = ms.create(tx, Kind.ACTIVE, "key", "", {"old": "1"}).id
    time.sleep(0.002)
    with store.transaction(write=True) as tx:
        assert ms.commit(tx, "key", "name", {"new": "2"}, usage=(4096, 3)) == sid
    with store.transaction() as tx:
        assert ms.find_info(tx, "key") is None
        got, info = ms.get_info(tx, "name")
        assert got == sid and info.kind == Kind.COMMITTED and info.labels == {"new": "2"}
        assert info.created_ns == info.updated_ns
        assert ms.usage(tx, "name") == (sid, Kind.COMMITTED, 4096, 3)


def test_commit_refuses(store):
    _layer(store, "base", name="base-c")
    with store.transaction(write=True) as tx:
        ms.create(tx, Kind.VIEW, "view", "base-c", None)
        ms.create(tx, Kind.ACTIVE, "active", "", None)
        with pytest.raises(NotFound):
            ms.commit(tx, "missing", "x", None)
        with pytest.raises(FailedPrecondition):
            ms.commit(tx, "view", "x", None)
        with pytest.raises(FailedPrecondition):
            ms.commit(tx, "base-c", "x", None)
        with pytest.raises(AlreadyExists):
            ms.commit(tx, "active", "base-c", None)
        with pytest.raises(InvalidArgument):
            ms.commit(tx, "active", "", None)
        _, info = ms.get_info(tx, "active")
        assert info.kind == Kind.ACTIVE


def test_usage_of_an_active_snapshot_is_unknown(store):
    with store.transaction(write=True) as tx:
        sid = ms.create(tx, Kind.ACTIVE, "a", "", None).id
        assert ms.usage(tx, "a") == (sid, Kind.ACTIVE, -1, -1)


# --------------------------------------------------------------------------- labels / update

def test_update_label_paths(store):
    with store.transaction(write=True) as tx:
        ms.create(tx, Kind.ACTIVE, "a", "", {"keep": "k", "drop": "d", "change": "c"})
    with store.transaction(write=True) as tx:
        out = ms.update_info(tx, Info("a", labels={"change": "C", "add": "A", "drop": ""}),
                             ["labels.change", "labels.add", "labels.drop"])
    assert out.labels == {"keep": "k", "change": "C", "add": "A"}
    with store.transaction() as tx:
        assert ms.get_info(tx, "a")[1].labels == out.labels


def test_update_labels_or_no_path_replaces_all_labels(store):
    with store.transaction(write=True) as tx:
        ms.create(tx, Kind.ACTIVE, "a", "", {"x": "1"})
        ms.create(tx, Kind.ACTIVE, "b", "", {"x": "1"})
        assert ms.update_info(tx, Info("a", labels={"y": "2", "empty": ""}), ["labels"]).labels == {"y": "2"}
        assert ms.update_info(tx, Info("b", labels={"z": "3"}), []).labels == {"z": "3"}


def test_update_bumps_updated_only(store):
    with store.transaction(write=True) as tx:
        ms.create(tx, Kind.ACTIVE, "a", "", None)
        _, before = ms.get_info(tx, "a")
        for i in range(3):                                # strictly later each time, even within a tick
            out = ms.update_info(tx, Info("a", labels={"n": str(i)}), ["labels.n"])
            assert out.updated_ns > before.updated_ns and out.created_ns == before.created_ns
            before = out


@pytest.mark.parametrize("path", ["name", "parent", "kind", "created_at", "labelsx"])
def test_update_of_other_fields_is_invalid(store, path):
    with store.transaction(write=True) as tx:
        ms.create(tx, Kind.ACTIVE, "a", "", {"x": "1"})
    with pytest.raises(InvalidArgument):
        with store.transaction(write=True) as tx:
            ms.update_info(tx, Info("a", labels={}), [path])
    with store.transaction() as tx:
        assert ms.get_info(tx, "a")[1].labels == {"x": "1"}


def test_update_of_a_missing_snapshot_is_not_found(store):
    with store.transaction(write=True) as tx:
        with pytest.raises(NotFound):
            ms.update_info(tx, Info("nope", labels={"a": "b"}), [])


def test_label_size_limit_and_empty_key(store):
    big = {"k": "v" * (LABEL_MAX_BYTES - 1)}          # key + value = exactly the limit: fine
    with store.transaction(write=True) as tx:
        ms.create(tx, Kind.ACTIVE, "ok", "", big)
        with pytest.raises(InvalidArgument, match="maximum size"):
            ms.create(tx, Kind.ACTIVE, "too-big", "", {"k": "v" * LABEL_MAX_BYTES})
        with pytest.raises(InvalidArgument):
            ms.create(tx, Kind.ACTIVE, "empty-key", "", {"": "v"})
        with pytest.raises(InvalidArgument, match="maximum size"):
            ms.update_info(tx, Info("ok", labels={"k2": "v" * LABEL_MAX_BYTES}), ["labels.k2"])


def test_set_labels_does_not_bump_updated(store):
    with store.transaction(write=True) as tx:
        sid = ms.create(tx, Kind.ACTIVE, "a", "", None).id
        _, before = ms.get_info(tx, "a")
        ms.set_labels(tx, sid, {"marker": "yes"})
        _, after = ms.get_info(tx, "a")
    assert after.labels == {"marker": "yes"} and after.updated_ns == before.updated_ns


# --------------------------------------------------------------------------- remove

def test_remove(store):
    base = _layer(store, "base", name="base-c")
    with store.transaction(write=True) as tx:
        child = ms.create(tx, Kind.ACTIVE, "child", "base-c", None).id
        with pytest.raises(FailedPrecondition, match="child"):
            ms.remove(tx, "base-c")
        assert ms.remove(tx, "child") == (child, Kind.ACTIVE)
        assert ms.remove(tx, "base-c") == (base, Kind.COMMITTED)
        with pytest.raises(NotFound):
            ms.remove(tx, "base-c")
    assert _names(store) == []


def test_ids_are_never_reused(store, db_path):
    with store.transaction(write=True) as tx:
        first = ms.create(tx, Kind.ACTIVE, "a", "", None).id
        ms.create(tx, Kind.ACTIVE, "b", "", None)
    with store.transaction(write=True) as tx:
        ms.remove(tx, "b")                     # the highest id goes
        ms.remove(tx, "a")
    store.close()
    again = ms.MetaStore(db_path)              # not even after a restart
    try:
        with again.transaction(write=True) as tx:
            new = ms.create(tx, Kind.ACTIVE, "a", "", None).id
        assert new > first + 1
    finally:
        again.close()


# --------------------------------------------------------------------------- walk and friends

def test_walk_in_id_order_with_a_filter(store):
    _layer(store, "base", labels={"tier": "base"}, name="base-c")
    with store.transaction(write=True) as tx:
        ms.create(tx, Kind.ACTIVE, "work", "base-c", {"tier": "top"})
        ms.create(tx, Kind.VIEW, "look", "base-c", None)
    assert _names(store) == ["base-c", "work", "look"]
    assert _names(store, compile_filters(["kind==committed"])) == ["base-c"]
    assert _names(store, compile_filters(["parent==base-c,labels.tier"])) == ["work"]
    assert _names(store, compile_filters(['parent==""', "kind==view"])) == ["base-c", "look"]


def test_id_map_children_and_active_descendants(store):
    a = _layer(store, "a")
    b = _layer(store, "b", parent="a-c")
    with store.transaction(write=True) as tx:
        act = ms.create(tx, Kind.ACTIVE, "act", "b-c", None).id
        view = ms.create(tx, Kind.VIEW, "view", "a-c", None).id
        assert ms.id_map(tx) == {a: "a-c", b: "b-c", act: "act", view: "view"}
        assert sorted(ms.children_of(tx, a)) == sorted([b, view])
        assert ms.children_of(tx, act) == []
        assert sorted(ms.descendants_active(tx, a)) == sorted([act, view])
        assert ms.descendants_active(tx, b) == [act]
        assert ms.descendants_active(tx, act) == []


# --------------------------------------------------------------------------- transactions

def test_an_exception_rolls_the_transaction_back(store):
    with pytest.raises(RuntimeError, match="filesystem work failed"):
        with store.transaction(write=True) as tx:
            ms.create(tx, Kind.ACTIVE, "a", "", None)
            raise RuntimeError("filesystem work failed")
    assert _names(store) == []


def test_nested_transactions_join_the_outer_one(store):
    with pytest.raises(ValueError):
        with store.transaction(write=True) as outer:
            ms.create(outer, Kind.ACTIVE, "a", "", None)
            with store.transaction(write=True) as inner:     # no commit of its own
                ms.create(inner, Kind.ACTIVE, "b", "", None)
            raise ValueError("later")
    assert _names(store) == []
    with store.transaction(write=True) as outer:
        with store.transaction() as inner:
            ms.create(inner, Kind.ACTIVE, "c", "", None)
    assert _names(store) == ["c"]


def test_a_failed_change_leaves_the_rest_of_the_transaction(store):
    with store.transaction(write=True) as tx:
        ms.create(tx, Kind.ACTIVE, "a", "", None)
        with pytest.raises(AlreadyExists):
            ms.create(tx, Kind.ACTIVE, "a", "", None)
        ms.create(tx, Kind.ACTIVE, "b", "", None)
    assert _names(store) == ["a", "b"]


def test_threads_get_exclusive_transactions(store):
    with store.transaction(write=True) as tx:
        ms.create(tx, Kind.ACTIVE, "counter", "", {"n": "0"})
    errors = []

    def bump():
        try:
            for _ in range(20):
                with store.transaction(write=True) as tx:      # read-modify-write
                    _, info = ms.get_info(tx, "counter")
                    n = int(info.labels["n"])
                    time.sleep(0.0005)
                    ms.update_info(tx, Info("counter", labels={"n": str(n + 1)}), ["labels.n"])
        except BaseException as e:
            errors.append(e)

    ts = [threading.Thread(target=bump) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not errors, errors[0]
    with store.transaction() as tx:
        assert ms.get_info(tx, "counter")[1].labels == {"n": "80"}


# --------------------------------------------------------------------------- persistence

def test_everything_survives_close_and_reopen(store, db_path):
    base = _layer(store, "base", labels={"l": "1"}, name="base-c")
    with store.transaction(write=True) as tx:
        act = ms.create(tx, Kind.ACTIVE, "act", "base-c", {"a": "b"}).id
        ms.put_rafs_mount(tx, ms.RafsMountRow("k1", "reg/img:1", "/mnt/k1", mode="fuse", pid=42, state="mounted"))
        ms.set_rafs_user(tx, base, "k1")
        ms.set_image_status(tx, "reg/img:1", "lazy", "3 layers")
        _, info_before = ms.get_info(tx, "act")
    store.close()
    for readonly in (False, True):
        again = ms.MetaStore(db_path, readonly=readonly)
        try:
            with again.transaction() as tx:
                sid, info = ms.get_info(tx, "act")
                assert (sid, info) == (act, info_before)
                assert ms.get_snapshot(tx, "act").parent_ids == [base]
                assert ms.get_info(tx, "base-c")[1].labels == {"l": "1"}
                row = ms.get_rafs_mount(tx, "k1")
                assert (row.image_ref, row.mountpoint, row.mode, row.pid, row.state) == \
                    ("reg/img:1", "/mnt/k1", "fuse", 42, "mounted")
                assert ms.rafs_users(tx) == {base: "k1"}
                assert ms.get_image_status(tx, "reg/img:1") == ("lazy", "3 layers")
        finally:
            again.close()


def test_a_readonly_store_cannot_write(store, db_path):
    _layer(store, "a")
    ro = ms.MetaStore(db_path, readonly=True)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            with ro.transaction(write=True) as tx:
                ms.create(tx, Kind.ACTIVE, "b", "", None)
    finally:
        ro.close()
    assert _names(store) == ["a-c"]


# --------------------------------------------------------------------------- lazy side

def test_rafs_mount_rows(store):
    with store.transaction(write=True) as tx:
        assert ms.get_rafs_mount(tx, "k") is None
        ms.put_rafs_mount(tx, ms.RafsMountRow("k", "img", "/m", state="mounted"))
        first = ms.get_rafs_mount(tx, "k")
        assert first.updated_ns > 0 and first.restarts == 0
        ms.put_rafs_mount(tx, ms.RafsMountRow("k", "img", "/m", state="failed", error="boom", restarts=2))
        ms.put_rafs_mount(tx, ms.RafsMountRow("a", "img2", "/m2", state="mounted"))
        got = ms.get_rafs_mount(tx, "k")
        assert (got.state, got.error, got.restarts) == ("failed", "boom", 2)
        assert [r.key for r in ms.list_rafs_mounts(tx)] == ["a", "k"]
        ms.delete_rafs_mount(tx, "k")
        assert ms.get_rafs_mount(tx, "k") is None and [r.key for r in ms.list_rafs_mounts(tx)] == ["a"]


def test_rafs_users(store):
    with store.transaction(write=True) as tx:
        assert ms.rafs_user_key(tx, 7) is None
        ms.set_rafs_user(tx, 7, "k1")
        ms.set_rafs_user(tx, 8, "k1")
        ms.set_rafs_user(tx, 7, "k2")                 # one mount per bootstrap snapshot
        assert ms.rafs_user_key(tx, 7) == "k2" and ms.rafs_users(tx) == {7: "k2", 8: "k1"}
        ms.delete_rafs_user(tx, 7)
        assert ms.rafs_users(tx) == {8: "k1"}


def test_image_status(store):
    with store.transaction(write=True) as tx:
        assert ms.get_image_status(tx, "b") is None
        ms.set_image_status(tx, "b", "lazy")
        ms.set_image_status(tx, "a", "failed", "no such blob")
        ms.set_image_status(tx, "b", "full", "fell back")
        assert ms.get_image_status(tx, "b") == ("full", "fell back")
        assert [(r, s, d) for r, s, d, _ in ms.list_images(tx)] == [("a", "failed", "no such blob"),
                                                                   ("b", "full", "fell back")]


# --------------------------------------------------------------------------- not its database

@pytest.mark.parametrize("readonly", [False, True])
@pytest.mark.parametrize("content", ["garbage", "truncated", "other-sqlite"])
def test_a_file_that_is_not_its_database_is_refused_naming_it(db_path, content, readonly):
    db_path.parent.mkdir(parents=True)
    if content == "garbage":
        db_path.write_bytes(b"not a database\n" * 400)
    elif content == "truncated":
        ms.MetaStore(db_path).close()
        db_path.write_bytes(db_path.read_bytes()[:100])
    else:                                            # SQLite, but someone else's
        other = sqlite3.connect(db_path)
        other.execute("CREATE TABLE t (x)")
        other.commit()
        other.close()
        if not readonly:                             # writable: ours is added next to theirs
            ms.MetaStore(db_path).close()
            return
    with pytest.raises(RuntimeError) as ei:
        ms.MetaStore(db_path, readonly=readonly)
    assert str(db_path) in str(ei.value)


def test_another_schema_version_is_refused(db_path):
    db_path.parent.mkdir(parents=True)
    ms.MetaStore(db_path).close()
    db = sqlite3.connect(db_path)
    db.execute("UPDATE meta SET v = '99' WHERE k = 'schema_version'")
    db.commit()
    db.close()
    for readonly in (False, True):
        with pytest.raises(RuntimeError, match=r"schema 99, this snapshotter reads 1"):
            ms.MetaStore(db_path, readonly=readonly)
