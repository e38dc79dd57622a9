"""In-memory filesystem tree: what the converter builds and the bootstrap writer stores.

Names are bytes (tar names need not be UTF-8). A hardlink is the *same* `Inode`
object under several names; the writer gives it one EROFS inode and counts its
links. Directory entries never include "." and "..".
"""
from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import Iterator


@dataclass(eq=False)
class ChunkRef:
    """One chunk of a regular file: `size` plain bytes whose digest is `digest`.

    `blob_index`/`offset`/`ci_index` say where the chunk lives once blobs are laid
    out: index into the image's blob table, byte offset (4 KiB aligned) into that
    blob's uncompressed view, and position in the blob's compression-info array
    (what RAFS v6 chunk indexes carry for nydusd). -1 until placed.
    """
    digest: bytes
    size: int
    blob_index: int = -1
    offset: int = -1
    ci_index: int = -1


class FileKind:
    """Type predicates over `self.mode`, shared by the tree model and the EROFS reader's inodes."""
    mode: int

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)

    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


@dataclass(eq=False)
class Inode(FileKind):
    mode: int                       # full st_mode: type bits | permission bits (incl. suid/sgid/sticky)
    uid: int = 0
    gid: int = 0
    mtime: int = 0                  # seconds since the epoch
    mtime_nsec: int = 0
    size: int = 0                   # regular files; symlinks: len(symlink); dirs: computed by the writer
    rdev: int = 0                   # char/block devices: os.makedev(major, minor)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)   # full names, e.g. b"user.foo"
    symlink: bytes = b""            # symlink target
    chunks: list[ChunkRef | None] = field(default_factory=list)  # regular files; None = hole (zeros)
    entries: dict[bytes, "Inode"] = field(default_factory=dict)  # directories


def new_dir(mode: int = 0o755, **attrs) -> Inode:
    return Inode(mode=stat.S_IFDIR | mode, **attrs)


def walk(root: Inode, prefix: bytes = b"") -> Iterator[tuple[bytes, Inode]]:
    """Yield (path, inode) depth-first in sorted name order; the root is b"/"."""
    yield (prefix or b"/"), root
    for name in sorted(root.entries):
        child = root.entries[name]
        path = prefix + b"/" + name
        if child.is_dir():
            yield from walk(child, path)
        else:
            yield path, child


def lookup(root: Inode, path: bytes) -> Inode | None:
    node = root
    for part in path.strip(b"/").split(b"/"):
        if not part:
            continue
        if not node.is_dir():
            return None
        node = node.entries.get(part)
        if node is None:
            return None
    return node
