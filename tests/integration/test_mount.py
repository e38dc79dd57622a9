"""`nydusify mount` in erofs and fuse modes, against a real docker-registry (issue #3).

Daemons run as users run them (`nydusify mount --daemon` in a subprocess);
the registry's access log, not only our counters, says what was fetched.
Every mount is undone by the `mounter` fixture, even when a test fails.
"""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import threading
import time

import pytest

from rafs.mounttab import is_ours, mounts_at
from rafs.storage.cache.amplify import AMPLIFY_DEFAULT
from tests.helpers import trees as tr
from tests.helpers.mounts import (LAZY_CHUNK, MODES, blob_digests, convert_into, data_gets,  # noqa: F401
                                  lazy_source, mounter, nydusify)

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE and kernel mounts)"),
              pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo")]


@pytest.fixture(scope="module")
def awkward_ref(awkward_image, registry_session) -> str:
    return convert_into(registry_session, awkward_image.ref, "mount/awkward")


@pytest.fixture(scope="module")
def lazy_ref(lazy_source, registry_session) -> str:
    return convert_into(registry_session, lazy_source.ref, "mount/lazy")


@pytest.fixture(scope="module")
def lazy_prefetch_ref(lazy_source, registry_session) -> str:
    return convert_into(registry_session, lazy_source.ref, "mount/lazy-prefetch",
                        "--prefetch-patterns", lazy_source.prefetch_file)


@pytest.mark.parametrize("mode", MODES)
def test_tree_equals_umoci_unpack(mode, mounter, awkward_ref, awkward_tree):
    m = mounter.mount(awkward_ref, mode=mode)
    tr.assert_trees_equal(awkward_tree, tr.snapshot_tree(m.path), **tr.UMOCI_DIFF_OPTIONS)

    # read-only, statfs sensible
    with pytest.raises(OSError) as e:
        open(m.path / "etc" / "new-file", "w")
    assert e.value.errno == errno.EROFS
    vfs = os.statvfs(m.path)
    assert vfs.f_bsize == 4096 and vfs.f_flag & os.ST_RDONLY and vfs.f_bavail == 0 and vfs.f_blocks > 0

    # stats, through the CLI (JSON and text) and the API
    r = nydusify("stats", m.path, "--json", "--run-dir", m.run_dir)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["mode"] == mode and st["pid"] == m.pid and st["mountpoint"] == str(m.path)
    assert st["bytes_fetched"] > 0 and st["chunks_fetched"] > 0 and st["request_errors"] == 0
    assert st["verify_failures"] == 0 and st["fetch_latency_ms"]["count"] == st["requests"]
    assert st["cache"]["chunks_ready"] > 0
    text = nydusify("stats", m.path, "--run-dir", m.run_dir).stdout
    assert f"{mode} mode" in text and "fetched" in text and "latency" in text
    assert m.api().daemon()["state"] == "running"

    m.umount()
    assert not m.alive()
    assert not [x for x in mounts_at(str(m.path)) + mounts_at(m.state.blobs) if is_ours(x, m.state)]
    assert not os.path.exists(m.state.api_sock)


@pytest.mark.parametrize("mode", MODES)
def test_small_read_fetches_its_chunk_widened_by_the_amplification_only(mode, mounter, lazy_ref, lazy_source,
                                                                       registry_session):
    digests = blob_digests(lazy_ref)
    m = mounter.mount(lazy_ref, mode=mode)
    mark = registry_session.mark()
    assert (m.path / "etc" / "small.txt").read_bytes() == lazy_source.expected("etc/small.txt")
    gets = data_gets(registry_session, mark, digests)
    sent = sum(e.bytes for e in gets)
    st = m.stats()
    # no metadata from the blob (the bootstrap's chunk table says where chunks are): just the
    # chunk, widened over its successors up to the not yet measured link's default
    # amplification (amplify.py): far from the blob
    assert len(gets) <= 2, [(e.status, e.bytes) for e in gets]
    assert sent <= AMPLIFY_DEFAULT + LAZY_CHUNK + 4096, sent
    assert st["link"]["amplify_bytes"] == AMPLIFY_DEFAULT and st["image_bytes"] > 10 * sent
    assert st["backend_bytes"] == sent


