"""Test images: the ready-made specs of the image factory (`testbed.images`), which this module
also hands on, so tests say `im.Entry`, `im.random`, `im.build_oci_layout`, `im.awkward_image_layers`.

* `awkward_image_layers` / `build_awkward_layout`: three layers covering every file type and the
  layer-merge rules (whiteouts, opaque dirs, hardlinks, xattrs, ACLs, capabilities, odd names
  and times).
* `busybox_image_layers` (+ `BUSYBOX_CONFIG`) / `build_busybox_layout`: a runnable image from
  the host's busybox.
* `malicious_layers`: layers an unpacker must refuse or contain.
* `capability_xattr`, `posix_acl_xattr`: xattr values in the kernel's binary formats.
* `remove_tree`: rmtree that copes with read-only dirs left by unpacked images.
"""
from __future__ import annotations

import os
import shutil
import struct
import tarfile
from pathlib import Path
from typing import Sequence

from testbed.images import (BLOCK, CHAR, CREATED, DEFAULT_MTIME_NS, DIR, FIFO, FILE, HARDLINK,  # noqa: F401
                            MEDIA_CONFIG, MEDIA_INDEX, MEDIA_LAYER, MEDIA_MANIFEST, OPAQUE, OPAQUE_NAME,
                            REF_NAME, SYMLINK, WHITEOUT, WHITEOUT_PREFIX, Content, Entry, ImageInfo, Layer,
                            LayerInfo, ManifestInfo, as_content, as_layer, build_oci_layout, canonical_json,
                            concat, data, host_file, host_platform, ns, put_blob, random, repeat, write_layer,
                            zeros)


# --------------------------------------------------------------------------
# Ready-made specs
# --------------------------------------------------------------------------

def capability_xattr(permitted: int, effective: bool = True, inheritable: int = 0) -> bytes:
    """security.capability, VFS_CAP_REVISION_2 (struct vfs_cap_data, LE)."""
    magic = 0x02000000 | (1 if effective else 0)
    return struct.pack("<5I", magic, permitted & 0xFFFFFFFF, inheritable & 0xFFFFFFFF,
                       permitted >> 32, inheritable >> 32)


ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF


def posix_acl_xattr(entries: Sequence[tuple[int, int, int | None]]) -> bytes:
    """system.posix_acl_* value in the kernel's binary format.

    entries: (tag, perm, id-or-None), in the kernel's canonical order
    (USER_OBJ, USER..., GROUP_OBJ, GROUP..., MASK, OTHER).
    """
    out = struct.pack("<I", 2)  # POSIX_ACL_XATTR_VERSION
    for tag, perm, ident in entries:
        out += struct.pack("<HHI", tag, perm, ACL_UNDEFINED_ID if ident is None else ident)
    return out


def _acl_0640_user1000_rw() -> bytes:
    # Consistent with mode 0640 (group bits == mask), so chmod and the ACL agree
    # whichever the extractor applies last.
    return posix_acl_xattr([(ACL_USER_OBJ, 6, None), (ACL_USER, 6, 1000),
                            (ACL_GROUP_OBJ, 4, None), (ACL_MASK, 4, None),
                            (ACL_OTHER, 0, None)])


def _acl_default_dir() -> bytes:
    return posix_acl_xattr([(ACL_USER_OBJ, 7, None), (ACL_USER, 5, 2000),
                            (ACL_GROUP_OBJ, 5, None), (ACL_MASK, 5, None),
                            (ACL_OTHER, 5, None)])


AWKWARD_DEEP_LEVELS = 60
AWKWARD_WIDE_COUNT = 3000
AWKWARD_ZEROS_SIZE = 8 * 1024 * 1024


