"""pynydus speaks real Nydus (issue 10, "Must show"), proved without any Nydus binary.

* Both complete images the Nydus tools made (../shared/fixtures/nydus: rafs-v6-2.2.boot + blobs/, and
  the toc/ blob carrying its own bootstrap) mount with `nydusify mount BOOT MNT --blob-dir DIR` in
  fuse and erofs modes, and the mounted trees equal what erofs-utils (`fsck.erofs --extract`, not our
  code) extracts from the same bootstrap over views built from the blobs' ci arrays by the independent
  checker tests/helpers/nydus_rules.py.
* The snapshotter fixture's bootstrap (an old nydusify's) inspects with its 3,517 inodes and one blob.
* Images pynydus converts pass every ported nydusd load-time rule and nydus-image's writer conventions
  (nydus_rules strict mode), their blob ids are the blobs' sha256 digests, fsck.erofs over ci-built
  views rebuilds exactly the source tree (what `umoci unpack` makes of it), `nydusify check` passes,
  and they mount from local files with --blob-dir (the layout's blobs/sha256 is such a folder).

Every mount is undone by the `mounter` fixture, also when a test fails.
"""
from __future__ import annotations

import dataclasses
import errno
import gzip
import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import nydus_rules as R
from tests.helpers import trees as tr
from tests.helpers.mounts import MODES, mounter  # noqa: F401 - pytest fixture

from .conftest import AWKWARD_CHUNK, blob_path, nydusify

pytestmark = [pytest.mark.skipif(shutil.which("fsck.erofs") is None, reason="needs fsck.erofs (erofs-utils)")]

TOC_BLOB = "2fa78cad554b75ac91a4a125ed148d0ddeb25efa4aaa8bd80e5dc292690a4dca"
SNAPSHOTTER = "snapshotter/v6-bootstrap-chunk-pos-438272.tar.gz"
NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"

# The fsck.erofs extraction and a mount are compared on names, types, modes, owners, sizes, contents,
# symlink targets and hardlinks. Not on: mtimes (compact inodes carry none: the kernel shows the build
# time, 0, while fsck.erofs 1.5 leaves some untouched) and the root directory's mode (the extraction
# root is a directory we made).
FIXTURE_DIFF = dict(ignore=("mtime",), ignore_root=("mtime", "mode", "uid", "gid"))


# --------------------------------------------------------------------------- the Nydus-made fixture images

def _fixture_image(fx: Path, name: str) -> tuple[bytes, Path, Path, dict[int, Path]]:
    """(bootstrap bytes, REF given to nydusify, --blob-dir, blob files by index) of fixture `name`."""
    if name == "rafs-v6-2.2":
        boot = (fx / "rafs-v6-2.2.boot").read_bytes()
        return boot, fx / "rafs-v6-2.2.boot", fx / "blobs", R.blob_files(boot, fx / "blobs")
    blob = fx / "toc" / TOC_BLOB
    # nydusd's inlined-bootstrap path: the blob file is REF; its blob table entry (a per-layer
    # bootstrap's placeholder id) is served by the file itself
    return R.inlined_bootstrap(blob.read_bytes()), blob, fx / "toc", {0: blob}


@pytest.fixture(scope="module")
def fsck_trees(tmp_path_factory):
    """name -> (snapshot of the fsck.erofs extraction, REF, blob dir); each extracted once."""
    fx = R.fixtures_dir()
    work = tmp_path_factory.mktemp("nydus-fixtures")
    done = {}

    def get(name: str):
        if name not in done:
            boot, ref, blob_dir, files = _fixture_image(fx, name)
            assert R.check_image(boot, files) == [], f"{name} breaks a nydusd rule"
            views = R.build_views(boot, None, work / f"{name}-views", files=files)
            out = R.extract_tree(boot, views, work / f"{name}-fsck")
            done[name] = tr.snapshot_tree(out), ref, blob_dir
        return done[name]
    return get


