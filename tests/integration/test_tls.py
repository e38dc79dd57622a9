"""Registries with TLS, configured as containerd is: a real docker-registry serving HTTPS with a CA this
module made (openssl), containerd's hosts directory (hosts.toml: ca, client, skip_verify), nydusify's
per-side flags, the system CA store, and the snapshotter (rpull + `ctr run`) reading the same hosts
directory.

A certificate problem must be ONE line naming the host and what to configure, never a traceback.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from testbed.registry import make_pki, run_registry, skopeo_copy
from tests.helpers import images as im
from tests.integration.conftest import REPO

pytestmark = [
    pytest.mark.skipif(not os.path.exists("/usr/bin/docker-registry"), reason="needs docker-registry (apt)"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl (apt)"),
    pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo (apt)"),
]

HELLO = im.BUSYBOX_HELLO.decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory, pki):
    """An HTTPS docker-registry whose certificate the module's own CA signed, with a busybox image at
    REPO:oci (put there by skopeo with verification off)."""
    with run_registry(tmp_path_factory.mktemp("tls-registry"), tls=pki) as reg:
        work = tmp_path_factory.mktemp("tls-image")
        layout = im.build_oci_layout(work / "layout", "bb", im.busybox_image_layers(),
                                     config_overrides=im.BUSYBOX_CONFIG)
        reg.repo = f"tls-{uuid.uuid4().hex[:8]}"
        skopeo_copy(layout.ref, f"docker://{reg.host}/{reg.repo}:oci")
        yield reg


@pytest.fixture(scope="module")
def plain_registry(tmp_path_factory):
    with run_registry(tmp_path_factory.mktemp("plain-registry")) as reg:
        yield reg


def hosts_dir(root: Path, namespace: str, text: str) -> Path:
    """ROOT (a hosts directory) with ROOT/NAMESPACE/hosts.toml = text."""
    d = root / namespace
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(text)
    return root


def clean_env(**extra) -> dict:
    """The environment without requests' own CA overrides (a node has none): what we trust is ours."""
    env = {k: v for k, v in os.environ.items() if k not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")}
    env.update(extra)
    return env


def run_nydusify(*args, env=None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "converter.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, errors="replace", timeout=timeout, stdin=subprocess.DEVNULL,
                          env=env or clean_env())


def assert_one_clear_line(stderr: str, *must: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"want one error line, got:\n{stderr}"
    line = lines[0]
    for bad in ("Traceback", "urllib3", "HTTPSConnectionPool", "Max retries", "_ssl.c"):
        assert bad not in line, line
    for m in must:
        assert m in line, f"{m!r} not in: {line}"
    return line


# --------------------------------------------------------------------------- nydusify

def test_without_the_ca_one_clear_error_line(tls_registry, tmp_path):
    reg = tls_registry
    empty = tmp_path / "certs.d"
    empty.mkdir()
    r = run_nydusify("convert", "--source", f"{reg.host}/{reg.repo}:oci", "--target", f"{reg.host}/{reg.repo}:x",
                     "--hosts-dir", empty)
    assert r.returncode == 1, r.stdout + r.stderr
    line = assert_one_clear_line(r.stderr, "nydusify convert: error:", reg.host, "not trusted",
                                 f"{empty}/{reg.host}/hosts.toml", "ca = ", "--source-insecure")
    assert line.count(reg.host) >= 2


def test_convert_check_with_hosts_toml_ca(tls_registry, pki, tmp_path):
    reg = tls_registry
    # containerd's own directory name for HOST:PORT (HOST_PORT_), a relative ca path, as an operator writes
    hosts = tmp_path / "certs.d"
    d = hosts / f"{reg.ip}_{reg.port}_"
    d.mkdir(parents=True)
    shutil.copy(pki.ca, d / "registry-ca.crt")
    (d / "hosts.toml").write_text(f'server = "https://{reg.host}"\n'
                                  f'[host."https://{reg.host}"]\n  capabilities = ["pull", "resolve", "push"]\n'
                                  f'  ca = "registry-ca.crt"\n')
    src, dst = f"{reg.host}/{reg.repo}:oci", f"{reg.host}/{reg.repo}:nydus-ca"
    r = run_nydusify("convert", "--source", src, "--target", dst, "--hosts-dir", hosts, "--chunk-size", "64K")
    assert r.returncode == 0, r.stderr
    r = run_nydusify("check", "--source", src, "--target", dst, "--hosts-dir", hosts)
    assert r.returncode == 0 and "check OK" in r.stdout, r.stdout + r.stderr
    r = run_nydusify("inspect", dst, "--hosts-dir", hosts)
    assert r.returncode == 0, r.stderr


def test_skip_verify(tls_registry, tmp_path):
    reg = tls_registry
    hosts = hosts_dir(tmp_path / "certs.d", reg.host, f'server = "https://{reg.host}"\nskip_verify = true\n')
    src, dst = f"{reg.host}/{reg.repo}:oci", f"{reg.host}/{reg.repo}:nydus-skip"
    r = run_nydusify("convert", "--source", src, "--target", dst, "--hosts-dir", hosts, "--chunk-size", "64K")
    assert r.returncode == 0, r.stderr
    r = run_nydusify("check", "--source", src, "--target", dst, "--hosts-dir", hosts)
    assert r.returncode == 0, r.stdout + r.stderr


def test_system_ca_store_is_trusted_by_default(tls_registry, pki, tmp_path):
    """No hosts.toml: a CA in the system store (SSL_CERT_FILE, as OpenSSL and Go read it) is trusted;
    certifi's bundle (requests' default) would not know it."""
    reg = tls_registry
    from rafs.image.tls import system_ca_file
    bundle = tmp_path / "system-bundle.pem"
    system = system_ca_file()
    bundle.write_bytes((Path(system).read_bytes() if system else b"") + b"\n" + pki.ca.read_bytes())
    empty = tmp_path / "certs.d"
    empty.mkdir()
    r = run_nydusify("convert", "--source", f"{reg.host}/{reg.repo}:oci", "--target",
                     f"{reg.host}/{reg.repo}:nydus-system", "--hosts-dir", empty,
                     env=clean_env(SSL_CERT_FILE=str(bundle)))
    assert r.returncode == 0, r.stderr


def test_https_source_into_plain_http_target_with_per_side_flags(tls_registry, plain_registry, pki, tmp_path):
    reg, plain = tls_registry, plain_registry
    empty = tmp_path / "empty"
    empty.mkdir()
    src = f"{reg.host}/{reg.repo}:oci"
    # --plain-http would be wrong for the source; without a flag the plain target is one clear line
    r = run_nydusify("convert", "--source", src, "--target", f"{plain.host}/tls/a:v1", "--hosts-dir", empty,
                     "--source-insecure")
    assert r.returncode == 1
    assert_one_clear_line(r.stderr, plain.host, "does not speak TLS", "--target-insecure")
    # the source skipped, the target spoken to over HTTP
    r = run_nydusify("convert", "--source", src, "--target", f"{plain.host}/tls/a:v1", "--hosts-dir", empty,
                     "--source-insecure", "--target-insecure")
    assert r.returncode == 0, r.stderr
    # the source trusted through hosts.toml, the target plain HTTP by its flag
    hosts = hosts_dir(tmp_path / "certs.d", reg.host, f'ca = "{pki.ca}"\n')
    r = run_nydusify("convert", "--source", src, "--target", f"{plain.host}/tls/b:v1", "--hosts-dir", hosts,
                     "--target-insecure")
    assert r.returncode == 0, r.stderr
    r = run_nydusify("check", "--source", src, "--target", f"{plain.host}/tls/b:v1", "--hosts-dir", hosts,
                     "--target-insecure")
    assert r.returncode == 0, r.stdout + r.stderr


def test_client_certificate_from_hosts_toml(pki, tmp_path):
    """A registry that wants a client certificate: hosts.toml's client pair gets in; without it, one line."""
    with run_registry(tmp_path / "mtls-registry", tls=pki, client_cas=True) as reg:
        work = tmp_path / "img"
        layout = im.build_oci_layout(work / "layout", "bb", [[im.Entry.file("hello", b"hi\n")]])
        hosts = hosts_dir(tmp_path / "certs.d", reg.host, f'ca = "{pki.ca}"\n'
                                                          f'client = [["{pki.client_cert}", "{pki.client_key}"]]\n')
        r = run_nydusify("convert", "--source", layout.ref, "--target", f"{reg.host}/mtls/app:v1",
                         "--hosts-dir", hosts)
        assert r.returncode == 0, r.stderr
        no_client = hosts_dir(tmp_path / "no-client.d", reg.host, f'ca = "{pki.ca}"\n')
        r = run_nydusify("convert", "--source", layout.ref, "--target", f"{reg.host}/mtls/app:v2",
                         "--hosts-dir", no_client)
        assert r.returncode == 1
        assert_one_clear_line(r.stderr, reg.host, "client = ")


def test_hosts_toml_mirrors_in_order_then_the_origin(tls_registry, plain_registry, pki, tmp_path):
    """[host."…"] mirrors: a dead one is passed over, a live one serves the pull (with ?ns=), pushes and
    what the mirror lacks go to the origin; the lazy backend reads chunks through the same mirror."""
    from testbed.process import free_port
    reg, mirror = tls_registry, plain_registry
    skopeo_copy(f"docker://{reg.host}/{reg.repo}:oci", f"docker://{mirror.host}/{reg.repo}:oci")
    dead = f"127.0.0.1:{free_port('127.0.0.1')}"
    hosts = hosts_dir(tmp_path / "certs.d", reg.host,
                      f'server = "https://{reg.host}"\nca = "{pki.ca}"\n'
                      f'[host."http://{dead}"]\n  capabilities = ["pull", "resolve"]\n'
                      f'[host."http://{mirror.host}"]\n  capabilities = ["pull", "resolve"]\n')
    m, o = mirror.mark(), reg.mark()
    dst = f"{reg.host}/{reg.repo}:nydus-mirrored"
    r = run_nydusify("convert", "--source", f"{reg.host}/{reg.repo}:oci", "--target", dst, "--hosts-dir", hosts,
                     "--chunk-size", "64K")
    assert r.returncode == 0, r.stderr
    pulled = [e for e in mirror.access_log(m) if e.method == "GET" and e.path.startswith(f"/v2/{reg.repo}/")]
    assert pulled and all(parse_qs(e.query).get("ns") == [reg.host] for e in pulled), pulled
    origin = reg.access_log(o)
    assert not [e for e in origin if e.method == "GET" and "/manifests/oci" in e.path]   # resolved by the mirror
    assert [e for e in origin if e.method == "PUT" and "/manifests/nydus-mirrored" in e.path]   # pushed to origin
    # the converted image is on the origin only: a lazy read asks the mirror (404), then the origin
    from rafs.image.store import open_store
    from rafs.storage.factory import BackendConfig, build_backend
    with open_store(dst, hosts_dir=str(hosts)) as store:          # the mirror lacks the tag: the origin's
        manifest = store.get_json(store.resolve().digest)
    blob = manifest["layers"][0]["digest"]
    backend = build_backend(BackendConfig(kind="registry", host=reg.host, repo=reg.repo, hosts_dir=str(hosts)))
    try:
        assert "mirrors" in backend.name and mirror.host in backend.name
        o = reg.mark()
        assert len(backend.read_range(blob.split(":", 1)[1], 0, 100)) == 100
    finally:
        backend.close()
    assert [e for e in reg.access_log(o) if e.is_blob_get and e.digest == blob]


# --------------------------------------------------------------------------- snapshotter: rpull + ctr run

needs_containerd = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(b) for b in ("containerd", "ctr", "runc"))
    or not os.path.isfile("/bin/busybox"), reason="needs root, containerd, runc and busybox-static (apt)")


