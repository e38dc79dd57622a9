"""p2p.ranges.RangeSet against a model: the set of integers it covers."""
from __future__ import annotations

import random

import pytest

from p2p.ranges import RangeSet


def _points(rs: RangeSet) -> set[int]:
    return {x for a, b in rs for x in range(a, b)}


def _random_set(rng: random.Random) -> RangeSet:
    out = []
    for _ in range(rng.randrange(0, 6)):
        a = rng.randrange(0, 60)
        out.append((a, a + rng.randrange(0, 15)))
    return RangeSet(out)


def test_normalizes_sorted_disjoint_merged():
    rs = RangeSet([(10, 20), (0, 5), (5, 7), (15, 30), (40, 40)])
    assert list(rs) == [(0, 7), (10, 30)]
    assert rs.size == 27
    assert rs.covers(11, 30) and rs.covers(0, 7) and not rs.covers(6, 11)
    assert rs.covers(50, 50)                   # the empty range is always covered


@pytest.mark.parametrize("seed", range(200))
def test_algebra_matches_the_integer_model(seed):
    rng = random.Random(seed)
    x, y = _random_set(rng), _random_set(rng)
    assert _points(x | y) == _points(x) | _points(y)
    assert _points(x & y) == _points(x) & _points(y)
    assert _points(x - y) == _points(x) - _points(y)
    for rs in (x | y, x & y, x - y):             # results stay normalized
        items = list(rs)
        assert all(a < b for a, b in items)
        assert all(items[i][1] < items[i + 1][0] for i in range(len(items) - 1))


def test_json_round_trip_and_validation():
    rs = RangeSet([(0, 4), (8, 9)])
    assert RangeSet.from_json(rs.to_json()) == rs
    for bad in ("x", [[1]], [[2, 1]], [[-1, 3]], [["a", 2]], [[True, 2]], [[0, 1 << 63]]):
        with pytest.raises(ValueError):
            RangeSet.from_json(bad)
