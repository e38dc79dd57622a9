"""Sets of byte ranges: sorted, disjoint, half-open [start, end) intervals.

Announcements, claims and plans all speak in ranges of a blob's *stored*
(compressed) bytes. Every range the P2P layer produces is a union of whole
"units" (a chunk's payload), so intersections and differences of such sets
stay on unit boundaries.

`RangeSet` is an immutable value: operations return new sets. Wire form: a
list of [start, end] pairs (`to_json` / `from_json`, which validates).
"""
from __future__ import annotations

from typing import Iterable, Iterator

MAX_RANGES = 1 << 16           # sanity bound on ranges accepted from the wire


class RangeSet:
    """An immutable set of half-open integer ranges, kept sorted, merged and non-empty."""

    __slots__ = ("_r",)

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()):
        self._r: tuple[tuple[int, int], ...] = _normalize(ranges)

    @classmethod
    def single(cls, start: int, end: int) -> "RangeSet":
        return cls([(start, end)])

    @classmethod
    def from_json(cls, value) -> "RangeSet":
        """From a list of [start, end] pairs (untrusted input): ValueError if malformed."""
        if not isinstance(value, list) or len(value) > MAX_RANGES:
            raise ValueError("ranges must be a list of at most %d [start, end] pairs" % MAX_RANGES)
        out = []
        for item in value:
            if (not isinstance(item, (list, tuple)) or len(item) != 2
                    or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)):
                raise ValueError(f"bad range {item!r}: want [start, end] integers")
            a, b = item
            if a < 0 or b < a or b > 1 << 62:
                raise ValueError(f"bad range [{a}, {b}]")
            out.append((a, b))
        return cls(out)

    def to_json(self) -> list[list[int]]:
        return [[a, b] for a, b in self._r]

    # -- queries
    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._r)

    def __len__(self) -> int:
        return len(self._r)

    def __bool__(self) -> bool:
        return bool(self._r)

    def __eq__(self, other) -> bool:
        return isinstance(other, RangeSet) and self._r == other._r

    def __hash__(self) -> int:
        return hash(self._r)

    def __repr__(self) -> str:
        return "RangeSet(%s)" % ", ".join(f"[{a}, {b})" for a, b in self._r)

    @property
    def size(self) -> int:
        """Total bytes covered."""
        return sum(b - a for a, b in self._r)

    def covers(self, start: int, end: int) -> bool:
        """True if [start, end) lies entirely inside the set (an empty range always does)."""
        if start >= end:
            return True
        for a, b in self._r:
            if a <= start and end <= b:
                return True
            if a > start:
                break
        return False

    # -- algebra
    def __or__(self, other: "RangeSet") -> "RangeSet":
        return RangeSet(self._r + other._r)

    def __and__(self, other: "RangeSet") -> "RangeSet":
        out = []
        i = j = 0
        x, y = self._r, other._r
        while i < len(x) and j < len(y):
            a = max(x[i][0], y[j][0])
            b = min(x[i][1], y[j][1])
            if a < b:
                out.append((a, b))
            if x[i][1] < y[j][1]:
                i += 1
            else:
                j += 1
        return RangeSet(out)

    def __sub__(self, other: "RangeSet") -> "RangeSet":
        out = []
        y = other._r
        j = 0
        for a, b in self._r:
            while j < len(y) and y[j][1] <= a:
                j += 1
            k = j
            cur = a
            while k < len(y) and y[k][0] < b:
                if y[k][0] > cur:
                    out.append((cur, y[k][0]))
                cur = max(cur, y[k][1])
                k += 1
            if cur < b:
                out.append((cur, b))
        return RangeSet(out)


def _normalize(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    items = sorted((int(a), int(b)) for a, b in ranges if b > a)
    out: list[tuple[int, int]] = []
    for a, b in items:
        if out and a <= out[-1][1]:
            if b > out[-1][1]:
                out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)