@pytest.mark.parametrize("name", ["rafs-v6-2.2", "toc"])
@pytest.mark.parametrize("mode", MODES)
def test_fixture_image_mounts_like_fsck_erofs_extracts_it(name, mode, fsck_trees, mounter):
    expected, ref, blob_dir = fsck_trees(name)
    assert len(expected) > 1 and all(e.type in ("dir", "file") for e in expected.values())
    m = mounter.mount(str(ref), mode=mode, extra=("--blob-dir", str(blob_dir)), plain_http=False)
    got = tr.snapshot_tree(m.path)
    tr.assert_trees_equal(expected, got, **FIXTURE_DIFF)
    # the contents came from the blobs, chunk by chunk, and were checked against their digests
    st = m.stats()
    assert st["chunks_fetched"] > 0 and st["verify_failures"] == 0 and st["request_errors"] == 0
    m.umount()


@pytest.mark.parametrize("mode", MODES)
def test_tampered_fixture_blob_reads_eio(mode, mounter, tmp_path):
    """A Nydus-written blob with one byte changed in a chunk: that file fails with EIO (its blake3 from
    the bootstrap does not match), the other file still reads."""
    fx = R.fixtures_dir()
    boot = (fx / "rafs-v6-2.2.boot").read_bytes()
    entry = R.parse_bootstrap(boot).blobs[0]
    blob = bytearray((fx / "blobs" / entry.blob_id).read_bytes())
    ci = R.read_ci(bytes(blob), entry)[1]
    blob[ci[1].compressed_offset + 50] ^= 0x01
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / entry.blob_id).write_bytes(blob)
    m = mounter.mount(str(fx / "rafs-v6-2.2.boot"), mode=mode, extra=("--blob-dir", str(tmp_path / "blobs")),
                      plain_http=False)
    good, bad = (m.path / "lib.rs"), (m.path / "sync_io.rs")         # ci 0 and ci 1 (see the unit tests)
    assert b"Alibaba" in good.read_bytes()[:200]
    with pytest.raises(OSError) as e:
        bad.read_bytes()
    assert e.value.errno == errno.EIO
    assert m.stats()["verify_failures"] >= 1
    m.umount()


def test_fixture_blob_dir_must_hold_the_blob(tmp_path):
    """A bootstrap whose blob is not in --blob-dir: a clear error naming the blob, not a traceback."""
    fx = R.fixtures_dir()
    r = nydusify("export", fx / "rafs-v6-2.2.boot", tmp_path / "out", "--blob-dir", tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "be7d77ee" in r.stdout + r.stderr, r.stdout + r.stderr


def test_snapshotter_fixture_inspects_3517_inodes_one_blob(tmp_path):
    fx = R.fixtures_dir()
    with tarfile.open(fx / SNAPSHOTTER) as tf:
        boot = tf.extractfile("image/image.boot").read()
    path = tmp_path / "image.boot"
    path.write_bytes(boot)
    assert R.check_bootstrap(boot) == [] and R.inode_count(boot) == 3517      # the independent count

    r = nydusify("inspect", path, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(r.stdout)
    assert info["inodes"] == 3517
    assert info["inodes"] == info["files"] + info["dirs"] + info["symlinks"] + info["other"]
    (blob,) = info["blobs"]
    assert blob["id"] == "cdde6f5645daea414d60bc75611102a8bc8dae6198f087366365d6ff85bf5726"
    assert blob["chunks"] == 2515 and blob["compressor"] in ("lz4", "lz4_block") and blob["digester"] == "blake3"
    assert info["prefetch"] == ["/bin"]                       # the prefetch table's nid, as a path
    text = nydusify("inspect", path)
    assert text.returncode == 0 and "inodes 3517" in text.stdout, text.stdout + text.stderr


# --------------------------------------------------------------------------- images pynydus converts

# (id, conversion arguments): the defaults (zstd, blake3) at 64 KiB chunks, Nydus's lz4_block with
# sha256 at 4 KiB chunks, and a prefetch list with byte ranges (prefetch table + the pynydus
# ranged-prefetch record)
CONVERSIONS = [
    ("default", ("--chunk-size", "64K")),
    ("lz4-sha256-4k", ("--chunk-size", "4K", "--compressor", "lz4_block", "--digester", "sha256")),
    ("ranged-prefetch", ("--chunk-size", "64K", "--prefetch-patterns", "@LIST")),
]
PREFETCH_LIST = (f"/files/multi-5c\t{3 * AWKWARD_CHUNK}+{AWKWARD_CHUNK},{AWKWARD_CHUNK}+10\n"
                 "/big/dup-chunks\n/etc\n")


@dataclass
class PynydusImage:
    name: str
    conv: object                 # conftest.Converted
    boot: bytes                  # image/image.boot of the bootstrap layer
    blob_dir: Path               # the layout's blobs/sha256: blob files named by blob id
    tree: tr.Tree                # umoci unpack of the source


@pytest.fixture(scope="module", params=CONVERSIONS, ids=[c[0] for c in CONVERSIONS])
def pynydus_image(request, awkward_source, convert_once, tmp_path_factory) -> PynydusImage:
    name, args = request.param
    source, tree = awkward_source(4096 if "4K" in args else AWKWARD_CHUNK)
    if "@LIST" in args:
        lst = tmp_path_factory.mktemp("prefetch") / "list.txt"
        lst.write_text(PREFETCH_LIST)
        args = tuple(str(lst) if a == "@LIST" else a for a in args)
    conv = convert_once(source, *args)
    return PynydusImage(name, conv, _bootstrap_of(conv.layout), conv.layout / "blobs" / "sha256", tree)


def _bootstrap_of(layout: Path) -> bytes:
    """image/image.boot of the single-manifest image tagged `nydus`, read from the layout's files."""
    idx = json.loads((layout / "index.json").read_text())
    (top,) = [m for m in idx["manifests"]
              if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "nydus"]
    manifest = json.loads(blob_path(layout, top["digest"]).read_bytes())
    (layer,) = [x for x in manifest["layers"] if x.get("annotations", {}).get(NYDUS_BOOTSTRAP) == "true"]
    return _bootstrap_layer(layout, layer["digest"])["image/image.boot"]


def _bootstrap_layer(layout: Path, digest: str) -> dict[str, bytes]:
    """The regular files of a bootstrap layer (gzip tar), by member name."""
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob_path(layout, digest).read_bytes()))) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


