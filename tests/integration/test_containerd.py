"""nydus-snapshotter under Debian's real containerd 1.6 (+ runc, ctr, docker-registry).

Every test gets its own containerd (root/state/socket under tmp, unique
namespace) and its own snapshotter process, both torn down with their mounts
and mount daemons. The images are built once per module and pushed to the
session registry: an ordinary OCI busybox image (`:oci`) and its nydus
conversion (`:nydus`), 64 KiB chunks. Besides busybox the image has
/data/big (2 MiB of random bytes) that no container reads until a test does,
so a read of it must go to the registry (or fail) and cannot come from a
cache warmed by the container's start.
"""
from __future__ import annotations

import os
import signal
import shutil
import sys
import time
import uuid
from dataclasses import dataclass

import pytest

from converter.convert import ConvertOptions, convert
from snapshotter.snapshots import (LABEL_CRI_IMAGE_LAYERS, LABEL_CRI_IMAGE_REF, LABEL_CRI_LAYER_DIGEST,
                                   LABEL_CRI_MANIFEST_DIGEST, LABEL_NYDUS_BLOB, LABEL_REMOTE, LABEL_SNAPSHOT_REF)
from tests.helpers import images as im
from testbed.containerd import Containerd, SnapshotterProcess, mounts_under, running_node, unmount_under
from tests.helpers.cri import CRI_NAMESPACE, CriClient
from testbed.registry import skopeo_copy

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="containerd, runc and mounts need root"),
    pytest.mark.skipif(not all(shutil.which(b) for b in ("containerd", "ctr", "runc", "skopeo")),
                       reason="needs containerd, runc and skopeo (apt)"),
    pytest.mark.skipif(not os.path.isfile("/bin/busybox"), reason="needs busybox-static"),
]

HELLO = im.BUSYBOX_HELLO.decode()
BIG = im.random(2 << 20, seed=5)


@dataclass
class Images:
    host: str
    repo: str
    oci: str                  # HOST/REPO:oci
    nydus: str                # HOST/REPO:nydus
    blob_digests: list[str]   # the nydus blob layers
    bootstrap_digest: str
    big_md5: str


@pytest.fixture(scope="module")
def images(registry_session, tmp_path_factory) -> Images:
    import hashlib
    import json
    work = tmp_path_factory.mktemp("ctd-images")
    layers = im.busybox_image_layers() + [[
        im.Entry.dir("data"), im.Entry.file("data/big", BIG), im.Entry.file("data/small", b"small file\n")]]
    layout = im.build_oci_layout(work / "layout", "bb", layers, config_overrides=im.BUSYBOX_CONFIG)
    host = registry_session.host
    repo = f"ctd-{uuid.uuid4().hex[:8]}"
    skopeo_copy(layout.ref, f"docker://{host}/{repo}:oci")
    convert(layout.ref, f"{host}/{repo}:nydus", ConvertOptions(plain_http=True, chunk_size=64 << 10))
    from rafs.image.store import open_store
    with open_store(f"{host}/{repo}:nydus", plain_http=True) as store:
        manifest = json.loads(store.get_bytes(store.resolve().digest))
    layers = manifest["layers"]
    blobs = [l["digest"] for l in layers if (l.get("annotations") or {}).get(LABEL_NYDUS_BLOB) == "true"]
    boot = [l["digest"] for l in layers if "containerd.io/snapshot/nydus-bootstrap" in (l.get("annotations") or {})]
    assert blobs and len(boot) == 1
    return Images(host, repo, f"{host}/{repo}:oci", f"{host}/{repo}:nydus", blobs, boot[0],
                  hashlib.md5(BIG.read()).hexdigest())


@dataclass
class Env:
    snap: SnapshotterProcess
    ctd: Containerd
    registry: object
    images: Images

    def rpull(self, ref: str, namespace: str | None = None):
        r = self.snap.cli("rpull", "--address", self.ctd.address, "--namespace", namespace or self.ctd.namespace,
                          "--plain-http", ref, timeout=120)
        assert r.returncode == 0, f"rpull failed:\n{r.stdout}\n{r.stderr}\n{self.snap.log()[-3000:]}"
        return r.stdout

    def blob_traffic(self, since: int) -> list:
        """Registry log entries for blobs of this module's repository since mark ``since``."""
        return [e for e in self.registry.access_log(since)
                if e.path.startswith(f"/v2/{self.images.repo}/blobs/")]


