"""Write an in-memory tree (`rafs.tree`) as a Linux EROFS image: the bootstrap's metadata.

Image layout (4 KiB blocks):

    block 0          superblock at 1024, then the device table (128-byte slots): right
                     after the superblock (plain), or at slot 11 = 1408 (RAFS v6, leaving
                     1152..1408 to the extended superblock); RAFS tables may follow
    meta_blkaddr..   the meta area: one record per inode, 32-byte aligned
                     (nid = offset in the meta area >> 5), breadth-first from the
                     root, whose nid is 1 (nid 0 would surface as st_ino 0)
    after the meta   directory blocks and long symlinks, in inode order

An inode record is a 64-byte extended inode, then inline xattrs, then either
the inline tail (a directory's last block, a symlink target), or, for regular
files, 8-byte chunk indexes at the next 8-byte boundary, one per chunk, each
naming a device (blob_index + 1) and a block in that blob's uncompressed view
(RAFS v6: plus the chunk's 24-bit ci index in bits the kernel masks away).

The whole image is built in one bytearray: it only holds metadata, and
building it in memory keeps the output deterministic and the code simple.
"""
from __future__ import annotations

import hashlib
import stat
from collections import deque
from operator import itemgetter
from typing import BinaryIO

from ..errors import FormatError
from ..tree import Inode
from . import layout as L

ROOT_NID = 1
_MASK = L.BLKSZ - 1
_U64 = (1 << 64) - 1


class _Node:
    """One EROFS inode being laid out (several names may share it: hardlinks)."""
    __slots__ = ("inode", "parent", "name", "ftype", "nid", "nlink", "subdirs", "xattrs",
                 "layout", "size", "tail", "nfull", "ents", "blocks", "startblk", "symlink")

    def __init__(self, inode: Inode, parent: "_Node | None", name: bytes, ftype: int):
        self.inode = inode
        self.parent = parent        # directories: the '..' target; others: where first seen
        self.name = name
        self.ftype = ftype
        self.nid = 0
        self.nlink = 1
        self.subdirs = 0
        self.xattrs = b""
        self.layout = L.FLAT_PLAIN
        self.size = 0
        self.tail = -1              # bytes wanted inline after the inode; -1: none
        self.nfull = 0              # data blocks before the tail (or all blocks if not inline)
        self.ents = None            # directories: sorted [(name, _Node)] incl. '.' and '..'
        self.blocks = None          # directories: [(first, end, used bytes)] per block
        self.startblk = L.NULL_ADDR
        self.symlink = b""

    def path(self) -> bytes:
        parts, node = [], self
        while node.parent is not None and node.parent is not node:
            parts.append(node.name)
            node = node.parent
        return b"/" + b"/".join(reversed(parts))


class ErofsBuild:
    """An EROFS image laid out in memory by `build_erofs`: `image` (a 4096 multiple) and its
    superblock `sb` (already packed into `image`; call `pack_superblock` after changing it)."""

    def __init__(self, image: bytearray, sb: L.Superblock, nodes: list[_Node]):
        self.image = image
        self.sb = sb
        self._nids = {id(n.inode): n.nid for n in nodes}
        self._nodes = nodes

    def nid(self, inode: Inode) -> int:
        """The nid of `inode` (an object of the tree that was written); KeyError if absent."""
        return self._nids[id(inode)]

    def inodes(self):
        """(Inode, nid) for every inode once (hardlinks once), in inode-number order."""
        return ((n.inode, n.nid) for n in self._nodes)

    def pack_superblock(self) -> None:
        self.image[L.SUPER_OFFSET:L.SUPER_OFFSET + L.SUPERBLOCK.size] = self.sb.pack()


