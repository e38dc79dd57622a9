"""A tar reader for layer streams: headers decoded straight from large decompressed
blocks, file data handed out as zero-copy views of those blocks.

Why not `tarfile` in stream mode: it reads through a 10 KiB buffer, copies every
byte several times and spends ~25 us of Python per header, all on the one thread
that every other stage of a layer's conversion waits for. Here a plain header
(ustar, GNU or v7 without extensions: what Debian, umoci and docker layers are
made of) is decoded by hand, exactly as `tarfile.TarInfo.frombuf` decodes it;
any other header (PAX, GNU long names, sparse files, global headers, unknown
types, numbers in base-256, damaged headers) goes through
`tarfile.TarInfo.fromtarfile` over the same stream, so those keep tarfile's
semantics, and so does the end of the archive (`TarFile.next`'s rules).
"""
from __future__ import annotations

import collections
import struct
import tarfile
from collections.abc import Callable, Iterator

BLOCK = tarfile.BLOCKSIZE
_ZERO = bytes(BLOCK)
# Types a hand-decoded header may have; data follows only the regular ones (as in tarfile).
_REGULAR = frozenset((tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE))
_FAST = _REGULAR | {tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                    tarfile.BLKTYPE, tarfile.FIFOTYPE}


class Member:
    """One archive member, names as raw bytes. `pax` holds its PAX records (str -> str, as
    tarfile decodes them; {} for a plain header); `sparse` the (offset, size) map of a sparse file."""
    __slots__ = ("name", "type", "mode", "uid", "gid", "size", "mtime", "linkname",
                 "devmajor", "devminor", "pax", "sparse", "_data_end", "_next")

    def __init__(self, name: bytes, type: bytes, mode: int, uid: int, gid: int, size: int, mtime,
                 linkname: bytes, devmajor: int, devminor: int, pax: dict, sparse: list | None,
                 data_end: int, next_header: int):
        self.name, self.type, self.mode, self.uid, self.gid = name, type, mode, uid, gid
        self.size, self.mtime, self.linkname = size, mtime, linkname
        self.devmajor, self.devminor, self.pax, self.sparse = devmajor, devminor, pax, sparse
        self._data_end, self._next = data_end, next_header


def _nts(b: bytes) -> bytes:
    p = b.find(b"\0")
    return b if p < 0 else b[:p]


def _nti(b: bytes) -> int:
    """A number field as tarfile's nti reads octal ones; ValueError for anything else
    (base-256 included: the caller lets tarfile decode those)."""
    p = b.find(b"\0")
    if p >= 0:
        b = b[:p]
    try:
        return int(b, 8)            # int() skips surrounding whitespace, as nti's strip() does
    except ValueError:
        if b.strip():
            raise
        return 0


# name mode uid gid size mtime chksum type linkname magic+version uname gname devmajor devminor prefix
_HEADER = struct.Struct("100s8s8s8s12s12s8s1s100s8s32s32s8s8s155s")


