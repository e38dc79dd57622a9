"""Bootstrap = EROFS image + RAFS extension: round trip, extents, and every way it can be broken."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
import stat

import pytest

from rafs.bootstrap import FOOTER, BlobInfo, Bootstrap, Extent, PrefetchEntry, RafsMeta, write_bootstrap
from rafs.errors import FormatError
from rafs.erofs.writer import write_erofs
from rafs.tree import Inode, new_dir, walk
from tests.unit.test_erofs import Blobs, awkward_tree, check_reader, mounts, rnd, run  # noqa: F401


def blob_infos(blobs: Blobs) -> list[BlobInfo]:
    return [BlobInfo(blob_id=tag.decode(), compressed_size=len(v) // 2 + 1, uncompressed_size=len(v),
                     chunk_count=len(v) // 4096, toc_offset=len(v) // 2, toc_size=1,
                     toc_digest=hashlib.sha256(b"toc%d" % i).hexdigest(), compressor="zstd",
                     digester="sha256")
            for i, ((tag, _), v) in enumerate(zip(blobs.devices(), blobs.views))]


def make(root: Inode, blobs: Blobs, **kw) -> tuple[bytes, RafsMeta]:
    meta = RafsMeta(chunk_size=blobs.chunk_size, compressor="zstd", digester="sha256",
                    blobs=blob_infos(blobs), prefetch=[b"/files/size-1", b"/names/caf\xe9", b"/"], **kw)
    out = io.BytesIO()
    write_bootstrap(root, meta, out)
    return out.getvalue(), meta


@pytest.fixture(scope="module")
def boot():
    blobs = Blobs(2, 4096)
    root = awkward_tree(blobs)
    data, meta = make(root, blobs)
    return root, blobs, data, meta


def test_round_trip(boot, tmp_path):
    root, blobs, data, meta = boot
    b = Bootstrap.from_bytes(data)
    assert b.meta == meta
    check_reader(b.erofs, root, blobs)
    p = tmp_path / "image.boot"
    p.write_bytes(data)
    again = Bootstrap.open(p)
    assert again.meta == meta and again.erofs.sb == b.erofs.sb
    nid = b.resolve(b"/symlinks/abs")
    assert b.readlink(nid) == b"/etc/passwd" and b.getattr(nid).is_symlink()
    assert b.lookup(b.root_nid, b"files") == b.resolve(b"/files")
    assert [n for n, _, _ in b.readdir(b.resolve(b"/dev"))] == [b"fifo", b"maxdev", b"null", b"nvme", b"socket"]
    assert b.xattrs(b.root_nid) == root.xattrs
    assert b.resolve(b"/files/size-1/not-a-dir") is None and b.resolve(b"/nope") is None
    out = io.BytesIO()
    write_bootstrap(awkward_tree(Blobs(2, 4096)), meta, out)
    assert out.getvalue() == data, "bootstraps must be deterministic"


def _read_through(b: Bootstrap, blobs: Blobs, nid: int, offset: int, size: int) -> bytes:
    out = bytearray()
    expect = offset
    for e in b.file_extents(nid, offset, size):
        assert e.file_offset == expect and e.length > 0
        expect += e.length
        if e.blob_index < 0:
            assert e.blob_offset == -1
            out += bytes(e.length)
        else:
            out += blobs.views[e.blob_index][e.blob_offset:e.blob_offset + e.length]
    return bytes(out)


def test_file_extents_give_back_every_byte(boot):
    root, blobs, data, _ = boot
    b = Bootstrap.from_bytes(data)
    rng = random.Random(3)
    for path, node in walk(root):
        if not node.is_reg() or path.startswith(b"/big/"):
            continue
        nid = b.resolve(path)
        content = blobs.content[id(node)]
        assert _read_through(b, blobs, nid, 0, node.size) == content, path
        for _ in range(5):
            off = rng.randrange(0, node.size + 10)
            size = rng.randrange(0, 3 * blobs.chunk_size)
            assert _read_through(b, blobs, nid, off, size) == content[off:off + size], (path, off, size)


def test_file_extents_merge_and_holes():
    blobs = Blobs(1, 4096)
    root = new_dir()
    root.entries[b"seq"] = blobs.file(rnd(1, 3 * 4096 + 5))             # three chunks back to back
    sparse = bytearray(6 * 4096)
    sparse[4 * 4096:] = rnd(2, 2 * 4096)
    root.entries[b"sparse"] = blobs.file(bytes(sparse))
    data, _ = make(root, blobs)
    b = Bootstrap.from_bytes(data)
    seq = b.resolve(b"/seq")
    assert b.file_extents(seq, 0, 1 << 30) == [Extent(0, 3 * 4096 + 5, 0, 0)]
    assert b.file_extents(seq, 5000, 100) == [Extent(5000, 100, 0, 5000)]
    assert b.file_extents(seq, 3 * 4096 + 5, 10) == [] and b.file_extents(seq, 10, 0) == []
    sp = b.resolve(b"/sparse")
    assert b.file_extents(sp, 100, 6 * 4096) == [Extent(100, 4 * 4096 - 100, -1, -1),
                                                 Extent(4 * 4096, 2 * 4096, 0, 16384)]
    with pytest.raises(OSError):
        b.file_extents(b.root_nid, 0, 10)


def test_kernel_and_fsck_accept_the_bootstrap_file(boot, tmp_path, mounts):
    root, blobs, data, _ = boot
    p = tmp_path / "image.boot"
    p.write_bytes(data)
    devs = blobs.write(tmp_path)
    run("fsck.erofs", *[f"--device={d}" for d in devs], p)
    mnt = mounts(p, devs)
    node = root.entries[b"files"].entries[b"size-%d" % (3 * 4096 + 7)]
    assert (mnt / "files" / ("size-%d" % (3 * 4096 + 7))).read_bytes() == blobs.content[id(node)]


# --- damage -------------------------------------------------------------------------


def _footer(data: bytes):
    return list(FOOTER.unpack_from(data, len(data) - FOOTER.size))


def _refooter(data: bytes, **changes) -> bytes:
    f = _footer(data)
    names = ["magic", "version", "flags", "offset", "size", "digest"]
    for k, v in changes.items():
        f[names.index(k)] = v
    return data[:-FOOTER.size] + FOOTER.pack(*f)


def test_damage_is_reported(boot):
    _, _, data, _ = boot
    off, size = _footer(data)[3:5]
    cases = [
        (data[:-FOOTER.size] + b"NOTABOOT" + data[-FOOTER.size + 8:], "bad RAFS footer magic"),
        (data[:-1], "bad RAFS footer magic"),                    # truncated: the footer is gone
        (data[:off + size], "bad RAFS footer magic"),
        (data[:10], "too short"),
        (data[:off + 5] + bytes([data[off + 5] ^ 1]) + data[off + 6:], "digest mismatch"),
        (data[:off - 4096] + data[off:], "does not fit"),       # a block cut out of the middle
        (_refooter(data, version=9), "version 9"),
        (_refooter(data, offset=off + 4096), "does not fit"),
        (data[:1024] + b"\0\0\0\0" + data[1028:], "bad EROFS magic"),
        (_refooter(data[:4096] + data[off:], offset=4096), "truncated EROFS image"),
    ]
    for bad, match in cases:
        with pytest.raises(FormatError, match=match):
            Bootstrap.from_bytes(bad)


def _with_payload(erofs: bytes, payload: bytes) -> bytes:
    return erofs + payload + FOOTER.pack(b"RAFSBOOT", 1, 0, len(erofs), len(payload),
                                         hashlib.sha256(payload).digest())


def test_extension_and_device_table_must_agree(boot):
    _, blobs, data, meta = boot
    off, size = _footer(data)[3:5]
    erofs, payload = data[:off], data[off:off + size]
    doc = payload.replace(meta.blobs[0].blob_id.encode(), b"0" * 64)
    with pytest.raises(FormatError, match="does not match"):
        Bootstrap.from_bytes(_with_payload(erofs, doc))
    other = io.BytesIO()
    write_erofs(new_dir(), other, chunk_size=4096, devices=[])
    with pytest.raises(FormatError, match="0 devices"):
        Bootstrap.from_bytes(_with_payload(other.getvalue(), payload))
    for bad in (b"{", b"[]", b'{"version": 1}', payload.replace(b'"zstd"', b'"gzip"', 1),
                payload.replace(b'"chunk_size":4096', b'"chunk_size":4097'),
                payload.replace(b'"chunk_size":4096', b'"chunk_size":true'),
                payload.replace(b'"version":1', b'"version":2'), b"\xff"):
        with pytest.raises(FormatError):
            Bootstrap.from_bytes(_with_payload(erofs, bad))


@pytest.mark.parametrize("change, match", [
    ({"compressor": "gzip"}, "compressor"),
    ({"digester": "md5"}, "digester"),
    ({"chunk_size": 3 * 4096}, "chunk_size"),
    ({"chunk_size": 32 << 20}, "chunk_size"),
    ({"prefetch": ["relative"]}, "prefetch"),
    ({"prefetch": [b"relative"]}, "prefetch"),
    ({"version": 2}, "version"),
])
def test_write_rejects_bad_meta(boot, change, match):
    _, _, _, meta = boot
    with pytest.raises(FormatError, match=match):
        write_bootstrap(new_dir(), dataclasses.replace(meta, **change), io.BytesIO())


RANGED = [PrefetchEntry(b"/files/size-1", ((0, 4096), (8192, 1))), PrefetchEntry(b"/names/caf\xe9", ((7, 3),)),
          PrefetchEntry(b"/")]


def test_ranged_prefetch_round_trip(boot):
    root, blobs, _, meta = boot
    ranged = dataclasses.replace(meta, prefetch=RANGED)
    out = io.BytesIO()
    write_bootstrap(root, ranged, out)
    b = Bootstrap.from_bytes(out.getvalue())
    assert b.meta == ranged and b.meta.prefetch == RANGED
    off, size = _footer(out.getvalue())[3:5]
    doc = json.loads(out.getvalue()[off:off + size])
    # whole files stay bare paths; ranged entries are {"path", "ranges": [[offset, length]]}
    assert doc["prefetch"] == [{"path": "/files/size-1", "ranges": [[0, 4096], [8192, 1]]},
                               {"path": {"base64": "L25hbWVzL2NhZuk="}, "ranges": [[7, 3]]}, "/"]


def test_old_style_prefetch_list_still_reads(boot):
    # a bootstrap written before ranged entries: bare paths only, byte-identical to what we write now
    root, blobs, data, meta = boot
    off, size = _footer(data)[3:5]
    assert json.loads(data[off:off + size])["prefetch"] == ["/files/size-1", {"base64": "L25hbWVzL2NhZuk="}, "/"]
    assert Bootstrap.from_bytes(data).meta.prefetch == [
        PrefetchEntry(b"/files/size-1"), PrefetchEntry(b"/names/caf\xe9"), PrefetchEntry(b"/")]


@pytest.mark.parametrize("entry", [
    '{"path":"/a","ranges":[]}', '{"path":"/a","ranges":[[0,0]]}', '{"path":"/a","ranges":[[-1,5]]}',
    '{"path":"/a","ranges":[[0,1.5]]}', '{"path":"/a","ranges":[[0,true]]}', '{"path":"/a","ranges":[[0]]}',
    '{"path":"/a","ranges":[[0,1,2]]}', '{"path":"/a","ranges":[[10,1],[0,1]]}',
    '{"path":"/a","ranges":[[0,10],[5,1]]}', '{"path":"/a","ranges":[[9223372036854775807,2]]}',
    '{"path":"/a","ranges":"0+1"}', '{"path":"a","ranges":[[0,1]]}', '{"path":"/a"}',
    '{"path":"/a","ranges":[[0,1]],"x":1}', '{"path":3,"ranges":[[0,1]]}',
])
def test_bad_ranged_prefetch_entries_are_rejected(boot, entry):
    _, _, data, _ = boot
    off, size = _footer(data)[3:5]
    doc = json.loads(data[off:off + size])
    doc["prefetch"] = [json.loads(entry)]
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(FormatError, match="prefetch"):
        Bootstrap.from_bytes(_with_payload(data[:off], payload))


@pytest.mark.parametrize("change, match", [
    ({"blob_id": "ABC"}, "blob_id"),
    ({"toc_digest": "z" * 64}, "toc_digest"),
    ({"uncompressed_size": 4097}, "4 KiB"),
    ({"chunk_count": -1}, "chunk_count"),
    ({"compressor": "xz"}, "compressor"),
])
def test_write_rejects_bad_blob_info(boot, change, match):
    _, _, _, meta = boot
    blobs = [dataclasses.replace(meta.blobs[0], **change)] + meta.blobs[1:]
    with pytest.raises(FormatError, match=match):
        write_bootstrap(new_dir(), dataclasses.replace(meta, blobs=blobs), io.BytesIO())


def test_empty_image_without_blobs():
    out = io.BytesIO()
    meta = RafsMeta(chunk_size=1 << 20, compressor="none", digester="blake3", blobs=[])
    root = new_dir()
    root.entries[b"empty"] = Inode(stat.S_IFREG | 0o644)
    write_bootstrap(root, meta, out)
    b = Bootstrap.from_bytes(out.getvalue())
    assert b.meta == meta and b.erofs.devices == []
    assert b.file_extents(b.resolve(b"/empty"), 0, 100) == []
    data = out.getvalue()
    off, size = _footer(data)[3:5]
    assert off % 4096 == 0 and len(data) == off + size + FOOTER.size == off + size + 64
