"""``nydus-snapshotter rpull``: pull an image into containerd with the remote-snapshot labels.

containerd 1.6's ``ctr images pull`` sends no snapshot labels, so it cannot pull
lazily; this client drives containerd's gRPC API the way its unpacker does for
CRI, with the labels a remote snapshotter needs (like stargz's ``ctr-remote
images rpull``):

1. resolve the reference in the registry (manifest and config; rafs.image.store);
2. under a containerd lease, write the manifest (and index) and config into
   containerd's content store, labelled for containerd's garbage collector;
3. per layer, in order, ``Prepare`` through **containerd's** Snapshots service
   (snapshotter = our plugin) with ``containerd.io/snapshot.ref`` = the chain
   ID, ``containerd.io/snapshot/cri.*`` and the layer's
   ``containerd.io/snapshot/*`` annotations. A nydus blob layer answers
   AlreadyExists (nothing downloaded); any other layer (the nydus bootstrap,
   or every layer of an ordinary image) is downloaded into the content store,
   applied by containerd's Diff service onto the returned mounts and committed
   under its chain ID;
4. create (or update) the image record; drop the lease.

Afterwards ``ctr run --snapshotter nydus REF ID CMD`` finds the image unpacked.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import grpc
from google.protobuf import field_mask_pb2

from rafs.image.platform import host_platform

from . import errors
from .client import SnapshotsClient, unix_channel
from .proto import (content_pb2, content_pb2_grpc, descriptor_pb2, diff_pb2, diff_pb2_grpc, images_pb2,
                    images_pb2_grpc, leases_pb2, leases_pb2_grpc, mount_pb2)
from .snapshots import (LABEL_CRI_IMAGE_LAYERS, LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST,
                        LABEL_CRI_MANIFEST_DIGEST, LABEL_MAX_BYTES, LABEL_NYDUS_BLOB, LABEL_PREFIX,
                        LABEL_SNAPSHOT_REF)

log = logging.getLogger("nydus-snapshotter")

WRITE_CHUNK = 1 << 20
LEASE_EXPIRY = timedelta(hours=1)


@dataclass
class LayerResult:
    digest: str
    chain_id: str
    how: str            # "lazy" | "unpacked" | "present"
    bytes: int = 0


@dataclass
class RpullResult:
    ref: str
    manifest_digest: str
    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def lazy(self) -> bool:
        return any(layer.how == "lazy" for layer in self.layers)

    def summary(self) -> str:
        lazy = sum(layer.how == "lazy" for layer in self.layers)
        unpacked = [layer for layer in self.layers if layer.how == "unpacked"]
        present = sum(layer.how == "present" for layer in self.layers)
        mode = "lazy" if lazy else "full pull (no nydus blob layers)"
        return (f"{self.ref}: {mode}; {lazy} layer(s) served lazily, {len(unpacked)} unpacked "
                f"({sum(layer.bytes for layer in unpacked)} bytes downloaded), {present} already present; "
                f"manifest {self.manifest_digest}; {self.seconds:.2f} s")


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI chain IDs: ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))."""
    import hashlib
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


def _image_layers_label(digests: list[str]) -> str:
    """containerd's cri.image-layers: as many digests as fit the label limit."""
    out, size = [], len(LABEL_CRI_IMAGE_LAYERS)
    for d in digests:
        if size + len(d) + 1 > LABEL_MAX_BYTES:
            break
        out.append(d)
        size += len(d) + 1
    return ",".join(out)


