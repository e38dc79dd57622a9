"""Mirrors from the snapshotter's configuration, end to end: containerd runs containers whose chunks
came through a real nginx caching mirror (tests/helpers/nginx.py).

Two nodes, each its own containerd + nydus-snapshotter with a fresh cache, the snapshotter configured
as Nydus users write it (`[[backend.mirrors]]`: host, headers, ping_url, health_check_interval,
failure_limit). Each node pulls the image by digest (`nydus-snapshotter rpull --mirror`, as a node
pulls what a scheduler pinned) and runs a container that reads a file no start reads. The first
node fills nginx from the registry; the registry's log shows the second node fetched nothing (no
manifest, no config, no bootstrap, no chunk) and its mount daemon's stats show every chunk byte from
the mirror. Then nginx is gone: a third node still runs the container, every byte from the registry,
the mirror counted as failing. And `nydusify mount --mirror KEY=VALUE,...` reads through it the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass

import pytest

from converter.convert import ConvertOptions, convert
from rafs.api import ApiClient
from rafs.mounttab import state_paths
from snapshotter.lazy import default_run_dir
from testbed.containerd import Containerd, SnapshotterProcess, mounts_under
from tests.helpers import images as im
from tests.helpers import nginx
from tests.helpers.mounts import mounter  # noqa: F401  (fixture)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="containerd, runc and mounts need root"),
    pytest.mark.skipif(not all(shutil.which(b) for b in ("containerd", "ctr", "runc")),
                       reason="needs containerd and runc (apt)"),
    pytest.mark.skipif(not os.path.isfile("/bin/busybox"), reason="needs busybox-static"),
    pytest.mark.skipif(nginx.available() is not None, reason="needs nginx (apt)"),
]

BIG = im.random(3 << 20, seed=13)
DF = "X-Dragonfly-Registry"


@dataclass
class Image:
    host: str
    repo: str
    ref: str                  # HOST/REPO@sha256:... (pinned)
    big_md5: str


@pytest.fixture(scope="module")
def image(registry_session, tmp_path_factory) -> Image:
    work = tmp_path_factory.mktemp("mirror-snap")
    layers = im.busybox_image_layers() + [[im.Entry.dir("data"), im.Entry.file("data/big", BIG)]]
    layout = im.build_oci_layout(work / "layout", "bb", layers, config_overrides=im.BUSYBOX_CONFIG)
    host, repo = registry_session.host, f"mirror-{uuid.uuid4().hex[:8]}"
    results = convert(layout.ref, f"{host}/{repo}:nydus", ConvertOptions(plain_http=True, chunk_size=64 << 10))
    digest = results[0].descriptor["digest"]
    return Image(host, repo, f"{host}/{repo}@{digest}", hashlib.md5(BIG.read()).hexdigest())


class Node:
    """One node: a snapshotter with the mirror configuration and its containerd (fresh state)."""

    def __init__(self, tmp, name: str, mirror: dict):
        self.snap = SnapshotterProcess(tmp / name / "snap", config={"backend": {"mirrors": [mirror]}})
        self.ctd = Containerd(tmp / name / "ctd", snapshotter=self.snap, cri=False)
        self.mirror = mirror

    def __enter__(self) -> "Node":
        try:
            self.snap.start()
            self.ctd.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.ctd.stop()
        finally:
            self.snap.teardown()

    def rpull(self, ref: str) -> str:
        r = self.snap.cli("rpull", "--address", self.ctd.address, "--namespace", self.ctd.namespace,
                          "--plain-http", "--hosts-dir", "", "--mirror", json.dumps(self.mirror), ref,
                          timeout=120)
        assert r.returncode == 0, f"rpull failed:\n{r.stdout}\n{r.stderr}\n{self.snap.log()[-3000:]}"
        return r.stdout

    def run(self, ref: str, cid: str) -> str:
        return self.ctd.ctr_run(ref, cid, "sh", "-c", "cat /etc/hello.txt; md5sum /data/big").stdout

    def sources(self) -> dict:
        """storage.metrics.sources of the node's one mount daemon ({"mirror ...": {...}, "origin ...": {...}})."""
        mounts = self.snap.status()["mounts"]
        assert len(mounts) == 1, mounts
        api = state_paths(mounts[0]["mountpoint"], default_run_dir(self.snap.root)).api_sock
        return ApiClient(api).stats()["storage"]["metrics"]["sources"]


