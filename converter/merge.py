"""Apply layer trees bottom-up into one image tree, the way an OCI applier would.

Per layer: its whiteouts and opaque markers hide what the lower layers hold,
then its entries overlay the result (a dir over a dir merges; anything else
replaces), then hardlinks into lower layers are resolved. Whiteout entries
never reach the merged tree.

Parent paths are resolved like an applier does (see `layer.resolve_dir`): a
parent the layer never declared that is a symlink below is followed inside
the root, so the symlink stays and the entries land where it points.
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
        found = resolve_dir(root, dir_path.split(b"/"), name)
        if found is not None:
            for entry in hidden:
                found[0].entries.pop(entry, None)
    for dir_path in layer.opaque:
        found = resolve_dir(root, dir_path.split(b"/"), name)
        if found is not None:
            found[0].entries.clear()
    if layer.root_declared:
        _copy_dir_attrs(layer.root, root)
    _overlay(root, root, layer.root, b"", b"", layer, name)
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


def _overlay(root: Inode, lower: Inode, upper: Inode, path: bytes, tree_path: bytes,
             layer: LayerTree, name: str) -> None:
    """Overlay `upper` (at `path` in the layer) on `lower` (at `tree_path` in the merged tree)."""
    for entry, up in upper.entries.items():
        child_path = join(path, entry)
        low = lower.entries.get(entry)
        implicit = child_path in layer.implicit_dirs
        if up.is_dir() and implicit and low is not None and low.is_symlink():
            where = f"{name}: tar entry {_below(child_path, up)!r} (below the lower layers' symlink {child_path!r})"
            target, target_path = resolve_dir(root, join(tree_path, entry).split(b"/"), where, set())
            _overlay(root, target, up, child_path, target_path, layer, name)
        elif up.is_dir() and low is not None and low.is_dir():
            if not implicit:
                _copy_dir_attrs(up, low)
            _overlay(root, low, up, child_path, join(tree_path, entry), layer, name)
        elif up.is_dir() and implicit and low is not None:
            raise LayerError(f"{name}: tar entry {_below(child_path, up)!r}: {child_path!r} is not a "
                             "directory in the lower layers")
        else:
            lower.entries[entry] = up


def _below(path: bytes, node: Inode) -> bytes:
    """A path of some entry under the undeclared directory `node` at `path`, for messages."""
    while node.is_dir() and node.entries:
        name = min(node.entries)
        path, node = join(path, name), node.entries[name]
    return path


def _copy_dir_attrs(src: Inode, dst: Inode) -> None:
    for attr in _DIR_ATTRS:
        setattr(dst, attr, getattr(src, attr))
