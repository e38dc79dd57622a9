"""`nydusify check`: the converted tree is what a container sees after containerd's unpack of
the source, and every chunk verifies.

The expected side is the source's layer tars applied the way containerd's overlayfs
unpack applies them (`layer` + `merge`): not the tar headers where the two differ
(symlinks are 0777, the "./" entry is ignored, a hardlink entry's header is applied
to its inode, xattrs containerd or Linux refuse are gone, undeclared parents replace
lower symlinks and files; tests/integration/test_unpack_semantics.py holds both
against a real containerd). The actual side is the converted bootstrap's EROFS tree,
which is what every mount mode shows. File contents are compared as per-chunk
digest lists at the bootstrap's chunk size (a chunk index -> the chunk table entry at
that place of the blob), which `verify_blobs` then ties to the bytes: every blob's
sha256 is its id, every chunk the bootstrap's chunk table lists is fetched,
decompressed and checked against its digest, and the blob's own ToC and
compression-info array say the same about those chunks as the chunk table.
"""
from __future__ import annotations

import hashlib
import json
import stat
from dataclasses import dataclass

from rafs import blob as rblob
from rafs.blob import ChunkEntry
from rafs.bootstrap import Bootstrap
from rafs.errors import FormatError, IntegrityError
from rafs.image import media
from rafs.image.store import ImageStore, open_store
from rafs.tree import Inode, walk

from .layer import LayerReader, buffered
from .merge import merge_layers

from .nydus_image import NydusImage, load_manifest

BLOCK = 4096


@dataclass(frozen=True)
class Entry:
    kind: str
    mode: int
    uid: int
    gid: int
    mtime: tuple[int, int]
    size: int
    target: bytes
    rdev: int
    xattrs: tuple
    content: tuple        # chunk digests (hex); "hole" for a hole (never in what we write)

    def diff(self, other: "Entry") -> list[str]:
        out = []
        for name in self.__dataclass_fields__:
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                if name == "mode":
                    a, b = oct(a), oct(b)
                elif name == "content":
                    a, b = _first_diff(a, b)
                out.append(f"{name} {a} != {b}")
        return out


def _first_diff(a: tuple, b: tuple) -> tuple[str, str]:
    if len(a) != len(b):
        return f"{len(a)} chunks", f"{len(b)} chunks"
    i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return f"chunk {i} {a[i][:16]}", f"{b[i][:16]}"


_KINDS = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink", stat.S_IFCHR: "chardev",
          stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}


def _content(chunks) -> tuple:
    return tuple("hole" if c is None else c for c in chunks)


def source_entries(store: ImageStore, manifest: dict, chunk_size: int, digester: str):
    """What containerd's unpack of `manifest` shows, as entries and hardlink groups."""
    config = json.loads(store.get_bytes(manifest["config"]["digest"]))
    diff_ids = config["rootfs"]["diff_ids"]
    trees = []
    for i, layer in enumerate(manifest["layers"]):
        name = f"source layer {i} ({layer['digest']})"
        with store.open_blob(layer["digest"]) as raw:
            reader = LayerReader(name, chunk_size, digester, None)
            trees.append((name, reader.read(buffered(raw), diff_ids[i])))
    root = merge_layers(trees)
    return _tree_entries(root)


def _tree_entries(root: Inode):
    entries, groups = {}, {}
    for path, node in walk(root):
        entries[path] = Entry(_KINDS[node.kind], node.mode, node.uid, node.gid, (node.mtime, node.mtime_nsec),
                              node.size if not node.is_dir() else 0, node.symlink, node.rdev,
                              tuple(sorted(node.xattrs.items())),
                              _content(c.digest.hex() if c else None for c in node.chunks))
        if node.is_reg():
            groups.setdefault(id(node), []).append(path)
    return entries, _link_groups(groups)


def _link_groups(groups: dict) -> dict[bytes, tuple]:
    out = {}
    for paths in groups.values():
        if len(paths) > 1:
            for p in paths:
                out[p] = tuple(sorted(paths))
    return out