def _fast_member(h, pos: int) -> Member | None:
    """Decode a plain header like TarInfo.frombuf + _proc_builtin; None when tarfile must."""
    h = bytes(h)
    (name, mode, uid, gid, size, mtime, chksum, kind, linkname, _magic, _uname, _gname,
     devmajor, devminor, prefix) = _HEADER.unpack_from(h)
    if kind not in _FAST or 0x80 & (mode[0] | uid[0] | gid[0] | size[0] | mtime[0] | chksum[0]
                                    | devmajor[0] | devminor[0]):
        return None                 # another type, or a base-256 number
    try:
        mode, uid, gid, size, mtime = _nti(mode), _nti(uid), _nti(gid), _nti(size), _nti(mtime)
        chksum, devmajor, devminor = _nti(chksum), _nti(devmajor), _nti(devminor)
    except ValueError:
        return None
    if chksum != 256 + sum(h) - sum(h[148:156]):
        return None                 # a signed checksum, or a bad one: tarfile decides
    name = _nts(name)
    if kind == tarfile.AREGTYPE and name.endswith(b"/"):
        kind = tarfile.DIRTYPE
    if kind == tarfile.DIRTYPE:
        name = name.rstrip(b"/")
    prefix = _nts(prefix)
    if prefix:
        name = prefix + b"/" + name
        if kind == tarfile.DIRTYPE:
            name = name.rstrip(b"/")
    data = pos + BLOCK
    if kind in _REGULAR:
        end, nxt = data + size, data + (-(-size // BLOCK) * BLOCK)
    else:
        end = nxt = data
    return Member(name, kind, mode, uid, gid, size, mtime, _nts(linkname), devmajor, devminor,
                  {}, None, end, nxt)


def _raw(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


class _TarfileShim:
    """What TarInfo.fromtarfile needs of a TarFile, reading from a TarStream."""

    encoding = "utf-8"
    errors = "surrogateescape"

    def __init__(self, stream: "TarStream"):
        self.fileobj = self
        self._stream = stream
        self.pax_headers: dict = {}     # global PAX headers, kept across members as TarFile does
        self.offset = 0

    def read(self, n: int) -> bytes:
        return bytes(self._stream.read(n))

    def tell(self) -> int:
        return self._stream.pos


class TarStream:
    """Members of a tar archive read from `next_block()` (bytes; b"" at the end).

    Iterate for the members; read a regular member's data with `chunks()` before the
    next member (data left unread is skipped).
    """

    def __init__(self, next_block: Callable[[], bytes]):
        self._next_block = next_block
        self._cur = memoryview(b"")
        self._off = 0
        self._ahead: collections.deque = collections.deque()    # blocks peeked at, after _cur
        self._eof = False
        self.pos = 0                    # absolute offset of the next unread byte
        self._shim = _TarfileShim(self)

    # -- byte access ------------------------------------------------------------
    def _pull(self) -> memoryview | None:
        if self._ahead:
            return self._ahead.popleft()
        if self._eof:
            return None
        block = self._next_block()
        if not block:
            self._eof = True
            return None
        return memoryview(block)

    def _peek(self, n: int):
        """The next `n` bytes (fewer at the end), not consumed."""
        avail = len(self._cur) - self._off
        if avail >= n:
            return self._cur[self._off:self._off + n]
        pieces, have = [self._cur[self._off:]], avail
        for b in self._ahead:
            if have >= n:
                break
            pieces.append(b[:n - have])
            have += len(pieces[-1])
        while have < n and not self._eof:
            block = self._next_block()
            if not block:
                self._eof = True
                break
            mv = memoryview(block)
            self._ahead.append(mv)
            pieces.append(mv[:n - have])
            have += len(pieces[-1])
        return b"".join(pieces)

    def read(self, n: int):
        """The next `n` bytes (fewer only at the end): a view into one block when they lie
        in one (no copy), else a joined copy."""
        avail = len(self._cur) - self._off
        if avail >= n:
            out = self._cur[self._off:self._off + n]
            self._off += n
            self.pos += n
            return out
        return b"".join(self._advance(n, keep=True)[0])

    def skip(self, n: int) -> int:
        return self._advance(n, keep=False)[1]

    def _advance(self, n: int, *, keep: bool) -> tuple[list, int]:
        """Move `n` bytes on (fewer only at the end), across blocks; (the pieces if `keep`, how many)."""
        pieces, have = [], 0
        while have < n:
            avail = len(self._cur) - self._off
            if not avail:
                nxt = self._pull()
                if nxt is None:
                    break
                self._cur, self._off = nxt, 0
                continue
            take = min(avail, n - have)
            if keep:
                pieces.append(self._cur[self._off:self._off + take])
            self._off += take
            have += take
        self.pos += have
        return pieces, have

    def tell(self) -> int:
        return self.pos

    # -- members ------------------------------------------------------------------
    def __iter__(self) -> Iterator[Member]:
        fast = True
        while True:
            start = self.pos
            h = self._peek(BLOCK)
            m = _fast_member(h, start) if fast and len(h) == BLOCK and h != _ZERO else None
            if m is not None:
                self.skip(BLOCK)
            else:
                m = self._slow_member(start)
                if m is None:
                    return
                fast = not self._shim.pax_headers     # global headers patch every later member
            yield m
            rest = m._next - self.pos         # data the caller left unread, and the padding
            if rest < 0 or self.skip(rest) < rest:
                raise tarfile.ReadError("unexpected end of data")

    def _slow_member(self, start: int) -> Member | None:
        """The member at `start` decoded by tarfile, or None at the end of the archive,
        with TarFile.next's rules: a bad first header is an error, a bad later one ends it."""
        shim = self._shim
        shim.offset = start
        try:
            ti = tarfile.TarInfo.fromtarfile(shim)
        except tarfile.EOFHeaderError:
            return None
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as e:
            if start == 0:
                raise tarfile.ReadError(str(e)) from None
            return None
        except tarfile.EmptyHeaderError:
            if start == 0:
                raise tarfile.ReadError("empty file") from None
            return None
        except tarfile.SubsequentHeaderError as e:
            raise tarfile.ReadError(str(e)) from None
        if self.pos < ti.offset_data and self.skip(ti.offset_data - self.pos) < ti.offset_data - self.pos:
            raise tarfile.ReadError("unexpected end of data")
        stored = sum(n for _, n in ti.sparse) if ti.sparse is not None else ti.size
        regular = ti.isreg() or ti.type not in tarfile.SUPPORTED_TYPES
        return Member(_raw(ti.name), ti.type, ti.mode, ti.uid, ti.gid, ti.size, ti.mtime, _raw(ti.linkname),
                      ti.devmajor, ti.devminor, ti.pax_headers, ti.sparse,
                      ti.offset_data + (stored if regular else 0), shim.offset)

    def chunks(self, m: Member, chunk_size: int) -> Iterator:
        """A regular member's content in `chunk_size` pieces (the last one shorter); views
        into the stream's blocks where a piece lies in one. Sparse holes read as zeros."""
        if m.sparse is not None:
            yield from self._sparse_chunks(m, chunk_size)
            return
        remaining = m.size
        while remaining > 0:
            want = min(chunk_size, remaining)
            data = self.read(want)
            if len(data) != want:
                raise tarfile.ReadError("unexpected end of data")
            remaining -= want
            yield data

    def _sparse_chunks(self, m: Member, chunk_size: int) -> Iterator[bytes]:
        buf, pos = bytearray(), 0

        def fill(data) -> Iterator[bytes]:
            buf.extend(data)
            while len(buf) >= chunk_size:
                yield bytes(buf[:chunk_size])
                del buf[:chunk_size]

        for offset, size in m.sparse:
            while pos < offset:
                gap = min(offset - pos, chunk_size)
                yield from fill(bytes(gap))
                pos += gap
            data = self.read(size)
            if len(data) != size:
                raise tarfile.ReadError("unexpected end of data")
            yield from fill(data)
            pos += size
        while pos < m.size:
            gap = min(m.size - pos, chunk_size)
            yield from fill(bytes(gap))
            pos += gap
        if buf:
            yield bytes(buf)
