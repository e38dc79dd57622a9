"""Prometheus metrics after a lazy run, scraped with `curl` as Prometheus would (issue #13).

* `nydusify mount --metrics-address HOST:PORT` (a real mount daemon, a real docker-registry): after a
  read, /metrics shows the bytes fetched for that image, equal to what the registry's access log says
  it sent, and the same numbers `nydusify stats` shows.
* The snapshotter's `[metrics] address` (real containerd, `nydus-snapshotter rpull` + `ctr run`): the
  node's /metrics shows the image's mount daemon's numbers and the snapshotter's own, and counts a
  restart of a killed mount daemon.

The text is parsed with prometheus_client's own parser (what a scraper accepts).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import images as im
from tests.helpers.mounts import (MODES, blob_digests, convert_into, data_gets, lazy_source,  # noqa: F401
                                  mounter, nydusify)

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE and kernel mounts)"),
              pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (bash .ci/setup)"),
              pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def curl_metrics(address: str) -> tuple[str, dict]:
    """`curl http://ADDRESS/metrics` -> (the text, {family name: family}) parsed by prometheus_client."""
    r = subprocess.run(["curl", "-sS", "--fail", "--max-time", "20", "-D", "-", f"http://{address}/metrics"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"curl {address}: rc={r.returncode}\n{r.stdout}\n{r.stderr}"
    head, _, body = r.stdout.partition("\n\n")          # text mode: CRLF read as LF
    assert "content-type: text/plain; version=0.0.4" in head.lower(), head
    return body, {f.name: f for f in text_string_to_metric_families(body)}


def sample(fams: dict, family: str, name: str | None = None, **labels) -> float:
    """The one sample of `family` (sample `name`, default the family's counter/gauge) with `labels`."""
    f = fams[family]
    want = name or (family + "_total" if f.type == "counter" else family)
    found = [s for s in f.samples if s.name == want and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{want}{labels}: {found} of {f.samples}"
    return found[0].value


def refused(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
        return False
    except ConnectionRefusedError:
        return True


# ----------------------------------------------------------------------------- nydusify mount

@pytest.fixture(scope="module")
def lazy_ref(lazy_source, registry_session) -> str:
    return convert_into(registry_session, lazy_source.ref, "metrics/lazy")


@pytest.mark.parametrize("mode", MODES)
def test_mount_metrics_after_a_lazy_read(mode, mounter, lazy_ref, lazy_source, registry_session):
    digests = blob_digests(lazy_ref)
    address = f"127.0.0.1:{free_port()}"
    m = mounter.mount(lazy_ref, mode=mode, extra=("--metrics-address", address))
    assert f"metrics: http://{address}/metrics" in m.output, m.output
    lab = {"image": lazy_ref, "mode": mode}

    _, before = curl_metrics(address)
    assert sample(before, "pynydus_cache_fetched_bytes", **lab) == 0
    assert sample(before, "pynydus_daemon_info", pid=str(m.pid), mountpoint=str(m.path), **lab) == 1

    mark = registry_session.mark()
    for p in ("etc/small.txt", "data/r1"):
        assert (m.path / p).read_bytes() == lazy_source.expected(p)
    sent = sum(e.bytes for e in data_gets(registry_session, mark, digests))
    assert sent > 0

    text, fams = curl_metrics(address)
    st = m.stats()
    fetched = sample(fams, "pynydus_cache_fetched_bytes", **lab)
    assert fetched > 0 and fetched == st["bytes_fetched"]
    # what the registry says it sent, per source: all from the registry here
    assert sample(fams, "pynydus_backend_read_bytes", source="registry", **lab) == sent == st["backend_bytes"]
    assert sample(fams, "pynydus_backend_requests", source="registry", **lab) >= 1
    assert sample(fams, "pynydus_backend_request_errors", source="registry", **lab) == 0
    assert sample(fams, "pynydus_cache_fetch_requests", **lab) == st["requests"]
    assert sample(fams, "pynydus_cache_misses", **lab) == st["chunks_missed"] > 0
    assert sample(fams, "pynydus_cache_hits", **lab) == st["chunks_hit"]
    assert sample(fams, "pynydus_cache_evictions", **lab) == 0
    assert sample(fams, "pynydus_cache_read_bytes", **lab) == st["bytes_read"] > 0
    assert sample(fams, "pynydus_image_blob_bytes", **lab) == st["image_bytes"]
    hist = "pynydus_cache_fetch_duration_seconds"
    assert fams[hist].type == "histogram"
    assert sample(fams, hist, hist + "_count", **lab) == st["requests"]
    assert sample(fams, hist, hist + "_bucket", le="+Inf", **lab) == st["requests"]
    assert 0 < sample(fams, hist, hist + "_sum", **lab) < 60
    assert "process_cpu_seconds" in fams                    # the daemon process's own
    assert f'pynydus_cache_fetched_bytes_total{{image="{lazy_ref}",mode="{mode}"}}' in text

    # the stats show where the metrics are; after umount nothing listens there any more
    assert json.loads(nydusify("stats", m.path, "--json", "--run-dir", m.run_dir).stdout)["metrics"] == \
        f"http://{address}/metrics"
    m.umount()
    assert refused(address)


def test_mount_metrics_address_errors(mounter, lazy_ref, tmp_path):
    r = nydusify("mount", lazy_ref, tmp_path / "m1", "--mode", "fuse", "--cache-dir", tmp_path / "c",
                 "--plain-http", "--daemon", "--run-dir", tmp_path / "run", "--metrics-address", "9110", "--learn", "off")
    assert r.returncode != 0 and "want HOST:PORT" in r.stderr, r.stderr
    with socket.socket() as busy:                   # the port is taken: the mount fails, says why, nothing stays
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        mnt = tmp_path / "m2"
        mnt.mkdir()
        r = nydusify("mount", lazy_ref, mnt, "--mode", "fuse", "--cache-dir", tmp_path / "c", "--plain-http",
                     "--daemon", "--run-dir", tmp_path / "run", "--metrics-address", address, "--learn", "off")
    assert r.returncode != 0 and f"cannot serve metrics on {address}" in r.stderr + r.stdout, r.stdout + r.stderr
    assert not os.path.ismount(mnt)


# ----------------------------------------------------------------------------- the snapshotter

BIG = im.random(1 << 20, seed=13)


@pytest.fixture(scope="module")
def nydus_image(registry_session, tmp_path_factory) -> str:
    from converter.convert import ConvertOptions, convert
    from testbed.registry import skopeo_copy
    if not os.path.isfile("/bin/busybox"):
        pytest.skip("needs busybox-static")
    work = tmp_path_factory.mktemp("metrics-images")
    layers = im.busybox_image_layers() + [[im.Entry.dir("data"), im.Entry.file("data/big", BIG)]]
    layout = im.build_oci_layout(work / "layout", "bb", layers, config_overrides=im.BUSYBOX_CONFIG)
    host, repo = registry_session.host, f"metrics-{uuid.uuid4().hex[:8]}"
    skopeo_copy(layout.ref, f"docker://{host}/{repo}:oci")
    convert(layout.ref, f"{host}/{repo}:nydus", ConvertOptions(plain_http=True, chunk_size=64 << 10))
    return f"{host}/{repo}:nydus"


@pytest.fixture
def node(tmp_path, registry_session, nydus_image):
    """A snapshotter with `[metrics] address` and a containerd using it; torn down, mounts and all."""
    if not all(shutil.which(b) for b in ("containerd", "ctr", "runc")):
        pytest.skip("needs containerd, ctr and runc (bash .ci/setup)")
    from testbed.containerd import Containerd, SnapshotterProcess, running_node
    snap = SnapshotterProcess(tmp_path / "snap")
    address = f"127.0.0.1:{free_port()}"
    with open(snap.config_path, "a") as f:
        f.write(f'[metrics]\naddress = "{address}"\n')
    ctd = Containerd(tmp_path / "ctd", snapshotter=snap, registry_host=registry_session.host, cri=False)
    with running_node(snap, ctd, tmp_path):
        yield snap, ctd, address


def test_snapshotter_metrics_after_rpull_and_run(node, nydus_image):
    snap, ctd, address = node
    _, fams = curl_metrics(address)                     # nothing mounted yet: the snapshotter's own numbers
    assert sample(fams, "pynydus_snapshotter_mounts", state="mounted") == 0
    assert "pynydus_cache_fetched_bytes" not in fams

    r = snap.cli("rpull", "--address", ctd.address, "--namespace", ctd.namespace, "--plain-http", nydus_image,
                 timeout=120)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{snap.log()[-3000:]}"
    out = ctd.ctr_run(nydus_image, "m1", "md5sum", "/data/big").stdout
    assert out.split()[0] == nydus_image_md5()

    text, fams = curl_metrics(address)
    [m] = snap.status()["mounts"]
    lab = {"image": nydus_image, "mode": m["mode"]}
    assert m["mode"] in ("erofs", "fuse")
    fetched = sample(fams, "pynydus_cache_fetched_bytes", **lab)
    assert fetched >= len(BIG.read()) // 2 and fetched <= m["bytes_fetched"]   # status reads a bit later
    assert sample(fams, "pynydus_backend_read_bytes", source="registry", **lab) > 0
    assert sample(fams, "pynydus_cache_misses", **lab) > 0
    hist = "pynydus_cache_fetch_duration_seconds"
    assert sample(fams, hist, hist + "_count", **lab) > 0
    assert sample(fams, "pynydus_snapshotter_mounts", state="mounted") == 1
    assert sample(fams, "pynydus_snapshotter_images", status="lazy") == 1
    assert sample(fams, "pynydus_snapshotter_daemon_up", image=nydus_image) == 1
    assert sample(fams, "pynydus_snapshotter_daemon_restarts", image=nydus_image) == 0
    assert sample(fams, "pynydus_daemon_info", pid=str(m["pid"]), **lab) == 1
    assert f'image="{nydus_image}"' in text

    # a killed mount daemon is replaced (by its holder, on the same FUSE connection): counted, and its
    # successor is scraped
    [pid] = snap.daemon_pids()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        _, fams = curl_metrics(address)
        if (sample(fams, "pynydus_snapshotter_daemon_restarts", image=nydus_image) == 1
                and sample(fams, "pynydus_snapshotter_daemon_up", image=nydus_image) == 1
                and snap.daemon_pids() not in ([], [pid])) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sample(fams, "pynydus_snapshotter_daemon_restarts", image=nydus_image) == 1
    assert sample(fams, "pynydus_snapshotter_daemon_up", image=nydus_image) == 1
    [new_pid] = snap.daemon_pids()
    assert sample(fams, "pynydus_daemon_info", pid=str(new_pid), image=nydus_image) == 1

    snap.stop()                                         # the endpoint goes with the snapshotter
    assert refused(address)


def nydus_image_md5() -> str:
    import hashlib
    return hashlib.md5(BIG.read()).hexdigest()
