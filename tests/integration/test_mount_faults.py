"""Faults under a lazy mount: tampered blobs and a registry that goes away (issue #3).

Each test gets its own real docker-registry (the `registry` fixture) so it can
tamper with the registry's storage or stop and restart it on the same port.
The rules: EIO to the reader, never a wrong byte; the daemon lives on; reads
succeed again once the registry is back.
"""
from __future__ import annotations

import errno
import os
import shutil
import time

import pytest

from converter.nydus_image import open_nydus_image
from tests.helpers.mounts import MODES, convert_into, lazy_source, mounter  # noqa: F401

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE and kernel mounts)"),
              pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo")]


def chunk_of(ref: str, path: str, which: int) -> tuple[str, int, int]:
    """(blob digest, compressed offset, compressed size) of chunk `which` (-1: last) of file `path`."""
    with open_nydus_image(ref, plain_http=True) as image:
        boot = image.bootstrap
        nid = boot.resolve(b"/" + path.encode())
        exts = [e for e in boot.file_extents(nid, 0, boot.getattr(nid).size) if e.blob_index >= 0]
        blob = exts[0].blob_index
        offs = [e.blob_offset + k for e in exts for k in range(0, e.length, boot.meta.chunk_size)]
        target = offs[which]
        entry = next(c for c in boot.meta.blobs[blob].entries      # the bootstrap's chunk table
                     if c.uncompressed_offset <= target < c.uncompressed_end)
        return image.blob_digest(blob), entry.compressed_offset, entry.compressed_size


def read_blocks(path, size: int) -> tuple[bytes, list[int]]:
    """Read a file in 64 KiB preads: (bytes of the blocks that read, offsets that failed with EIO)."""
    out, failed = bytearray(size), []
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in range(0, size, 65536):
            try:
                data = os.pread(fd, 65536, off)
                out[off:off + len(data)] = data
            except OSError as e:
                assert e.errno == errno.EIO, e
                failed.append(off)
    finally:
        os.close(fd)
    return bytes(out), failed


@pytest.mark.parametrize("mode", MODES)
def test_tampered_blob_gives_eio_never_wrong_bytes(mode, mounter, registry, lazy_source):
    ref = convert_into(registry, lazy_source.ref, "faults/tamper")
    victim, good = "data/r2", "data/r0"
    digest, off, size = chunk_of(ref, victim, -1)
    blob_file = registry.blob_data_path(digest)
    with open(blob_file, "r+b") as f:                   # flip one byte inside the last chunk of r2
        f.seek(off + size // 2)
        b = f.read(1)
        f.seek(off + size // 2)
        f.write(bytes([b[0] ^ 0xFF]))

    m = mounter.mount(ref, mode=mode)
    with pytest.raises(OSError) as e:
        (m.path / victim).read_bytes()
    assert e.value.errno == errno.EIO
    expected = lazy_source.expected(victim)
    got, failed = read_blocks(m.path / victim, len(expected))
    assert failed, "the tampered chunk was served"
    for start in range(0, len(expected), 65536):        # every block that read is right
        if start not in failed:
            assert got[start:start + 65536] == expected[start:start + 65536], start
    assert failed[-1] >= len(expected) - 2 * 65536      # only the tail (the tampered chunk) fails

    assert (m.path / good).read_bytes() == lazy_source.expected(good)
    with pytest.raises(OSError):                         # still EIO: nothing bad was cached
        (m.path / victim).read_bytes()
    st = m.stats()
    assert m.alive() and st["verify_failures"] >= 1
    assert "failed verification" in mounter.daemon_log(m.path)


@pytest.mark.parametrize("mode", MODES)
def test_registry_stopped_mid_read_then_back(mode, mounter, registry, lazy_source):
    ref = convert_into(registry, lazy_source.ref, "faults/outage")
    m = mounter.mount(ref, mode=mode)
    assert (m.path / "data" / "r0").read_bytes() == lazy_source.expected("data/r0")

    registry.stop()
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        (m.path / "data" / "r1").read_bytes()
    elapsed = time.monotonic() - t0
    assert e.value.errno == errno.EIO
    assert elapsed < 20, f"EIO took {elapsed:.1f} s: retries are not bounded"
    st = m.stats()                                      # the daemon lives and says what happened
    assert m.alive() and st["request_errors"] >= 1
    assert (m.path / "data" / "r0").read_bytes() == lazy_source.expected("data/r0")   # cached: fine

    registry.start()                                    # same port, same storage
    assert (m.path / "data" / "r1").read_bytes() == lazy_source.expected("data/r1")
    assert (m.path / "many" / "f11").read_bytes() == lazy_source.expected("many/f11")
    assert m.alive() and m.stats()["verify_failures"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_prefetch_all_makes_the_mount_independent_of_the_registry(mode, mounter, registry, lazy_source):
    ref = convert_into(registry, lazy_source.ref, "faults/prefetch-all")
    m = mounter.mount(ref, mode=mode, extra=("--prefetch-all",))
    st = m.wait_stats(lambda s: s["prefetch"] == "done" and s["cache"]["chunks_ready"] == s["cache"]["chunks_total"])
    assert st["cache"]["chunks_ready"] == st["cache"]["chunks_total"] > 0, st["cache"]
    assert st["bytes_read"] == 0 and st["prefetch_bytes"] > 0
    registry.stop()
    for path in lazy_source.files:
        assert (m.path / path).read_bytes() == lazy_source.expected(path), path
    assert m.stats()["request_errors"] == 0
