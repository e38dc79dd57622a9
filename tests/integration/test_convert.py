"""`nydusify convert` end to end on OCI layouts (issue #2), checked against independent oracles.

Round trips of the awkward image for a small matrix of chunk sizes, compressors
and digesters; the expected tree is what `umoci unpack` makes of the source.
Each converted image is read back three ways: the kernel (file-backed EROFS
mount of `nydusify export`), erofs-utils (`fsck.erofs --device=...`) and our
Python reader (bootstrap + verifying blob readers). Then `check`, `inspect`,
dedup, `--chunk-dict`, multi-platform indexes and the manifest format.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from converter.check import check as check_images
from rafs import blob as rblob
from rafs import digest as rdigest
from rafs.bootstrap import Bootstrap
from rafs.errors import IntegrityError
from tests.helpers import images as im
from tests.helpers import trees as tr
from tests.helpers.mounts import MODES, mounter  # noqa: F401  (fixture)

from .conftest import (AWKWARD_CHUNK, KiB, MiB, blob_path, nydusify, reader_tree, replace_layer_blob, run)

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
              pytest.mark.skipif(shutil.which("umoci") is None, reason="needs umoci")]

NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

# (id, --chunk-size, compressor, digester): every chunk size and compressor once (lz4 by Nydus's
# name lz4_block), sha256 once (blake3 is the default).
# The source is the awkward image made for that chunk size (sizes and repeats at its edges).
MATRIX = [
    ("4k-zstd", "4K", "zstd", "blake3"),
    ("64k-lz4", "64K", "lz4_block", "blake3"),
    ("1m-none", "1048576", "none", "blake3"),
    ("64k-zstd-sha256", "0x10000", "zstd", "sha256"),
]
CHUNK_OF = {"4K": 4 * KiB, "64K": 64 * KiB, "1048576": MiB, "0x10000": 64 * KiB}


# --------------------------------------------------------------------------- layout reading (plain JSON)

def read_image(layout: Path, tag: str = "nydus", platform: str | None = None) -> tuple[dict, dict, dict]:
    """(top descriptor, manifest, config) of `tag`, read straight from the layout's files."""
    idx = json.loads((layout / "index.json").read_text())
    (top,) = [m for m in idx["manifests"] if m.get("annotations", {}).get(im.REF_NAME) == tag]
    desc = top
    if top["mediaType"] == im.MEDIA_INDEX:
        sub = json.loads(blob_path(layout, top["digest"]).read_bytes())
        want = platform.split("/")
        (desc,) = [m for m in sub["manifests"]
                   if [m["platform"]["os"], m["platform"]["architecture"]] == want[:2]]
    manifest = json.loads(blob_path(layout, desc["digest"]).read_bytes())
    config = json.loads(blob_path(layout, manifest["config"]["digest"]).read_bytes())
    return top, manifest, config


def bootstrap_of(layout: Path, manifest: dict) -> Bootstrap:
    boot_layer = manifest["layers"][-1]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob_path(layout, boot_layer["digest"]).read_bytes()))) as tf:
        return Bootstrap.from_bytes(tf.extractfile("image/image.boot").read())


def blob_chunks(layout: Path, info) -> list[rblob.ChunkEntry]:
    """The chunks blob `info` (a BlobInfo) lists itself, in ci order: its ci array + blob.digest,
    read from the blob file (checked against its ToC and the blob table)."""
    data = blob_path(layout, "sha256:" + info.blob_id).read_bytes()
    meta = rblob.read_blob_meta(lambda off, n: data[off:off + n], len(data), info)
    assert meta.has_digests, "a blob we write carries blob.digest"
    return meta.entries


def chunk_digests(content: bytes, chunk: int, digester: str = "blake3") -> list[bytes]:
    return [rdigest.digest(digester, content[i:i + chunk]) for i in range(0, len(content), chunk)]


# --------------------------------------------------------------------------- round trips

@pytest.fixture(scope="module", params=MATRIX, ids=[m[0] for m in MATRIX])
def awkward_nydus(request, awkward_source, convert_once, workdir):
    """(conversion, image.boot, devices, umoci tree, chunk size, digester) per MATRIX entry."""
    name, chunk, compressor, digester = request.param
    source, tree = awkward_source(CHUNK_OF[chunk])
    conv = convert_once(source, "--chunk-size", chunk, "--compressor", compressor, "--digester", digester)
    boot, devices = conv.export(workdir / f"export-{name}")
    return conv, boot, devices, tree, CHUNK_OF[chunk], digester


def test_check_passes(awkward_nydus):
    conv, _, _, tree, _, _ = awkward_nydus
    r = nydusify("check", "--source", conv.source.ref, "--target", conv.ref, check=True)
    assert f"check OK: {len(tree)} entries equal" in r.stdout, r.stdout


def test_kernel_mount_matches_umoci(awkward_nydus, kernel_mount):
    _, boot, devices, tree, _, _ = awkward_nydus
    assert len(devices) == 3          # one blob per source layer (each adds new chunks)
    mnt = kernel_mount(boot, devices)
    tr.assert_trees_equal(tree, tr.snapshot_tree(mnt), **tr.UMOCI_DIFF_OPTIONS)


def test_python_reader_matches_umoci(awkward_nydus):
    conv, _, _, tree, _, _ = awkward_nydus
    tr.assert_trees_equal(tree, reader_tree(conv.ref), **tr.UMOCI_DIFF_OPTIONS)


def test_fsck_erofs_passes(awkward_nydus):
    # erofs-utils 1.5: one --device=PATH per blob, in device-table order, then the image.
    _, boot, devices, _, _, _ = awkward_nydus
    r = run("fsck.erofs", *[f"--device={d}" for d in devices], boot, ok=False)
    assert r.returncode == 0, f"fsck.erofs failed:\n{r.stdout}\n{r.stderr}"
    # and it does notice a missing device
    r = run("fsck.erofs", *[f"--device={d}" for d in devices[:-1]], boot, ok=False)
    assert r.returncode != 0


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_other_source_compressions(compression, workdir, convert_once, awkward_tree):
    """tar+zstd and plain tar sources hold the same tar streams, so the same tree."""
    src = im.build_awkward_layout(workdir / f"awkward-{compression}", chunk_size=AWKWARD_CHUNK,
                                  compression=compression)
    assert src.manifest.layers[0].media_type == im.MEDIA_LAYER[compression]
    conv = convert_once(src, "--chunk-size", "64K")
    tr.assert_trees_equal(awkward_tree, reader_tree(conv.ref), **tr.UMOCI_DIFF_OPTIONS)


