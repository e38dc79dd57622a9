"""Lazy mounts for tests, made the way users make them: `nydusify mount --daemon` in a subprocess.

    def test_x(mounter):                       # the fixture: everything is unmounted afterwards
        m = mounter.mount(ref, mode="erofs")    # returns once the mount is ready
        m.path / "etc/hello.txt"
        m.stats()                               # the daemon's API (GET /api/v1/stats)
        m.umount()                              # `nydusify umount`

Each mount gets its own state root (--run-dir) and, unless given, its own
cache directory. The fixture's cleanup stops live daemons (`nydusify
umount`, then SIGKILL) and detaches whatever they left mounted, even when the
test failed.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rafs.api import ApiClient
from rafs.mounttab import clear_stale, is_ours, mounts_at, state_paths
from rafs.kmount import erofs_file_backed_supported

REPO = Path(__file__).resolve().parents[2]

MODES = [pytest.param("erofs", marks=pytest.mark.skipif(
    os.geteuid() != 0 or not erofs_file_backed_supported(),
    reason="needs root and file-backed EROFS (Linux >= 6.12)")), "fuse"]


def nydusify(*args, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "converter.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, errors="replace", timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass
class Mounted:
    ref: str
    path: Path
    mode: str
    cache_dir: Path
    run_dir: Path
    pid: int
    output: str
    extra: tuple = field(default_factory=tuple)

    @property
    def state(self):
        return state_paths(str(self.path), str(self.run_dir))

    def api(self) -> ApiClient:
        return ApiClient(self.state.api_sock)

    def stats(self) -> dict:
        return self.api().stats()

    def alive(self) -> bool:
        return pid_alive(self.pid)

    def umount(self) -> subprocess.CompletedProcess:
        r = nydusify("umount", self.path, "--run-dir", self.run_dir)
        assert r.returncode == 0, f"umount {self.path}: {r.stdout}{r.stderr}"
        return r

    def wait_stats(self, predicate, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if predicate(st) or time.monotonic() > deadline:
                return st
            time.sleep(0.05)


class Mounter:
    def __init__(self, base: Path):
        self.base = base
        self.run_dir = base / "run"
        self.mounts: list[Mounted] = []
        self._n = 0

    def mount(self, ref: str, *, mode: str, mountpoint: Path | None = None, cache_dir: Path | None = None,
              extra: tuple = (), plain_http: bool = True, check: bool = True, learn: str = "off") -> Mounted:
        """`learn` off by default: tests count exact fetches, and a record an earlier test published
        for the same image would prefetch more (tests/integration/test_learned.py turns it on)."""
        self._n += 1
        mnt = mountpoint or self.base / f"mnt{self._n}"
        mnt.mkdir(parents=True, exist_ok=True)
        cache = cache_dir or self.base / f"cache{self._n}"
        pid_file = self.base / f"pid{self._n}"
        args = ["mount", ref, mnt, "--mode", mode, "--cache-dir", cache, "--run-dir", self.run_dir,
                "--daemon", "--pid-file", pid_file, "--learn", learn, *extra]
        if plain_http:
            args.append("--plain-http")
        r = nydusify(*args)
        if r.returncode != 0:
            log = self.daemon_log(mnt)
            if check:
                raise AssertionError(f"nydusify {' '.join(map(str, args))} failed:\n{r.stdout}{r.stderr}\n"
                                     f"daemon log:\n{log}")
            return None
        pid = int(pid_file.read_text())
        m = Mounted(ref, mnt, mode, cache, self.run_dir, pid, r.stdout, tuple(extra))
        self.mounts.append(m)
        assert f"mode {mode}" in r.stdout, r.stdout
        return m

    def daemon_log(self, mnt: Path) -> str:
        try:
            return Path(state_paths(str(mnt), str(self.run_dir)).log).read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def cleanup(self) -> list[str]:
        problems = []
        for m in reversed(self.mounts):
            if m.alive():
                r = nydusify("umount", m.path, "--run-dir", m.run_dir, timeout=30)
                deadline = time.monotonic() + 10
                while m.alive() and time.monotonic() < deadline:
                    time.sleep(0.05)
                if m.alive():
                    problems.append(f"daemon {m.pid} for {m.path} survived umount: {r.stdout}{r.stderr}")
                    os.kill(m.pid, signal.SIGKILL)
                    while m.alive() and time.monotonic() < deadline + 10:
                        time.sleep(0.05)
            paths = state_paths(str(m.path), str(m.run_dir))
            try:
                clear_stale(str(m.path), paths)
            except Exception as e:                      # noqa: BLE001 - report, keep cleaning
                problems.append(f"clearing {m.path}: {e}")
            left = [x for t in (str(m.path), paths.blobs) for x in mounts_at(t) if is_ours(x, paths)]
            if left:
                problems.append(f"left mounted: {left}")
        return problems


@pytest.fixture
def mounter(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    m = Mounter(tmp_path)
    yield m
    problems = m.cleanup()
    assert not problems, problems


# --------------------------------------------------------------------------- a lazily read image

KiB, MiB = 1 << 10, 1 << 20
LAZY_CHUNK = 64 * KiB
PREFETCH_DIR = "prefetch"


def lazy_layers():
    """Random (incompressible) data around small files, so fetch amounts are easy to bound."""
    from tests.helpers import images as im
    D, F = im.Entry.dir, im.Entry.file
    files = {"etc/small.txt": im.data(b"a small file\n"),
             "etc/other.txt": im.data(b"another small file\n" * 3)}
    for i in range(4):
        files[f"data/r{i}"] = im.random(1536 * KiB + 777 * i, seed=100 + i)
    files[f"{PREFETCH_DIR}/p1"] = im.random(300 * KiB, seed=200)
    files[f"{PREFETCH_DIR}/p2"] = im.random(200 * KiB + 5, seed=201)
    for i in range(40):
        files[f"many/f{i:02d}"] = im.random(3000 + 977 * i, seed=300 + i)
    order = ["data/r0", "data/r1", "etc/small.txt", "data/r2", "etc/other.txt", "data/r3",
             f"{PREFETCH_DIR}/p1", f"{PREFETCH_DIR}/p2"] + [f"many/f{i:02d}" for i in range(40)]
    layer = [D("etc"), D("data"), D(PREFETCH_DIR), D("many")] + [F(p, files[p]) for p in order]
    return [layer], files


@dataclass
class LazySource:
    ref: str                      # oci:DIR:TAG of the source image
    files: dict                   # path -> images.Content
    prefetch_file: Path           # --prefetch-patterns file naming PREFETCH_DIR

    def expected(self, path: str) -> bytes:
        return self.files[path].read()


@pytest.fixture(scope="session")
def lazy_source(tmp_path_factory) -> LazySource:
    from tests.helpers import images as im
    d = tmp_path_factory.mktemp("lazy-src")
    layers, files = lazy_layers()
    info = im.build_oci_layout(d / "layout", "lazy", layers)
    pf = d / "prefetch.txt"
    pf.write_text(f"/{PREFETCH_DIR}\n")
    return LazySource(info.ref, files, pf)


def convert_into(registry, source_ref: str, repo: str, *args) -> str:
    """Push `source_ref` to `registry` as REPO-src:v1 and convert it to REPO:v1 with the CLI."""
    from testbed.registry import skopeo_copy
    src = f"{registry.host}/{repo}-src:v1"
    dst = f"{registry.host}/{repo}:v1"
    skopeo_copy(source_ref, f"docker://{src}")
    r = nydusify("convert", "--source", src, "--target", dst, "--plain-http", "--chunk-size", "64K", *args,
                 timeout=120)
    assert r.returncode == 0, f"convert {src}: {r.stdout}{r.stderr}"
    return dst


def blob_digests(ref: str) -> list[str]:
    """The nydus blob layer digests of converted image `ref` (plain-http registry)."""
    from converter.nydus_image import open_nydus_image
    with open_nydus_image(ref, plain_http=True) as image:
        return [image.blob_digest(i) for i in range(len(image.bootstrap.meta.blobs))]


def data_gets(registry, since: int, digests) -> list:
    """Blob GETs of the image's data blobs (not the bootstrap layer) since access-log mark `since`."""
    want = set(digests)
    return [e for e in registry.blob_gets(since=since) if e.digest in want]
