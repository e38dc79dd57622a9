"""Cached data at kernel speed (issue 15, item 3): in erofs mode a read of data the blob cache holds does
not reach the daemon.

* a complete, verified cache is the EROFS device itself (`device=<cache>/<id>.blob`), sealed and
  pinned: the bounded cache never punches it while mounted;
* a partial cache is stored into the kernel's page cache of the blob files at mount (FUSE_NOTIFY_STORE):
  a workload that reads what an earlier run read sends no request at all; what the cache lacks is still
  fetched, verified and served;
* never a wrong byte: a data file changed behind the cache's back is verified again before the kernel
  reads it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from rafs.mounttab import read_holder
from tests.helpers.mounts import convert_into, lazy_source, mounter, pid_alive  # noqa: F401

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE and kernel mounts)"),
              pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo")]


def _erofs_ok() -> bool:
    from rafs.kmount import erofs_file_backed_supported
    return os.geteuid() == 0 and erofs_file_backed_supported()


pytestmark.append(pytest.mark.skipif(not _erofs_ok(), reason="needs file-backed EROFS (Linux >= 6.12)"))

FIRST = ["etc/small.txt", "data/r1", "many/f03", "many/f17"]      # what the "earlier run" reads


@pytest.fixture(scope="module")
def kref(lazy_source, registry_session) -> str:
    return convert_into(registry_session, lazy_source.ref, "kcached/lazy")


def read_all(root: Path, paths) -> dict:
    return {p: (root / p).read_bytes() for p in paths}


def blob_reads(m) -> int:
    return m.stats()["requests_served"]["blob_reads"]


def kernel_totals(m) -> tuple[int, int]:
    """(blobs the kernel reads from the cache directly, bytes stored into its page cache at mount)."""
    t = m.stats()["cache"]
    return t["kernel_direct_blobs"], t["kernel_stored_bytes"]


def test_partial_cache_is_served_by_the_kernel(mounter, kref, lazy_source, tmp_path):
    cache = tmp_path / "cache"
    m = mounter.mount(kref, mode="erofs", cache_dir=cache, extra=("--holder", "on"))
    first = read_all(m.path, FIRST)
    assert blob_reads(m) > 0
    m.umount()

    m = mounter.mount(kref, mode="erofs", cache_dir=cache, extra=("--holder", "on"))
    st = m.wait_stats(lambda s: s["cache"]["kernel_fill"] == "done")
    assert st["cache"]["kernel_fill"] == "done"
    direct, stored = kernel_totals(m)
    assert direct == 0 and stored > 0, (direct, stored)
    again = read_all(m.path, FIRST)
    assert again == first == {p: lazy_source.expected(p) for p in FIRST}
    st = m.stats()
    assert st["requests_served"]["blob_reads"] == 0, st["requests_served"]
    assert st["bytes_fetched"] == 0
    # what the cache lacks: fetched, verified, served through the same (now page-cached) blob files
    rest = [p for p in lazy_source.files if p not in FIRST]
    assert read_all(m.path, rest) == {p: lazy_source.expected(p) for p in rest}
    assert blob_reads(m) > 0 and m.stats()["bytes_fetched"] > 0
    m.umount()


def wait_complete(m, timeout: float = 30.0) -> dict:
    st = m.wait_stats(lambda s: s["cache"]["chunks_ready"] == s["cache"]["chunks_total"] > 0, timeout)
    assert st["cache"]["chunks_ready"] == st["cache"]["chunks_total"], st["cache"]
    return st


def data_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.blob"))


def test_complete_cache_is_the_device(mounter, kref, lazy_source, tmp_path):
    cache = tmp_path / "cache"
    m = mounter.mount(kref, mode="erofs", cache_dir=cache, extra=("--prefetch-all",))
    wait_complete(m)
    m.umount()
    blobs = data_files(cache)
    assert blobs

    m = mounter.mount(kref, mode="erofs", cache_dir=cache)
    assert kernel_totals(m) == (len(blobs), 0)
    for b in blobs:
        assert b.with_suffix(".seal").exists()
        assert list(b.with_suffix(".kpin").iterdir()), "the data file is not pinned"
    assert read_all(m.path, lazy_source.files) == {p: lazy_source.expected(p) for p in lazy_source.files}
    st = m.stats()
    assert st["requests_served"]["blob_reads"] == 0 and st["bytes_fetched"] == 0
    m.umount()
    for b in blobs:
        assert not b.with_suffix(".kpin").exists(), "the pin outlived the mount"


def test_changed_data_file_is_verified_again(mounter, kref, lazy_source, tmp_path):
    """A byte of a sealed data file flipped behind the cache's back (its chunkmap still vouching for
    it): the seal no longer matches, so the next mount reads the blob through FUSE (every chunk
    re-checked before it is served) and verifies the whole file in the background, fetching the bad
    chunk again; only the mount after that lets the kernel read the file."""
    cache = tmp_path / "cache"
    m = mounter.mount(kref, mode="erofs", cache_dir=cache, extra=("--prefetch-all",))
    wait_complete(m)
    m.umount()
    m = mounter.mount(kref, mode="erofs", cache_dir=cache)        # seals it
    m.umount()
    target = lazy_source.expected("data/r2")
    for b in data_files(cache):
        raw = b.read_bytes()
        at = raw.find(target[:4096])
        if at >= 0:
            with open(b, "r+b") as f:
                f.seek(at + 100)
                f.write(bytes([raw[at + 100] ^ 0xFF]))
            break
    else:
        raise AssertionError("data/r2 not found in the cache")
    m = mounter.mount(kref, mode="erofs", cache_dir=cache)
    assert kernel_totals(m)[0] == 0          # the seal is broken: not read directly by this mount
    assert (m.path / "data/r2").read_bytes() == target
    # ... which re-checks every chunk in the background, fetches the changed one and seals the file again
    st = m.wait_stats(lambda s: s["storage"]["metrics"]["recheck_failures"] >= 1 and s["bytes_fetched"] > 0)
    assert st["storage"]["metrics"]["recheck_failures"] >= 1 and st["bytes_fetched"] > 0, st["storage"]["metrics"]
    deadline = time.monotonic() + 15
    while not all(b.with_suffix(".seal").exists() for b in data_files(cache)) and time.monotonic() < deadline:
        time.sleep(0.05)
    m.umount()
    m = mounter.mount(kref, mode="erofs", cache_dir=cache)
    assert kernel_totals(m)[0] == 1
    assert read_all(m.path, lazy_source.files) == {p: lazy_source.expected(p) for p in lazy_source.files}
    assert m.stats()["requests_served"]["blob_reads"] == 0
    m.umount()


def test_warm_mount_survives_sigkill(mounter, kref, lazy_source, tmp_path):
    """Failover with a warm cache: the daemon of a mount whose blob files hold stored pages is killed;
    the holder's new daemon serves what is not stored; nothing is wrong."""
    cache = tmp_path / "cache"
    m = mounter.mount(kref, mode="erofs", cache_dir=cache, extra=("--holder", "on"))
    read_all(m.path, FIRST)
    m.umount()
    m = mounter.mount(kref, mode="erofs", cache_dir=cache, extra=("--holder", "on"))
    assert read_holder(m.state)
    m.wait_stats(lambda s: s["cache"]["kernel_fill"] == "done")
    old = m.pid
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            pid = m.api().daemon()["pid"]
            if pid != old and pid_alive(pid):
                m.pid = pid
                break
        except Exception:                           # noqa: BLE001 - not answering yet
            pass
        time.sleep(0.05)
    else:
        raise AssertionError("no new daemon")
    want = {p: hashlib.md5(lazy_source.expected(p)).hexdigest() for p in lazy_source.files}
    got = {p: hashlib.md5((m.path / p).read_bytes()).hexdigest() for p in lazy_source.files}
    assert got == want
    m.umount()
