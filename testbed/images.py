"""Image factory: OCI image layouts built from a declarative spec, for tests and benchmarks.

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

Entry points: `write_layer`, `build_oci_layout` (and `put_blob` /
`canonical_json` for hand-made layouts). Ready-made specs for the tests
(awkward, busybox, malicious images) are in tests/helpers/images.py.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform as _platform
import random as _random
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


def canonical_json(obj) -> bytes:
    """`obj` as JSON the way the layouts here write it (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def put_blob(layout: Path, raw: bytes) -> tuple[str, int]:
    """Store `raw` as a blob of OCI layout `layout`; (digest, size)."""
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
    cfg_digest, cfg_size = put_blob(layout, canonical_json(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": cfg_digest, "size": cfg_size},
        "layers": [{"mediaType": li.media_type, "digest": li.digest, "size": li.size}
                   for li in infos],
    }
    m_digest, m_size = put_blob(layout, canonical_json(manifest))
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
        d, n = put_blob(layout, canonical_json(index))
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
