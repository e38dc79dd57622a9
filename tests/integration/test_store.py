"""Image I/O against real components: docker-registry (distribution 2.8), skopeo, umoci.

The only fake is tests/fakes/token_proxy.py (token auth with expiry we can
watch, plus CDN-like redirect / no-Range / cut-connection behaviours).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import tracemalloc

import pytest

from rafs.errors import BackendError, FormatError, IntegrityError, NotFound
from rafs.image.auth import ANONYMOUS, Credentials, load_docker_credentials, parse_www_authenticate
from rafs.image.client import RegistryClient
from rafs.image.digests import sha256_digest
from rafs.image.media import OCI_INDEX, OCI_MANIFEST
from rafs.image.platform import Platform
from rafs.image.refs import RefError, parse_ref
from rafs.image.store import OciLayoutStore, RegistryStore, open_store
from tests.fakes.token_proxy import TokenProxy
from testbed.registry import run_registry, skopeo_copy, write_docker_config

import gzip
import io
import tarfile

MiB = 1 << 20


# --------------------------------------------------------------------------- tiny image builder (through our store)

def _layer(files: dict[str, bytes]) -> tuple[bytes, str]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(files):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(files[name]), 0o644, 1_700_000_000
            tf.addfile(ti, io.BytesIO(files[name]))
    return gzip.compress(raw.getvalue(), mtime=0), sha256_digest(raw.getvalue())


class Img:
    def __init__(self, manifest: bytes, config: bytes, layers: list[bytes], platform: str):
        self.manifest, self.config, self.layers, self.platform = manifest, config, layers, platform
        self.digest = sha256_digest(manifest)


def build_image(store, layers: list[dict[str, bytes]], platform="linux/amd64", tag=True) -> Img:
    p = platform.split("/")
    blobs, diff_ids = zip(*[_layer(f) for f in layers])
    cfg = {"architecture": p[1], "os": p[0], "config": {"Cmd": ["/bin/sh"]},
           "rootfs": {"type": "layers", "diff_ids": list(diff_ids)}}
    if len(p) > 2:
        cfg["variant"] = p[2]
    config = json.dumps(cfg).encode()
    store.put_bytes(sha256_digest(config), config)
    for b in blobs:
        store.put_bytes(sha256_digest(b), b)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": sha256_digest(b), "size": len(b)} for b in blobs],
    }).encode()
    (store.tag if tag else store.put_manifest)(manifest, OCI_MANIFEST)
    return Img(manifest, config, list(blobs), platform)


def index_of(imgs: list[Img]) -> bytes:
    ents = []
    for im in imgs:
        p = im.platform.split("/")
        plat = {"architecture": p[1], "os": p[0], **({"variant": p[2]} if len(p) > 2 else {})}
        ents.append({"mediaType": OCI_MANIFEST, "digest": im.digest, "size": len(im.manifest),
                     "platform": plat})
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": ents}).encode()


@pytest.fixture
def reg(registry_session):
    return registry_session


@pytest.fixture
def repo(request) -> str:
    return "t/" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")


def _rstore(reg, repo, tag="v1", **kw) -> RegistryStore:
    return open_store(f"{reg.host}/{repo}:{tag}", plain_http=True, **kw)


# --------------------------------------------------------------------------- references, config, parsing

@pytest.mark.parametrize("s,kind,fields,text", [
    ("oci:/abs/dir", "oci", dict(path="/abs/dir", tag="latest", tag_given=False), "oci:/abs/dir:latest"),
    ("oci:/abs/dir:v1", "oci", dict(path="/abs/dir", tag="v1"), "oci:/abs/dir:v1"),
    ("oci:rel/d:ir/x", "oci", dict(path="rel/d:ir/x", tag="latest"), "oci:rel/d:ir/x:latest"),
    ("oci:/d:1:v2", "oci", dict(path="/d:1", tag="v2"), "oci:/d:1:v2"),
    ("oci:/d@sha256:" + "a" * 64, "oci", dict(path="/d", tag=None, digest="sha256:" + "a" * 64),
     "oci:/d@sha256:" + "a" * 64),
    ("docker://127.0.0.1:5000/a/b:t", "registry", dict(host="127.0.0.1:5000", repo="a/b", tag="t"),
     "127.0.0.1:5000/a/b:t"),
    ("localhost/x", "registry", dict(host="localhost", repo="x", tag="latest"), "localhost/x:latest"),
    ("reg.example.com/x/y@sha256:" + "b" * 64, "registry",
     dict(host="reg.example.com", repo="x/y", tag=None, digest="sha256:" + "b" * 64),
     "reg.example.com/x/y@sha256:" + "b" * 64),
    ("h.io/x:t@sha256:" + "c" * 64, "registry", dict(tag="t", digest="sha256:" + "c" * 64),
     "h.io/x:t@sha256:" + "c" * 64),
])
def test_parse_ref(s, kind, fields, text):
    r = parse_ref(s)
    assert r.kind == kind
    for k, v in fields.items():
        assert getattr(r, k) == v, k
    assert str(r) == text
    assert parse_ref(str(r)) == r or not r.tag_given


@pytest.mark.parametrize("s", ["busybox", "library/busybox:1", "docker://busybox", "h.io/UPPER:t", "h.io/x:bad tag",
                               "h.io/x@sha256:abc", "oci:", "oci:/d:bad tag", "ftp://h.io/x", "", "h.io/"])
def test_parse_ref_rejects(s):
    with pytest.raises(RefError):
        parse_ref(s)


def test_docker_config_credentials(tmp_path, monkeypatch):
    write_docker_config(tmp_path, {"https://reg.example.com:5000/v1/": ("u", "p:w"),
                                   "https://index.docker.io/v1/": ("hub", "x")})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert load_docker_credentials("reg.example.com:5000") == Credentials("u", "p:w")
    assert load_docker_credentials("registry-1.docker.io") == Credentials("hub", "x")
    assert load_docker_credentials("other.example.com") is None
    (tmp_path / "config.json").write_text("{not json")
    assert load_docker_credentials("reg.example.com:5000") is None


def test_www_authenticate_parse():
    s, p = parse_www_authenticate('Bearer realm="https://a/token",service="reg",scope="repository:x/y:pull,push"')
    assert s == "bearer" and p == {"realm": "https://a/token", "service": "reg", "scope": "repository:x/y:pull,push"}
    assert parse_www_authenticate('Basic realm="r"') == ("basic", {"realm": "r"})


def test_platform_matching():
    assert Platform.parse("linux/arm64/v8").matches("linux/arm64")
    assert Platform("linux", "arm64").matches("linux/arm64/v8")
    assert Platform("linux", "aarch64").matches("linux/arm64")
    assert not Platform("linux", "arm", "v6").matches("linux/arm/v7")
    assert Platform("linux", "arm").matches("linux/arm/v7")
    assert not Platform("linux", "amd64").matches("linux/arm64")
    assert str(Platform.parse("linux/arm64/v8")) == "linux/arm64/v8"
    with pytest.raises(ValueError):
        Platform.parse("linux")


# --------------------------------------------------------------------------- registry: blobs & manifests

def test_push_pull_blobs_and_manifests(reg, repo):
    with _rstore(reg, repo) as s:
        mark = reg.mark()
        img = build_image(s, [{"etc/hello": b"hi\n"}, {"bin/tool": os.urandom(5000)}])
        entries = reg.access_log(mark)
        uploads = [e for e in entries if e.method == "POST"]
        assert len(uploads) == 3  # config + 2 layers, each one upload
        # pushing again is skipped after a HEAD
        mark = reg.mark()
        assert s.put_bytes(sha256_digest(img.config), img.config) is False
        assert s.has_blob(sha256_digest(img.layers[0]))
        assert [e.method for e in reg.access_log(mark)] == ["HEAD", "HEAD"]

        desc = s.resolve()
        assert (desc.media_type, desc.digest, desc.size) == (OCI_MANIFEST, img.digest, len(img.manifest))
        assert s.get_bytes(desc.digest) == img.manifest
        m = s.get_json(desc.digest)
        assert s.get_bytes(m["config"]["digest"]) == img.config
        for ld, data in zip(m["layers"], img.layers):
            with s.open_blob(ld["digest"]) as f:
                assert f.read() == data
        # untagged manifest by digest
        other = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": m["config"],
                            "layers": m["layers"][:1]}).encode()
        d2 = s.put_manifest(other, OCI_MANIFEST)
        assert d2 == sha256_digest(other)
        with open_store(f"{reg.host}/{repo}@{d2}", plain_http=True) as s2:
            assert s2.resolve().digest == d2
            assert s2.get_bytes(d2) == other
        assert s.client.list_tags() == ["v1"]


def test_large_blob_streams_without_loading_into_memory(reg, repo, tmp_path):
    path = tmp_path / "big"
    h = hashlib.sha256()
    with open(path, "wb") as f:
        block = os.urandom(MiB)
        for i in range(64):
            b = block[i:] + block[:i]
            h.update(b)
            f.write(b)
    digest = "sha256:" + h.hexdigest()
    with _rstore(reg, repo + "-mono") as s:
        tracemalloc.start()
        try:
            assert s.put_blob(digest, path) is True
            peak_push = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert s.client.head_blob(digest) == 64 * MiB
        tracemalloc.start()
        try:
            got = hashlib.sha256()
            n = 0
            with s.open_blob(digest) as f:
                while chunk := f.read(256 * 1024):
                    got.update(chunk)
                    n += len(chunk)
            peak_pull = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert n == 64 * MiB and "sha256:" + got.hexdigest() == digest
    assert peak_push < 8 * MiB, peak_push
    assert peak_pull < 8 * MiB, peak_pull
    # chunked upload (PATCH) of the same file into another repository
    with RegistryClient(reg.host, repo + "-chunked", plain_http=True) as c:
        mark = reg.mark()
        tracemalloc.start()
        try:
            assert c.push_blob(digest, path, 64 * MiB, chunk_size=16 * MiB) is True
            peak_chunked = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        log = reg.access_log(mark)
        assert [e.status for e in log if e.method == "PATCH"] == [202] * 4
        assert [e.status for e in log if e.method == "PUT"] == [201]
        assert c.head_blob(digest) == 64 * MiB
        assert c.read_range(digest, 64 * MiB - 10, 10) == (block[63:] + block[:63])[-10:]
    assert peak_chunked < 8 * MiB, peak_chunked


def test_range_reads_exact(reg, repo):
    data = os.urandom(3 * MiB + 17)
    dg = sha256_digest(data)
    with RegistryClient(reg.host, repo, plain_http=True) as c:
        c.push_blob(dg, data)
        mark = reg.mark()
        cases = [(0, 100), (3 * MiB // 2, 4096), (len(data) - 17, 17), (len(data) - 1, 1), (0, len(data))]
        for off, size in cases:
            assert c.read_range(dg, off, size) == data[off:off + size]
        assert c.read_range(dg, 5, 0) == b""
        gets = reg.blob_gets(mark, dg)
        assert [(e.status, e.bytes) for e in gets] == [(206, size) for _, size in cases]
        with pytest.raises(BackendError, match="beyond the end"):
            c.read_range(dg, len(data) - 5, 10)
        with pytest.raises(BackendError, match="beyond the end"):
            c.read_range(dg, len(data), 1)


# --------------------------------------------------------------------------- OCI layout, judged by skopeo & umoci

def test_oci_layout_roundtrip_through_skopeo(reg, repo, tmp_path):
    layout = tmp_path / "layout"
    with open_store(f"oci:{layout}:v1", create=True) as oci:
        img = build_image(oci, [{"etc/hello": b"hello\n"}, {"usr/bin/x": os.urandom(70000)}])
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    idx = json.loads((layout / "index.json").read_text())
    assert idx["manifests"][0]["annotations"] == {"org.opencontainers.image.ref.name": "v1"}
    assert not [p for p in layout.rglob(".tmp-*")]

    skopeo_copy(f"oci:{layout}:v1", f"docker://{reg.host}/{repo}:v1")
    with _rstore(reg, repo) as r:
        d = r.resolve()
        assert d.digest == img.digest and d.media_type == OCI_MANIFEST
        assert r.get_bytes(d.digest) == img.manifest
        m = r.get_json(d.digest)
        assert r.get_bytes(m["config"]["digest"]) == img.config
        for ld, data in zip(m["layers"], img.layers):
            with r.open_blob(ld["digest"]) as f:
                assert f.read() == data

    # and back: skopeo writes a layout, our store reads it
    back = tmp_path / "back"
    skopeo_copy(f"docker://{reg.host}/{repo}:v1", f"oci:{back}:v2")
    with open_store(f"oci:{back}:v2") as o2:
        assert o2.resolve().digest == img.digest
        [(plat, md)] = o2.manifests_for(o2.resolve())
        assert str(plat) == "linux/amd64" and md.digest == img.digest
        with o2.open_blob(json.loads(img.manifest)["layers"][1]["digest"]) as f:
            assert f.read() == img.layers[1]


def test_oci_layout_read_by_umoci(tmp_path):
    if not shutil.which("umoci"):
        pytest.skip("umoci not installed")
    layout = tmp_path / "layout"
    with open_store(f"oci:{layout}:v1", create=True) as oci:
        build_image(oci, [{"etc/hello": b"hello\n"}, {"etc/hello": b"again\n", "x": b"x"}])
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)], check=True, capture_output=True)
    assert (bundle / "rootfs/etc/hello").read_bytes() == b"again\n"
    # umoci writes a layout, we read it (an image with no layers; platform from its config)
    ul = tmp_path / "umoci"
    subprocess.run(["umoci", "init", "--layout", str(ul)], check=True, capture_output=True)
    subprocess.run(["umoci", "new", "--image", f"{ul}:empty"], check=True, capture_output=True)
    with open_store(f"oci:{ul}:empty") as s:
        [(plat, md)] = s.manifests_for(s.resolve())
        assert plat.os == "linux" and md.media_type == OCI_MANIFEST


def test_oci_layout_tags_and_resolution(tmp_path):
    layout = tmp_path / "l"
    with open_store(f"oci:{layout}:only", create=True) as oci:
        a = build_image(oci, [{"a": b"1"}])
        # a default-tag ref finds the single image whatever its name
        assert open_store(f"oci:{layout}").resolve().digest == a.digest
    with open_store(f"oci:{layout}:t2") as oci:
        b = build_image(oci, [{"a": b"2"}])
        c = build_image(oci, [{"a": b"3"}])  # re-tag replaces the old entry
    idx = json.loads((layout / "index.json").read_text())
    names = [e["annotations"]["org.opencontainers.image.ref.name"] for e in idx["manifests"]]
    assert sorted(names) == ["only", "t2"]
    with pytest.raises(NotFound):  # no longer a single image: the default tag must exist
        open_store(f"oci:{layout}").resolve()
    assert open_store(f"oci:{layout}:t2").resolve().digest == c.digest != b.digest
    assert open_store(f"oci:{layout}@{a.digest}").resolve().digest == a.digest
    with pytest.raises(NotFound, match=r"tag 'nope' not found in OCI layout .*\(tags: only, t2\)"):
        open_store(f"oci:{layout}:nope").resolve()
    with pytest.raises(BackendError, match="not an OCI image layout"):
        open_store(f"oci:{tmp_path / 'missing'}:x")
    # a bad digest never becomes a path
    with pytest.raises(FormatError):
        OciLayoutStore(parse_ref(f"oci:{layout}")).get_bytes("sha256:../../etc/passwd")


def test_multi_platform_index(reg, repo, tmp_path):
    layout = tmp_path / "multi"
    with open_store(f"oci:{layout}:m", create=True) as oci:
        a = build_image(oci, [{"f": b"amd"}], platform="linux/amd64", tag=False)
        b = build_image(oci, [{"f": b"arm"}], platform="linux/arm64/v8", tag=False)
        idx = index_of([a, b])
        oci.tag(idx, OCI_INDEX)
        top = oci.resolve()
        assert top.media_type == OCI_INDEX
        assert [str(p) for p, _ in oci.manifests_for(top)] == ["linux/amd64", "linux/arm64/v8"]
    skopeo_copy(f"oci:{layout}:m", f"docker://{reg.host}/{repo}:m", all_images=True)
    with _rstore(reg, repo, "m") as r:
        top = r.resolve()
        assert top.media_type == OCI_INDEX and top.digest == sha256_digest(idx)
        assert [d.digest for _, d in r.manifests_for(top)] == [a.digest, b.digest]
        [(plat, md)] = r.manifests_for(top, "linux/arm64")
        assert str(plat) == "linux/arm64/v8" and r.get_bytes(md.digest) == b.manifest
        assert r.manifests_for(top, "linux/s390x") == []
    with open_store(f"{reg.host}/{repo}@{a.digest}", plain_http=True) as single:
        [(plat, md)] = single.manifests_for(single.resolve())
        assert str(plat) == "linux/amd64" and md.digest == a.digest


# --------------------------------------------------------------------------- auth

def test_basic_auth_from_docker_config(tmp_path, monkeypatch):
    with run_registry(tmp_path / "reg", htpasswd={"alice": "s3cret"}) as reg:
        cfg = tmp_path / "dockercfg"
        write_docker_config(cfg, {reg.host: ("alice", "s3cret")})
        monkeypatch.setenv("DOCKER_CONFIG", str(cfg))
        with _rstore(reg, "sec/img") as s:
            img = build_image(s, [{"secret": b"s"}])
            assert s.resolve().digest == img.digest
            assert s.get_bytes(sha256_digest(img.config)) == img.config
        # skopeo, with the same credentials, sees what we pushed
        skopeo_copy(f"docker://{reg.host}/sec/img:v1", f"oci:{tmp_path / 'out'}:v1", src_creds="alice:s3cret")
        assert open_store(f"oci:{tmp_path / 'out'}:v1").resolve().digest == img.digest
        with _rstore(reg, "sec/img", auth=ANONYMOUS) as anon, \
                pytest.raises(BackendError, match="unauthorized.*no credentials"):
            anon.resolve()
        write_docker_config(cfg, {f"http://{reg.host}/v1/": ("alice", "wrong")})
        with _rstore(reg, "sec/img") as bad, pytest.raises(BackendError, match="unauthorized.*'alice'"):
            bad.resolve()


def test_bearer_token_refresh_before_expiry(reg, repo):
    data = os.urandom(10000)
    dg = sha256_digest(data)
    with TokenProxy(reg.host, users={"bob": "pw"}, token_ttl=1.0) as proxy, \
            RegistryClient(proxy.host, repo, plain_http=True, auth=Credentials("bob", "pw")) as c:
        assert c.push_blob(dg, data) is True
        assert proxy.token_requests[0]["user"] == "bob"
        assert any(f"repository:{repo}:pull,push" in t["scopes"] for t in proxy.token_requests)
        assert c.read_range(dg, 10, 20) == data[10:30]
        issued, n401 = proxy.tokens_issued, sum(1 for *_, st in proxy.log if st == 401)
        time.sleep(1.05)  # every token is now expired
        assert c.get_blob(dg) == data
        assert proxy.tokens_issued == issued + 1          # refreshed ...
        assert sum(1 for *_, st in proxy.log if st == 401) == n401  # ... before the registry had to say 401


def test_bearer_token_refresh_on_401(reg, repo):
    data = os.urandom(1000)
    dg = sha256_digest(data)
    # the token server claims 300 s but tokens die after 0.5 s: only a 401 tells
    with TokenProxy(reg.host, users={"bob": "pw"}, token_ttl=0.5, advertised_ttl=300) as proxy, \
            RegistryClient(proxy.host, repo, plain_http=True, auth=Credentials("bob", "pw")) as c:
        c.push_blob(dg, data)
        assert c.read_range(dg, 0, 10) == data[:10]
        time.sleep(0.6)
        before = len(proxy.log)
        assert c.read_range(dg, 10, 10) == data[10:20]
        assert [st for *_, st in proxy.log[before:]] == [401, 206]
        proxy.token_ttl = 300
        c.get_blob(dg)
        proxy.revoke_all()  # tokens die early (key rotation): same recovery
        before = len(proxy.log)
        assert c.get_blob(dg) == data
        assert [st for *_, st in proxy.log[before:]] == [401, 200]


def test_bearer_bad_credentials(reg, repo):
    with TokenProxy(reg.host, users={"bob": "pw"}) as proxy:
        with RegistryClient(proxy.host, repo, plain_http=True, auth=Credentials("bob", "nope")) as c, \
                pytest.raises(BackendError, match="unauthorized: token server .* refused 'bob'|refused as 'bob'"):
            c.head_blob("sha256:" + "0" * 64)
        with RegistryClient(proxy.host, repo, plain_http=True, auth=ANONYMOUS) as c, \
                pytest.raises(BackendError, match="unauthorized.*anonymously"):
            c.get_manifest("v1")


def test_no_credentials_sent_to_redirect_target(reg, repo):
    data = os.urandom(300000)
    dg = sha256_digest(data)
    with TokenProxy(reg.host, users={"bob": "pw"}, redirect_blobs=True) as proxy, \
            RegistryClient(proxy.host, repo, plain_http=True, auth=Credentials("bob", "pw")) as c:
        c.push_blob(dg, data)
        assert c.get_blob(dg) == data
        assert c.read_range(dg, 1000, 5000) == data[1000:6000]
        assert any(st == 307 for *_, st in proxy.log)
        assert proxy.leaked_auth == []


# --------------------------------------------------------------------------- server quirks and faults

def test_range_read_when_server_ignores_range(reg, repo):
    data = os.urandom(2 * MiB)
    dg = sha256_digest(data)
    with TokenProxy(reg.host, ignore_range=True) as proxy, \
            RegistryClient(proxy.host, repo, plain_http=True) as c:
        c.push_blob(dg, data)
        assert c.read_range(dg, MiB + 3, 1000) == data[MiB + 3:MiB + 1003]
        assert c.read_range(dg, 0, 7) == data[:7]


def test_stream_resumes_after_connection_cut(reg, repo):
    data = os.urandom(MiB)
    dg = sha256_digest(data)
    with TokenProxy(reg.host, cut_blob_after=200000, cuts=2) as proxy, \
            RegistryClient(proxy.host, repo, plain_http=True, backoff=0.05) as c:
        c.push_blob(dg, data)
        with c.open_blob(dg) as f:
            assert f.read() == data
        # cut twice: resumed twice with Range from where it broke
        assert [st for m, p, st in proxy.log if m == "GET" and dg in p] == [200, 206, 206]
        proxy.cuts_left = 1
        assert c.read_range(dg, 100000, 300000) == data[100000:400000]  # cut -> retried
        assert [st for m, p, st in proxy.log if m == "GET" and dg in p][3:] == [206, 206]


def test_stalled_registry_times_out_boundedly(reg, repo):
    data = os.urandom(1000)
    dg = sha256_digest(data)
    with RegistryClient(reg.host, repo, plain_http=True) as c:
        c.push_blob(dg, data)
    with TokenProxy(reg.host, stall_blob_gets=3.0) as proxy, \
            RegistryClient(proxy.host, repo, plain_http=True, timeout=(1, 0.3), retries=2, backoff=0.05) as c:
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=r"timed out.*gave up after 3 attempts"):
            c.read_range(dg, 0, 10)
        assert time.monotonic() - t0 < 3


def test_cross_repository_mount(reg, repo):
    data = os.urandom(5000)
    dg = sha256_digest(data)
    with RegistryClient(reg.host, repo + "-src", plain_http=True) as src, \
            RegistryClient(reg.host, repo + "-dst", plain_http=True) as dst:
        src.push_blob(dg, data)
        assert dst.head_blob(dg) is None
        assert dst.mount_blob(dg, src.repo) is True
        assert dst.head_blob(dg) == len(data) and dst.get_blob(dg) == data
        assert dst.mount_blob("sha256:" + "e" * 64, src.repo) is False
        dst.put_manifest("v1", json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                                      "digest": dg, "size": len(data)},
                                           "layers": []}).encode(), OCI_MANIFEST)
        digest, size = dst.head_manifest("v1")
        assert dst.get_manifest("v1")[2] == digest and size > 0
        assert dst.head_manifest("nope") is None


def test_missing_blob_and_manifest_errors(reg, repo, tmp_path):
    ghost = "sha256:" + "f" * 64
    with _rstore(reg, repo) as s:
        build_image(s, [{"a": b"a"}])
        with pytest.raises(NotFound, match=re.escape(f"blob not found: {reg.host}/{repo}@{ghost}")):
            s.get_bytes(ghost)
        with pytest.raises(NotFound, match="blob not found"):
            with s.open_blob(ghost):
                pass
        with pytest.raises(NotFound, match="blob not found"):
            s.client.read_range(ghost, 0, 10)
        assert s.has_blob(ghost) is False
    with pytest.raises(NotFound, match=re.escape(f"manifest not found: {reg.host}/{repo}:nope")):
        _rstore(reg, repo, "nope").resolve()
    with pytest.raises(NotFound, match=re.escape(f"manifest not found: {reg.host}/no/such-repo:v1")):
        _rstore(reg, "no/such-repo").resolve()
    layout = tmp_path / "l"
    with open_store(f"oci:{layout}:x", create=True) as oci:
        with pytest.raises(NotFound, match=f"blob {ghost} not found in OCI layout {re.escape(str(layout))}"):
            oci.get_bytes(ghost)
        with pytest.raises(NotFound, match=ghost):
            oci.open_blob(ghost)


def test_tampered_content_is_detected(reg, repo, tmp_path):
    data = os.urandom(200000)
    dg = sha256_digest(data)
    with _rstore(reg, repo) as s:
        img = build_image(s, [{"a": b"a"}])
        s.put_bytes(dg, data)
        evil = bytearray(data)
        evil[123456] ^= 1
        reg.blob_data_path(dg).write_bytes(bytes(evil))
        with pytest.raises(IntegrityError, match=dg):
            s.get_bytes(dg)
        with pytest.raises(IntegrityError):
            with s.open_blob(dg) as f:
                f.read()
        with pytest.raises(IntegrityError):  # leaving the block early still verifies
            with s.open_blob(dg) as f:
                f.read(10)
        # range reads are not verifiable per se (the chunk digest is the caller's job): bytes as served
        assert s.client.read_range(dg, 123450, 10) == bytes(evil[123450:123460])
        # a manifest fetched by digest is verified too
        reg.blob_data_path(img.digest).write_bytes(img.manifest.replace(b'"schemaVersion": 2', b'"schemaVersion":2 '))
        with pytest.raises(IntegrityError, match="manifest"):
            s.client.get_manifest(img.digest)
        # pushing with the wrong digest
        with pytest.raises(IntegrityError):
            s.put_bytes("sha256:" + "1" * 64, b"xyz")
        p = tmp_path / "f"
        p.write_bytes(b"not what the digest says")
        with pytest.raises(IntegrityError, match="does not match"):
            s.put_blob("sha256:" + "2" * 64, p)
    layout = tmp_path / "l"
    with open_store(f"oci:{layout}:x", create=True) as oci:
        oci.put_bytes(dg, data)
        with pytest.raises(IntegrityError):
            oci.put_bytes("sha256:" + "3" * 64, data)
        assert not list((layout / "blobs/sha256").glob(".tmp-*"))
        (layout / "blobs/sha256" / dg[7:]).write_bytes(bytes(evil))
        with pytest.raises(IntegrityError):
            oci.get_bytes(dg)
        with pytest.raises(IntegrityError):
            with oci.open_blob(dg) as f:
                f.read(1)


def test_registry_down_gives_bounded_backend_error(registry, repo):
    data = os.urandom(4096)
    dg = sha256_digest(data)
    with RegistryClient(registry.host, repo, plain_http=True) as c:
        c.push_blob(dg, data)
        assert c.read_range(dg, 0, 4) == data[:4]
        registry.stop()
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=r"connection failed.*gave up after 4 attempts"):
            c.read_range(dg, 0, 4)
        elapsed = time.monotonic() - t0
        assert elapsed < 15, elapsed
        registry.start()  # same port and storage: back in business
        assert c.read_range(dg, 4, 4) == data[4:8]