def awkward_image_layers(chunk_size: int = 64 * 1024) -> list[list[Entry]]:
    """Three layers covering every file type and the merge rules (see module doc).

    Every later-layer change re-declares its parent directories (as docker
    does), so the applied tree is unambiguous: a directory's metadata is that
    of its latest declaration.
    """
    C = chunk_size
    T0 = DEFAULT_MTIME_NS
    T1, T2 = T0 + ns(1000), T0 + ns(2000)
    D, F, S, H = Entry.dir, Entry.file, Entry.symlink, Entry.hardlink

    # ---------------- layer 1: base ----------------
    l1: list[Entry] = []
    for d in ("bin", "etc", "files", "files/sizes", "big", "links", "special", "perm",
              "xattrs", "names", "deep", "wide", "gone", "gone-dir", "gone-dir/sub",
              "opq", "opq/oldsub", "replace", "replace/dir-to-file",
              "replace/dir-to-symlink"):
        l1.append(D(d))
    l1 += [
        F("etc/hello.txt", b"hello from layer 1\n"),
        F("bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755),
    ]
    for n in (0, 1, 4095, 4096, 4097, C - 1, C, C + 1):
        l1.append(F(f"files/sizes/size-{n}", random(n, seed=n)))
    l1 += [
        F("files/multi-3c", random(3 * C + 123, seed=1001)),
        F("files/multi-5c", random(5 * C, seed=1002)),
        F("files/multi-copy", random(3 * C + 123, seed=1001)),   # same as multi-3c
        F("big/zeros-8m", zeros(AWKWARD_ZEROS_SIZE)),
        # 4 identical chunks + a tail: dedup inside one file
        F("big/dup-chunks", concat(repeat(random(C, seed=7), 4), random(100, seed=8))),
        # hardlinks: 2 names, 3 names (one in another dir), a group split later; each link entry
        # carries its inode's metadata, as tar writers do (containerd applies it to the inode)
        F("links/hl-a", b"hardlink pair\n", uid=7, gid=8, mtime_ns=T0 + 5),
        H("links/hl-b", "links/hl-a", uid=7, gid=8, mtime_ns=T0 + 5),
        F("links/three-1", b"three names\n", mode=0o600),
        H("links/three-2", "links/three-1", mode=0o600),
        H("etc/three-3", "links/three-1", mode=0o600),
        F("links/split-1", b"split me\n"),
        H("links/split-2", "links/split-1"),
        H("links/split-3", "links/split-1"),
        S("links/rel", "hl-a"),
        S("links/abs", "/etc/hello.txt"),
        S("links/dangling", "nowhere"),
        S("links/dir-link", "../files"),
        S("links/dot", "."),
        S("links/long-target", "x/" * 150),       # 300-byte target (PAX linkpath)
        Entry.chardev("special/null", 1, 3, mode=0o666),
        Entry.chardev("special/tty", 5, 0, mode=0o620, gid=5),
        Entry.blockdev("special/loop0", 7, 0, mode=0o660, gid=6),
        Entry.blockdev("special/big-minor", 259, 300000),
        Entry.fifo("special/fifo", mode=0o640),
        F("perm/setuid", b"suid\n", mode=0o4755),
        F("perm/setgid", b"sgid\n", mode=0o2755),
        F("perm/all-bits", b"7777\n", mode=0o7777),
        F("perm/none", b"no perms\n", mode=0o000),
        D("perm/sticky-dir", mode=0o1777),
        D("perm/setgid-dir", mode=0o2775, gid=100),
        D("perm/private", mode=0o700, uid=1000, gid=1000),
        F("perm/private/secret", b"s\n", mode=0o600, uid=1000, gid=1000),
        F("perm/high-ids", b"ids\n", uid=100000, gid=200000),
        F("perm/uid-65536", b"ids\n", uid=65536, gid=65537),
        F("perm/huge-ids", b"ids\n", uid=3_000_000, gid=4_000_000),   # > ustar: PAX
        F("perm/nano-mtime", b"t\n", mtime_ns=ns(1_600_000_000, 123_456_789)),
        F("perm/epoch", b"t\n", mtime_ns=0),
        F("perm/future", b"t\n", mtime_ns=ns(2**33 + 7)),               # > ustar: PAX
        S("perm/owned-link", "setuid", uid=1234, gid=5678, mtime_ns=T0 + ns(3)),
        D("perm/nano-dir", mtime_ns=ns(1_650_000_000, 999_999_999)),
        F("xattrs/file", b"x\n", mode=0o755, xattrs={
            b"user.plain": b"hello",
            b"user.empty": b"",
            b"user.binary": bytes(range(256)),
            b"user.long": b"L" * 1500,
            b"trusted.pynydus": b"\x00\xfftrusted",
            b"security.capability": capability_xattr(1 << 10),   # cap_net_bind_service+ep
        }),
        F("xattrs/acl", b"acl\n", mode=0o640, xattrs={
            b"system.posix_acl_access": _acl_0640_user1000_rw()}),
        D("xattrs/acl-dir", mode=0o755, xattrs={
            b"system.posix_acl_default": _acl_default_dir()}),
        D("xattrs/dir", xattrs={b"user.dirattr": b"on a dir"}),
        S("xattrs/symlink", "file", xattrs={b"trusted.onlink": b"on a symlink"}),
    ]
    # names
    l1 += [
        F(b"names/" + b"n" * 255, b"255-byte name\n"),
        D(b"names/" + b"d" * 255),
        F(b"names/" + b"d" * 255 + b"/f", b"under a 255-byte dir\n"),
        F(b"names/" + "é".encode() * 127 + b"x", b"255 bytes of UTF-8\n"),
        F(b"names/" + b"\xff" * 255, b"255 bytes, not UTF-8\n"),
        F(b"names/latin1-\xe9t\xe9", b"latin-1 name\n"),
        F(b"names/\xff\xfe\xfd-raw", b"raw bytes\n"),
        F("names/ünïcødé-日本語", b"utf-8 name\n"),
        F("names/space name", b"space\n"),
        F("names/new\nline", b"newline\n"),
        F("names/back\\slash", b"backslash\n"),
        F("names/-dash", b"dash\n"),
        F("names/.hidden", b"hidden\n"),
        F("names/..dots", b"dots\n"),
        F("names/not.wh.whiteout", b"not a whiteout\n"),
    ]
    # 60 levels deep
    p = "deep"
    for i in range(1, AWKWARD_DEEP_LEVELS + 1):
        p += f"/d{i:02d}"
        l1.append(D(p))
    l1.append(F(p + "/leaf", b"deep leaf\n"))
    # 3000 entries in one directory
    for i in range(AWKWARD_WIDE_COUNT):
        l1.append(F(f"wide/f{i:04d}", b"" if i % 10 else f"{i}\n".encode()))
    # things later layers change
    l1 += [
        F("gone/file-to-whiteout", b"bye\n"),
        F("gone/keep", b"stays\n"),
        F("gone-dir/a", b"a\n"),
        F("gone-dir/sub/b", b"b\n"),
        F("opq/old1", b"old\n"),
        F("opq/oldsub/old2", b"old\n"),
        F("replace/file-to-dir", b"file, later a dir\n"),
        F("replace/dir-to-file/c", b"child\n"),
        F("replace/dir-to-symlink/c", b"child\n"),
        S("replace/symlink-to-file", "target"),
        D("replace/redecl", mode=0o755),
        F("replace/redecl/child", b"kept\n"),
        F("replace/meta-file", b"meta\n", mode=0o644),
    ]

    # ---------------- layer 2: whiteouts, opaque, replacements ----------------
    l2 = [
        D("gone", mtime_ns=T1),
        Entry.whiteout("gone/file-to-whiteout"),
        Entry.whiteout("gone-dir"),                      # a whole directory
        D("opq", mtime_ns=T1),
        F("opq/new1", b"new in layer 2\n", mtime_ns=T1),  # before the marker: order must not matter
        Entry.opaque("opq"),
        D("opq/oldsub", mode=0o750, mtime_ns=T1),
        F("opq/oldsub/new2", b"new in layer 2\n", mtime_ns=T1),
        D("replace", mtime_ns=T1),
        D("replace/file-to-dir", mtime_ns=T1),
        F("replace/file-to-dir/inner", b"inner\n", mtime_ns=T1),
        F("replace/dir-to-file", b"was a dir\n", mtime_ns=T1),
        F("replace/symlink-to-file", b"was a symlink\n", mtime_ns=T1),
        D("replace/redecl", mode=0o700, uid=1234, gid=4321,
          mtime_ns=T1 + 500_000_000),                    # keeps its child
        F("replace/meta-file", b"meta\n", mode=0o600, uid=42, gid=43,
          mtime_ns=ns(1_700_000_123, 456_000_000)),
        D("links", mtime_ns=T1),
        Entry.whiteout("links/dangling"),
        D("l2", mtime_ns=T1),
        F("l2/orig", b"linked in layer 2\n", mtime_ns=T1),
        H("l2/link", "l2/orig", mtime_ns=T1),
    ]

    # ---------------- layer 3: cross-layer dedup, "./" names, more overrides ----------------
    l3 = [
        D("./big", mtime_ns=T2),
        F("./big/dup-across", concat(repeat(random(C, seed=7), 4), random(100, seed=8)),
          mtime_ns=T2),                                  # == big/dup-chunks from layer 1
        F("./big/zeros-1m", zeros(1024 * 1024), mtime_ns=T2),
        D("./links", mtime_ns=T2),
        F("./links/split-2", b"split off\n", mtime_ns=T2),   # breaks one name off a group
        D("./replace", mtime_ns=T2),
        S("./replace/dir-to-symlink", "file-to-dir", mtime_ns=T2),
        Entry.whiteout("./never-existed"),               # whiteout of nothing: no-op
        D("./opq", mtime_ns=T2),
        Entry.whiteout("./opq/new1"),
        F("./opq/new3", b"new in layer 3\n", mtime_ns=T2),
        D("./etc", mtime_ns=T2),
        F("./etc/layer3.txt", b"layer 3\n", mtime_ns=T2),
        D("./perm", mtime_ns=T2),
        F("./perm/setuid", b"suid\n", mode=0o755, mtime_ns=T2),   # suid dropped
        D("./l3", mtime_ns=T2),
        F("./l3/a", b"layer 3 link\n", mtime_ns=T2),
        H("./l3/b", "./l3/a", mtime_ns=T2),
        H("./l3/c", "./l3/a", mtime_ns=T2),
    ]
    return [l1, l2, l3]


BUSYBOX_APPLETS = ("sh", "ash", "cat", "ls", "echo", "head", "tail", "wc", "sha256sum",
                   "md5sum", "stat", "find", "sleep", "true", "false", "env", "id", "mkdir",
                   "rm", "touch", "cp", "mv", "dd", "grep", "readlink", "test", "[", "uname",
                   "ps", "printf", "pwd", "du", "df", "sync", "date", "seq", "xargs", "tr")
BUSYBOX_HELLO = b"hello from pynydus\n"
BUSYBOX_CONFIG = {
    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    "Entrypoint": None,
    "Cmd": ["/bin/cat", "/etc/hello.txt"],
    "WorkingDir": "/",
}


def busybox_image_layers(busybox: str | os.PathLike = "/bin/busybox") -> list[list[Entry]]:
    """One layer: a static /bin/busybox, applet symlinks, /etc/hello.txt.

    Use with `config_overrides=BUSYBOX_CONFIG` (default command prints hello).
    """
    bb = Path(busybox)
    if not bb.is_file():
        raise FileNotFoundError(f"{bb} missing: apt-get install busybox-static")
    D, F, S = Entry.dir, Entry.file, Entry.symlink
    layer = [D("bin"), F("bin/busybox", host_file(bb), mode=0o755)]
    layer += [S(f"bin/{a}", "busybox") for a in BUSYBOX_APPLETS]
    layer += [
        D("etc"),
        F("etc/hello.txt", BUSYBOX_HELLO),
        F("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
        F("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
        D("root", mode=0o700), D("tmp", mode=0o1777),
        D("dev"), D("proc"), D("sys"), D("usr"), D("usr/bin"),
    ]
    return [layer]


def malicious_layers() -> dict[str, list[Layer]]:
    """name -> layers of a small image that an importer must reject safely.

    Every case sits on top of a harmless first layer. Names are written raw.
    """
    base = Layer([Entry.dir("etc"), Entry.file("etc/ok", b"fine\n")])
    payload = [Entry.dir("data"), Entry.file("data/blob", random(256 * 1024, seed=99)),
               Entry.file("data/text", b"some text\n" * 500)]
    huge = tarfile.TarInfo("huge")
    huge.size = 1 << 40
    huge_tar = huge.tobuf(tarfile.PAX_FORMAT) + b"only a few bytes"
    return {
        "dotdot": [base, Layer([Entry.file("../escape", b"evil\n")])],
        "dotdot_nested": [base, Layer([Entry.dir("a"), Entry.file("a/../../escape", b"evil\n")])],
        "absolute": [base, Layer([Entry.file("/etc/x", b"evil\n")])],
        "symlink_escape": [base, Layer([Entry.symlink("link", "/tmp"),
                                        Entry.file("link/evil", b"evil\n")])],
        "symlink_escape_relative": [base, Layer([Entry.symlink("up", "../../../../.."),
                                                 Entry.file("up/tmp/evil", b"evil\n")])],
        "hardlink_missing": [base, Layer([Entry.hardlink("hl", "does/not/exist")])],
        "hardlink_outside": [base, Layer([Entry.hardlink("hl", "../../etc/passwd")])],
        "huge_size_truncated": [base, Layer(raw_tar=huge_tar)],
        "truncated_gzip": [base, Layer(payload, compression="gzip", corrupt="truncate")],
        "corrupt_gzip": [base, Layer(payload, compression="gzip", corrupt="bitflip")],
    }


def build_awkward_layout(layout_dir, tag: str = "awkward", *, chunk_size: int = 64 * 1024,
                         compression: str = "gzip") -> ImageInfo:
    return build_oci_layout(layout_dir, tag, awkward_image_layers(chunk_size),
                            compression=compression)


def build_busybox_layout(layout_dir, tag: str = "busybox", *, compression: str = "gzip",
                         platforms: Sequence[str] | None = None) -> ImageInfo:
    return build_oci_layout(layout_dir, tag, busybox_image_layers(),
                            config_overrides=BUSYBOX_CONFIG, compression=compression,
                            platforms=platforms)


def remove_tree(path: str | os.PathLike) -> None:
    """rmtree that also copes with read-only dirs left by unpacked images."""
    def onerror(func, p, exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=onerror)
