"""converter.layer + converter.merge: OCI apply semantics on small hand-made layers."""
from __future__ import annotations

import hashlib
import stat

import pytest

from converter.layer import LayerError, LayerReader
from converter.merge import merge_layers
from rafs.tree import lookup
from tests.helpers.images import Entry, data, write_layer, zeros

CHUNK = 4096


def _read(tmp_path, entries, name="layer", compression="gzip", sink=None, seen=None):
    path = tmp_path / f"{name}.tar"
    _, diff_id, _ = write_layer(entries, path, compression=compression)
    reader = LayerReader(name, CHUNK, "sha256", sink, seen=seen)
    with open(path, "rb") as f:
        return reader.read(f, diff_id)


def _merge(tmp_path, *layers):
    return merge_layers([(f"l{i}", _read(tmp_path, entries, f"l{i}")) for i, entries in enumerate(layers)])


def test_whiteout_hides_lower_only(tmp_path):
    root = _merge(tmp_path,
                  [Entry.dir("d"), Entry.file("d/a", b"a"), Entry.file("d/b", b"b")],
                  [Entry.whiteout("d/a"), Entry.file("d/c", b"c")])
    assert sorted(lookup(root, b"d").entries) == [b"b", b"c"]


def test_whiteout_in_same_layer_does_not_hide_its_own_entry(tmp_path):
    root = _merge(tmp_path, [Entry.dir("d")], [Entry.file("d/a", b"new"), Entry.whiteout("d/a")])
    assert b"a" in lookup(root, b"d").entries


def test_opaque_dir_drops_lower_children_keeps_own(tmp_path):
    root = _merge(tmp_path,
                  [Entry.dir("d"), Entry.file("d/old", b"x"), Entry.dir("d/sub"), Entry.file("d/sub/f", b"y")],
                  [Entry.dir("d", mode=0o700), Entry.opaque("d"), Entry.file("d/new", b"z")])
    d = lookup(root, b"d")
    assert list(d.entries) == [b"new"]
    assert stat.S_IMODE(d.mode) == 0o700


def test_type_replacement_both_ways(tmp_path):
    root = _merge(tmp_path,
                  [Entry.file("f", b"file"), Entry.dir("d"), Entry.file("d/x", b"x")],
                  [Entry.dir("f"), Entry.file("f/inner", b"i"), Entry.file("d", b"now a file")])
    assert lookup(root, b"f").is_dir() and lookup(root, b"f/inner").is_reg()
    assert lookup(root, b"d").is_reg() and lookup(root, b"d/x") is None


def test_redeclared_dir_changes_attrs_and_keeps_children(tmp_path):
    root = _merge(tmp_path,
                  [Entry.dir("d", mode=0o755), Entry.file("d/keep", b"k")],
                  [Entry.dir("d", mode=0o1777, uid=1000, gid=2000)])
    d = lookup(root, b"d")
    assert (stat.S_IMODE(d.mode), d.uid, d.gid) == (0o1777, 1000, 2000)
    assert b"keep" in d.entries


def test_implicit_parent_keeps_lower_attrs(tmp_path):
    root = _merge(tmp_path,
                  [Entry.dir("usr", mode=0o750, uid=7), Entry.dir("usr/bin", mode=0o700)],
                  [Entry.file("usr/bin/tool", b"t", mode=0o4755)])
    assert (stat.S_IMODE(lookup(root, b"usr").mode), lookup(root, b"usr").uid) == (0o750, 7)
    assert stat.S_IMODE(lookup(root, b"usr/bin/tool").mode) == 0o4755


def test_hardlinks_share_one_inode_within_and_across_layers(tmp_path):
    root = _merge(tmp_path,
                  [Entry.file("a", b"shared"), Entry.hardlink("b", "a")],
                  [Entry.hardlink("c", "a")])
    assert lookup(root, b"a") is lookup(root, b"b") is lookup(root, b"c")


def test_hardlink_to_missing_target_names_layer_and_path(tmp_path):
    with pytest.raises(LayerError, match=r"l0.*hardlink.*missing"):
        _merge(tmp_path, [Entry.hardlink("x", "missing")])


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/etc/passwd"])
def test_unsafe_paths_are_rejected_with_the_entry_named(tmp_path, name):
    with pytest.raises(LayerError, match="escape|absolute"):
        _read(tmp_path, [Entry.file(name, b"x")])


def test_zero_chunks_are_ordinary_chunks_and_repeats_are_given_to_the_sink_once(tmp_path):
    """RAFS v6 has no holes: a zero chunk is a chunk like any other, stored once."""
    class Sink:
        def __init__(self):
            self.chunks = []

        def add(self, data, digest):
            self.chunks.append((digest, bytes(data)))

    sink = Sink()
    block = b"A" * CHUNK
    tree = _read(tmp_path, [Entry.file("z", zeros(3 * CHUNK + 100)),
                            Entry.file("r", data(block * 3 + b"tail"))], sink=sink)
    z = tree.root.entries[b"z"].chunks
    zero = hashlib.sha256(bytes(CHUNK)).digest()
    assert None not in z and [c.digest for c in z] == [zero] * 3 + [hashlib.sha256(bytes(100)).digest()]
    assert [c.size for c in z] == [CHUNK] * 3 + [100]
    r = tree.root.entries[b"r"]
    assert [c.size for c in r.chunks] == [CHUNK, CHUNK, CHUNK, 4]
    # the zero chunk once, the 100-byte zero tail once, "AAAA…" once, the tail once
    assert [d for d, _ in sink.chunks] == [zero, hashlib.sha256(bytes(100)).digest(),
                                          hashlib.sha256(block).digest(), hashlib.sha256(b"tail").digest()]
    assert sink.chunks[0][1] == bytes(CHUNK)


