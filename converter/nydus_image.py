"""Open a converted (nydus) image: its manifest, config, bootstrap and blob readers.

An image is found by reference (registry or OCI layout: blobs are read from the
same store) or as local files, as nydusd's localfs backend takes them
(`open_local`): a bootstrap file, or a blob file carrying its own bootstrap in its
ToC (`image.boot`), with a folder of blob files named by blob id.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from rafs import blob as rblob
from rafs.blob import BlobReader
from rafs.bootstrap import Bootstrap
from rafs.errors import FormatError
from rafs.image import media
from rafs.image.digests import is_hex_id
from rafs.image.store import Descriptor, ImageStore, open_store
from rafs.storage.backend import BlobBackend, LocalFsBackend

EROFS_MAGIC = (0xE0F5E1E2).to_bytes(4, "little")       # at byte 1024 of a bootstrap (the EROFS superblock)
INLINED_BOOTSTRAP = "image.boot"                      # the ToC entry of a blob's own bootstrap


@dataclass
class NydusImage:
    bootstrap: Bootstrap
    raw_bootstrap: bytes
    store: ImageStore | None = None     # where the blobs live (an image reference)
    manifest: dict | None = None
    config: dict | None = None
    backend: BlobBackend | None = None  # ... or local blob files (open_local); None: a bare bootstrap

    def blob_digest(self, index: int) -> str:
        return "sha256:" + self.bootstrap.meta.blobs[index].blob_id

    def blob_source(self, index: int) -> tuple[Callable[[int, int], bytes], int]:
        """(read_at(offset, size), blob size) of blob `index` of the blob table."""
        info = self.bootstrap.meta.blobs[index]
        if self.store is not None:
            digest = "sha256:" + info.blob_id
            return (lambda off, n: self.store.read_range(digest, off, n)), info.compressed_size
        if self.backend is not None:
            blob_id, backend = info.blob_id, self.backend
            return (lambda off, n: backend.read_range(blob_id, off, n)), backend.blob_size(blob_id)
        raise FormatError("a bare bootstrap has no blobs to read: give --blob-dir DIR (the folder of "
                          "its blob files, named by blob id) or an image reference")

    def blob_reader(self, index: int) -> BlobReader:
        """A verifying random-access reader of blob `index`; it trusts the bootstrap's chunk table."""
        read_at, size = self.blob_source(index)
        info = self.bootstrap.meta.blobs[index]
        return BlobReader(read_at, size, info, name=f"blob {index} ({info.blob_id})")


class LocalBlobs(LocalFsBackend):
    """nydusd's localfs backend: blob `<id>` is the file DIR/<id> (or DIR/blobs/sha256/<id>, an OCI
    layout); like its `blob_file` option, `files` names a file for some ids directly (a blob that
    carries its own bootstrap serves the blob that bootstrap describes)."""

    def __init__(self, directory: str, files: dict[str, str] | None = None):
        super().__init__(directory)
        self.files = {k: os.path.abspath(v) for k, v in (files or {}).items()}

    def candidates(self, blob_id: str) -> tuple[str, str]:
        in_dir = super().candidates(blob_id)
        path = self.files.get(blob_id)
        return (path, in_dir[1]) if path else in_dir


def _file_read_at(path: str) -> tuple[Callable[[int, int], bytes], int]:
    size = os.path.getsize(path)

    def read_at(off: int, n: int) -> bytes:
        with open(path, "rb") as f:
            data = os.pread(f.fileno(), n, off)
        if len(data) != n:
            raise FormatError(f"{path}: {n} bytes at {off} run past its end ({size} bytes)")
        return data
    return read_at, size


