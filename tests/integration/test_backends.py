"""Backends and the blob cache against a real docker-registry on 127.0.0.1.

The backend conformance suite runs over every backend (registry, local OCI
layout, plain directory, a mirror chain whose mirror is down, and the P2P
backend in front of the registry: alone, and with a peer that holds the blob);
the cache conformance suite runs over the registry, and through the P2P cache
manager (what `nydusify mount --p2p-...` builds) in front of it.
Registry-only behaviour (what the registry's access log shows, a registry
stopped mid-read and restarted, mirrors that fail or serve tampered bytes) is
tested below them.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from p2p.service import P2PConfig, P2PService, p2p_cache_manager

from rafs.errors import BackendError, IntegrityError
from rafs.storage.backend import BlobBackend, LocalFsBackend, MirrorBackend, RegistryBackend
from rafs.storage.cache import BlobCache
from rafs.storage.factory import (BackendConfig, CacheConfig, MirrorConfig, StorageConfig,
                                  build_backend, build_storage)
from rafs.image.auth import ANONYMOUS
from rafs.image.client import RegistryClient

from testbed.process import free_port
from tests.conformance import make_blob
from tests.conformance.backend_suite import BackendConformance, BackendEnv
from tests.conformance.cache_suite import CacheConformance, CacheEnv
from tests.fakes.backends import CountingBackend
from tests.fakes.faulty_http import FaultyHTTPServer

_n = itertools.count(1)


def _client(host: str, repo: str, **kw) -> RegistryClient:
    kw.setdefault("retries", 1)
    kw.setdefault("backoff", 0.05)
    return RegistryClient(host, repo, plain_http=True, auth=ANONYMOUS, **kw)


def _push(reg, blob, repo: str | None = None) -> str:
    repo = repo or f"pynydus/storage-{next(_n)}"
    with _client(reg.host, repo) as c:
        c.push_blob(blob.digest, blob.data)
    return repo


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _registry_backend(reg, repo, **kw) -> RegistryBackend:
    return RegistryBackend(_client(reg.host, repo, **kw))


# --------------------------------------------------------------------------- conformance

def _p2p_backend(origin: BlobBackend, blob, store_dir: Path, services: list, **p2p) -> BlobBackend:
    """A P2PBackend in front of `origin` that shares `blob` (as a mount daemon's does once the
    blob's cache is open); its service is appended to `services` (close after the backend)."""
    svc = P2PService(P2PConfig(**p2p), store_dir)
    services.append(svc)
    backend = svc.backend(origin)
    svc.node.expect(blob.info)
    return backend


def _seed_peer(reg, repo: str, blob, root: Path, services: list) -> str:
    """A peer that read the whole blob through its P2P cache (so it holds and serves every
    chunk); returns its address."""
    svc = P2PService(P2PConfig(listen="127.0.0.1:0"), root / "p2p")
    services.append(svc)
    with svc.cache_manager(_registry_backend(reg, repo), CacheConfig(dir=str(root / "cache"))) as mgr:
        assert mgr.open(blob.info).read(0, len(blob.view)) == blob.view
    return svc.address


@pytest.fixture(params=["registry", "localfs-oci", "localfs-plain", "mirror-down", "p2p", "p2p-peer"])
def backend_env(request, registry_session, tmp_path) -> BackendEnv:
    blob = make_blob(10_000 + next(_n), chunks=24)   # seeds apart from every other test's
    kind = request.param
    services: list[P2PService] = []
    if kind == "registry":
        backend = _registry_backend(registry_session, _push(registry_session, blob))
    elif kind == "p2p":                               # nobody else has it: units from the registry
        repo = _push(registry_session, blob)
        backend = _p2p_backend(_registry_backend(registry_session, repo), blob, tmp_path / "p2p", services)
    elif kind == "p2p-peer":                          # a peer holds every chunk: units from it
        repo = _push(registry_session, blob)
        peer = _seed_peer(registry_session, repo, blob, tmp_path / "seed", services)
        backend = _p2p_backend(_registry_backend(registry_session, repo), blob, tmp_path / "p2p", services,
                               peers=[peer])
    elif kind == "mirror-down":
        repo = _push(registry_session, blob)
        dead = RegistryBackend(_client(f"127.0.0.1:{free_port()}", repo, retries=0))
        backend = MirrorBackend([dead], _registry_backend(registry_session, repo))
    else:
        path = (tmp_path / "blobs" / "sha256" / blob.blob_id if kind == "localfs-oci"
                else tmp_path / blob.blob_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob.data)
        backend = LocalFsBackend(tmp_path)
    yield BackendEnv(backend, blob, whole_chunks=kind.startswith("p2p"))
    backend.close()
    for svc in services:
        svc.close()


class TestBackendConformance(BackendConformance):
    """Every backend passes the backend suite."""


@pytest.fixture
def cache_env(registry_session, tmp_path) -> CacheEnv:
    blob = make_blob(20_000 + next(_n))   # (tamper tests flip bytes in the shared registry)
    repo = _push(registry_session, blob)
    spy = CountingBackend(_registry_backend(registry_session, repo, retries=0))
    data = registry_session.blob_data_path(blob.digest)
    yield CacheEnv(blob, spy, tmp_path / "cache", lambda off: _flip(data, off))
    spy.close()


class TestCacheOverRegistry(CacheConformance):
    """The cache suite with a real registry behind the cache."""


class _MountedCache:
    """A cache opened through a cache manager that serves one mount: closing the cache closes the
    manager (as the mount going away does), so the next open is a fresh daemon's."""

    def __init__(self, manager, cache):
        self.manager, self.cache = manager, cache

    def __getattr__(self, name):
        return getattr(self.cache, name)

    def close(self) -> None:
        try:
            self.cache.close()
        finally:
            self.manager.close()

    def __enter__(self) -> "_MountedCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclasses.dataclass
class P2PCacheEnv(CacheEnv):
    """Caches opened by the P2P cache manager `nydusify mount --p2p-...` builds (p2p_cache_manager:
    a P2PBackend in front of a fresh origin, the blob registered with the node before the cache
    fetches anything). The spy stands where the suite expects it, between the cache and its
    backend (here the P2PBackend), so it counts what the cache asks for."""
    make_origin: Callable[[], BlobBackend] | None = None

    def open(self, info=None, **kw) -> _MountedCache:
        opts = {"merge_size": 1 << 20, **self.options, **kw}
        mgr = p2p_cache_manager(self.make_origin(), CacheConfig(dir=str(self.cache_dir), **opts),
                                P2PConfig(listen="127.0.0.1:0"))
        self.spy.inner, mgr.backend = mgr.backend, self.spy      # closing the manager closes it
        try:
            return _MountedCache(mgr, mgr.open(info if info is not None else self.blob.info))
        except BaseException:
            mgr.close()
            raise


class TestCacheOverP2P(CacheConformance):
    """The cache suite through the P2P cache manager, the registry behind it."""

    @pytest.fixture
    def cache_env(self, registry_session, tmp_path) -> CacheEnv:
        blob = make_blob(25_000 + next(_n))   # (tamper tests flip bytes in the shared registry)
        repo = _push(registry_session, blob)
        data = registry_session.blob_data_path(blob.digest)

        def origin() -> BlobBackend:
            return _registry_backend(registry_session, repo, retries=0)
        spy = CountingBackend(origin())
        yield P2PCacheEnv(blob, spy, tmp_path / "cache", lambda off: _flip(data, off), make_origin=origin)
        spy.close()

    def test_amplify_widens_a_miss_over_the_next_missing_chunks_only(self, cache_env: CacheEnv):
        """P2P mounts do not widen misses (p2p/service.py: its backend reads ahead over the LAN itself, never
        from the registry): whatever amplify asks, a miss fetches just its chunk from the registry."""
        e = cache_env.blob.entries
        limit = e[0].compressed_size + e[1].compressed_size + e[2].compressed_size // 2
        with cache_env.open(readahead=False, amplify=limit) as c:
            cache_env.spy.reset()
            assert c.read(e[0].uncompressed_offset, 10) == cache_env.blob.view[e[0].uncompressed_offset:][:10]
            (_, off, size), = cache_env.data_calls()
            assert (off, size) == (e[0].compressed_offset, e[0].compressed_size)


# --------------------------------------------------------------------------- registry specifics

def test_warm_reopen_sends_nothing_to_the_registry(registry_session, tmp_path):
    reg = registry_session
    blob = make_blob(300)
    repo = _push(reg, blob)
    cfg = StorageConfig(BackendConfig(host=reg.host, repo=repo, plain_http=True, auth=ANONYMOUS),
                        CacheConfig(dir=str(tmp_path / "cache")))
    mark = reg.mark()
    with build_storage(cfg) as mgr:
        c = mgr.open(blob.info)
        assert c.read(0, len(blob.view)) == blob.view
    cold = reg.blob_gets(since=mark, digest=blob.digest)
    assert cold and all(e.status == 206 for e in cold)
    # ranges of chunk data only, each byte once (the blob's metadata is never fetched)
    assert sum(e.bytes for e in cold) == blob.data_end
    mark = reg.mark()
    with build_storage(cfg) as mgr:
        c = mgr.open(blob.info)
        assert c.read(0, len(blob.view)) == blob.view
        assert mgr.stats()["metrics"]["requests"] == 0
    assert reg.access_log(since=mark) == []


def test_adjacent_chunks_are_one_range_get_at_the_registry(registry_session, tmp_path):
    reg = registry_session
    blob = make_blob(301)
    repo = _push(reg, blob)
    first, last = blob.entries[0], blob.entries[7]
    with BlobCache(tmp_path / "c", blob.info, _registry_backend(reg, repo),
                   readahead=False) as c:
        mark = reg.mark()
        c.read(0, last.uncompressed_end)
    gets = reg.blob_gets(since=mark)
    assert len(gets) == 1 and gets[0].status == 206
    assert gets[0].bytes == last.compressed_end - first.compressed_offset


def test_registry_stopped_mid_read_fails_bounded_then_recovers(registry, tmp_path):
    blob = make_blob(302)
    repo = _push(registry, blob)
    port = registry.port
    cfg = StorageConfig(BackendConfig(host=registry.host, repo=repo, plain_http=True,
                                      auth=ANONYMOUS, retries=3, backoff=0.25),
                        CacheConfig(dir=str(tmp_path / "cache"), merge_size=64 << 10,
                                    readahead=False))
    with build_storage(cfg) as mgr:
        c = mgr.open(blob.info)
        done = []
        outcome: list = []
        stopped_at: list[float] = []

        def reader():
            try:
                for e in blob.entries:
                    assert c.read(e.uncompressed_offset, e.uncompressed_size) == \
                        blob.view[e.uncompressed_offset:e.uncompressed_end]
                    done.append(e)
                    time.sleep(0.02)
                outcome.append("finished")
            except BackendError as err:
                outcome.append((err, time.monotonic()))

        t = threading.Thread(target=reader)
        t.start()
        while len(done) < 5:
            time.sleep(0.005)
        registry.stop()
        stopped_at.append(time.monotonic())
        t.join(30)
        assert not t.is_alive()
        (err, failed_at), = outcome
        assert failed_at - stopped_at[0] < 15, "a dead registry must fail reads in bounded time"
        assert registry.host.split(":")[0] in str(err)
        assert 5 <= len(done) < len(blob.entries)
        registry.start()
        assert registry.port == port
        assert c.read(0, len(blob.view)) == blob.view           # same cache, same port
        assert c.usage()["complete"]


def test_stalled_registry_times_out_then_recovers(registry, tmp_path):
    """A registry that stops answering (SIGSTOP: connections accepted by the kernel, no bytes)."""
    blob = make_blob(303)
    repo = _push(registry, blob)
    cfg = StorageConfig(BackendConfig(host=registry.host, repo=repo, plain_http=True,
                                      auth=ANONYMOUS, read_timeout=0.5, retries=2, backoff=0.1),
                        CacheConfig(dir=str(tmp_path / "cache"), readahead=False))
    with build_storage(cfg) as mgr:
        c = mgr.open(blob.info)
        os.kill(registry.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(BackendError, match="timed out"):
                c.read(0, 100)
            assert time.monotonic() - t0 < 5
        finally:
            os.kill(registry.proc.pid, signal.SIGCONT)
        assert c.read(0, len(blob.view)) == blob.view


MIRROR_FAILURES = ["500", "reset", "refused", "stall", "proxy-500"]


@pytest.mark.parametrize("failure", MIRROR_FAILURES)
def test_failing_mirror_falls_back_to_the_origin(registry_session, tmp_path, failure):
    reg = registry_session
    blob = make_blob(310 + MIRROR_FAILURES.index(failure))
    repo = _push(reg, blob)
    server = None
    if failure == "refused":
        address = f"127.0.0.1:{free_port()}"
    else:
        server = FaultyHTTPServer(failure.removeprefix("proxy-")).start()
        address = server.host
    if failure.startswith("proxy"):
        mirror_cfg = MirrorConfig("http://" + address, kind="proxy")
        key = f"mirror proxy http://{address} -> {reg.host}/{repo}"
    else:
        mirror_cfg = MirrorConfig("http://" + address)
        key = f"mirror registry {address}/{repo}"
    try:
        cfg = StorageConfig(
            BackendConfig(host=reg.host, repo=repo, plain_http=True, auth=ANONYMOUS,
                          read_timeout=0.5, mirrors=[mirror_cfg]),
            CacheConfig(dir=str(tmp_path / "cache")))
        t0 = time.monotonic()
        with build_storage(cfg) as mgr:
            c = mgr.open(blob.info)
            assert c.read(0, 10) == blob.view[:10]          # one request: the mirror fails
            assert c.read(0, len(blob.view)) == blob.view   # ... and is skipped now
            sources = mgr.stats()["metrics"]["sources"]
        assert time.monotonic() - t0 < 10
        mirror = sources[key]
        origin = sources[f"origin registry {reg.host}/{repo}"]
        assert mirror["bytes"] == 0 and mirror["errors"] == 1 and mirror["penalized"]
        assert origin["bytes"] == blob.data_end and origin["errors"] == 0
        if server is not None:
            assert server.requests == 1          # penalized after the first failure
    finally:
        if server is not None:
            server.stop()


def test_mirror_serving_tampered_bytes_is_overruled_by_the_origin(registry_session, registry,
                                                                   tmp_path, caplog):
    blob = make_blob(320)
    repo = _push(registry_session, blob)
    _push(registry, blob, repo)                  # the mirror has a copy ...
    e = blob.entries[6]
    _flip(registry.blob_data_path(blob.digest), e.compressed_offset + 3)   # ... gone bad
    cfg = StorageConfig(
        BackendConfig(host=registry_session.host, repo=repo, plain_http=True, auth=ANONYMOUS,
                      mirrors=[MirrorConfig("http://" + registry.host)]),
        CacheConfig(dir=str(tmp_path / "cache")))
    with build_storage(cfg) as mgr:
        c = mgr.open(blob.info)
        assert c.read(0, len(blob.view)) == blob.view
        st = mgr.stats()["metrics"]
    assert st["verify_failures"] == 1
    mirror = st["sources"][f"mirror registry {registry.host}/{repo}"]
    origin = st["sources"][f"origin registry {registry_session.host}/{repo}"]
    assert mirror["bytes"] > 0 and origin["bytes"] >= e.compressed_size
    assert any("mirror served corrupt bytes" in r.getMessage() for r in caplog.records)


def test_tampered_blob_in_registry_storage_never_reaches_the_cache(registry_session, tmp_path):
    reg = registry_session
    blob = make_blob(330)
    repo = _push(reg, blob)
    e = blob.entries[12]
    _flip(reg.blob_data_path(blob.digest), e.compressed_offset)
    with BlobCache(tmp_path / "c", blob.info, build_backend(BackendConfig(
            host=reg.host, repo=repo, plain_http=True, auth=ANONYMOUS))) as c:
        with pytest.raises(IntegrityError, match="chunk #12"):
            c.read(0, len(blob.view))
        c.prefetch_all().result(10)             # skips the bad chunk, fetches the rest
        u = c.usage()
        assert u["chunks_ready"] == len(blob.entries) - 1 and not c.chunk_ready(12)
        with pytest.raises(IntegrityError):
            c.read(e.uncompressed_offset, 1)


def test_cold_and_warm_read_numbers(registry_session, tmp_path, record_property):
    """Not a benchmark; bounds that catch gross regressions, numbers for the record."""
    reg = registry_session
    blob = make_blob(340, chunks=64, short_every=0)
    repo = _push(reg, blob)
    with BlobCache(tmp_path / "c", blob.info, _registry_backend(reg, repo),
                   readahead=False) as c:
        lat = []
        for e in blob.entries[:32]:
            t0 = time.perf_counter()
            c.read(e.uncompressed_offset, 4096)
            lat.append(time.perf_counter() - t0)
        lat.sort()
        c.read(0, len(blob.view))
        t0 = time.perf_counter()
        rounds = 20
        for _ in range(rounds):
            for off in range(0, len(blob.view), 128 << 10):
                c.read(off, 128 << 10)
        warm = rounds * len(blob.view) / (time.perf_counter() - t0) / (1 << 20)
    record_property("cold_chunk_read_p50_ms", round(lat[len(lat) // 2] * 1000, 2))
    record_property("warm_read_MiB_s", round(warm))
    assert lat[len(lat) // 2] < 0.5 and warm > 50