D, F, S, H = im.Entry.dir, im.Entry.file, im.Entry.symlink, im.Entry.hardlink
SMALL_IMAGES = {
    # no regular file holds data: no blob at all, the manifest has just the bootstrap layer
    "no-file-data": ([[D("etc"), F("etc/empty", b""), S("l", "etc"), im.Entry.fifo("p")],
                      [im.Entry.whiteout("l")]], 0, "containerd"),
    # a hardlink to a lower layer's file, and the lower name replaced afterwards (containerd's
    # overlayfs unpack cannot link to a lower layer: umoci's tree is the reference)
    "cross-layer-hardlinks": ([[D("etc"), F("etc/a", b"aaa\n", uid=5), H("etc/c", "etc/a", uid=5)],
                               [D("etc"), H("etc/b", "etc/a", uid=5)],
                               [D("etc"), F("etc/a", b"new\n")]], 2, "umoci"),
    # containerd ignores a "./" entry: the root stays 0755 root-owned (umoci would apply it)
    "root-entry": ([[D("./", mode=0o750, uid=3, gid=4), D("etc"), F("etc/x", b"x\n")]], 1, "containerd"),
}


@pytest.mark.parametrize("case", sorted(SMALL_IMAGES))
def test_small_images_match_the_unpack(case, workdir, kernel_mount, tmp_path, containerd_unpack):
    layers, blobs, oracle = SMALL_IMAGES[case]
    src = im.build_oci_layout(workdir / "small", case, layers)
    if oracle == "containerd":
        expected, opts = containerd_unpack(src), {}
    else:
        expected, opts = tr.snapshot_tree(tr.umoci_unpack(src.layout, case, tmp_path / "bundle")), tr.UMOCI_DIFF_OPTIONS
    target = f"oci:{tmp_path / 'nydus'}:nydus"
    r = nydusify("convert", "--source", src.ref, "--target", target, check=True)
    assert f" {blobs} blobs" in r.stdout
    tr.assert_trees_equal(expected, reader_tree(target), **opts)
    nydusify("export", target, tmp_path / "export", check=True)
    devices = sorted((tmp_path / "export" / "devices").iterdir(), key=lambda p: int(p.name))
    assert len(devices) == blobs
    mnt = kernel_mount(tmp_path / "export" / "image.boot", devices)
    tr.assert_trees_equal(expected, tr.snapshot_tree(mnt), **opts)
    nydusify("check", "--source", src.ref, "--target", target, check=True)


def test_multi_member_gzip_layer(workdir, tmp_path):
    """A layer blob of several gzip members back to back (pigz -i, appended streams) is one tar."""
    layers = [[D("etc"), F("etc/a", im.random(300 * KiB, seed=41)), F("etc/b", b"b\n" * 1000)]]
    src = im.build_oci_layout(tmp_path / "src", "multi", layers)
    tar = gzip.decompress(blob_path(src.layout, src.manifest.layers[0].digest).read_bytes())
    cut = len(tar) // 3
    replace_layer_blob(src, 0, gzip.compress(tar[:cut], mtime=0) + gzip.compress(tar[cut:], mtime=0))
    expected = tr.snapshot_tree(tr.umoci_unpack(src.layout, "multi", tmp_path / "bundle"))
    target = f"oci:{tmp_path / 'nydus'}:nydus"
    nydusify("convert", "--source", src.ref, "--target", target, check=True)
    tr.assert_trees_equal(expected, reader_tree(target), **tr.UMOCI_DIFF_OPTIONS)


def test_busybox_runs_from_kernel_mount(busybox_image, convert_once, workdir, kernel_mount):
    conv = convert_once(busybox_image)
    boot, devices = conv.export(workdir / "export-busybox")
    mnt = kernel_mount(boot, devices)
    r = run("chroot", mnt, "/bin/sh", "-c", "cat /etc/hello.txt && ls /bin | wc -l")
    assert r.stdout.splitlines() == [im.BUSYBOX_HELLO.decode().strip(), str(1 + len(im.BUSYBOX_APPLETS))]


# --------------------------------------------------------------------------- check must fail

def test_check_fails_against_another_source(busybox_image, awkward_image, convert_once):
    conv = convert_once(busybox_image)
    r = nydusify("check", "--source", awkward_image.ref, "--target", conv.ref, check=False)
    assert "check FAILED" in r.stdout
    lines = r.stdout.splitlines()
    assert "  /bin/busybox: only in the converted image" in lines
    assert "  /big/zeros-8m: missing from the converted image" in lines
    assert lines[-1].startswith("  ... and ") and lines[-1].endswith(" more")     # long diffs are cut
    assert any(line.startswith("  /etc/hello.txt: ") and "content" in line for line in lines), r.stdout


def test_check_fails_on_tampered_blob(awkward_image, convert_once, workdir):
    conv = convert_once(awkward_image, "--chunk-size", "64K")
    bad = workdir / "tampered-data"
    shutil.copytree(conv.layout, bad)
    _, manifest, _ = read_image(bad)
    blob = manifest["layers"][0]
    p = blob_path(bad, blob["digest"])
    data = bytearray(p.read_bytes())
    data[10] ^= 0x01                          # inside chunk #0's compressed bytes
    p.write_bytes(bytes(data))
    ref = f"oci:{bad}:nydus"
    r = nydusify("check", "--source", awkward_image.ref, "--target", ref, check=False)
    assert f"blob {blob['digest']}" in r.stderr and "chunk #0" in r.stderr, r.stderr
    with pytest.raises(IntegrityError, match=blob["digest"]):
        check_images(awkward_image.ref, ref)


# --------------------------------------------------------------------------- inspect

