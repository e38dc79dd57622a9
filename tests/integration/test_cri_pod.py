"""A pod through containerd's CRI, the calls kubelet makes, on a nydus image served lazily.

Real parts: Debian's containerd 1.6 (CRI plugin with our snapshotter as its snapshotter and
`disable_snapshot_annotations = false`, as the README's Kubernetes section says), runc, a real
docker-registry, our snapshotter and its mount daemon. The project's own CRI client
(tests/helpers/cri.py) plays kubelet:

    RunPodSandbox (host network: no CNI; containerd pulls its sandbox_image, a pause image built
    here from busybox-static and pushed to the test registry) -> PullImage (the pod's annotations
    on the ImageSpec, the sandbox config, as kubelet sends them; containerd's CRI adds the snapshot
    labels) -> CreateContainer (by the image id PullImage returned) -> StartContainer -> the
    container's CRI log file -> StopPodSandbox -> RemovePodSandbox.

The registry's access log shows the pull stayed lazy: the pull fetched the manifest, config and
bootstrap layer only, never a nydus blob; the container's run fetched only range GETs (206) of
the chunks it read — /data/big (2 MiB of random bytes nobody reads) never leaves the registry.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass

import pytest

from converter.convert import ConvertOptions, convert
from rafs.image.store import open_store
from snapshotter.proto import cri_pb2
from snapshotter.snapshots import LABEL_CRI_IMAGE_REF, LABEL_NYDUS_BLOB, LABEL_REMOTE
from testbed.containerd import Containerd, SnapshotterProcess, mounts_under
from testbed.containerd import running_node
from testbed.registry import skopeo_copy
from tests.helpers import images as im
from tests.helpers.cri import CriClient, container_config, pod_config, read_cri_log

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="containerd, runc and mounts need root"),
    pytest.mark.skipif(not all(shutil.which(b) for b in ("containerd", "ctr", "runc", "skopeo")),
                       reason="needs containerd, runc and skopeo (apt)"),
    pytest.mark.skipif(not os.path.isfile("/bin/busybox"), reason="needs busybox-static"),
]

HELLO = im.BUSYBOX_HELLO.decode().strip()
BIG = im.random(2 << 20, seed=13)
SMALL = b"small file\n"


@dataclass
class Images:
    repo: str
    nydus: str                # HOST/REPO:nydus, the app
    pause: str                # HOST/REPO-pause:3.9, the sandbox image (ordinary OCI)
    blobs: dict[str, int]     # the nydus blob layers: digest -> size
    bootstrap: str
    config: str


def _pause_layers() -> list[list[im.Entry]]:
    """A pause image: a static busybox whose `sleep` holds the pod's namespaces (containerd kills the
    sandbox with SIGKILL, so no signal handling is needed)."""
    return [[im.Entry.dir("bin"), im.Entry.file("bin/busybox", im.host_file("/bin/busybox"), mode=0o755),
             im.Entry.symlink("bin/sleep", "busybox")]]


@pytest.fixture(scope="module")
def images(registry_session, tmp_path_factory) -> Images:
    work = tmp_path_factory.mktemp("cri-pod-images")
    host, repo = registry_session.host, f"pod-{uuid.uuid4().hex[:8]}"
    pause = im.build_oci_layout(work / "pause", "pause", _pause_layers(),
                                config_overrides={"Entrypoint": ["/bin/sleep", "2147483647"], "Cmd": None})
    skopeo_copy(pause.ref, f"docker://{host}/{repo}-pause:3.9")
    layers = im.busybox_image_layers() + [[
        im.Entry.dir("data"), im.Entry.file("data/big", BIG), im.Entry.file("data/small", SMALL)]]
    app = im.build_oci_layout(work / "app", "app", layers, config_overrides=im.BUSYBOX_CONFIG)
    convert(app.ref, f"{host}/{repo}:nydus", ConvertOptions(plain_http=True, chunk_size=64 << 10))
    with open_store(f"{host}/{repo}:nydus", plain_http=True) as store:
        manifest = json.loads(store.get_bytes(store.resolve().digest))
    ann = [(l, l.get("annotations") or {}) for l in manifest["layers"]]
    blobs = {l["digest"]: l["size"] for l, a in ann if a.get(LABEL_NYDUS_BLOB) == "true"}
    [boot] = [l["digest"] for l, a in ann if "containerd.io/snapshot/nydus-bootstrap" in a]
    return Images(repo, f"{host}/{repo}:nydus", f"{host}/{repo}-pause:3.9", blobs, boot,
                  manifest["config"]["digest"])


@pytest.fixture
def node(tmp_path, registry_session, images):
    """Our snapshotter + a containerd whose CRI plugin uses it (annotations on) and the test's pause image."""
    snap = SnapshotterProcess(tmp_path / "snap", log_level="info")
    ctd = Containerd(tmp_path / "ctd", snapshotter=snap, registry_host=registry_session.host,
                     sandbox_image=images.pause)
    with running_node(snap, ctd, tmp_path):
        yield snap, ctd


