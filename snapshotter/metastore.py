"""Snapshot metadata in SQLite (WAL): one transaction per change.

    ms = MetaStore(layout.db_path)
    with ms.transaction(write=True) as tx:
        sid = create(tx, Kind.ACTIVE, key, parent, labels)
        ...                                        # filesystem work; an exception rolls back

The free functions (get_info, get_snapshot, create, commit, remove, update_info,
walk, id_map) work on the transaction (a sqlite3 cursor), never on the store,
so every caller says where a transaction starts and ends. They raise the
classes of ``snapshotter.errors`` with context.

A committed snapshot keeps the integer id (and so the directory) of the active
snapshot it was committed from; ids are never reused (AUTOINCREMENT), so a dir
left by a removed snapshot can never be mistaken for a new one's.

Besides snapshots the store keeps the lazy side's state: ``rafs_mounts`` (one
row per RAFS mount, keyed by the bootstrap's digest, so the same image pulled
into two namespaces shares one mount), ``rafs_users`` (bootstrap snapshot ->
mount) and ``images`` (per image reference: lazy / full / failed, for ``status``).
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from .errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from .snapshots import Info, Kind, LABEL_MAX_BYTES

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,           -- key (active/view) or name (committed)
    parent_id   INTEGER REFERENCES snapshots(id),
    kind        INTEGER NOT NULL,
    created_ns  INTEGER NOT NULL,
    updated_ns  INTEGER NOT NULL,
    labels      TEXT NOT NULL DEFAULT '{}',
    size        INTEGER NOT NULL DEFAULT -1,    -- usage recorded at commit (-1: unknown)
    inodes      INTEGER NOT NULL DEFAULT -1
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
CREATE TABLE IF NOT EXISTS rafs_mounts (
    key         TEXT PRIMARY KEY,               -- sha256(bootstrap)[:16]: one mount per distinct image
    image_ref   TEXT NOT NULL,
    mountpoint  TEXT NOT NULL,
    mode        TEXT NOT NULL DEFAULT '',
    pid         INTEGER NOT NULL DEFAULT 0,
    state       TEXT NOT NULL,                  -- mounted | failed
    error       TEXT NOT NULL DEFAULT '',
    restarts    INTEGER NOT NULL DEFAULT 0,
    updated_ns  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rafs_users (
    snapshot_id INTEGER PRIMARY KEY,            -- a bootstrap snapshot (row outlives it until released)
    mount_key   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    ref         TEXT PRIMARY KEY,
    status      TEXT NOT NULL,                  -- lazy | full | failed
    detail      TEXT NOT NULL DEFAULT '',
    updated_ns  INTEGER NOT NULL
);
"""


@dataclass
class Snapshot:
    """What the filesystem side needs: the id and the ids of its parents, nearest first."""
    id: int
    kind: Kind
    parent_ids: list[int]


def now_ns() -> int:
    return time.time_ns()


