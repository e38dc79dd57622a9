"""One layer tar stream -> a layer tree plus its chunks.

The tar is read once, streaming (gzip, zstd or plain, detected by magic), so
memory stays bounded by one chunk per worker whatever the layer's size. Each
regular file is cut into fixed-size chunks. An all-zero chunk is an ordinary
chunk (RAFS v6 has no holes: Nydus rejects a chunk index without a blob), and
like every repeated chunk it is stored once. What happens to a chunk's bytes is the `ChunkSink`'s business: the converter
compresses and stages them, `check` only needs their digests.

Whiteouts are not tree entries: they are recorded beside the tree and applied
by `merge`, because OCI says a whiteout hides only what lower layers hold.

The tree holds what containerd's unpack (archive.Apply onto overlayfs, as root)
shows, not the tar headers where the two differ (`tests/integration/
test_unpack_semantics.py` compares both with a real containerd):
- a symlink is always 0777 (Linux has no lchmod; the header's mode is ignored);
- the "./" entry is ignored (the rootfs root is the snapshotter's 0755 root-owned
  dir; only its mtime, which the unpack leaves undefined, is taken);
- a hardlink entry re-applies its own header to the shared inode (lchown, which
  drops security.capability, then xattrs, chmod and mtime, as containerd does);
- xattrs the kernel or containerd refuse are dropped: trusted.* (containerd never
  sets them), user.* except on regular files and directories, ACLs on symlinks;
- undeclared parents are 0755 root-owned dirs (merge keeps a lower dir's attrs).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import posixpath
import queue
import stat
import tarfile
import threading
import zlib
from dataclasses import dataclass, field
from decimal import Decimal
from typing import BinaryIO, Protocol

import zstandard

from rafs import digest as digests
from rafs.tree import ChunkRef, Inode, new_dir

from .tarstream import Member, TarStream

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
XATTR_PAX_PREFIX = "SCHILY.xattr."
_READ_BLOCK = 1 << 20
_RAW_BLOCK = 4 << 20                # compressed bytes per zlib call
_PLAIN_BLOCK = 16 << 20             # decompressed bytes per hand-off to the tar parser (fewer, larger views)
MAX_SYMLINKS = 40                   # symlinks followed while resolving one parent path (Linux's limit)


class LayerError(ValueError):
    """A layer that cannot be applied safely; the message names the layer and entry."""


class ChunkSink(Protocol):
    def add(self, data: bytes, digest: bytes) -> None:
        """Called once per distinct chunk of the layer (all-zero ones too), in first-seen order."""


@dataclass
class LayerTree:
    root: Inode = field(default_factory=lambda: new_dir(0o755))
    # Paths are b"/"-joined, relative, without leading slash ("" = root).
    implicit_dirs: set[bytes] = field(default_factory=set)        # parents the tar never declared
    whiteouts: dict[bytes, set[bytes]] = field(default_factory=dict)   # dir -> names hidden below
    opaque: set[bytes] = field(default_factory=set)                # dirs hiding all lower children
    outer_links: list[tuple[bytes, bytes]] = field(default_factory=list)  # (path, target) into lower layers
    root_declared: bool = False


def open_decompressed(raw: BinaryIO) -> BinaryIO:
    """Wrap a layer stream by its magic: gzip, zstd or a plain tar."""
    head = _peek(raw, 4)
    if head[:2] == b"\x1f\x8b":
        return _Gunzip(raw)
    if head == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_size=_RAW_BLOCK, read_across_frames=True)
    return raw


class _Gunzip(io.RawIOBase):
    """A gzip stream, like GzipFile reads it (members back to back, zero padding
    between and after them), but decompressed a large block per zlib call.

    Each zlib call releases the GIL once; GzipFile feeds zlib 8 KiB at a time, so
    a thread decompressing with it starves behind a busy Python thread. zlib checks
    every member's header, CRC-32 and length; any damage is a `gzip.BadGzipFile`
    (an OSError), a cut stream an EOFError.
    """

    def __init__(self, raw: BinaryIO):
        super().__init__()
        self._raw = raw
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._in = b""              # compressed bytes not given to zlib yet
        self._eof = False

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = _READ_BLOCK
        while n and not self._eof:
            if self._z.eof:
                self._next_member()
                continue
            if not self._in:
                self._in = self._raw.read(_RAW_BLOCK)
                if not self._in:
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
            try:
                out = self._z.decompress(self._in, n)
            except zlib.error as e:
                what = "CRC check failed" if "incorrect data check" in str(e) else "corrupt gzip data"
                raise gzip.BadGzipFile(f"{what} ({e})") from None
            # at a member's end what follows is in unused_data (3.11 leaves a copy in unconsumed_tail)
            self._in = b"" if self._z.eof else self._z.unconsumed_tail
            if out:
                return out
        return b""

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def _next_member(self) -> None:
        rest = self._z.unused_data + self._in
        while len(rest.lstrip(b"\x00")) < 2:
            more = self._raw.read(_READ_BLOCK)
            if not more:
                if rest.lstrip(b"\x00"):
                    raise gzip.BadGzipFile(f"trailing garbage after the gzip data: {rest.lstrip(bytes(1))!r}")
                self._eof = True
                return
            rest = rest.lstrip(b"\x00") + more
        rest = rest.lstrip(b"\x00")
        if rest[:2] != b"\x1f\x8b":
            raise gzip.BadGzipFile(f"trailing garbage after the gzip data: {rest[:8]!r}")
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._in = rest


def buffered(raw: BinaryIO, on_read=None) -> io.BufferedReader:
    """Any readable stream -> a buffered one (tarfile and magic sniffing need it); reports bytes read."""
    return io.BufferedReader(_RawAdapter(raw, on_read), _READ_BLOCK)


class _RawAdapter(io.RawIOBase):
    def __init__(self, inner, on_read):
        self.inner, self.on_read = inner, on_read

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.inner.read(len(b))
        b[: len(data)] = data
        if self.on_read:
            self.on_read(len(data))
        return len(data)


def _peek(raw: BinaryIO, n: int) -> bytes:
    if hasattr(raw, "peek"):
        return raw.peek(n)[:n]
    raise TypeError("layer stream must be buffered (io.BufferedReader)")


def split_path(name: bytes, layer: str) -> list[bytes]:
    """Tar name -> path components; rejects anything that could leave the root."""
    if name.startswith(b"/"):
        raise LayerError(f"{layer}: absolute path in tar entry {name!r}")
    parts = [p for p in name.split(b"/") if p not in (b"", b".")]
    if b".." in parts:
        raise LayerError(f"{layer}: tar entry {name!r} escapes the root with '..'")
    return parts


def _raw(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _mtime(ti: Member) -> tuple[int, int]:
    text = ti.pax.get("mtime")
    if text:
        value = Decimal(text)
        sec = int(value // 1)
        return sec, int((value - sec) * 1_000_000_000)
    return int(ti.mtime), 0


def _xattrs(ti: Member, kind: int) -> dict[bytes, bytes]:
    # An empty PAX value deletes the keyword (POSIX pax), so an empty xattr record sets nothing.
    if not ti.pax:
        return {}
    return {name: value for name, value in
            ((_raw(key[len(XATTR_PAX_PREFIX):]), _raw(value))
             for key, value in ti.pax.items() if key.startswith(XATTR_PAX_PREFIX) and value)
            if unpacked_xattr(kind, name)}


def unpacked_xattr(kind: int, name: bytes) -> bool:
    """Whether containerd's unpack leaves xattr `name` on a file of type `kind` (S_IFxxx).

    containerd refuses trusted.* from archives ("admin attributes"); Linux allows
    user.* only on regular files and directories, and no POSIX ACL on a symlink;
    containerd skips those with a warning.
    """
    if name.startswith(b"trusted."):
        return False
    if name.startswith(b"user.") and kind not in (stat.S_IFREG, stat.S_IFDIR):
        return False
    if name.startswith(b"system.posix_acl_") and kind == stat.S_IFLNK:
        return False
    return True


def unpacked_mode(kind: int, header_mode: int) -> int:
    """st_mode after unpack: a symlink's permission bits are always 0777 on Linux."""
    return kind | (0o777 if kind == stat.S_IFLNK else header_mode & 0o7777)


