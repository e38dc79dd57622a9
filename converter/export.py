"""`nydusify export REF DIR`: DIR/image.boot plus each blob's uncompressed view as DIR/devices/N.

The result is what the kernel's EROFS driver mounts directly:
mount(2) DIR/image.boot as erofs with device=DIR/devices/0,device=DIR/devices/1,...
REF may also be a local bootstrap or blob file with --blob-dir (`nydus_image.open_local`).
"""
from __future__ import annotations

import os

from rafs.osutil import atomic_file, atomic_write

from .nydus_image import NydusImage


def export(image: NydusImage, out_dir: str) -> list[str]:
    """Writes every chunk the bootstrap's chunk table lists, verified, at its place in the view."""
    dev_dir = os.path.join(out_dir, "devices")
    os.makedirs(dev_dir, exist_ok=True)
    devices = []
    for i, info in enumerate(image.bootstrap.meta.blobs):
        reader = image.blob_reader(i)
        path = os.path.join(dev_dir, str(i))
        with atomic_file(path) as f:
            f.truncate(info.uncompressed_size)     # sparse: only chunk data is written
            for batch in _batches(info.entries):
                for entry, data in zip(batch, reader.read_chunks(batch)):
                    f.seek(entry.uncompressed_offset)
                    f.write(data)
        devices.append(path)
    atomic_write(os.path.join(out_dir, "image.boot"), image.raw_bootstrap)
    return devices


def _batches(entries, limit: int = 16 << 20):
    """Runs of entries of about `limit` plain bytes: one `read_chunks` (a few range reads) each."""
    batch, size = [], 0
    for e in entries:
        batch.append(e)
        size += e.uncompressed_size
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