def test_pax_times_xattrs_and_empty_xattr(tmp_path):
    tree = _read(tmp_path, [Entry.file("f", b"x", mtime_ns=1_600_000_000_123_456_789,
                                       xattrs={b"user.k": b"\x00\xffbin", b"user.empty": b""})])
    f = tree.root.entries[b"f"]
    assert (f.mtime, f.mtime_nsec) == (1_600_000_000, 123_456_789)
    # An empty PAX record deletes the keyword (POSIX pax), as containerd and umoci apply it.
    assert f.xattrs == {b"user.k": b"\x00\xffbin"}


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_wrong_diff_id_is_rejected(tmp_path, compression):
    path = tmp_path / "l.tar"
    write_layer([Entry.file("f", b"x")], path, compression=compression)
    with open(path, "rb") as f, pytest.raises(LayerError, match="diff_id"):
        LayerReader("l", CHUNK, "sha256", None).read(f, "sha256:" + "0" * 64)


# --- where containerd's unpack and the tar headers differ (checked against a real containerd in
# --- tests/integration/test_unpack_semantics.py)

def test_symlink_is_0777_whatever_its_header_says(tmp_path):
    root = _merge(tmp_path, [Entry.symlink("s", "t", mode=0o644, uid=3), Entry.symlink("z", "t", mode=0o000)])
    assert lookup(root, b"s").mode == stat.S_IFLNK | 0o777 and lookup(root, b"s").uid == 3
    assert stat.filemode(lookup(root, b"z").mode) == "lrwxrwxrwx"


def test_root_entry_is_ignored_but_its_mtime(tmp_path):
    root = _merge(tmp_path, [Entry.dir("./", mode=0o700, uid=3, gid=4, mtime_ns=5 * 10**9,
                                       xattrs={b"user.r": b"1"}), Entry.file("f", b"f")])
    assert (root.mode, root.uid, root.gid, root.xattrs, root.mtime) == (stat.S_IFDIR | 0o755, 0, 0, {}, 5)


def test_hardlink_entry_applies_its_header_to_the_inode(tmp_path):
    caps = {b"security.capability": b"\x01" * 20}
    root = _merge(tmp_path, [Entry.file("a", b"a", mode=0o4755, uid=1, xattrs={b"user.a": b"1", **caps}),
                             Entry.hardlink("b", "a", mode=0o600, uid=2, gid=3, mtime_ns=7 * 10**9,
                                            xattrs={b"user.b": b"2"})])
    a = lookup(root, b"a")
    assert a is lookup(root, b"b")
    assert (a.mode, a.uid, a.gid, a.mtime) == (stat.S_IFREG | 0o600, 2, 3, 7)
    assert a.xattrs == {b"user.a": b"1", b"user.b": b"2"}      # lchown dropped the capability


def test_xattrs_containerd_does_not_set_are_dropped(tmp_path):
    root = _merge(tmp_path, [Entry.file("f", b"f", xattrs={b"trusted.t": b"1", b"user.u": b"2", b"security.s": b"3"}),
                             Entry.symlink("s", "f", xattrs={b"user.u": b"2", b"security.s": b"3",
                                                             b"system.posix_acl_access": b"\x02\x00\x00\x00"}),
                             Entry.fifo("p", xattrs={b"user.u": b"2"}), Entry.dir("d", xattrs={b"user.u": b"2"})])
    assert lookup(root, b"f").xattrs == {b"user.u": b"2", b"security.s": b"3"}
    assert lookup(root, b"s").xattrs == {b"security.s": b"3"}
    assert lookup(root, b"p").xattrs == {} and lookup(root, b"d").xattrs == {b"user.u": b"2"}


def test_undeclared_parent_replaces_a_lower_symlink_or_file(tmp_path):
    root = _merge(tmp_path,
                  [Entry.dir("real", mode=0o711, uid=4), Entry.file("real/old", b"o"), Entry.symlink("lnk", "real"),
                   Entry.file("f", b"f")],
                  [Entry.file("lnk/new", b"n"), Entry.file("f/x", b"x"), Entry.whiteout("lnk/old")])
    lnk = lookup(root, b"lnk")
    assert lnk.is_dir() and list(lnk.entries) == [b"new"] and (stat.S_IMODE(lnk.mode), lnk.uid) == (0o711, 4)
    assert sorted(lookup(root, b"real").entries) == [b"old"]     # neither filled nor whited out through the link
    assert lookup(root, b"f").is_dir() and stat.S_IMODE(lookup(root, b"f").mode) == 0o755


def test_undeclared_parent_below_a_symlink_loop_is_rejected(tmp_path):
    with pytest.raises(LayerError, match="too many levels of symbolic links"):
        _merge(tmp_path, [Entry.symlink("a", "b"), Entry.symlink("b", "a")], [Entry.file("a/x", b"x")])
