"""The lazy-start benchmark suite end to end on a tiny image (issue #5).

`python -m benchmarks.lazy_start --quick` on the busybox test image (built by
tests/helpers/images.py, no debootstrap, no network): its own docker-registry
on 127.0.0.1, a loop-mounted ext4, a private containerd for the overlayfs
baseline and the `ctr run --rootfs` runner, real lazy mounts in fuse and erofs
mode. Checks that every mode ran (or says why not), that results.json,
report.md and chart.png are well-formed, and that nothing is left mounted.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import report
from rafs.osutil import mounts_below
from tests.helpers import images as im

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("containerd", "ctr", "runc", "docker-registry", "skopeo", "mkfs.ext4")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, containerd)"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse"),
    pytest.mark.skipif(not os.path.isfile("/bin/busybox"), reason="needs busybox-static"),
]


def test_quick_suite_on_busybox(tmp_path):
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if any(t in missing for t in ("docker-registry", "skopeo", "mkfs.ext4")):
        pytest.skip(f"missing {missing}")
    image = im.build_busybox_layout(tmp_path / "busybox")
    out = tmp_path / "out"
    modes = ["fuse", "erofs", "fuse+prefetch", "erofs+prefetch", "erofs+learned", "warm", "p2p"]
    cmd = [sys.executable, "-m", "benchmarks.lazy_start", "--quick", "--extra-image", f"busybox={image.ref}",
           "--workloads", "echo@busybox", "--workdir", str(tmp_path / "wd"), "--out", str(out),
           "--fast-size", "2G", "--timeout", "60"]
    if missing:                                    # no containerd: chroot runner, no overlayfs baseline
        cmd += ["--runner", "chroot", "--modes", *modes]
    else:
        cmd += ["--runner", "auto", "--modes", "overlayfs", *modes]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, errors="replace", timeout=200,
                       stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    assert elapsed < 110, f"the quick suite took {elapsed:.0f} s"
    assert not mounts_below(tmp_path), mounts_below(tmp_path)
    assert not list((tmp_path / "wd").glob("netns/*"))              # loopback: no namespace; none left

    rows = json.loads((out / "results.json").read_text())
    assert isinstance(rows, list) and rows
    assert report.validate(rows) == []
    by_mode = {row["mode"]: row for row in rows}
    expected = set(modes) | (set() if missing else {"overlayfs"})
    assert set(by_mode) == expected
    for row in rows:
        assert (row["image"], row["workload"], row["link"], row["repeat"]) == ("busybox", "echo@busybox", "lo", 0)
        assert row["read_bytes"] and row["read_bytes"] > 0          # busybox itself is read
        if row["ok"]:
            assert 0 < row["pull_s"] <= row["total_s"] and 0 < row["ready_s"] <= row["total_s"]
            if row.get("create_s") is not None:
                assert 0 < row["create_s"] <= row["ready_s"]
            assert "hello" in row["output"]
            assert row["fetched_bytes"] > 0 and row["requests"] > 0
        else:
            assert row.get("skipped") or row.get("error")
    # every mode that can run here did run
    must = {"fuse", "fuse+prefetch", "warm"} | (set() if missing else {"overlayfs"})
    from benchmarks.modes import p2p_supported
    from rafs.kmount import erofs_file_backed_supported
    if erofs_file_backed_supported():
        must |= {"erofs", "erofs+prefetch", "erofs+learned"}
    if p2p_supported() is None:
        must.add("p2p")
    failed = {m: by_mode[m].get("error") or by_mode[m].get("skipped") for m in must if not by_mode[m]["ok"]}
    assert not failed, failed
    # a cold lazy start fetches chunks; a warm one (or a node with a warm peer) only the manifest,
    # config and bootstrap from the registry
    assert by_mode["warm"]["blob_bytes"] < by_mode["fuse"]["blob_bytes"]
    if "p2p" in must:
        assert by_mode["p2p"]["blob_bytes"] < by_mode["fuse"]["blob_bytes"]
    if "erofs+learned" in must:
        # the priming run on "another node" published a record; the timed start prefetched by it
        learned = by_mode["erofs+learned"]
        assert learned["learned_prime"]["chunks"] > 0 and learned["learned_prime"]["runs"] == 1
        assert learned["learned"]["record"]["chunks"] == learned["learned_prime"]["chunks"]
        assert learned["learned"]["source"].startswith("image")        # from the registry, not this node
        assert learned["learned"]["prefetch_bytes"] > 0
        # no other mode learned or prefetched by a record (learn off everywhere else)
        for m in must - {"erofs+learned", "overlayfs"}:
            d = by_mode[m].get("daemon") or {}
            assert not (d.get("learned") or {}).get("record"), (m, d.get("learned"))
    if not missing:                                # containerd pulls every layer in full
        assert by_mode["overlayfs"]["blob_bytes"] >= sum(layer.size for layer in image.manifest.layers)

    md = (out / "report.md").read_text()
    assert "| image | workload |" in md and ("| overlayfs |" in md or missing)
    assert "`echo@busybox`" in md and "Link: loopback" in md
    for m in must:
        assert f"| {m} |" in md
    assert "## Conversion" in md and "## What each workload reads" in md
    assert "## Goals (issue 15), side by side in this run" in md
    if "erofs+learned" in must:
        assert "erofs+learned / erofs+prefetch (≤ 1.15×)" in md and "### Learned prefetch (erofs+learned)" in md
    png = (out / "chart.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    meta = json.loads((out / "meta.json").read_text())
    assert meta["runner"] in (("chroot",) if missing else ("snapshotter", "ctr"))
    assert meta["links"]["lo"]["name"] == "lo" and meta["conversions"]["busybox"]["plain"]["converted_bytes"] > 0