def test_pod_through_cri_runs_lazily(node, tmp_path, registry_session, images, record_property):
    snap, ctd = node
    reg = registry_session
    uid = str(uuid.uuid4())
    log_dir = tmp_path / "pods" / f"default_lazy-pod_{uid}"       # kubelet: /var/log/pods/NS_NAME_UID
    log_dir.mkdir(parents=True)                                    # kubelet makes it before RunPodSandbox
    pod = pod_config("lazy-pod", "default", uid, log_directory=log_dir,
                     annotations={"kubernetes.io/config.source": "api", "example.com/team": "nydus"})
    t0 = time.monotonic()
    with CriClient(ctd.address) as cri:
        assert cri.version()["runtime_api_version"] == "v1"
        sid, cid = cri.run_pod_sandbox(pod), None
        try:
            t_sandbox = time.monotonic() - t0
            st = cri.pod_sandbox_status(sid)
            assert st.state == cri_pb2.SANDBOX_READY
            assert st.linux.namespaces.options.network == cri_pb2.NODE
            assert any(images.pause in i["repo_tags"] for i in cri.list())     # our pause image, via CRI

            # PullImage as kubelet sends it: the pod's annotations and sandbox config
            mark = reg.mark()
            t1 = time.monotonic()
            image_id = cri.pull(images.nydus, annotations=pod.annotations, sandbox_config=pod)
            t_pull = time.monotonic() - t1
            assert image_id.startswith("sha256:")
            pulled = {e.digest for e in _blob_gets(reg, images, mark)}
            assert pulled == {images.bootstrap, images.config}, "the pull fetched more than config + bootstrap"
            with snap.client() as sn:                    # CRI's snapshot labels reached the snapshotter
                remote = [i for i in sn.list() if LABEL_REMOTE in i.labels]
            assert len(remote) == len(images.blobs)
            assert {i.labels[LABEL_CRI_IMAGE_REF] for i in remote} == {images.nydus}

            # CreateContainer by the image id, StartContainer, wait for it (kubelet's PLEG polls), its log
            mark = reg.mark()
            t2 = time.monotonic()
            (log_dir / "app").mkdir()                    # kubelet makes the container's log dir
            cfg = container_config("app", image_id, ["/bin/sh", "-c"],
                                   ["cat /etc/hello.txt; md5sum /data/small; echo to-stderr >&2"],
                                   pod=pod, user_image=images.nydus)
            cid = cri.create_container(sid, cfg, pod)
            cri.start_container(cid)
            status = cri.wait_container(cid)
            t_run = time.monotonic() - t2
            assert status.exit_code == 0 and status.reason == "Completed", status
            assert status.log_path == str(log_dir / "app" / "0.log")
            log = read_cri_log(status.log_path)
            assert [line for s, line in log if s == "stdout"] == \
                [HELLO, f"{hashlib.md5(SMALL).hexdigest()}  /data/small"], log
            assert [line for s, line in log if s == "stderr"] == ["to-stderr"], log
            assert [c.id for c in cri.list_containers(sid)] == [cid]

            # lazy: only range GETs of the chunks read, never a whole blob, and /data/big not at all
            ran = _blob_gets(reg, images, mark)
            assert ran and all(e.status == 206 and e.digest in images.blobs for e in ran), \
                [(e.path, e.status, e.bytes) for e in ran]
            fetched, total = sum(e.bytes for e in ran), sum(images.blobs.values())
            assert fetched < total - BIG.size, (fetched, total)
            st = snap.status()
            assert (images.nydus, "lazy") in [(i["ref"], i["status"]) for i in st["images"]]
            [m] = st["mounts"]
            assert m["daemon_alive"] and 0 < m["bytes_fetched"] < total - BIG.size
        finally:                                         # kubelet kills a pod: its containers, then the sandbox
            if cid is not None:
                cri.stop_container(cid)
            cri.stop_pod_sandbox(sid)
            cri.remove_pod_sandbox(sid)
        assert cri.list_pod_sandboxes() == [] and cri.list_containers() == []
    assert not mounts_under(ctd.state / "io.containerd.grpc.v1.cri")        # the sandbox's /dev/shm too
    assert ctd.ctr("tasks", "ls", "-q", namespace="k8s.io").stdout.split() == []
    for k, v in (("sandbox_s", t_sandbox), ("pull_s", t_pull), ("create_start_exit_s", t_run)):
        record_property(k, round(v, 3))
    record_property("chunk_bytes_fetched", fetched)


def _blob_gets(reg, images: Images, since: int) -> list:
    return [e for e in reg.access_log(since)
            if e.method == "GET" and e.path.startswith(f"/v2/{images.repo}/blobs/")]
