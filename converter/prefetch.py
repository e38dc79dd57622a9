"""--prefetch-patterns: paths (files or directories) -> the files a mount fetches first."""
from __future__ import annotations

from rafs.tree import Inode, lookup, walk


def read_patterns(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def expand_prefetch(root: Inode, patterns: list[str]) -> list[bytes]:
    """Every existing regular file named by a pattern or lying under a named directory, in order, once."""
    out: list[bytes] = []
    seen: set[bytes] = set()
    for pattern in patterns:
        path = b"/" + pattern.encode("utf-8", "surrogateescape").strip(b"/")
        node = lookup(root, path)
        if node is None:
            continue
        if node.is_dir():
            files = [(path.rstrip(b"/") + p, n) for p, n in walk(node) if n.is_reg() and p != b"/"]
        else:
            files = [(path, node)] if node.is_reg() else []
        for p, _ in files:
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out