@pytest.fixture
def env(tmp_path, registry_session, images):
    snap = SnapshotterProcess(tmp_path / "snap")
    ctd = Containerd(tmp_path / "ctd", snapshotter=snap, registry_host=images.host)
    with running_node(snap, ctd, tmp_path):
        yield Env(snap, ctd, registry_session, images)


def _nydus_blob_gets(entries, images: Images) -> list:
    return [e for e in entries if e.method == "GET" and e.digest in images.blob_digests]


# ---------------------------------------------------------------------------------- ordinary images

def test_ordinary_image_pull_and_run(env):
    """`ctr images pull` (no labels: containerd downloads and unpacks) then `ctr run`, through our snapshotter."""
    env.ctd.ctr("images", "pull", "--plain-http", "--snapshotter", "nydus", env.images.oci)
    r = env.ctd.ctr_run(env.images.oci, "plain1")
    assert r.stdout == HELLO
    r = env.ctd.ctr_run(env.images.oci, "plain2", "sh", "-c", "md5sum /data/big; echo x > /tmp/w; cat /tmp/w")
    assert r.stdout.split()[0] == env.images.big_md5 and r.stdout.endswith("x\n")
    snaps = env.ctd.ctr("snapshots", "--snapshotter", "nydus", "ls").stdout
    assert snaps.count("Committed") == 2          # two layers, unpacked normally


def test_rpull_of_ordinary_image_is_a_full_pull(env):
    out = env.rpull(env.images.oci)
    assert "full pull" in out and "0 layer(s) served lazily" in out
    assert env.ctd.ctr_run(env.images.oci, "full1").stdout == HELLO
    st = env.snap.status()
    assert [(i["ref"], i["status"]) for i in st["images"]] == [(env.images.oci, "full")]
    assert st["mounts"] == []


def test_ctr_pull_sends_no_labels(env):
    """containerd 1.6's `ctr images pull` sends no snapshot labels: a nydus image cannot be pulled lazily by it
    (containerd downloads the nydus blob and fails to unpack it: "no processor for media-type")."""
    r = env.ctd.ctr("images", "pull", "--plain-http", "--snapshotter", "nydus", env.images.nydus, check=False)
    assert r.returncode != 0
    assert "failed to extract layer" in r.stderr and "nydus.blob" in r.stderr, r.stderr   # no processor for it
    log = env.snap.log()
    assert "Prepare key=" in log and "AlreadyExists" not in log     # no labels -> no remote snapshot


# ---------------------------------------------------------------------------------- lazy: rpull

def test_rpull_then_run_lazily(env, record_property):
    images, reg = env.images, env.registry
    mark = reg.mark()
    t0 = time.monotonic()
    out = env.rpull(images.nydus)
    t_pull = time.monotonic() - t0
    assert f"{len(images.blob_digests)} layer(s) served lazily" in out, out
    pulled = env.blob_traffic(mark)
    assert not _nydus_blob_gets(pulled, images), "the pull fetched nydus blob layers"
    assert {e.digest for e in pulled if e.method == "GET"} <= {images.bootstrap_digest} | \
        {e.digest for e in pulled if e.bytes < 4096}                 # + the config

    mark = reg.mark()
    t0 = time.monotonic()
    r = env.ctd.ctr_run(images.nydus, "lazy1")
    t_run = time.monotonic() - t0
    assert r.stdout == HELLO
    ran = env.blob_traffic(mark)
    gets = [e for e in ran if e.method == "GET"]
    assert gets and all(e.status == 206 and e.digest in images.blob_digests for e in gets), \
        [(e.path, e.status) for e in gets]
    fetched = sum(e.bytes for e in gets)
    record_property("rpull_s", round(t_pull, 3))
    record_property("first_run_s", round(t_run, 3))
    record_property("range_gets", len(gets))
    record_property("bytes_fetched", fetched)

    # a file nobody read yet is fetched on demand, correctly
    mark = reg.mark()
    r = env.ctd.ctr_run(images.nydus, "lazy2", "md5sum", "/data/big")
    assert r.stdout.split()[0] == images.big_md5
    assert all(e.status == 206 for e in env.blob_traffic(mark) if e.method == "GET")

    st = env.snap.status()
    assert [(i["ref"], i["status"]) for i in st["images"]] == [(images.nydus, "lazy")]
    [m] = st["mounts"]
    assert m["daemon_alive"] and m["mode"] in ("erofs", "fuse") and m["bytes_fetched"] >= 2 << 20
    assert m["cache_bytes"] > 0
    assert "served lazily" in env.snap.log()