@pytest.mark.parametrize("mode", MODES)
def test_warm_remount_fetches_nothing(mode, mounter, lazy_ref, lazy_source, registry_session):
    digests = blob_digests(lazy_ref)
    cache = mounter.base / "warm-cache"
    paths = ["etc/small.txt", "data/r0", "many/f07", "many/f30"]
    m = mounter.mount(lazy_ref, mode=mode, cache_dir=cache)
    for p in paths:
        assert (m.path / p).read_bytes() == lazy_source.expected(p)
    assert m.stats()["bytes_fetched"] > 0
    m.umount()

    mark = registry_session.mark()
    m2 = mounter.mount(lazy_ref, mode=mode, cache_dir=cache)
    for p in paths:
        assert (m2.path / p).read_bytes() == lazy_source.expected(p)
    assert data_gets(registry_session, mark, digests) == []
    st = m2.stats()
    assert st["bytes_fetched"] == 0 and st["backend_bytes"] == 0 and st["chunks_hit"] > 0


@pytest.mark.parametrize("mode", MODES)
def test_prefetch_list_is_fetched_without_reads(mode, mounter, lazy_prefetch_ref, lazy_source,
                                                registry_session):
    digests = blob_digests(lazy_prefetch_ref)
    prefetched = ["prefetch/p1", "prefetch/p2"]
    want = sum(len(lazy_source.files[p]) for p in prefetched)
    mark = registry_session.mark()
    m = mounter.mount(lazy_prefetch_ref, mode=mode)
    st = m.wait_stats(lambda s: s["prefetch"] == "done")
    assert st["prefetch"] == "done" and st["prefetch_files"] == 2
    assert want <= st["prefetch_bytes"] < want + 2 * LAZY_CHUNK
    assert st["bytes_read"] == 0                     # nobody read anything
    assert sum(e.bytes for e in data_gets(registry_session, mark, digests)) >= want

    mark = registry_session.mark()
    for p in prefetched:
        assert (m.path / p).read_bytes() == lazy_source.expected(p)
    assert m.stats()["bytes_fetched"] == st["bytes_fetched"]
    assert data_gets(registry_session, mark, digests) == []


KiB = 1024
RANGED = {"data/r1": [(100 * KiB, 10), (1024 * KiB, 200 * KiB)], "prefetch/p1": [(0, 1)]}
RANGED_CHUNKS = 1 + 4 + 1          # r1: chunk 1 and chunks 16..19; p1: chunk 0


@pytest.fixture(scope="module")
def lazy_ranged_ref(lazy_source, registry_session, tmp_path_factory) -> str:
    lst = tmp_path_factory.mktemp("ranged") / "list.txt"
    lst.write_text("".join(f"/{p}\t" + ",".join(f"{o}+{n}" for o, n in rs) + "\n" for p, rs in RANGED.items()))
    return convert_into(registry_session, lazy_source.ref, "mount/lazy-ranged", "--prefetch-patterns", lst)


@pytest.mark.parametrize("mode", MODES)
def test_ranged_prefetch_fetches_only_those_chunks(mode, mounter, lazy_ranged_ref, lazy_source, registry_session):
    digests = blob_digests(lazy_ranged_ref)
    mark = registry_session.mark()
    m = mounter.mount(lazy_ranged_ref, mode=mode)
    st = m.wait_stats(lambda s: s["prefetch"] == "done")
    assert st["prefetch_files"] == 2 and st["prefetch_ranged_files"] == 2 and st["bytes_read"] == 0
    # random data is stored as is: exactly the chunks the ranges touch, at the blob's head: one request
    assert st["prefetch_bytes"] == RANGED_CHUNKS * LAZY_CHUNK and st["chunks_fetched"] == RANGED_CHUNKS
    assert st["prefetch_requests"] == 1
    gets = data_gets(registry_session, mark, digests)
    assert sum(e.bytes for e in gets) == st["backend_bytes"] == RANGED_CHUNKS * LAZY_CHUNK

    # the ranged bytes are local now; the rest of the files is not
    mark = registry_session.mark()
    for p, ranges in RANGED.items():
        want = lazy_source.expected(p)
        with open(m.path / p, "rb") as f:
            for off, n in ranges:
                f.seek(off)
                assert f.read(n) == want[off:off + n]
    assert data_gets(registry_session, mark, digests) == []
    assert (m.path / "data/r1").read_bytes() == lazy_source.expected("data/r1")
    assert m.stats()["bytes_fetched"] > st["bytes_fetched"]