def _bootstrap_layer_of(layout: Path) -> dict[str, bytes]:
    idx = json.loads((layout / "index.json").read_text())
    (top,) = [m for m in idx["manifests"]
              if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "nydus"]
    manifest = json.loads(blob_path(layout, top["digest"]).read_bytes())
    (layer,) = [x for x in manifest["layers"] if x.get("annotations", {}).get(NYDUS_BOOTSTRAP) == "true"]
    return _bootstrap_layer(layout, layer["digest"])


def test_pynydus_image_passes_every_nydusd_rule(pynydus_image):
    img = pynydus_image
    files = R.blob_files(img.boot, img.blob_dir)          # found by blob id = the layer digest
    assert len(files) == 3                                 # one blob per source layer
    violations = R.check_image(img.boot, files, strict=True, sha256_ids=True)
    assert violations == [], "\n".join(violations)
    for b in R.parse_bootstrap(img.boot).blobs:            # as nydus-image lays a blob out for nydusify
        assert b.features == 0x70000021 and b.blob_toc_size > 512 and b.ci_compressor == 0


def test_bootstrap_layer_carries_each_blobs_ci(pynydus_image):
    """As newer nydusify: image/image.boot plus image/<blob id>.blob.meta per blob, each the ci cache
    file nydusd would otherwise fetch from the blob (so a mount needs no ci read)."""
    img = pynydus_image
    members = _bootstrap_layer_of(img.conv.layout)
    assert members["image/image.boot"] == img.boot
    boot = R.parse_bootstrap(img.boot)
    metas = {n for n in members if n.endswith(".blob.meta")}
    assert metas == {f"image/{b.blob_id}.blob.meta" for b in boot.blobs}, sorted(members)
    for b in boot.blobs:
        blob = (img.blob_dir / b.blob_id).read_bytes()
        v = R.check_blob_meta_file(members[f"image/{b.blob_id}.blob.meta"], b, blob)
        assert v == [], v