# ---------------------------------------------------------------------------------- lazy: CRI

def test_cri_pull_sends_labels_and_goes_lazy(env):
    images, reg = env.images, env.registry
    mark = reg.mark()
    with CriClient(env.ctd.address) as cri:
        image_id = cri.pull(images.nydus)
        assert image_id.startswith("sha256:")
    assert not _nydus_blob_gets(env.blob_traffic(mark), images)
    with env.snap.client() as sn:
        remote = [i for i in sn.list() if LABEL_REMOTE in i.labels]
        assert len(remote) == len(images.blob_digests)
        labels = remote[0].labels
        assert labels[LABEL_CRI_IMAGE_REF] == images.nydus
        assert labels[LABEL_CRI_LAYER_DIGEST] == images.blob_digests[0]
        assert labels[LABEL_CRI_MANIFEST_DIGEST].startswith("sha256:")
        assert labels[LABEL_CRI_IMAGE_LAYERS].split(",")[0] == images.blob_digests[0]
        assert labels[LABEL_NYDUS_BLOB] == "true" and labels[LABEL_SNAPSHOT_REF] == remote[0].name
    r = env.ctd.ctr_run(images.nydus, "cri1", "cat", "/etc/hello.txt", namespace=CRI_NAMESPACE)
    assert r.stdout == HELLO
    st = env.snap.status()
    assert (images.nydus, "lazy") in [(i["ref"], i["status"]) for i in st["images"]]


def test_cri_pull_of_ordinary_image(env):
    with CriClient(env.ctd.address) as cri:
        cri.pull(images_oci := env.images.oci)
        assert any(images_oci in i["repo_tags"] for i in cri.list())
    r = env.ctd.ctr_run(images_oci, "cri2", "cat", "/data/small", namespace=CRI_NAMESPACE)
    assert r.stdout == "small file\n"
    assert [(i["ref"], i["status"]) for i in env.snap.status()["images"]] == [(images_oci, "full")]


def test_cri_without_annotations_cannot_go_lazy(tmp_path, registry_session, images):
    """With containerd's default disable_snapshot_annotations = true no image reference reaches the snapshotter
    (the layer's own nydus-blob annotation does): the pull fails, and status says why."""
    snap = SnapshotterProcess(tmp_path / "snap", log_level="info")
    ctd = Containerd(tmp_path / "ctd", snapshotter=snap, registry_host=images.host, cri_annotations=False)
    with running_node(snap, ctd):
        with CriClient(ctd.address) as cri, pytest.raises(Exception) as ei:
            cri.pull(images.nydus)
        assert "nydus.blob" in str(ei.value)
        [img] = snap.status()["images"]
        assert img["status"] == "failed" and "disable_snapshot_annotations = false" in img["detail"]


def test_failed_lazy_mount_falls_back_to_a_full_pull(tmp_path, registry_session, images):
    """A mount daemon that cannot start (here: a launcher that fails) -> the image is pulled in full and runs."""
    snap = SnapshotterProcess(tmp_path / "snap", log_level="info", config={"daemon": {"command": ["/bin/false"]}})
    ctd = Containerd(tmp_path / "ctd", snapshotter=snap, registry_host=images.host)
    env = Env(snap, ctd, registry_session, images)
    try:
        snap.start()
        ctd.start()
        env.rpull(images.nydus)
        mark = registry_session.mark()
        r = ctd.ctr_run(images.nydus, "fb1", "md5sum", "/data/big")
        assert r.stdout.split()[0] == images.big_md5
        full_gets = [e for e in env.blob_traffic(mark) if e.method == "GET" and e.status == 200]
        assert {e.digest for e in full_gets} == set(images.blob_digests)      # whole blobs, once each
        [img] = snap.status()["images"]
        assert img["status"] == "full" and "fell back to a full pull" in img["detail"]
        assert "falling back to a full pull" in snap.log()
        assert ctd.ctr_run(images.nydus, "fb2", "cat", "/data/small").stdout == "small file\n"
        assert len(full_gets) == len(env.blob_traffic(mark))                  # nothing fetched again
    finally:
        try:
            ctd.stop()
        finally:
            snap.teardown()


