"""A size limit for a cache directory: space is reserved before a chunk is written, least recently used
chunks that no read is using are evicted to make room.

One `CacheBudget` per process and budget root (`acquire_budget`): the cache directory of `nydusify mount
--cache-max-size`, or the snapshotter's whole cache root (`[cache] max_size`: every image's cache dir and
their P2P payload files, `CACHE_ROOT/<key>/p2p/`). The limit is on what the files really occupy
(st_blocks * 512 of every file under the root), not on what was written.

How the bound holds, node-wide, with several processes (one mount daemon per image) under one root:

* Every write of chunk data (a blob cache's chunk: `BlobCache`; a P2P payload unit: `p2p.store`) goes
  through `room(nbytes)`: under the root's lock (`ROOT/.budget.lock`, flock, plus a thread lock) the
  tree is measured, and while `used + nbytes > limit` this process evicts its own least recently used
  chunk; the write happens while the lock is held. So writes are serialized node-wide and the tree
  only exceeds the limit by what is not written through here (chunkmap files, a few kB) and by
  filesystem metadata: less than one chunk. If the room cannot be made (everything left is another
  process's, or in use), `room` says no and the caller serves the chunk from memory without caching
  it, as on ENOSPC; it also leaves a *pressure* note (`ROOT/.budget.pressure`: bytes wanted, when).
* Each process's budget runs a small GC thread: when another process's pressure note is fresh, it
  evicts that many bytes of its own least recently used chunks (so an idle image's old chunks make room
  for a busy one's), and when the tree is over the limit (a lower limit after a restart) it evicts
  down to it.
* Eviction (a `Tenant`'s `evict(key)`): the chunk is marked MISSING in memory and in the chunk map,
  under the cache's lock, skipping chunks a read has pinned or a fetch has in flight, and its bytes are
  punched out of the sparse data file (fallocate PUNCH_HOLE | KEEP_SIZE). A later read fetches it
  again. A blob cache data file another process shares is not punched (that process may be serving
  those bytes from its own in-memory state).

LRU: a process-wide ordered dict of (tenant, key) -> bytes; a read hit moves a chunk to the end.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator, Protocol

from rafs.osutil import flocked, tree_usage

log = logging.getLogger(__name__)

LOCK_NAME = ".budget.lock"
PRESSURE_NAME = ".budget.pressure"
PRESSURE_TTL = 5.0          # seconds a pressure note is acted on
GC_INTERVAL = 1.0           # seconds between two looks of the GC thread

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text) -> int:
    """Bytes of a size such as 64M, 2G, 1.5G, 4096, 512K, 10MiB, 3GB (binary units); 0 = no limit."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"a size must be >= 0, got {text}")
        return int(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (want e.g. 64M, 2G, 4096)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def tree_bytes(root: str) -> int:
    """What the files under `root` really occupy on disk (one filesystem, hard links once)."""
    return tree_usage(root)[0]


# --------------------------------------------------------------------------- the budget

class Tenant(Protocol):
    """What holds evictable chunks (a BlobCache, a P2P payload file)."""

    def evict(self, key) -> int | None:
        """Evict chunk `key` if no read uses it: None if it cannot be evicted now, else the bytes freed
        (as measured)."""


class CacheBudget:
    """The size limit of one cache root in this process (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, limit: int, *, gc_interval: float = GC_INTERVAL):
        if limit <= 0:
            raise ValueError(f"a cache limit must be > 0 bytes, got {limit}")
        self.root = os.path.abspath(os.fspath(root))
        self.limit = limit
        os.makedirs(self.root, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.root, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._pressure_path = os.path.join(self.root, PRESSURE_NAME)
        self._room_lock = threading.Lock()          # then the flock: one writer node-wide
        self._lru_lock = threading.Lock()
        self._lru: OrderedDict[tuple[int, object], int] = OrderedDict()
        self._tenants: dict[int, Tenant] = {}
        self.evictions = 0                          # chunks this process evicted
        self.evicted_bytes = 0
        self.refused = 0                            # writes not cached: no room could be made
        self.used = 0                               # last measurement of the tree
        self._pressure_seen = 0.0
        self._stop = threading.Event()
        self._gc_interval = gc_interval
        self._gc: threading.Thread | None = None
        self.users = 0                              # acquire_budget / release_budget

    # -- tenants and the LRU
    def register(self, tenant: Tenant) -> None:
        with self._lru_lock:
            self._tenants[id(tenant)] = tenant
        with self._room_lock:
            if self._gc is None and not self._stop.is_set():
                self._gc = threading.Thread(target=self._gc_loop, daemon=True, name="cache-budget-gc")
                self._gc.start()

    def unregister(self, tenant: Tenant) -> None:
        t = id(tenant)
        with self._lru_lock:
            self._tenants.pop(t, None)
            for k in [k for k in self._lru if k[0] == t]:
                del self._lru[k]

    def present(self, tenant: Tenant, key, nbytes: int) -> None:
        """Chunk `key` of `tenant` is on disk (new, or found at open): most recently used."""
        with self._lru_lock:
            k = (id(tenant), key)
            self._lru[k] = nbytes
            self._lru.move_to_end(k)

    def touch(self, tenant: Tenant, keys) -> None:
        """A read used these chunks: most recently used."""
        t = id(tenant)
        with self._lru_lock:
            lru = self._lru
            for key in keys:
                k = (t, key)
                if k in lru:
                    lru.move_to_end(k)

    def gone(self, tenant: Tenant, key) -> None:
        """Chunk `key` is no longer on disk (evicted, or found changed)."""
        with self._lru_lock:
            self._lru.pop((id(tenant), key), None)

    def own_bytes(self) -> int:
        with self._lru_lock:
            return sum(self._lru.values())

    # -- making room
    @contextmanager
    def _locked(self) -> Iterator[None]:
        with flocked(self._room_lock, self._lock_fd):
            yield

    @contextmanager
    def room(self, nbytes: int) -> Iterator[bool]:
        """Hold the budget while writing `nbytes` of chunk data: yields True if they fit under the limit
        (LRU chunks evicted to make room), False if they do not (do not write them)."""
        with self._locked():
            used = tree_bytes(self.root)
            if used + nbytes > self.limit:
                used = self._evict_until(used, self.limit - nbytes)
            self.used = used
            ok = used + nbytes <= self.limit
            if not ok:
                self.refused += 1
                self._note_pressure(used + nbytes - self.limit)
            yield ok

    def _evict_until(self, used: int, target: int, *, budget_bytes: int | None = None) -> int:
        """Locked: evict own LRU chunks until the tree takes at most `target` bytes (or `budget_bytes`
        were freed); returns the tree's size then."""
        skipped: set[tuple[int, object]] = set()
        freed_total = 0
        while used > target and (budget_bytes is None or freed_total < budget_bytes):
            with self._lru_lock:
                victim = next((k for k in self._lru if k not in skipped), None)
                tenant = self._tenants.get(victim[0]) if victim is not None else None
            if victim is None:
                break
            if tenant is None:
                self.gone_key(victim)
                continue
            try:
                freed = tenant.evict(victim[1])
            except OSError as e:
                log.warning("evicting a cached chunk failed: %s", e)
                freed = None
            if freed is None:
                skipped.add(victim)
                continue
            self.gone_key(victim)
            self.evictions += 1
            self.evicted_bytes += freed
            freed_total += freed
            used = tree_bytes(self.root)
        return used

    def gone_key(self, k) -> None:
        with self._lru_lock:
            self._lru.pop(k, None)

    # -- cross-process pressure and the GC thread
    def _note_pressure(self, want: int) -> None:
        try:
            with open(self._pressure_path, "w") as f:
                json.dump({"pid": os.getpid(), "bytes": want, "time": time.time()}, f)
        except OSError:
            pass

    def _read_pressure(self) -> tuple[int, float, int] | None:
        try:
            with open(self._pressure_path) as f:
                p = json.load(f)
            return int(p["bytes"]), float(p["time"]), int(p["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def gc_once(self) -> None:
        """Act on another process's fresh pressure note, and get back under the limit."""
        p = self._read_pressure()
        with self._locked():
            used = tree_bytes(self.root)
            if p is not None:
                want, when, pid = p
                if pid != os.getpid() and when > self._pressure_seen and time.time() - when < PRESSURE_TTL:
                    self._pressure_seen = when
                    used = self._evict_until(used, 0, budget_bytes=want)
            if used > self.limit:
                used = self._evict_until(used, self.limit)
            self.used = used

    def _gc_loop(self) -> None:
        while not self._stop.wait(self._gc_interval):
            try:
                self.gc_once()
            except Exception as e:            # never let the GC take the daemon down
                log.warning("cache budget GC of %s: %s", self.root, e)

    def snapshot(self) -> dict:
        return {"max_size": self.limit, "root": self.root, "used": self.used,
                "evictions": self.evictions, "evicted_bytes": self.evicted_bytes,
                "not_cached_for_room": self.refused}

    def close(self) -> None:
        self._stop.set()
        t = self._gc
        if t is not None and t is not threading.current_thread():
            t.join()
        self._gc = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


# process-wide: one budget per root, found by the path of what is written under it (p2p.store)
_budgets: dict[str, CacheBudget] = {}
_budgets_lock = threading.Lock()


def acquire_budget(root: str | os.PathLike, limit: int) -> CacheBudget:
    """This process's budget of `root` (made on first use; a later `limit` replaces the limit); give
    it back with `release_budget`."""
    root = os.path.abspath(os.fspath(root))
    with _budgets_lock:
        b = _budgets.get(root)
        if b is None:
            b = _budgets[root] = CacheBudget(root, limit)
        else:
            b.limit = limit
        b.users += 1
        return b


def budget_covering(path: str | os.PathLike) -> CacheBudget | None:
    """The budget whose root holds `path`, if this process has one."""
    path = os.path.abspath(os.fspath(path))
    with _budgets_lock:
        best = None
        for root, b in _budgets.items():
            if (path == root or path.startswith(root.rstrip("/") + "/")) and \
                    (best is None or len(root) > len(best.root)):
                best = b
        return best


def release_budget(budget: CacheBudget) -> None:
    """One user of `budget` is done; the last one stops it."""
    with _budgets_lock:
        budget.users -= 1
        if budget.users > 0:
            return
        if _budgets.get(budget.root) is budget:
            del _budgets[budget.root]
    budget.close()


def is_enospc(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


def in_use(directory: str | os.PathLike) -> bool:
    """True if a process has a blob cache data file under `directory` open (its flock is held)."""
    for dirpath, _, names in os.walk(directory):
        for n in names:
            if not (n.endswith(".blob") or n.endswith(".payload")):
                continue
            try:
                fd = os.open(os.path.join(dirpath, n), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            finally:
                os.close(fd)
    return False


def remove_orphans(root: str | os.PathLike, keep: set[str]) -> list[str]:
    """The periodic GC of a cache root holding one directory per image (the snapshotter's): remove the
    directories not named in `keep` that no process has open; returns their names."""
    import shutil
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for e in entries:
        if e.name.startswith(".") or e.name in keep or not e.is_dir(follow_symlinks=False):
            continue
        if in_use(e.path):
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(e.name)
    return removed
