"""FetchCostModel: the miss widening is the link's bandwidth-delay product, once it can be measured."""
from __future__ import annotations

import random

import pytest

from rafs.storage.cache.amplify import AMPLIFY_DEFAULT, AMPLIFY_MAX, AMPLIFY_MIN, FetchCostModel


def _feed(model: FetchCostModel, latency: float, bandwidth: float, n: int = 64, noise: float = 0.0, seed: int = 1):
    rng = random.Random(seed)
    for _ in range(n):
        size = rng.randrange(16 << 10, 2 << 20)
        model.observe(size, (latency + size / bandwidth) * (1 + rng.uniform(-noise, noise)))


@pytest.mark.parametrize("latency, bandwidth", [(0.008, 12e6), (0.0095, 118e6), (0.004, 60e6)])
def test_fit_recovers_the_link_and_widens_by_its_bandwidth_delay_product(latency, bandwidth):
    m = FetchCostModel()
    _feed(m, latency, bandwidth, noise=0.05)
    lat, bw = m.fit()
    assert lat == pytest.approx(latency, rel=0.25) and bw == pytest.approx(bandwidth, rel=0.1)
    assert m.amplify_bytes() == pytest.approx(latency * bandwidth, rel=0.3)


def test_default_until_enough_varied_samples():
    m = FetchCostModel()
    assert m.amplify_bytes() == AMPLIFY_DEFAULT and m.snapshot()["latency_ms"] is None
    for _ in range(50):                       # all one size: latency and bandwidth cannot be told apart
        m.observe(65536, 0.01)
    assert m.fit() is None and m.amplify_bytes() == AMPLIFY_DEFAULT


def test_nonsense_fits_fall_back_and_results_are_clamped():
    m = FetchCostModel()
    for i in range(40):                       # bigger requests faster: no sane fit
        m.observe((i + 1) << 16, 1.0 / (i + 1))
    assert m.fit() is None and m.amplify_bytes() == AMPLIFY_DEFAULT
    slow = FetchCostModel()
    _feed(slow, 0.0005, 1e6)                  # 500 B of bandwidth-delay product
    assert slow.amplify_bytes() == AMPLIFY_MIN
    fast = FetchCostModel()
    _feed(fast, 0.05, 1e9)                    # 50 MB
    assert fast.amplify_bytes() == AMPLIFY_MAX


def test_recent_fetches_win_when_the_link_changes():
    m = FetchCostModel(window=64)
    _feed(m, 0.004, 1e9)
    _feed(m, 0.008, 12e6, seed=2)
    assert m.fit()[1] == pytest.approx(12e6, rel=0.1)


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        FetchCostModel(default=1 << 30)