class Containerd:
    """The containerd services rpull needs, in one namespace, under one lease."""

    def __init__(self, address: str, namespace: str):
        self.channel = unix_channel(address)
        self.namespace = namespace
        self.lease: str | None = None
        self.content = content_pb2_grpc.ContentStub(self.channel)
        self.images = images_pb2_grpc.ImagesStub(self.channel)
        self.leases = leases_pb2_grpc.LeasesStub(self.channel)
        self.diff = diff_pb2_grpc.DiffStub(self.channel)

    @property
    def md(self) -> list[tuple[str, str]]:
        md = [("containerd-namespace", self.namespace)]
        if self.lease:
            md.append(("containerd-lease", self.lease))
        return md

    def close(self) -> None:
        self.channel.close()

    def create_lease(self) -> None:
        expire = (datetime.now(timezone.utc) + LEASE_EXPIRY).strftime("%Y-%m-%dT%H:%M:%SZ")
        lid = f"nydus-rpull-{uuid.uuid4().hex[:12]}"
        self.leases.Create(leases_pb2.CreateRequest(id=lid, labels={"containerd.io/gc.expire": expire}),
                           metadata=self.md, timeout=30)
        self.lease = lid

    def delete_lease(self) -> None:
        if self.lease:
            lid, self.lease = self.lease, None
            try:
                self.leases.Delete(leases_pb2.DeleteRequest(id=lid), metadata=self.md, timeout=30)
            except grpc.RpcError as e:
                log.warning("deleting lease %s: %s", lid, e.details())

    def has_content(self, digest: str) -> bool:
        try:
            self.content.Info(content_pb2.InfoRequest(digest=digest), metadata=self.md, timeout=30)
            return True
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise

    def write(self, digest: str, size: int, chunks, labels: dict[str, str]) -> None:
        """Write a blob (an iterable of byte chunks) into the content store, committed with ``labels``."""
        ref = f"nydus-rpull-{digest}"

        def requests():
            offset = 0
            for data in chunks:
                yield content_pb2.WriteContentRequest(action=content_pb2.WRITE, ref=ref, total=size,
                                                      expected=digest, offset=offset, data=data)
                offset += len(data)
            yield content_pb2.WriteContentRequest(action=content_pb2.COMMIT, ref=ref, total=size,
                                                  expected=digest, offset=offset, labels=labels)
        try:
            for _ in self.content.Write(requests(), metadata=self.md, timeout=600):
                pass
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise errors.from_grpc(e) from None
            self.set_labels(digest, labels)

    def set_labels(self, digest: str, labels: dict[str, str]) -> None:
        if not labels:
            return
        info = content_pb2.Info(digest=digest, labels=labels)
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        self.content.Update(content_pb2.UpdateRequest(info=info, update_mask=mask), metadata=self.md, timeout=30)

    def apply(self, desc: dict, mounts) -> str:
        req = diff_pb2.ApplyRequest(
            diff=descriptor_pb2.Descriptor(media_type=desc["mediaType"], digest=desc["digest"], size=desc["size"]),
            mounts=[mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=m.options)
                    for m in mounts])
        try:
            return self.diff.Apply(req, metadata=self.md, timeout=600).applied.digest
        except grpc.RpcError as e:
            raise errors.from_grpc(e) from None

    def put_image(self, name: str, target: dict) -> None:
        img = images_pb2.Image(name=name, target=descriptor_pb2.Descriptor(
            media_type=target["mediaType"], digest=target["digest"], size=target["size"]))
        try:
            self.images.Create(images_pb2.CreateImageRequest(image=img), metadata=self.md, timeout=30)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise errors.from_grpc(e) from None
            self.images.Update(images_pb2.UpdateImageRequest(
                image=img, update_mask=field_mask_pb2.FieldMask(paths=["target"])), metadata=self.md, timeout=30)