def test_prefetch_list_reaches_the_prefetch_table(pynydus_image):
    img = pynydus_image
    boot = R.parse_bootstrap(img.boot)
    listed = [p for n in boot.prefetch if n for p in boot.paths[n]]
    if img.name != "ranged-prefetch":
        assert boot.prefetch in ([], [boot.sb.root_nid]), listed
        return
    # every prefetched path's nid (the directory's files, the ranged files whole: nydusd cannot say
    # ranges); the ranges travel in the pynydus record Nydus ignores (strict rules checked its place)
    nids = [n for n in boot.prefetch if n]
    assert [boot.paths[n] for n in nids[:2]] == [[b"/files/multi-5c"], [b"/big/dup-chunks"]], listed
    assert nids[2:] and all(any(p.startswith(b"/etc/") for p in boot.paths[n]) for n in nids[2:]), listed
    assert R.PYNYDUS_MAGIC in img.boot[:boot.meta_offset]


def test_fsck_erofs_rebuilds_the_source_tree(pynydus_image, tmp_path):
    """erofs-utils, not pynydus, reads the bootstrap over views the independent checker built from the
    blobs' ci arrays (every chunk digest-checked): exactly the tree umoci unpacks from the source."""
    img = pynydus_image
    views = R.build_views(img.boot, img.blob_dir, tmp_path / "views")
    out = R.extract_tree(img.boot, views, tmp_path / "fsck")
    tr.assert_trees_equal(img.tree, _with_what_fsck_drops(tr.snapshot_tree(out), img.boot), **PYNYDUS_FSCK_DIFF)


# fsck.erofs 1.5 --extract restores names, types, owners, file mtimes, sizes, contents, symlink targets
# and devices. It does not restore xattrs (no code for them: compared on the mounts below), nor the
# extraction root's attributes; it writes each hardlink as a separate copy, and it chmods before it
# chowns, so the kernel clears setuid/setgid. Those two come from the independent parser instead.
PYNYDUS_FSCK_DIFF = dict(tr.UMOCI_DIFF_OPTIONS, ignore=("xattrs", "symlink_mtime", "dir_mtime"),
                         ignore_root=("mtime", "mode", "uid", "gid"))


def _with_what_fsck_drops(tree: tr.Tree, boot: bytes) -> tr.Tree:
    """fsck.erofs's tree with hardlink groups (paths sharing an inode) and setuid/setgid bits taken from
    nydus_rules's own parse of the bootstrap, after checking fsck.erofs's copies agree with it."""
    parsed = R.parse_bootstrap(boot)
    out = dict(tree)
    for nid, paths in parsed.paths.items():
        ino = parsed.inodes[nid]
        rels = [p[1:] if p != b"/" else tr.ROOT for p in paths]
        for rel in rels:
            e = out[rel]
            assert e.mode in (ino.mode, ino.mode & ~0o6000), (rel, oct(e.mode), oct(ino.mode))
            out[rel] = dataclasses.replace(e, mode=ino.mode)
        if len(rels) > 1 and ino.kind != R.S_IFDIR:
            assert len({(out[r].sha256, out[r].target, out[r].mode) for r in rels}) == 1, rels
            group = tuple(sorted(rels))
            for rel in rels:
                out[rel] = dataclasses.replace(out[rel], links=group)
    return out


def test_nydusify_check_passes(pynydus_image):
    img = pynydus_image
    r = nydusify("check", "--source", img.conv.source.ref, "--target", img.conv.ref)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"check OK: {len(img.tree)} entries equal" in r.stdout, r.stdout


@pytest.mark.parametrize("mode", MODES)
def test_pynydus_image_mounts_from_local_files(mode, pynydus_image, mounter, tmp_path):
    """The bootstrap file + the layout's blobs/sha256 folder as --blob-dir: the source tree, xattrs too."""
    img = pynydus_image
    path = tmp_path / "image.boot"
    path.write_bytes(img.boot)
    m = mounter.mount(str(path), mode=mode, extra=("--blob-dir", str(img.blob_dir)), plain_http=False)
    tr.assert_trees_equal(img.tree, tr.snapshot_tree(m.path), **tr.UMOCI_DIFF_OPTIONS)
    m.umount()


