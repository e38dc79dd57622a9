"""`nydusify convert` registry -> registry against a real docker-registry (issue #2).

Sources are pushed by skopeo (preserving digests); the converter reads and
writes the registry only through the `nydusify` CLI with --plain-http. The
registry's access log proves what went over the wire.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile

import pytest
import requests

from rafs.bootstrap import Bootstrap
from tests.helpers import images as im
from tests.helpers import trees as tr
from testbed.registry import skopeo_copy

from .conftest import KiB, exported_devices, nydusify, reader_tree

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
              pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo")]

OCI_INDEX = im.MEDIA_INDEX
ACCEPT = ", ".join([im.MEDIA_MANIFEST, OCI_INDEX])


def blob_writes(entries) -> list:
    """Access-log entries that upload blob data (start, chunk or finish an upload)."""
    return [e for e in entries if e.method in ("POST", "PUT", "PATCH") and "/blobs/" in e.path]


def manifest_of(registry, repo: str, ref: str) -> tuple[dict, str]:
    r = requests.get(f"{registry.url}/v2/{repo}/manifests/{ref}", headers={"Accept": ACCEPT}, timeout=10)
    r.raise_for_status()
    return r.json(), r.headers["Docker-Content-Digest"]


def tags_of(registry, repo: str) -> list[str]:
    r = requests.get(f"{registry.url}/v2/{repo}/tags/list", timeout=10)
    return (r.json().get("tags") or []) if r.status_code == 200 else []


@pytest.fixture(scope="module")
def awkward_in_registry(awkward_image, registry_session) -> str:
    ref = f"{registry_session.host}/src/awkward:v1"
    skopeo_copy(awkward_image.ref, f"docker://{ref}")
    return ref


@pytest.fixture(scope="module")
def converted_in_registry(awkward_in_registry, registry_session):
    """The first conversion, with the access-log entries it caused."""
    target = f"{registry_session.host}/nydus/awkward:v1"
    mark = registry_session.mark()
    r = nydusify("convert", "--source", awkward_in_registry, "--target", target, "--plain-http",
                 "--chunk-size", "64K", check=True)
    return target, registry_session.access_log(mark), r.stdout


def test_first_conversion_uploads_and_tags(converted_in_registry, registry_session):
    target, log, stdout = converted_in_registry
    manifest, digest = manifest_of(registry_session, "nydus/awkward", "v1")
    layers = manifest["layers"]
    assert len(layers) == 4 and layers[-1]["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true"
    assert tags_of(registry_session, "nydus/awkward") == ["v1"]
    # every blob layer and the config went up once (a POST to start each upload)
    starts = [e for e in blob_writes(log) if e.method == "POST"]
    assert len(starts) == len(layers) + 1, [(e.method, e.path) for e in blob_writes(log)]
    assert "3 blobs" in stdout and "3 uploaded" in stdout and digest in stdout
    # the source's layers were read from the registry
    src_manifest, _ = manifest_of(registry_session, "src/awkward", "v1")
    read = {e.digest for e in log if e.is_blob_get and e.status in (200, 206) and "/src/awkward/" in e.path}
    assert {l["digest"] for l in src_manifest["layers"]} <= read


def test_check_passes_against_registry(converted_in_registry, awkward_in_registry, awkward_tree):
    target, _, _ = converted_in_registry
    r = nydusify("check", "--source", awkward_in_registry, "--target", target, "--plain-http", check=True)
    assert f"check OK: {len(awkward_tree)} entries equal" in r.stdout


def test_python_reader_over_registry_matches_umoci(converted_in_registry, awkward_tree):
    target, _, _ = converted_in_registry
    tr.assert_trees_equal(awkward_tree, reader_tree(target, plain_http=True), **tr.UMOCI_DIFF_OPTIONS)


def test_kernel_mount_of_registry_export_matches_umoci(converted_in_registry, awkward_tree, tmp_path, kernel_mount):
    target, _, _ = converted_in_registry
    nydusify("export", target, tmp_path / "export", "--plain-http", check=True)
    mnt = kernel_mount(tmp_path / "export" / "image.boot", exported_devices(tmp_path / "export"))
    tr.assert_trees_equal(awkward_tree, tr.snapshot_tree(mnt), **tr.UMOCI_DIFF_OPTIONS)


def test_skopeo_reads_converted_image(converted_in_registry, tmp_path, registry_session):
    target, _, _ = converted_in_registry
    out = tmp_path / "copy"
    skopeo_copy(f"docker://{target}", f"dir:{out}")
    manifest, _ = manifest_of(registry_session, "nydus/awkward", "v1")
    boot_layer = manifest["layers"][-1]["digest"].split(":", 1)[1]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress((out / boot_layer).read_bytes()))) as tf:
        boot = Bootstrap.from_bytes(tf.extractfile("image/image.boot").read())
    assert ["sha256:" + b.blob_id for b in boot.meta.blobs] == [l["digest"] for l in manifest["layers"][:-1]]


def test_second_conversion_uploads_nothing(converted_in_registry, awkward_in_registry, registry_session):
    target, _, _ = converted_in_registry
    _, before = manifest_of(registry_session, "nydus/awkward", "v1")
    mark = registry_session.mark()
    r = nydusify("convert", "--source", awkward_in_registry, "--target", target, "--plain-http",
                 "--chunk-size", "64K", check=True)
    log = registry_session.access_log(mark)
    assert blob_writes(log) == [], [(e.method, e.path) for e in blob_writes(log)]
    assert "0 uploaded" in r.stdout
    _, after = manifest_of(registry_session, "nydus/awkward", "v1")
    assert after == before, "the conversion is not reproducible"
    # the manifest itself is put again (by digest, then the tag): cheap and idempotent
    assert sorted(e.path.rsplit("/", 1)[1] for e in log if e.method == "PUT") == sorted([after, "v1"])


def test_chunk_dict_from_registry(registry_session, workdir, tmp_path):
    D, F = im.Entry.dir, im.Entry.file
    shared = im.random(256 * KiB, seed=31)
    base = im.build_oci_layout(workdir / "reg-dict", "base", [[D("opt"), F("opt/shared", shared)]])
    more = im.build_oci_layout(workdir / "reg-dict", "more", [[D("srv"), F("srv/copy", shared),
                                                                F("srv/new", im.random(64 * KiB, seed=32))]])
    host = registry_session.host
    nydusify("convert", "--source", base.ref, "--target", f"{host}/dict/base:v1", "--plain-http",
             "--chunk-size", "64K", check=True)
    dict_manifest, _ = manifest_of(registry_session, "dict/base", "v1")
    dict_blob = dict_manifest["layers"][0]["digest"]
    nydusify("convert", "--source", more.ref, "--target", f"{host}/dict/more:v1", "--plain-http",
             "--chunk-size", "64K", "--chunk-dict", f"{host}/dict/base:v1", check=True)
    manifest, _ = manifest_of(registry_session, "dict/more", "v1")
    blobs = [l["digest"] for l in manifest["layers"][:-1]]
    assert len(blobs) == 2 and blobs[1] == dict_blob
    assert requests.head(f"{registry_session.url}/v2/dict/more/blobs/{dict_blob}", timeout=10).status_code == 200
    own = requests.get(f"{registry_session.url}/v2/dict/more/blobs/{blobs[0]}", timeout=10).content
    # the one new chunk (64 KiB of random bytes, stored plain) and the blob's metadata: tar headers,
    # a 16-byte ci entry + 4 KiB ci header, a 32-byte digest, the ToC
    assert len(own) < 2 * 64 * KiB, "the new blob holds more than the one new chunk"
    boot_blob = manifest["layers"][-1]["digest"]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(
            requests.get(f"{registry_session.url}/v2/dict/more/blobs/{boot_blob}", timeout=10).content))) as tf:
        boot = Bootstrap.from_bytes(tf.extractfile("image/image.boot").read())
    assert boot.meta.blobs[0].chunk_count == len(boot.meta.blobs[0].entries) == 1
    assert boot.meta.blobs[1].chunk_count == 4 == len(boot.meta.blobs[1].entries)   # the dict's 4 shared chunks
    nydusify("check", "--source", more.ref, "--target", f"{host}/dict/more:v1", "--plain-http", check=True)


def test_multi_platform_index_through_registry(registry_session, workdir):
    plats = ["linux/amd64", "linux/arm64"]
    layers = {p: [[im.Entry.dir("etc"), im.Entry.file("etc/arch", p.encode())]] for p in plats}
    src = im.build_oci_layout(workdir / "reg-multi", "multi", layers, platforms=plats)
    host = registry_session.host
    skopeo_copy(src.ref, f"docker://{host}/src/multi:v1", all_images=True)
    nydusify("convert", "--source", f"{host}/src/multi:v1", "--target", f"{host}/nydus/multi:v1",
             "--plain-http", check=True)
    index, _ = manifest_of(registry_session, "nydus/multi", "v1")
    assert index["mediaType"] == OCI_INDEX
    assert sorted(m["platform"]["architecture"] for m in index["manifests"]) == ["amd64", "arm64"]
    assert all(m["platform"]["os.features"] == ["nydus.remoteimage.v1"] for m in index["manifests"])
    for plat in plats:
        nydusify("check", "--source", f"{host}/src/multi:v1", "--target", f"{host}/nydus/multi:v1",
                 "--plain-http", "--platform", plat, check=True)
        tree = reader_tree(f"{host}/nydus/multi:v1", platform=plat, plain_http=True)
        assert tree[b"etc/arch"].size == len(plat)
    # and one platform only
    nydusify("convert", "--source", f"{host}/src/multi:v1", "--target", f"{host}/nydus/multi:arm64",
             "--plain-http", "--platform", "linux/arm64", check=True)
    manifest, _ = manifest_of(registry_session, "nydus/multi", "arm64")
    assert manifest["mediaType"] == im.MEDIA_MANIFEST
    config = json.loads(requests.get(f"{registry_session.url}/v2/nydus/multi/blobs/{manifest['config']['digest']}",
                                     timeout=10).content)
    assert config["architecture"] == "arm64"