def target_entries(boot: Bootstrap, chunks: list[dict[int, ChunkEntry]] | None = None):
    """What the converted bootstrap shows. `chunks`: per blob, uncompressed offset -> entry
    (default: the bootstrap's chunk table, `BlobInfo.entries`)."""
    if chunks is None:
        chunks = [{e.uncompressed_offset: e for e in b.entries} for b in boot.meta.blobs]
    img = boot.erofs
    cs = boot.meta.chunk_size
    entries, groups = {}, {}
    stack = [(b"/", img.root_nid)]
    while stack:
        path, nid = stack.pop()
        info = img.inode(nid)
        kind = stat.S_IFMT(info.mode)
        content = ()
        if kind == stat.S_IFREG:
            content = _file_chunks(boot, nid, info.size, cs, chunks)
            groups.setdefault(nid, []).append(path)
        entries[path] = Entry(_KINDS[kind], info.mode, info.uid, info.gid, (info.mtime, info.mtime_nsec),
                              info.size if kind != stat.S_IFDIR else 0,
                              img.readlink(nid) if kind == stat.S_IFLNK else b"", info.rdev,
                              tuple(sorted(img.xattrs(nid).items())), content)
        if kind == stat.S_IFDIR:
            for name, child, _ in img.readdir(nid):
                stack.append(((b"" if path == b"/" else path) + b"/" + name, child))
    return entries, _link_groups(groups)


def _file_chunks(boot: Bootstrap, nid: int, size: int, cs: int, chunks: list[dict[int, ChunkEntry]]) -> tuple:
    """The digests (hex) of a file's chunks at chunk size `cs`, through its chunk indexes; a chunk
    index that leads to no chunk of the right size reads as a description of what it leads to."""
    out = []
    for ext in boot.file_extents(nid, 0, size) if size else ():
        for off in range(0, ext.length, cs):
            n = min(cs, ext.length - off)
            if ext.blob_index < 0:
                out.append("hole")
                continue
            where = ext.blob_offset + off
            entry = chunks[ext.blob_index].get(where)
            if entry is None or entry.uncompressed_size != n:
                out.append(f"no {n}-byte chunk at blob {ext.blob_index} offset {where}")
            else:
                out.append(entry.digest.hex())
    return tuple(out)


def compare(expected, actual) -> list[str]:
    (exp, exp_links), (act, act_links) = expected, actual
    problems = []
    for path in sorted(exp.keys() | act.keys()):
        p = path.decode("utf-8", "backslashreplace")
        if path not in act:
            problems.append(f"{p}: missing from the converted image")
        elif path not in exp:
            problems.append(f"{p}: only in the converted image")
        else:
            problems += [f"{p}: {d}" for d in exp[path].diff(act[path])]
            if exp_links.get(path) != act_links.get(path):
                problems.append(f"{p}: hardlink group {exp_links.get(path)} != {act_links.get(path)}")
    return problems


def verify_blobs(image: NydusImage) -> tuple[list[dict[int, ChunkEntry]], int]:
    """Verify every blob of the image: every chunk the bootstrap's chunk table lists decompresses
    to its digest (`rblob.decode_chunk`, the check every reader makes), the blob's ToC and
    compression-info array agree with the chunk table on those chunks, and its sha256 is its id
    (the OCI digest of the layer). Each blob is read once, front to back.

    Returns the chunks per blob (uncompressed offset -> entry) and how many were verified.
    IntegrityError / FormatError name the blob and the first thing found wrong.
    """
    found, count = [], 0
    for i, info in enumerate(image.bootstrap.meta.blobs):
        name = f"blob sha256:{info.blob_id}"
        read_at, size = image.blob_source(i)
        n, sha256 = _verify_blob_data(read_at, size, info, name)
        _check_blob_meta(read_at, size, info, name)
        if sha256 != info.blob_id:
            raise IntegrityError(f"{name}: sha256 of the blob is {sha256}, not its id")
        count += n
        found.append({e.uncompressed_offset: e for e in info.entries})
    return found, count


