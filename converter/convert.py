"""`nydusify convert`: an OCI image (registry or layout) -> a RAFS v6 (Nydus) image.

Per platform manifest: layers are read and chunked concurrently, merged into
one tree, packed into deduplicated blobs, and the bootstrap is written. The
target is tagged last, after every blob and manifest landed, so a failed
conversion never leaves a half-written tag behind.

The image is laid out as nydusify pushes one (nydus-snapshotter pkg/converter):
the blob layers (`application/vnd.oci.image.layer.nydus.blob.v1`, annotated
`containerd.io/snapshot/nydus-blob`, digest = blob id), then the bootstrap layer, a
gzip tar of `image/`, `image/image.boot` and, per blob written here,
`image/<blob id>.blob.meta` (its compression-info array, padded to 4 KiB, and the
ci header: what nydusd caches, so a mount need not fetch it from the blob), annotated
`containerd.io/snapshot/nydus-bootstrap` and `...nydus-fs-version: "6"`. In an
index, each manifest's platform carries `os.features: ["nydus.remoteimage.v1"]`.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rafs import blob as rblob
from rafs.bootstrap import RafsMeta, write_bootstrap
from rafs.compress import canonical_compressor, check_compressor
from rafs.digest import check_digester
from rafs.image import media
from rafs.image.platform import Platform
from rafs.image.store import Descriptor, ImageStore, open_store

from .chunkdict import load_chunk_dict
from .layer import LayerTree
from .layerproc import LayerWorker
from .merge import merge_layers
from .pack import ChunkDict, PackedBlob, StagedLayer, pack_blobs, resolve_chunks
from .prefetch import as_patterns, expand_prefetch, prefetch_digests
from .progress import Progress


@dataclass
class ConvertOptions:
    chunk_size: int = rblob.CHUNK_SIZE_DEFAULT
    compressor: str = "zstd"
    digester: str = "blake3"                # Nydus's default
    chunk_dict: str | None = None
    prefetch_patterns: list = field(default_factory=list)   # pattern lines (str) or prefetch.Pattern
    platform: str | None = None          # None: every platform of an index
    plain_http: bool = False             # every side (source, target, chunk dict)
    hosts_dir: str | None = None         # containerd's hosts directory (rafs.image.hosts); None: none
    source_insecure: bool = False        # skip TLS verification (and allow plain HTTP) per side
    target_insecure: bool = False
    chunk_dict_insecure: bool = False
    workers: int = max(2, os.cpu_count() or 2)     # layers converted at once (each by two processes)
    progress: bool = False


@dataclass
class ConvertedManifest:
    platform: Platform | None
    descriptor: dict
    blobs: list[PackedBlob]
    uploaded: int
    source_bytes: int


OS_FEATURE_NYDUS = "nydus.remoteimage.v1"    # what nydus-snapshotter looks for in an index's platforms
BLOB_META_SUFFIX = ".blob.meta"


def convert(source: str, target: str, opts: ConvertOptions) -> list[ConvertedManifest]:
    rblob.validate_chunk_size(opts.chunk_size)
    opts = dataclasses.replace(opts, compressor=check_compressor(canonical_compressor(opts.compressor)),
                               digester=check_digester(opts.digester))
    as_patterns(opts.prefetch_patterns)      # a malformed line fails now, not after the layers are read
    with open_store(source, plain_http=opts.plain_http, hosts_dir=opts.hosts_dir,
                    insecure=opts.source_insecure) as src, \
            open_store(target, plain_http=opts.plain_http, create=True, hosts_dir=opts.hosts_dir,
                       insecure=opts.target_insecure) as dst, \
            tempfile.TemporaryDirectory(prefix="nydusify-") as workdir:
        chunk_dict = load_chunk_dict(opts.chunk_dict, dst, opts.plain_http, digester=opts.digester,
                                     chunk_size=opts.chunk_size, hosts_dir=opts.hosts_dir,
                                     insecure=opts.chunk_dict_insecure) if opts.chunk_dict else None
        top = src.resolve()
        entries = src.manifests_for(top, opts.platform)
        if not entries:
            raise ValueError(f"{source}: no manifest for platform {opts.platform}")
        results = []
        for platform, desc in entries:
            sub = os.path.join(workdir, str(len(results)))
            os.mkdir(sub)
            results.append(_convert_manifest(src, dst, desc, platform, opts, chunk_dict, sub))
        if top.media_type in media.INDEX_TYPES and opts.platform is None:
            index = {
                "schemaVersion": 2,
                "mediaType": media.OCI_INDEX,
                "manifests": [{**{k: v for k, v in r.descriptor.items() if k != "_data"},
                               "platform": _nydus_platform(_platform_obj(r.platform))} for r in results],
            }
            dst.tag(_json(index), media.OCI_INDEX)
        else:
            dst.tag(results[0].descriptor["_data"], media.OCI_MANIFEST)
        for r in results:
            r.descriptor.pop("_data", None)
        return results


def _convert_manifest(src: ImageStore, dst: ImageStore, desc: Descriptor, platform: Platform | None,
                      opts: ConvertOptions, chunk_dict: ChunkDict | None, workdir: str) -> ConvertedManifest:
    manifest = json.loads(src.get_bytes(desc.digest))
    config = json.loads(src.get_bytes(manifest["config"]["digest"]))
    layers = manifest["layers"]
    diff_ids = _diff_ids(config, len(layers))
    for layer in layers:
        if layer.get("mediaType", "") in media.NYDUS_LAYER_TYPES or media.ANNOTATION_BOOTSTRAP in (layer.get("annotations") or {}):
            raise ValueError(f"{desc.digest}: source is already a nydus image")
    progress = Progress(sum(l.get("size", 0) for l in layers), enabled=opts.progress,
                        label=f"converting {platform or desc.digest[:19]}")
    known = set(chunk_dict.chunks) if chunk_dict else set()
    stages = [StagedLayer(os.path.join(workdir, f"stage-{i}")) for i in range(len(layers))]

    # Each layer is converted by worker processes of its own (layerproc: tar parsing is
    # GIL-bound); threads here only feed them, `opts.workers` layers at once, largest first.
    def read_layer(i: int) -> tuple[str, LayerTree]:
        name = f"layer {i} ({layers[i]['digest']})"
        worker = LayerWorker(name, opts.chunk_size, opts.digester, opts.compressor, stages[i].path, known,
                             diff_ids[i])
        try:
            with src.open_blob(layers[i]["digest"]) as raw:
                tree, stages[i].chunks = worker.run(raw, progress.add)
        finally:
            worker.close()
        return name, tree

    order = sorted(range(len(layers)), key=lambda i: -layers[i].get("size", 0))
    with ThreadPoolExecutor(max(1, min(len(layers), opts.workers)), thread_name_prefix="layer") as layer_pool:
        done = dict(zip(order, layer_pool.map(read_layer, order)))
    trees = [done[i] for i in range(len(layers))]
    progress.done()
    root = merge_layers(trees)
    prefetch = expand_prefetch(root, opts.prefetch_patterns)
    own, owner = pack_blobs(stages, workdir, opts.compressor, opts.digester, chunk_dict,
                            head=prefetch_digests(root, prefetch, opts.chunk_size), chunk_size=opts.chunk_size)
    table = resolve_chunks(root, own, owner, chunk_dict)
    meta = RafsMeta(chunk_size=opts.chunk_size, compressor=opts.compressor, digester=opts.digester,
                    blobs=[b.info for b in table], prefetch=prefetch)
    boot_path = os.path.join(workdir, "image.boot")
    with open(boot_path, "wb") as f:
        write_bootstrap(root, meta, f)
    boot_layer, boot_diff_id = _bootstrap_layer(boot_path, os.path.join(workdir, "bootstrap.tar.gz"),
                                                [b for b in table if b.blob_meta])

    uploaded = 0
    layer_descs = []
    for b in table:
        digest = "sha256:" + b.info.blob_id
        if b.path is not None:
            uploaded += dst.put_blob(digest, b.path)
        elif not dst.has_blob(digest):
            uploaded += _copy_dict_blob(chunk_dict.store, dst, digest, workdir)
        layer_descs.append({"mediaType": media.NYDUS_BLOB, "digest": digest, "size": b.info.compressed_size,
                            "annotations": {media.ANNOTATION_BLOB: "true"}})
    boot_digest = _file_digest(boot_layer)
    dst.put_blob(boot_digest, boot_layer)
    layer_descs.append({"mediaType": media.OCI_LAYER_GZIP, "digest": boot_digest, "size": os.path.getsize(boot_layer),
                        "annotations": {media.ANNOTATION_BOOTSTRAP: "true", media.ANNOTATION_FS_VERSION: "6"}})

    config["rootfs"] = {"type": "layers",
                        "diff_ids": ["sha256:" + b.info.blob_id for b in table] + [boot_diff_id]}
    config.pop("history", None)   # history entries would no longer line up with the layers
    config_data = _json(config)
    config_digest = "sha256:" + hashlib.sha256(config_data).hexdigest()
    dst.put_bytes(config_digest, config_data)
    out = {"schemaVersion": 2, "mediaType": media.OCI_MANIFEST,
           "config": {"mediaType": media.OCI_CONFIG, "digest": config_digest, "size": len(config_data)},
           "layers": layer_descs}
    data = _json(out)
    digest = dst.put_manifest(data, media.OCI_MANIFEST)
    descriptor = {"mediaType": media.OCI_MANIFEST, "digest": digest, "size": len(data), "_data": data}
    return ConvertedManifest(platform, descriptor, table, uploaded, sum(l.get("size", 0) for l in layers))


def _copy_dict_blob(store: ImageStore, dst: ImageStore, digest: str, workdir: str) -> bool:
    path = os.path.join(workdir, "dict-" + digest[7:])
    with store.open_blob(digest) as f, open(path, "wb") as out:
        while block := f.read(1 << 20):
            out.write(block)
    return dst.put_blob(digest, path)


def _bootstrap_layer(boot_path: str, out_path: str, own: list[PackedBlob] = ()) -> tuple[str, str]:
    """A reproducible gzip tar holding image/image.boot (+ image/<id>.blob.meta per blob of `own`),
    laid out as nydusify's: the `image` dir 0755, members 0444, ustar headers. Returns (path, diff_id)."""
    diff = hashlib.sha256()

    class _Tee(io.RawIOBase):
        def __init__(self, gz):
            self.gz = gz

        def writable(self):
            return True

        def write(self, b):
            diff.update(b)
            return self.gz.write(b)

    def member(name: str, size: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = size, 0o444, 0
        return ti

    with open(out_path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="", compresslevel=6) as gz:
        with tarfile.open(fileobj=_Tee(gz), mode="w|", format=tarfile.USTAR_FORMAT) as tf:
            ti = tarfile.TarInfo("image")
            ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, 0
            tf.addfile(ti)
            with open(boot_path, "rb") as f:
                tf.addfile(member(media.BOOTSTRAP_NAME, os.path.getsize(boot_path)), f)
            for b in own:
                if b.blob_meta:
                    tf.addfile(member(f"image/{b.info.blob_id}{BLOB_META_SUFFIX}", len(b.blob_meta)),
                               io.BytesIO(b.blob_meta))
    return out_path, "sha256:" + diff.hexdigest()


def _diff_ids(config: dict, count: int) -> list[str | None]:
    ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(ids) != count:
        raise ValueError(f"image config lists {len(ids)} diff_ids for {count} layers")
    return ids


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _platform_obj(platform: Platform | str | None) -> dict:
    if isinstance(platform, Platform):      # what ImageStore.manifests_for yields
        return platform.to_json()
    parts = (platform or "linux/amd64").split("/")
    obj = {"os": parts[0], "architecture": parts[1]}
    if len(parts) > 2:
        obj["variant"] = parts[2]
    return obj


def _nydus_platform(platform: dict) -> dict:
    """An index entry's platform, marked as a nydus image (nydus-snapshotter's index detector)."""
    features = list(platform.get("os.features") or [])
    if OS_FEATURE_NYDUS not in features:
        features.append(OS_FEATURE_NYDUS)
    return {**platform, "os.features": features}
