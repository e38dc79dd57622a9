"""benchmarks.report: the issue's goals side by side (erofs+learned, erofs, warm, conversion), misses in **NO**."""
from __future__ import annotations

from benchmarks import report


def _row(mode, total, *, ready=None, link="100mbit", image="numpy", wl="py-numpy", repeat=0, **kw):
    r = {"image": image, "workload": wl, "mode": mode, "link": link, "repeat": repeat, "pull_s": 0.1,
         "create_s": None, "ready_s": ready if ready is not None else total - 0.1, "total_s": total,
         "fetched_bytes": 1_000_000, "requests": 10, "read_bytes": 5_000_000,
         "chunk_compressed_bytes": 10_000_000, "ok": True, "load_1m": 0.5, "started": "2026-12-07T13:00:00"}
    r.update(kw)
    return r


META = {"links_order": ["100mbit"], "repeat": 1,
        "links": {"100mbit": {"name": "100mbit", "label": "100 Mbit/s", "throughput": {"bits_per_s": 100e6,
                                                                                         "bytes": 86e6}}},
        "conversions": {
            "numpy": {"source_bytes": 86e6, "plain": {"seconds": 4.4, "converted_bytes": 85e6},
                      "baseline": {"seconds": 2.0, "convert_s": 2.4, "repeat": 1}},
            "python": {"source_bytes": 68e6, "plain": {"seconds": 1.9, "converted_bytes": 68e6},
                       "baseline": {"error": "benchmarks.convert has no baseline()"}}}}


def _rows():
    # limit = warm total 0.6 + 10 MB * 8 / 100 Mbit/s = 0.6 + 0.8 = 1.4 s
    return [
        _row("overlayfs", 10.0, ready=0.20, rerun_s=0.18),
        _row("erofs", 2.6),                                   # 1.86x the limit: miss
        _row("erofs+prefetch", 1.6),
        _row("erofs+learned", 1.7, learned={"record": {"chunks": 40, "bytes": 9_000_000}, "prefetch_bytes": 8e6},
             daemon={"prefetch_bytes": 8_000_000}),           # 1.06x prefetch, 1.21x limit: met
        _row("warm", 0.6, ready=0.25),                         # 1.25x overlayfs's run: miss
    ]


def test_goal_checks_ratios():
    summ = report.summarize(_rows())
    g = report.goal_checks(summ, "100mbit", "numpy", "py-numpy", 100e6)
    assert round(g["learned_vs_prefetch"][0], 3) == round(1.7 / 1.6, 3)
    assert round(g["learned_vs_limit"][0], 3) == round(1.7 / 1.4, 3)
    assert round(g["erofs_vs_limit"][0], 3) == round(2.6 / 1.4, 3)
    assert round(g["warm_vs_overlayfs"][0], 3) == round(0.25 / 0.20, 3)
    assert [goal for _, _, goal in report.GOALS] == [1.15, 1.3, 1.5, 1.0]


def test_render_goals_table_marks_misses():
    md = report.render(_rows(), META)
    assert "## Goals (issue 15), side by side in this run" in md
    line = next(l for l in md.splitlines() if l.startswith("| 100mbit | numpy | `py-numpy` |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3:] == ["1.06× yes", "1.21× yes", "1.86× **NO**", "1.25× **NO**"]
    # conversion: measured ratio with its goal, or a clear note where it was not measured
    assert "| numpy | 2.40 | 2.00 | 1.20× yes |" in md
    assert "not measured here" in md and "python -m benchmarks.convert" in md
    # the conversion table: the suite's registry -> registry CLI time next to the goal's measure
    assert "| 4.40 | 2.40 | 2.00 | 1 | 1.20× yes |" in md
    assert "Met 3 of 5 checks. Misses:" in md
    assert "erofs / limit: 1.86× (goal ≤ 1.5×" in md
    assert "warm run / overlayfs run after its pull: 1.25× (goal ≤ 1.0×" in md
    # the per-link table has the same goals, and the learned-prefetch detail
    assert "| numpy | `py-numpy` | erofs+learned / erofs+prefetch | 1.06×" in md
    assert "### Learned prefetch (erofs+learned)" in md
    assert "| numpy | `py-numpy` | 40 | 9.0 | 8.0 |" in md
    # erofs+learned has its column in the main table, between erofs+prefetch and warm
    hdr = next(l for l in md.splitlines() if l.startswith("| image | workload | overlayfs"))
    assert "| erofs+prefetch | erofs+learned | warm |" in hdr
    assert report.validate(_rows()) == []


def test_missing_learned_mode_is_a_dash_not_a_miss():
    rows = [r for r in _rows() if r["mode"] != "erofs+learned"]
    md = report.render(rows, META)
    line = next(l for l in md.splitlines() if l.startswith("| 100mbit | numpy | `py-numpy` |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[3:5] == ["–", "–"]