def test_inspect_json(awkward_image, convert_once, awkward_tree, tmp_path):
    patterns = tmp_path / "prefetch.txt"
    patterns.write_text("# first the config, then a tool\n/etc\nbin/tool\n/does/not/exist\n/etc/hello.txt\n")
    conv = convert_once(awkward_image, "--chunk-size", "64K", "--prefetch-patterns", patterns)
    r = nydusify("inspect", "--json", conv.ref, check=True)
    info = json.loads(r.stdout)
    _, manifest, _ = read_image(conv.layout)

    assert [(l["digest"], l["size"], l["mediaType"]) for l in info["layers"]] == \
        [(l["digest"], l["size"], l["mediaType"]) for l in manifest["layers"]]
    assert [l["kind"] for l in info["layers"]] == ["blob"] * 3 + ["bootstrap"]
    assert len(info["blobs"]) == 3
    boot = bootstrap_of(conv.layout, manifest)
    for b, layer, blob in zip(info["blobs"], manifest["layers"], boot.meta.blobs):
        assert "sha256:" + b["id"] == layer["digest"]
        assert b["compressed_size"] == layer["size"] == blob_path(conv.layout, layer["digest"]).stat().st_size
        assert b["chunks"] == len(blob_chunks(conv.layout, blob)) >= b["chunks_used"] > 0
        assert b["uncompressed_size"] % 4096 == 0 and (b["compressor"], b["digester"]) == ("zstd", "blake3")
        # the blob table fields of a blob as nydus-image writes one: ALIGNED, INLINED_CHUNK_DIGEST,
        # HAS_TAR_HEADER, HAS_TOC, CAP_TAR_TOC; an uncompressed v1 ci array of 16 bytes per chunk
        assert int(b["features"], 16) == rblob.WRITER_FEATURES == 0x70000021
        assert set(b["feature_names"]) >= {"aligned", "has_toc"}
        assert b["ci"]["compressor"] == "none" and b["ci"]["uncompressed_size"] == 16 * b["chunks"]
        assert b["toc"]["size"] > 512
    assert info["inodes"] == sum(info[k] for k in ("files", "dirs", "symlinks", "other"))

    # the awkward image repeats chunks inside a file, between files and across layers; zero
    # chunks are ordinary chunks (no holes), stored once
    assert info["dedup"]["ratio"] > 1 and info["dedup"]["hole_bytes"] == 0
    assert info["dedup"]["referenced_bytes"] == info["file_bytes"]
    assert info["chunk_size"] == 64 * KiB and info["digester"] == "blake3"

    # counts: each inode once (hardlinks too), compared with umoci's tree
    inodes = {}
    for path, e in awkward_tree.items():
        inodes.setdefault(e.links or path, e)
    kinds = [e.type for e in inodes.values()]
    assert info["files"] == kinds.count("file")
    assert info["dirs"] == kinds.count("dir")
    assert info["symlinks"] == kinds.count("symlink")
    assert info["other"] == kinds.count("char") + kinds.count("block") + kinds.count("fifo")
    assert info["hardlinked_files"] == len({e.links for e in awkward_tree.values() if e.links})
    assert info["file_bytes"] == sum(e.size for e in inodes.values() if e.type == "file")

    # patterns in order, directories expanded (sorted), missing ones skipped, no repeats
    assert info["prefetch"] == ["/etc/hello.txt", "/etc/layer3.txt", "/etc/three-3", "/bin/tool"]

    # the human-readable form says the same
    text = nydusify("inspect", conv.ref, check=True).stdout
    assert f"(dedup ratio {info['dedup']['ratio']})" in text and "prefetch 4 entries" in text
    assert f"inodes {info['inodes']}:" in text and "features 0x70000021" in text


# --------------------------------------------------------------------------- dedup

