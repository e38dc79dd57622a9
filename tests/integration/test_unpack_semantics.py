"""The converted tree is what containerd's unpack shows, not what the tar headers say (issue #11).

An image made of the cases where the two differ (a symlink whose header says 0644,
undeclared parents, hardlink entries with their own metadata, whiteouts, xattrs that
containerd or Linux refuse, lower-layer symlinks and files below new entries) is
unpacked by a real containerd 1.6 (overlayfs snapshotter, `ctr images mount`) and
converted by `nydusify`; the tree must be equal in the Python reader, in both mount
modes and in the kernel mount of `nydusify export`, and `nydusify check` must pass,
while it must fail on a conversion whose symlink keeps the header's mode.
"""
from __future__ import annotations

import os
import stat
import subprocess

import pytest

from converter import layer as layer_mod
from converter.convert import ConvertOptions, convert
from tests.helpers import images as im
from tests.helpers import trees as tr
from tests.helpers.mounts import MODES, convert_into, mounter  # noqa: F401  (fixture)

from .conftest import exported_devices, nydusify, reader_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (containerd, mounts)")

D, F, S, H = im.Entry.dir, im.Entry.file, im.Entry.symlink, im.Entry.hardlink
T0 = im.DEFAULT_MTIME_NS
ns = im.ns


def edge_layers() -> list[list[im.Entry]]:
    l1 = [
        D("etc"),
        F("etc/target", b"target\n", mode=0o4755, uid=5, gid=6, mtime_ns=T0 + ns(1), xattrs={b"user.a": b"1"}),
        S("sym644", "etc/target", mode=0o644, uid=3, gid=4, mtime_ns=T0 + ns(2)),     # -> lrwxrwxrwx
        S("sym600", "/nowhere", mode=0o600),
        F("implicit/a/b/file", b"deep\n"),                     # three undeclared parents
        F("late/x/file", b"late\n"),
        D("late", mode=0o700, uid=9, mtime_ns=T0 + ns(3)),    # declared after its child
        H("etc/link-same", "etc/target", mode=0o4755, uid=5, gid=6, mtime_ns=T0 + ns(1)),
        F("etc/plain", b"plain\n", mode=0o640, uid=11, gid=11, mtime_ns=T0 + ns(4), xattrs={b"user.p": b"1"}),
        # a hardlink entry with other metadata: containerd applies it to the shared inode
        H("etc/link-diff", "etc/plain", mode=0o600, uid=12, gid=13, mtime_ns=T0 + ns(9),
          xattrs={b"user.l": b"2"}),
        # ... its lchown drops the file capability
        F("etc/caps", b"caps\n", mode=0o755, xattrs={b"security.capability": im.capability_xattr(1 << 10)}),
        H("etc/caps-link", "etc/caps", mode=0o755),
        F("etc/sgid", b"sgid\n", mode=0o2755, gid=7),
        H("etc/sgid-link", "etc/sgid", mode=0o2755, gid=7),
        D("opq"), F("opq/old", b"old\n"),
        F("re/made", b"old\n"),
        S("etc/symtrusted", "target", xattrs={b"trusted.x": b"t"}),          # containerd never sets trusted.*
        D("realdir", mode=0o711), F("realdir/orig", b"o\n"), S("lnk", "realdir"),
        F("afile", b"file\n"),
        D("realdir2"), S("lnk2", "realdir2"), F("lnk2/same-layer", b"s\n"),   # same layer: followed
        D("xdir", mode=0o750, uid=33, gid=33, xattrs={b"user.d": b"1", b"trusted.d": b"2"}),
        im.Entry.fifo("fifo", xattrs={b"user.f": b"1"}),                      # user.* only on files and dirs
    ]
    l2 = [
        im.Entry.whiteout("etc/plain"),             # the other name of the inode stays
        im.Entry.whiteout("never-existed"),
        im.Entry.whiteout("re/made"),
        F("re/made", b"new\n"),                     # a whiteout hides the lower layers only
        im.Entry.opaque("opq"), F("opq/new", b"new\n"),
        F("etc/new", b"new in a lower dir\n"),      # undeclared parent: the lower dir's attributes
        S("sym644", "etc/target", mode=0o600, uid=1, gid=1),
        F("lnk/through", b"t\n"),                   # below a lower symlink: a new dir replaces it
        F("xdir/new", b"n\n"),
    ]
    l3 = [F("afile/x", b"x\n")]                     # below a lower file: a new dir replaces it
    return [l1, l2, l3]


# containerd gives the directories it creates or changes the current time; these dirs were declared
# and left alone afterwards, so their mtime is the header's
STABLE_DIRS = (b"late", b"realdir", b"realdir2")


@pytest.fixture(scope="module")
def edge(workdir, containerd_unpack):
    image = im.build_oci_layout(workdir / "unpack-edge", "edge", edge_layers())
    return image, containerd_unpack(image)