def _split(sources: dict) -> tuple[dict, dict]:
    mirror = [v for k, v in sources.items() if k.startswith("mirror ")]
    origin = [v for k, v in sources.items() if k.startswith("origin ")]
    assert len(mirror) == 1 and len(origin) == 1, sources
    return mirror[0], origin[0]


def test_second_node_gets_everything_from_the_nginx_mirror(image, registry_session, tmp_path):
    reg = registry_session
    want = im.BUSYBOX_HELLO.decode() + f"{image.big_md5}  /data/big\n"
    with nginx.run_nginx_cache(tmp_path / "nginx", upstream=reg.host) as ng:
        mirror = {"host": f"http://{ng.host}", "headers": {DF: f"http://{reg.host}"},
                  "ping_url": f"http://{ng.host}/v2/", "health_check_interval": 1, "failure_limit": 3}
        mark = reg.mark()
        with Node(tmp_path, "a", mirror) as a:
            assert "lazily" in a.rpull(image.ref)
            assert a.run(image.ref, "a1") == want
            m, o = _split(a.sources())
            assert m["bytes"] > 0 and o["bytes"] == 0 and not m["penalized"]
        first = reg.access_log(mark)
        assert any(e.is_blob_get for e in first)             # nginx filled itself from the registry

        mark = reg.mark()
        with Node(tmp_path, "b", mirror) as b:               # a fresh node: nothing cached
            b.rpull(image.ref)
            assert b.run(image.ref, "b1") == want
            m, o = _split(b.sources())
            assert m["bytes"] > BIG.size // 4 and m["errors"] == 0 and o["bytes"] == 0 and o["requests"] == 0
            assert mounts_under(b.snap.workdir), "the image is served by a lazy mount"
        assert reg.access_log(mark) == []                    # the second node fetched nothing from the registry
        hits = [e for e in ng.access_log() if e.cache == "HIT" and "/blobs/" in e.path]
        assert hits and all(e.status in (200, 206) for e in hits)

    # the mirror is gone: the next node falls back to the registry for everything, same container
    mark = reg.mark()
    with Node(tmp_path, "c", mirror) as c:
        c.rpull(image.ref)
        assert c.run(image.ref, "c1") == want
        m, o = _split(c.sources())
        assert m["bytes"] == 0 and m["errors"] >= 1 and o["bytes"] > BIG.size // 4
    assert any(e.is_blob_get for e in reg.access_log(mark))


def test_nydusify_mount_reads_through_the_mirror_option(image, registry_session, mounter, tmp_path):
    reg = registry_session
    with nginx.run_nginx_cache(tmp_path / "nginx", upstream=reg.host) as ng:
        spec = (f"host=http://{ng.host},header={DF}:http://{reg.host},ping_url=http://{ng.host}/v2/,"
                "failure_limit=2,health_check_interval=1")
        for n in range(2):                                   # the second mount: a fresh cache, a warm nginx
            mark = reg.mark()
            m = mounter.mount(image.ref, mode="fuse", extra=("--mirror", spec))
            assert hashlib.md5((m.path / "data/big").read_bytes()).hexdigest() == image.big_md5
            mirror, origin = _split(m.stats()["storage"]["metrics"]["sources"])
            assert mirror["bytes"] >= BIG.size // 2 and origin["bytes"] == 0
            m.umount()
            if n == 1:
                assert reg.access_log(mark) == []           # manifest, bootstrap and chunks: all from nginx
