"""`nydusify inspect`: what a converted image, bootstrap or blob file holds."""
from __future__ import annotations

import stat

from rafs import blob as rblob
from rafs.bootstrap import Bootstrap
from rafs.errors import RafsError

from .nydus_image import NydusImage

BLOCK = 4096


def feature_names(features: int) -> list[str]:
    """Blob feature bits (Nydus's storage/src/device.rs names) as names; unknown bits as hex."""
    known = {v: k[len("FEATURE_"):].lower() for k, v in vars(rblob).items()
             if k.startswith("FEATURE_") and isinstance(v, int) and v and not v & (v - 1)}
    out, rest = [], features
    for bit in sorted(known):
        if features & bit:
            out.append(known[bit])
            rest &= ~bit
    if rest:
        out.append(hex(rest))
    return out


def summarize(image: NydusImage) -> dict:
    boot = image.bootstrap
    meta = boot.meta
    counts = {"inodes": 0, "files": 0, "dirs": 0, "symlinks": 0, "other": 0, "hardlinked_files": 0}
    file_bytes = referenced = hole_bytes = 0
    unique: dict[tuple[int, int], int] = {}
    chunk_size = meta.chunk_size
    for nid, info in _inodes(boot):
        counts["inodes"] += 1
        kind = stat.S_IFMT(info.mode)
        if kind == stat.S_IFDIR:
            counts["dirs"] += 1
        elif kind == stat.S_IFLNK:
            counts["symlinks"] += 1
        elif kind == stat.S_IFREG:
            counts["files"] += 1
            counts["hardlinked_files"] += info.nlink > 1
            file_bytes += info.size
            for ext in boot.file_extents(nid, 0, info.size) if info.size else ():
                if ext.blob_index < 0:
                    hole_bytes += ext.length
                    continue
                referenced += ext.length
                # each chunk of the extent once, by where it lives (blob, 4 KiB block of its view)
                for off in range(ext.blob_offset, ext.blob_offset + ext.length, chunk_size):
                    n = min(chunk_size, ext.blob_offset + ext.length - off)
                    unique[(ext.blob_index, off // BLOCK)] = max(unique.get((ext.blob_index, off // BLOCK), 0), n)
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
        "blobs": [_blob(image, i, b) for i, b in enumerate(meta.blobs)],
        "prefetch": [_prefetch_line(e) for e in meta.prefetch],
    }
    if image.manifest:
        out["layers"] = [{"digest": l["digest"], "size": l["size"], "mediaType": l["mediaType"],
                          "kind": "bootstrap" if "nydus-bootstrap" in str(l.get("annotations")) else "blob"}
                         for l in image.manifest["layers"]]
    return out


def _blob(image: NydusImage, index: int, b) -> dict:
    out = {"id": b.blob_id, "compressed_size": b.compressed_size, "uncompressed_size": b.uncompressed_size,
           "chunks": b.chunk_count, "chunks_used": len(b.entries), "chunk_size": b.chunk_size,
           "compressor": b.compressor, "digester": b.digester,
           "features": f"{b.features:#x}", "feature_names": feature_names(b.features),
           "ci": {"compressor": b.ci_compressor, "offset": b.ci_offset, "compressed_size": b.ci_compressed_size,
                  "uncompressed_size": b.ci_uncompressed_size},
           "toc": {"size": b.blob_toc_size, "digest": b.blob_toc_digest}}
    if image.backend is not None:         # local files: is the blob there?
        try:
            out["local_size"] = image.backend.blob_size(b.blob_id)
        except (RafsError, OSError):
            out["local_size"] = None
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
            stack.extend(child for name, child, _ in img.readdir(nid) if name not in (b".", b".."))


def render(summary: dict) -> str:
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    lines = []
    for layer in summary.get("layers", []):
        lines.append(f"layer  {layer['kind']:9} {layer['digest']}  {mb(layer['size'])}")
    for i, b in enumerate(summary["blobs"]):
        local = ""
        if "local_size" in b:
            local = "  (missing from --blob-dir)" if b["local_size"] is None else f"  local file {mb(b['local_size'])}"
        lines.append(f"blob {i:<3} {b['id']}  compressed {mb(b['compressed_size'])}  "
                     f"uncompressed {mb(b['uncompressed_size'])}  {b['chunks']} chunks ({b['chunks_used']} used), "
                     f"{b['compressor']}/{b['digester']}, features {b['features']} "
                     f"({','.join(b['feature_names']) or 'none'}){local}")
    d = summary["dedup"]
    holes = f", holes {mb(d['hole_bytes'])}" if d["hole_bytes"] else ""
    lines += [
        f"inodes {summary['inodes']}: files {summary['files']}  dirs {summary['dirs']}  "
        f"symlinks {summary['symlinks']}  other {summary['other']}  ({summary['hardlinked_files']} hardlinked)",
        f"file data {mb(summary['file_bytes'])}; chunks referenced {mb(d['referenced_bytes'])}, stored once "
        f"{mb(d['unique_bytes'])} (dedup ratio {d['ratio']}){holes}",
        f"chunk size {summary['chunk_size']}  compressor {summary['compressor']}  digest {summary['digester']}",
        f"prefetch {len(summary['prefetch'])} entries" + "".join(f"\n  {p}" for p in summary["prefetch"][:20]),
    ]
    if "learned" in summary:
        lines.append(_learned_line(summary["learned"]))
    return "\n".join(lines)


def _learned_line(learned: dict | None) -> str:
    """The learned prefetch record (rafs.learned) next to the image, if any."""
    if learned is None:
        return "learned  none yet (made by the first mount that runs it; nydusify learned show REF)"
    if "error" in learned:
        return f"learned  cannot read: {learned['error']}"
    return (f"learned  {learned['tag']}: {learned['chunks']} chunks, {learned['bytes'] / 1e6:.1f} MB from "
            f"{learned['runs']} start(s){', PINNED' if learned['pinned'] else ''}; first files: "
            + ", ".join(learned["first_files"][:5]))
