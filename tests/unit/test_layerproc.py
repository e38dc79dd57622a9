"""converter.layerproc: a layer converted by worker processes gives what in-process reading gives,
errors come back named, and no process outlives its layer."""
import gzip
import io
import os
import tarfile
import time

import pytest

from converter.layer import LayerError, LayerReader
from converter.layerproc import LayerWorker
from converter.pack import stage_payload

CHUNK = 64 * 1024


def _layer() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i, data in enumerate([os.urandom(200_000), b"hello\n" * 5000, bytes(3 * CHUNK), b"x", b"hello\n" * 5000]):
            ti = tarfile.TarInfo(f"d/f{i}")
            ti.size, ti.mtime = len(data), 1700000000
            tf.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("d/link")
        ti.type, ti.linkname = tarfile.SYMTYPE, "f0"
        tf.addfile(ti)
    return gzip.compress(buf.getvalue(), mtime=0)


class _Sink:
    def __init__(self):
        self.chunks = []

    def add(self, data, digest):
        self.chunks.append((digest, len(data), *stage_payload(bytes(data), "zstd")))


def _children() -> set[int]:
    me = os.getpid()
    out = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        out.add(int(pid))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _settle(before: set[int]) -> set[int]:
    for _ in range(50):
        left = _children() - before
        if not left:
            return left
        time.sleep(0.1)
    return left


def test_same_tree_and_chunks_as_in_process(tmp_path):
    data = _layer()
    before = _children()
    stage = tmp_path / "stage"
    tree, staged = LayerWorker("l0", CHUNK, "blake3", "zstd", str(stage), set(), None).run(io.BytesIO(data))
    sink = _Sink()
    ref = LayerReader("l0", CHUNK, "blake3", sink).read(io.BufferedReader(io.BytesIO(data)))
    assert [(c.digest, c.plain_size, c.size, c.flags) for c in staged] == [(d, n, len(p), f) for d, n, p, f in sink.chunks]
    assert stage.read_bytes() == b"".join(bytes(p) for _, _, p, _ in sink.chunks)
    files = lambda t: {n: [c.digest for c in i.chunks] for n, i in t.root.entries[b"d"].entries.items()}  # noqa: E731
    assert files(tree) == files(ref) and tree.root.entries[b"d"].entries[b"link"].symlink == b"f0"
    assert not _settle(before)


def test_seen_chunks_are_not_staged(tmp_path):
    data = _layer()
    tree, first = LayerWorker("l0", CHUNK, "blake3", "zstd", str(tmp_path / "a"), set(), None).run(io.BytesIO(data))
    _, second = LayerWorker("l0", CHUNK, "blake3", "zstd", str(tmp_path / "b"), {c.digest for c in first[:2]},
                            None).run(io.BytesIO(data))
    assert [c.digest for c in second] == [c.digest for c in first[2:]]


def test_a_bad_layer_is_named_and_leaves_no_process(tmp_path):
    before = _children()
    bad = bytearray(_layer())
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(LayerError, match="l1: unreadable layer"):
        LayerWorker("l1", CHUNK, "blake3", "zstd", str(tmp_path / "s"), set(), None).run(io.BytesIO(bytes(bad)))
    with pytest.raises(LayerError, match="does not match diff_id"):
        LayerWorker("l2", CHUNK, "blake3", "zstd", str(tmp_path / "t"), set(), "sha256:" + "0" * 64
                    ).run(io.BytesIO(_layer()))
    assert not _settle(before)


def test_a_worker_never_fed_ends_when_closed(tmp_path):
    before = _children()
    workers = [LayerWorker(f"l{i}", CHUNK, "blake3", "zstd", str(tmp_path / f"s{i}"), set(), None) for i in range(3)]
    assert _children() - before
    for w in workers:
        w.close()
    assert not _settle(before)


def test_a_failing_source_stream_is_raised(tmp_path):
    class Broken(io.RawIOBase):
        def readable(self):
            return True

        def read(self, n=-1):
            raise ConnectionResetError("connection reset by registry")

    before = _children()
    with pytest.raises(OSError, match="connection reset"):
        LayerWorker("l0", CHUNK, "blake3", "zstd", str(tmp_path / "s"), set(), None).run(Broken())
    assert not _settle(before)
