"""--chunk-dict REF|BOOTSTRAP: chunks an earlier converted image already stores.

The dictionary is a bootstrap's blob table and chunk table (`BlobInfo.entries`), as
`nydus-image --chunk-dict bootstrap=...` uses it: no blob is read. A chunk of the new
image whose digest the dictionary lists is not stored again; its chunk index points
into the dictionary's blob instead, which joins the new image's blob table. The
dictionary must use the same digester (else no digest can match) and chunk size.
"""
from __future__ import annotations

import os

from rafs.bootstrap import Bootstrap
from rafs.image.store import ImageStore, open_store

from .nydus_image import load_from_store, open_local
from .pack import ChunkDict


def load_chunk_dict(ref: str, target: ImageStore, plain_http: bool, *, digester: str | None = None,
                    chunk_size: int | None = None, hosts_dir: str | None = None,
                    insecure: bool = False) -> ChunkDict:
    """Index every chunk the dictionary's bootstrap lists, by digest.

    `ref`: an image reference, or a local bootstrap file (or a blob file carrying one) whose
    blobs are looked up in the target (where they must already be) when a conversion uses them.
    With `digester`/`chunk_size`, a dictionary that cannot match is a ValueError. `hosts_dir` and
    `insecure` choose the dictionary registry's hosts and TLS (`rafs.image.hosts`).
    """
    if os.path.isfile(ref):
        boot, store = open_local(ref).bootstrap, target
    else:
        store = open_store(ref, plain_http=plain_http, hosts_dir=hosts_dir, insecure=insecure)
        boot = load_from_store(store).bootstrap
    _compatible(ref, boot, digester, chunk_size)
    chunk_dict = ChunkDict(store=store)
    for info in boot.meta.blobs:
        chunk_dict.add_blob(info)
    return chunk_dict


def _compatible(ref: str, boot: Bootstrap, digester: str | None, chunk_size: int | None) -> None:
    meta = boot.meta
    for i, b in enumerate(meta.blobs):
        if digester and b.digester != digester:
            raise ValueError(f"chunk dict {ref}: blob {i} uses digester {b.digester}, this conversion "
                             f"{digester}; no chunk could match (give --digester {b.digester})")
    if chunk_size and meta.chunk_size != chunk_size:
        raise ValueError(f"chunk dict {ref}: chunk size {meta.chunk_size}, this conversion {chunk_size}; "
                         f"no chunk could match (give --chunk-size {meta.chunk_size})")