# ---------------------------------------------------------------------------------- removal

def test_remove_unmounts_and_frees_cache(env):
    images = env.images
    env.rpull(images.nydus)
    assert env.ctd.ctr_run(images.nydus, "rm1", "md5sum", "/data/big").stdout.split()[0] == images.big_md5
    [m] = env.snap.status()["mounts"]
    cache = env.snap.workdir / "cache" / m["key"]
    assert m["cache_bytes"] >= 2 << 20 and cache.exists()
    [pid] = env.snap.daemon_pids()
    env.ctd.ctr("images", "rm", "--sync", images.nydus)     # GC: Remove children first, then Cleanup
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (cache.exists() or env.snap.status()["mounts"]):
        time.sleep(0.2)
    assert not cache.exists(), env.snap.log()[-3000:]
    assert env.snap.status()["mounts"] == []
    assert not mounts_under(env.snap.root / "rafs")
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
    with env.snap.client() as sn:
        assert sn.list() == []


# ---------------------------------------------------------------------------------- recovery

def _run_detached(env, cid: str):
    env.ctd.ctr("run", "-d", "--snapshotter", "nydus", env.images.nydus, cid, "sleep", "600")


def _exec(env, cid: str, *cmd, check=True):
    return env.ctd.ctr("tasks", "exec", "--exec-id", f"e{uuid.uuid4().hex[:6]}", cid, *cmd, check=check)


def test_snapshotter_restart_while_container_runs(env):
    env.rpull(env.images.nydus)
    _run_detached(env, "long1")
    try:
        assert _exec(env, "long1", "cat", "/etc/hello.txt").stdout == HELLO
        [pid] = env.snap.daemon_pids()
        since = env.snap.log_size()
        env.snap.stop(kill=True)                           # SIGKILL: no goodbye
        # the container keeps reading, even what nobody fetched yet, while no snapshotter runs
        assert _exec(env, "long1", "md5sum", "/data/big").stdout.split()[0] == env.images.big_md5
        env.snap.start()
        assert env.snap.wait_log("re-attached to its lazy mount", since=since), env.snap.log()[-3000:]
        assert env.snap.daemon_pids() == [pid]             # the same daemon, not a new mount
        assert _exec(env, "long1", "cat", "/data/small").stdout == "small file\n"
        # and the restarted snapshotter serves new containers of the image (once containerd's backoff let go)
        env.ctd.wait_snapshotter()
        assert env.ctd.ctr_run(env.images.nydus, "after1").stdout == HELLO
        [m] = env.snap.status()["mounts"]
        assert m["daemon_alive"] and m["restarts"] == 0
    finally:
        env.ctd.ctr("tasks", "kill", "-s", "SIGKILL", "long1", check=False)


def test_killed_mount_daemon_is_restarted(env):
    env.rpull(env.images.nydus)
    assert env.ctd.ctr_run(env.images.nydus, "k1").stdout == HELLO
    [pid] = env.snap.daemon_pids()
    since = env.snap.log_size()
    os.kill(pid, signal.SIGKILL)
    # the mount's holder (rafs.holder) starts a new daemon on the same FUSE connection: the mount is
    # never dead, so the snapshotter has nothing to restart (issue #12; without a holder it restarts it)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and env.snap.daemon_pids() in ([pid], []):
        time.sleep(0.05)
    [new_pid] = env.snap.daemon_pids()
    assert new_pid != pid, env.snap.log()[-3000:]
    r = env.ctd.ctr_run(env.images.nydus, "k2", "md5sum", "/data/big")
    assert r.stdout.split()[0] == env.images.big_md5
    [m] = env.snap.status()["mounts"]
    assert m["daemon_alive"] and m["pid"] == new_pid and m["restarts"] == 0