def rpull(address: str, ref: str, *, namespace: str = "default", snapshotter: str = "nydus",
          plain_http: bool = False, platform: str | None = None, hosts_dir: str | None = None,
          insecure: bool = False, mirrors=()) -> RpullResult:
    """`mirrors`: `MirrorConfig`s (`--mirror`) the manifests, config and downloaded layers are read
    through first, before containerd's hosts (`rafs.storage.factory.store_hosts`)."""
    from rafs.image import media
    from rafs.image.refs import parse_ref
    from rafs.image.store import RegistryStore, open_store
    from rafs.storage.factory import store_hosts

    t0 = time.monotonic()
    r = parse_ref(ref)
    if r.kind == "oci":
        raise errors.InvalidArgument("rpull reads from a registry (HOST/REPO:TAG), not an OCI layout")
    name = str(ref).removeprefix("docker://")
    ctd = Containerd(address, namespace)
    try:
        if mirrors:
            opened = RegistryStore(r, hosts=store_hosts(r.host, mirrors, hosts_dir=hosts_dir, plain_http=plain_http,
                                                        insecure=insecure))
        else:
            opened = open_store(r, plain_http=plain_http, hosts_dir=hosts_dir, insecure=insecure)
        with opened as store:
            top = store.resolve()
            if top.media_type in media.INDEX_TYPES:
                entries = store.manifests_for(top, platform or host_platform())
                if not entries:
                    raise errors.NotFound(f"{ref}: no manifest for platform {platform or host_platform()}")
                _, mdesc = entries[0]
            else:
                mdesc = top
            manifest_bytes = store.get_bytes(mdesc.digest)
            import json
            manifest = json.loads(manifest_bytes)
            config_desc = manifest["config"]
            config_bytes = store.get_bytes(config_desc["digest"])
            config = json.loads(config_bytes)
            layers = manifest.get("layers", [])
            diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
            if len(diff_ids) != len(layers):
                raise errors.InvalidArgument(f"{ref}: {len(layers)} layers but {len(diff_ids)} diff_ids in the config")
            chains = chain_ids(diff_ids)
            result = RpullResult(name, mdesc.digest)
            ctd.create_lease()
            sn = SnapshotsClient(ctd.channel, snapshotter, namespace=namespace, lease=ctd.lease)
            base_labels = {LABEL_CRI_IMAGE_REF: name, LABEL_CRI_MANIFEST_DIGEST: mdesc.digest}
            layer_digests = [layer["digest"] for layer in layers]
            parent = ""
            for i, (layer, chain) in enumerate(zip(layers, chains)):
                result.layers.append(_pull_layer(ctd, sn, store, layer, diff_ids[i], chain, parent, {
                    **{k: v for k, v in (layer.get("annotations") or {}).items() if k.startswith(LABEL_PREFIX)},
                    **base_labels, LABEL_SNAPSHOT_REF: chain, LABEL_CRI_LAYER_DIGEST: layer["digest"],
                    LABEL_CRI_IMAGE_LAYERS: _image_layers_label(layer_digests[i:])}))
                parent = chain
            # content: config (holds the snapshot chain for GC), manifest (config + unpacked layers), index
            ctd.write(config_desc["digest"], len(config_bytes), [config_bytes],
                      {f"containerd.io/gc.ref.snapshot.{snapshotter}": chains[-1]} if chains else {})
            mlabels = {"containerd.io/gc.ref.content.config": config_desc["digest"]}
            for i, (layer, lr) in enumerate(zip(layers, result.layers)):
                if lr.how == "unpacked":
                    mlabels[f"containerd.io/gc.ref.content.l.{i}"] = layer["digest"]
            ctd.write(mdesc.digest, len(manifest_bytes), [manifest_bytes], mlabels)
            target = {"mediaType": mdesc.media_type or manifest.get("mediaType") or media.OCI_MANIFEST,
                      "digest": mdesc.digest,
                      "size": len(manifest_bytes)}
            if top.digest != mdesc.digest:          # an index: keep it as the image target
                index_bytes = store.get_bytes(top.digest)
                ctd.write(top.digest, len(index_bytes), [index_bytes],
                          {"containerd.io/gc.ref.content.m.0": mdesc.digest})
                target = {"mediaType": top.media_type, "digest": top.digest, "size": len(index_bytes)}
            ctd.put_image(name, target)
        result.seconds = time.monotonic() - t0
        return result
    finally:
        ctd.delete_lease()
        ctd.close()


def _pull_layer(ctd: Containerd, sn: SnapshotsClient, store, layer: dict, diff_id: str, chain: str,
                parent: str, labels: dict[str, str]) -> LayerResult:
    try:
        sn.stat(chain)
        return LayerResult(layer["digest"], chain, "present")
    except errors.NotFound:
        pass
    key = f"extract-{time.time_ns()}-{uuid.uuid4().hex[:4]} {chain}"
    try:
        mounts = sn.prepare(key, parent, labels)
    except errors.AlreadyExists:
        sn.stat(chain)                 # the remote snapshot containerd recorded under the chain ID
        log.info("layer %s (%s): remote snapshot, not downloaded", chain, layer["digest"])
        return LayerResult(layer["digest"], chain, "lazy")
    if labels.get(LABEL_NYDUS_BLOB) == "true":
        log.warning("layer %s is a nydus blob but the snapshotter prepared it normally: is %r the nydus "
                    "snapshotter?", layer["digest"], sn.name)
    try:
        if not ctd.has_content(layer["digest"]):
            with store.open_blob(layer["digest"]) as f:
                ctd.write(layer["digest"], layer["size"], iter(lambda: f.read(WRITE_CHUNK), b""), {})
        applied = ctd.apply(layer, mounts)
        if applied != diff_id:
            raise errors.InvalidArgument(f"layer {layer['digest']}: applied diff {applied}, config says {diff_id}")
        sn.commit(chain, key, labels)
    except BaseException:
        try:
            sn.remove(key)
        except errors.SnapshotterError:
            pass
        raise
    try:
        ctd.set_labels(layer["digest"], {"containerd.io/uncompressed": diff_id})
    except grpc.RpcError:
        pass
    log.info("layer %s (%s): unpacked, %d bytes", chain, layer["digest"], layer["size"])
    return LayerResult(layer["digest"], chain, "unpacked", layer["size"])