def test_dedup_within_and_across_layers(awkward_nydus):
    """With the chunk size the image was made for, repeated chunks are stored once, zero chunks too."""
    conv, _, _, _, chunk, digester = awkward_nydus
    _, manifest, _ = read_image(conv.layout)
    boot = bootstrap_of(conv.layout, manifest)
    stored: dict[bytes, list[tuple[int, int]]] = {}        # digest -> [(device, block)]
    for dev, b in enumerate(boot.meta.blobs, start=1):
        own = blob_chunks(conv.layout, b)
        assert [e.index for e in own] == list(range(b.chunk_count))
        for e in own:
            stored.setdefault(e.digest, []).append((dev, e.uncompressed_offset // 4096))
        # the chunk table lists the blob's chunks as the blob does
        for e in b.entries:
            assert own[e.index] == e
    assert all(len(v) == 1 for v in stored.values()), "a chunk is stored twice"
    location = {v[0]: d for d, v in stored.items()}

    img = boot.erofs
    refs, seen = [], set()
    for path, nid in img.walk():
        if img.inode(nid).is_reg() and nid not in seen:
            seen.add(nid)
            refs += img.chunk_indexes(nid)
    assert None not in refs, "a hole: RAFS v6 has none"
    assert set(refs) <= set(location), "a chunk index points at no chunk of its blob"
    assert len(refs) > len(set(refs))          # some chunks are referenced more than once
    assert set(refs) == {(dev, e.uncompressed_offset // 4096) for dev, b in enumerate(boot.meta.blobs, 1)
                         for e in b.entries}     # the chunk table lists exactly the chunks used

    idx = lambda p: img.chunk_indexes(img.resolve(p))  # noqa: E731
    dup = idx(b"/big/dup-chunks")
    assert len(dup) == 5 and dup[0] == dup[1] == dup[2] == dup[3] != dup[4]     # within a file
    assert idx(b"/big/dup-across") == dup                # layer 3 file -> layer 1 blob
    assert dup[0][0] == 1                                # device 1 = the first layer's blob
    assert idx(b"/files/multi-copy") == idx(b"/files/multi-3c")                 # between files
    zeros = idx(b"/big/zeros-8m")
    assert len(zeros) == im.AWKWARD_ZEROS_SIZE // chunk and len(set(zeros)) == 1   # one zero chunk
    assert location[zeros[0]] == rdigest.digest(digester, bytes(chunk))
    repeated = rdigest.digest(digester, im.random(chunk, seed=7).read())
    assert location[dup[0]] == repeated and len(stored[repeated]) == 1


def _shared_layers(variant: str) -> list[list[im.Entry]]:
    D, F = im.Entry.dir, im.Entry.file
    if variant == "a":
        return [[D("a"), F("a/shared-1", im.random(300 * KiB, seed=11)),
                 F("a/shared-2", im.random(200 * KiB, seed=12))],
                [D("a"), F("a/only-a", im.random(100 * KiB, seed=13))]]
    return [[D("b"), F("b/copy-of-1", im.random(300 * KiB, seed=11)),
             F("b/copy-of-2", im.random(200 * KiB, seed=12)),
             F("b/new", im.random(150 * KiB, seed=21))]]


def test_chunk_dict_stores_only_new_chunks(workdir):
    a = im.build_oci_layout(workdir / "dict-src", "a", _shared_layers("a"))
    b = im.build_oci_layout(workdir / "dict-src", "b", _shared_layers("b"))
    dict_ref = f"oci:{workdir / 'dict-a'}:a"
    nydusify("convert", "--source", a.ref, "--target", dict_ref, "--chunk-size", "64K", check=True)
    _, dict_manifest, _ = read_image(workdir / "dict-a", "a")
    dict_blobs = [l["digest"] for l in dict_manifest["layers"][:-1]]
    assert len(dict_blobs) == 2

    target = workdir / "dict-b"
    r = nydusify("convert", "--source", b.ref, "--target", f"oci:{target}:b", "--chunk-size", "64K",
                 "--chunk-dict", dict_ref, check=True)
    _, manifest, config = read_image(target, "b")
    boot = bootstrap_of(target, manifest)
    blob_ids = [x.blob_id for x in boot.meta.blobs]
    # own blob first, then the dict's blob holding the shared chunks (only the one that is used)
    assert len(blob_ids) == 2 and "sha256:" + blob_ids[1] == dict_blobs[0]
    own = blob_chunks(target, boot.meta.blobs[0])
    new = set(chunk_digests(im.random(150 * KiB, seed=21).read(), 64 * KiB))
    assert {e.digest for e in own} == new and len(own) == 3
    # the dict blob is referenced by its chunk table entries: those the new image uses, at their
    # ci positions in the dict's blob
    shared = set(chunk_digests(im.random(300 * KiB, seed=11).read(), 64 * KiB)
                 + chunk_digests(im.random(200 * KiB, seed=12).read(), 64 * KiB))
    dict_blob = boot.meta.blobs[1]
    assert {e.digest for e in dict_blob.entries} == shared
    dict_own = blob_chunks(workdir / "dict-a", dict_blob)
    assert all(dict_own[e.index] == e for e in dict_blob.entries)

    # the manifest lists the dict blob too, and the target layout holds it (copied)
    assert [l["digest"] for l in manifest["layers"][:-1]] == ["sha256:" + i for i in blob_ids]
    assert blob_path(target, dict_blobs[0]).read_bytes() == blob_path(workdir / "dict-a", dict_blobs[0]).read_bytes()
    assert config["rootfs"]["diff_ids"][:2] == ["sha256:" + i for i in blob_ids]
    assert "2 blobs" in r.stdout

    img = boot.erofs
    for name in (b"/b/copy-of-1", b"/b/copy-of-2"):
        assert {dev for dev, _ in img.chunk_indexes(img.resolve(name))} == {2}, name
    assert {dev for dev, _ in img.chunk_indexes(img.resolve(b"/b/new"))} == {1}
    nydusify("check", "--source", b.ref, "--target", f"oci:{target}:b", check=True)
    expected = tr.tree_from_layers(_shared_layers("b"))
    tr.assert_trees_equal(expected, reader_tree(f"oci:{target}:b"))


# --------------------------------------------------------------------------- multi-platform

def _platform_layers(arch: str) -> list[list[im.Entry]]:
    return [[im.Entry.dir("etc"), im.Entry.file("etc/arch", f"{arch}\n".encode()),
             im.Entry.file("etc/common", im.random(100 * KiB, seed=5))]]


@pytest.fixture(scope="module")
def multi_image(workdir) -> im.ImageInfo:
    plats = ["linux/amd64", "linux/arm64"]
    return im.build_oci_layout(workdir / "multi", "multi", {p: _platform_layers(p.split("/")[1]) for p in plats},
                               platforms=plats)


def test_multi_platform_index_converts_every_platform(multi_image, workdir):
    target = workdir / "multi-all"
    ref = f"oci:{target}:nydus"
    nydusify("convert", "--source", multi_image.ref, "--target", ref, check=True)
    top, _, _ = read_image(target, platform="linux/amd64")
    assert top["mediaType"] == im.MEDIA_INDEX
    index = json.loads(blob_path(target, top["digest"]).read_bytes())
    assert sorted((m["platform"]["os"], m["platform"]["architecture"]) for m in index["manifests"]) == \
        [("linux", "amd64"), ("linux", "arm64")]
    for m in index["manifests"]:
        assert m["platform"]["os.features"] == ["nydus.remoteimage.v1"]      # nydus-snapshotter's mark
        plat = f"{m['platform']['os']}/{m['platform']['architecture']}"
        _, manifest, config = read_image(target, platform=plat)
        assert config["architecture"] == m["platform"]["architecture"]
        assert manifest["layers"][-1]["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true"
        tree = reader_tree(ref, platform=plat)
        assert tree[b"etc/arch"].sha256 == hashlib.sha256(f"{m['platform']['architecture']}\n".encode()).hexdigest()
        nydusify("check", "--source", multi_image.ref, "--target", ref, "--platform", plat, check=True)
    rootfs = tr.umoci_unpack(multi_image.layout, "multi", workdir / "multi-arm64-bundle", platform="linux/arm64")
    tr.assert_trees_equal(tr.snapshot_tree(rootfs), reader_tree(ref, platform="linux/arm64"),
                          **tr.UMOCI_DIFF_OPTIONS)


def test_check_covers_every_platform(multi_image, workdir, tmp_path):
    """Without --platform, check verifies every platform of an index, not just the first."""
    target = workdir / "multi-all"
    if not target.exists():
        nydusify("convert", "--source", multi_image.ref, "--target", f"oci:{target}:nydus", check=True)
    r = nydusify("check", "--source", multi_image.ref, "--target", f"oci:{target}:nydus", check=True)
    assert "2 platforms" in r.stdout, r.stdout
    bad = tmp_path / "bad"
    shutil.copytree(target, bad)
    _, manifest, _ = read_image(bad, platform="linux/arm64")
    blob = blob_path(bad, manifest["layers"][0]["digest"])
    data = bytearray(blob.read_bytes())
    data[5] ^= 0xFF
    blob.write_bytes(bytes(data))
    r = nydusify("check", "--source", multi_image.ref, "--target", f"oci:{bad}:nydus", check=False)
    assert manifest["layers"][0]["digest"] in r.stderr, r.stderr
    # a target holding fewer platforms than the source is not a full conversion
    one = workdir / "multi-arm64"
    if not one.exists():
        nydusify("convert", "--source", multi_image.ref, "--target", f"oci:{one}:nydus",
                 "--platform", "linux/arm64", check=True)
    r = nydusify("check", "--source", multi_image.ref, "--target", f"oci:{one}:nydus", check=True)
    assert "1 platform" not in r.stdout and "check OK" in r.stdout    # its one platform is checked
    r = nydusify("check", "--source", multi_image.ref, "--target", f"oci:{one}:nydus",
                 "--platform", "linux/amd64", check=False)
    assert "linux/amd64" in r.stdout + r.stderr


def test_all_platforms_converts_every_platform_and_refuses_platform(multi_image, workdir, tmp_path):
    """--all-platforms (nydusify's flag): the whole index, the same as without --platform; with
    --platform too it is an error (nydusify would silently ignore --platform), and nothing is written."""
    target = tmp_path / "all"
    nydusify("convert", "--source", multi_image.ref, "--target", f"oci:{target}:nydus", "--all-platforms", check=True)
    top, _, _ = read_image(target, platform="linux/arm64")
    assert top["mediaType"] == im.MEDIA_INDEX
    index = json.loads(blob_path(target, top["digest"]).read_bytes())
    assert sorted(m["platform"]["architecture"] for m in index["manifests"]) == ["amd64", "arm64"]
    default = workdir / "multi-all"
    if not default.exists():
        nydusify("convert", "--source", multi_image.ref, "--target", f"oci:{default}:nydus", check=True)
    assert top["digest"] == read_image(default, platform="linux/arm64")[0]["digest"]   # byte for byte
    for plat in ("linux/amd64", "linux/arm64"):
        arch = plat.split("/")[1]
        assert reader_tree(f"oci:{target}:nydus", platform=plat)[b"etc/arch"].sha256 == \
            hashlib.sha256(f"{arch}\n".encode()).hexdigest()
    r = nydusify("check", "--source", multi_image.ref, "--target", f"oci:{target}:nydus", check=True)
    assert "2 platforms" in r.stdout

    both = tmp_path / "both"
    r = nydusify("convert", "--source", multi_image.ref, "--target", f"oci:{both}:nydus",
                 "--platform", "linux/arm64", "--all-platforms", check=False)
    assert r.returncode == 2 and "--all-platforms: not allowed with argument --platform" in r.stderr, r.stderr
    assert not both.exists()


def test_platform_option_converts_one(multi_image, workdir):
    target = workdir / "multi-arm64"
    nydusify("convert", "--source", multi_image.ref, "--target", f"oci:{target}:nydus",
             "--platform", "linux/arm64", check=True)
    top, manifest, config = read_image(target)
    assert top["mediaType"] == im.MEDIA_MANIFEST
    assert (config["os"], config["architecture"]) == ("linux", "arm64")
    tree = reader_tree(f"oci:{target}:nydus")
    assert tree[b"etc/arch"].sha256 == hashlib.sha256(b"arm64\n").hexdigest()
    r = nydusify("convert", "--source", multi_image.ref, "--target", f"oci:{target}:s390x",
                 "--platform", "linux/s390x", check=False)
    assert "linux/s390x" in r.stderr
    assert "s390x" not in json.dumps(json.loads((target / "index.json").read_text()))


# --------------------------------------------------------------------------- manifest format

ENTRYPOINT_CONFIG = {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["cat /etc/hello.txt"],
                     "Env": ["PATH=/bin", "GREETING=hello"], "WorkingDir": "/tmp",
                     "Labels": {"org.example": "yes"}}


def test_manifest_is_nydusify_compatible(workdir):
    src = im.build_oci_layout(workdir / "ep", "ep", im.busybox_image_layers() + [
        [im.Entry.dir("etc"), im.Entry.file("etc/second", b"layer 2\n")]], config_overrides=ENTRYPOINT_CONFIG)
    target = workdir / "ep-nydus"
    nydusify("convert", "--source", src.ref, "--target", f"oci:{target}:nydus", check=True)
    top, manifest, config = read_image(target)
    assert top["mediaType"] == im.MEDIA_MANIFEST and manifest["schemaVersion"] == 2
    assert manifest["mediaType"] == im.MEDIA_MANIFEST and manifest["config"]["mediaType"] == im.MEDIA_CONFIG
    *blobs, boot_layer = manifest["layers"]
    assert len(blobs) == 2
    for layer in blobs:
        assert layer["mediaType"] == NYDUS_BLOB
        assert layer["annotations"] == {"containerd.io/snapshot/nydus-blob": "true"}
    assert boot_layer["mediaType"] == GZIP_LAYER
    assert boot_layer["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true"
    for layer in manifest["layers"] + [manifest["config"]]:
        data = blob_path(target, layer["digest"]).read_bytes()
        assert (len(data), "sha256:" + hashlib.sha256(data).hexdigest()) == (layer["size"], layer["digest"])

    assert boot_layer["annotations"]["containerd.io/snapshot/nydus-fs-version"] == "6"
    assert "containerd.io/uncompressed" not in boot_layer["annotations"]

    # the last layer, as nydusify's: a gzip tar of image/, image/image.boot (whose blob table names
    # the blob layers) and each blob's image/<id>.blob.meta (ci array padded to 4 KiB + ci header)
    tar = gzip.decompress(blob_path(target, boot_layer["digest"]).read_bytes())
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        members = tf.getmembers()
        boot_bytes = tf.extractfile("image/image.boot").read()
        boot = Bootstrap.from_bytes(boot_bytes)
        metas = {m.name: tf.extractfile(m).read() for m in members if m.name.endswith(".blob.meta")}
    assert [(m.name, m.type, m.mode) for m in members[:2]] == \
        [("image", tarfile.DIRTYPE, 0o755), ("image/image.boot", tarfile.REGTYPE, 0o444)]
    assert len(boot_bytes) % 4096 == 0
    assert ["sha256:" + b.blob_id for b in boot.meta.blobs] == [l["digest"] for l in blobs]
    assert sorted(metas) == sorted(f"image/{b.blob_id}.blob.meta" for b in boot.meta.blobs)
    for b in boot.meta.blobs:
        meta = rblob.parse_blob_meta(metas[f"image/{b.blob_id}.blob.meta"], compressor=b.compressor)
        assert len(metas[f"image/{b.blob_id}.blob.meta"]) == rblob.align_up(16 * b.chunk_count) + 4096
        assert [e.index for e in meta.entries] == list(range(b.chunk_count))
        assert [(e.uncompressed_offset, e.compressed_offset, e.compressed_size) for e in meta.entries] == \
            [(e.uncompressed_offset, e.compressed_offset, e.compressed_size) for e in blob_chunks(target, b)]

    # config: runtime settings kept, diff_ids = blob digests + sha256 of the bootstrap layer's tar
    src_config = src.manifest.config
    for key, value in ENTRYPOINT_CONFIG.items():
        assert config["config"][key] == value == src_config["config"][key]
    assert (config["os"], config["architecture"]) == (src_config["os"], src_config["architecture"])
    assert config["rootfs"] == {"type": "layers", "diff_ids": [l["digest"] for l in blobs]
                                + ["sha256:" + hashlib.sha256(tar).hexdigest()]}
    assert len(config.get("history", [])) in (0, len(manifest["layers"]))

    # skopeo (containers/image) accepts the layout: it copies and verifies every blob
    out = workdir / "ep-skopeo"
    run("skopeo", "--insecure-policy", "copy", "--quiet", f"oci:{target}:nydus", f"dir:{out}")
    assert (out / "manifest.json").read_bytes() == blob_path(target, top["digest"]).read_bytes()
    # converting the result again is refused: it already is a nydus image
    r = nydusify("convert", "--source", f"oci:{target}:nydus", "--target", f"oci:{workdir / 'ep-again'}:x",
                 check=False)
    assert "already a nydus image" in r.stderr


# --------------------------------------------------------------------------- prefetch-first layout

C = AWKWARD_CHUNK
RANGED_LIST = (f"/files/multi-5c\t{3 * C}+{C},{C}+10\n"      # two chunks, out of order: sorted
               "/big/dup-chunks\t0+1\n"                       # one chunk (also chunks 1..3 of that file)
               f"/files/sizes/size-{C + 1}\t{C}+100\n"         # the 1-byte tail, range clamped
               "# the config\n/etc\n")


@pytest.fixture(scope="module")
def ranged_nydus(awkward_image, convert_once, tmp_path_factory):
    lst = tmp_path_factory.mktemp("ranged") / "list.txt"
    lst.write_text(RANGED_LIST)
    return convert_once(awkward_image, "--chunk-size", "64K", "--prefetch-patterns", lst), lst


def _blob_tocs(conv) -> list[list[bytes]]:
    """Per blob: its chunk digests in blob order."""
    _, manifest, _ = read_image(conv.layout)
    boot = bootstrap_of(conv.layout, manifest)
    return [[e.digest for e in sorted(blob_chunks(conv.layout, b), key=lambda e: e.compressed_offset)]
            for b in boot.meta.blobs]


def test_ranged_list_puts_its_chunks_first(ranged_nydus, awkward_image, convert_once, workdir, kernel_mount,
                                           awkward_tree):
    conv, lst = ranged_nydus
    _, manifest, _ = read_image(conv.layout)
    boot = bootstrap_of(conv.layout, manifest)
    pf = [(e.path, e.ranges) for e in boot.meta.prefetch]
    assert pf[:3] == [(b"/files/multi-5c", ((C, 10), (3 * C, C))), (b"/big/dup-chunks", ((0, 1),)),
                      (b"/files/sizes/size-65537", ((C, 1),))]
    assert [p for p, r in pf[3:]] == [b"/etc/hello.txt", b"/etc/layer3.txt", b"/etc/three-3"]
    assert all(r is None for _, r in pf[3:])

    # layer 1's blob starts with those chunks, in list order; the rest as without a list
    m5 = chunk_digests(im.random(5 * C, seed=1002).read(), C)
    dup = rdigest.digest("blake3", im.random(C, seed=7).read())
    tail = chunk_digests(im.random(C + 1, seed=C + 1).read(), C)[1]
    tocs, plain = _blob_tocs(conv), _blob_tocs(convert_once(awkward_image, "--chunk-size", "64K"))
    assert tocs[0][:4] == [m5[1], m5[3], dup, tail]
    (ext,) = boot.file_extents(boot.resolve(b"/etc/hello.txt"), 0, C)     # one chunk: its digest
    hello = next(e.digest for e in boot.meta.blobs[ext.blob_index].entries
                 if e.uncompressed_offset == ext.blob_offset)
    assert any(hello in t[:8] for t in tocs)                            # at the head of its blob
    # dedup unchanged: each blob stores the same chunks, each once
    assert [sorted(t) for t in tocs] == [sorted(t) for t in plain] and tocs != plain

    # the tree is unchanged: check, the kernel and erofs-utils agree
    nydusify("check", "--source", awkward_image.ref, "--target", conv.ref, check=True)
    boot_path, devices = conv.export(workdir / "export-ranged")
    tr.assert_trees_equal(awkward_tree, tr.snapshot_tree(kernel_mount(boot_path, devices)), **tr.UMOCI_DIFF_OPTIONS)
    assert run("fsck.erofs", *[f"--device={d}" for d in devices], boot_path, ok=False).returncode == 0

    # same input, same list -> same bytes
    again = workdir / "ranged-again"
    nydusify("convert", "--source", awkward_image.ref, "--target", f"oci:{again}:nydus", "--chunk-size", "64K",
             "--prefetch-patterns", lst, check=True)
    _, m2, _ = read_image(again)
    assert m2 == manifest
    for layer in manifest["layers"]:
        assert blob_path(again, layer["digest"]).read_bytes() == blob_path(conv.layout, layer["digest"]).read_bytes()

    info = json.loads(nydusify("inspect", "--json", conv.ref, check=True).stdout)
    assert info["prefetch"][0] == f"/files/multi-5c\t{C}+10,{3 * C}+{C}"


@pytest.mark.parametrize("line, message", [
    ("/files/multi-5c\t0+4k", "bad range '0+4k'"),
    ("/files/multi-5c\t12", "bad range '12'"),
    ("/files/multi-5c\t5+0", "empty range"),
    ("/files\t0+1", "byte ranges need a regular file, but /files is a directory"),
    ("/links/rel\t0+1", "byte ranges need a regular file, but /links/rel is not a regular file"),
])
def test_bad_prefetch_lines_fail_the_conversion(line, message, awkward_image, workdir, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text(f"/etc\n# comment\n{line}\n")
    target = workdir / "bad-list"
    r = nydusify("convert", "--source", awkward_image.ref, "--target", f"oci:{target}:nydus",
                 "--prefetch-patterns", lst, check=False)
    assert f"nydusify convert: error: {lst}:3: {message}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "nydus" not in tr_tags(target)


def tr_tags(layout: Path) -> list[str]:
    from .conftest import layout_tags
    return layout_tags(layout)


# --------------------------------------------------------------------------- zero chunks

def test_zero_filled_files_read_back_as_zeros_from_one_stored_chunk(workdir, tmp_path, kernel_mount):
    """RAFS v6 has no holes: zero chunks are ordinary chunks, and deduplicate like any other:
    a zero file, zeros inside a file and a zero tail all read back as zeros, and the blob stores
    the full zero chunk once (and the short zero tail once)."""
    C = 64 * KiB
    zero_tail = 1000
    layers = [[D("z"), F("z/zeros", im.zeros(5 * C)),
               F("z/mixed", im.concat(im.random(C, seed=1), im.zeros(2 * C), im.random(C, seed=2),
                                      im.zeros(zero_tail))),
               F("z/small", im.zeros(zero_tail))],
              [D("z"), F("z/again", im.zeros(3 * C))]]
    src = im.build_oci_layout(tmp_path / "src", "zeros", layers)
    target = tmp_path / "nydus"
    ref = f"oci:{target}:nydus"
    nydusify("convert", "--source", src.ref, "--target", ref, "--chunk-size", "64K", check=True)
    tree = reader_tree(ref)
    assert tree[b"z/zeros"].sha256 == hashlib.sha256(bytes(5 * C)).hexdigest()
    assert tree[b"z/again"].sha256 == hashlib.sha256(bytes(3 * C)).hexdigest()
    assert tree[b"z/small"].sha256 == hashlib.sha256(bytes(zero_tail)).hexdigest()
    mixed = im.random(C, seed=1).read() + bytes(2 * C) + im.random(C, seed=2).read() + bytes(zero_tail)
    assert tree[b"z/mixed"].sha256 == hashlib.sha256(mixed).hexdigest()

    _, manifest, _ = read_image(target)
    boot = bootstrap_of(target, manifest)
    img = boot.erofs
    idx = lambda p: img.chunk_indexes(img.resolve(p))  # noqa: E731
    zero = idx(b"/z/zeros")
    assert None not in zero and len(set(zero)) == 1 and zero[0][0] == 1      # in layer 0's blob
    assert idx(b"/z/again") == zero[:3]                                     # layer 1 adds nothing ...
    assert len(manifest["layers"]) == 2                                     # ... so it has no blob
    assert idx(b"/z/mixed")[1:3] == zero[:2] and idx(b"/z/mixed")[4] == idx(b"/z/small")[0] != zero[0]
    (blob,) = boot.meta.blobs
    zero_chunks = [e for e in blob_chunks(target, blob)
                   if e.digest in (rdigest.digest("blake3", bytes(C)), rdigest.digest("blake3", bytes(zero_tail)))]
    assert sorted(e.uncompressed_size for e in zero_chunks) == [zero_tail, C]   # each stored once
    assert blob.chunk_count == 4                  # the two zero chunks + the two random ones

    boot_path, devices = _export(ref, tmp_path / "export")
    mnt = kernel_mount(boot_path, devices)
    assert (mnt / "z" / "zeros").read_bytes() == bytes(5 * C)
    assert (mnt / "z" / "mixed").read_bytes() == mixed
    nydusify("check", "--source", src.ref, "--target", ref, check=True)


def _export(ref: str, out: Path) -> tuple[Path, list[Path]]:
    nydusify("export", ref, out, check=True)
    return out / "image.boot", sorted((out / "devices").iterdir(), key=lambda p: int(p.name))


# --------------------------------------------------------------------------- local files (--blob-dir)

def _local_copy(layout: Path, dest: Path, tag: str = "nydus") -> tuple[Path, Path, Bootstrap]:
    """The converted image `tag` in `layout` as local files: dest/image.boot and dest/blobs/<blob id>."""
    _, manifest, _ = read_image(layout, tag)
    boot = bootstrap_of(layout, manifest)
    blobs = dest / "blobs"
    blobs.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob_path(layout, manifest["layers"][-1]["digest"])
                                                         .read_bytes()))) as tf:
        (dest / "image.boot").write_bytes(tf.extractfile("image/image.boot").read())
    for b in boot.meta.blobs:
        shutil.copyfile(blob_path(layout, "sha256:" + b.blob_id), blobs / b.blob_id)
    return dest / "image.boot", blobs, boot


def test_inspect_and_export_a_local_bootstrap_with_blob_dir(awkward_image, convert_once, tmp_path, kernel_mount,
                                                           awkward_tree):
    conv = convert_once(awkward_image, "--chunk-size", "64K")
    boot_file, blob_dir, boot = _local_copy(conv.layout, tmp_path / "local")

    by_ref = json.loads(nydusify("inspect", "--json", conv.ref, check=True).stdout)
    info = json.loads(nydusify("inspect", "--json", boot_file, "--blob-dir", blob_dir, check=True).stdout)
    assert "layers" not in info and info["inodes"] == by_ref["inodes"] > 0
    assert [b["id"] for b in info["blobs"]] == [b.blob_id for b in boot.meta.blobs]
    for b in info["blobs"]:
        assert b["local_size"] == b["compressed_size"] == (blob_dir / b["id"]).stat().st_size
    assert by_ref["learned"] is None and "learned" not in info     # a record lives next to an image
    assert {k: v for k, v in info.items() if k != "blobs"} == {k: v for k, v in by_ref.items()
                                                               if k not in ("blobs", "layers", "learned")}
    # the bootstrap alone inspects too (nothing to say about blob files then)
    alone = json.loads(nydusify("inspect", "--json", boot_file, check=True).stdout)
    assert alone["inodes"] == info["inodes"] and all("local_size" not in b for b in alone["blobs"])
    text = nydusify("inspect", boot_file, "--blob-dir", blob_dir, check=True).stdout
    assert f"inodes {info['inodes']}:" in text and "local file" in text

    # export from the local files == export from the image reference, byte for byte
    nydusify("export", boot_file, tmp_path / "out", "--blob-dir", blob_dir, check=True)
    ref_boot, ref_devices = _export(conv.ref, tmp_path / "out-ref")
    assert (tmp_path / "out" / "image.boot").read_bytes() == ref_boot.read_bytes() == boot_file.read_bytes()
    devices = sorted((tmp_path / "out" / "devices").iterdir(), key=lambda p: int(p.name))
    assert [d.read_bytes() for d in devices] == [d.read_bytes() for d in ref_devices]
    tr.assert_trees_equal(awkward_tree, tr.snapshot_tree(kernel_mount(tmp_path / "out" / "image.boot", devices)),
                          **tr.UMOCI_DIFF_OPTIONS)

    # a bootstrap without --blob-dir cannot be exported; a missing blob file is named
    r = nydusify("export", boot_file, tmp_path / "out2", check=False)
    assert "--blob-dir" in r.stderr and "Traceback" not in r.stderr, r.stderr
    gone = boot.meta.blobs[1].blob_id
    (blob_dir / gone).unlink()
    r = nydusify("export", boot_file, tmp_path / "out3", "--blob-dir", blob_dir, check=False)
    assert gone in r.stderr and "not found" in r.stderr and "Traceback" not in r.stderr, r.stderr
    info = json.loads(nydusify("inspect", "--json", boot_file, "--blob-dir", blob_dir, check=True).stdout)
    assert info["blobs"][1]["local_size"] is None
    assert "missing from --blob-dir" in nydusify("inspect", boot_file, "--blob-dir", blob_dir, check=True).stdout
    # --blob-dir goes with local files only
    r = nydusify("inspect", conv.ref, "--blob-dir", blob_dir, check=False)
    assert "--blob-dir goes with a local bootstrap or blob file" in r.stderr, r.stderr


@pytest.mark.parametrize("mode", MODES)
def test_mount_a_local_bootstrap_with_blob_dir(mode, awkward_image, convert_once, tmp_path, awkward_tree, mounter):
    conv = convert_once(awkward_image, "--chunk-size", "64K")
    boot_file, blob_dir, _ = _local_copy(conv.layout, tmp_path / "local")
    m = mounter.mount(str(boot_file), mode=mode, extra=("--blob-dir", blob_dir), plain_http=False)
    tr.assert_trees_equal(awkward_tree, tr.snapshot_tree(m.path), **tr.UMOCI_DIFF_OPTIONS)


def test_a_nydus_blob_carrying_its_bootstrap_inspects_and_exports(tmp_path):
    """nydusd's inlined-bootstrap case: the blob file (../shared/fixtures/nydus/toc/) is the REF;
    its own bootstrap describes it; fsck.erofs (erofs-utils) extracts the export."""
    from tests.helpers.nydus_rules import fixtures_dir
    (blob,) = (fixtures_dir() / "toc").iterdir()
    info = json.loads(nydusify("inspect", "--json", blob, check=True).stdout)
    assert info["files"] == 3 and len(info["blobs"]) == 1
    assert info["blobs"][0]["local_size"] == blob.stat().st_size       # the blob file serves the blob
    nydusify("export", blob, tmp_path / "out", check=True)
    out = tmp_path / "extract"
    r = run("fsck.erofs", f"--device={tmp_path / 'out' / 'devices' / '0'}", f"--extract={out}",
            tmp_path / "out" / "image.boot", ok=False)
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["error.rs", "lib.rs", "logger.rs"] and all(p.stat().st_size for p in out.rglob("*.rs"))


# --------------------------------------------------------------------------- chunk dict from a bootstrap

def test_chunk_dict_from_a_bootstrap_file(workdir, tmp_path):
    """--chunk-dict BOOTSTRAP: the dictionary is the bootstrap's chunk table; the blobs it names
    must be in the target already (they are not read to build the dictionary)."""
    a = im.build_oci_layout(workdir / "dict-src", "a", _shared_layers("a"))
    b = im.build_oci_layout(workdir / "dict-src", "b", _shared_layers("b"))
    target = tmp_path / "t"
    nydusify("convert", "--source", a.ref, "--target", f"oci:{target}:a", "--chunk-size", "64K", check=True)
    boot_file, _, dict_boot = _local_copy(target, tmp_path / "local", "a")
    nydusify("convert", "--source", b.ref, "--target", f"oci:{target}:b", "--chunk-size", "64K",
             "--chunk-dict", boot_file, check=True)
    _, manifest, _ = read_image(target, "b")
    boot = bootstrap_of(target, manifest)
    assert [x.blob_id for x in boot.meta.blobs][1:] == [dict_boot.meta.blobs[0].blob_id]
    dict_entries = {e.digest: e for e in dict_boot.meta.blobs[0].entries}
    used = boot.meta.blobs[1].entries
    assert used and all(dict_entries[e.digest] == e for e in used)
    nydusify("check", "--source", b.ref, "--target", f"oci:{target}:b", check=True)
    # a dictionary made with another digester cannot match anything: refused, saying so
    r = nydusify("convert", "--source", b.ref, "--target", f"oci:{tmp_path / 'x'}:b", "--chunk-size", "64K",
                 "--digester", "sha256", "--chunk-dict", boot_file, check=False)
    assert "digester" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_nydus_bootstrap_as_chunk_dict(tmp_path):
    """The chunk table of a bootstrap nydus-image wrote (../shared/fixtures/nydus/) is a dictionary:
    a file holding the same bytes as one of its files is not stored again; its chunk index points
    at the Nydus blob's ci entry, and it reads back through that blob."""
    from converter.convert import ConvertOptions, convert
    from tests.helpers.nydus_rules import fixtures_dir
    fx = fixtures_dir()
    nboot = Bootstrap.open(fx / "rafs-v6-2.2.boot")
    (nblob,) = nboot.meta.blobs
    data = (fx / "blobs" / nblob.blob_id).read_bytes()
    reader = rblob.BlobReader.from_bytes(data, nblob)
    nid = nboot.resolve(b"/lib.rs")
    size = nboot.getattr(nid).size
    lib_rs = b"".join(reader.read_range(e.blob_offset, e.length) for e in nboot.file_extents(nid, 0, size))
    assert len(lib_rs) == size > 0

    src = im.build_oci_layout(tmp_path / "src", "s", [[D("src"), F("src/lib.rs", lib_rs),
                                                       F("src/new.rs", b"fn main() {}\n")]])
    target = tmp_path / "t"
    # the target must already hold the dictionary's blob (as with any bootstrap file as dict)
    (target / "blobs" / "sha256").mkdir(parents=True)
    shutil.copyfile(fx / "blobs" / nblob.blob_id, target / "blobs" / "sha256" / nblob.blob_id)
    convert(src.ref, f"oci:{target}:t", ConvertOptions(chunk_size=nboot.meta.chunk_size,
                                                       chunk_dict=str(fx / "rafs-v6-2.2.boot")))
    _, manifest, _ = read_image(target, "t")
    boot = bootstrap_of(target, manifest)
    assert [b.blob_id for b in boot.meta.blobs][1:] == [nblob.blob_id]
    used = boot.meta.blobs[1].entries
    lib_digests = {rdigest.digest("blake3", lib_rs[i:i + nboot.meta.chunk_size])
                   for i in range(0, size, nboot.meta.chunk_size)}
    assert {e.digest for e in used} == lib_digests
    assert all(nblob.entry(e.index) == e for e in used)          # the Nydus blob's own ci positions
    tree = reader_tree(f"oci:{target}:t")
    assert tree[b"src/lib.rs"].sha256 == hashlib.sha256(lib_rs).hexdigest()
    own = blob_chunks(target, boot.meta.blobs[0])
    assert [e.digest for e in own] == [rdigest.digest("blake3", b"fn main() {}\n")]