def _verify_blob_data(read_at, size: int, info, name: str, block: int = 4 << 20) -> tuple[int, str]:
    """One pass over the blob: each listed chunk decoded and checked on the way; returns how many,
    and the blob's sha256 (hex)."""
    h = hashlib.sha256()
    todo = sorted(info.entries, key=lambda e: e.compressed_offset)
    k = 0
    buf, buf_start = bytearray(), 0          # blob bytes from buf_start that a chunk still needs
    for off in range(0, size, block):
        data = read_at(off, min(block, size - off))
        h.update(data)
        buf += data
        end = off + len(data)
        while k < len(todo) and todo[k].compressed_end <= end:
            e = todo[k]
            payload = bytes(buf[e.compressed_offset - buf_start:e.compressed_end - buf_start])
            rblob.decode_chunk(e, payload, info.compressor, info.digester, name=name)
            k += 1
        keep = min(todo[k].compressed_offset, end) if k < len(todo) else end
        del buf[:keep - buf_start]
        buf_start = keep
    if k < len(todo):
        e = todo[k]
        raise FormatError(f"{name}: chunk #{e.index} ({e.compressed_offset}+{e.compressed_size}) runs past "
                          f"the end of the {size}-byte blob")
    return len(todo), h.hexdigest()


def _check_blob_meta(read_at, size: int, info, name: str) -> None:
    """The blob's ToC (its digest in the blob table) and its ci array / blob.digest describe each
    chunk of the chunk table exactly as the bootstrap does (`rblob.read_blob_meta` checks the
    ToC digest, the ci header against the blob table and the members' sha256s)."""
    own = rblob.read_blob_meta(read_at, size, info, name=name).entries
    for e in info.entries:
        if not 0 <= e.index < len(own):
            raise IntegrityError(f"{name}: the chunk table names ci entry {e.index}, the blob has {len(own)}")
        o = own[e.index]
        mine = (o.uncompressed_offset, o.uncompressed_size, o.compressed_offset, o.compressed_size, o.compressed)
        theirs = (e.uncompressed_offset, e.uncompressed_size, e.compressed_offset, e.compressed_size, e.compressed)
        if mine != theirs:
            raise IntegrityError(f"{name}: ci entry {e.index} says (uncompressed offset, size, compressed offset, "
                              f"size, compressed) = {mine}, the bootstrap's chunk table {theirs}")
        if any(o.digest) and o.digest != e.digest:
            raise IntegrityError(f"{name}: chunk {e.index}'s digest in the blob ({o.digest.hex()}) is not "
                                 f"the chunk table's ({e.digest.hex()})")


def check(source: str, target: str, *, plain_http: bool = False, platform: str | None = None,
          hosts_dir: str | None = None, source_insecure: bool = False,
          target_insecure: bool = False) -> tuple[list[str], dict]:
    """Differences between SOURCE and TARGET (empty: a faithful conversion) and what was verified.

    Every platform the target holds is checked against the source's manifest for
    that platform; without `platform`, a source platform that a target index
    lacks is a difference too. Problems of multi-platform targets start with the platform.
    """
    with open_store(source, plain_http=plain_http, hosts_dir=hosts_dir, insecure=source_insecure) as src, \
            open_store(target, plain_http=plain_http, hosts_dir=hosts_dir, insecure=target_insecure) as dst:
        dst_top, src_top = dst.resolve(), src.resolve()
        targets = dst.manifests_for(dst_top, platform)
        if not targets:
            raise FormatError(f"{target}: no manifest for platform {platform}")
        sources = src.manifests_for(src_top, platform)
        problems: list[str] = []
        stats = {"entries": 0, "chunks_verified": 0, "blobs": 0, "platforms": len(targets)}
        for plat, desc in targets:
            label = f"{plat}: " if len(targets) > 1 else ""
            matching = src.manifests_for(src_top, plat) if plat is not None else sources
            if not matching:
                problems.append(f"{plat}: in the converted image, not in the source")
                continue
            image = load_manifest(dst, desc)
            meta = image.bootstrap.meta
            manifest = json.loads(src.get_bytes(matching[0][1].digest))
            blob_chunks, chunks = verify_blobs(image)
            expected = source_entries(src, manifest, meta.chunk_size, meta.digester)
            actual = target_entries(image.bootstrap, blob_chunks)
            problems += [label + p for p in compare(expected, actual)]
            stats["entries"] += len(actual[0])
            stats["chunks_verified"] += chunks
            stats["blobs"] += len(blob_chunks)
        if platform is None and _is_index(dst_top):
            converted = {str(p) for p, _ in targets}
            problems += [f"{p}: missing from the converted image" for p, _ in sources if str(p) not in converted]
        return problems, stats


def _is_index(desc) -> bool:
    return desc.media_type in media.INDEX_TYPES