_TYPES = {
    tarfile.REGTYPE: stat.S_IFREG, tarfile.AREGTYPE: stat.S_IFREG, tarfile.CONTTYPE: stat.S_IFREG,
    tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK, tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK, tarfile.FIFOTYPE: stat.S_IFIFO,
}


class LayerReader:
    """Builds a `LayerTree` from one tar stream, feeding distinct chunks to a sink."""

    def __init__(self, name: str, chunk_size: int, digester: str, sink: ChunkSink | None,
                 seen: set[bytes] | None = None, progress=None):
        self.name = name
        self.chunk_size = chunk_size
        self.digester = digester
        self.sink = sink
        self.seen = set() if seen is None else seen   # digests already given to the sink
        self.tree = LayerTree()
        self.progress = progress
        # The parent dir of the last entry: most entries share it. Valid while no entry
        # replaces or removes a node (a new one changes no existing path's resolution).
        self._dir_key: bytes | None = None
        self._dir_hit: tuple[Inode, bytes] | None = None

    def read(self, raw: BinaryIO, diff_id: str | None = None) -> LayerTree:
        """Reads the whole stream; `diff_id` (sha256 of the plain tar) is checked when given."""
        stream = _ReadAhead(open_decompressed(raw), _PLAIN_BLOCK, depth=2)
        try:
            self.read_plain(stream.next_block)
        finally:
            stream.close()          # stops and joins the helper before the caller touches `raw` again
        if diff_id and diff_id != "sha256:" + stream.sha256.hexdigest():
            raise LayerError(f"{self.name}: uncompressed content does not match diff_id {diff_id}")
        return self.tree

    def read_plain(self, next_block) -> LayerTree:
        """Reads a plain tar given as blocks (`next_block()`, b"" at the end), to the end
        (gzip checks its CRC only there, and a diff_id covers every byte); checks no diff_id."""
        try:
            tar = TarStream(next_block)
            for member in tar:
                self._entry(tar, member)
            while next_block():
                pass
        except (tarfile.TarError, EOFError, OSError, zstandard.ZstdError) as e:
            raise LayerError(f"{self.name}: unreadable layer ({type(e).__name__}: {e})") from e
        return self.tree

    # -- entries ---------------------------------------------------------
    def _entry(self, tar: TarStream, ti: Member) -> None:
        raw_name = ti.name
        parts = split_path(raw_name, self.name)
        if not parts:                       # "./": containerd ignores it (the root stays 0755 root:root)
            if ti.type == tarfile.DIRTYPE:
                root = self.tree.root
                root.mode, root.uid, root.gid, root.xattrs = stat.S_IFDIR | 0o755, 0, 0, {}
                root.mtime, root.mtime_nsec = _mtime(ti)    # undefined after an unpack; the header's is kept
                self.tree.root_declared = True
            return
        parent_parts, base = parts[:-1], parts[-1]
        parent, parent_path = self._dir(parent_parts, raw_name)
        if base == OPAQUE_MARKER:
            self.tree.opaque.add(parent_path)
            return
        if base.startswith(WHITEOUT_PREFIX):
            hidden = base[len(WHITEOUT_PREFIX):]
            if hidden in (b"", b".", b".."):
                raise LayerError(f"{self.name}: bad whiteout {raw_name!r}")
            self.tree.whiteouts.setdefault(parent_path, set()).add(hidden)
            return
        if len(base) > 255:
            raise LayerError(f"{self.name}: name longer than 255 bytes in {raw_name!r}")
        path = join(parent_path, base)
        if ti.type == tarfile.LNKTYPE:
            self._hardlink(parent, base, path, ti.linkname, ti)
            return
        kind = _TYPES.get(ti.type)
        if kind is None:
            raise LayerError(f"{self.name}: unsupported tar entry type {ti.type!r} for {raw_name!r}")
        old = parent.entries.get(base)
        if kind == stat.S_IFDIR and old is not None and old.is_dir():
            node = old                      # re-declared dir keeps its children
            self.tree.implicit_dirs.discard(path)
        else:
            if old is not None:
                self._dir_key = None        # a replaced node may lie on the cached parent's path
            node = Inode(mode=kind)
            parent.entries[base] = node
            self.tree.implicit_dirs.discard(path)
        self._set_attrs(node, ti, kind)
        if kind == stat.S_IFLNK:
            node.symlink = ti.linkname
            node.size = len(node.symlink)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            node.rdev = os.makedev(ti.devmajor, ti.devminor)
        elif kind == stat.S_IFREG:
            node.size = ti.size
            node.chunks = self._chunks(tar.chunks(ti, self.chunk_size))

    def _set_attrs(self, node: Inode, ti: Member, kind: int) -> None:
        node.mode = unpacked_mode(kind, ti.mode)
        node.uid, node.gid = ti.uid, ti.gid
        node.mtime, node.mtime_nsec = _mtime(ti)
        node.xattrs = _xattrs(ti, kind)

    @staticmethod
    def _relink_attrs(node: Inode, ti: Member) -> None:
        """What containerd's createTarFile does to the inode a hardlink entry links to: lchown
        (the kernel drops security.capability with it), set the entry's xattrs, chmod
        (not for a symlink), set its mtime."""
        node.uid, node.gid = ti.uid, ti.gid
        node.xattrs = {k: v for k, v in node.xattrs.items() if k != b"security.capability"}
        node.xattrs.update(_xattrs(ti, node.kind))
        node.mode = unpacked_mode(node.kind, ti.mode)
        node.mtime, node.mtime_nsec = _mtime(ti)

    def _dir(self, parts: list[bytes], raw_name: bytes) -> tuple[Inode, bytes]:
        """The parent dir of an entry and its path, through this layer's symlinks; undeclared
        parents are created (applied trees make them 0755 root-owned; merge keeps a lower dir's attrs)."""
        key = b"/".join(parts)
        if key == self._dir_key:
            return self._dir_hit
        found = resolve_dir(self.tree.root, parts, f"{self.name}: tar entry {raw_name!r}",
                            self.tree.implicit_dirs)
        self._dir_key, self._dir_hit = key, found
        return found

    def _hardlink(self, parent: Inode, base: bytes, path: bytes, target: bytes, ti: Member) -> None:
        if base in parent.entries:
            self._dir_key = None            # replaced or removed below: see _dir
        target_parts = split_path(target, self.name)
        node = self.tree.root
        for part in target_parts:
            node = node.entries.get(part) if node.is_dir() else None
            if node is None:
                break
        if node is not None and not node.is_dir():
            parent.entries[base] = node
            self._relink_attrs(node, ti)
            return
        if node is not None:
            raise LayerError(f"{self.name}: hardlink {path!r} points to directory {target!r}")
        # Target lives in a lower layer (or nowhere): merge resolves it or fails.
        parent.entries.pop(base, None)
        self.tree.outer_links.append((path, b"/".join(target_parts)))

    def _chunks(self, pieces) -> list[ChunkRef]:
        chunks: list[ChunkRef] = []
        for data in pieces:
            want = len(data)
            if self.progress:
                self.progress(want)
            d = digests.digest(self.digester, data)
            chunks.append(ChunkRef(d, want))
            if d not in self.seen:
                self.seen.add(d)
                if self.sink is not None:
                    self.sink.add(data, d)
        return chunks


