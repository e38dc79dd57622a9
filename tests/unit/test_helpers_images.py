"""Trust the test-image factory (tests/helpers/images.py) and the tree oracle
(tests/helpers/trees.py) before every round-trip test relies on them.

Needs root, umoci and skopeo (apt: umoci skopeo busybox-static).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest
import zstandard

from tests.helpers import images as im
from tests.helpers import trees as tr

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (umoci unpack, mknod)")
needs_umoci = pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci not installed")
needs_skopeo = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")
needs_busybox = pytest.mark.skipif(not os.path.isfile("/bin/busybox"),
                                   reason="busybox-static not installed")

CHUNK = 64 * 1024


# ---------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def _remove_tmp_path(request):
    """Unpacked bundles and layouts go as soon as the test is done."""
    path = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if path is not None:
        im.remove_tree(path)


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    d = tmp_path_factory.mktemp("awkward")
    info = im.build_awkward_layout(d / "layout", chunk_size=CHUNK)
    yield info
    im.remove_tree(d)


@pytest.fixture(scope="module")
def awkward_rootfs(awkward, tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("umoci") is None:
        pytest.skip("needs root and umoci")
    d = tmp_path_factory.mktemp("awkward-unpacked")
    rootfs = tr.umoci_unpack(awkward.layout, awkward.tag, d / "bundle")
    yield rootfs
    im.remove_tree(d)


@pytest.fixture(scope="module")
def awkward_expected():
    return tr.tree_from_layers(im.awkward_image_layers(CHUNK))


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def _read_json(layout: Path, digest: str) -> dict:
    return json.loads(_blob(layout, digest).read_bytes())


def _skopeo(*args) -> str:
    proc = subprocess.run(["skopeo", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _decompress(path: Path, media_type: str) -> bytes:
    raw = path.read_bytes()
    if media_type.endswith("+gzip"):
        return gzip.decompress(raw)
    if media_type.endswith("+zstd"):
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    return raw


# ---------------------------------------------------------------- layout

def test_awkward_layout_digests_and_size(awkward):
    layout = awkward.layout
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    (desc,) = index["manifests"]
    assert desc["annotations"][im.REF_NAME] == "awkward"
    manifest = _read_json(layout, desc["digest"])
    config = _read_json(layout, manifest["config"]["digest"])
    assert len(manifest["layers"]) == 3
    total_tar = 0
    for ld, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"]):
        p = _blob(layout, ld["digest"])
        assert "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest() == ld["digest"]
        assert p.stat().st_size == ld["size"]
        tar = _decompress(p, ld["mediaType"])
        assert "sha256:" + hashlib.sha256(tar).hexdigest() == diff_id
        total_tar += len(tar)
    assert total_tar < 20 * 1024 * 1024, total_tar


def test_layout_is_reproducible(tmp_path, awkward):
    again = im.build_awkward_layout(tmp_path / "again", chunk_size=CHUNK)
    assert again.digest == awkward.digest


def test_write_layer_returns_digest_diff_id_size(tmp_path):
    entries = [im.Entry.dir("d"), im.Entry.file("d/f", im.random(100_000, seed=3))]
    for comp in ("gzip", "zstd", "none"):
        p = tmp_path / f"layer.{comp}"
        digest, diff_id, size = im.write_layer(entries, p, comp)
        raw = p.read_bytes()
        assert digest == "sha256:" + hashlib.sha256(raw).hexdigest()
        assert size == len(raw)
        tar = _decompress(p, im.MEDIA_LAYER[comp])
        assert diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
        with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
            assert tf.extractfile("d/f").read() == im.random(100_000, seed=3).read()


def test_pax_fields_are_written_exactly(tmp_path):
    e = im.Entry.file(b"odd/\xff\xfe-" + b"n" * 200, b"x", uid=3_000_000, gid=70000,
                      mtime_ns=im.ns(1_600_000_000, 123_456_789),
                      xattrs={b"user.bin": b"\x00\xff\x80", b"security.capability":
                              im.capability_xattr(1 << 10)})
    im.write_layer([e], tmp_path / "l.tar", "none")
    raw = (tmp_path / "l.tar").read_bytes()
    assert b"mtime=1600000000.123456789\n" in raw
    assert b"SCHILY.xattr.user.bin=\x00\xff\x80\n" in raw
    assert b"path=odd/\xff\xfe-" + b"n" * 200 + b"\n" in raw
    assert b"uid=3000000\n" in raw


@needs_skopeo
def test_skopeo_accepts_layout(awkward):
    out = json.loads(_skopeo("inspect", awkward.ref))
    assert out["Digest"] == awkward.digest
    assert out["Layers"] == [li.digest for li in awkward.manifest.layers]
    assert out["Architecture"] == im.host_platform().split("/")[1]


@needs_skopeo
@needs_busybox
def test_multi_platform_layout(tmp_path):
    base = im.busybox_image_layers()
    layers = {"linux/amd64": base,
              "linux/arm64": base + [[im.Entry.dir("etc"),
                                      im.Entry.file("etc/arch", b"arm64\n")]]}
    info = im.build_oci_layout(tmp_path / "multi", "multi", layers,
                               config_overrides=im.BUSYBOX_CONFIG,
                               platforms=["linux/amd64", "linux/arm64"])
    assert info.media_type == im.MEDIA_INDEX
    raw = json.loads(_skopeo("inspect", "--raw", info.ref))
    assert raw["mediaType"] == im.MEDIA_INDEX
    plats = {m["platform"]["architecture"]: m["digest"] for m in raw["manifests"]}
    assert plats == {"amd64": info.manifests["linux/amd64"].digest,
                     "arm64": info.manifests["linux/arm64"].digest}
    arm = json.loads(_skopeo("--override-arch", "arm64", "inspect", info.ref))
    assert arm["Architecture"] == "arm64" and len(arm["Layers"]) == 2
    amd = json.loads(_skopeo("--override-arch", "amd64", "inspect", info.ref))
    assert len(amd["Layers"]) == 1
    # a second tag in the same layout keeps the first
    im.build_oci_layout(tmp_path / "multi", "other", base)
    tags = [m["annotations"][im.REF_NAME]
            for m in json.loads((tmp_path / "multi" / "index.json").read_text())["manifests"]]
    assert sorted(tags) == ["multi", "other"]


# ---------------------------------------------------------------- umoci oracle

@needs_root
@needs_umoci
def test_awkward_image_applied_by_umoci(awkward_rootfs):
    r = awkward_rootfs
    # whiteouts
    assert not (r / "gone/file-to-whiteout").exists() and (r / "gone/keep").exists()
    assert not (r / "gone-dir").exists()
    assert not os.path.lexists(r / "links/dangling")
    # opaque dir re-populated; the later layer's whiteout of a re-added file too
    assert sorted(os.listdir(r / "opq")) == ["new3", "oldsub"]
    assert os.listdir(r / "opq/oldsub") == ["new2"]
    # replacements
    assert (r / "replace/file-to-dir/inner").is_file()
    assert (r / "replace/dir-to-file").is_file()
    assert (r / "replace/symlink-to-file").is_file() and not (r / "replace/symlink-to-file").is_symlink()
    assert os.readlink(r / "replace/dir-to-symlink") == "file-to-dir"
    st = os.stat(r / "replace/redecl")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o700, 1234, 4321)
    assert (r / "replace/redecl/child").is_file()
    # hardlinks
    ino = lambda p: os.lstat(r / p).st_ino  # noqa: E731
    assert ino("links/hl-a") == ino("links/hl-b")
    assert ino("links/three-1") == ino("links/three-2") == ino("etc/three-3")
    assert os.lstat(r / "links/three-1").st_nlink == 3
    assert ino("links/split-1") == ino("links/split-3") != ino("links/split-2")
    assert ino("l3/a") == ino("l3/b") == ino("l3/c")
    # xattrs, incl. binary and system.* ACLs
    assert os.getxattr(r / "xattrs/file", "user.binary") == bytes(range(256))
    assert os.getxattr(r / "xattrs/file", "security.capability") == im.capability_xattr(1 << 10)
    assert os.getxattr(r / "xattrs/acl", "system.posix_acl_access") == im._acl_0640_user1000_rw()
    assert os.getxattr(r / "xattrs/symlink", "trusted.onlink", follow_symlinks=False) == b"on a symlink"
    # names
    names = os.listdir(os.fsencode(r / "names"))
    assert b"n" * 255 in names and b"\xff" * 255 in names
    assert b"latin1-\xe9t\xe9" in names and b"new\nline" in names
    # sizes, modes, devices, ids, times
    assert os.path.getsize(r / "big/zeros-8m") == im.AWKWARD_ZEROS_SIZE
    assert os.path.getsize(r / "files/sizes/size-0") == 0
    assert stat.S_IMODE(os.stat(r / "perm/all-bits").st_mode) == 0o7777
    assert stat.S_IMODE(os.stat(r / "perm/setuid").st_mode) == 0o755   # re-declared in layer 3
    assert stat.S_IMODE(os.stat(r / "perm/sticky-dir").st_mode) == 0o1777
    st = os.lstat(r / "special/big-minor")
    assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (259, 300000)
    assert stat.S_ISFIFO(os.lstat(r / "special/fifo").st_mode)
    assert os.lstat(r / "perm/huge-ids").st_uid == 3_000_000
    assert os.lstat(r / "perm/nano-mtime").st_mtime_ns == im.ns(1_600_000_000, 123_456_789)
    deep = r / "deep" / "/".join(f"d{i:02d}" for i in range(1, 61)) / "leaf"
    assert deep.read_bytes() == b"deep leaf\n"
    assert len(os.listdir(r / "wide")) == im.AWKWARD_WIDE_COUNT


@needs_root
@needs_umoci
def test_umoci_limits_are_as_recorded(awkward_rootfs, awkward_expected):
    """The Python model of the layer rules and umoci agree on every field of
    every entry; UMOCI_DIFF_OPTIONS lists all that cannot be compared."""
    actual = tr.snapshot_tree(awkward_rootfs)
    tr.assert_trees_equal(awkward_expected, actual, **tr.UMOCI_DIFF_OPTIONS)
    # umoci sets the root dir's mtime to the epoch (it has no tar entry)
    assert actual[tr.ROOT].mtime_ns == 0
    # umoci (Go archive/tar) drops empty-valued PAX xattrs; GNU tar keeps them
    with_empty = tr.tree_from_layers(im.awkward_image_layers(CHUNK), keep_empty_xattrs=True)
    assert tr.diff_trees(with_empty, actual, ignore_xattrs=("trusted.*",)) == [
        "/xattrs/file: xattr user.empty missing"]
    # umoci sets the trusted.* xattrs that containerd (and so the model) refuses
    assert tr.diff_trees(tr.tree_from_layers(im.awkward_image_layers(CHUNK)), actual) == [
        "/xattrs/file: xattr trusted.pynydus unexpected (b'\\x00\\xfftrusted')",
        "/xattrs/symlink: xattr trusted.onlink unexpected (b'on a symlink')"]


@needs_root
@needs_umoci
@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_umoci_unpack_other_compressions(tmp_path, compression):
    layers = [[im.Entry.dir("d"), im.Entry.file("d/f", im.random(3 * CHUNK + 5, seed=1)),
               im.Entry.hardlink("d/g", "d/f")],
              [im.Entry.dir("d"), im.Entry.whiteout("d/g"), im.Entry.symlink("d/s", "f")]]
    info = im.build_oci_layout(tmp_path / "l", "t", layers, compression=compression)
    assert info.manifest.layers[0].media_type == im.MEDIA_LAYER[compression]
    rootfs = tr.umoci_unpack(info.layout, "t", tmp_path / "b")
    tr.assert_trees_equal(tr.tree_from_layers(layers), rootfs, **tr.UMOCI_DIFF_OPTIONS)
    assert not list(tmp_path.glob(".*umoci-layout"))


@needs_root
@needs_umoci
@needs_busybox
def test_busybox_image_runs(tmp_path):
    info = im.build_busybox_layout(tmp_path / "l")
    assert info.manifest.config["config"]["Cmd"] == ["/bin/cat", "/etc/hello.txt"]
    rootfs = tr.umoci_unpack(info.layout, info.tag, tmp_path / "b")
    tr.assert_trees_equal(tr.tree_from_layers(im.busybox_image_layers()), rootfs,
                          **tr.UMOCI_DIFF_OPTIONS)
    out = subprocess.run(["chroot", str(rootfs), "/bin/sh", "-c", "cat /etc/hello.txt; ls /bin | wc -l"],
                         capture_output=True, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] + b"\n" == im.BUSYBOX_HELLO
    assert int(lines[1]) == len(im.BUSYBOX_APPLETS) + 1


@needs_root
@needs_umoci
def test_umoci_unpack_multi_platform(tmp_path):
    layers = {"linux/amd64": [[im.Entry.file("arch", b"amd64\n")]],
              "linux/arm64": [[im.Entry.file("arch", b"arm64\n")]]}
    info = im.build_oci_layout(tmp_path / "l", "m", layers,
                               platforms=["linux/amd64", "linux/arm64"])
    r = tr.umoci_unpack(info.layout, "m", tmp_path / "b", platform="linux/arm64")
    assert (r / "arch").read_bytes() == b"arm64\n"


# ---------------------------------------------------------------- malicious specs

@needs_skopeo
def test_malicious_layers_are_written_raw(tmp_path):
    cases = im.malicious_layers()
    assert {"dotdot", "absolute", "symlink_escape", "hardlink_missing",
            "truncated_gzip", "corrupt_gzip"} <= set(cases)
    layout = tmp_path / "mal"
    infos = {name: im.build_oci_layout(layout, name, layers) for name, layers in cases.items()}
    for name, info in infos.items():
        # digests in the manifest are those of the blobs as written (damaged or not)
        _skopeo("inspect", info.ref)
        for li in info.manifest.layers:
            assert "sha256:" + hashlib.sha256(_blob(layout, li.digest).read_bytes()).hexdigest() == li.digest

    def member_names(name):
        blob = _blob(layout, infos[name].manifest.layers[-1].digest)
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob.read_bytes()))) as tf:
            return [(m.name, m.linkname) for m in tf.getmembers()]

    assert member_names("dotdot") == [("../escape", "")]
    assert member_names("absolute") == [("/etc/x", "")]
    assert member_names("symlink_escape") == [("link", "/tmp"), ("link/evil", "")]
    assert member_names("hardlink_missing") == [("hl", "does/not/exist")]
    for name in ("truncated_gzip", "corrupt_gzip"):
        blob = _blob(layout, infos[name].manifest.layers[-1].digest).read_bytes()
        with pytest.raises((EOFError, OSError, zlib.error)):
            gzip.decompress(blob)


# ---------------------------------------------------------------- snapshot / diff

def _make_tree(root: Path) -> None:
    (root / "d").mkdir(parents=True)
    (root / "d/f").write_bytes(b"hello")
    os.chmod(root / "d/f", 0o644)
    os.link(root / "d/f", root / "d/f2")
    os.symlink("f", root / "d/link")
    os.symlink("/", root / "d/rootlink")       # must not be followed
    with open(os.fsencode(root / "d") + b"/raw-\xff\xfe", "wb") as f:
        f.write(b"\0" * (3 * 1024 * 1024 + 7))
    os.setxattr(root / "d/f", "user.k", b"v")


def test_snapshot_tree_fields(tmp_path):
    _make_tree(tmp_path)
    t = tr.snapshot_tree(tmp_path)
    assert set(t) == {b".", b"d", b"d/f", b"d/f2", b"d/link", b"d/rootlink", b"d/raw-\xff\xfe"}
    f = t[b"d/f"]
    assert (f.type, f.mode, f.size) == ("file", 0o100644, 5)
    assert f.sha256 == hashlib.sha256(b"hello").hexdigest()
    assert f.links == (b"d/f", b"d/f2") == t[b"d/f2"].links
    assert f.xattrs.get(b"user.k") == b"v"
    assert t[b"d/link"].target == b"f" and t[b"d/link"].type == "symlink" and t[b"d/link"].links is None
    assert t[b"d/raw-\xff\xfe"].sha256 == hashlib.sha256(b"\0" * (3 * 1024 * 1024 + 7)).hexdigest()
    assert t[b"d/f"].mtime_ns == os.lstat(tmp_path / "d/f").st_mtime_ns


def test_diff_trees_identical_and_changed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _make_tree(a)
    _make_tree(b)
    for p in ("d", "d/f", "d/link", "d/rootlink"):          # same mtimes everywhere
        st = os.lstat(a / p)
        os.utime(b / p, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    raw = b"/d/raw-\xff\xfe"
    st = os.lstat(os.fsencode(a) + raw)
    os.utime(os.fsencode(b) + raw, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert tr.diff_trees(a, b) == []
    tr.assert_trees_equal(tr.snapshot_tree(a), tr.snapshot_tree(b))

    os.chmod(b / "d/f", 0o4755)
    os.setxattr(b / "d/f", "user.k", b"changed")
    with open(os.fsencode(b) + raw, "r+b") as f:
        f.write(b"X")
    os.utime(os.fsencode(b) + raw, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.unlink(b / "d/link")
    os.symlink("elsewhere", b / "d/link")
    os.utime(b / "d/link", ns=(1, 1), follow_symlinks=False)
    (b / "extra").write_bytes(b"")
    diffs = tr.diff_trees(a, b, ignore=("dir_mtime",))
    assert "/d/f: mode 0o100644 != 0o104755" in diffs
    assert "/d/f2: mode 0o100644 != 0o104755" in diffs           # same inode
    assert "/d/f: xattr user.k b'v' != b'changed'" in diffs
    assert any(d.startswith("/d/raw-\\xff\\xfe: content sha256 ") for d in diffs)
    assert "/d/link: symlink target b'f' != b'elsewhere'" in diffs
    assert any(d.startswith("/d/link: mtime_ns ") for d in diffs)
    assert "/extra: unexpected file" in diffs
    assert "/d/link: symlink target b'f' != b'elsewhere'" not in tr.diff_trees(
        a, b, ignore=("target",))
    assert not [d for d in tr.diff_trees(a, b, ignore_xattrs=("user.*",)) if "xattr" in d]
    assert not [d for d in tr.diff_trees(a, b, ignore_paths=("d",)) if d.startswith("/d")]

    os.unlink(b / "d/f2")
    diffs = tr.diff_trees(a, b)
    assert "/d/f2: missing (expected file)" in diffs
    assert "/d/f: hardlinks ['/d/f', '/d/f2'] != None" in diffs
    with pytest.raises(AssertionError, match=r"difference\(s\) between trees"):
        tr.assert_trees_equal(a, b)


def test_assert_trees_equal_truncates_report():
    exp = {tr.ROOT: tr.EntryInfo("dir", 0o40755, 0, 0, None, None, None, None)}
    act = dict(exp)
    for i in range(100):
        act[f"f{i:03d}".encode()] = tr.EntryInfo("file", 0o100644, 0, 0, 0, 0, "0" * 64, None)
    with pytest.raises(AssertionError) as ei:
        tr.assert_trees_equal(exp, act)
    msg = str(ei.value)
    assert msg.startswith("100 difference(s)") and "... and 70 more" in msg
    assert msg.count("unexpected file") == 30


def test_tree_from_layers_rules():
    E = im.Entry
    layers = [
        [E.dir("a"), E.file("a/x", b"1"), E.dir("a/sub"), E.file("a/sub/y", b"2"),
         E.file("f", b"f"), E.hardlink("g", "f")],
        [E.file("a/new", b"n"), E.opaque("a"), E.dir("f"), E.file("./g", b"g2")],
    ]
    t = tr.tree_from_layers(layers)
    assert sorted(t) == [b".", b"a", b"a/new", b"f", b"g"]
    assert t[b"f"].type == "dir" and t[b"g"].links is None
    with pytest.raises(ValueError):
        tr.tree_from_layers([[E.file("../x", b"")]])
