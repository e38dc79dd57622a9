"""Open a converted (nydus) image: its manifest, config, bootstrap and blob readers."""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from rafs.blob import BlobReader
from rafs.bootstrap import Bootstrap
from rafs.errors import FormatError

from . import media
from .store import Descriptor, ImageStore, open_store


@dataclass
class NydusImage:
    bootstrap: Bootstrap
    raw_bootstrap: bytes
    store: ImageStore | None = None     # where the blobs live; None for a bare bootstrap file
    manifest: dict | None = None
    config: dict | None = None

    def blob_digest(self, index: int) -> str:
        return "sha256:" + self.bootstrap.meta.blobs[index].blob_id

    def blob_reader(self, index: int) -> BlobReader:
        """A verifying random-access reader of blob `index`, trusting the bootstrap's TOC digest."""
        if self.store is None:
            raise FormatError("a bare bootstrap has no blobs to read; give an image reference")
        info = self.bootstrap.meta.blobs[index]
        digest = "sha256:" + info.blob_id
        return BlobReader(lambda off, n: self.store.read_range(digest, off, n), info.compressed_size,
                          toc_digest=info.toc_digest, blob_id=info.blob_id)


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
def open_nydus_image(ref: str, *, plain_http: bool = False, platform: str | None = None) -> Iterator[NydusImage]:
    """`ref` is an image reference, or the path of a bootstrap file (image.boot)."""
    if os.path.isfile(ref):
        with open(ref, "rb") as f:
            raw = f.read()
        yield NydusImage(Bootstrap.from_bytes(raw), raw)
        return
    with open_store(ref, plain_http=plain_http) as store:
        yield load_from_store(store, platform)
