"""EROFS on-disk format: constants and struct layouts (Linux fs/erofs/erofs_fs.h).

Every on-disk structure is a little-endian `struct.Struct` whose size is
asserted against the size the kernel asserts with BUILD_BUG_ON, so a typo in
a format string fails at import, not in a mount. Only what pynydus writes or
reads is here; field names follow the kernel's so the two can be compared.
The RAFS v6 structures Nydus keeps around the EROFS part of a bootstrap
(extended superblock, blob table, chunk table: rafs/src/metadata/layout/v6.rs
and v5.rs) are here too, sized as Nydus asserts them.
"""
from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass

from ..errors import FormatError

# --- geometry ---------------------------------------------------------------
BLKSZBITS = 12                      # we always write 4 KiB blocks
BLKSZ = 1 << BLKSZBITS
SUPER_OFFSET = 1024                 # room for x86 boot sectors
SUPER_MAGIC = 0xE0F5E1E2
ISLOTBITS = 5                       # nid = (byte offset in the meta area) >> 5
NULL_ADDR = 0xFFFFFFFF              # EROFS_NULL_ADDR as a 32-bit block number: a hole
NAME_LEN = 255                      # EROFS_NAME_LEN
DEVT_SLOT_SIZE = 128

# --- superblock features ----------------------------------------------------
FEATURE_COMPAT_SB_CHKSUM = 0x1
FEATURE_COMPAT_MTIME = 0x2
FEATURE_COMPAT_XATTR_FILTER = 0x4
FEATURE_COMPAT_RAFS_V6 = 0x4000_0000      # Nydus: a RAFS v6 bootstrap (the kernel ignores it)

FEATURE_INCOMPAT_ZERO_PADDING = 0x1
FEATURE_INCOMPAT_COMPR_CFGS = 0x2         # == BIG_PCLUSTER
FEATURE_INCOMPAT_CHUNKED_FILE = 0x4
FEATURE_INCOMPAT_DEVICE_TABLE = 0x8       # == COMPR_HEAD2 (the bits are shared)
FEATURE_INCOMPAT_ZTAILPACKING = 0x10
FEATURE_INCOMPAT_FRAGMENTS = 0x20         # == DEDUPE
FEATURE_INCOMPAT_XATTR_PREFIXES = 0x40
FEATURE_INCOMPAT_48BIT = 0x80
FEATURE_INCOMPAT_METABOX = 0x100

# --- inode format -----------------------------------------------------------
INODE_LAYOUT_COMPACT = 0
INODE_LAYOUT_EXTENDED = 1

FLAT_PLAIN = 0
COMPRESSED_FULL = 1
FLAT_INLINE = 2
COMPRESSED_COMPACT = 3
CHUNK_BASED = 4
DATALAYOUT_MAX = 5

I_VERSION_MASK = 0x1
I_DATALAYOUT_BIT = 1
I_DATALAYOUT_MASK = 0x7
I_NLINK_1_BIT = 4                   # compact non-directories: nlink is 1, i_nb is startblk_hi
I_ALL = (1 << (I_NLINK_1_BIT + 1)) - 1

CHUNK_FORMAT_BLKBITS_MASK = 0x1F    # chunk size = block size << (format & mask)
CHUNK_FORMAT_INDEXES = 0x20         # 8-byte chunk indexes instead of a 4-byte block map
CHUNK_FORMAT_48BIT = 0x40
CHUNK_FORMAT_ALL = 0x7F

# --- xattrs -----------------------------------------------------------------
XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_LUSTRE = 5
XATTR_INDEX_SECURITY = 6
XATTR_LONG_PREFIX = 0x80

# Full-name prefix of each short index. The two ACL indexes name a whole
# xattr (their entries have an empty suffix), the others a namespace.
XATTR_PREFIXES: dict[int, bytes] = {
    XATTR_INDEX_USER: b"user.",
    XATTR_INDEX_POSIX_ACL_ACCESS: b"system.posix_acl_access",
    XATTR_INDEX_POSIX_ACL_DEFAULT: b"system.posix_acl_default",
    XATTR_INDEX_TRUSTED: b"trusted.",
    XATTR_INDEX_LUSTRE: b"lustre.",
    XATTR_INDEX_SECURITY: b"security.",
}

