"""The bounded blob cache with a real mount daemon (`nydusify mount --cache-max-size`, a real
docker-registry), issue #12 part 3:

* with a limit smaller than the image, reading the whole image twice (page cache dropped between the
  passes, so reads reach the daemon) gives the right bytes, and the cache directory never takes more
  than the limit plus one chunk (st_blocks * 512 of its files, sampled during the reads); stats and
  /metrics show the evictions;
* a cache on a full filesystem (a 1 MiB tmpfs) still serves every read.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading

import pytest

from rafs.storage.cache.evict import tree_bytes
from tests.helpers.mounts import (LAZY_CHUNK, MODES, convert_into, lazy_source, mounter,  # noqa: F401
                                  nydusify)

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE and kernel mounts)"),
              pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo")]

LIMIT = 2 << 20                    # the image holds ~6.9 MiB of file data


@pytest.fixture(scope="module")
def lazy_ref(lazy_source, registry_session) -> str:
    return convert_into(registry_session, lazy_source.ref, "cachelimit/lazy")


def _drop(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_all(m, lazy_source) -> list[str]:
    wrong = []
    for p in lazy_source.files:
        f = m.path / p
        _drop(f)
        if f.read_bytes() != lazy_source.expected(p):
            wrong.append(p)
    return wrong


@pytest.mark.parametrize("mode", MODES)
def test_whole_image_twice_under_a_smaller_limit(mode, mounter, lazy_ref, lazy_source):
    m = mounter.mount(lazy_ref, mode=mode, extra=("--cache-max-size", "2M"))
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_bytes(str(m.cache_dir)))
            stop.wait(0.002)

    t = threading.Thread(target=sample)
    t.start()
    fetched = []
    try:
        for _ in range(2):
            with open("/proc/sys/vm/drop_caches", "w") as f:   # erofs: the FUSE blob files' pages too
                f.write("1")
            assert _read_all(m, lazy_source) == []
            fetched.append(m.stats()["bytes_fetched"])
    finally:
        stop.set()
        t.join()
    assert 0 < peak[0] <= LIMIT + LAZY_CHUNK, (peak[0], LIMIT)
    st = m.stats()
    assert st["cache"]["max_size"] == LIMIT
    assert st["cache"]["evictions"] > 0
    assert fetched[1] > fetched[0]                    # evicted chunks were fetched again when read
    text = nydusify("stats", m.path, "--run-dir", m.run_dir).stdout
    assert "chunks evicted" in text and "limit" in text, text
    m.umount()


@pytest.fixture
def full_fs(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("mode", MODES)
def test_a_cache_on_a_full_filesystem_still_serves_reads(mode, mounter, lazy_ref, lazy_source, full_fs):
    m = mounter.mount(lazy_ref, mode=mode, cache_dir=full_fs / "cache")
    for _ in range(2):
        assert _read_all(m, lazy_source) == []
    st = m.stats()
    assert st["cache"]["write_error"]
    assert "NOT CACHING" in nydusify("stats", m.path, "--run-dir", m.run_dir).stdout
    m.umount()
