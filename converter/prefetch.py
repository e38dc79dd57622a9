"""--prefetch-patterns: what a mount fetches first.

A pattern file has one entry per line (blank lines and `#` comments skipped):

    PATH                       a file, or a directory: every regular file below it
    PATH<TAB>OFF+LEN,OFF+LEN   byte ranges (decimal) of one regular file

Entries keep their order; that order is the prefetch order at mount, and the
order the chunks are laid out at the head of the blobs.
"""
from __future__ import annotations

import logging
import re
from typing import Iterable, NamedTuple

from rafs.bootstrap import PrefetchEntry
from rafs.tree import Inode, lookup, walk

log = logging.getLogger(__name__)

_RANGE = re.compile(r"(\d+)\+(\d+)")


class Pattern(NamedTuple):
    path: str
    ranges: tuple[tuple[int, int], ...] | None    # None: the whole file or directory
    where: str                                    # "FILE:LINE", for error messages


def parse_pattern(line: str, where: str) -> Pattern:
    """One pattern line (comments and blank lines are the caller's business); ValueError naming `where`."""
    path, tab, spec = line.rstrip("\r\n").partition("\t")
    path = path.strip()
    if not path:
        raise ValueError(f"{where}: no path before the ranges")
    if not tab:
        return Pattern(path, None, where)
    ranges = []
    for item in spec.split(","):
        m = _RANGE.fullmatch(item.strip())
        if m is None:
            raise ValueError(f"{where}: bad range {item.strip()!r}: expected OFFSET+LENGTH (decimal bytes)")
        off, length = int(m[1]), int(m[2])
        if length == 0:
            raise ValueError(f"{where}: empty range {item.strip()!r}")
        ranges.append((off, length))
    return Pattern(path, tuple(ranges), where)


def read_patterns(path: str) -> list[Pattern]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return [parse_pattern(line, f"{path}:{n}") for n, line in enumerate(f, 1)
                if line.strip() and not line.lstrip().startswith("#")]


def as_patterns(items: Iterable[str | Pattern]) -> list[Pattern]:
    """Patterns given as lines (the API's ConvertOptions) or already parsed."""
    return [p if isinstance(p, Pattern) else parse_pattern(p, f"prefetch pattern {n}")
            for n, p in enumerate(items, 1)]


def expand_prefetch(root: Inode, patterns: Iterable[str | Pattern]) -> list[PrefetchEntry]:
    """The bootstrap's prefetch list: every existing regular file named by a pattern or lying under a
    named directory, in order, once. A file named again adds its ranges to its first entry (a
    whole-file mention makes it whole). Ranges are clamped to the file's size, sorted and merged."""
    wanted: dict[bytes, list | None] = {}          # path -> [(off, len)...] or None (whole); insertion = order
    sizes: dict[bytes, int] = {}
    for pat in as_patterns(patterns):
        path = b"/" + pat.path.encode("utf-8", "surrogateescape").strip(b"/")
        node = lookup(root, path)
        if node is None:
            log.debug("prefetch: %s: %s is not in the image", pat.where, pat.path)
            continue
        if pat.ranges is not None:
            if not node.is_reg():
                raise ValueError(f"{pat.where}: byte ranges need a regular file, but {pat.path} is "
                                 f"{'a directory' if node.is_dir() else 'not a regular file'}")
            files = [(path, node)]
        elif node.is_dir():
            files = [(path.rstrip(b"/") + p, n) for p, n in walk(node) if n.is_reg() and p != b"/"]
        else:
            files = [(path, node)] if node.is_reg() else []
        for p, n in files:
            sizes[p] = n.size
            if pat.ranges is None:
                wanted[p] = None
            elif p not in wanted:
                wanted[p] = list(_clamp(pat, n.size))
            elif wanted[p] is not None:
                wanted[p] += _clamp(pat, n.size)
    out = []
    for p, ranges in wanted.items():
        if ranges is None:
            out.append(PrefetchEntry(p))
            continue
        merged = merge_ranges(ranges)
        if merged == [(0, sizes[p])]:
            out.append(PrefetchEntry(p))            # the whole file: say so plainly
        elif merged:
            out.append(PrefetchEntry(p, tuple(merged)))
    return out


def _clamp(pat: Pattern, size: int) -> list[tuple[int, int]]:
    out = []
    for off, length in pat.ranges:
        end = min(off + length, size)
        if end < off + length:
            log.debug("prefetch: %s: range %d+%d of %s ends past its size %d: clamped",
                      pat.where, off, length, pat.path, size)
        if off < end:
            out.append((off, end - off))
    return out


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted (offset, length) ranges with overlapping or touching ones joined."""
    out: list[list[int]] = []
    for off, length in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], off + length - out[-1][0])
        else:
            out.append([off, length])
    return [(o, n) for o, n in out]


def prefetch_digests(root: Inode, entries: list[PrefetchEntry], chunk_size: int) -> list[bytes]:
    """Digests of the chunks the prefetch list reads, in list order, once: the blobs' head."""
    out: dict[bytes, None] = {}
    for e in entries:
        node = lookup(root, e.path)
        if node is None or not node.is_reg():
            continue
        spans = e.ranges if e.ranges is not None else [(0, node.size)]
        for off, length in spans:
            for k in range(off // chunk_size, min(len(node.chunks), -(-(off + length) // chunk_size))):
                ref = node.chunks[k]
                if ref is not None:
                    out.setdefault(ref.digest, None)
    return list(out)