# --- directory entry file types (the kernel's FT_*) -------------------------
FT_UNKNOWN, FT_REG_FILE, FT_DIR, FT_CHRDEV, FT_BLKDEV, FT_FIFO, FT_SOCK, FT_SYMLINK = range(8)
FT_OF_MODE = {
    stat.S_IFREG: FT_REG_FILE, stat.S_IFDIR: FT_DIR, stat.S_IFCHR: FT_CHRDEV,
    stat.S_IFBLK: FT_BLKDEV, stat.S_IFIFO: FT_FIFO, stat.S_IFSOCK: FT_SOCK,
    stat.S_IFLNK: FT_SYMLINK,
}

# --- RAFS v6 (Nydus) around the EROFS image: rafs/src/metadata/layout/v6.rs -----
RAFS_EXT_SUPER_OFFSET = SUPER_OFFSET + 128          # 1152: the 256-byte extended superblock
RAFS_DEVT_SLOTOFF = 11                              # device table at 11 * 128 = 1408, right after it
RAFS_DEVT_OFFSET = RAFS_DEVT_SLOTOFF * DEVT_SLOT_SIZE
RAFS_INCOMPAT = FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE   # exactly this, always
RAFS_MAX_BLOBS = 254                                # device id = blob index + 1 must fit 8 bits
RAFS_MAX_CI_INDEX = (1 << 24) - 1                   # 24-bit ci index in a chunk index
RAFS_MAPPED_ALIGN = 512 << 10                       # mapped_blkaddr: bootstrap end rounded to 512 KiB

# RafsSuperFlags (rafs/src/metadata/mod.rs), the extended superblock's s_flags
RAFS_COMPRESSION_NONE = 0x1
RAFS_COMPRESSION_LZ4 = 0x2
RAFS_HASH_BLAKE3 = 0x4
RAFS_HASH_SHA256 = 0x8
RAFS_EXPLICIT_UID_GID = 0x10
RAFS_HAS_XATTR = 0x20
RAFS_COMPRESSION_GZIP = 0x40
RAFS_COMPRESSION_ZSTD = 0x80
RAFS_INLINED_CHUNK_DIGEST = 0x100
RAFS_TARFS_MODE = 0x200
RAFS_ENCRYPTION_NONE = 0x0100_0000
RAFS_ENCRYPTION_AES128XTS = 0x0200_0000
RAFS_PRESERVED_COMPAT = 0xFC00_0000
RAFS_KNOWN_FLAGS = 0x3FF | RAFS_ENCRYPTION_NONE | RAFS_ENCRYPTION_AES128XTS | RAFS_PRESERVED_COMPAT
RAFS_COMPRESSION_FLAGS = {"none": RAFS_COMPRESSION_NONE, "lz4": RAFS_COMPRESSION_LZ4,
                          "gzip": RAFS_COMPRESSION_GZIP, "zstd": RAFS_COMPRESSION_ZSTD}
RAFS_HASH_FLAGS = {"blake3": RAFS_HASH_BLAKE3, "sha256": RAFS_HASH_SHA256}

# RafsV5ChunkInfo flags (storage/src/device.rs BlobChunkFlags)
RAFS_CHUNK_COMPRESSED = 0x1
RAFS_CHUNK_HOLE = 0x2                               # obsolete
RAFS_CHUNK_ENCRYPTED = 0x4
RAFS_CHUNK_BATCH = 0x8
RAFS_CHUNK_HAS_CRC32 = 0x10

# --- structures ---------------------------------------------------------------


def _sized(fmt: str, size: int) -> struct.Struct:
    s = struct.Struct(fmt)
    assert s.size == size, (fmt, s.size, size)
    return s


