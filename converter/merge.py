"""Apply layer trees bottom-up into one image tree, the way an OCI applier would.

Per layer: its whiteouts and opaque markers hide what the lower layers hold,
then its entries overlay the result (a dir over a dir merges; anything else
replaces), then hardlinks into lower layers are resolved. Whiteout entries
never reach the merged tree.
"""
from __future__ import annotations

from rafs.tree import Inode, lookup, new_dir

from .layer import LayerError, LayerTree, join

_DIR_ATTRS = ("mode", "uid", "gid", "mtime", "mtime_nsec", "xattrs")


def merge_layers(layers: list[tuple[str, LayerTree]]) -> Inode:
    root = new_dir(0o755)
    for name, layer in layers:
        apply_layer(root, layer, name)
    return root


def apply_layer(root: Inode, layer: LayerTree, name: str) -> None:
    for dir_path, hidden in layer.whiteouts.items():
        target = lookup(root, dir_path)
        if target is not None and target.is_dir():
            for entry in hidden:
                target.entries.pop(entry, None)
    for dir_path in layer.opaque:
        target = lookup(root, dir_path)
        if target is not None and target.is_dir():
            target.entries.clear()
    if layer.root_declared:
        _copy_dir_attrs(layer.root, root)
    _overlay(root, layer.root, b"", layer)
    for path, target_path in layer.outer_links:
        target = lookup(root, target_path)
        if target is None or target.is_dir():
            raise LayerError(f"{name}: hardlink {path!r} -> {target_path!r}: target does not exist")
        parent_path, _, base = path.rpartition(b"/")
        parent = lookup(root, parent_path)
        if parent is None or not parent.is_dir():
            raise LayerError(f"{name}: hardlink {path!r}: parent is not a directory")
        parent.entries[base] = target


def _overlay(lower: Inode, upper: Inode, path: bytes, layer: LayerTree) -> None:
    for name, up in upper.entries.items():
        child_path = join(path, name)
        low = lower.entries.get(name)
        if up.is_dir() and low is not None and low.is_dir():
            if child_path not in layer.implicit_dirs:
                _copy_dir_attrs(up, low)
            _overlay(low, up, child_path, layer)
        else:
            lower.entries[name] = up


def _copy_dir_attrs(src: Inode, dst: Inode) -> None:
    for attr in _DIR_ATTRS:
        setattr(dst, attr, getattr(src, attr))
