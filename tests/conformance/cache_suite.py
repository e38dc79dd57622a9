"""Checks the BlobCache must pass over any backend.

Use: subclass `CacheConformance` and provide a `cache_env` fixture returning a
`CacheEnv`: a `CountingBackend` spy around a real backend holding `env.blob`,
a fresh cache directory, and a way to tamper with the stored blob.

The cache learns where chunks are from `env.blob.info` (the bootstrap's blob
table entry and chunk table), never from the blob; `env.blob.subset(...)`
makes the record of a bootstrap that uses only some chunks of the blob.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from rafs.errors import BackendError, FormatError, IntegrityError
from rafs.storage.cache import MAX_MERGE_GAP, BlobCache, CacheManager
from rafs.storage.cache.state import ChunkMap

from tests.fakes.backends import CountingBackend

from . import CHUNK, TestBlob


@dataclass
class CacheEnv:
    blob: TestBlob
    spy: CountingBackend
    cache_dir: Path
    tamper_blob: Callable[[int], None]     # flip the stored blob's byte at this offset
    options: dict = dataclasses.field(default_factory=dict)

    def open(self, info=None, **kw) -> BlobCache:
        opts = {"merge_size": 1 << 20, **self.options, **kw}
        return BlobCache(self.cache_dir, info if info is not None else self.blob.info, self.spy,
                         **opts)

    def data_calls(self) -> list[tuple[str, int, int]]:
        return self.spy.data_calls(self.blob.data_end)

    def fetch_counts(self) -> dict[int, int]:
        """chunk index -> how many backend requests fetched it."""
        counts: dict[int, int] = {}
        for _, off, size in self.data_calls():
            for i in self.blob.chunks_in(off, size):
                counts[i] = counts.get(i, 0) + 1
        return counts


def _threads(fn, args_list, timeout=30):
    errors = []

    def run(*a):
        try:
            fn(*a)
        except BaseException as e:          # reported below
            errors.append(e)

    ts = [threading.Thread(target=run, args=a) for a in args_list]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
    assert not any(t.is_alive() for t in ts), "reader threads hang"
    return errors


class CacheConformance:
    """Named checks over the `cache_env` fixture."""

    # ---------------------------------------------------------------- bytes
    def test_random_ranges_equal_plain_view(self, cache_env: CacheEnv):
        view = cache_env.blob.view
        rng = random.Random(3)
        with cache_env.open() as c:
            for _ in range(150):
                o = rng.randrange(len(view))
                n = rng.choice([1, 4096, rng.randrange(1, 300_000)])
                assert c.read(o, n) == view[o:o + n], (o, n)
            assert c.read(0, len(view)) == view

    def test_chunk_edges_and_padding_read_as_zeros(self, cache_env: CacheEnv):
        blob = cache_env.blob
        with cache_env.open() as c:
            short = next(e for e in blob.entries if e.uncompressed_size < CHUNK)
            gap = short.uncompressed_end
            pad = -gap % 4096
            assert pad > 0
            assert c.read(gap, pad) == bytes(pad)
            e = blob.entries[5]
            assert c.read(e.uncompressed_end - 1, 2) == blob.view[e.uncompressed_end - 1:
                                                                  e.uncompressed_end + 1]

    def test_reads_at_end_of_view(self, cache_env: CacheEnv):
        view = cache_env.blob.view
        with cache_env.open() as c:
            assert c.view_size == len(view)
            assert c.read(len(view) - 1, 1) == view[-1:]
            assert c.read(len(view) - 10, 100) == view[-10:]     # clipped like pread
            assert c.read(len(view), 10) == b""
            assert c.read(123, 0) == b""
            with pytest.raises(ValueError):
                c.read(-1, 10)

    # ---------------------------------------------------------------- persistence
    def test_warm_reopen_fetches_nothing(self, cache_env: CacheEnv):
        view = cache_env.blob.view
        with cache_env.open() as c:
            assert c.read(0, len(view)) == view
        cache_env.spy.reset()
        with cache_env.open() as c:
            assert c.usage()["complete"]
            assert c.read(0, len(view)) == view
            assert c.metrics.snapshot()["chunks_missed"] == 0
        assert cache_env.spy.calls == [] and cache_env.spy.size_calls == 0

    def test_state_is_flushed_while_fetching(self, cache_env: CacheEnv):
        with cache_env.open(flush_interval=0.05) as c:
            c.read(0, 8 * CHUNK)
            path = Path(c.map_path)
            deadline = time.monotonic() + 5
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert path.exists(), "chunkmap not flushed within 5 s"
            ready_before_close = c.usage()["chunks_ready"]
        with cache_env.open() as c:
            assert c.usage()["chunks_ready"] == ready_before_close > 0

    @pytest.mark.parametrize("damage", ["bitflip", "truncate", "empty", "other-blob"])
    def test_corrupt_chunkmap_is_an_empty_cache(self, cache_env: CacheEnv, damage, caplog):
        view = cache_env.blob.view
        with cache_env.open() as c:
            c.read(0, len(view))
            map_path = Path(c.map_path)
        raw = bytearray(map_path.read_bytes())
        if damage == "bitflip":
            raw[len(raw) // 2] ^= 0x10
        elif damage == "truncate":
            raw = raw[:len(raw) - 40]
        elif damage == "empty":
            raw = bytearray()
        else:                                   # a valid chunkmap, but of another blob
            n = len(cache_env.blob.entries)
            other = ChunkMap(n, blob_id="cd" * 32, view_size=len(view))
            for i in range(n):
                other.mark_ready(i, 1)
            raw = bytearray(other.encode())
        map_path.write_bytes(bytes(raw))
        cache_env.spy.reset()
        with caplog.at_level(logging.WARNING, logger="rafs.storage.cache"):
            with cache_env.open() as c:
                assert c.usage()["chunks_ready"] == 0
                assert c.read(0, len(view)) == view
        assert any("ignoring cache state" in r.getMessage() for r in caplog.records)
        assert cache_env.data_calls(), "an empty cache must fetch again"

    def test_cache_file_tampered_after_restart_is_refetched(self, cache_env: CacheEnv):
        blob = cache_env.blob
        with cache_env.open() as c:
            c.read(0, len(blob.view))
            data_path = c.data_path
        e = blob.entries[7]
        with open(data_path, "r+b") as f:
            f.seek(e.uncompressed_offset + 100)
            b = f.read(1)
            f.seek(e.uncompressed_offset + 100)
            f.write(bytes([b[0] ^ 0x01]))
        cache_env.spy.reset()
        with cache_env.open() as c:
            assert c.read(e.uncompressed_offset, e.uncompressed_size) == \
                blob.view[e.uncompressed_offset:e.uncompressed_end]
            assert c.metrics.snapshot()["recheck_failures"] == 1
            assert 7 in cache_env.fetch_counts()
            other = blob.entries[3]            # untouched chunks pass the xxh64 check
            cache_env.spy.reset()
            assert c.read(other.uncompressed_offset, 10) == blob.view[other.uncompressed_offset:
                                                                       other.uncompressed_offset + 10]
            assert cache_env.spy.calls == []
        with cache_env.open() as c:             # the re-fetched bytes are in the file now
            cache_env.spy.reset()
            assert c.read(0, len(blob.view)) == blob.view
            assert cache_env.spy.calls == []

    def test_open_fetches_nothing(self, cache_env: CacheEnv):
        cache_env.spy.reset()
        with cache_env.open() as c:                 # chunks come from the bootstrap, not the blob
            assert c.usage()["chunks_ready"] == 0
        assert cache_env.spy.calls == [] and cache_env.spy.size_calls == 0
        assert not list(cache_env.cache_dir.glob("*.toc"))

    def test_old_chunkmap_version_is_an_empty_cache(self, cache_env: CacheEnv):
        view = cache_env.blob.view
        with cache_env.open() as c:
            c.read(0, len(view))
            map_path = Path(c.map_path)
        raw = bytearray(map_path.read_bytes())
        raw[8] = 1                                  # version 1: pynydus's TOC-era layout
        map_path.write_bytes(bytes(raw))
        cache_env.spy.reset()
        with cache_env.open() as c:
            assert c.usage()["chunks_ready"] == 0
            assert c.read(0, len(view)) == view
        assert cache_env.data_calls()

    # ---------------------------------------------------------------- integrity
    def test_tampered_blob_raises_integrity_error_and_caches_nothing(self, cache_env: CacheEnv,
                                                                      caplog):
        blob = cache_env.blob
        k = 9
        e = blob.entries[k]
        cache_env.tamper_blob(e.compressed_offset + e.compressed_size // 2)
        with cache_env.open(readahead=False) as c:
            with caplog.at_level(logging.ERROR, logger="rafs.storage.cache"):
                with pytest.raises(IntegrityError) as ei:
                    c.read(e.uncompressed_offset, 10)
            msg = str(ei.value)
            assert blob.blob_id in msg and f"chunk #{k}" in msg
            lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(lines) == 1 and blob.blob_id in lines[0] and f"chunk #{k}" in lines[0]
            assert not c.chunk_ready(k)
            assert c.metrics.snapshot()["verify_failures"] >= 1
            with open(c.data_path, "rb") as f:
                f.seek(e.uncompressed_offset)
                assert f.read(e.uncompressed_size) == bytes(e.uncompressed_size)
            with pytest.raises(IntegrityError):            # still not cached: fails again
                c.read(e.uncompressed_offset, 10)
            nxt = blob.entries[k + 1]                      # neighbours are fine
            assert c.read(nxt.uncompressed_offset, 50) == blob.view[nxt.uncompressed_offset:
                                                                    nxt.uncompressed_offset + 50]
        with cache_env.open() as c:                        # nor after a restart
            assert not c.chunk_ready(k)

    def test_tampered_chunk_in_merged_request_spares_its_neighbours(self, cache_env: CacheEnv):
        blob = cache_env.blob
        e = blob.entries[2]
        cache_env.tamper_blob(e.compressed_offset + 10)
        with cache_env.open() as c:
            with pytest.raises(IntegrityError):
                c.read(0, blob.entries[4].uncompressed_end)
            assert c.chunk_ready(1) and c.chunk_ready(3) and not c.chunk_ready(2)

    def test_wrong_chunk_digest_in_the_bootstrap_is_an_integrity_error(self, cache_env: CacheEnv):
        blob = cache_env.blob
        e = blob.entries[6]
        bad = dataclasses.replace(e, digest=bytes(32))
        info = dataclasses.replace(blob.info, entries=[bad if x == e else x for x in blob.entries])
        with cache_env.open(info, readahead=False) as c:
            with pytest.raises(IntegrityError, match="chunk #6"):
                c.read(e.uncompressed_offset, 10)
            assert not c.chunk_ready(6)

    def test_bytes_cached_under_another_digest_are_not_served(self, cache_env: CacheEnv):
        """Two bootstraps of one blob share a cache dir; one's chunk table lies about a
        chunk's digest: what the other cached (verified against its own digest) is re-checked
        and refused, never served as verified."""
        blob = cache_env.blob
        with cache_env.open() as c:
            assert c.read(0, len(blob.view)) == blob.view
        e = blob.entries[5]
        liar = dataclasses.replace(blob.info, entries=[
            dataclasses.replace(x, digest=blob.entries[4].digest) if x == e else x
            for x in blob.entries])
        cache_env.spy.reset()
        with cache_env.open(liar, readahead=False) as c:
            other = blob.entries[3]             # agreeing chunks are served from the cache
            assert c.read(other.uncompressed_offset, 10) == \
                blob.view[other.uncompressed_offset:other.uncompressed_offset + 10]
            assert cache_env.spy.calls == []
            with pytest.raises(IntegrityError):
                c.read(e.uncompressed_offset, 10)
            assert c.metrics.snapshot()["recheck_failures"] == 1
        with cache_env.open() as c:             # the honest record still gets the right bytes
            assert c.read(e.uncompressed_offset, e.uncompressed_size) == \
                blob.view[e.uncompressed_offset:e.uncompressed_end]

    @pytest.mark.parametrize("damage", ["overlap", "past-blob", "past-view", "index", "order"])
    def test_malformed_chunk_table_is_refused_at_open(self, cache_env: CacheEnv, damage):
        blob = cache_env.blob
        ents = list(blob.entries)
        if damage == "overlap":
            ents[3] = dataclasses.replace(ents[3], uncompressed_offset=ents[2].uncompressed_offset)
        elif damage == "past-blob":
            ents[-1] = dataclasses.replace(ents[-1], compressed_offset=len(blob.data))
        elif damage == "past-view":
            ents[-1] = dataclasses.replace(ents[-1], uncompressed_offset=len(blob.view))
        elif damage == "index":
            ents[4] = dataclasses.replace(ents[4], index=ents[3].index)
        else:
            ents[2], ents[3] = ents[3], ents[2]
        with pytest.raises(FormatError):
            BlobCache(cache_env.cache_dir, dataclasses.replace(blob.info, entries=ents),
                      cache_env.spy)

    # ---------------------------------------------------------------- fetching
    def test_adjacent_missing_chunks_are_merged_into_one_request(self, cache_env: CacheEnv):
        blob = cache_env.blob
        full = [i for i in range(len(blob.entries) - 8)
                if all(blob.entries[j].uncompressed_size == CHUNK for j in range(i, i + 8))]
        first = blob.entries[full[0]]
        last = blob.entries[full[0] + 7]
        with cache_env.open(merge_size=1 << 20) as c:
            cache_env.spy.reset()
            got = c.read(first.uncompressed_offset, last.uncompressed_end - first.uncompressed_offset)
            assert got == blob.view[first.uncompressed_offset:last.uncompressed_end]
            assert len(cache_env.data_calls()) == 1
            assert c.metrics.snapshot()["requests"] == 1

    def test_merged_requests_respect_merge_size(self, cache_env: CacheEnv):
        blob = cache_env.blob
        with cache_env.open(merge_size=128 << 10, readahead=False) as c:
            cache_env.spy.reset()
            assert c.read(0, len(blob.view)) == blob.view
            for _, off, size in cache_env.data_calls():
                assert size <= 128 << 10 or len(blob.chunks_in(off, size)) == 1

    def test_readahead_extends_a_miss_up_to_merge_size(self, cache_env: CacheEnv):
        blob = cache_env.blob
        with cache_env.open(merge_size=256 << 10) as c:
            cache_env.spy.reset()
            c.read(0, 10)
            (_, off, size), = cache_env.data_calls()
            assert off == 0 and len(blob.chunks_in(off, size)) > 1 and size <= 256 << 10
            cache_env.spy.reset()
            e = blob.entries[1]
            c.read(e.uncompressed_offset, 10)           # read ahead: already there
            assert cache_env.data_calls() == []

    def test_amplify_widens_a_miss_over_the_next_missing_chunks_only(self, cache_env: CacheEnv):
        blob = cache_env.blob
        e = blob.entries
        with cache_env.open(readahead=False, amplify=0) as c:
            cache_env.spy.reset()
            c.read(e[10].uncompressed_offset, 10)
            (_, off, size), = cache_env.data_calls()        # amplify 0: exactly the chunk read
            assert (off, size) == (e[10].compressed_offset, e[10].compressed_size)
        limit = e[0].compressed_size + e[1].compressed_size + e[2].compressed_size // 2
        with cache_env.open(readahead=False, amplify=limit) as c:
            cache_env.spy.reset()
            assert c.read(e[0].uncompressed_offset, 10) == blob.view[e[0].uncompressed_offset:][:10]
            (_, off, size), = cache_env.data_calls()        # chunks 0 and 1 fit, 2 does not
            assert off == e[0].compressed_offset and size == e[1].compressed_end - off
            c.read(e[4].uncompressed_offset, 10)            # 4 (and 5) ready now
            cache_env.spy.reset()
            c.read(e[3].uncompressed_offset, 10)            # widening stops at the ready chunk 4
            (_, off, size), = cache_env.data_calls()
            assert (off, size) == (e[3].compressed_offset, e[3].compressed_size)
            cache_env.spy.reset()
            assert c.read(e[1].uncompressed_offset, 10) == blob.view[e[1].uncompressed_offset:][:10]
            assert cache_env.data_calls() == []             # amplified chunks are verified and kept

    def test_concurrent_readers_get_correct_bytes_and_each_chunk_is_fetched_once(
            self, cache_env: CacheEnv):
        blob = cache_env.blob
        cache_env.spy.delay = 0.01                      # make fetches overlap
        rng = random.Random(11)
        view = blob.view
        same = (blob.entries[3].uncompressed_offset + 5, 3 * CHUNK)
        jobs = []
        for t in range(32):
            if t % 2:
                jobs.append([same] * 3)
            else:
                jobs.append([(o, rng.randrange(1, 3 * CHUNK))
                             for o in (rng.randrange(len(view)) for _ in range(4))])
        with cache_env.open(merge_size=256 << 10) as c:
            cache_env.spy.reset()

            def reader(ranges):
                for o, n in ranges:
                    assert c.read(o, n) == view[o:o + n]

            errors = _threads(reader, [(j,) for j in jobs])
            assert not errors, errors[0]
            counts = cache_env.fetch_counts()
            assert counts and max(counts.values()) == 1, counts

    def test_waiters_share_one_fetch_and_its_error(self, cache_env: CacheEnv):
        blob = cache_env.blob
        e = blob.entries[4]
        with cache_env.open(readahead=False) as c:
            cache_env.spy.reset()
            cache_env.spy.gate = threading.Event()
            cache_env.spy.fail_next(1)
            results = []

            def reader():
                try:
                    results.append(c.read(e.uncompressed_offset, 100))
                except BackendError as err:
                    results.append(err)

            ts = [threading.Thread(target=reader) for _ in range(8)]
            for t in ts:
                t.start()
            time.sleep(0.2)
            cache_env.spy.gate.set()
            for t in ts:
                t.join(10)
            assert len(results) == 8 and all(isinstance(r, BackendError) for r in results)
            assert len({id(r) for r in results}) == 1, "waiters must get the same error"
            assert len(cache_env.data_calls()) == 1
            assert not c.chunk_ready(4)
            cache_env.spy.gate = None
            assert c.read(e.uncompressed_offset, 100) == blob.view[e.uncompressed_offset:
                                                                   e.uncompressed_offset + 100]

    def test_backend_failure_raises_and_a_later_read_succeeds(self, cache_env: CacheEnv):
        blob = cache_env.blob
        with cache_env.open() as c:
            cache_env.spy.fail_next(1)
            with pytest.raises(BackendError):
                c.read(0, 100)
            assert c.usage()["chunks_ready"] == 0
            assert c.read(0, 100) == blob.view[:100]
            assert c.metrics.snapshot()["request_errors"] == 1

    def test_parallel_fetches_are_bounded_by_max_inflight(self, cache_env: CacheEnv):
        blob = cache_env.blob
        cache_env.spy.delay = 0.05
        with cache_env.open(max_inflight=2, readahead=False, merge_size=64 << 10) as c:
            cache_env.spy.reset()
            offs = [e.uncompressed_offset for e in blob.entries[:12]]
            errors = _threads(lambda o: c.read(o, 10), [(o,) for o in offs])
            assert not errors, errors[0]
            assert cache_env.spy.max_in_flight == 2
            # one read spanning many requests issues them in parallel, within the bound
            cache_env.spy.reset()
            t0 = time.monotonic()
            last = blob.entries[24]
            c.read(blob.entries[12].uncompressed_offset, last.uncompressed_end -
                   blob.entries[12].uncompressed_offset)
            assert cache_env.spy.max_in_flight == 2
            assert time.monotonic() - t0 < 13 * 0.05

    # ---------------------------------------------------------------- prefetch
    def test_prefetch_all_fills_the_cache_without_reads(self, cache_env: CacheEnv):
        blob = cache_env.blob
        with cache_env.open() as c:
            fut = c.prefetch_all()
            assert fut.result(timeout=20) == len(blob.entries)
            u = c.usage()
            assert u["complete"] and u["bytes_ready"] == u["bytes_total"]
            snap = c.metrics.snapshot()
            assert snap["prefetch_bytes"] == blob.data_end and snap["chunks_missed"] == 0
            cache_env.spy.reset()
            assert c.read(0, len(blob.view)) == blob.view
            assert cache_env.spy.calls == []

    def test_prefetch_ranges_fetch_only_those_chunks(self, cache_env: CacheEnv):
        blob = cache_env.blob
        a, b = blob.entries[2], blob.entries[30]
        with cache_env.open() as c:
            cache_env.spy.reset()
            n = c.prefetch([(a.uncompressed_offset, 10), (b.uncompressed_offset, 10)]).result(10)
            assert n == 2
            assert sorted(cache_env.fetch_counts()) == [2, 30]

    def test_on_demand_reads_complete_promptly_during_prefetch(self, cache_env: CacheEnv):
        blob = cache_env.blob
        cache_env.spy.delay = 0.05                      # every request takes >= 50 ms
        with cache_env.open(merge_size=64 << 10) as c:
            fut = c.prefetch_all()                      # ~40 requests, ~2 s
            time.sleep(0.12)
            worst = 0.0
            for i in (39, 35, 31, 27):
                e = blob.entries[i]
                t0 = time.monotonic()
                assert c.read(e.uncompressed_offset, 100) == \
                    blob.view[e.uncompressed_offset:e.uncompressed_offset + 100]
                worst = max(worst, time.monotonic() - t0)
            assert not fut.done(), "prefetch finished too early to test priority"
            # at most one background request (50 ms) ahead of ours (50 ms) + slack
            assert worst < 0.4, f"on-demand read took {worst:.3f}s during prefetch"
            assert cache_env.spy.max_in_flight <= c.max_inflight
            assert fut.result(timeout=20) >= len(blob.entries) - 4
            assert c.usage()["complete"]

    def test_urgent_prefetch_jumps_ahead_of_a_running_prefetch_all(self, cache_env: CacheEnv):
        blob = cache_env.blob
        cache_env.spy.delay = 0.05                      # every request takes >= 50 ms
        with cache_env.open(merge_size=64 << 10) as c:
            cache_env.spy.reset()
            fut = c.prefetch_all()                      # ~40 requests, one at a time, ~2 s
            time.sleep(0.12)
            k = len(blob.entries) - 2                   # near the end: prefetch_all gets there last
            e = blob.entries[k]
            t0 = time.monotonic()
            urgent = c.prefetch([(e.uncompressed_offset, e.uncompressed_size)], low_priority=False)
            assert urgent.result(timeout=20) == 1
            took = time.monotonic() - t0
            assert not fut.done(), "prefetch_all finished too early to test priority"
            # at most the one background request in progress (50 ms) ahead of ours (50 ms)
            assert took < 0.4, f"urgent prefetch took {took:.3f}s behind prefetch_all"
            assert c.chunk_ready(k)
            assert fut.result(timeout=20) == len(blob.entries) - 1   # k is not fetched again
            assert cache_env.fetch_counts()[k] == 1
            assert c.usage()["complete"]

    def test_low_priority_jobs_yield_to_urgent_ones_between_requests(self, cache_env: CacheEnv):
        blob = cache_env.blob
        cache_env.spy.delay = 0.03
        with cache_env.open(merge_size=64 << 10) as c:
            first = c.prefetch([(0, blob.entries[19].uncompressed_end)])     # low, ~20 requests
            second = c.prefetch([(blob.entries[20].uncompressed_offset,
                                  len(blob.view) - blob.entries[20].uncompressed_offset)])
            time.sleep(0.1)
            urgent = [c.prefetch([(blob.entries[i].uncompressed_offset, 1)], low_priority=False)
                      for i in (36, 37, 38)]
            for u in urgent:
                assert u.result(timeout=20) == 1
            assert not first.done() and not second.done()
            assert first.result(timeout=20) + second.result(timeout=20) == len(blob.entries) - 3
            assert c.read(0, len(blob.view)) == blob.view

    def test_close_stops_prefetch_promptly(self, cache_env: CacheEnv):
        cache_env.spy.delay = 0.1
        c = cache_env.open(merge_size=64 << 10)
        fut = c.prefetch_all()
        time.sleep(0.15)
        t0 = time.monotonic()
        c.close()
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(CancelledError):
            fut.result(timeout=1)
        with cache_env.open() as again:                 # what was fetched is kept
            assert 0 < again.usage()["chunks_ready"] < len(cache_env.blob.entries)

    # ---------------------------------------------------------------- chunk subsets
    def _gapped(self, blob) -> list[int]:
        """Chunks 0..29 without 3, 10, 11 and every chunk from 20 on but 24: gaps of one
        chunk (<= MAX_MERGE_GAP) and of two or more (bigger)."""
        keep = [i for i in range(30) if i not in (3, 10, 11) and (i < 20 or i == 24)]
        e = blob.entries
        assert e[4].compressed_offset - e[2].compressed_end <= MAX_MERGE_GAP
        assert e[12].compressed_offset - e[9].compressed_end > MAX_MERGE_GAP
        return keep

    def test_subset_reads_its_chunks_and_zeros_elsewhere(self, cache_env: CacheEnv):
        blob = cache_env.blob
        keep = self._gapped(blob)
        with cache_env.open(blob.subset(keep)) as c:
            assert c.read(0, len(blob.view)) == blob.view_of(keep)
            u = c.usage()
            assert u["complete"] and u["chunks_total"] == len(keep)
        fetched = cache_env.fetch_counts()
        assert sorted(k for k in fetched if k in keep) == keep

    def test_requests_merge_across_small_gaps_only(self, cache_env: CacheEnv):
        blob = cache_env.blob
        keep = self._gapped(blob)
        e = blob.entries
        with cache_env.open(blob.subset(keep), readahead=False, amplify=0) as c:
            cache_env.spy.reset()
            assert c.read(0, e[9].uncompressed_end) == blob.view_of(keep)[:e[9].uncompressed_end]
            # 0..2 and 4..9 (a one-chunk gap) are one request
            assert cache_env.data_calls() == [(blob.blob_id, 0, e[9].compressed_end)]
            cache_env.spy.reset()
            c.read(e[12].uncompressed_offset, e[13].uncompressed_end - e[12].uncompressed_offset)
            # 12 follows 9 after a two-chunk gap: not merged with anything before it
            assert [off for _, off, _ in cache_env.data_calls()] == [e[12].compressed_offset]
            cache_env.spy.reset()
            lo, hi = e[16].uncompressed_offset, e[24].uncompressed_end
            assert c.read(lo, hi - lo) == blob.view_of(keep)[lo:hi]
            calls = cache_env.data_calls()          # 16..19, then 24 apart (gap of 4 chunks)
            assert sorted((off, size) for _, off, size in calls) == [
                (e[16].compressed_offset, e[19].compressed_end - e[16].compressed_offset),
                (e[24].compressed_offset, e[24].compressed_size)]

    def test_bytes_between_entries_are_never_decoded(self, cache_env: CacheEnv):
        blob = cache_env.blob
        keep = self._gapped(blob)
        e = blob.entries[3]                          # not in the subset; inside a merged request
        cache_env.tamper_blob(e.compressed_offset + 5)
        with cache_env.open(blob.subset(keep)) as c:
            assert c.read(0, len(blob.view)) == blob.view_of(keep)
            assert c.metrics.snapshot()["verify_failures"] == 0

    def test_bootstraps_using_other_chunks_share_one_cache(self, cache_env: CacheEnv):
        blob = cache_env.blob
        a, b = list(range(0, 30, 2)), list(range(0, 40, 3))
        with cache_env.open(blob.subset(a)) as c:
            assert c.read(0, len(blob.view)) == blob.view_of(a)
        cache_env.spy.reset()
        with cache_env.open(blob.subset(b)) as c:
            assert c.usage()["chunks_ready"] == len(set(a) & set(b))
            assert c.read(0, len(blob.view)) == blob.view_of(b)
        fetched = set(cache_env.fetch_counts())
        assert set(b) - set(a) <= fetched and not fetched & (set(a) & set(b))
        cache_env.spy.reset()
        with cache_env.open(blob.subset(a)) as c:    # b's flush kept a's chunks
            assert c.usage()["complete"]
            assert c.read(0, len(blob.view)) == blob.view_of(a)
        with cache_env.open() as c:                  # the whole blob: both sets are warm
            assert c.usage()["chunks_ready"] == len(set(a) | set(b))
        assert cache_env.spy.calls == []

    def test_manager_refuses_a_second_record_with_other_chunks(self, cache_env: CacheEnv):
        blob = cache_env.blob
        with CacheManager(cache_env.cache_dir, cache_env.spy, owns_backend=False) as mgr:
            c = mgr.open(blob.subset(range(10)))
            assert mgr.open(blob.subset(range(5))) is c       # a subset of what it serves
            with pytest.raises(Exception, match="another bootstrap"):
                mgr.open(blob.info)

    # ---------------------------------------------------------------- reporting
    def test_usage_reports_sparse_allocation(self, cache_env: CacheEnv):
        blob = cache_env.blob
        with cache_env.open(readahead=False) as c:
            u = c.usage()
            assert u["chunks_ready"] == 0 and u["disk_bytes"] == 0
            assert u["view_size"] == len(blob.view) and u["chunks_total"] == len(blob.entries)
            e = blob.entries[10]
            c.read(e.uncompressed_offset, 1)
            u = c.usage()
            assert u["chunks_ready"] == 1 and u["bytes_ready"] == e.uncompressed_size
            assert e.uncompressed_size <= u["disk_bytes"] < 4 * e.uncompressed_size