# struct erofs_super_block (the 128-byte base; sb_extslots adds 16-byte slots we never use)
SUPERBLOCK = _sized("<IIIBBHQQIIII16s16sIHHHBBIQB3sIQQ", 128)
# struct erofs_deviceslot: tag, blocks_lo, uniaddr_lo (was mapped_blkaddr), blocks_hi, uniaddr_hi
DEVICE_SLOT = _sized("<64sIIIH50x", DEVT_SLOT_SIZE)
# struct erofs_inode_compact: format, xattr_icount, mode, i_nb, size, mtime, i_u, ino, uid, gid, reserved
INODE_COMPACT = _sized("<HHHHIIIIHHI", 32)
# struct erofs_inode_extended: format, xattr_icount, mode, i_nb, size, i_u, ino, uid, gid,
# mtime, mtime_nsec, nlink, reserved[16]
INODE_EXTENDED = _sized("<HHHHQIIIIQII16x", 64)
# struct erofs_xattr_ibody_header: name_filter, shared_count, reserved[7]
XATTR_IBODY_HEADER = _sized("<IB7x", 12)
# struct erofs_xattr_entry: name_len, name_index, value_size (then name, value)
XATTR_ENTRY = _sized("<BBH", 4)
# struct erofs_inode_chunk_index: startblk_hi (was advise), device_id, startblk_lo
CHUNK_INDEX = _sized("<HHI", 8)
BLOCK_MAP_ENTRY = _sized("<I", 4)
# RafsV6SuperBlockExt: flags, blob_table_offset, blob_table_size, chunk_size, chunk_table_offset,
# chunk_table_size, prefetch_table_offset, prefetch_table_size, padding, reserved[200]
RAFS_EXT_SUPERBLOCK = _sized("<QQIIQQQII200x", 256)
# RafsV6Blob: blob_id[64], blob_index, chunk_size, chunk_count, compression_algo, digest_algo,
# features, compressed_size, uncompressed_size, blob_toc_size, ci_compressor, ci_offset,
# ci_compressed_size, ci_uncompressed_size, blob_toc_digest[32], blob_meta_digest[32],
# blob_meta_size, cipher_iv[8], cipher_algo, reserved[36]
RAFS_BLOB = _sized("<64sIIIIIIQQIIQQQ32s32sQ8sI36x", 256)
# RafsV5ChunkInfo: digest[32], blob_index, flags, compressed_size, uncompressed_size,
# compressed_offset, uncompressed_offset, file_offset, index (in the blob's ci array), crc32
RAFS_CHUNK_INFO = _sized("<32sIIIIQQQII", 80)
RAFS_PREFETCH_ENTRY = _sized("<I", 4)               # an inode's nid
# struct erofs_dirent: nid, nameoff, file_type, reserved
DIRENT = _sized("<QHBB", 12)


