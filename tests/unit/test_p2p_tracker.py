"""p2p.tracker.TrackerState: atomic claims, expiry, updates, refill after a restart."""
from __future__ import annotations

import pytest

from p2p.ranges import RangeSet
from p2p.tracker import TrackerState

BLOB = "ab" * 32


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def tracker(clock):
    return TrackerState(clock=clock, claim_ttl=20)


def R(*pairs):
    return RangeSet(pairs)


def test_simultaneous_claims_grant_each_range_once(tracker):
    want = R((0, 100))
    first = tracker.claim("a", "10.0.0.1:1", 15, BLOB, want, set())
    assert RangeSet.from_json(first["granted"]) == want and not first["fetching"]
    for node in "bcd":
        other = tracker.claim(node, f"10.0.0.{ord(node)}:1", 15, BLOB, want, set())
        assert other["granted"] == []
        assert other["fetching"] == [{"addr": "10.0.0.1:1", "ranges": [[0, 100]]}]


def test_partial_overlap_splits_held_fetching_and_granted(tracker):
    tracker.update("a", "A:1", 15, BLOB, R((0, 50)), RangeSet())
    tracker.claim("b", "B:1", 15, BLOB, R((50, 80)), set())
    out = tracker.claim("c", "C:1", 15, BLOB, R((20, 120)), set())
    assert out["held"] == [{"addr": "A:1", "ranges": [[20, 50]]}]
    assert out["fetching"] == [{"addr": "B:1", "ranges": [[50, 80]]}]
    assert out["granted"] == [[80, 120]]


def test_update_releases_claims_and_adds_holdings(tracker):
    tracker.claim("a", "A:1", 15, BLOB, R((0, 100)), set())
    tracker.update("a", "A:1", 15, BLOB, R((0, 60)), R((60, 100)))     # 60..100 failed
    out = tracker.claim("b", "B:1", 15, BLOB, R((0, 100)), set())
    assert out["held"] == [{"addr": "A:1", "ranges": [[0, 60]]}]
    assert out["fetching"] == [] and out["granted"] == [[60, 100]]


def test_excluded_peers_are_ignored(tracker):
    tracker.update("a", "A:1", 15, BLOB, R((0, 100)), RangeSet())
    out = tracker.claim("b", "B:1", 15, BLOB, R((0, 100)), {"A:1"})
    assert out["held"] == [] and out["granted"] == [[0, 100]]


def test_claims_and_announcements_expire(tracker, clock):
    tracker.claim("a", "A:1", 60, BLOB, R((0, 100)), set())
    clock.t += 21                                  # claim_ttl 20 s: the claim is gone
    out = tracker.claim("b", "B:1", 15, BLOB, R((0, 100)), set())
    assert out["fetching"] == [] and out["granted"] == [[0, 100]]
    tracker.update("b", "B:1", 15, BLOB, R((0, 100)), RangeSet())
    clock.t += 16                                  # b's ttl of 15 s ran out without renewal
    assert tracker.peers(BLOB) == [p for p in tracker.peers(BLOB) if p["node"] != "b"]
    out = tracker.claim("c", "C:1", 15, BLOB, R((0, 100)), set())
    assert out["held"] == [] and out["granted"] == [[0, 100]]


def test_nodes_without_an_address_never_make_others_wait(tracker):
    tracker.claim("a", None, 15, BLOB, R((0, 100)), set())
    out = tracker.claim("b", "B:1", 15, BLOB, R((0, 100)), set())
    assert out["granted"] == [[0, 100]]


def test_restarted_tracker_refills_from_announcements(clock):
    old = TrackerState(clock=clock)
    old.update("a", "A:1", 15, BLOB, R((0, 100)), RangeSet())
    new = TrackerState(clock=clock)                # a restart: empty, new epoch
    assert new.epoch != old.epoch and new.peers(BLOB) == []
    new.announce("a", "A:1", 15, {BLOB: {"held": [[0, 100]], "fetching": []}})
    out = new.claim("b", "B:1", 15, BLOB, R((0, 100)), set())
    assert out["held"] == [{"addr": "A:1", "ranges": [[0, 100]]}]


def test_announce_replaces_state(tracker):
    tracker.announce("a", "A:1", 15, {BLOB: {"held": [[0, 100]], "fetching": []}})
    tracker.announce("a", "A:1", 15, {BLOB: {"held": [[0, 10]], "fetching": [[10, 20]]}})
    (p,) = tracker.peers(BLOB)
    assert p["held"] == [[0, 10]] and p["fetching"] == [[10, 20]]