class MetaStore:
    """One SQLite database; a lock makes each transaction exclusive within the process.

    Opening checks the file: one that is not this snapshotter's metadata (not SQLite, damaged,
    another schema version) raises RuntimeError naming the file, read-only or not.
    """

    def __init__(self, path, *, readonly: bool = False):
        self.path = str(path)
        try:
            self._db = self._open(readonly)
        except sqlite3.DatabaseError as e:
            raise RuntimeError(f"{self.path}: not a readable snapshotter metadata database ({e})") from e
        self._lock = threading.RLock()
        self._depth = 0

    def _open(self, readonly: bool) -> sqlite3.Connection:
        if readonly:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False,
                                 isolation_level=None, timeout=30)
        else:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        try:
            if not readonly:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA foreign_keys=ON")
                db.executescript(_SCHEMA)
                db.execute("INSERT OR IGNORE INTO meta(k, v) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            row = db.execute("SELECT v FROM meta WHERE k='schema_version'").fetchone()
            if row is None or row[0] != str(SCHEMA_VERSION):
                raise RuntimeError(f"{self.path}: metadata schema {row[0] if row else 'missing'}, "
                                   f"this snapshotter reads {SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self, write: bool = False) -> Iterator[sqlite3.Cursor]:
        """Commit on normal exit, roll back on an exception. Nested use joins the outer one."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._db.cursor()
                finally:
                    self._depth -= 1
                return
            self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            self._depth = 1
            try:
                yield self._db.cursor()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")
            finally:
                self._depth = 0


# -- snapshots ------------------------------------------------------------------------------

def validate_labels(labels: dict[str, str] | None) -> dict[str, str]:
    out = dict(labels or {})
    for k, v in out.items():
        if not k:
            raise InvalidArgument("label key must not be empty")
        if len(k.encode()) + len(v.encode()) > LABEL_MAX_BYTES:
            raise InvalidArgument(f"label key and value greater than maximum size ({LABEL_MAX_BYTES} bytes), "
                                  f"key: {k[:64]}")
    return out


_COLS = "s.id, s.name, s.kind, s.created_ns, s.updated_ns, s.labels, p.name"
_FROM = "snapshots s LEFT JOIN snapshots p ON p.id = s.parent_id"


def _info(row) -> Info:
    sid, name, kind, created, updated, labels, parent = row
    return Info(name=name, parent=parent or "", kind=Kind(kind), created_ns=created, updated_ns=updated,
                labels=json.loads(labels))


def _row(tx, key: str):
    row = tx.execute(f"SELECT {_COLS} FROM {_FROM} WHERE s.name = ?", (key,)).fetchone()
    if row is None:
        raise NotFound(f"snapshot {key!r} does not exist")
    return row


def get_info(tx, key: str) -> tuple[int, Info]:
    row = _row(tx, key)
    return row[0], _info(row)


def find_info(tx, key: str) -> tuple[int, Info] | None:
    try:
        return get_info(tx, key)
    except NotFound:
        return None


def info_by_id(tx, sid: int) -> Info | None:
    row = tx.execute(f"SELECT {_COLS} FROM {_FROM} WHERE s.id = ?", (sid,)).fetchone()
    return _info(row) if row else None


def parent_ids(tx, sid: int) -> list[int]:
    rows = tx.execute(
        "WITH RECURSIVE chain(id, parent_id, depth) AS ("
        " SELECT id, parent_id, 0 FROM snapshots WHERE id = ?"
        " UNION ALL SELECT s.id, s.parent_id, c.depth + 1 FROM snapshots s JOIN chain c ON s.id = c.parent_id)"
        " SELECT id FROM chain WHERE depth > 0 ORDER BY depth", (sid,)).fetchall()
    return [r[0] for r in rows]


def get_snapshot(tx, key: str) -> Snapshot:
    """An active or view snapshot with its parents (FailedPrecondition for a committed one)."""
    row = tx.execute("SELECT id, kind FROM snapshots WHERE name = ?", (key,)).fetchone()
    if row is None:
        raise NotFound(f"snapshot {key!r} does not exist")
    sid, kind = row
    if kind not in (Kind.ACTIVE, Kind.VIEW):
        raise FailedPrecondition(f"requested snapshot {key!r} not active or view")
    return Snapshot(sid, Kind(kind), parent_ids(tx, sid))


def create(tx, kind: Kind, key: str, parent: str, labels: dict[str, str] | None) -> Snapshot:
    if kind not in (Kind.ACTIVE, Kind.VIEW):
        raise InvalidArgument(f"snapshot type {kind.name} invalid; only snapshots of type Active or View "
                              "can be created")
    if not key:
        raise InvalidArgument("snapshot key must not be empty")
    labels = validate_labels(labels)
    pid = None
    if parent:
        prow = tx.execute("SELECT id, kind FROM snapshots WHERE name = ?", (parent,)).fetchone()
        if prow is None:
            raise NotFound(f"missing parent {parent!r} bucket")
        if prow[1] != Kind.COMMITTED:
            raise InvalidArgument(f"parent {parent!r} is not committed snapshot")
        pid = prow[0]
    if tx.execute("SELECT 1 FROM snapshots WHERE name = ?", (key,)).fetchone():
        raise AlreadyExists(f"snapshot {key!r} already exists")
    ts = now_ns()
    tx.execute("INSERT INTO snapshots(name, parent_id, kind, created_ns, updated_ns, labels) VALUES (?,?,?,?,?,?)",
               (key, pid, int(kind), ts, ts, json.dumps(labels, sort_keys=True)))
    sid = tx.lastrowid
    return Snapshot(sid, kind, ([pid] + parent_ids(tx, pid)) if pid else [])


def commit(tx, key: str, name: str, labels: dict[str, str] | None, usage: tuple[int, int] | None = None) -> int:
    """Active ``key`` becomes committed ``name`` (same id); labels replaced. Returns the id."""
    if not name:
        raise InvalidArgument("snapshot name must not be empty")
    labels = validate_labels(labels)
    row = tx.execute("SELECT id, kind FROM snapshots WHERE name = ?", (key,)).fetchone()
    if row is None:
        raise NotFound(f"snapshot {key!r} does not exist")
    sid, kind = row
    if kind != Kind.ACTIVE:
        raise FailedPrecondition(f"snapshot {key!r} is not active")
    if tx.execute("SELECT 1 FROM snapshots WHERE name = ?", (name,)).fetchone():
        raise AlreadyExists(f"snapshot {name!r} already exists")
    ts = now_ns()
    size, inodes = usage if usage else (-1, -1)
    tx.execute("UPDATE snapshots SET name=?, kind=?, created_ns=?, updated_ns=?, labels=?, size=?, inodes=? "
               "WHERE id=?", (name, int(Kind.COMMITTED), ts, ts, json.dumps(labels, sort_keys=True),
                              size, inodes, sid))
    return sid


def remove(tx, key: str) -> tuple[int, Kind]:
    row = tx.execute("SELECT id, kind FROM snapshots WHERE name = ?", (key,)).fetchone()
    if row is None:
        raise NotFound(f"snapshot {key!r} does not exist")
    sid, kind = row
    if tx.execute("SELECT 1 FROM snapshots WHERE parent_id = ? LIMIT 1", (sid,)).fetchone():
        raise FailedPrecondition(f"cannot remove snapshot {key!r} with child")
    tx.execute("DELETE FROM snapshots WHERE id = ?", (sid,))
    return sid, Kind(kind)


def update_info(tx, info: Info, fieldpaths: list[str]) -> Info:
    sid, cur = get_info(tx, info.name)
    labels = dict(cur.labels)
    if fieldpaths:
        for path in fieldpaths:
            if path.startswith("labels."):
                k = path[len("labels."):]
                v = info.labels.get(k, "")
                if v:
                    labels[k] = v
                else:
                    labels.pop(k, None)
            elif path == "labels":
                labels = dict(info.labels)
            else:
                raise InvalidArgument(f"cannot update {path!r} field on snapshot {info.name!r}")
    else:
        labels = dict(info.labels)
    labels = validate_labels({k: v for k, v in labels.items() if v != ""})
    ts = max(now_ns(), cur.updated_ns + 1)
    tx.execute("UPDATE snapshots SET labels=?, updated_ns=? WHERE id=?", (json.dumps(labels, sort_keys=True), ts, sid))
    cur.labels, cur.updated_ns = labels, ts
    return cur


def set_labels(tx, sid: int, labels: dict[str, str]) -> None:
    """Internal label changes (e.g. the remote marker); does not bump ``updated``."""
    tx.execute("UPDATE snapshots SET labels=? WHERE id=?", (json.dumps(labels, sort_keys=True), sid))


def usage(tx, key: str) -> tuple[int, Kind, int, int]:
    """(id, kind, recorded size, recorded inodes)."""
    row = tx.execute("SELECT id, kind, size, inodes FROM snapshots WHERE name = ?", (key,)).fetchone()
    if row is None:
        raise NotFound(f"snapshot {key!r} does not exist")
    return row[0], Kind(row[1]), row[2], row[3]


def walk(tx, fn: Callable[[Info], None], match: Callable[[Info], bool] | None = None) -> None:
    for row in tx.execute(f"SELECT {_COLS} FROM {_FROM} ORDER BY s.id").fetchall():
        info = _info(row)
        if match is None or match(info):
            fn(info)


def id_map(tx) -> dict[int, str]:
    return {sid: name for sid, name in tx.execute("SELECT id, name FROM snapshots")}


def children_of(tx, sid: int) -> list[int]:
    return [r[0] for r in tx.execute("SELECT id FROM snapshots WHERE parent_id = ?", (sid,))]


def descendants_active(tx, sid: int) -> list[int]:
    """Active/view snapshots whose parent chain contains ``sid``."""
    rows = tx.execute(
        "WITH RECURSIVE d(id) AS (SELECT id FROM snapshots WHERE parent_id = ?"
        " UNION ALL SELECT s.id FROM snapshots s JOIN d ON s.parent_id = d.id)"
        " SELECT s.id FROM snapshots s JOIN d ON s.id = d.id WHERE s.kind IN (?, ?)",
        (sid, int(Kind.ACTIVE), int(Kind.VIEW))).fetchall()
    return [r[0] for r in rows]


# -- lazy-side state ------------------------------------------------------------------------

@dataclass
class RafsMountRow:
    key: str
    image_ref: str
    mountpoint: str
    mode: str = ""
    pid: int = 0
    state: str = ""
    error: str = ""
    restarts: int = 0
    updated_ns: int = 0


_RM_COLS = "key, image_ref, mountpoint, mode, pid, state, error, restarts, updated_ns"


def get_rafs_mount(tx, key: str) -> RafsMountRow | None:
    row = tx.execute(f"SELECT {_RM_COLS} FROM rafs_mounts WHERE key = ?", (key,)).fetchone()
    return RafsMountRow(*row) if row else None


def list_rafs_mounts(tx) -> list[RafsMountRow]:
    return [RafsMountRow(*r) for r in tx.execute(f"SELECT {_RM_COLS} FROM rafs_mounts ORDER BY key")]


def put_rafs_mount(tx, row: RafsMountRow) -> None:
    row.updated_ns = now_ns()
    tx.execute(f"INSERT OR REPLACE INTO rafs_mounts({_RM_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
               (row.key, row.image_ref, row.mountpoint, row.mode, row.pid, row.state, row.error,
                row.restarts, row.updated_ns))


def delete_rafs_mount(tx, key: str) -> None:
    tx.execute("DELETE FROM rafs_mounts WHERE key = ?", (key,))


def set_rafs_user(tx, sid: int, key: str) -> None:
    tx.execute("INSERT OR REPLACE INTO rafs_users(snapshot_id, mount_key) VALUES (?, ?)", (sid, key))


def rafs_user_key(tx, sid: int) -> str | None:
    row = tx.execute("SELECT mount_key FROM rafs_users WHERE snapshot_id = ?", (sid,)).fetchone()
    return row[0] if row else None


def delete_rafs_user(tx, sid: int) -> None:
    tx.execute("DELETE FROM rafs_users WHERE snapshot_id = ?", (sid,))


def rafs_users(tx) -> dict[int, str]:
    return dict(tx.execute("SELECT snapshot_id, mount_key FROM rafs_users"))


def set_image_status(tx, ref: str, status: str, detail: str = "") -> None:
    tx.execute("INSERT OR REPLACE INTO images(ref, status, detail, updated_ns) VALUES (?,?,?,?)",
               (ref, status, detail, now_ns()))


def get_image_status(tx, ref: str) -> tuple[str, str] | None:
    row = tx.execute("SELECT status, detail FROM images WHERE ref = ?", (ref,)).fetchone()
    return (row[0], row[1]) if row else None


def list_images(tx) -> list[tuple[str, str, str, int]]:
    return list(tx.execute("SELECT ref, status, detail, updated_ns FROM images ORDER BY ref"))