@needs_containerd
def test_rpull_and_run_lazily_once_hosts_toml_names_the_ca(tls_registry, pki, tmp_path):
    from testbed.containerd import Containerd, SnapshotterProcess, mounts_under
    reg = tls_registry
    nydus = f"{reg.host}/{reg.repo}:nydus-ctd"
    hosts = hosts_dir(tmp_path / "certs.d", reg.host, f'server = "https://{reg.host}"\nca = "{pki.ca}"\n')
    r = run_nydusify("convert", "--source", f"{reg.host}/{reg.repo}:oci", "--target", nydus, "--hosts-dir", hosts,
                     "--chunk-size", "64K")
    assert r.returncode == 0, r.stderr
    snap = SnapshotterProcess(tmp_path / "snap", config={"backend": {"hosts_dir": str(hosts)}})
    ctd = Containerd(tmp_path / "ctd", snapshotter=snap, cri=False)
    try:
        snap.start()
        ctd.start()

        def rpull(hosts_dir: Path):
            return subprocess.run([sys.executable, "-m", "snapshotter.cli", "rpull", "--address", ctd.address,
                                   "--namespace", ctd.namespace, "--hosts-dir", str(hosts_dir), nydus],
                                  cwd=REPO, capture_output=True, text=True, timeout=180, env=clean_env())
        empty = tmp_path / "empty"
        empty.mkdir()
        r = rpull(empty)                                  # the registry's CA is nowhere: one line
        assert r.returncode == 1
        assert_one_clear_line(r.stderr, "nydus-snapshotter:", reg.host, "not trusted", "hosts.toml")
        r = rpull(hosts)
        assert r.returncode == 0, r.stdout + r.stderr + snap.log()[-3000:]
        assert ": lazy;" in r.stdout, r.stdout
        n = reg.mark()
        out = ctd.ctr_run(nydus, "tls1")
        assert out.stdout == HELLO, out.stdout + out.stderr
        out = ctd.ctr_run(nydus, "tls2", "cat", "/etc/hello.txt")
        assert out.stdout == HELLO
        # the chunks came lazily from the TLS registry through the mount daemon (ranges of nydus blobs)
        gets = [e for e in reg.access_log(n) if e.is_blob_get and e.status in (200, 206)]
        assert gets, reg.access_log(n)
        st = snap.status()
        assert [m for m in st["mounts"] if m["state"] == "mounted" and m["daemon_alive"]], st   # lazy, not a fallback
    finally:
        try:
            ctd.stop()
        finally:
            snap.teardown()
    left = mounts_under(tmp_path)
    assert not left, f"mounts left behind: {left}"
