"""A small CRI client (our proto subset of k8s.io/cri-api runtime.v1) for containerd's CRI plugin.

Debian bookworm has no crictl; containerd's CRI plugin serves runtime.v1 on the
main containerd socket, in the ``k8s.io`` namespace. Images:

    cri = CriClient(ctd.address)
    ref = cri.pull("127.0.0.1:5000/app:v1")     # -> image id (config digest)
    cri.list()                                  # [{id, repo_tags, repo_digests, size}]
    cri.remove("127.0.0.1:5000/app:v1")

A pod, the calls kubelet makes (``kuberuntime``: sandbox, then each container):

    pod = pod_config("web", "default", uid, log_directory=f"/var/log/pods/default_web_{uid}")
    sid = cri.run_pod_sandbox(pod)                          # pulls containerd's sandbox_image if needed
    image_id = cri.pull(ref, sandbox_config=pod, annotations=pod.annotations)
    cid = cri.create_container(sid, container_config("app", image_id, ["cat", "/etc/hello.txt"], pod=pod,
                                                     user_image=ref), pod)
    cri.start_container(cid)
    cri.wait_container(cid)                                 # -> its ContainerStatus once exited
    read_cri_log(pod.log_directory + "/app/0.log")          # [(stream, line)]
    cri.stop_pod_sandbox(sid); cri.remove_pod_sandbox(sid)
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

import grpc

from snapshotter.client import unix_channel
from snapshotter.proto import cri_pb2, cri_pb2_grpc

CRI_NAMESPACE = "k8s.io"

# kubelet's labels on sandboxes and containers (pkg/kubelet/types/labels.go)
POD_NAME, POD_NAMESPACE, POD_UID = "io.kubernetes.pod.name", "io.kubernetes.pod.namespace", "io.kubernetes.pod.uid"
CONTAINER_NAME = "io.kubernetes.container.name"


def pod_config(name: str, namespace: str, uid: str, *, log_directory: str | Path, host_network: bool = True,
               labels: Mapping[str, str] | None = None, annotations: Mapping[str, str] | None = None,
               attempt: int = 0) -> "cri_pb2.PodSandboxConfig":
    """The PodSandboxConfig kubelet sends for a pod (generatePodSandboxConfig): its metadata, its labels plus
    kubelet's, its annotations, the pod log directory, and the Linux namespaces — with `host_network` the
    node's network (no CNI is called; kubelet sets no hostname then), a pod-wide IPC namespace and a pid
    namespace per container (shareProcessNamespace off)."""
    ns = cri_pb2.NamespaceOption(network=cri_pb2.NODE if host_network else cri_pb2.POD,
                                 pid=cri_pb2.CONTAINER, ipc=cri_pb2.POD)
    return cri_pb2.PodSandboxConfig(
        metadata=cri_pb2.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=attempt),
        log_directory=str(log_directory),
        labels={**(labels or {}), POD_NAME: name, POD_NAMESPACE: namespace, POD_UID: uid},
        annotations=dict(annotations or {}),
        linux=cri_pb2.LinuxPodSandboxConfig(
            security_context=cri_pb2.LinuxSandboxSecurityContext(namespace_options=ns)))


def container_config(name: str, image: str, command: Sequence[str] = (), args: Sequence[str] = (), *,
                     pod: "cri_pb2.PodSandboxConfig | None" = None, user_image: str | None = None,
                     env: Mapping[str, str] | None = None, working_dir: str = "", attempt: int = 0,
                     annotations: Mapping[str, str] | None = None) -> "cri_pb2.ContainerConfig":
    """The ContainerConfig kubelet sends (generateContainerConfig): `image` is what PullImage returned (the
    image id; `user_image`, the reference as written in the pod spec, goes into user_specified_image, which
    containerd 1.6 does not know yet), the log path is NAME/ATTEMPT.log relative to the pod's log directory,
    the pod's namespaces."""
    labels = {CONTAINER_NAME: name}
    if pod is not None:
        md = pod.metadata
        labels.update({POD_NAME: md.name, POD_NAMESPACE: md.namespace, POD_UID: md.uid})
        ns = pod.linux.security_context.namespace_options
    else:
        ns = cri_pb2.NamespaceOption(network=cri_pb2.POD, pid=cri_pb2.CONTAINER, ipc=cri_pb2.POD)
    return cri_pb2.ContainerConfig(
        metadata=cri_pb2.ContainerMetadata(name=name, attempt=attempt),
        image=cri_pb2.ImageSpec(image=image, user_specified_image=user_image or ""),
        command=list(command), args=list(args), working_dir=working_dir,
        envs=[cri_pb2.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
        labels=labels, annotations=dict(annotations or {}),
        log_path=f"{name}/{attempt}.log",
        linux=cri_pb2.LinuxContainerConfig(
            security_context=cri_pb2.LinuxContainerSecurityContext(namespace_options=ns)))


def read_cri_log(path: str | Path) -> list[tuple[str, str]]:
    """A container log file in the CRI format (`TIMESTAMP STREAM P|F TEXT` per line, P: a partial line that
    the next entry continues) -> [(stream, full line)]."""
    out: list[tuple[str, str]] = []
    partial: dict[str, str] = {}
    for raw in Path(path).read_text(errors="replace").splitlines():
        parts = raw.split(" ", 3)
        if len(parts) < 3:
            continue
        _, stream, tag = parts[:3]
        text = parts[3] if len(parts) == 4 else ""
        if tag == "P":
            partial[stream] = partial.get(stream, "") + text
            continue
        out.append((stream, partial.pop(stream, "") + text))
    return out


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

    # -- images
    def pull(self, image: str, *, annotations: Mapping[str, str] | None = None,
             sandbox_config: "cri_pb2.PodSandboxConfig | None" = None) -> str:
        """PullImage; kubelet passes the pod's annotations on the ImageSpec and the pod's sandbox config."""
        req = cri_pb2.PullImageRequest(image=cri_pb2.ImageSpec(image=image, annotations=dict(annotations or {})))
        if sandbox_config is not None:
            req.sandbox_config.CopyFrom(sandbox_config)
        return self.images.PullImage(req, timeout=self.timeout).image_ref

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

    # -- pod sandboxes
    def run_pod_sandbox(self, config: "cri_pb2.PodSandboxConfig", runtime_handler: str = "") -> str:
        r = self.runtime.RunPodSandbox(cri_pb2.RunPodSandboxRequest(config=config, runtime_handler=runtime_handler),
                                       timeout=self.timeout)
        return r.pod_sandbox_id

    def stop_pod_sandbox(self, sandbox_id: str) -> None:
        self.runtime.StopPodSandbox(cri_pb2.StopPodSandboxRequest(pod_sandbox_id=sandbox_id), timeout=self.timeout)

    def remove_pod_sandbox(self, sandbox_id: str) -> None:
        self.runtime.RemovePodSandbox(cri_pb2.RemovePodSandboxRequest(pod_sandbox_id=sandbox_id),
                                      timeout=self.timeout)

    def pod_sandbox_status(self, sandbox_id: str) -> "cri_pb2.PodSandboxStatus":
        return self.runtime.PodSandboxStatus(cri_pb2.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id),
                                             timeout=self.timeout).status

    def list_pod_sandboxes(self) -> list["cri_pb2.PodSandbox"]:
        return list(self.runtime.ListPodSandbox(cri_pb2.ListPodSandboxRequest(), timeout=self.timeout).items)

    # -- containers
    def create_container(self, sandbox_id: str, config: "cri_pb2.ContainerConfig",
                         sandbox_config: "cri_pb2.PodSandboxConfig") -> str:
        r = self.runtime.CreateContainer(cri_pb2.CreateContainerRequest(
            pod_sandbox_id=sandbox_id, config=config, sandbox_config=sandbox_config), timeout=self.timeout)
        return r.container_id

    def start_container(self, container_id: str) -> None:
        self.runtime.StartContainer(cri_pb2.StartContainerRequest(container_id=container_id), timeout=self.timeout)

    def stop_container(self, container_id: str, timeout: int = 0) -> None:
        self.runtime.StopContainer(cri_pb2.StopContainerRequest(container_id=container_id, timeout=timeout),
                                   timeout=self.timeout + timeout)

    def remove_container(self, container_id: str) -> None:
        self.runtime.RemoveContainer(cri_pb2.RemoveContainerRequest(container_id=container_id),
                                     timeout=self.timeout)

    def container_status(self, container_id: str) -> "cri_pb2.ContainerStatus":
        return self.runtime.ContainerStatus(cri_pb2.ContainerStatusRequest(container_id=container_id),
                                            timeout=self.timeout).status

    def list_containers(self, sandbox_id: str = "") -> list["cri_pb2.Container"]:
        req = cri_pb2.ListContainersRequest(filter=cri_pb2.ContainerFilter(pod_sandbox_id=sandbox_id))
        return list(self.runtime.ListContainers(req, timeout=self.timeout).containers)

    def wait_container(self, container_id: str, timeout: float = 60.0) -> "cri_pb2.ContainerStatus":
        """Poll ContainerStatus (as kubelet's PLEG does) until the container has exited; its last status."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.container_status(container_id)
            if st.state == cri_pb2.CONTAINER_EXITED:
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"container {container_id} still {cri_pb2.ContainerState.Name(st.state)} "
                                   f"after {timeout} s")
            time.sleep(0.1)


__all__ = ["CriClient", "CRI_NAMESPACE", "container_config", "pod_config", "read_cri_log", "grpc"]
