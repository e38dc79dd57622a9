"""RafsFs: a mounted RAFS image as a read-only filesystem, without any FUSE.

The core the FUSE adapters (`rafs.fuse`, `rafs.blobfs`) sit on, usable on its
own (tests, tools): paths resolve to nids (the EROFS inode numbers of the
bootstrap), nids answer stat / readdir / readlink / xattrs, and `read` maps a
file range to extents and reads them from the blob cache (`CacheManager`),
which fetches, verifies, decompresses and keeps the chunks.

Not-found is `None`, never an errno; a failed fetch or a chunk that fails
verification raises `RafsError` (BackendError / IntegrityError) — the edges
turn those into ENOENT and EIO. Thread-safe: the bootstrap is immutable, the
caches are locked, and the path cache only ever gains entries (dict updates
are atomic under the GIL).
"""
from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Iterable

from .access import AccessLog
from .bootstrap import Bootstrap, BlobInfo, PrefetchEntry
from .erofs import layout as L
from .errors import RafsError
from .erofs.reader import InodeInfo

log = logging.getLogger(__name__)

_PATH_CACHE_MAX = 1 << 18        # path -> nid entries kept (the kernel caches dentries too)
BLOB_STREAM_RUN = 2 << 20        # erofs mode: bytes read in order before the blob is read ahead
_MODE_OF_FT = {ft: mode for mode, ft in L.FT_OF_MODE.items()}


