"""Read an EROFS image in pure Python (metadata only: no compressed data).

Works over any buffer (bytes, bytearray, mmap). Every offset taken from the
image is checked against the image bounds first, so a corrupt or hostile
image gives `FormatError`, never an IndexError or a read of the wrong bytes.
Reads what our writer makes, what `mkfs.erofs` makes for uncompressed
trees (compact or extended inodes, plain/inline data, shared xattrs,
chunk-based files with indexes or block maps), and the EROFS part of RAFS v6
bootstraps as nydus-image writes them (see `ErofsImage`).
"""
from __future__ import annotations

import stat
import struct
from dataclasses import dataclass
from typing import Iterator

from ..errors import FormatError
from ..tree import FileKind
from . import layout as L

_SUPPORTED_INCOMPAT = (L.FEATURE_INCOMPAT_ZERO_PADDING | L.FEATURE_INCOMPAT_COMPR_CFGS
                       | L.FEATURE_INCOMPAT_CHUNKED_FILE | L.FEATURE_INCOMPAT_DEVICE_TABLE
                       | L.FEATURE_INCOMPAT_ZTAILPACKING | L.FEATURE_INCOMPAT_FRAGMENTS
                       | L.FEATURE_INCOMPAT_XATTR_PREFIXES)
_U16 = struct.Struct("<H")
_CACHE_MAX = 1 << 16


@dataclass(frozen=True, slots=True)
class InodeInfo(FileKind):
    nid: int
    mode: int           # full st_mode
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    size: int
    nlink: int
    rdev: int           # os.makedev() form; 0 unless a char/block device
    ino: int            # the on-disk i_ino (the kernel reports the nid as st_ino)
    datalayout: int     # layout.FLAT_PLAIN / FLAT_INLINE / CHUNK_BASED / ...
    inode_isize: int    # 32 (compact) or 64 (extended)
    xattr_isize: int
    startblk: int       # flat layouts: first data block (layout.NULL_ADDR: none)
    chunk_format: int = 0
    chunkbits: int = 0  # chunk-based: log2(chunk size)

    @property
    def chunk_size(self) -> int:
        return 1 << self.chunkbits if self.datalayout == L.CHUNK_BASED else 0


