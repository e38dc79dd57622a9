"""Which chunks of one blob cache are ready, and the chunk-map flush.

`ReadyState` keeps, per chunk the cache serves, MISSING / UNCHECKED (the
chunkmap on disk says ready; its xxh64 is re-checked on first read) / READY
(verified in this process), the in-memory `state.ChunkMap` (by ci index) and
its persistence to `<id>.chunkmap`:

* `load` (at open): an unusable chunkmap means an empty cache and a warning;
  the sole user of the data file then discards it.
* `flush`: fdatasync the data file, then, under the cross-process lock, read
  the map on disk, OR its ready bits into ours (`adopt`: chunks this process
  found changed on disk are left out) and replace the file atomically
  (`rafs.osutil.atomic_write`): no process's update is lost. A background
  thread flushes every `flush_interval` seconds or `flush_chunks` chunks while
  chunks arrive; the owner flushes once more on close.
* `refresh_from_disk`: adopt the chunks another process made ready since the
  file was last read (they become UNCHECKED).

Locking: the state is guarded by the owning BlobCache's lock (`cond`), shared
with the read path; methods say "locked" when the caller must hold it.
Chunk positions in `inflight` (the read path's fetches and re-checks) are left
alone by `adopt`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Container, Sequence

from rafs.blob import ChunkEntry
from rafs.osutil import atomic_write

from .files import CacheFiles
from .state import ChunkMap

log = logging.getLogger(__name__)

DEFAULT_FLUSH_INTERVAL = 1.0       # seconds between chunkmap flushes while chunks arrive
DEFAULT_FLUSH_CHUNKS = 64          # ... or after this many newly ready chunks

# per-chunk state in memory
MISSING = 0                        # not in the data file (or not trusted)
UNCHECKED = 1                      # the chunkmap on disk says ready; xxh64 not re-checked yet
READY = 2                          # verified in this process (fetched, or re-checked)


class ReadyState:
    """The ready-state of `entries` (a BlobCache's chunks, by position) and its chunkmap file."""

    def __init__(self, files: CacheFiles, entries: Sequence[ChunkEntry], *, chunk_count: int,
                 view_size: int, cond: threading.Condition, inflight: Container[int],
                 flush_interval: float = DEFAULT_FLUSH_INTERVAL,
                 flush_chunks: int = DEFAULT_FLUSH_CHUNKS):
        self.files = files
        self.name = files.name
        self.entries = entries
        self.positions = {e.index: k for k, e in enumerate(entries)}   # ci index -> position
        self.cond = cond
        self.inflight = inflight
        self.flush_interval = flush_interval
        self.flush_chunks = flush_chunks
        self._map_kw = dict(chunk_count=chunk_count, blob_id=files.blob_id, view_size=view_size)
        self.map = ChunkMap(**self._map_kw)
        self.state = bytearray(len(entries))    # MISSING / UNCHECKED / READY per position
        self.ready_count = 0                      # entries ready (the chunkmap says so)
        self.ready_bytes = 0
        self._cleared: dict[int, int] = {}   # ci index -> xxh64 its bytes on disk failed (not ready)
        self.closing = False
        self._map_seen: tuple | None = None  # identity of the chunkmap file last read / written
        self._dirty = 0                    # chunks marked ready since the last flush
        self._dirty_since = 0.0
        self._flush_lock = threading.Lock()
        self._flusher: threading.Thread | None = None

    # ------------------------------------------------------------------ opening
    def load(self, sole: bool) -> None:
        """Read the chunkmap at open (under the cross-process lock, data file open): its ready
        chunks become UNCHECKED. `sole`: no other process uses the data file."""
        files = self.files
        view_size = self._map_kw["view_size"]
        existed = os.path.exists(files.map_path)
        self._map_seen = files.map_identity()
        cmap, reason = ChunkMap.load(files.map_path, **self._map_kw)
        size = files.size()
        if reason is None and size != view_size:
            cmap, reason = ChunkMap(**self._map_kw), f"the data file is {size} bytes, not {view_size}"
        if reason is not None:
            if existed:
                log.warning("%s: ignoring cache state %s (%s); starting with an empty cache",
                            self.name, files.map_path, reason)
            if sole:
                # Drop whatever the data file held: nothing vouches for it.
                files.resize(view_size, discard=True)
            elif size < view_size:
                # Another process uses the file (and may not have flushed its map yet): its
                # chunks must stay; we just start empty. Growing never destroys a byte.
                files.resize(view_size, discard=False)
        for k, e in enumerate(self.entries):
            if cmap.ready(e.index):
                self.state[k] = UNCHECKED
                self.ready_count += 1
                self.ready_bytes += e.uncompressed_size
        self.map = cmap

    # ------------------------------------------------------------------ changes (locked)
    def mark(self, i: int, e: ChunkEntry, h: int) -> None:
        """Locked: chunk position `i` holds verified bytes with chunkmap hash `h`."""
        self._cleared.pop(e.index, None)
        if not self.map.ready(e.index):
            self.ready_count += 1
            self.ready_bytes += e.uncompressed_size
        self.map.mark_ready(e.index, h)
        self.state[i] = READY
        self.note_dirty()

    def forget(self, i: int, e: ChunkEntry, bad_xxh64: int) -> None:
        """Locked: the bytes of chunk position `i` on disk changed (their xxh64 is not
        `bad_xxh64` any more): it is missing, and a shared map's vouching for them is ignored."""
        if self.map.ready(e.index):
            self.ready_count -= 1
            self.ready_bytes -= e.uncompressed_size
        self._cleared[e.index] = bad_xxh64
        self.map.clear(e.index)
        self.state[i] = MISSING
        self.note_dirty()

    def note_dirty(self) -> None:
        """Locked, after the chunkmap changed: make sure the flusher will write it."""
        if not self._dirty:
            self._dirty_since = time.monotonic()
        self._dirty += 1
        if self.closing:
            return
        if self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                             name=f"flush-{self.files.blob_id[:12]}")
            self._flusher.start()
        elif self._dirty >= self.flush_chunks:
            self.cond.notify_all()

    def stop(self) -> None:
        """Locked: the cache is closing; no new flusher starts and the running one ends
        (the owner notifies `cond`, then calls `join` and a last `flush`)."""
        self.closing = True

    def join(self) -> None:
        t = self._flusher
        if t is not None and t is not threading.current_thread():
            t.join()

    # ------------------------------------------------------------------ flushing
    def _flush_loop(self) -> None:
        """Flush after `flush_interval` or `flush_chunks` chunks; exit when nothing is dirty."""
        while True:
            with self.cond:
                while not self.closing:
                    if not self._dirty:
                        self._flusher = None   # note_dirty starts a new one when needed
                        return
                    left = self._dirty_since + self.flush_interval - time.monotonic()
                    if self._dirty >= self.flush_chunks or left <= 0:
                        break
                    self.cond.wait(left)
                if self.closing:
                    return
            try:
                self.flush()
            except OSError as e:
                log.warning("%s: cannot write cache state %s: %s", self.name, self.files.map_path, e)
                time.sleep(self.flush_interval)

    def flush(self) -> None:
        """Persist the ready-state: fdatasync the data file, then atomically replace the chunkmap.

        Under the cross-process lock, the map on disk (other processes' chunks) is merged
        in first, so that no process's ready bits are lost.
        """
        files = self.files
        with self._flush_lock:
            with self.cond:
                if not self._dirty:
                    return
            with files.xlock():
                disk, reason = ChunkMap.load(files.map_path, **self._map_kw)
                with self.cond:
                    if reason is None:
                        self._adopt(disk)
                    encoded = self.map.encode()
                    dirty, self._dirty = self._dirty, 0
                try:
                    files.sync()
                    atomic_write(files.map_path, encoded)
                except BaseException:
                    with self.cond:
                        self._dirty += dirty
                    raise
                seen = files.map_identity()
                with self.cond:
                    self._map_seen = seen

    def refresh_from_disk(self) -> int:
        """Adopt chunks another process made ready since the chunkmap was last read (they are
        re-checked with xxh64 before being served); returns how many."""
        files = self.files
        seen = files.map_identity()
        with self.cond:
            if seen is None or seen == self._map_seen:
                return 0
        disk, reason = ChunkMap.load(files.map_path, **self._map_kw)
        with self.cond:
            self._map_seen = seen
            return 0 if reason is not None else self._adopt(disk)

    def _adopt(self, disk: ChunkMap) -> int:
        """Merge the on-disk map into ours (locked): its ready chunks we lack become UNCHECKED
        (or stay in flight here); chunks whose bytes we found changed are left out."""
        n = 0
        for ci in self.map.merge_from(disk, self._cleared):
            i = self.positions.get(ci)
            if i is None:                      # a chunk of the blob this bootstrap does not use
                continue
            n += 1
            self.ready_count += 1
            self.ready_bytes += self.entries[i].uncompressed_size
            if self.state[i] == MISSING and i not in self.inflight:
                self.state[i] = UNCHECKED
        return n