def assert_unpack_equal(expected: tr.Tree, actual: tr.Tree) -> None:
    tr.assert_trees_equal(expected, actual, ignore=("dir_mtime",))
    for d in STABLE_DIRS:
        assert expected[d].mtime_ns == actual[d].mtime_ns, d


def test_containerd_unpack_is_what_the_headers_do_not_say(edge):
    """The reference itself: what containerd made of the edge image."""
    _, ctd = edge
    assert stat.filemode(ctd[b"sym644"].mode) == "lrwxrwxrwx" and ctd[b"sym644"].uid == 1
    assert ctd[b"sym600"].mode == 0o120777
    assert (ctd[b"implicit/a"].mode, ctd[b"implicit/a"].uid) == (0o40755, 0)
    assert ctd[b"late"].mode == 0o40700 and ctd[b"late"].mtime_ns == T0 + ns(3)
    assert (ctd[b"etc/link-diff"].mode, ctd[b"etc/link-diff"].uid, ctd[b"etc/link-diff"].gid) == (0o100600, 12, 13)
    assert dict(ctd[b"etc/link-diff"].xattrs) == {b"user.p": b"1", b"user.l": b"2"}
    assert b"security.capability" not in ctd[b"etc/caps"].xattrs and ctd[b"etc/target"].mode == 0o104755
    assert not ctd[b"etc/symtrusted"].xattrs and not ctd[b"fifo"].xattrs
    assert dict(ctd[b"xdir"].xattrs) == {b"user.d": b"1"}
    assert ctd[b"re/made"].size == 4 and b"opq/old" not in ctd and b"etc/plain" not in ctd
    assert ctd[b"lnk"].type == "dir" and ctd[b"lnk"].mode == 0o40711 and b"lnk/orig" not in ctd
    assert ctd[b"afile"].type == "dir" and ctd[b"lnk2"].type == "symlink" and b"realdir2/same-layer" in ctd
    assert (ctd[tr.ROOT].mode, ctd[tr.ROOT].uid) == (0o40755, 0)


def test_converted_tree_is_containerds_unpack(edge, workdir):
    image, ctd = edge
    target = f"oci:{workdir / 'unpack-edge-nydus'}:nydus"
    nydusify("convert", "--source", image.ref, "--target", target, check=True)
    assert_unpack_equal(ctd, reader_tree(target))
    r = nydusify("check", "--source", image.ref, "--target", target, check=True)
    assert "check OK" in r.stdout


@pytest.fixture(scope="module")
def edge_ref(edge, registry_session) -> str:
    return convert_into(registry_session, edge[0].ref, "unpack/edge")


@pytest.mark.parametrize("mode", MODES)
def test_symlink_lists_as_lrwxrwxrwx_in_every_mount_mode(mode, mounter, edge, edge_ref):
    m = mounter.mount(edge_ref, mode=mode)
    assert stat.filemode(os.lstat(m.path / "sym644").st_mode) == "lrwxrwxrwx"
    ls = subprocess.run(["ls", "-l", str(m.path)], capture_output=True, text=True, check=True).stdout
    assert [line.split()[0] for line in ls.splitlines() if " sym644 -> " in line] == ["lrwxrwxrwx"], ls
    assert_unpack_equal(edge[1], tr.snapshot_tree(m.path))


def test_symlink_lists_as_lrwxrwxrwx_in_the_kernel_mount_of_export(edge, edge_ref, tmp_path, kernel_mount):
    out = tmp_path / "export"
    nydusify("export", edge_ref, out, "--plain-http", check=True)
    mnt = kernel_mount(out / "image.boot", exported_devices(out))
    assert stat.filemode(os.lstat(mnt / "sym644").st_mode) == "lrwxrwxrwx"
    assert_unpack_equal(edge[1], tr.snapshot_tree(mnt))


def test_check_fails_when_a_symlink_mode_differs_from_the_unpack(edge, tmp_path, monkeypatch):
    """A conversion that keeps the tar header's symlink mode (what the converter did before)
    is not what a container sees: check names the symlink and the two modes."""
    image, ctd = edge
    target = f"oci:{tmp_path / 'header-modes'}:nydus"
    with monkeypatch.context() as mp:
        mp.setattr(layer_mod, "unpacked_mode", lambda kind, mode: kind | (mode & 0o7777))
        convert(image.ref, target, ConvertOptions())
    assert reader_tree(target)[b"sym644"].mode == 0o120600        # the crafted mismatch is in the image
    r = nydusify("check", "--source", image.ref, "--target", target, check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "check FAILED: 2 differences" in r.stdout, r.stdout
    assert "/sym644: mode 0o120777 != 0o120600" in r.stdout and "/sym600: mode 0o120777 != 0o120600" in r.stdout