class ErofsImage:
    """An EROFS image in `buf`.

    A RAFS v6 bootstrap (compat bit RAFS_V6) is bounded by the buffer's length, since
    its `s_blocks` counts the blobs' blocks, not the image's. `chunk_size` (RAFS: the
    extended superblock's) is the stride of the chunk-index arrays: Nydus declares
    next_pow2(file size) in i_u for a file whose chunks lie back to back, yet writes
    one index per `chunk_size` bytes; such inodes read as `chunk_size` chunks.
    """

    def __init__(self, buf, *, chunk_size: int | None = None):
        self._buf = buf
        self._mv = memoryview(buf)
        sb = L.Superblock.unpack(buf)
        if not 9 <= sb.blkszbits <= 12:
            raise FormatError(f"EROFS block size 2^{sb.blkszbits} not supported (512..4096)")
        if sb.dirblkbits:
            raise FormatError(f"EROFS dirblkbits {sb.dirblkbits} not supported")
        if sb.feature_incompat & ~_SUPPORTED_INCOMPAT:
            raise FormatError(f"EROFS incompatible features {sb.feature_incompat & ~_SUPPORTED_INCOMPAT:#x} "
                              "not supported by this reader")
        self.sb = sb
        self.blkszbits = sb.blkszbits
        self.blksz = 1 << sb.blkszbits
        self.rafs = bool(sb.feature_compat & L.FEATURE_COMPAT_RAFS_V6)
        if self.rafs:
            self.image_size = len(buf)
        else:
            self.image_size = sb.blocks * self.blksz
            if self.image_size > len(buf):
                raise FormatError(f"truncated EROFS image: superblock says {sb.blocks} blocks "
                                  f"({self.image_size} bytes), only {len(buf)} bytes present")
        if chunk_size is not None and (chunk_size < self.blksz or chunk_size & (chunk_size - 1)):
            raise FormatError(f"chunk size {chunk_size} is not a power of two >= {self.blksz}")
        self._chunkbits = chunk_size.bit_length() - 1 if chunk_size else 0
        self.end = self.image_size
        self.root_nid = sb.root_nid
        self._meta = sb.meta_blkaddr * self.blksz
        self.devices = self._read_devices()
        n = len(self.devices)
        self.device_id_mask = (1 << n.bit_length()) - 1 if n else 0   # roundup_pow_of_two(n + 1) - 1
        self._prefixes = self._read_long_prefixes()
        self._cache: dict[int, InodeInfo] = {}
        if not self.inode(self.root_nid).is_dir():
            raise FormatError(f"root inode (nid {self.root_nid}) is not a directory")

    # --- bounds ---------------------------------------------------------------

    def _check(self, off: int, n: int, what: str) -> None:
        if off < 0 or n < 0 or off + n > self.end:
            raise FormatError(f"{what}: bytes {off}..{off + n} lie outside the {self.end}-byte image")

    def _slice(self, off: int, n: int, what: str) -> memoryview:
        self._check(off, n, what)
        return self._mv[off:off + n]

    def _read_devices(self) -> list[tuple[bytes, int]]:
        sb = self.sb
        if not sb.feature_incompat & L.FEATURE_INCOMPAT_DEVICE_TABLE or not sb.extra_devices:
            return []
        base = sb.devt_slotoff * L.DEVT_SLOT_SIZE
        self._check(base, sb.extra_devices * L.DEVT_SLOT_SIZE, "device table")
        out = []
        for i in range(sb.extra_devices):
            tag, blocks, _uniaddr, _hi, _uhi = L.DEVICE_SLOT.unpack_from(self._buf, base + i * L.DEVT_SLOT_SIZE)
            out.append((tag.rstrip(b"\0"), blocks))
        return out

    def _read_long_prefixes(self) -> list[tuple[int, bytes]]:
        sb = self.sb
        if not sb.feature_incompat & L.FEATURE_INCOMPAT_XATTR_PREFIXES or not sb.xattr_prefix_count:
            return []
        if sb.packed_nid:
            raise FormatError("long xattr prefixes in a packed inode are not supported")
        pos, out = sb.xattr_prefix_start << 2, []
        for _ in range(sb.xattr_prefix_count):
            pos = (pos + 3) & ~3
            (n,) = _U16.unpack(self._slice(pos, 2, "xattr prefix table"))
            item = bytes(self._slice(pos + 2, n, "xattr prefix table"))
            if not 1 <= n <= L.NAME_LEN + 1:
                raise FormatError(f"bad long xattr prefix of {n} bytes")
            out.append((item[0], item[1:]))
            pos += 2 + n
        return out

    # --- inodes ---------------------------------------------------------------

    def iloc(self, nid: int) -> int:
        return self._meta + (nid << L.ISLOTBITS)

    def inode(self, nid: int) -> InodeInfo:
        info = self._cache.get(nid)
        if info is None:
            info = self._read_inode(nid)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[nid] = info
        return info

    def _read_inode(self, nid: int) -> InodeInfo:
        off = self.iloc(nid)
        if nid < 0 or off + 32 > self.end:
            raise FormatError(f"inode nid {nid} out of range")
        buf = self._buf
        ifmt, icount, mode, nb = struct.unpack_from("<HHHH", buf, off)
        if ifmt & ~L.I_ALL:
            raise FormatError(f"inode nid {nid}: unsupported i_format {ifmt:#x}")
        layout = (ifmt >> L.I_DATALAYOUT_BIT) & L.I_DATALAYOUT_MASK
        if layout >= L.DATALAYOUT_MAX:
            raise FormatError(f"inode nid {nid}: unsupported data layout {layout}")
        kind = stat.S_IFMT(mode)
        if ifmt & L.I_VERSION_MASK == L.INODE_LAYOUT_EXTENDED:
            if off + 64 > self.end:
                raise FormatError(f"inode nid {nid} out of range")
            (_f, _c, _m, _nb, size, i_u, ino, uid, gid, mtime, nsec,
             nlink) = L.INODE_EXTENDED.unpack_from(buf, off)
            isize, hi = 64, nb
            mtime -= (mtime >> 63) << 64            # the kernel reads it as signed
        else:
            (_f, _c, _m, _nb, size, mtime, i_u, ino, uid, gid, _r) = L.INODE_COMPACT.unpack_from(buf, off)
            isize = 32
            if kind != stat.S_IFDIR and ifmt >> L.I_NLINK_1_BIT & 1:
                nlink, hi = 1, nb
            else:
                nlink, hi = nb, 0
            mtime, nsec = self.sb.epoch + mtime, self.sb.fixed_nsec
        xattr_isize = L.xattr_ibody_size(icount)
        self._check(off, isize + xattr_isize, f"inode nid {nid} and its xattrs")
        if kind not in L.FT_OF_MODE:
            raise FormatError(f"inode nid {nid}: bogus mode {mode:#o}")
        rdev = startblk = 0
        chunk_format = chunkbits = 0
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            rdev = L.decode_dev(i_u)
        elif kind in (stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK):
            startblk = i_u | hi << 32
            if layout == L.CHUNK_BASED:
                if kind != stat.S_IFREG:
                    raise FormatError(f"inode nid {nid}: chunk-based layout on a non-regular file")
                chunk_format = i_u & 0xFFFF
                if chunk_format & ~L.CHUNK_FORMAT_ALL:
                    raise FormatError(f"inode nid {nid}: unsupported chunk format {chunk_format:#x}")
                chunkbits = self.blkszbits + (chunk_format & L.CHUNK_FORMAT_BLKBITS_MASK)
                if self._chunkbits and chunk_format & L.CHUNK_FORMAT_INDEXES:
                    chunkbits = min(chunkbits, self._chunkbits)
                startblk = L.NULL_ADDR
            elif layout == L.FLAT_PLAIN and i_u == L.NULL_ADDR and hi in (0, 0xFFFF):
                startblk = L.NULL_ADDR
            elif layout in (L.COMPRESSED_FULL, L.COMPRESSED_COMPACT) and kind != stat.S_IFREG:
                raise FormatError(f"inode nid {nid}: compressed {stat.filemode(mode)} not supported")
        return InodeInfo(nid, mode, uid, gid, mtime, nsec, size, nlink, rdev, ino, layout, isize,
                         xattr_isize, startblk, chunk_format, chunkbits)

    # --- flat data (directories, symlinks, mkfs.erofs files) -----------------

    def _block(self, info: InodeInfo, i: int) -> memoryview:
        """Logical block i of a flat (plain or inline) inode, cut to the inode size."""
        bs = self.blksz
        nblocks = -(-info.size // bs)
        length = min(bs, info.size - i * bs)
        if not 0 <= i < nblocks:
            raise FormatError(f"inode nid {info.nid}: block {i} beyond its {info.size} bytes")
        if info.datalayout == L.FLAT_INLINE and i == nblocks - 1:
            off = self.iloc(info.nid) + info.inode_isize + info.xattr_isize
            if (off & (bs - 1)) + length > bs:
                raise FormatError(f"inode nid {info.nid}: inline data crosses a block boundary")
            return self._slice(off, length, f"inline data of nid {info.nid}")
        if info.datalayout not in (L.FLAT_PLAIN, L.FLAT_INLINE):
            raise FormatError(f"inode nid {info.nid}: data layout {info.datalayout} is not flat")
        if info.startblk == L.NULL_ADDR:
            return memoryview(bytes(length))
        return self._slice((info.startblk + i) * bs, length, f"data block {i} of nid {info.nid}")

    def read(self, nid: int, offset: int = 0, size: int | None = None) -> bytes:
        """Bytes of a flat-layout inode (not chunk-based or compressed ones)."""
        info = self.inode(nid)
        end = info.size if size is None else min(info.size, offset + size)
        out, bs = [], self.blksz
        while offset < end:
            blk = self._block(info, offset // bs)
            take = min(end - offset, len(blk) - offset % bs)
            out.append(bytes(blk[offset % bs:offset % bs + take]))
            offset += take
        return b"".join(out)

    def readlink(self, nid: int) -> bytes:
        info = self.inode(nid)
        if not info.is_symlink():
            raise OSError(22, f"nid {nid} is not a symlink")
        if info.size >= self.blksz * 16:
            raise FormatError(f"symlink nid {nid}: implausible size {info.size}")
        return self.read(nid)

    # --- directories ------------------------------------------------------------

    def _dir(self, nid: int) -> InodeInfo:
        info = self.inode(nid)
        if not info.is_dir():
            raise NotADirectoryError(20, f"nid {nid} is not a directory")
        return info

    def _dirblock(self, info: InodeInfo, i: int) -> tuple[memoryview, int]:
        """(block bytes, dirent count), validated like the kernel's readdir."""
        data = self._block(info, i)
        if len(data) < L.DIRENT.size:
            raise FormatError(f"directory nid {info.nid}: block {i} too short")
        (nameoff0,) = _U16.unpack_from(data, 8)
        if nameoff0 < L.DIRENT.size or nameoff0 >= self.blksz or nameoff0 > len(data):
            raise FormatError(f"directory nid {info.nid}: invalid nameoff {nameoff0} in block {i}")
        return data, nameoff0 // L.DIRENT.size

    def _entry(self, info: InodeInfo, data: memoryview, n: int, k: int) -> tuple[bytes, int, int]:
        nid, nameoff, ftype, _ = L.DIRENT.unpack_from(data, k * L.DIRENT.size)
        if k + 1 < n:
            (end,) = _U16.unpack_from(data, (k + 1) * L.DIRENT.size + 8)
        else:
            end = len(data)
            if nameoff < end:
                z = bytes(data[nameoff:end]).find(b"\0")
                if z >= 0:
                    end = nameoff + z
        if not (n * L.DIRENT.size <= nameoff < end <= len(data) and end - nameoff <= L.NAME_LEN):
            raise FormatError(f"directory nid {info.nid}: bogus dirent {k} (nameoff {nameoff}, end {end})")
        return bytes(data[nameoff:end]), nid, ftype

    def _iter_dir(self, info: InodeInfo) -> Iterator[tuple[bytes, int, int]]:
        for i in range(-(-info.size // self.blksz)):
            data, n = self._dirblock(info, i)
            for k in range(n):
                yield self._entry(info, data, n, k)

    def readdir(self, nid: int) -> list[tuple[bytes, int, int]]:
        """[(name, nid, file_type)] in on-disk (sorted) order, without '.' and '..'."""
        return [e for e in self._iter_dir(self._dir(nid)) if e[0] not in (b".", b"..")]

    def lookup(self, dir_nid: int, name: bytes) -> int | None:
        """The nid of `name` in the directory, by binary search like the kernel's namei."""
        info = self._dir(dir_nid)
        if not name or len(name) > L.NAME_LEN:
            return None
        head, back, cand = 0, -(-info.size // self.blksz) - 1, None
        while head <= back:             # the last block whose first name is <= name
            mid = (head + back) // 2
            data, n = self._dirblock(info, mid)
            first = self._entry(info, data, n, 0)
            if first[0] == name:
                return first[1]
            if name > first[0]:
                cand, head = (data, n), mid + 1
            else:
                back = mid - 1
        if cand is None:
            return None
        data, n = cand
        lo, hi = 1, n - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            ename, enid, _ = self._entry(info, data, n, mid)
            if ename == name:
                return enid
            if name > ename:
                lo = mid + 1
            else:
                hi = mid - 1
        return None

    def resolve(self, path: bytes) -> int | None:
        """The nid at an absolute path (symlinks are not followed), or None."""
        nid = self.root_nid
        for part in path.split(b"/"):
            if not part:
                continue
            if not self.inode(nid).is_dir():
                return None
            nid = self.lookup(nid, part)
            if nid is None:
                return None
        return nid

    def walk(self) -> Iterator[tuple[bytes, int]]:
        """(path, nid) for every name in the tree, depth-first; the root is b"/"."""
        stack, dirs = [(b"/", self.root_nid)], set()
        while stack:
            path, nid = stack.pop()
            yield path, nid
            if self.inode(nid).is_dir():
                if nid in dirs:     # a corrupt image could loop forever
                    raise FormatError(f"directory nid {nid} reached twice (at {path!r}): cycle")
                dirs.add(nid)
                base = b"" if path == b"/" else path
                stack.extend((base + b"/" + name, child) for name, child, _ in reversed(self.readdir(nid)))

    # --- xattrs -------------------------------------------------------------------

    def xattrs(self, nid: int) -> dict[bytes, bytes]:
        info = self.inode(nid)
        if not info.xattr_isize:
            return {}
        if info.xattr_isize <= L.XATTR_IBODY_HEADER.size:
            raise FormatError(f"inode nid {nid}: xattr body of {info.xattr_isize} bytes")
        pos = self.iloc(nid) + info.inode_isize
        _filter, shared = L.XATTR_IBODY_HEADER.unpack_from(self._buf, pos)
        head = L.XATTR_IBODY_HEADER.size + 4 * shared
        if head > info.xattr_isize:
            raise FormatError(f"inode nid {nid}: {shared} shared xattrs overflow the xattr body")
        out: dict[bytes, bytes] = {}
        ids = struct.unpack_from(f"<{shared}I", self._buf, pos + L.XATTR_IBODY_HEADER.size)
        pos, remaining = pos + head, info.xattr_isize - head
        while remaining:
            size = self._xattr_entry(nid, pos, out, remaining)
            pos, remaining = pos + size, remaining - size
        base = self.sb.xattr_blkaddr * self.blksz
        for xid in ids:
            self._xattr_entry(nid, base + 4 * xid, out, None)
        return out

    def _xattr_entry(self, nid: int, pos: int, out: dict, remaining: int | None) -> int:
        self._check(pos, 4, f"xattr entry of nid {nid}")
        name_len, index, value_size = L.XATTR_ENTRY.unpack_from(self._buf, pos)
        size = L.xattr_entry_size(name_len, value_size)
        if remaining is not None and size > remaining:
            raise FormatError(f"inode nid {nid}: xattr entry beyond the xattr body")
        raw = bytes(self._slice(pos + 4, name_len + value_size, f"xattr entry of nid {nid}"))
        if index & L.XATTR_LONG_PREFIX:
            k = index & ~L.XATTR_LONG_PREFIX
            if k >= len(self._prefixes):
                raise FormatError(f"inode nid {nid}: xattr long prefix {k} not in the prefix table")
            index, infix = self._prefixes[k]
        else:
            infix = b""
        prefix = L.XATTR_PREFIXES.get(index)
        if prefix is None:
            raise FormatError(f"inode nid {nid}: unknown xattr name index {index}")
        out[prefix + infix + raw[:name_len]] = raw[name_len:]
        return size

    # --- chunk-based files -------------------------------------------------------

    def _index_array(self, nid: int, start: int, count: int | None):
        """(info, base offset, unit, start, stop) of chunks start..start+count, bounds-checked."""
        info = self.inode(nid)
        if info.datalayout != L.CHUNK_BASED:
            raise FormatError(f"inode nid {nid} is not a chunk-based file")
        total = -(-info.size // (1 << info.chunkbits))
        stop = total if count is None else min(total, start + count)
        unit = 8 if info.chunk_format & L.CHUNK_FORMAT_INDEXES else 4
        base = self.iloc(nid) + info.inode_isize + info.xattr_isize
        base = (base + unit - 1) & -unit
        if start < 0 or start >= stop:
            return info, base, unit, start, start
        self._check(base + unit * start, unit * (stop - start), f"chunk indexes of nid {nid}")
        return info, base, unit, start, stop

    def chunk_indexes(self, nid: int, start: int = 0, count: int | None = None
                      ) -> list[tuple[int, int] | None]:
        """[(device_id, blkaddr) or None for a hole] for chunks start..start+count of a file,
        decoded as the kernel does (device_id masked, startblk_hi only with 48-bit indexes)."""
        info, base, unit, start, stop = self._index_array(nid, start, count)
        out: list[tuple[int, int] | None] = []
        if start >= stop:
            return out
        buf = self._buf
        if unit == 8:
            wide = info.chunk_format & L.CHUNK_FORMAT_48BIT
            mask = (1 << 48) - 1 if wide else L.NULL_ADDR
            for hi, dev, lo in L.CHUNK_INDEX.iter_unpack(buf[base + 8 * start:base + 8 * stop]):
                blk = (lo | hi << 32) & mask
                out.append(None if blk == mask else (dev & self.device_id_mask, blk))
        else:
            for (blk,) in L.BLOCK_MAP_ENTRY.iter_unpack(buf[base + 4 * start:base + 4 * stop]):
                out.append(None if blk == L.NULL_ADDR else (0, blk))
        return out

    def raw_chunk_indexes(self, nid: int, start: int = 0, count: int | None = None
                          ) -> list[tuple[int, int, int]]:
        """The undecoded 8-byte chunk indexes (startblk_hi, device_id, startblk_lo) of chunks
        start..start+count: RAFS v6 keeps its ci index in bits the kernel ignores."""
        info, base, unit, start, stop = self._index_array(nid, start, count)
        if unit != 8:
            raise FormatError(f"inode nid {nid} has a block map, not chunk indexes")
        return list(L.CHUNK_INDEX.iter_unpack(self._buf[base + 8 * start:base + 8 * stop]))