def open_local(path: str, blob_dir: str | None = None) -> NydusImage:
    """A local RAFS image: `path` is a bootstrap file, or a blob file carrying `image.boot` in its ToC.

    Blobs are read from `blob_dir` (files named by blob id). A blob file also serves the blob its
    own bootstrap describes (the only one there, as per layer), and `blob_dir` defaults to its folder;
    a bootstrap without `blob_dir` can be inspected but has no blob to read.
    """
    read_at, size = _file_read_at(path)
    files: dict[str, str] = {}
    if size >= 1028 and read_at(1024, 4) == EROFS_MAGIC:
        with open(path, "rb") as f:
            raw = f.read()
        boot = Bootstrap.from_bytes(raw)
    else:
        try:
            toc = rblob.read_toc(read_at, size)
        except FormatError as e:
            raise FormatError(f"{path}: not a RAFS bootstrap (no EROFS superblock magic at byte 1024) "
                              f"nor a blob with a ToC ({e})") from None
        if not any(e.name == INLINED_BOOTSTRAP for e in toc):
            raise FormatError(f"{path}: a blob without its own bootstrap (no {INLINED_BOOTSTRAP} in its ToC); "
                              "give the image's bootstrap and --blob-dir")
        raw = rblob.toc_member(read_at, size, INLINED_BOOTSTRAP, toc)
        boot = Bootstrap.from_bytes(raw)
        if len(boot.meta.blobs) == 1:
            files[boot.meta.blobs[0].blob_id] = path
        name = os.path.basename(path)
        if is_hex_id(name):
            files.setdefault(name, path)
        blob_dir = blob_dir or os.path.dirname(os.path.abspath(path))
    backend = LocalBlobs(blob_dir, files) if blob_dir is not None else None
    return NydusImage(boot, raw, backend=backend)


def bootstrap_layer(manifest: dict) -> dict:
    for layer in reversed(manifest.get("layers", [])):
        if (layer.get("annotations") or {}).get(media.ANNOTATION_BOOTSTRAP) == "true":
            return layer
    raise FormatError("not a nydus image: no layer annotated " + media.ANNOTATION_BOOTSTRAP)


def extract_bootstrap(layer_bytes: bytes) -> bytes:
    """The image/image.boot member of a bootstrap layer (gzip or plain tar); nothing is written to disk."""
    data = gzip.decompress(layer_bytes) if layer_bytes[:2] == b"\x1f\x8b" else layer_bytes
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for ti in tf:
            if ti.name.lstrip("./") == media.BOOTSTRAP_NAME and ti.isfile():
                return tf.extractfile(ti).read()
    raise FormatError(f"bootstrap layer holds no {media.BOOTSTRAP_NAME}")


def load_from_store(store: ImageStore, platform: str | None = None) -> NydusImage:
    entries = store.manifests_for(store.resolve(), platform)
    if not entries:
        raise FormatError(f"no manifest for platform {platform}")
    return load_manifest(store, entries[0][1])


def load_manifest(store: ImageStore, desc: Descriptor) -> NydusImage:
    """The nydus image of one (platform's) manifest."""
    manifest = json.loads(store.get_bytes(desc.digest))
    config = json.loads(store.get_bytes(manifest["config"]["digest"]))
    layer = bootstrap_layer(manifest)
    raw = extract_bootstrap(store.get_bytes(layer["digest"]))
    return NydusImage(Bootstrap.from_bytes(raw), raw, store, manifest, config)


@contextmanager
def open_nydus_image(ref: str, *, plain_http: bool = False, platform: str | None = None,
                     blob_dir: str | None = None, hosts_dir: str | None = None) -> Iterator[NydusImage]:
    """`ref` is an image reference, or a local bootstrap or blob file (see `open_local`)."""
    if os.path.isfile(ref):
        image = open_local(ref, blob_dir)
        try:
            yield image
        finally:
            if image.backend is not None:
                image.backend.close()
        return
    if blob_dir is not None:
        raise ValueError(f"--blob-dir goes with a local bootstrap or blob file; {ref} is not a file")
    with open_store(ref, plain_http=plain_http, hosts_dir=hosts_dir) as store:
        yield load_from_store(store, platform)
