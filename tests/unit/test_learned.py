"""The learned prefetch record (rafs.learned) and the access log (rafs.access), without mounts."""
from __future__ import annotations

import json

import pytest

from rafs.access import AccessLog, merge_ranges
from rafs.errors import FormatError
from rafs.learned import MAX_RECORD_BYTES, WAVE_MS, LearnedRecord, LocalRecords, record_from_log

A, B = "a" * 64, "b" * 64


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_access_log_keeps_first_reads_of_each_page_in_order():
    clock = Clock()
    log = AccessLog(window=10, clock=clock)
    log.blob_read(0, 8192, 16384)
    clock.t += 0.5
    log.blob_read(0, 8192, 12288)          # read before: not an event
    log.blob_read(0, 4096, 12288)          # one new page: the whole read is the event
    clock.t += 20
    log.blob_read(1, 0, 100)
    assert log.events == [(0, 0, 8192, 16384), (500, 0, 4096, 12288), (20500, 1, 0, 100)]
    assert log.start_events() == log.events[:2]          # the window is 10 s
    assert log.window_over()


def test_access_log_file_ranges_are_merged_and_bounded():
    log = AccessLog(clock=Clock())
    for off in range(0, 40960, 4096):       # a sequential reader: one range
        log.file_read(7, off, 4096)
    for k in range(1000):                   # a random one: bounded
        log.file_read(8, k * 10000, 10)
    _, files = log.snapshot()
    assert files[7] == (0, 10, [(0, 40960)])
    assert files[8][1] == 1000 and len(files[8][2]) <= 256
    assert merge_ranges([(5, 10), (0, 5), (20, 30), (25, 40)]) == [(0, 10), (20, 40)]


def rec(chunks, files=(), blobs=(A, B), **kw) -> LearnedRecord:
    return LearnedRecord("sha256:" + "c" * 64, list(blobs), list(chunks), list(files), **kw)


def test_record_round_trip_and_merge_keeps_first_access_order():
    r1 = rec([(0, 0, 4096, 0), (1, 8192, 4096, 50)], [("/x", 0, [(0, 10)])], updated=1.0)
    r2 = rec([(0, 4096, 4096, 10), (0, 0, 4096, 30)], [("/x", 5, [(10, 20)]), ("/y", 7, [(0, 1)])],
             blobs=(A,), updated=2.0)
    assert LearnedRecord.from_bytes(r1.to_bytes()) == r1
    m = r1.merge(r2)
    assert m.runs == 2 and m.updated == 2.0
    assert [(m.blobs[b], off, t) for b, off, _, t in m.chunks] == [(A, 0, 0), (A, 4096, 10), (B, 8192, 50)]
    assert m.files == [("/x", 0, [(0, 30)]), ("/y", 7, [(0, 1)])]       # (offset, length) pairs
    assert rec([], pinned=True).merge(r1).pinned


@pytest.mark.parametrize("doc", [
    b"not json", b"[]", b'{"schema": "other"}',
    json.dumps({"schema": "pynydus.learned-prefetch.v1", "bootstrap": "sha256:x", "blobs": [A],
                "chunks": [[1, 0, 4096, 0]]}).encode(),                     # blob index out of range
    json.dumps({"schema": "pynydus.learned-prefetch.v1", "bootstrap": "sha256:x", "blobs": [A],
                "chunks": [[0, -1, 4096, 0]]}).encode(),                    # negative offset
    json.dumps({"schema": "pynydus.learned-prefetch.v1", "bootstrap": "sha256:x", "blobs": [A],
                "chunks": [[0, 0, 0, 0]]}).encode(),                        # empty chunk
    json.dumps({"schema": "pynydus.learned-prefetch.v1", "bootstrap": "sha256:x", "blobs": [A],
                "chunks": [], "files": [["/x", 0, [[1]]]]}).encode(),       # bad range
    json.dumps({"schema": "pynydus.learned-prefetch.v1", "bootstrap": "sha256:x", "blobs": [A],
                "chunks": [], "runs": "1"}).encode(),
    b" " * (MAX_RECORD_BYTES + 1),
])
def test_bad_records_are_refused(doc):
    with pytest.raises(FormatError):
        LearnedRecord.from_bytes(doc)


class FakeBlob:
    def __init__(self, blob_id, size, chunk=4096):
        self.blob_id, self.uncompressed_size = blob_id, size
        self.entries = [type("E", (), {"uncompressed_offset": o, "uncompressed_size": min(chunk, size - o)})()
                        for o in range(0, size, chunk)]


class FakeBoot:
    def __init__(self, *blobs):
        self.meta = type("M", (), {"blobs": list(blobs)})()


def test_plan_drops_what_the_image_does_not_have_and_groups_waves():
    boot = FakeBoot(FakeBlob(B, 65536), FakeBlob(A, 16384))
    r = rec([(0, 0, 4096, 0), (0, 4096, 4096, 1), (1, 0, 4096, 2),          # A0, A1 and B0 in wave one
             (0, 1 << 30, 4096, 3),                                            # past A's end: dropped
             (0, 12288, 1 << 40, WAVE_MS + 5)],                                # clipped to A's end
            blobs=(A, B))
    assert r.plan(boot) == [[(1, [(0, 8192)]), (0, [(0, 4096)])], [(1, [(12288, 4096)])]]
    assert rec([(0, 0, 4096, 0)], blobs=("d" * 64,)).plan(boot) == []            # another image's blob


def test_record_from_log_maps_reads_to_chunks_once():
    boot = FakeBoot(FakeBlob(A, 65536, chunk=16384))
    events = [(0, 0, 100, 200), (3, 0, 16000, 20000), (9, 0, 100, 300), (12, 5, 0, 10)]
    r = record_from_log(boot, "c" * 64, events, [{"path": "/x", "first_access_ms": 0, "ranges": [[0, 5]]}])
    assert r.blobs == [A] and r.chunks == [(0, 0, 16384, 0), (0, 16384, 16384, 3)]
    assert r.files == [("/x", 0, [(0, 5)])]
    assert record_from_log(boot, "c" * 64, [], []) is None


def test_local_records(tmp_path):
    store = LocalRecords(str(tmp_path / "learned"))
    assert store.get("c" * 64) is None
    r = rec([(0, 0, 4096, 0)])
    store.put("c" * 64, r)
    assert store.get("c" * 64) == r
    (tmp_path / "learned" / ("c" * 64 + ".json")).write_bytes(b"junk")
    with pytest.raises(FormatError):
        store.get("c" * 64)