# ---------------------------------------------------------------------------------- lazy: mount at pull

@pytest.fixture
def custom_env(tmp_path, registry_session, images):
    """custom_env(config) -> a started Env whose snapshotter has ``config``; torn down like ``env``, plus any
    mount start still in flight (a test that failed mid-way)."""
    made: list[tuple[SnapshotterProcess, Containerd]] = []

    def make(config: dict) -> Env:
        snap = SnapshotterProcess(tmp_path / "snap", log_level="info", config=config)
        ctd = Containerd(tmp_path / "ctd", snapshotter=snap, registry_host=images.host)
        made.append((snap, ctd))
        snap.start()
        ctd.start()
        return Env(snap, ctd, registry_session, images)
    yield make
    stray = []
    for snap, ctd in made:
        try:
            ctd.stop()
        finally:
            snap.teardown()
            for pid in _mountd_procs(snap.root):
                stray.append(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    left = unmount_under(tmp_path)
    assert not stray and not left, f"left behind: processes {stray}, mounts {left}"


def _slow_launcher(tmp_path, delay: float) -> str:
    """A mount daemon launcher that waits ``delay`` s before the real one: a start that is surely in flight."""
    path = tmp_path / "slow-mountd"
    path.write_text(f'#!/bin/sh\nsleep {delay}\nexec {sys.executable} -m snapshotter.mountd "$@"\n')
    path.chmod(0o755)
    return str(path)


def _mountd_procs(root) -> list[int]:
    """Live mount daemons (and launchers) of the snapshotter with state dir ``root``."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"mountd" in cmd and os.fsencode(root) in cmd:
            out.append(int(pid))
    return out


def _wait_for(pred, timeout: float = 30):
    """pred()'s first truthy value within ``timeout`` s (else its last, falsy one)."""
    deadline = time.monotonic() + timeout
    while not (v := pred()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return v


def _image(st: dict, ref: str) -> dict:
    [img] = [i for i in st["images"] if i["ref"] == ref]
    return img


@pytest.mark.parametrize("puller", ["rpull", "cri"])
def test_mount_is_up_after_pull_before_any_container(env, puller):
    """mount_at = "pull" (default): the pull starts the image's mount daemon; the first container finds it up."""
    images = env.images
    if puller == "rpull":
        env.rpull(images.nydus)
        ns = env.ctd.namespace
    else:
        with CriClient(env.ctd.address) as cri:
            cri.pull(images.nydus)
        ns = CRI_NAMESPACE
    assert env.ctd.ctr("containers", "ls", "-q", namespace=ns).stdout.split() == []
    st = _wait_for(lambda: (s := env.snap.status())["mounts"] and s["mounts"][0]["state"] == "mounted" and s)
    assert st, env.snap.log()[-3000:]
    [m] = st["mounts"]
    assert m["daemon_alive"] and m["mode"] in ("erofs", "fuse") and os.path.ismount(m["mountpoint"])
    img = _image(st, images.nydus)
    assert img["status"] == "lazy" and "RAFS mounted" in img["detail"], img
    assert "starting its lazy mount at pull" in env.snap.log()
    [pid] = env.snap.daemon_pids()
    assert env.ctd.ctr_run(images.nydus, "atpull1", namespace=ns).stdout == HELLO
    assert env.snap.daemon_pids() == [pid]                   # the pull's daemon, not a second start
    assert env.snap.log().count("served lazily, ") == 1


@pytest.mark.parametrize("fallback", [True, False])
def test_failed_mount_at_pull_keeps_the_pull(custom_env, images, fallback):
    """A mount daemon that cannot start (a launcher exiting 1): the pull succeeds, status says the mount at pull
    failed, and the container's start retries, then falls back to a full pull (or fails) as without it."""
    env = custom_env({"daemon": {"command": ["/bin/false"], "fallback": fallback}})
    env.rpull(images.nydus)
    st = _wait_for(lambda: (s := env.snap.status())["mounts"] and s["mounts"][0]["state"] == "failed" and s)
    assert st, env.snap.log()[-3000:]
    img = _image(st, images.nydus)
    assert img["status"] == "failed" and "lazy mount at pull failed" in img["detail"], img
    assert "exited with status 1" in st["mounts"][0]["error"]
    assert not mounts_under(env.snap.root / "rafs") and not _mountd_procs(env.snap.root)
    r = env.ctd.ctr_run(images.nydus, "fail1", "cat", "/data/small", check=False)
    img = _image(env.snap.status(), images.nydus)
    if fallback:
        assert r.returncode == 0 and r.stdout == "small file\n", r.stderr
        assert img["status"] == "full" and "fell back to a full pull" in img["detail"], img
    else:
        assert r.returncode != 0 and "lazy mount of" in r.stderr, r.stderr
        assert img["status"] == "failed" and img["detail"].startswith("lazy mount failed"), img
    assert env.snap.log().count("lazy mount FAILED") == 2      # at pull, then again at the container's start


def test_remove_image_while_mount_at_pull_in_flight(custom_env, tmp_path, images):
    """Commit does not wait for the daemon; removing the image meanwhile leaves no daemon, mount or cache."""
    env = custom_env({"daemon": {"command": [_slow_launcher(tmp_path, 2)]}})
    env.rpull(images.nydus)
    # the start is handed to a thread as the pull commits: its launcher shows up a moment later
    assert _wait_for(lambda: _mountd_procs(env.snap.root), 0.8), "no mount start in flight after the pull"
    assert not mounts_under(env.snap.root / "rafs")            # the pull did not wait for it
    env.ctd.ctr("images", "rm", "--sync", images.nydus)
    assert _wait_for(lambda: not _mountd_procs(env.snap.root) and not mounts_under(env.snap.root)), \
        env.snap.log()[-3000:]
    st = env.snap.status()
    assert st["mounts"] == [] and st["cache_bytes"] == 0
    assert not list((env.snap.root / "rafs").glob("*/mnt"))
    with env.snap.client() as sn:
        assert sn.list() == []
    log = env.snap.log()
    assert "served lazily, " in log and "freed lazy mount" in log      # started, then undone


def test_shutdown_waits_for_mount_at_pull(custom_env, tmp_path, images):
    """SIGTERM (to the snapshotter's process group) while a mount starts: the start completes and is recorded;
    the next snapshotter re-attaches to that daemon and serves the image."""
    env = custom_env({"daemon": {"command": [_slow_launcher(tmp_path, 1)]}})
    env.rpull(images.nydus)
    # the start is handed to a thread as the pull commits: its launcher shows up a moment later
    assert _wait_for(lambda: _mountd_procs(env.snap.root), 0.8), "no mount start in flight after the pull"
    proc = env.snap.proc
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, env.snap.log()[-3000:]
    [m] = env.snap.status()["mounts"]
    assert m["state"] == "mounted" and m["daemon_alive"] and os.path.ismount(m["mountpoint"]), m
    [pid] = env.snap.daemon_pids()
    since = env.snap.log_size()
    env.snap.start()
    assert env.snap.wait_log("re-attached to its lazy mount", since=since), env.snap.log()[-3000:]
    env.ctd.wait_snapshotter()
    assert env.ctd.ctr_run(images.nydus, "aftershutdown").stdout == HELLO
    assert env.snap.daemon_pids() == [pid]


def test_snapshotter_killed_during_mount_at_pull(custom_env, tmp_path, images):
    """SIGKILL while a mount starts: the daemon still comes up (nobody records it), and the next snapshotter
    adopts it instead of failing to mount over it."""
    env = custom_env({"daemon": {"command": [_slow_launcher(tmp_path, 1)]}})
    env.rpull(images.nydus)
    # the start is handed to a thread as the pull commits: its launcher shows up a moment later
    assert _wait_for(lambda: _mountd_procs(env.snap.root), 0.8), "no mount start in flight after the pull"
    env.snap.stop(kill=True)
    assert _wait_for(env.snap.daemon_pids), "the orphaned start never mounted"
    [pid] = env.snap.daemon_pids()
    since = env.snap.log_size()
    env.snap.start()
    assert env.snap.wait_log("adopted the running mount daemon", since=since), env.snap.log()[-3000:]
    env.ctd.wait_snapshotter()
    assert env.ctd.ctr_run(images.nydus, "afterkill").stdout == HELLO
    assert env.snap.daemon_pids() == [pid]
    [m] = env.snap.status()["mounts"]
    assert m["state"] == "mounted" and m["daemon_alive"] and m["restarts"] == 0


# ---------------------------------------------------------------------------------- standby launcher

def _standbys(snap) -> list[int]:
    """Standby launchers (``mountd --standby``) whose parent is the snapshotter process ``snap``."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == snap.proc.pid and b"--standby" in cmd:
            out.append(int(pid))
    return out


def _gone(pid: int, timeout: float = 10) -> bool:
    def dead():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:          # a zombie counts as gone
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    return bool(_wait_for(dead, timeout))


def _ready_standby(snap, other_than: int | None = None) -> int:
    """The pid of the snapshotter's ready standby (waits for it, and for it not to be ``other_than``)."""
    pid = _wait_for(lambda: (p := snap.status()["standby_pid"]) and p != other_than and p)
    assert pid, f"no ready standby:\n{snap.log()[-3000:]}"
    assert _standbys(snap) == [pid]
    return pid


def test_standby_starts_the_mount_at_pull(env):
    """standby = true (default): the pull's mount is started by the standby launcher, a new standby is ready
    afterwards, containers run, and stopping the snapshotter stops the standby."""
    images = env.images
    standby = _ready_standby(env.snap)
    assert os.getsid(standby) == standby                       # its own session: the group's SIGTERM misses it
    env.rpull(images.nydus)
    st = _wait_for(lambda: (s := env.snap.status())["mounts"] and s["mounts"][0]["state"] == "mounted" and s)
    assert st, env.snap.log()[-3000:]
    [m] = st["mounts"]
    assert m["started_by_standby"] == standby and m["daemon_alive"] and os.path.ismount(m["mountpoint"])
    assert m["pid"] in _mountd_procs(env.snap.root)            # its command line still names the snapshotter
    assert f"(started by standby pid {standby})" in env.snap.log()
    assert _gone(standby)                                      # it was the launcher: reported and left
    new = _ready_standby(env.snap, other_than=standby)
    assert env.ctd.ctr_run(images.nydus, "sb1").stdout == HELLO
    assert env.snap.daemon_pids() == [m["pid"]]
    env.snap.stop()                                            # SIGTERM: the snapshotter stops its standby
    assert _gone(new), f"standby {new} outlived the snapshotter"
    assert env.snap.status()["standby_pid"] is None


def test_standby_exits_when_the_snapshotter_is_killed(env):
    standby = _ready_standby(env.snap)
    env.snap.stop(kill=True)                                   # SIGKILL: EOF on the standby's stdin
    assert _gone(standby), f"standby {standby} outlived the killed snapshotter"


def test_dead_standby_falls_back_to_a_fresh_launcher(env):
    images = env.images
    standby = _ready_standby(env.snap)
    os.kill(standby, signal.SIGKILL)
    env.rpull(images.nydus)
    st = _wait_for(lambda: (s := env.snap.status())["mounts"] and s["mounts"][0]["state"] == "mounted" and s)
    assert st, env.snap.log()[-3000:]
    [m] = st["mounts"]
    assert m["started_by_standby"] is None and m["daemon_alive"]
    assert "standby mount daemon launcher is gone" in env.snap.log()
    _ready_standby(env.snap, other_than=standby)
    r = env.ctd.ctr_run(images.nydus, "sbdead1", "md5sum", "/data/big")
    assert r.stdout.split()[0] == images.big_md5


def test_standby_off(custom_env, images):
    env = custom_env({"daemon": {"standby": False}})
    env.rpull(images.nydus)
    assert env.ctd.ctr_run(images.nydus, "nosb1").stdout == HELLO
    [m] = env.snap.status()["mounts"]
    assert m["started_by_standby"] is None and m["daemon_alive"]
    assert env.snap.status()["standby_pid"] is None and not _standbys(env.snap)
    assert "started by standby" not in env.snap.log()
