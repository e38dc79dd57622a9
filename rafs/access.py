"""What a mount read, in order: the access log behind learned prefetch and the file access audit.

`RafsFs` tells an `AccessLog` about every read it serves: blob view ranges in both modes (erofs
mode sees nothing else), file ranges in fuse mode. The log keeps

* the first access of each 4 KiB page of each blob, with its time since the mount's first
  read: those of the first `window` seconds are the order a container start needs data in, which
  `rafs.learned` turns into a prefetch record;
* per file, the first access time, the number of reads and the byte ranges read, for the
  mount's whole life (nydusd's access-pattern metrics): `nydusify stats MNT --files`.

In erofs mode the kernel reads blobs, not files: `files()` maps the blob ranges back to the files
whose chunks they hold (a chunk shared by two files counts for both).
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict

PAGE_BITS = 12                   # first accesses are kept per 4 KiB page of a blob's view
MAX_EVENTS = 1 << 20             # blob reads kept (the first that touched a page not seen before)
MAX_FILES = 1 << 20
MAX_RANGES_PER_FILE = 256        # more are merged into one covering range


class AccessLog:
    """Reads of one mount, thread-safe and cheap on the read path (a lock, a set lookup)."""

    def __init__(self, window: float = 30.0, clock=time.monotonic):
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._t0: float | None = None            # the first read
        self._seen: dict[int, bytearray] = {}     # blob -> one byte per page: read before
        self.events: list[tuple[int, int, int, int]] = []   # (ms since first read, blob, offset, end)
        self._files: dict[int, list] = {}        # nid -> [first ms, reads, [(offset, end)]]
        self.enabled = True

    def _now_ms(self) -> int:
        now = self._clock()
        if self._t0 is None:
            self._t0 = now
        return int((now - self._t0) * 1000)

    @property
    def started(self) -> bool:
        return self._t0 is not None

    def window_over(self) -> bool:
        return self._t0 is not None and self._clock() - self._t0 >= self.window

    def blob_read(self, blob: int, offset: int, end: int) -> None:
        """A read of [offset, end) of blob `blob`'s uncompressed view."""
        if not self.enabled or end <= offset:
            return
        p0, p1 = offset >> PAGE_BITS, ((end - 1) >> PAGE_BITS) + 1
        with self._lock:
            t = self._now_ms()
            if len(self.events) >= MAX_EVENTS:
                return
            seen = self._seen.get(blob)
            if seen is None:
                seen = self._seen[blob] = bytearray()
            if len(seen) < p1:
                seen.extend(bytes(p1 - len(seen)))
            if seen.find(0, p0, p1) < 0:              # every page read before
                return
            seen[p0:p1] = b"\x01" * (p1 - p0)
            self.events.append((t, blob, offset, end))

    def file_read(self, nid: int, offset: int, size: int) -> None:
        """A read of a regular file (fuse mode)."""
        if not self.enabled or size <= 0:
            return
        with self._lock:
            t = self._now_ms()
            f = self._files.get(nid)
            if f is None:
                if len(self._files) >= MAX_FILES:
                    return
                f = self._files[nid] = [t, 0, []]
            f[1] += 1
            rs = f[2]
            if rs and rs[-1][1] == offset:          # a sequential reader: extend the last range
                rs[-1] = (rs[-1][0], offset + size)
            else:
                rs.append((offset, offset + size))
                if len(rs) > MAX_RANGES_PER_FILE:
                    f[2] = merge_ranges(rs)
                    if len(f[2]) > MAX_RANGES_PER_FILE:
                        f[2] = [(f[2][0][0], f[2][-1][1])]

    def start_events(self) -> list[tuple[int, int, int, int]]:
        """The blob events of the first `window` seconds."""
        limit = self.window * 1000
        with self._lock:
            return [e for e in self.events if e[0] < limit]

    def snapshot(self) -> tuple[list, dict]:
        """(blob events, {nid: (first ms, reads, merged ranges)}) as they are now."""
        with self._lock:
            events = list(self.events)
            files = {nid: (f[0], f[1], merge_ranges(f[2])) for nid, f in self._files.items()}
        return events, files

    def summary(self) -> dict:
        with self._lock:
            return {"window_s": self.window, "recording": self.enabled and not self.window_over(),
                    "events": len(self.events), "files_read": len(self._files),
                    "first_read": self._t0 is not None}


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """Sorted, overlapping or touching [start, end) ranges joined."""
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


# --------------------------------------------------------------------------- files of a bootstrap

class FileIndex:
    """nid -> path, and blob view offset -> the file ranges stored there (built once, on demand:
    a walk of the whole tree)."""

    def __init__(self, boot, extents: bool = True):
        self.boot = boot
        self.extents = extents                                 # False: paths only (fuse mode's audit)
        self.paths: dict[int, bytes] = {}
        starts: dict[int, list] = defaultdict(list)          # blob -> [(blob offset, end, nid, file offset)]
        stack = [(boot.root_nid, b"")]
        seen = set()
        while stack:
            nid, path = stack.pop()
            if nid in seen:                                    # hard links: the first path names it
                continue
            seen.add(nid)
            info = boot.getattr(nid)
            if info.is_dir():
                self.paths.setdefault(nid, path or b"/")
                for name, child, _ in boot.readdir(nid):
                    stack.append((child, path + b"/" + name))
            elif info.is_reg():
                self.paths[nid] = path
                if not extents:
                    continue
                for ext in boot.file_extents(nid, 0, info.size):
                    if ext.blob_index >= 0:
                        starts[ext.blob_index].append((ext.blob_offset, ext.blob_offset + ext.length,
                                                       nid, ext.file_offset))
        self._extents = {b: sorted(v) for b, v in starts.items()}
        self._keys = {b: [x[0] for x in v] for b, v in self._extents.items()}
        # the longest extent bounds how far back an overlapping one can start
        self._longest = {b: max((x[1] - x[0] for x in v), default=0) for b, v in self._extents.items()}

    def files_at(self, blob: int, offset: int, end: int):
        """(nid, file offset, file end) of every file range stored in blob view [offset, end)."""
        ext, keys = self._extents.get(blob), self._keys.get(blob)
        if not ext:
            return
        i = bisect.bisect_left(keys, offset - self._longest[blob])
        while i < len(ext) and ext[i][0] < end:
            s, e, nid, foff = ext[i]
            if e > offset:
                lo, hi = max(s, offset), min(e, end)
                yield nid, foff + lo - s, foff + hi - s
            i += 1


def file_accesses(log: AccessLog, index: FileIndex, *, from_blobs: bool) -> list[dict]:
    """The audit: one entry per file read, in first-access order (path, first access ms, reads,
    ranges). `from_blobs` (erofs mode): derived from the blob events (then "reads" counts first
    reads that touched a page first); else the file reads."""
    events, files = log.snapshot()
    if from_blobs:
        acc: dict[int, list] = {}
        for t, blob, off, end in events:
            for nid, lo, hi in index.files_at(blob, off, end):
                f = acc.setdefault(nid, [t, 0, []])
                f[1] += 1
                f[2].append((lo, hi))
        files = {nid: (f[0], f[1], merge_ranges(f[2])) for nid, f in acc.items()}
    out = []
    for nid, (t, reads, ranges) in sorted(files.items(), key=lambda kv: (kv[1][0], kv[0])):
        path = index.paths.get(nid)
        if path is None:
            continue
        out.append({"path": path.decode("utf-8", "surrogateescape"), "first_access_ms": t, "reads": reads,
                    "ranges": [[s, e - s] for s, e in ranges],
                    "bytes": sum(e - s for s, e in ranges)})
    return out
