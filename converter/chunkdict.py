"""--chunk-dict REF|BOOTSTRAP: chunks an earlier converted image already stores."""
from __future__ import annotations

import os

from rafs.blob import BlobReader
from rafs.bootstrap import Bootstrap

from .nydus_image import load_from_store
from .pack import ChunkDict
from .store import ImageStore, open_store


def load_chunk_dict(ref: str, target: ImageStore, plain_http: bool) -> ChunkDict:
    """Index every chunk of the dict image by digest, reading only each blob's TOC.

    A bare bootstrap file's blobs are looked up in the target (where they must already be).
    """
    if os.path.isfile(ref):
        boot, store = Bootstrap.open(ref), target
    else:
        store = open_store(ref, plain_http=plain_http)
        boot = load_from_store(store).bootstrap
    chunk_dict = ChunkDict(store=store)
    for info in boot.meta.blobs:
        digest = "sha256:" + info.blob_id
        reader = BlobReader(lambda off, n, d=digest: store.read_range(d, off, n), info.compressed_size,
                            toc_digest=info.toc_digest, blob_id=info.blob_id)
        chunk_dict.add_blob(info, reader.toc)
    return chunk_dict
