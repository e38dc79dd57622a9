"""Apply layer trees bottom-up into one image tree, the way containerd's unpack does.

containerd (overlayfs snapshotter) applies each layer into a fresh upper dir and
overlayfs merges it over the lower ones. So per layer: its whiteouts and opaque
markers hide what the lower layers hold at exactly that path, then its entries
overlay the result (a dir over a dir merges; anything else replaces), then
hardlinks into lower layers are resolved (containerd cannot unpack those at all;
this is what umoci makes of them). Whiteout entries never reach the merged tree.

Parent paths resolve symlinks of the layer itself only (`layer.resolve_dir`, run
while the layer is read): a lower layer's symlink or file where the layer has an
undeclared parent is replaced by a directory holding only the layer's entries,
with the attributes of the directory the symlink leads to (containerd's
mkparent), else 0755 root-owned. A whiteout below a lower symlink hides nothing.
"""
from __future__ import annotations

from rafs.tree import Inode, new_dir

from .layer import LayerError, LayerTree, join, resolve_dir

_DIR_ATTRS = ("mode", "uid", "gid", "mtime", "mtime_nsec", "xattrs")


def merge_layers(layers: list[tuple[str, LayerTree]]) -> Inode:
    root = new_dir(0o755)
    for name, layer in layers:
        apply_layer(root, layer, name)
    return root


def apply_layer(root: Inode, layer: LayerTree, name: str) -> None:
    for dir_path, hidden in layer.whiteouts.items():
        found = _lookup_dir(root, dir_path)
        if found is not None:
            for entry in hidden:
                found.entries.pop(entry, None)
    for dir_path in layer.opaque:
        found = _lookup_dir(root, dir_path)
        if found is not None:
            found.entries.clear()
    if layer.root_declared:
        _copy_dir_attrs(layer.root, root)
    _overlay(root, root, layer.root, b"", layer, name)
    for path, target_path in layer.outer_links:
        target_dir, _, target_base = target_path.rpartition(b"/")
        found = resolve_dir(root, target_dir.split(b"/"), name)
        target = found[0].entries.get(target_base) if found else None
        if target is None or target.is_dir():
            raise LayerError(f"{name}: hardlink {path!r} -> {target_path!r}: target does not exist")
        parent_path, _, base = path.rpartition(b"/")
        found = resolve_dir(root, parent_path.split(b"/"), name)
        if found is None:
            raise LayerError(f"{name}: hardlink {path!r}: parent is not a directory")
        found[0].entries[base] = target


def _lookup_dir(root: Inode, path: bytes) -> Inode | None:
    """The directory at `path` in the merged tree, following no symlink; None if there is none."""
    node = root
    for part in path.split(b"/") if path else ():
        node = node.entries.get(part)
        if node is None or not node.is_dir():
            return None
    return node


def _overlay(root: Inode, lower: Inode, upper: Inode, path: bytes, layer: LayerTree, name: str) -> None:
    """Overlay `upper` (at `path` in the layer) on `lower` (at `path` in the merged tree)."""
    for entry, up in upper.entries.items():
        child_path = join(path, entry)
        low = lower.entries.get(entry)
        implicit = child_path in layer.implicit_dirs
        if up.is_dir() and low is not None and low.is_dir():
            if not implicit:
                _copy_dir_attrs(up, low)
            _overlay(root, low, up, child_path, layer, name)
            continue
        if up.is_dir() and implicit and low is not None and low.is_symlink():
            where = f"{name}: tar entry {_below(child_path, up)!r} (below the lower layers' symlink {child_path!r})"
            _lower_dir_attrs(root, up, child_path, layer, where)
        lower.entries[entry] = up


def _lower_dir_attrs(root: Inode, node: Inode, path: bytes, layer: LayerTree, where: str) -> None:
    """containerd's mkparent for undeclared dir `node` (and those below it) replacing a lower
    symlink: each takes the attributes of the lower dir its path leads to, symlinks followed."""
    found = resolve_dir(root, path.split(b"/"), where, loops_fail=True)
    if found is None:
        return                  # nothing there: 0755 root-owned, and nothing below it either
    _copy_dir_attrs(found[0], node)
    node.xattrs = dict(node.xattrs)
    for entry, child in node.entries.items():
        child_path = join(path, entry)
        if child.is_dir() and child_path in layer.implicit_dirs:
            _lower_dir_attrs(root, child, child_path, layer, where)


def _below(path: bytes, node: Inode) -> bytes:
    """A path of some entry under the undeclared directory `node` at `path`, for messages."""
    while node.is_dir() and node.entries:
        name = min(node.entries)
        path, node = join(path, name), node.entries[name]
    return path


def _copy_dir_attrs(src: Inode, dst: Inode) -> None:
    for attr in _DIR_ATTRS:
        setattr(dst, attr, getattr(src, attr))
