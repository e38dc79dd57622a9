"""converter.tarstream: the hand-decoded tar reader gives what tarfile gives, on every header kind."""
import io
import os
import tarfile

import pytest

from converter.tarstream import TarStream


def _members(data: bytes, block: int, chunk: int = 4096):
    """[(name, type, mode, uid, gid, size, mtime, linkname, devmajor, devminor, pax, content)] via TarStream."""
    f = io.BytesIO(data)
    ts = TarStream(lambda: f.read(block))
    out = []
    for m in ts:
        content = None
        if m.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE):
            pieces = list(ts.chunks(m, chunk))
            assert all(len(p) == chunk for p in pieces[:-1])
            content = b"".join(bytes(p) for p in pieces)
        out.append((m.name, m.type, m.mode, m.uid, m.gid, m.size, int(m.mtime), m.linkname,
                    m.devmajor, m.devminor, dict(m.pax), content))
    return out


def _reference(data: bytes):
    raw = lambda s: s.encode("utf-8", "surrogateescape")  # noqa: E731
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|", errors="surrogateescape") as tf:
        for ti in tf:
            content = tf.extractfile(ti).read() if ti.isreg() else None
            out.append((raw(ti.name), ti.type, ti.mode, ti.uid, ti.gid, ti.size, int(ti.mtime), raw(ti.linkname),
                        ti.devmajor, ti.devminor, dict(ti.pax_headers), content))
    return out


def _tar(fmt, entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _info(name, type=tarfile.REGTYPE, size=0, **kw):
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mtime, ti.mode = type, size, kw.pop("mtime", 1700000000), kw.pop("mode", 0o644)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _entries(long: bool):
    rnd = os.urandom(20000)
    base = "d" * 120 + "/" if long else "dir/"
    return [
        (_info(base, tarfile.DIRTYPE, mode=0o755), None),
        (_info(base + "file", size=len(rnd), uid=1000, gid=1000), rnd),
        (_info(base + "empty"), b""),
        (_info(base + "exact", size=512), b"x" * 512),
        (_info(base + "link", tarfile.SYMTYPE, linkname="../" + "t" * (150 if long else 3)), None),
        (_info(base + "hard", tarfile.LNKTYPE, linkname=base + "file"), None),
        (_info("dev", tarfile.CHRTYPE, devmajor=1, devminor=3), None),
        (_info("blk", tarfile.BLKTYPE, devmajor=8, devminor=1), None),
        (_info("fifo", tarfile.FIFOTYPE), None),
        (_info("caf\udcc3", size=3), b"abc"),                 # a non-UTF-8 name byte
    ]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("block", [512, 1000, 1 << 20])
def test_same_as_tarfile(fmt, block):
    long = fmt != tarfile.USTAR_FORMAT
    entries = _entries(long)
    if fmt == tarfile.USTAR_FORMAT:
        entries = [e for e in entries if "\udcc3" not in e[0].name]
    data = _tar(fmt, entries)
    assert _members(data, block) == _reference(data)


def test_pax_records_and_global_headers():
    ti = _info("x", size=2)
    ti.pax_headers = {"SCHILY.xattr.user.k": "v", "mtime": "1700000000.5"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"comment": "global"}) as tf:
        tf.addfile(ti, io.BytesIO(b"hi"))
        tf.addfile(_info("y", size=1), io.BytesIO(b"!"))
    data = buf.getvalue()
    got = _members(data, 700)
    assert got == _reference(data)
    assert got[0][10]["SCHILY.xattr.user.k"] == "v" and got[1][10] == {"comment": "global"}


def test_base256_numbers_and_prefix():
    big = _info("p" * 90 + "/" + "q" * 90, size=3, uid=0o10000000, gid=5)    # uid needs base-256 (GNU)
    data = _tar(tarfile.GNU_FORMAT, [(big, b"abc")]) + _tar(tarfile.USTAR_FORMAT,
                                                             [(_info("a" * 100 + "/" + "b" * 50, size=1), b"z")])
    assert _members(data, 4096) == _reference(data)


def test_v7_directory_as_trailing_slash():
    ti = _info("olddir/", tarfile.AREGTYPE)
    data = _tar(tarfile.USTAR_FORMAT, [(ti, None)])
    got = _members(data, 512)
    assert got == _reference(data) and got[0][1] == tarfile.DIRTYPE and got[0][0] == b"olddir"


def test_gnu_sparse_file(tmp_path):
    # GNU tar's old sparse format, written by hand: 'S' header with a map of 2 data segments
    def octal(n, width):
        return ("%0*o" % (width - 1, n)).encode() + b"\0"
    segs = [(0, 512), (8192, 512)]
    stored = b"A" * 512 + b"B" * 512
    h = bytearray(512)
    h[0:6] = b"sparse"
    h[100:108], h[108:116], h[116:124] = octal(0o644, 8), octal(0, 8), octal(0, 8)
    h[124:136], h[136:148] = octal(len(stored), 12), octal(1700000000, 12)
    h[156:157] = b"S"
    h[257:265] = b"ustar  \0"
    pos = 386
    for off, n in segs:
        h[pos:pos + 12], h[pos + 12:pos + 24] = octal(off, 12), octal(n, 12)
        pos += 24
    h[483:495] = octal(10000, 12)                   # real size
    h[148:156] = b" " * 8
    h[148:156] = ("%06o" % sum(h)).encode() + b"\0 "
    data = bytes(h) + stored + bytes(1024)
    got = _members(data, 300)
    ref = _reference(data)
    assert got == ref
    assert got[0][11] == b"A" * 512 + bytes(8192 - 512) + b"B" * 512 + bytes(10000 - 8704)


def test_end_of_archive_rules():
    data = _tar(tarfile.USTAR_FORMAT, [(_info("a", size=1), b"1")])
    # garbage after the end marker is not read as members; a bad later header ends the archive
    assert [m[0] for m in _members(data + b"garbage" * 100, 512)] == [b"a"]
    bad = bytearray(_tar(tarfile.USTAR_FORMAT, [(_info("b"), b"")])[:512])
    bad[0] ^= 1
    assert [m[0] for m in _members(data[:1024] + bytes(bad), 512)] == [b"a"]
    # a bad first header or an empty stream is an error
    with pytest.raises(tarfile.ReadError):
        _members(bytes(bad), 512)
    with pytest.raises(tarfile.ReadError):
        _members(b"", 512)


def test_truncated_data_is_an_error():
    data = _tar(tarfile.USTAR_FORMAT, [(_info("a", size=5000), os.urandom(5000))])
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        _members(data[:512 + 3000], 700)
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        _members(data[:512 + 5000 + 10], 700)        # cut in the padding


def test_views_are_zero_copy_within_a_block():
    data = _tar(tarfile.USTAR_FORMAT, [(_info("a", size=3000), os.urandom(3000))])
    f = io.BytesIO(data)
    ts = TarStream(lambda: f.read(1 << 20))
    m = next(iter(ts))
    assert all(isinstance(p, memoryview) for p in ts.chunks(m, 1024))
