"""The full-pull fallback: when an image cannot be mounted lazily, download its blobs and unpack the tree.

    materialize(bootstrap_path, "127.0.0.1:5000/app:v1", dest, plain_http=True)

Every blob is downloaded whole (verified against its digest), every file is
read through the verifying blob reader (chunk digests from the bootstrap) and
written under ``dest/tree``, with modes, owners, times, xattrs, hard links,
symlinks and device nodes. The tree is built in ``dest/tree.tmp`` and renamed
when complete, so a half-built tree is never used. It is then an ordinary
lowerdir: containers of the image run without any mount daemon.
"""
from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

log = logging.getLogger("nydus-snapshotter")

TREE = "tree"


def materialized(dest: Path) -> Path | None:
    tree = dest / TREE
    return tree if tree.is_dir() else None


def materialize(bootstrap_path: Path, image_ref: str, dest: Path, *, plain_http: bool = False,
                docker_config_dir: str | None = None, hosts_dir: str | None = None,
                mirrors=()) -> tuple[Path, int]:
    """(tree dir, blob bytes downloaded)."""
    from rafs.blob import BlobReader
    from rafs.bootstrap import Bootstrap
    from rafs.image.refs import parse_ref
    from rafs.image.store import RegistryStore

    boot = Bootstrap.open(bootstrap_path)
    dest.mkdir(parents=True, exist_ok=True)
    tmp_tree = dest / (TREE + ".tmp")
    shutil.rmtree(tmp_tree, ignore_errors=True)
    blob_dir = Path(tempfile.mkdtemp(prefix=".blobs-", dir=dest))
    downloaded = 0
    kw = {"config_dir": docker_config_dir} if docker_config_dir else {}
    try:
        readers, files = [], []
        ref = parse_ref(image_ref)
        if mirrors:                  # the [[backend.mirrors]] first (MirrorConfigs), then containerd's hosts
            from rafs.storage.factory import store_hosts
            kw["hosts"] = store_hosts(ref.host, mirrors, hosts_dir=hosts_dir, plain_http=plain_http)
        with RegistryStore(ref, plain_http=plain_http, hosts_dir=hosts_dir, **kw) as store:
            for info in boot.meta.blobs:
                digest = "sha256:" + info.blob_id
                path = blob_dir / info.blob_id
                with store.open_blob(digest) as src, open(path, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                downloaded += path.stat().st_size
                f = open(path, "rb")
                files.append(f)
                readers.append(BlobReader.from_file(f, info))
        try:
            _write_tree(boot, readers, tmp_tree)
        finally:
            for f in files:
                f.close()
        os.rename(tmp_tree, dest / TREE)
    finally:
        shutil.rmtree(blob_dir, ignore_errors=True)
        shutil.rmtree(tmp_tree, ignore_errors=True)
    return dest / TREE, downloaded


def _safe_join(root: Path, path: bytes) -> Path:
    parts = [p for p in path.split(b"/") if p]
    if any(p in (b".", b"..") for p in parts):
        raise ValueError(f"unsafe path {path!r} in bootstrap")
    return Path(os.fsdecode(os.path.join(os.fsencode(root), *parts))) if parts else root


def _write_tree(boot, readers, root: Path) -> None:
    root.mkdir(mode=0o755)
    first_path: dict[int, Path] = {}
    dirs: list[tuple[Path, object]] = []
    for path, nid in boot.erofs.walk():
        info = boot.getattr(nid)
        target = _safe_join(root, path)
        kind = stat.S_IFMT(info.mode)
        if kind != stat.S_IFDIR and nid in first_path:            # a hard link
            os.link(first_path[nid], target)
            continue
        if kind == stat.S_IFDIR:
            if target != root:
                os.mkdir(target, 0o700)
            dirs.append((target, info))
        elif kind == stat.S_IFREG:
            with open(target, "wb") as out:
                for ext in boot.file_extents(nid, 0, info.size):
                    if ext.blob_index < 0:
                        out.seek(ext.length, os.SEEK_CUR)
                    else:
                        out.write(readers[ext.blob_index].read_range(ext.blob_offset, ext.length))
                out.truncate(info.size)
        elif kind == stat.S_IFLNK:
            os.symlink(boot.readlink(nid), target)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            os.mknod(target, info.mode, info.rdev)
        else:
            continue
        first_path[nid] = target
        if kind != stat.S_IFDIR:
            _set_meta(target, info, boot.xattrs(nid), kind == stat.S_IFLNK)
    for target, info in reversed(dirs):          # children first: their writes no longer touch times
        _set_meta(target, info, boot.xattrs(info.nid), False)


def _set_meta(target: Path, info, xattrs: dict, is_link: bool) -> None:
    os.lchown(target, info.uid, info.gid)
    for k, v in xattrs.items():
        try:
            os.setxattr(target, k, v, follow_symlinks=False)
        except OSError as e:
            log.debug("xattr %r on %s: %s", k, target, e)
    if not is_link:
        os.chmod(target, stat.S_IMODE(info.mode))
    ns = info.mtime * 1_000_000_000 + info.mtime_nsec
    os.utime(target, ns=(ns, ns), follow_symlinks=False)
