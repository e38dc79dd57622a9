"""The tree oracle: snapshot a real directory tree, compare two snapshots.

A snapshot maps a path (bytes, relative to the root, root itself = b".") to
an `EntryInfo`. Sources of snapshots:

* `snapshot_tree(dir)` - any directory: a umoci-unpacked rootfs, a FUSE or
  EROFS mount of a converted image, ...
* `tree_from_layers(layers)` - computed from an `images` spec alone by
  applying the OCI layer rules in Python (no tar, no umoci): a second,
  independent oracle.
* `umoci_unpack(layout, tag, dest)` - the reference unpacker.

`diff_trees` / `assert_trees_equal` compare two snapshots field by field;
`UMOCI_DIFF_OPTIONS` holds what a umoci rootfs cannot be compared on
(measured, see the constant).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from . import images as _img

ROOT = b"."

FIELDS = ("type", "mode", "uid", "gid", "mtime", "size", "sha256", "target",
          "xattrs", "rdev", "links")
# Pseudo-fields accepted by `ignore=`: "symlink_mtime" and "dir_mtime" (mtime
# of those types only), "perm" (mode bits 0o7777, the type is still compared).

_TYPE_OF = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink",
            stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
            stat.S_IFSOCK: "socket"}
_IFMT_OF = {v: k for k, v in _TYPE_OF.items()}


@dataclass(frozen=True)
class EntryInfo:
    type: str                         # dir file symlink char block fifo socket
    mode: int                         # full st_mode (type | 0o7777 incl. suid/sgid/sticky)
    uid: int
    gid: int
    mtime_ns: int | None              # None = unknown / not compared
    size: int | None                  # files and symlinks; None for others
    sha256: str | None                # files: hex digest of the content
    target: bytes | None              # symlinks
    xattrs: Mapping[bytes, bytes] = field(default_factory=dict)
    rdev: tuple[int, int] | None = None   # (major, minor) of char/block devices
    links: tuple[bytes, ...] | None = None  # sorted paths sharing this inode (>1), else None

    def __hash__(self):  # dict field: hash by identity-free content
        return hash((self.type, self.mode, self.uid, self.gid, self.mtime_ns, self.size,
                     self.sha256, self.target, tuple(sorted(self.xattrs.items())),
                     self.rdev, self.links))


Tree = dict[bytes, EntryInfo]


def display(path: bytes) -> str:
    """b"a/b" -> "/a/b" (undecodable bytes as \\xNN); root -> "/"."""
    if path == ROOT:
        return "/"
    return "/" + path.decode("utf-8", "backslashreplace").replace("\n", "\\n")


# --------------------------------------------------------------------------
# snapshot of a real tree
# --------------------------------------------------------------------------

def _read_xattrs(p: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(p, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for n in names:
        try:
            out[os.fsencode(n)] = os.getxattr(p, n, follow_symlinks=False)
        except OSError:
            continue
    return out


def _sha256_path(p: bytes) -> str:
    h = hashlib.sha256()
    with open(p, "rb", buffering=0) as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return h.hexdigest()


def snapshot_tree(root: str | os.PathLike | bytes, *, content: bool = True) -> Tree:
    """Walk `root` without following symlinks; see EntryInfo for the fields.

    content=False skips reading files (sha256 None) for metadata-only checks.
    """
    root_b = os.path.realpath(os.fsencode(root))
    out: Tree = {}
    by_ino: dict[tuple[int, int], list[bytes]] = {}
    stack = [ROOT]
    while stack:
        rel = stack.pop()
        full = root_b if rel == ROOT else os.path.join(root_b, rel)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            if rel == ROOT:
                raise
            continue        # listed, not there: an overlayfs whiteout in a directory that is not merged
        fmt = stat.S_IFMT(st.st_mode)
        kind = _TYPE_OF.get(fmt, f"unknown-{fmt:o}")
        size = sha = target = rdev = None
        if kind == "dir":
            for name in os.listdir(full):
                stack.append(name if rel == ROOT else rel + b"/" + name)
        else:
            if st.st_nlink > 1:
                by_ino.setdefault((st.st_dev, st.st_ino), []).append(rel)
            if kind == "file":
                size = st.st_size
                sha = _sha256_path(full) if content else None
            elif kind == "symlink":
                target = os.readlink(full)
                size = len(target)
            elif kind in ("char", "block"):
                rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        out[rel] = EntryInfo(kind, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, size,
                             sha, target, _read_xattrs(full), rdev)
    for paths in by_ino.values():
        if len(paths) > 1:
            group = tuple(sorted(paths))
            for p in paths:
                out[p] = dataclasses.replace(out[p], links=group)
    return out


# --------------------------------------------------------------------------
# the spec applied in Python
# --------------------------------------------------------------------------

class _Node:
    __slots__ = ("e",)

    def __init__(self, e: "_img.Entry"):
        self.e = e


def normalize_path(p: bytes) -> bytes:
    """Tar member name -> tree path: drop "./", "/" prefixes and "." parts.

    Raises ValueError for ".." components (callers test those separately).
    """
    parts = [x for x in p.split(b"/") if x not in (b"", b".")]
    if b".." in parts:
        raise ValueError(f"'..' in {p!r}")
    return b"/".join(parts) or ROOT


def _parent(p: bytes) -> bytes:
    head, _, _ = p.rpartition(b"/")
    return head or ROOT


def unpacked_xattr(kind: str, name: bytes) -> bool:
    """Whether containerd's unpack keeps xattr `name` on an entry of `kind`: it never sets
    trusted.* ("admin attributes from archive not supported"), and skips what Linux refuses:
    user.* on anything but files and dirs, POSIX ACLs on symlinks."""
    if name.startswith(b"trusted."):
        return False
    if name.startswith(b"user.") and kind not in ("file", "dir"):
        return False
    return not (name.startswith(b"system.posix_acl_") and kind == "symlink")


def tree_from_layers(layers: Sequence, *, implicit_dir_mode: int = 0o755,
                     keep_empty_xattrs: bool = False) -> Tree:
    """Apply `images` layer specs with containerd's rules, without tar or an unpacker.

    Per layer: whiteouts and opaque markers act on the lower layers only
    (their position in the layer does not matter); then entries are applied
    in order. A re-declared directory keeps its children; anything replacing
    a directory drops its subtree; a hardlink shares its target's inode and
    re-applies its own header to it, as containerd does (uid/gid, which drops
    security.capability, xattrs added, mode unless a symlink, mtime). Parents not
    declared anywhere become dirs with `implicit_dir_mode`, root-owned, mtime
    unknown (None). Symlinks are 0777; xattrs containerd does not set are left
    out (`unpacked_xattr`). Symlinks in parent paths are not modelled.

    An xattr with an empty value is left out unless keep_empty_xattrs: POSIX
    says an empty PAX record deletes the keyword, and Go's archive/tar (umoci,
    containerd) drops it, while GNU tar 1.34 creates the empty xattr.
    """
    state: dict[bytes, _Node | None] = {}   # None = implicit dir

    def drop_subtree(p: bytes, keep_self: bool = False):
        pre = b"" if p == ROOT else p + b"/"
        for k in [k for k in state if k.startswith(pre) and k != ROOT]:
            del state[k]
        if not keep_self:
            state.pop(p, None)

    def is_dir(p):
        return p in state and (state[p] is None or state[p].e.kind == _img.DIR)

    def ensure_parents(p):
        par = _parent(p)
        if par == ROOT:
            return
        if not is_dir(par):
            ensure_parents(par)
            if par in state:
                drop_subtree(par)
            state[par] = None

    for spec in layers:
        entries = _img.as_layer(spec).entries
        for e in entries:
            if e.kind == _img.WHITEOUT:
                drop_subtree(normalize_path(e.path))
            elif e.kind == _img.OPAQUE:
                drop_subtree(normalize_path(e.path), keep_self=True)
        for e in entries:
            if e.kind in (_img.WHITEOUT, _img.OPAQUE):
                continue
            p = normalize_path(e.path)
            if p == ROOT:
                continue
            ensure_parents(p)
            if e.kind == _img.DIR:
                if p in state and not is_dir(p):
                    del state[p]
                state[p] = _Node(e)
                continue
            if is_dir(p):
                drop_subtree(p)
            if e.kind == _img.HARDLINK:
                t = normalize_path(e.target)
                node = state.get(t)
                if node is None or node.e.kind == _img.DIR:
                    raise ValueError(f"hardlink {e.path!r} -> {e.target!r}: no such file")
                old = node.e
                xattrs = {k: v for k, v in old.xattrs.items() if k != b"security.capability"}
                node.e = dataclasses.replace(
                    old, uid=e.uid, gid=e.gid, mtime_ns=e.mtime_ns, xattrs={**xattrs, **e.xattrs},
                    mode=old.mode if old.kind == _img.SYMLINK else e.mode)
                state[p] = node
            else:
                state[p] = _Node(e)

    groups: dict[int, list[bytes]] = {}
    for p, node in state.items():
        if node is not None and node.e.kind != _img.DIR:
            groups.setdefault(id(node), []).append(p)
    out: Tree = {ROOT: EntryInfo("dir", stat.S_IFDIR | 0o755, 0, 0, None, None, None, None)}
    for p, node in state.items():
        if node is None:
            out[p] = EntryInfo("dir", stat.S_IFDIR | implicit_dir_mode, 0, 0, None,
                               None, None, None)
            continue
        e = node.e
        kind = {_img.FILE: "file", _img.DIR: "dir", _img.SYMLINK: "symlink",
                _img.CHAR: "char", _img.BLOCK: "block", _img.FIFO: "fifo"}[e.kind]
        perm = 0o777 if kind == "symlink" else e.mode & 0o7777
        g = groups.get(id(node), ())
        out[p] = EntryInfo(
            type=kind, mode=_IFMT_OF[kind] | perm, uid=e.uid, gid=e.gid, mtime_ns=e.mtime_ns,
            size=(e.content.size if kind == "file" else
                  len(e.target) if kind == "symlink" else None),
            sha256=e.content.sha256() if kind == "file" else None,
            target=e.target if kind == "symlink" else None,
            xattrs={k: v for k, v in e.xattrs.items()
                    if (v or keep_empty_xattrs) and unpacked_xattr(kind, k)},
            rdev=(e.major, e.minor) if kind in ("char", "block") else None,
            links=tuple(sorted(g)) if len(g) > 1 else None)
    return out


# --------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------

def _as_tree(t) -> Tree:
    if isinstance(t, Mapping):
        return t
    return snapshot_tree(t)


def _xattr_ignored(name: bytes, patterns: Sequence[bytes]) -> bool:
    for pat in patterns:
        if pat.endswith(b"*"):
            if name.startswith(pat[:-1]):
                return True
        elif name == pat:
            return True
    return False


def _short(v) -> str:
    if isinstance(v, bytes):
        r = repr(v)
        return r if len(r) <= 60 else r[:57] + "...'"
    return repr(v)


def diff_trees(expected, actual, *, ignore: Iterable[str] = (),
               ignore_root: Iterable[str] = ("mtime",),
               ignore_xattrs: Iterable[str | bytes] = (),
               ignore_paths: Iterable[str | bytes] = (),
               mtime_resolution_ns: int = 1) -> list[str]:
    """Readable differences between two snapshots (or directories), sorted by path.

    ignore: field names (FIELDS, plus "perm", "symlink_mtime", "dir_mtime")
    never compared. ignore_root: fields not compared on the root directory.
    ignore_xattrs: xattr names, or prefixes ending in "*", left out of both
    sides. ignore_paths: paths (relative, bytes or str) skipped with their
    subtrees. mtime_resolution_ns: compare mtimes truncated to this unit.
    An expected mtime of None is not compared.
    """
    exp, act = _as_tree(expected), _as_tree(actual)
    ignore = set(ignore)
    ignore_root = set(ignore_root)
    xpat = [os.fsencode(x) for x in ignore_xattrs]
    skip = [normalize_path(os.fsencode(p)) for p in ignore_paths]

    def skipped(p: bytes) -> bool:
        return any(p == s or p.startswith(s + b"/") for s in skip if s != ROOT)

    out: list[str] = []
    for p in sorted(set(exp) | set(act)):
        if skipped(p):
            continue
        e, a = exp.get(p), act.get(p)
        where = display(p)
        if a is None:
            out.append(f"{where}: missing (expected {e.type})")
            continue
        if e is None:
            out.append(f"{where}: unexpected {a.type}")
            continue
        ign = ignore | (ignore_root if p == ROOT else set())
        if "type" not in ign and e.type != a.type:
            out.append(f"{where}: type {e.type} != {a.type}")
            continue
        if "mode" not in ign:
            if "perm" in ign:
                if stat.S_IFMT(e.mode) != stat.S_IFMT(a.mode):
                    out.append(f"{where}: mode {e.mode:#o} != {a.mode:#o}")
            elif e.mode != a.mode:
                out.append(f"{where}: mode {e.mode:#o} != {a.mode:#o}")
        for f in ("uid", "gid"):
            if f not in ign and getattr(e, f) != getattr(a, f):
                out.append(f"{where}: {f} {getattr(e, f)} != {getattr(a, f)}")
        if ("mtime" not in ign and e.mtime_ns is not None
                and not (e.type == "symlink" and "symlink_mtime" in ign)
                and not (e.type == "dir" and "dir_mtime" in ign)):
            r = mtime_resolution_ns
            if a.mtime_ns is None or e.mtime_ns // r != a.mtime_ns // r:
                out.append(f"{where}: mtime_ns {e.mtime_ns} != {a.mtime_ns}")
        if "size" not in ign and e.size != a.size:
            out.append(f"{where}: size {e.size} != {a.size}")
        if "sha256" not in ign and e.sha256 != a.sha256 and None not in (e.sha256, a.sha256):
            out.append(f"{where}: content sha256 {e.sha256[:16]}.. != {a.sha256[:16]}..")
        if "target" not in ign and e.target != a.target:
            out.append(f"{where}: symlink target {_short(e.target)} != {_short(a.target)}")
        if "rdev" not in ign and e.rdev != a.rdev:
            out.append(f"{where}: rdev {e.rdev} != {a.rdev}")
        if "links" not in ign and e.links != a.links:
            fmt = (lambda g: None if g is None else [display(x) for x in g])
            out.append(f"{where}: hardlinks {fmt(e.links)} != {fmt(a.links)}")
        if "xattrs" not in ign:
            ex = {k: v for k, v in e.xattrs.items() if not _xattr_ignored(k, xpat)}
            ax = {k: v for k, v in a.xattrs.items() if not _xattr_ignored(k, xpat)}
            for k in sorted(set(ex) | set(ax)):
                n = k.decode("utf-8", "backslashreplace")
                if k not in ax:
                    out.append(f"{where}: xattr {n} missing")
                elif k not in ex:
                    out.append(f"{where}: xattr {n} unexpected ({_short(ax[k])})")
                elif ex[k] != ax[k]:
                    out.append(f"{where}: xattr {n} {_short(ex[k])} != {_short(ax[k])}")
    return out


def assert_trees_equal(expected, actual, *, max_report: int = 30, **kw) -> None:
    """diff_trees(...) must be empty; else AssertionError with the first differences."""
    diffs = diff_trees(expected, actual, **kw)
    if diffs:
        more = f"\n... and {len(diffs) - max_report} more" if len(diffs) > max_report else ""
        raise AssertionError(f"{len(diffs)} difference(s) between trees (expected != actual):\n"
                             + "\n".join(diffs[:max_report]) + more)


# --------------------------------------------------------------------------
# umoci
# --------------------------------------------------------------------------

# What a root `umoci unpack` (umoci 0.4.7) cannot be compared on, measured
# against tree_from_layers() of awkward_image_layers() by
# tests/unit/test_helpers_images.py::test_umoci_limits_are_as_recorded:
# the root's mtime, and trusted.* xattrs, which umoci sets and containerd (the
# unpack the converter follows) refuses. Where else umoci and containerd differ
# (a hardlink entry's own header, lower-layer symlinks in undeclared parents, the
# "./" entry) is in tests/integration/test_unpack_semantics.py.
UMOCI_DIFF_OPTIONS: dict = dict(
    ignore_root=("mtime",),
    ignore_xattrs=("trusted.*",),
)


class UmociError(RuntimeError):
    pass


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / digest.replace(":", "/", 1)


def _umoci_compatible_layout(layout: Path, tag: str, platform: str | None,
                             scratch: Path) -> Path | None:
    """umoci 0.4.7 refuses tags that point at an image index ("tag is
    ambiguous") and tar+zstd layers ("blob is not correct mediatype"). For
    those, write a single-manifest gzip twin of the image into `scratch`
    (same tar streams, so the same diff_ids and the same tree) and return it;
    None when the layout can be used as is.
    """
    import gzip
    import json

    import zstandard

    top = json.loads((layout / "index.json").read_text())
    descs = [d for d in top["manifests"]
             if d.get("annotations", {}).get(_img.REF_NAME) == tag]
    if len(descs) != 1:
        return None  # let umoci report it
    desc = descs[0]
    if desc["mediaType"] == _img.MEDIA_INDEX:
        want = platform or _img.host_platform()
        sub = json.loads(_blob(layout, desc["digest"]).read_text())
        cands = [m for m in sub["manifests"] if "/".join(
            x for x in (m.get("platform", {}).get("os"), m.get("platform", {}).get("architecture"),
                        m.get("platform", {}).get("variant")) if x) == want]
        if not cands:
            raise UmociError(f"{layout}:{tag}: no manifest for platform {want}")
        desc = cands[0]
    manifest = json.loads(_blob(layout, desc["digest"]).read_text())
    zstd_layers = [l for l in manifest["layers"] if l["mediaType"].endswith("+zstd")]
    if desc is descs[0] and not zstd_layers:
        return None

    (scratch / "blobs" / "sha256").mkdir(parents=True)
    (scratch / "oci-layout").write_text((layout / "oci-layout").read_text())

    def link(digest):
        dst = _blob(scratch, digest)
        if not dst.exists():
            os.link(_blob(layout, digest), dst)

    link(manifest["config"]["digest"])
    for l in manifest["layers"]:
        if not l["mediaType"].endswith("+zstd"):
            link(l["digest"])
            continue
        tmp = scratch / "blobs" / "sha256" / ".tmp"
        h = hashlib.sha256()
        with open(_blob(layout, l["digest"]), "rb") as src, open(tmp, "wb") as out:
            with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=1,
                               mtime=0) as gz:
                with zstandard.ZstdDecompressor().stream_reader(src) as zr:
                    while piece := zr.read(1 << 20):
                        gz.write(piece)
        with open(tmp, "rb") as f:
            while piece := f.read(1 << 20):
                h.update(piece)
        l["digest"] = "sha256:" + h.hexdigest()
        l["size"] = tmp.stat().st_size
        l["mediaType"] = l["mediaType"].replace("+zstd", "+gzip")
        os.replace(tmp, _blob(scratch, l["digest"]))
    raw = _img.canonical_json(manifest)
    mdigest, msize = _img.put_blob(scratch, raw)
    new_desc = {"mediaType": _img.MEDIA_MANIFEST, "digest": mdigest, "size": msize,
                "annotations": {_img.REF_NAME: tag}}
    (scratch / "index.json").write_text(json.dumps(
        {"schemaVersion": 2, "mediaType": _img.MEDIA_INDEX, "manifests": [new_desc]}))
    return scratch


def umoci_unpack(layout_dir: str | os.PathLike, tag: str, dest: str | os.PathLike,
                 *, platform: str | None = None) -> Path:
    """`umoci unpack --image LAYOUT:TAG DEST` (as root); returns DEST/rootfs.

    DEST must not exist yet. Multi-platform tags (image index) unpack the
    manifest for `platform` (default: the host's); zstd layers are handled by
    unpacking a gzip twin (umoci 0.4.7 supports neither). Raises UmociError
    with umoci's stderr on failure.
    """
    import shutil

    layout, dest = Path(layout_dir), Path(dest)
    scratch = dest.parent / f".{dest.name}.umoci-layout"
    try:
        use = _umoci_compatible_layout(layout, tag, platform, scratch) or layout
        proc = subprocess.run(["umoci", "unpack", "--image", f"{use}:{tag}", str(dest)],
                              capture_output=True, text=True, errors="replace")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if proc.returncode != 0:
        raise UmociError(f"umoci unpack {layout_dir}:{tag} failed ({proc.returncode}):\n"
                         f"{proc.stderr.strip()}")
    return dest / "rootfs"
