"""A small CRI image client (our proto subset of k8s.io/cri-api runtime.v1) for containerd's CRI plugin.

Debian bookworm has no crictl; containerd's CRI plugin serves runtime.v1 on the
main containerd socket, in the ``k8s.io`` namespace:

    cri = CriClient(ctd.address)
    ref = cri.pull("127.0.0.1:5000/app:v1")     # -> image id (config digest)
    cri.list()                                  # [{id, repo_tags, repo_digests, size}]
    cri.remove("127.0.0.1:5000/app:v1")
"""
from __future__ import annotations

import grpc

from snapshotter.client import unix_channel
from snapshotter.proto import cri_pb2, cri_pb2_grpc

CRI_NAMESPACE = "k8s.io"


class CriClient:
    def __init__(self, address: str, timeout: float = 120.0):
        self.channel = unix_channel(address)
        self.images = cri_pb2_grpc.ImageServiceStub(self.channel)
        self.runtime = cri_pb2_grpc.RuntimeServiceStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "CriClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def version(self) -> dict:
        r = self.runtime.Version(cri_pb2.VersionRequest(version="v1"), timeout=self.timeout)
        return {"runtime_name": r.runtime_name, "runtime_version": r.runtime_version,
                "runtime_api_version": r.runtime_api_version}

    def pull(self, image: str) -> str:
        r = self.images.PullImage(cri_pb2.PullImageRequest(image=cri_pb2.ImageSpec(image=image)),
                                  timeout=self.timeout)
        return r.image_ref

    def list(self) -> list[dict]:
        r = self.images.ListImages(cri_pb2.ListImagesRequest(), timeout=self.timeout)
        return [{"id": i.id, "repo_tags": list(i.repo_tags), "repo_digests": list(i.repo_digests),
                 "size": i.size} for i in r.images]

    def remove(self, image: str) -> None:
        self.images.RemoveImage(cri_pb2.RemoveImageRequest(image=cri_pb2.ImageSpec(image=image)),
                                timeout=self.timeout)

    def image_fs_info(self) -> list[dict]:
        r = self.images.ImageFsInfo(cri_pb2.ImageFsInfoRequest(), timeout=self.timeout)
        return [{"mountpoint": u.fs_id.mountpoint, "used_bytes": u.used_bytes.value,
                 "inodes_used": u.inodes_used.value} for u in r.image_filesystems]


__all__ = ["CriClient", "CRI_NAMESPACE", "grpc"]