@dataclass
class Superblock:
    """The fields of `struct erofs_super_block` pynydus sets or checks."""
    root_nid: int
    inos: int
    blocks: int
    meta_blkaddr: int
    feature_incompat: int
    feature_compat: int = 0
    blkszbits: int = BLKSZBITS
    sb_extslots: int = 0
    epoch: int = 0
    fixed_nsec: int = 0
    xattr_blkaddr: int = 0
    uuid: bytes = bytes(16)
    volume_name: bytes = bytes(16)
    extra_devices: int = 0
    devt_slotoff: int = 0
    dirblkbits: int = 0
    xattr_prefix_count: int = 0
    xattr_prefix_start: int = 0
    packed_nid: int = 0
    checksum: int = 0

    def pack(self) -> bytes:
        if not 0 <= self.root_nid <= 0xFFFF:
            raise FormatError(f"root nid {self.root_nid} does not fit the 16-bit superblock field")
        return SUPERBLOCK.pack(
            SUPER_MAGIC, self.checksum, self.feature_compat, self.blkszbits, self.sb_extslots,
            self.root_nid, self.inos, self.epoch, self.fixed_nsec, self.blocks, self.meta_blkaddr,
            self.xattr_blkaddr, self.uuid, self.volume_name, self.feature_incompat, 0,
            self.extra_devices, self.devt_slotoff, self.dirblkbits, self.xattr_prefix_count,
            self.xattr_prefix_start, self.packed_nid, 0, b"", 0, 0, 0)

    @classmethod
    def unpack(cls, buf) -> "Superblock":
        if len(buf) < SUPER_OFFSET + SUPERBLOCK.size:
            raise FormatError(f"image is {len(buf)} bytes, too small for an EROFS superblock")
        (magic, checksum, compat, blkszbits, extslots, rootnid_2b, inos, epoch, fixed_nsec,
         blocks_lo, meta_blkaddr, xattr_blkaddr, uuid, volume_name, incompat, _u1,
         extra_devices, devt_slotoff, dirblkbits, prefix_count, prefix_start, packed_nid,
         _filter_reserved, _r, _build_time, _rootnid_8b, _r2) = SUPERBLOCK.unpack_from(buf, SUPER_OFFSET)
        if magic != SUPER_MAGIC:
            raise FormatError(f"bad EROFS magic {magic:#010x} at offset {SUPER_OFFSET} "
                              f"(expected {SUPER_MAGIC:#010x})")
        return cls(root_nid=rootnid_2b, inos=inos, blocks=blocks_lo, meta_blkaddr=meta_blkaddr,
                   feature_incompat=incompat, feature_compat=compat, blkszbits=blkszbits,
                   sb_extslots=extslots, epoch=epoch, fixed_nsec=fixed_nsec,
                   xattr_blkaddr=xattr_blkaddr, uuid=uuid, volume_name=volume_name,
                   extra_devices=extra_devices, devt_slotoff=devt_slotoff, dirblkbits=dirblkbits,
                   xattr_prefix_count=prefix_count, xattr_prefix_start=prefix_start,
                   packed_nid=packed_nid, checksum=checksum)


def encode_dev(rdev: int) -> int:
    """A userspace dev_t (os.makedev) as the kernel's new_encode_dev() 32-bit value."""
    major, minor = os.major(rdev), os.minor(rdev)
    if major >= 1 << 12 or minor >= 1 << 20:
        raise FormatError(f"device number {major}:{minor} does not fit the kernel's 12:20-bit dev_t")
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def decode_dev(value: int) -> int:
    """The kernel's new_decode_dev(), returned as a userspace dev_t (os.makedev)."""
    major = (value & 0xFFF00) >> 8
    minor = (value & 0xFF) | ((value >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def split_xattr_name(name: bytes) -> tuple[int, bytes]:
    """(short index, suffix) for a full xattr name the kernel can serve, else FormatError.

    The VFS only routes user., trusted., security. and the two POSIX ACL names
    to EROFS, so nothing else could ever be read back from a mount.
    """
    if name == b"system.posix_acl_access":
        return XATTR_INDEX_POSIX_ACL_ACCESS, b""
    if name == b"system.posix_acl_default":
        return XATTR_INDEX_POSIX_ACL_DEFAULT, b""
    for index in (XATTR_INDEX_USER, XATTR_INDEX_TRUSTED, XATTR_INDEX_SECURITY):
        prefix = XATTR_PREFIXES[index]
        if name.startswith(prefix):
            suffix = name[len(prefix):]
            if not suffix:
                raise FormatError(f"xattr {name!r}: empty name after the namespace prefix")
            if len(suffix) > NAME_LEN:
                raise FormatError(f"xattr {name[:40]!r}...: name longer than {NAME_LEN} bytes "
                                  "after the namespace prefix")
            return index, suffix
    raise FormatError(f"xattr {name!r}: namespace not supported by EROFS (only user., trusted., "
                      "security., system.posix_acl_access and system.posix_acl_default)")


def xattr_entry_size(name_len: int, value_size: int) -> int:
    """erofs_xattr_entry_size(): header + name + value, rounded up to 4 bytes."""
    return (XATTR_ENTRY.size + name_len + value_size + 3) & ~3


def xattr_ibody_size(icount: int) -> int:
    """erofs_xattr_ibody_size(): bytes of inline xattrs for i_xattr_icount."""
    return 0 if icount == 0 else XATTR_IBODY_HEADER.size + 4 * (icount - 1)