# --------------------------------------------------------------------------- edge cases of the writer

def _edge_layers(case: str):
    from tests.helpers import images as im
    D, F, S = im.Entry.dir, im.Entry.file, im.Entry.symlink
    return {
        # no file holds data: no blob, no device, s_blocks 0, no chunk table
        "no-data": [[D("etc"), F("etc/empty", b""), S("l", "etc"), im.Entry.fifo("p")]],
        "one-byte": [[F("x", b"x")]],
        # contiguous multi-chunk file (i_u may declare next_pow2(size)), a zero file (one chunk used
        # 5 times: not contiguous), and many small files in one directory (several dirent blocks)
        "shapes": [[D("d"), F("big", im.random(5 * 4096 + 17, seed=3)), F("zeros", im.zeros(5 * 4096))]
                   + [F(f"d/file-with-a-long-name-{i:04d}", b"%d\n" % i) for i in range(400)]],
    }[case]


@pytest.mark.parametrize("case", ["no-data", "one-byte", "shapes"])
def test_edge_images_pass_every_rule(case, tmp_path):
    from tests.helpers import images as im
    src = im.build_oci_layout(tmp_path / "src", case, _edge_layers(case))
    nydusify("convert", "--source", src.ref, "--target", f"oci:{tmp_path / 'nydus'}:nydus", "--chunk-size", "4K",
             check=True)
    boot = _bootstrap_of(tmp_path / "nydus")
    files = R.blob_files(boot, tmp_path / "nydus" / "blobs" / "sha256")
    violations = R.check_image(boot, files, strict=True, sha256_ids=True)
    assert violations == [], "\n".join(violations)
    parsed = R.parse_bootstrap(boot)
    if case == "no-data":
        assert parsed.blobs == [] and parsed.sb.blocks == 0 and parsed.chunks == []
        return
    views = R.build_views(boot, tmp_path / "nydus" / "blobs" / "sha256", tmp_path / "views")
    out = R.extract_tree(boot, views, tmp_path / "fsck")
    if os.geteuid() == 0 and shutil.which("umoci"):
        expected = tr.snapshot_tree(tr.umoci_unpack(src.layout, case, tmp_path / "bundle"))
        tr.assert_trees_equal(expected, _with_what_fsck_drops(tr.snapshot_tree(out), boot), **PYNYDUS_FSCK_DIFF)


def test_chunk_dict_image_passes_every_rule(tmp_path):
    """A conversion with --chunk-dict references a second image's blob (only the chunks it uses are in
    the chunk table): still every rule holds, the dict blob being found by its id."""
    from tests.helpers import images as im
    F = im.Entry.file
    a = im.build_oci_layout(tmp_path / "src", "a", [[F("a/shared", im.random(300 * 1024, seed=11))]])
    b = im.build_oci_layout(tmp_path / "src", "b", [[F("b/shared", im.random(300 * 1024, seed=11)),
                                                      F("b/new", im.random(150 * 1024, seed=21))]])
    nydusify("convert", "--source", a.ref, "--target", f"oci:{tmp_path / 'dict'}:nydus", "--chunk-size", "64K",
             check=True)
    nydusify("convert", "--source", b.ref, "--target", f"oci:{tmp_path / 'nydus'}:nydus", "--chunk-size", "64K",
             "--chunk-dict", f"oci:{tmp_path / 'dict'}:nydus", check=True)
    boot = _bootstrap_of(tmp_path / "nydus")
    parsed = R.parse_bootstrap(boot)
    assert len(parsed.blobs) == 2
    files = {}
    for i, e in enumerate(parsed.blobs):
        for layout in ("nydus", "dict"):
            p = tmp_path / layout / "blobs" / "sha256" / e.blob_id
            if p.is_file():
                files[i] = p
                break
    violations = R.check_image(boot, files, strict=True, sha256_ids=True)
    assert violations == [], "\n".join(violations)
    # the dict blob has more chunks than the image uses; the chunk table lists only the used ones
    used = [c for c in parsed.chunks if c.blob_index == 1]
    assert 0 < len(used) <= parsed.blobs[1].chunk_count