def write_erofs(root: Inode, out: BinaryIO, *, chunk_size: int,
                devices: list[tuple[bytes, int]]) -> int:
    """Write `root` as a plain EROFS image to `out`; return the bytes written (a 4096 multiple).

    `devices` are the blobs, in blob-table order: (tag <= 64 bytes, size in 4 KiB blocks).
    A chunk with `blob_index` i is read by the kernel from device i + 1.
    """
    build = build_erofs(root, chunk_size=chunk_size, devices=devices)
    out.write(build.image)
    return len(build.image)


def build_erofs(root: Inode, *, chunk_size: int, devices: list[tuple[bytes, int]],
                rafs: bool = False, meta_offset: int = 0) -> ErofsBuild:
    """Lay `root` out as an EROFS image in memory.

    Plain (rafs=False): device table right after the superblock, `blocks` = the image size,
    a content-derived uuid, holes allowed, chunk indexes name (device, block) only.

    RAFS v6 (rafs=True), as nydus-image writes the EROFS part of a bootstrap: compat
    RAFS_V6, incompat exactly CHUNKED_FILE | DEVICE_TABLE, the device table at slot 11
    (bytes 1152..1408 stay free for the extended superblock), `blocks` = the sum of the
    devices' blocks, zero uuid; every chunk must be placed (no holes) and carries its
    24-bit ci index in startblk_hi and the high byte of device_id. The meta area starts
    at the first block boundary at or after `meta_offset` (the caller's tables go before).
    """
    if chunk_size < L.BLKSZ or chunk_size & (chunk_size - 1) or \
            chunk_size.bit_length() - 1 - L.BLKSZBITS > L.CHUNK_FORMAT_BLKBITS_MASK:
        raise FormatError(f"chunk size {chunk_size} is not a power of two >= {L.BLKSZ}")
    max_devices = L.RAFS_MAX_BLOBS if rafs else 0xFFFE
    if len(devices) > max_devices:
        raise FormatError(f"{len(devices)} blobs: at most {max_devices} fit the device table")
    for tag, blocks in devices:
        if len(tag) > 64 or not 0 <= blocks <= 0xFFFFFFFF:
            raise FormatError(f"device {tag!r}: tag longer than 64 bytes or {blocks} blocks out of range")

    nodes = _collect(root)
    for node in nodes:
        _prepare(node, chunk_size)
    slotoff = L.RAFS_DEVT_SLOTOFF if rafs else (L.SUPER_OFFSET + L.SUPERBLOCK.size) // L.DEVT_SLOT_SIZE
    head = max(slotoff * L.DEVT_SLOT_SIZE + L.DEVT_SLOT_SIZE * len(devices), meta_offset)
    meta_blkaddr = -(-head // L.BLKSZ)
    meta_size = _place(nodes)
    total = _assign_blocks(nodes, meta_blkaddr + -(-meta_size // L.BLKSZ))

    img = bytearray(total * L.BLKSZ)
    meta_base = meta_blkaddr * L.BLKSZ
    for ino, node in enumerate(nodes, 1):
        _render(img, meta_base, node, ino, chunk_size, devices, rafs)

    for i, (tag, blocks) in enumerate(devices):
        # uniaddr 0: the kernel never routes primary-device reads into a slot whose uniaddr is 0
        L.DEVICE_SLOT.pack_into(img, (slotoff + i) * L.DEVT_SLOT_SIZE, tag, blocks, 0, 0, 0)
    if rafs:
        blocks = sum(b for _, b in devices)
        if blocks > 0xFFFFFFFF:
            raise FormatError(f"the blobs hold {blocks} blocks in all: more than 32-bit s_blocks allows")
        sb = L.Superblock(root_nid=nodes[0].nid, inos=len(nodes), blocks=blocks, meta_blkaddr=meta_blkaddr,
                          feature_incompat=L.RAFS_INCOMPAT, feature_compat=L.FEATURE_COMPAT_RAFS_V6,
                          extra_devices=len(devices), devt_slotoff=slotoff)
        build = ErofsBuild(img, sb, nodes)
        build.pack_superblock()
        return build
    incompat = L.FEATURE_INCOMPAT_CHUNKED_FILE
    if devices:
        incompat |= L.FEATURE_INCOMPAT_DEVICE_TABLE
    sb = L.Superblock(root_nid=nodes[0].nid, inos=len(nodes), blocks=total, meta_blkaddr=meta_blkaddr,
                      feature_incompat=incompat, extra_devices=len(devices),
                      devt_slotoff=slotoff if devices else 0)
    build = ErofsBuild(img, sb, nodes)
    build.pack_superblock()
    # A uuid derived from the content: deterministic, yet distinct images get distinct uuids.
    sb.uuid = hashlib.sha256(img).digest()[:16]
    build.pack_superblock()
    return build


# --- pass 1: collect inodes breadth-first, hardlinks once ---------------------


def _ftype(inode: Inode, where) -> int:
    ftype = L.FT_OF_MODE.get(stat.S_IFMT(inode.mode))
    if ftype is None or not 0 <= inode.mode <= 0xFFFF:
        raise FormatError(f"{where()!r}: mode {inode.mode:#o} is not a valid file mode")
    return ftype


def _collect(root: Inode) -> list[_Node]:
    if not root.is_dir():
        raise FormatError("the root of the tree must be a directory")
    top = _Node(root, None, b"", _ftype(root, lambda: b"/"))
    top.parent = top
    nodes, seen, queue = [top], {id(root): top}, deque([top])
    while queue:
        d = queue.popleft()
        entries = d.inode.entries
        ents = [(b".", d), (b"..", d.parent)]
        for name in sorted(entries):
            child = entries[name]
            if not name or len(name) > L.NAME_LEN or b"/" in name or b"\0" in name \
                    or name in (b".", b".."):
                raise FormatError(f"{d.path()}: invalid entry name {name[:80]!r} (1..255 bytes, "
                                  "no '/' or NUL, not '.' or '..')")
            node = seen.get(id(child))
            if node is None:
                node = _Node(child, d, name, _ftype(child, lambda: d.path() + b"/" + name))
                seen[id(child)] = node
                nodes.append(node)
                if node.ftype == L.FT_DIR:
                    d.subdirs += 1
                    queue.append(node)
            elif node.ftype == L.FT_DIR:
                raise FormatError(f"directory {node.path()!r} also appears as {d.path() + b'/' + name!r}: "
                                  "directories cannot be hardlinked")
            else:
                node.nlink += 1
            ents.append((name, node))
        ents.sort(key=itemgetter(0))    # '.' and '..' sort among the names, as lookup expects
        d.ents = ents
    return nodes


# --- pass 2: per-inode sizes ---------------------------------------------------


def _xattr_body(node: _Node) -> bytes:
    xattrs = node.inode.xattrs
    if not xattrs:
        return b""
    parts = [L.XATTR_IBODY_HEADER.pack(0, 0)]
    for name in sorted(xattrs):
        value = xattrs[name]
        try:
            index, suffix = L.split_xattr_name(name)
        except FormatError as e:
            raise FormatError(f"{node.path()!r}: {e}") from None
        if len(value) > 0xFFFF:
            raise FormatError(f"{node.path()!r}: xattr {name!r} value is {len(value)} bytes "
                              "(EROFS allows 65535)")
        entry = L.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        parts.append(entry + bytes(-len(entry) & 3))
    body = b"".join(parts)
    if (len(body) - L.XATTR_IBODY_HEADER.size) // 4 + 1 > 0xFFFF:
        raise FormatError(f"{node.path()!r}: {len(body)} bytes of xattrs do not fit an inode")
    return body


def _prepare(node: _Node, chunk_size: int) -> None:
    inode = node.inode
    where = node.path           # called only for error messages: it walks up the tree
    if not 0 <= inode.uid <= 0xFFFFFFFF or not 0 <= inode.gid <= 0xFFFFFFFF:
        raise FormatError(f"{where()!r}: uid/gid {inode.uid}/{inode.gid} out of the 32-bit range")
    if not -(1 << 63) <= inode.mtime < (1 << 63) or not 0 <= inode.mtime_nsec < 1_000_000_000:
        raise FormatError(f"{where()!r}: mtime {inode.mtime}.{inode.mtime_nsec} out of range")
    node.xattrs = _xattr_body(node)
    ftype = node.ftype
    if ftype == L.FT_DIR:
        blocks, first, used = [], 0, 0
        for i, (name, _) in enumerate(node.ents):
            need = L.DIRENT.size + len(name)
            if used + need > L.BLKSZ:
                blocks.append((first, i, used))
                first, used = i, 0
            used += need
        blocks.append((first, len(node.ents), used))
        node.blocks = blocks
        node.size = (len(blocks) - 1) * L.BLKSZ + used
        node.tail, node.nfull = used, len(blocks) - 1
    elif ftype == L.FT_SYMLINK:
        target = inode.symlink
        if len(target) >= L.BLKSZ or b"\0" in target:
            raise FormatError(f"{where()!r}: symlink target of {len(target)} bytes (at most 4095, no NUL)")
        node.symlink = target
        node.size = len(target)
        node.tail = len(target)
    elif ftype == L.FT_REG_FILE:
        if inode.size < 0:
            raise FormatError(f"{where()!r}: negative size")
        node.size = inode.size
        want = -(-inode.size // chunk_size)
        if len(inode.chunks) != want:
            raise FormatError(f"{where()!r}: {len(inode.chunks)} chunks for {inode.size} bytes "
                              f"(expected {want} of {chunk_size} bytes)")
        node.layout = L.CHUNK_BASED


def _place(nodes: list[_Node]) -> int:
    """Give every node its nid; return the meta area size in bytes."""
    pos = ROOT_NID << L.ISLOTBITS
    for node in nodes:
        head = L.INODE_EXTENDED.size + len(node.xattrs)
        tail = node.tail
        if tail >= 0:
            # Inline data must not cross a block (the kernel refuses it), so either it
            # fits here, or we skip to where it does, or (when skipping would waste more
            # than a block of its own) the tail goes to a data block instead.
            if ((pos + head) & _MASK) + tail <= L.BLKSZ:
                node.layout = L.FLAT_INLINE
            else:
                moved = (((pos + head) | _MASK) + 1 - head + 31) & ~31
                if ((moved + head) & _MASK) + tail <= L.BLKSZ and moved - pos <= L.BLKSZ - tail:
                    node.layout, pos = L.FLAT_INLINE, moved
                else:
                    node.layout = L.FLAT_PLAIN
                    node.nfull += 1
                    tail = 0
            size = head + tail
        elif node.layout == L.CHUNK_BASED:
            size = ((head + 7) & ~7) + L.CHUNK_INDEX.size * len(node.inode.chunks)
        else:
            size = head
        node.nid = pos >> L.ISLOTBITS
        pos = (pos + size + 31) & ~31
    return pos


def _assign_blocks(nodes: list[_Node], first: int) -> int:
    """Give directories and long symlinks their data blocks; return the total block count."""
    blk = first
    for node in nodes:
        if node.nfull:
            node.startblk = blk
            blk += node.nfull
    if blk > 0xFFFFFFFF:
        raise FormatError("bootstrap too large for 32-bit block numbers")
    return blk


# --- pass 3: bytes -------------------------------------------------------------


def _put_dirents(img: bytearray, off: int, ents) -> None:
    nameoff = L.DIRENT.size * len(ents)
    pack = L.DIRENT.pack_into
    for i, (name, child) in enumerate(ents):
        pack(img, off + L.DIRENT.size * i, child.nid, nameoff, child.ftype, 0)
        end = nameoff + len(name)
        img[off + nameoff:off + end] = name
        nameoff = end


def _chunk_indexes(node: _Node, chunk_size: int, devices, rafs: bool) -> bytes:
    inode = node.inode
    hole = L.CHUNK_INDEX.pack(0, 0, L.NULL_ADDR)
    out = []
    for i, chunk in enumerate(inode.chunks):
        if chunk is None:
            if rafs:
                raise FormatError(f"{node.path()!r}: chunk {i} is a hole: RAFS v6 has none (nydusd "
                                  "rejects device 0), a zero chunk must be stored like any other")
            out.append(hole)
            continue
        want = min(chunk_size, inode.size - i * chunk_size)
        bi, offset = chunk.blob_index, chunk.offset
        if chunk.size != want or not 0 <= bi < len(devices) or offset < 0 or offset & _MASK \
                or offset + want > devices[bi][1] * L.BLKSZ:
            raise FormatError(
                f"{node.path()!r}: chunk {i} (size {chunk.size}, blob {bi}, offset {offset}) does not "
                f"fit: expected {want} bytes at a 4 KiB-aligned offset inside one of {len(devices)} blobs")
        if rafs:
            ci = chunk.ci_index
            if not 0 <= ci <= L.RAFS_MAX_CI_INDEX:
                raise FormatError(f"{node.path()!r}: chunk {i} has ci index {ci}: RAFS v6 needs its "
                                  f"position in the blob's ci array (0..{L.RAFS_MAX_CI_INDEX})")
            out.append(L.CHUNK_INDEX.pack(ci & 0xFFFF, (bi + 1) | (ci >> 16) << 8, offset >> L.BLKSZBITS))
        else:
            out.append(L.CHUNK_INDEX.pack(0, bi + 1, offset >> L.BLKSZBITS))
    return b"".join(out)


def _render(img: bytearray, meta_base: int, node: _Node, ino: int, chunk_size: int, devices,
            rafs: bool) -> None:
    inode = node.inode
    off = meta_base + (node.nid << L.ISLOTBITS)
    ftype, xattrs = node.ftype, node.xattrs
    head = off + L.INODE_EXTENDED.size + len(xattrs)
    if ftype == L.FT_REG_FILE:
        i_u = L.CHUNK_FORMAT_INDEXES | (chunk_size.bit_length() - 1 - L.BLKSZBITS)
        idx = _chunk_indexes(node, chunk_size, devices, rafs)
        at = (head + 7) & ~7
        img[at:at + len(idx)] = idx
    elif ftype in (L.FT_CHRDEV, L.FT_BLKDEV):
        i_u = L.encode_dev(inode.rdev)
    elif ftype in (L.FT_FIFO, L.FT_SOCK):
        i_u = 0
    else:
        i_u = node.startblk
        if ftype == L.FT_DIR:
            blocks, ents = node.blocks, node.ents
            for k, (first, end, _) in enumerate(blocks):
                if k < node.nfull:
                    _put_dirents(img, (node.startblk + k) * L.BLKSZ, ents[first:end])
                else:
                    _put_dirents(img, head, ents[first:end])
        elif node.layout == L.FLAT_INLINE:
            img[head:head + node.size] = node.symlink
        else:
            at = node.startblk * L.BLKSZ
            img[at:at + node.size] = node.symlink
    nlink = 2 + node.subdirs if ftype == L.FT_DIR else node.nlink
    icount = 0 if not xattrs else (len(xattrs) - L.XATTR_IBODY_HEADER.size) // 4 + 1
    L.INODE_EXTENDED.pack_into(
        img, off, L.INODE_LAYOUT_EXTENDED | (node.layout << L.I_DATALAYOUT_BIT), icount,
        inode.mode, 0, node.size, i_u, ino & 0xFFFFFFFF, inode.uid, inode.gid,
        inode.mtime & _U64, inode.mtime_nsec, nlink)
    img[off + L.INODE_EXTENDED.size:head] = xattrs
