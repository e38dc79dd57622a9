"""A sample OCI image built from this machine's own files: the README's main job converts it.

Layer 0 is a busybox-static userland (/bin/sh and friends, /etc); layer 1
holds real content for size: Debian's Python standard library, timezone data
and Perl modules where present. No network is needed.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile

from rafs.image import media

BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "ls", "cat", "echo", "wc", "head", "sha256sum", "du", "find", "true", "sleep", "grep")
CONTENT_DIRS = ("/usr/lib/python3.11", "/usr/share/zoneinfo", "/usr/share/perl")


def _add_dir(tf: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, mode, 0
    tf.addfile(ti)


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), mode, 0
    tf.addfile(ti, fileobj=io.BytesIO(data))


def _base_layer(tf: tarfile.TarFile) -> None:
    for d in ("bin", "etc", "tmp", "proc", "sys", "dev", "root", "usr", "usr/lib", "usr/share"):
        _add_dir(tf, d, 0o1777 if d == "tmp" else 0o755)
    with open(BUSYBOX, "rb") as f:
        _add_bytes(tf, "bin/busybox", f.read(), 0o755)
    for applet in APPLETS:
        ti = tarfile.TarInfo(f"bin/{applet}")
        ti.type, ti.linkname, ti.mode, ti.mtime = tarfile.SYMTYPE, "busybox", 0o777, 0
        tf.addfile(ti)
    _add_bytes(tf, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    _add_bytes(tf, "etc/hello.txt", b"hello from a lazily pulled pynydus image\n")


def _content_layer(tf: tarfile.TarFile) -> None:
    for src in CONTENT_DIRS:
        if os.path.isdir(src):
            tf.add(src, arcname=src.lstrip("/"), filter=_portable)


def _portable(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if not (ti.isfile() or ti.isdir() or ti.issym()):
        return None
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def _write_layer(path: str, fill) -> tuple[str, str, int]:
    """Writes a reproducible gzip tar; returns (digest, diff_id, size)."""
    diff = hashlib.sha256()
    tmp = path + ".tar"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
        fill(tf)
    with open(tmp, "rb") as src, open(path, "wb") as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="", compresslevel=6) as gz:
        while block := src.read(1 << 20):
            diff.update(block)
            gz.write(block)
    os.unlink(tmp)
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return "sha256:" + digest, "sha256:" + diff.hexdigest(), os.path.getsize(path)


def build_sample_layout(layout_dir: str, tag: str = "latest") -> str:
    """Writes an OCI image layout holding the sample image; returns its reference `oci:DIR:TAG`."""
    blobs = os.path.join(layout_dir, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    layers, diff_ids = [], []
    with tempfile.TemporaryDirectory(dir=layout_dir) as tmp:
        for i, fill in enumerate((_base_layer, _content_layer)):
            path = os.path.join(tmp, f"layer{i}")
            digest, diff_id, size = _write_layer(path, fill)
            shutil.move(path, os.path.join(blobs, digest[7:]))
            layers.append({"mediaType": media.OCI_LAYER_GZIP, "digest": digest, "size": size})
            diff_ids.append(diff_id)
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/bin:/usr/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    manifest = {"schemaVersion": 2, "mediaType": media.OCI_MANIFEST,
                "config": _put(blobs, media.OCI_CONFIG, config), "layers": layers}
    top = _put(blobs, media.OCI_MANIFEST, manifest)
    top["annotations"] = {media.ANNOTATION_REF_NAME: tag}
    with open(os.path.join(layout_dir, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(layout_dir, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": [top]}, f)
    return f"oci:{layout_dir}:{tag}"


def _put(blobs: str, media_type: str, obj: dict) -> dict:
    data = json.dumps(obj, separators=(",", ":")).encode()
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}