@pytest.mark.parametrize("mode", MODES)
def test_32_concurrent_readers(mode, mounter, lazy_ref, lazy_source):
    m = mounter.mount(lazy_ref, mode=mode)
    names = ["data/r0", "data/r1", "data/r2", "data/r3", "prefetch/p1"] + [f"many/f{i:02d}" for i in range(0, 40, 4)]
    expected = {p: lazy_source.expected(p) for p in names}
    errors: list[str] = []
    start = threading.Barrier(32)

    def reader(k: int) -> None:
        rng = random.Random(k)
        try:
            start.wait()
            if k < 12:                                   # a third read the same file, whole
                path = "data/r1"
                got = (m.path / path).read_bytes()
                if got != expected[path]:
                    errors.append(f"reader {k}: {path} differs")
                return
            for _ in range(8):                           # the others: random ranges of any file
                path = rng.choice(names)
                data = expected[path]
                off = rng.randrange(max(1, len(data)))
                n = rng.randrange(1, 300_000)
                fd = os.open(m.path / path, os.O_RDONLY)
                try:
                    got = os.pread(fd, n, off)
                finally:
                    os.close(fd)
                if got != data[off:off + n]:
                    errors.append(f"reader {k}: {path}[{off}:{off + n}] differs")
        except Exception as e:                           # noqa: BLE001 - collected, asserted below
            errors.append(f"reader {k}: {e!r}")

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:10]
    st = m.stats()
    assert st["verify_failures"] == 0 and st["request_errors"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_sigkilled_daemon_does_not_block_the_next_mount(mode, mounter, lazy_ref, lazy_source):
    # without a holder (--holder off): a killed daemon's mount is dead until the next mount clears it
    # (with one, the default for root, a new daemon takes over: test_failover.py)
    m = mounter.mount(lazy_ref, mode=mode, extra=("--holder", "off"))
    assert (m.path / "etc" / "small.txt").read_bytes() == lazy_source.expected("etc/small.txt")
    os.kill(m.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while m.alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not m.alive()
    with pytest.raises(OSError):                         # the mount is dead: nothing serves it
        (m.path / "data" / "r3").read_bytes()

    m2 = mounter.mount(lazy_ref, mode=mode, mountpoint=m.path, cache_dir=m.cache_dir)
    assert (m2.path / "data" / "r3").read_bytes() == lazy_source.expected("data/r3")
    assert (m2.path / "etc" / "small.txt").read_bytes() == lazy_source.expected("etc/small.txt")
    ours = [x for x in mounts_at(str(m2.path)) if is_ours(x, m2.state)]
    assert len(ours) == 1, ours                          # the stale mount is gone, not stacked under
    assert "cleared stale" in mounter.daemon_log(m2.path)

    m2.umount()
    assert not [x for x in mounts_at(str(m2.path)) + mounts_at(m2.state.blobs) if is_ours(x, m2.state)]


def test_mount_refuses_a_live_mountpoint_and_umount_of_nothing_fails(mounter, lazy_ref):
    m = mounter.mount(lazy_ref, mode="fuse")
    again = mounter.mount(lazy_ref, mode="fuse", mountpoint=m.path, check=False)
    assert again is None and "already mounted" in mounter.daemon_log(m.path)
    assert m.alive() and m.api().daemon()["state"] == "running"
    m.umount()
    r = nydusify("umount", m.path, "--run-dir", m.run_dir)
    assert r.returncode != 0 and "not mounted" in r.stderr


FOREGROUND_CASES = [pytest.param(m.values[0] if hasattr(m, "values") else m, how, marks=getattr(m, "marks", ()))
                    for m in MODES for how in ("SIGTERM", "SIGINT", "umount")]


@pytest.mark.parametrize("mode,how", FOREGROUND_CASES)
def test_foreground_daemon_stops_cleanly(mode, how, tmp_path, lazy_ref, lazy_source):
    """In the foreground until SIGTERM / SIGINT or an external unmount; then everything is undone."""
    import select
    import subprocess
    import sys

    from rafs.mounttab import clear_stale, state_paths
    from rafs.kmount import umount
    from tests.helpers.mounts import REPO

    mnt, run_dir = tmp_path / "mnt", tmp_path / "run"
    mnt.mkdir()
    paths = state_paths(str(mnt), str(run_dir))
    proc = subprocess.Popen([sys.executable, "-m", "converter.cli", "mount", lazy_ref, str(mnt), "--mode", mode,
                             "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(run_dir), "--plain-http",
                             "--learn", "off"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        line = proc.stdout.readline() if ready else ""
        assert f"mode {mode}" in line, line + (proc.stderr.read() if proc.poll() is not None else "")
        assert (mnt / "etc" / "small.txt").read_bytes() == lazy_source.expected("etc/small.txt")
        if how == "umount":
            umount(mnt)                                  # somebody else unmounts it
        else:
            proc.send_signal(getattr(signal, how))
        assert proc.wait(30) == 0, proc.stderr.read()
        out = proc.stdout.read()
        assert "unmounted" in out and (how in out or "externally" in out), out
        assert not [x for x in mounts_at(str(mnt)) + mounts_at(paths.blobs) if is_ours(x, paths)]
        for p in (paths.pid, paths.info, paths.api_sock, paths.image):
            assert not os.path.exists(p), p
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        clear_stale(str(mnt), paths)