class RafsFs:
    """The filesystem of one bootstrap whose blobs are read through `caches` (a CacheManager)."""

    def __init__(self, bootstrap: Bootstrap, caches):
        self.boot = bootstrap
        self.caches = caches
        self.blobs: list[BlobInfo] = bootstrap.meta.blobs
        self._paths: dict[bytes, int] = {b"/": bootstrap.root_nid}
        self._blob_caches: list = [None] * len(self.blobs)
        self.counters = ReadCounters()
        self.readahead = Readahead()
        self._prefetch_end: dict[int, int] = {}    # blob -> end of the view ranges prefetch fetches
        self.access = AccessLog()                  # what was read, in order (learned prefetch, audit)

    # ------------------------------------------------------------------ names
    def resolve(self, path: bytes) -> int | None:
        """The nid at absolute `path` (no symlinks followed), or None."""
        nid = self._paths.get(path)
        if nid is not None:
            return nid
        parent, _, name = path.rstrip(b"/").rpartition(b"/")
        if not name:
            return self.boot.root_nid
        pnid = self.resolve(parent or b"/")
        if pnid is None or not self.boot.getattr(pnid).is_dir():
            return None
        nid = self.boot.lookup(pnid, name)
        if nid is not None:
            if len(self._paths) >= _PATH_CACHE_MAX:
                self._paths = {b"/": self.boot.root_nid}
            self._paths[path] = nid
        return nid

    def inode(self, nid: int) -> InodeInfo:
        return self.boot.getattr(nid)

    # ------------------------------------------------------------------ metadata
    def stat(self, nid: int) -> dict:
        """A stat dict (st_* keys, times in nanoseconds) like the kernel's EROFS reports."""
        i = self.boot.getattr(nid)
        t = i.mtime * 1_000_000_000 + i.mtime_nsec
        return {
            "st_mode": i.mode, "st_ino": nid, "st_nlink": i.nlink, "st_uid": i.uid,
            "st_gid": i.gid, "st_size": i.size, "st_rdev": i.rdev,
            "st_blksize": L.BLKSZ, "st_blocks": (i.size + L.BLKSZ - 1) // L.BLKSZ * (L.BLKSZ // 512),
            "st_atime": t, "st_mtime": t, "st_ctime": t,
        }

    def readdir(self, nid: int) -> list[tuple[bytes, int, int]]:
        """[(name, nid, st_mode type bits)] without '.' and '..'; NotADirectoryError otherwise."""
        return [(name, child, _MODE_OF_FT.get(ft, 0)) for name, child, ft in self.boot.readdir(nid)]

    def readlink(self, nid: int) -> bytes:
        return self.boot.readlink(nid)

    def xattrs(self, nid: int) -> dict[bytes, bytes]:
        return self.boot.xattrs(nid)

    def statfs(self) -> dict:
        """statvfs fields: read-only, full, sizes of the image (like the kernel's erofs_statfs)."""
        sb = self.boot.erofs.sb
        blocks = sb.blocks + sum(b.uncompressed_size for b in self.blobs) // L.BLKSZ
        return {"f_bsize": L.BLKSZ, "f_frsize": L.BLKSZ, "f_blocks": blocks, "f_bfree": 0,
                "f_bavail": 0, "f_files": sb.inos, "f_ffree": 0, "f_favail": 0,
                "f_namemax": L.NAME_LEN}

    # ------------------------------------------------------------------ data
    def blob_cache(self, index: int):
        """The BlobCache of blob `index`, opened on first use (its chunks come from the
        bootstrap's chunk table: opening fetches nothing)."""
        c = self._blob_caches[index]
        if c is None:
            # No lock here: CacheManager.open gives concurrent openers of one blob the same cache,
            # and opening blob B never waits for blob A's.
            c = self._blob_caches[index] = self.caches.open(self.blobs[index])
        return c

    def read_blob(self, index: int, offset: int, size: int) -> bytes:
        """Bytes of blob `index`'s uncompressed view (what erofs mode's device files serve)."""
        if not 0 <= index < len(self.blobs):
            raise RafsError(f"no blob #{index} (the image has {len(self.blobs)})")
        end = min(offset + size, self.blobs[index].uncompressed_size)
        if offset >= end:
            return b""
        self.counters.add(end - offset)
        # A blob holds many files: only a long run (a big file read in order) reads ahead. Inside
        # the prefetched head of a blob it stops at the head's end: past it lie chunks the
        # prefetch list did not ask for (the workload reading the head in list order is a "stream").
        limit = self.blobs[index].uncompressed_size
        head = self._prefetch_end.get(index, 0)
        ahead = self.readahead.advance(("blob", index), offset, end - offset,
                                       head if offset < head else limit, min_run=BLOB_STREAM_RUN)
        if ahead is not None:
            self._fetch_ahead(index, [ahead])
        return self._blob_bytes(index, offset, end)

    def _fetch_ahead(self, index: int, ranges: list[tuple[int, int]]) -> None:
        """Background fetch of view ranges a sequential reader is about to ask for."""
        try:
            self.blob_cache(index).prefetch(ranges, low_priority=False)
        except RafsError as e:           # the read itself will report it
            log.debug("readahead of blob #%d: %s", index, e)

    def _blob_bytes(self, index: int, offset: int, end: int) -> bytes:
        self.access.blob_read(index, offset, end)
        data = self.blob_cache(index).read(offset, end - offset)
        if len(data) < end - offset:      # a view shorter than the bootstrap says: pad like a hole
            data += bytes(end - offset - len(data))
        return data

    def read(self, nid: int, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of regular file `nid`, clipped to its size."""
        self.counters.add(size, file=True)
        self.access.file_read(nid, offset, size)
        info = self.boot.getattr(nid)
        ahead = self.readahead.advance(("file", nid), offset, size, info.size)
        if ahead is not None:
            by_blob: dict[int, list[tuple[int, int]]] = defaultdict(list)
            for ext in self.boot.file_extents(nid, ahead[0], ahead[1]):
                if ext.blob_index >= 0:
                    by_blob[ext.blob_index].append((ext.blob_offset, ext.length))
            for index, ranges in by_blob.items():
                self._fetch_ahead(index, join_gaps(ranges, 0))
        parts = []
        for ext in self.boot.file_extents(nid, offset, size):
            if ext.blob_index < 0:
                parts.append(bytes(ext.length))
            else:
                parts.append(self._blob_bytes(ext.blob_index, ext.blob_offset, ext.blob_offset + ext.length))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # ------------------------------------------------------------------ prefetch
    def prefetch_ranges(self, entries: Iterable[bytes | PrefetchEntry]) -> dict[int, list[tuple[int, int]]]:
        """Blob view ranges holding the prefetch `entries`, by blob, blobs in first-use order.

        An entry is a path (a file, or a directory: every file below) or a PrefetchEntry whose
        `ranges` name byte ranges of one regular file. Entries that are not in the image, or
        ranges of something that is not a regular file, are skipped: a bootstrap never makes
        the prefetch fail."""
        ranges: dict[int, list[tuple[int, int]]] = defaultdict(list)
        seen: set[int] = set()
        for entry in entries:
            path, spans = (entry, None) if isinstance(entry, bytes) else entry
            nid = self.resolve(path)
            if nid is None:
                log.debug("prefetch: %r is not in the image", path)
                continue
            if spans is None:
                pieces = [(f, 0, self.boot.getattr(f).size) for f in self._files_under(nid, seen)]
            elif self.boot.getattr(nid).is_reg():
                pieces = [(nid, off, length) for off, length in spans]
            else:
                log.debug("prefetch: %r has byte ranges but is not a regular file", path)
                continue
            for fnid, off, length in pieces:
                for ext in self.boot.file_extents(fnid, off, length):    # clipped to the file's size
                    if ext.blob_index >= 0:
                        ranges[ext.blob_index].append((ext.blob_offset, ext.length))
        return {i: join_gaps(r, 0) for i, r in ranges.items()}

    def _files_under(self, nid: int, seen: set[int]) -> Iterable[int]:
        stack = [nid]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            info = self.boot.getattr(n)
            if info.is_reg():
                yield n
            elif info.is_dir():
                stack.extend(child for _, child, _ in reversed(self.boot.readdir(n)))

    def prefetch(self, entries: Iterable[bytes | PrefetchEntry], *, low_priority: bool = True) -> list:
        """Start background fetches of the prefetch `entries`; returns the caches' Futures.

        Each blob fetches its ranges in blob order, merged into large requests; a blob
        converted with this list holds them at its head in list order, so that is list order."""
        futures = []
        for index, ranges in self.prefetch_ranges(entries).items():
            self._prefetch_end[index] = max(self._prefetch_end.get(index, 0), ranges[-1][0] + ranges[-1][1])
            futures.append(self.blob_cache(index).prefetch(ranges, low_priority=low_priority))
        return futures

    def prefetch_wave(self, wave) -> list:
        """Fetch one wave of blob view ranges, [(blob index, [(offset, size)])] (`rafs.learned`), the
        way a read does (its requests in parallel); each blob's ranges are joined over gaps cheaper to
        fetch than another request (the link's measured bandwidth-delay product). Returns the Futures."""
        futures = []
        for index, ranges in wave:
            cache = self.blob_cache(index)
            gap = cache.cost_model.amplify_bytes()
            futures.append(cache.prefetch(join_gaps(ranges, gap), low_priority=False))
        return futures

    def prefetch_all(self) -> list:
        """Fetch every blob completely in the background, at low priority."""
        return [self.blob_cache(i).prefetch_all() for i in range(len(self.blobs))]


class Readahead:
    """Sequential-read detection: once a stream of reads has run `min_run` bytes in order,
    fetch ahead of it in the background, in a window growing from `min_window` to `max_window`.

    A small read never triggers it, so it fetches only the chunks it covers; reads of one
    stream arriving a little out of order (the kernel sends readahead requests in parallel)
    still count as sequential.
    """

    SLACK = 4 << 20                 # how far behind the stream's end a read of it may land
    GAP = 128 << 10                 # ... and how far after it (more is a jump: a new stream)
    MAX_STREAMS = 1024

    def __init__(self, min_window: int = 4 << 20, max_window: int = 64 << 20):
        self.min_window, self.max_window = min_window, max_window
        self._lock = threading.Lock()
        self._streams: dict[tuple, list[int]] = {}     # key -> [start, end, front, window]

    def advance(self, key: tuple, offset: int, size: int, limit: int, min_run: int = 0
                ) -> tuple[int, int] | None:
        """Note a read of [offset, offset+size) of stream `key` (a file or a blob of `limit`
        bytes); returns (offset, size) to fetch ahead, or None."""
        end = offset + size
        with self._lock:
            s = self._streams.get(key)
            if s is None or not s[1] - self.SLACK <= offset <= s[1] + self.GAP:
                if len(self._streams) >= self.MAX_STREAMS:
                    self._streams.clear()
                self._streams[key] = [offset, end, end, 0]
                return None
            s[1] = max(s[1], end)
            if s[1] - s[0] < max(min_run, 1) or s[2] - s[1] > s[3] // 2:
                return None                            # not a stream yet, or far enough ahead
            s[3] = min(self.max_window, s[3] * 2) if s[3] else self.min_window
            start, stop = max(s[2], s[1]), min(limit, s[1] + s[3])
            if stop <= start:
                return None
            s[2] = stop
            return start, stop - start


class ReadCounters:
    """Read requests the filesystem served (what the kernel asked for): count, bytes, largest."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.file_reads = self.blob_reads = self.bytes = self.largest = 0

    def add(self, size: int, file: bool = False) -> None:
        with self._lock:
            if file:
                self.file_reads += 1
            else:
                self.blob_reads += 1
            self.bytes += size
            self.largest = max(self.largest, size)

    def snapshot(self) -> dict:
        with self._lock:
            return {"file_reads": self.file_reads, "blob_reads": self.blob_reads,
                    "bytes_requested": self.bytes, "largest_request": self.largest}


def join_gaps(ranges: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Sorted (offset, size) ranges, neighbours at most `gap` bytes apart joined into one."""
    out: list[list[int]] = []
    for off, size in sorted(ranges):
        if out and off - (out[-1][0] + out[-1][1]) <= gap:
            out[-1][1] = max(out[-1][1], off + size - out[-1][0])
        else:
            out.append([off, size])
    return [(o, n) for o, n in out]
