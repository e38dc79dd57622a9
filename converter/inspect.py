"""`nydusify inspect`: what a converted image or bootstrap holds."""
from __future__ import annotations

import stat

from rafs.bootstrap import Bootstrap

from .nydus_image import NydusImage

BLOCK = 4096


def summarize(image: NydusImage) -> dict:
    boot = image.bootstrap
    meta = boot.meta
    counts = {"files": 0, "dirs": 0, "symlinks": 0, "other": 0, "hardlinked_files": 0}
    file_bytes = referenced = hole_bytes = 0
    unique: dict[tuple[int, int], int] = {}
    chunk_size = meta.chunk_size
    for nid, info in _inodes(boot):
        kind = stat.S_IFMT(info.mode)
        if kind == stat.S_IFDIR:
            counts["dirs"] += 1
        elif kind == stat.S_IFLNK:
            counts["symlinks"] += 1
        elif kind == stat.S_IFREG:
            counts["files"] += 1
            counts["hardlinked_files"] += info.nlink > 1
            file_bytes += info.size
            for i, idx in enumerate(boot.erofs.chunk_indexes(nid)):
                size = min(chunk_size, info.size - i * chunk_size)
                if idx is None:
                    hole_bytes += size
                else:
                    referenced += size
                    unique[idx] = size
        else:
            counts["other"] += 1
    stored = sum(unique.values())
    out = {
        "chunk_size": chunk_size,
        "compressor": meta.compressor,
        "digester": meta.digester,
        **counts,
        "file_bytes": file_bytes,
        "dedup": {"referenced_bytes": referenced, "unique_bytes": stored, "hole_bytes": hole_bytes,
                  "ratio": round(referenced / stored, 3) if stored else 1.0},
        "blobs": [{"id": b.blob_id, "compressed_size": b.compressed_size, "uncompressed_size": b.uncompressed_size,
                   "chunks": b.chunk_count, "compressor": b.compressor} for b in meta.blobs],
        "prefetch": [_prefetch_line(e) for e in meta.prefetch],
    }
    if image.manifest:
        out["layers"] = [{"digest": l["digest"], "size": l["size"], "mediaType": l["mediaType"],
                          "kind": "bootstrap" if "nydus-bootstrap" in str(l.get("annotations")) else "blob"}
                         for l in image.manifest["layers"]]
    return out


def _prefetch_line(e) -> str:
    """An entry as a --prefetch-patterns line: PATH, or PATH<TAB>OFFSET+LENGTH,..."""
    path = e.path.decode("utf-8", "backslashreplace")
    return path if e.ranges is None else path + "\t" + ",".join(f"{o}+{n}" for o, n in e.ranges)


def _inodes(boot: Bootstrap):
    """Each inode once (hardlinks counted once), with its info."""
    img, seen, stack = boot.erofs, set(), [boot.erofs.root_nid]
    while stack:
        nid = stack.pop()
        if nid in seen:
            continue
        seen.add(nid)
        info = img.inode(nid)
        yield nid, info
        if stat.S_ISDIR(info.mode):
            stack.extend(child for _, child, _ in img.readdir(nid))


def render(summary: dict) -> str:
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    lines = []
    for layer in summary.get("layers", []):
        lines.append(f"layer  {layer['kind']:9} {layer['digest']}  {mb(layer['size'])}")
    for i, b in enumerate(summary["blobs"]):
        lines.append(f"blob {i:<3} {b['id'][:16]}  compressed {mb(b['compressed_size'])}  "
                     f"uncompressed {mb(b['uncompressed_size'])}  {b['chunks']} chunks ({b['compressor']})")
    d = summary["dedup"]
    lines += [
        f"files {summary['files']}  dirs {summary['dirs']}  symlinks {summary['symlinks']}  other {summary['other']}"
        f"  ({summary['hardlinked_files']} hardlinked)",
        f"file data {mb(summary['file_bytes'])}; chunks referenced {mb(d['referenced_bytes'])}, stored once "
        f"{mb(d['unique_bytes'])} (dedup ratio {d['ratio']}), zero holes {mb(d['hole_bytes'])}",
        f"chunk size {summary['chunk_size']}  compressor {summary['compressor']}  digest {summary['digester']}",
        f"prefetch {len(summary['prefetch'])} files" + "".join(f"\n  {p}" for p in summary["prefetch"][:20]),
    ]
    return "\n".join(lines)