class _ReadAhead:
    """Reads `inner` (the decompressing stream) in a helper thread, a few blocks ahead,
    and hashes what it read: the layer's diff_id, in `sha256` once EOF was read.

    zlib, zstd and sha256 release the GIL, so decompressing and hashing overlap
    with the tar parsing in the calling thread. An error of the helper is raised
    by the next `next_block()`. `close()` stops and joins the helper.
    """

    def __init__(self, inner: BinaryIO, block: int = _READ_BLOCK, depth: int = 4):
        self.sha256 = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._end: BaseException | bool = False       # True at EOF, or the helper's error
        self._thread = threading.Thread(target=self._run, args=(inner, block), name="layer-read", daemon=True)
        self._thread.start()

    def _run(self, inner: BinaryIO, block: int) -> None:
        try:
            while not self._stop.is_set():
                data = inner.read(block)
                self.sha256.update(data)
                self._put(data)
                if not data:
                    return
        except BaseException as e:      # handed to the reader, which raises it
            self._put(e)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def next_block(self) -> bytes:
        """The next block as the helper read it (b"" at EOF); no copy."""
        if self._end is True:
            return b""
        if self._end:
            raise self._end
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._end = item
            raise item
        if not item:
            self._end = True
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def resolve_dir(root: Inode, parts: list[bytes], where: str,
                implicit: set[bytes] | None = None, *, loops_fail: bool = False) -> tuple[Inode, bytes] | None:
    """The directory at `parts` below `root`, found the way an OCI applier finds a parent.

    Symlinks on the way are followed inside the root, like the securejoin of umoci
    and containerd: an absolute target starts again at the root and '..' stops
    there, so nothing resolves outside it. With `implicit` (collects their paths)
    missing directories are created 0755; a non-directory in the way or a symlink
    loop is then a LayerError. Without it, anything missing gives None, and a loop
    too unless `loops_fail`. Returns (directory, its path relative to root).

    Within one layer tree, a '..' after a component that is a symlink only in a
    lower layer is taken lexically: containerd applies a layer into its own upper
    dir, where that component is a new directory (merge replaces the lower symlink).
    """
    todo = list(reversed(parts))
    names: list[bytes] = []
    nodes = [root]
    links = 0
    while todo:
        part = todo.pop()
        if part in (b"", b"."):
            continue
        if part == b"..":
            if names:
                names.pop()
                nodes.pop()
            continue
        child = nodes[-1].entries.get(part)
        if child is not None and child.is_symlink():
            links += 1
            if links > MAX_SYMLINKS:
                if implicit is None and not loops_fail:
                    return None
                raise LayerError(f"{where}: too many levels of symbolic links")
            if child.symlink.startswith(b"/"):
                del names[:], nodes[1:]
            todo.extend(reversed(child.symlink.split(b"/")))
            continue
        if child is None or not child.is_dir():
            if implicit is None:
                return None
            if child is not None:
                raise LayerError(f"{where}: {b'/'.join(names + [part])!r} is not a directory")
            child = new_dir(0o755)
            nodes[-1].entries[part] = child
            implicit.add(b"/".join(names + [part]))
        names.append(part)
        nodes.append(child)
    return nodes[-1], b"/".join(names)


def join(parent: bytes, name: bytes) -> bytes:
    return posixpath.join(parent, name) if parent else name
