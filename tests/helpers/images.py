"""Test-image factory: OCI image layouts built from a declarative spec.

Independent of the code under test: layer tars are written by Python's
`tarfile` (PAX format) so every header field is under our control, and the
layout (oci-layout, index.json, blobs, manifest, config) is written by hand.

Spec vocabulary
---------------
* Content: `data(b)`, `zeros(n)`, `random(n, seed)`, `repeat(c, times)`,
  `concat(*parts)`, `host_file(path)`. Content is streamed, never held in
  memory whole (except `data`).
* `Entry`: one tar member. Build with the class methods `Entry.dir`,
  `.file`, `.symlink`, `.hardlink`, `.chardev`, `.blockdev`, `.fifo`,
  `.whiteout` (path = the thing deleted; written as `DIR/.wh.NAME`) and
  `.opaque` (path = the directory; written as `DIR/.wh..wh..opq`).
  Paths are bytes (str is encoded with surrogateescape) and are written
  *verbatim*: no normalisation, so `../x`, `/abs` and `./x` reach the tar.
  Times are integer nanoseconds (`mtime_ns`); sub-second values are written
  as an exact PAX `mtime` record. xattrs go to PAX `SCHILY.xattr.NAME`.
* `Layer`: entries plus per-layer compression, deliberate corruption
  (`"truncate"` / `"bitflip"`) or `raw_tar` bytes.

Entry points: `write_layer`, `build_oci_layout`, and the ready-made specs
`awkward_image_layers`, `busybox_image_layers` (+ `BUSYBOX_CONFIG`),
`malicious_layers`.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform as _platform
import random as _random
import shutil
import struct
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import zstandard

# 2023-11-14T22:13:20Z: default mtime of every entry, so builds are reproducible.
DEFAULT_MTIME_NS = 1_700_000_000 * 10**9
CREATED = "2023-11-14T22:13:20Z"

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = {
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "none": "application/vnd.oci.image.layer.v1.tar",
}
REF_NAME = "org.opencontainers.image.ref.name"

WHITEOUT_PREFIX = b".wh."
OPAQUE_NAME = b".wh..wh..opq"

_READ_BLOCK = 1 << 20


def _b(p: str | bytes | os.PathLike) -> bytes:
    if isinstance(p, bytes):
        return p
    return os.fsencode(p)


def _s(b: bytes) -> str:
    """bytes -> str that tarfile turns back into exactly these bytes."""
    return b.decode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------

class Content:
    """Bytes of a regular file, produced on demand in pieces."""

    size: int
    _sha: str | None = None

    def iter_bytes(self) -> Iterator[bytes]:
        raise NotImplementedError

    def read(self) -> bytes:
        return b"".join(self.iter_bytes())

    def sha256(self) -> str:
        if self._sha is None:
            h = hashlib.sha256()
            for piece in self.iter_bytes():
                h.update(piece)
            self._sha = h.hexdigest()
        return self._sha

    def open(self) -> io.BufferedReader:
        return io.BufferedReader(_ContentReader(self), _READ_BLOCK)

    def __len__(self) -> int:
        return self.size


class _ContentReader(io.RawIOBase):
    def __init__(self, content: Content):
        self._it = content.iter_bytes()
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


class _Data(Content):
    def __init__(self, b: bytes):
        self._b = bytes(b)
        self.size = len(self._b)

    def iter_bytes(self):
        if self._b:
            yield self._b

    def __repr__(self):
        return f"data({self._b[:16]!r}{'...' if self.size > 16 else ''})"


class _Zeros(Content):
    _ZERO = bytes(_READ_BLOCK)

    def __init__(self, n: int):
        self.size = n

    def iter_bytes(self):
        left = self.size
        while left > 0:
            k = min(left, _READ_BLOCK)
            yield self._ZERO if k == _READ_BLOCK else bytes(k)
            left -= k

    def __repr__(self):
        return f"zeros({self.size})"


class _Random(Content):
    _BLOCK = 64 * 1024  # fixed: the byte stream depends only on (size, seed)

    def __init__(self, n: int, seed: int):
        self.size, self.seed = n, seed

    def iter_bytes(self):
        rng = _random.Random(self.seed)
        left = self.size
        while left > 0:
            blk = rng.randbytes(self._BLOCK)
            yield blk[:left] if left < self._BLOCK else blk
            left -= self._BLOCK

    def __repr__(self):
        return f"random({self.size}, seed={self.seed})"


class _Concat(Content):
    def __init__(self, parts: Sequence[Content]):
        self.parts = [as_content(p) for p in parts]
        self.size = sum(p.size for p in self.parts)

    def iter_bytes(self):
        for p in self.parts:
            yield from p.iter_bytes()

    def __repr__(self):
        return f"concat({', '.join(map(repr, self.parts))})"


class _HostFile(Content):
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.size = self.path.stat().st_size

    def iter_bytes(self):
        with open(self.path, "rb") as f:
            while piece := f.read(_READ_BLOCK):
                yield piece

    def __repr__(self):
        return f"host_file({str(self.path)!r})"


def data(b: bytes | str) -> Content:
    return _Data(b.encode() if isinstance(b, str) else b)


def zeros(n: int) -> Content:
    return _Zeros(n)


def random(n: int, seed: int = 0) -> Content:  # noqa: A001 - spec vocabulary
    return _Random(n, seed)


def concat(*parts: Content | bytes) -> Content:
    return _Concat(parts)


def repeat(c: Content | bytes, times: int) -> Content:
    return _Concat([as_content(c)] * times)


def host_file(path: str | os.PathLike) -> Content:
    return _HostFile(path)


def as_content(c: Content | bytes | str | None) -> Content:
    if c is None:
        return _Data(b"")
    if isinstance(c, Content):
        return c
    return data(c)


# --------------------------------------------------------------------------
# Entries
# --------------------------------------------------------------------------

DIR, FILE, SYMLINK, HARDLINK = "dir", "file", "symlink", "hardlink"
CHAR, BLOCK, FIFO, WHITEOUT, OPAQUE = "char", "block", "fifo", "whiteout", "opaque"

_DEFAULT_MODE = {DIR: 0o755, FILE: 0o644, SYMLINK: 0o777, HARDLINK: 0o644,
                 CHAR: 0o600, BLOCK: 0o600, FIFO: 0o644, WHITEOUT: 0o644, OPAQUE: 0o644}
_TAR_TYPE = {DIR: tarfile.DIRTYPE, FILE: tarfile.REGTYPE, SYMLINK: tarfile.SYMTYPE,
             HARDLINK: tarfile.LNKTYPE, CHAR: tarfile.CHRTYPE, BLOCK: tarfile.BLKTYPE,
             FIFO: tarfile.FIFOTYPE, WHITEOUT: tarfile.REGTYPE, OPAQUE: tarfile.REGTYPE}


@dataclass
class Entry:
    """One tar member of a layer.

    `path` is the member name as written (bytes, verbatim); for WHITEOUT it is
    the path being deleted and for OPAQUE the directory made opaque (the tar
    name is derived, see `tar_name`). `mode` holds permission bits only
    (0o7777, incl. setuid/setgid/sticky). `target` is the symlink target or
    the hardlink's target member name. `pax` adds raw PAX records.
    """
    kind: str
    path: bytes
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime_ns: int = DEFAULT_MTIME_NS
    content: Content | None = None
    target: bytes | None = None
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    major: int = 0
    minor: int = 0
    uname: str = ""
    gname: str = ""
    pax: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in _TAR_TYPE:
            raise ValueError(f"unknown entry kind {self.kind!r}")
        self.path = _b(self.path)
        if self.target is not None:
            self.target = _b(self.target)
        if self.mode is None:
            self.mode = _DEFAULT_MODE[self.kind]
        if self.kind == FILE:
            self.content = as_content(self.content)
        self.xattrs = {_b(k): _b(v) if isinstance(v, str) else bytes(v)
                       for k, v in self.xattrs.items()}

    # -- constructors ------------------------------------------------------
    @classmethod
    def dir(cls, path, mode=0o755, **kw) -> "Entry":
        return cls(DIR, path, mode=mode, **kw)

    @classmethod
    def file(cls, path, content: Content | bytes | str = b"", mode=0o644, **kw) -> "Entry":
        return cls(FILE, path, mode=mode, content=as_content(content), **kw)

    @classmethod
    def symlink(cls, path, target, **kw) -> "Entry":
        return cls(SYMLINK, path, target=target, **kw)

    @classmethod
    def hardlink(cls, path, target, **kw) -> "Entry":
        return cls(HARDLINK, path, target=target, **kw)

    @classmethod
    def chardev(cls, path, major, minor, mode=0o600, **kw) -> "Entry":
        return cls(CHAR, path, mode=mode, major=major, minor=minor, **kw)

    @classmethod
    def blockdev(cls, path, major, minor, mode=0o600, **kw) -> "Entry":
        return cls(BLOCK, path, mode=mode, major=major, minor=minor, **kw)

    @classmethod
    def fifo(cls, path, mode=0o644, **kw) -> "Entry":
        return cls(FIFO, path, mode=mode, **kw)

    @classmethod
    def whiteout(cls, path, **kw) -> "Entry":
        """Delete `path` (and its subtree) from lower layers: `DIR/.wh.NAME`."""
        return cls(WHITEOUT, path, **kw)

    @classmethod
    def opaque(cls, dirpath, **kw) -> "Entry":
        """Hide all lower-layer children of `dirpath`: `DIR/.wh..wh..opq`."""
        return cls(OPAQUE, dirpath, **kw)

    # -- tar ---------------------------------------------------------------
    @property
    def tar_name(self) -> bytes:
        if self.kind == WHITEOUT:
            head, sep, base = self.path.rstrip(b"/").rpartition(b"/")
            return head + sep + WHITEOUT_PREFIX + base
        if self.kind == OPAQUE:
            d = self.path.rstrip(b"/")
            return (d + b"/" if d else b"") + OPAQUE_NAME
        return self.path

    def tarinfo(self) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(_s(self.tar_name))
        ti.type = _TAR_TYPE[self.kind]
        ti.mode = self.mode & 0o7777
        ti.uid, ti.gid = self.uid, self.gid
        ti.uname, ti.gname = self.uname, self.gname
        sec, nsec = divmod(self.mtime_ns, 10**9)
        ti.mtime = sec
        if nsec:
            if self.mtime_ns >= 0:
                ti.pax_headers["mtime"] = f"{sec}.{nsec:09d}"
            else:
                a = -self.mtime_ns
                ti.pax_headers["mtime"] = f"-{a // 10**9}.{a % 10**9:09d}"
        for k, v in self.xattrs.items():
            ti.pax_headers["SCHILY.xattr." + _s(k)] = _s(v)
        ti.pax_headers.update(self.pax)
        if self.kind == FILE:
            ti.size = self.content.size
        if self.kind in (SYMLINK, HARDLINK):
            ti.linkname = _s(self.target)
        if self.kind in (CHAR, BLOCK):
            ti.devmajor, ti.devminor = self.major, self.minor
        return ti


def ns(sec: int, nsec: int = 0) -> int:
    """Seconds (+ nanoseconds) since the epoch -> integer ns for `mtime_ns`."""
    return sec * 10**9 + nsec


@dataclass
class Layer:
    """A layer with per-layer options. `compression=None` = the image default.

    corrupt: None, "truncate" (blob cut in half) or "bitflip" (4 bytes in the
    middle of the compressed stream inverted). The manifest then records the
    digest/size of the damaged blob (so only decompression / diff_id checks
    catch it) and the diff_id of the intact tar.
    raw_tar: uncompressed tar bytes written instead of `entries`.
    """
    entries: Sequence[Entry] = ()
    compression: str | None = None
    corrupt: str | None = None
    raw_tar: bytes | None = None


def as_layer(x: Layer | Sequence[Entry]) -> Layer:
    return x if isinstance(x, Layer) else Layer(list(x))


# --------------------------------------------------------------------------
# Layer writing
# --------------------------------------------------------------------------

class _HashingWriter:
    def __init__(self, sink=None):
        self.sink = sink
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        if self.sink is not None:
            self.sink.write(b)
        return len(b)

    def tell(self) -> int:
        return self.n

    def flush(self) -> None:
        pass

    def digest(self) -> str:
        return "sha256:" + self.h.hexdigest()


def _sha256_file(path: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while piece := f.read(_READ_BLOCK):
            h.update(piece)
            n += len(piece)
    return "sha256:" + h.hexdigest(), n


def _corrupt_file(path: Path, how: str) -> None:
    blob = bytearray(Path(path).read_bytes())
    if how == "truncate":
        blob = blob[: len(blob) // 2]
    elif how == "bitflip":
        mid = len(blob) // 2
        for i in range(mid, min(mid + 4, len(blob))):
            blob[i] ^= 0xFF
    else:
        raise ValueError(f"unknown corruption {how!r}")
    Path(path).write_bytes(bytes(blob))


def write_layer(entries: Sequence[Entry] | Layer, path: str | os.PathLike,
                compression: str = "gzip", *, corrupt: str | None = None,
                raw_tar: bytes | None = None) -> tuple[str, str, int]:
    """Write one layer blob to `path`; return (digest, diff_id, size).

    digest/size describe the file as written (after any corruption); diff_id
    is the sha256 of the intact uncompressed tar. Deterministic: gzip header
    mtime 0, no file name.
    """
    if isinstance(entries, Layer):
        corrupt = corrupt or entries.corrupt
        raw_tar = raw_tar if raw_tar is not None else entries.raw_tar
        compression = entries.compression or compression
        entries = entries.entries
    path = Path(path)
    with open(path, "wb") as out:
        if compression == "gzip":
            comp = gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=6, mtime=0)
        elif compression == "zstd":
            comp = zstandard.ZstdCompressor(level=3, write_checksum=True).stream_writer(
                out, closefd=False)
        elif compression == "none":
            comp = None
        else:
            raise ValueError(f"unknown compression {compression!r}")
        tar_w = _HashingWriter(comp if comp is not None else out)
        if raw_tar is not None:
            tar_w.write(raw_tar)
        else:
            tf = tarfile.TarFile(fileobj=tar_w, mode="w", format=tarfile.PAX_FORMAT,
                                 encoding="utf-8", errors="surrogateescape")
            for e in entries:
                ti = e.tarinfo()
                if e.kind == FILE and e.content.size:
                    with e.content.open() as f:
                        tf.addfile(ti, f)
                else:
                    tf.addfile(ti)
            tf.close()
        if comp is not None:
            comp.close()
    diff_id = tar_w.digest()
    if corrupt:
        _corrupt_file(path, corrupt)
    digest, size = _sha256_file(path)
    return digest, diff_id, size


# --------------------------------------------------------------------------
# OCI layout
# --------------------------------------------------------------------------

@dataclass
class LayerInfo:
    digest: str
    diff_id: str
    size: int
    media_type: str


@dataclass
class ManifestInfo:
    platform: str
    digest: str
    size: int
    config_digest: str
    config: dict
    layers: list[LayerInfo]


@dataclass
class ImageInfo:
    layout: Path
    tag: str
    digest: str            # what index.json's tag points at (manifest or image index)
    media_type: str
    manifests: dict[str, ManifestInfo]   # platform -> manifest

    @property
    def ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"

    @property
    def manifest(self) -> ManifestInfo:
        """The only manifest (single-platform images) or the first."""
        return next(iter(self.manifests.values()))


def host_platform() -> str:
    m = _platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
            "armv7l": "arm/v7", "ppc64le": "ppc64le", "s390x": "s390x",
            "riscv64": "riscv64"}.get(m, m)
    return f"linux/{arch}"


def _parse_platform(p: str) -> dict:
    parts = p.split("/")
    d = {"architecture": parts[1], "os": parts[0]}
    if len(parts) > 2:
        d["variant"] = parts[2]
    return d


def _canon(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _put_blob(layout: Path, raw: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    p = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    if not p.exists():
        p.write_bytes(raw)
    return digest, len(raw)


def _write_image(layout: Path, plat: str, layers: Sequence, compression: str,
                 config_overrides: Mapping | None) -> ManifestInfo:
    blobs = layout / "blobs" / "sha256"
    infos: list[LayerInfo] = []
    for i, spec in enumerate(layers):
        lay = as_layer(spec)
        comp = lay.compression or compression
        tmp = blobs / f".tmp-layer-{os.getpid()}-{i}"
        digest, diff_id, size = write_layer(lay, tmp, comp)
        os.replace(tmp, blobs / digest.split(":", 1)[1])
        infos.append(LayerInfo(digest, diff_id, size, MEDIA_LAYER[comp]))
    pl = _parse_platform(plat)
    cfg = {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["/bin/sh"],
        "WorkingDir": "/",
    }
    for k, v in (config_overrides or {}).items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    config = {
        "created": CREATED,
        "architecture": pl["architecture"],
        "os": pl["os"],
        **({"variant": pl["variant"]} if "variant" in pl else {}),
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [li.diff_id for li in infos]},
        "history": [{"created": CREATED, "created_by": f"pynydus tests: layer {i}"}
                    for i in range(len(infos))],
    }
    cfg_digest, cfg_size = _put_blob(layout, _canon(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": cfg_digest, "size": cfg_size},
        "layers": [{"mediaType": li.media_type, "digest": li.digest, "size": li.size}
                   for li in infos],
    }
    m_digest, m_size = _put_blob(layout, _canon(manifest))
    return ManifestInfo(plat, m_digest, m_size, cfg_digest, config, infos)


def build_oci_layout(layout_dir: str | os.PathLike, tag: str,
                     layers: Sequence[Sequence[Entry] | Layer] | Mapping[str, Sequence],
                     *, config_overrides: Mapping | None = None,
                     compression: str = "gzip",
                     platforms: Sequence[str] | None = None) -> ImageInfo:
    """Write (or add to) an OCI image layout and tag the image `tag`.

    Single platform (platforms=None): index.json -> manifest, for the host's
    platform. With `platforms`, index.json -> image index -> one manifest per
    platform; `layers` is then either one list shared by all platforms or a
    mapping platform -> list. An existing index.json is kept; an older entry
    with the same tag is replaced. `config_overrides` is merged into the
    config's `config` (a None value deletes the key).
    """
    layout = Path(layout_dir)
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    if platforms is None:
        if isinstance(layers, Mapping):
            raise ValueError("per-platform layers need platforms=[...]")
        m = _write_image(layout, host_platform(), layers, compression, config_overrides)
        manifests = {m.platform: m}
        desc = {"mediaType": MEDIA_MANIFEST, "digest": m.digest, "size": m.size,
                "platform": _parse_platform(m.platform)}
    else:
        manifests = {}
        for plat in platforms:
            lays = layers[plat] if isinstance(layers, Mapping) else layers
            manifests[plat] = _write_image(layout, plat, lays, compression, config_overrides)
        index = {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [{"mediaType": MEDIA_MANIFEST, "digest": m.digest, "size": m.size,
                           "platform": _parse_platform(p)} for p, m in manifests.items()],
        }
        d, n = _put_blob(layout, _canon(index))
        desc = {"mediaType": MEDIA_INDEX, "digest": d, "size": n}
    desc["annotations"] = {REF_NAME: tag}

    index_path = layout / "index.json"
    top = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": []}
    if index_path.exists():
        top = json.loads(index_path.read_text())
        top["manifests"] = [m for m in top.get("manifests", [])
                            if m.get("annotations", {}).get(REF_NAME) != tag]
    top["manifests"].append(desc)
    tmp = layout / ".index.json.tmp"
    tmp.write_text(json.dumps(top, indent=2))
    os.replace(tmp, index_path)
    return ImageInfo(layout, tag, desc["digest"], desc["mediaType"], manifests)


# --------------------------------------------------------------------------
# Ready-made specs
# --------------------------------------------------------------------------

def capability_xattr(permitted: int, effective: bool = True, inheritable: int = 0) -> bytes:
    """security.capability, VFS_CAP_REVISION_2 (struct vfs_cap_data, LE)."""
    magic = 0x02000000 | (1 if effective else 0)
    return struct.pack("<5I", magic, permitted & 0xFFFFFFFF, inheritable & 0xFFFFFFFF,
                       permitted >> 32, inheritable >> 32)


ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF


def posix_acl_xattr(entries: Sequence[tuple[int, int, int | None]]) -> bytes:
    """system.posix_acl_* value in the kernel's binary format.

    entries: (tag, perm, id-or-None), in the kernel's canonical order
    (USER_OBJ, USER..., GROUP_OBJ, GROUP..., MASK, OTHER).
    """
    out = struct.pack("<I", 2)  # POSIX_ACL_XATTR_VERSION
    for tag, perm, ident in entries:
        out += struct.pack("<HHI", tag, perm, ACL_UNDEFINED_ID if ident is None else ident)
    return out


def _acl_0640_user1000_rw() -> bytes:
    # Consistent with mode 0640 (group bits == mask), so chmod and the ACL agree
    # whichever the extractor applies last.
    return posix_acl_xattr([(ACL_USER_OBJ, 6, None), (ACL_USER, 6, 1000),
                            (ACL_GROUP_OBJ, 4, None), (ACL_MASK, 4, None),
                            (ACL_OTHER, 0, None)])


def _acl_default_dir() -> bytes:
    return posix_acl_xattr([(ACL_USER_OBJ, 7, None), (ACL_USER, 5, 2000),
                            (ACL_GROUP_OBJ, 5, None), (ACL_MASK, 5, None),
                            (ACL_OTHER, 5, None)])


AWKWARD_DEEP_LEVELS = 60
AWKWARD_WIDE_COUNT = 3000
AWKWARD_ZEROS_SIZE = 8 * 1024 * 1024


def awkward_image_layers(chunk_size: int = 64 * 1024) -> list[list[Entry]]:
    """Three layers covering every file type and the merge rules (see module doc).

    Every later-layer change re-declares its parent directories (as docker
    does), so the applied tree is unambiguous: a directory's metadata is that
    of its latest declaration.
    """
    C = chunk_size
    T0 = DEFAULT_MTIME_NS
    T1, T2 = T0 + ns(1000), T0 + ns(2000)
    D, F, S, H = Entry.dir, Entry.file, Entry.symlink, Entry.hardlink

    # ---------------- layer 1: base ----------------
    l1: list[Entry] = []
    for d in ("bin", "etc", "files", "files/sizes", "big", "links", "special", "perm",
              "xattrs", "names", "deep", "wide", "gone", "gone-dir", "gone-dir/sub",
              "opq", "opq/oldsub", "replace", "replace/dir-to-file",
              "replace/dir-to-symlink"):
        l1.append(D(d))
    l1 += [
        F("etc/hello.txt", b"hello from layer 1\n"),
        F("bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755),
    ]
    for n in (0, 1, 4095, 4096, 4097, C - 1, C, C + 1):
        l1.append(F(f"files/sizes/size-{n}", random(n, seed=n)))
    l1 += [
        F("files/multi-3c", random(3 * C + 123, seed=1001)),
        F("files/multi-5c", random(5 * C, seed=1002)),
        F("files/multi-copy", random(3 * C + 123, seed=1001)),   # same as multi-3c
        F("big/zeros-8m", zeros(AWKWARD_ZEROS_SIZE)),
        # 4 identical chunks + a tail: dedup inside one file
        F("big/dup-chunks", concat(repeat(random(C, seed=7), 4), random(100, seed=8))),
        # hardlinks: 2 names, 3 names (one in another dir), a group split later; each link entry
        # carries its inode's metadata, as tar writers do (containerd applies it to the inode)
        F("links/hl-a", b"hardlink pair\n", uid=7, gid=8, mtime_ns=T0 + 5),
        H("links/hl-b", "links/hl-a", uid=7, gid=8, mtime_ns=T0 + 5),
        F("links/three-1", b"three names\n", mode=0o600),
        H("links/three-2", "links/three-1", mode=0o600),
        H("etc/three-3", "links/three-1", mode=0o600),
        F("links/split-1", b"split me\n"),
        H("links/split-2", "links/split-1"),
        H("links/split-3", "links/split-1"),
        S("links/rel", "hl-a"),
        S("links/abs", "/etc/hello.txt"),
        S("links/dangling", "nowhere"),
        S("links/dir-link", "../files"),
        S("links/dot", "."),
        S("links/long-target", "x/" * 150),       # 300-byte target (PAX linkpath)
        Entry.chardev("special/null", 1, 3, mode=0o666),
        Entry.chardev("special/tty", 5, 0, mode=0o620, gid=5),
        Entry.blockdev("special/loop0", 7, 0, mode=0o660, gid=6),
        Entry.blockdev("special/big-minor", 259, 300000),
        Entry.fifo("special/fifo", mode=0o640),
        F("perm/setuid", b"suid\n", mode=0o4755),
        F("perm/setgid", b"sgid\n", mode=0o2755),
        F("perm/all-bits", b"7777\n", mode=0o7777),
        F("perm/none", b"no perms\n", mode=0o000),
        D("perm/sticky-dir", mode=0o1777),
        D("perm/setgid-dir", mode=0o2775, gid=100),
        D("perm/private", mode=0o700, uid=1000, gid=1000),
        F("perm/private/secret", b"s\n", mode=0o600, uid=1000, gid=1000),
        F("perm/high-ids", b"ids\n", uid=100000, gid=200000),
        F("perm/uid-65536", b"ids\n", uid=65536, gid=65537),
        F("perm/huge-ids", b"ids\n", uid=3_000_000, gid=4_000_000),   # > ustar: PAX
        F("perm/nano-mtime", b"t\n", mtime_ns=ns(1_600_000_000, 123_456_789)),
        F("perm/epoch", b"t\n", mtime_ns=0),
        F("perm/future", b"t\n", mtime_ns=ns(2**33 + 7)),               # > ustar: PAX
        S("perm/owned-link", "setuid", uid=1234, gid=5678, mtime_ns=T0 + ns(3)),
        D("perm/nano-dir", mtime_ns=ns(1_650_000_000, 999_999_999)),
        F("xattrs/file", b"x\n", mode=0o755, xattrs={
            b"user.plain": b"hello",
            b"user.empty": b"",
            b"user.binary": bytes(range(256)),
            b"user.long": b"L" * 1500,
            b"trusted.pynydus": b"\x00\xfftrusted",
            b"security.capability": capability_xattr(1 << 10),   # cap_net_bind_service+ep
        }),
        F("xattrs/acl", b"acl\n", mode=0o640, xattrs={
            b"system.posix_acl_access": _acl_0640_user1000_rw()}),
        D("xattrs/acl-dir", mode=0o755, xattrs={
            b"system.posix_acl_default": _acl_default_dir()}),
        D("xattrs/dir", xattrs={b"user.dirattr": b"on a dir"}),
        S("xattrs/symlink", "file", xattrs={b"trusted.onlink": b"on a symlink"}),
    ]
    # names
    l1 += [
        F(b"names/" + b"n" * 255, b"255-byte name\n"),
        D(b"names/" + b"d" * 255),
        F(b"names/" + b"d" * 255 + b"/f", b"under a 255-byte dir\n"),
        F(b"names/" + "é".encode() * 127 + b"x", b"255 bytes of UTF-8\n"),
        F(b"names/" + b"\xff" * 255, b"255 bytes, not UTF-8\n"),
        F(b"names/latin1-\xe9t\xe9", b"latin-1 name\n"),
        F(b"names/\xff\xfe\xfd-raw", b"raw bytes\n"),
        F("names/ünïcødé-日本語", b"utf-8 name\n"),
        F("names/space name", b"space\n"),
        F("names/new\nline", b"newline\n"),
        F("names/back\\slash", b"backslash\n"),
        F("names/-dash", b"dash\n"),
        F("names/.hidden", b"hidden\n"),
        F("names/..dots", b"dots\n"),
        F("names/not.wh.whiteout", b"not a whiteout\n"),
    ]
    # 60 levels deep
    p = "deep"
    for i in range(1, AWKWARD_DEEP_LEVELS + 1):
        p += f"/d{i:02d}"
        l1.append(D(p))
    l1.append(F(p + "/leaf", b"deep leaf\n"))
    # 3000 entries in one directory
    for i in range(AWKWARD_WIDE_COUNT):
        l1.append(F(f"wide/f{i:04d}", b"" if i % 10 else f"{i}\n".encode()))
    # things later layers change
    l1 += [
        F("gone/file-to-whiteout", b"bye\n"),
        F("gone/keep", b"stays\n"),
        F("gone-dir/a", b"a\n"),
        F("gone-dir/sub/b", b"b\n"),
        F("opq/old1", b"old\n"),
        F("opq/oldsub/old2", b"old\n"),
        F("replace/file-to-dir", b"file, later a dir\n"),
        F("replace/dir-to-file/c", b"child\n"),
        F("replace/dir-to-symlink/c", b"child\n"),
        S("replace/symlink-to-file", "target"),
        D("replace/redecl", mode=0o755),
        F("replace/redecl/child", b"kept\n"),
        F("replace/meta-file", b"meta\n", mode=0o644),
    ]

    # ---------------- layer 2: whiteouts, opaque, replacements ----------------
    l2 = [
        D("gone", mtime_ns=T1),
        Entry.whiteout("gone/file-to-whiteout"),
        Entry.whiteout("gone-dir"),                      # a whole directory
        D("opq", mtime_ns=T1),
        F("opq/new1", b"new in layer 2\n", mtime_ns=T1),  # before the marker: order must not matter
        Entry.opaque("opq"),
        D("opq/oldsub", mode=0o750, mtime_ns=T1),
        F("opq/oldsub/new2", b"new in layer 2\n", mtime_ns=T1),
        D("replace", mtime_ns=T1),
        D("replace/file-to-dir", mtime_ns=T1),
        F("replace/file-to-dir/inner", b"inner\n", mtime_ns=T1),
        F("replace/dir-to-file", b"was a dir\n", mtime_ns=T1),
        F("replace/symlink-to-file", b"was a symlink\n", mtime_ns=T1),
        D("replace/redecl", mode=0o700, uid=1234, gid=4321,
          mtime_ns=T1 + 500_000_000),                    # keeps its child
        F("replace/meta-file", b"meta\n", mode=0o600, uid=42, gid=43,
          mtime_ns=ns(1_700_000_123, 456_000_000)),
        D("links", mtime_ns=T1),
        Entry.whiteout("links/dangling"),
        D("l2", mtime_ns=T1),
        F("l2/orig", b"linked in layer 2\n", mtime_ns=T1),
        H("l2/link", "l2/orig", mtime_ns=T1),
    ]

    # ---------------- layer 3: cross-layer dedup, "./" names, more overrides ----------------
    l3 = [
        D("./big", mtime_ns=T2),
        F("./big/dup-across", concat(repeat(random(C, seed=7), 4), random(100, seed=8)),
          mtime_ns=T2),                                  # == big/dup-chunks from layer 1
        F("./big/zeros-1m", zeros(1024 * 1024), mtime_ns=T2),
        D("./links", mtime_ns=T2),
        F("./links/split-2", b"split off\n", mtime_ns=T2),   # breaks one name off a group
        D("./replace", mtime_ns=T2),
        S("./replace/dir-to-symlink", "file-to-dir", mtime_ns=T2),
        Entry.whiteout("./never-existed"),               # whiteout of nothing: no-op
        D("./opq", mtime_ns=T2),
        Entry.whiteout("./opq/new1"),
        F("./opq/new3", b"new in layer 3\n", mtime_ns=T2),
        D("./etc", mtime_ns=T2),
        F("./etc/layer3.txt", b"layer 3\n", mtime_ns=T2),
        D("./perm", mtime_ns=T2),
        F("./perm/setuid", b"suid\n", mode=0o755, mtime_ns=T2),   # suid dropped
        D("./l3", mtime_ns=T2),
        F("./l3/a", b"layer 3 link\n", mtime_ns=T2),
        H("./l3/b", "./l3/a", mtime_ns=T2),
        H("./l3/c", "./l3/a", mtime_ns=T2),
    ]
    return [l1, l2, l3]


BUSYBOX_APPLETS = ("sh", "ash", "cat", "ls", "echo", "head", "tail", "wc", "sha256sum",
                   "md5sum", "stat", "find", "sleep", "true", "false", "env", "id", "mkdir",
                   "rm", "touch", "cp", "mv", "dd", "grep", "readlink", "test", "[", "uname",
                   "ps", "printf", "pwd", "du", "df", "sync", "date", "seq", "xargs", "tr")
BUSYBOX_HELLO = b"hello from pynydus\n"
BUSYBOX_CONFIG = {
    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    "Entrypoint": None,
    "Cmd": ["/bin/cat", "/etc/hello.txt"],
    "WorkingDir": "/",
}


def busybox_image_layers(busybox: str | os.PathLike = "/bin/busybox") -> list[list[Entry]]:
    """One layer: a static /bin/busybox, applet symlinks, /etc/hello.txt.

    Use with `config_overrides=BUSYBOX_CONFIG` (default command prints hello).
    """
    bb = Path(busybox)
    if not bb.is_file():
        raise FileNotFoundError(f"{bb} missing: apt-get install busybox-static")
    D, F, S = Entry.dir, Entry.file, Entry.symlink
    layer = [D("bin"), F("bin/busybox", host_file(bb), mode=0o755)]
    layer += [S(f"bin/{a}", "busybox") for a in BUSYBOX_APPLETS]
    layer += [
        D("etc"),
        F("etc/hello.txt", BUSYBOX_HELLO),
        F("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"),
        F("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
        D("root", mode=0o700), D("tmp", mode=0o1777),
        D("dev"), D("proc"), D("sys"), D("usr"), D("usr/bin"),
    ]
    return [layer]


def malicious_layers() -> dict[str, list[Layer]]:
    """name -> layers of a small image that an importer must reject safely.

    Every case sits on top of a harmless first layer. Names are written raw.
    """
    base = Layer([Entry.dir("etc"), Entry.file("etc/ok", b"fine\n")])
    payload = [Entry.dir("data"), Entry.file("data/blob", random(256 * 1024, seed=99)),
               Entry.file("data/text", b"some text\n" * 500)]
    huge = tarfile.TarInfo("huge")
    huge.size = 1 << 40
    huge_tar = huge.tobuf(tarfile.PAX_FORMAT) + b"only a few bytes"
    return {
        "dotdot": [base, Layer([Entry.file("../escape", b"evil\n")])],
        "dotdot_nested": [base, Layer([Entry.dir("a"), Entry.file("a/../../escape", b"evil\n")])],
        "absolute": [base, Layer([Entry.file("/etc/x", b"evil\n")])],
        "symlink_escape": [base, Layer([Entry.symlink("link", "/tmp"),
                                        Entry.file("link/evil", b"evil\n")])],
        "symlink_escape_relative": [base, Layer([Entry.symlink("up", "../../../../.."),
                                                 Entry.file("up/tmp/evil", b"evil\n")])],
        "hardlink_missing": [base, Layer([Entry.hardlink("hl", "does/not/exist")])],
        "hardlink_outside": [base, Layer([Entry.hardlink("hl", "../../etc/passwd")])],
        "huge_size_truncated": [base, Layer(raw_tar=huge_tar)],
        "truncated_gzip": [base, Layer(payload, compression="gzip", corrupt="truncate")],
        "corrupt_gzip": [base, Layer(payload, compression="gzip", corrupt="bitflip")],
    }


def build_awkward_layout(layout_dir, tag: str = "awkward", *, chunk_size: int = 64 * 1024,
                         compression: str = "gzip") -> ImageInfo:
    return build_oci_layout(layout_dir, tag, awkward_image_layers(chunk_size),
                            compression=compression)


def build_busybox_layout(layout_dir, tag: str = "busybox", *, compression: str = "gzip",
                         platforms: Sequence[str] | None = None) -> ImageInfo:
    return build_oci_layout(layout_dir, tag, busybox_image_layers(),
                            config_overrides=BUSYBOX_CONFIG, compression=compression,
                            platforms=platforms)


def remove_tree(path: str | os.PathLike) -> None:
    """rmtree that also copes with read-only dirs left by unpacked images."""
    def onerror(func, p, exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=onerror)
