"""Checks every BlobBackend must pass.

Use: subclass `BackendConformance` in a test module and provide a
`backend_env` fixture returning a `BackendEnv` (a backend holding
`env.blob`, plus the id of a blob it does not hold). Parametrize the fixture
over the implementations; test ids then read
`TestBackendConformance::test_read_at_end[registry]`.

A backend that moves whole chunks (the P2P backend: units verified one by one,
peers asked for a little more) says so with `whole_chunks=True`: its sources
then transfer at least, not exactly, the bytes asked for.
"""
from __future__ import annotations

import random
import threading
from dataclasses import dataclass

import pytest

from rafs.errors import BackendError, NotFound
from rafs.storage.backend import BlobBackend

from . import TestBlob

MISSING_ID = "0" * 63 + "1"


@dataclass
class BackendEnv:
    backend: BlobBackend
    blob: TestBlob
    missing_id: str = MISSING_ID
    whole_chunks: bool = False         # reads fetch whole chunks (and maybe more) from the sources


class BackendConformance:
    """Named checks over the `backend_env` fixture."""

    def test_read_at_start(self, backend_env: BackendEnv):
        b, blob = backend_env.backend, backend_env.blob
        assert b.read_range(blob.blob_id, 0, 4096) == blob.data[:4096]
        assert b.read_range(blob.blob_id, 0, 1) == blob.data[:1]

    def test_read_in_middle(self, backend_env: BackendEnv):
        b, blob = backend_env.backend, backend_env.blob
        mid = len(blob.data) // 2 + 17
        assert b.read_range(blob.blob_id, mid, 100_003) == blob.data[mid:mid + 100_003]

    def test_read_at_end(self, backend_env: BackendEnv):
        b, blob = backend_env.backend, backend_env.blob
        n = len(blob.data)
        assert b.read_range(blob.blob_id, n - 1, 1) == blob.data[-1:]
        assert b.read_range(blob.blob_id, n - 5000, 5000) == blob.data[-5000:]

    def test_read_whole_blob(self, backend_env: BackendEnv):
        b, blob = backend_env.backend, backend_env.blob
        assert b.read_range(blob.blob_id, 0, len(blob.data)) == blob.data

    def test_accepts_digest_form_of_id(self, backend_env: BackendEnv):
        b, blob = backend_env.backend, backend_env.blob
        assert b.read_range(blob.digest, 10, 10) == blob.data[10:20]

    def test_zero_size_read_is_empty(self, backend_env: BackendEnv):
        b, blob = backend_env.backend, backend_env.blob
        assert b.read_range(blob.blob_id, 5, 0) == b""

    def test_blob_size(self, backend_env: BackendEnv):
        b, blob = backend_env.backend, backend_env.blob
        assert b.blob_size(blob.blob_id) == len(blob.data)

    def test_read_past_end_raises_backend_error(self, backend_env: BackendEnv):
        b, blob = backend_env.backend, backend_env.blob
        n = len(blob.data)
        with pytest.raises(BackendError):
            b.read_range(blob.blob_id, n, 1)
        with pytest.raises(BackendError):
            b.read_range(blob.blob_id, n + 4096, 10)

    def test_read_straddling_end_raises_backend_error(self, backend_env: BackendEnv):
        b, blob = backend_env.backend, backend_env.blob
        with pytest.raises(BackendError) as ei:
            b.read_range(blob.blob_id, len(blob.data) - 10, 20)
        assert "end" in str(ei.value)

    def test_missing_blob_raises_blob_not_found(self, backend_env: BackendEnv):
        b, missing = backend_env.backend, backend_env.missing_id
        with pytest.raises(BackendError) as ei:
            b.read_range(missing, 0, 10)
        assert missing in str(ei.value) and "not found" in str(ei.value)
        with pytest.raises(NotFound) as ei:
            b.blob_size(missing)
        assert missing in str(ei.value) and "not found" in str(ei.value)

    def test_bad_arguments_are_value_errors(self, backend_env: BackendEnv):
        b, blob = backend_env.backend, backend_env.blob
        for bad_id in ("../../etc/passwd", "sha256:xyz", "", blob.blob_id[:-1]):
            with pytest.raises(ValueError):
                b.read_range(bad_id, 0, 1)
        with pytest.raises(ValueError):
            b.read_range(blob.blob_id, -1, 1)
        with pytest.raises(ValueError):
            b.read_range(blob.blob_id, 0, -1)

    def test_concurrent_reads_get_their_own_bytes(self, backend_env: BackendEnv):
        b, blob = backend_env.backend, backend_env.blob
        rng = random.Random(7)
        ranges = [(o, rng.randrange(1, 200_000)) for o in
                  (rng.randrange(len(blob.data) - 200_000) for _ in range(48))]
        errors = []

        def work(o, n):
            try:
                assert b.read_range(blob.blob_id, o, n) == blob.data[o:o + n]
            except BaseException as e:          # reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=r) for r in ranges]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors[0]

    def test_source_stats_count_bytes(self, backend_env: BackendEnv):
        b, blob = backend_env.backend, backend_env.blob

        def total(key):
            return sum(s[key] for s in b.source_stats().values())

        before = total("bytes")
        b.read_range(blob.blob_id, 100, 1000)
        grew = total("bytes") - before
        if backend_env.whole_chunks:
            assert grew >= 1000, grew          # chunk 0 at least, however it came
        else:
            assert grew == 1000, grew
        assert all(isinstance(k, str) for k in b.source_stats())

    def test_close_twice(self, backend_env: BackendEnv):
        backend_env.backend.close()
        backend_env.backend.close()
