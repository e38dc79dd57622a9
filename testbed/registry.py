"""A real registry: Debian's ``docker-registry`` (distribution 2.8) on 127.0.0.1, for the README's
demo (``testbed.demo``), the tests and the benchmarks.

    with run_registry(workdir) as reg:           # always stopped on exit (or the `registry` fixtures)
        reg.host                                 # "127.0.0.1:PORT"
        n = reg.mark()
        ...
        gets = reg.blob_gets(since=n)            # GET /v2/<repo>/blobs/<digest> entries
        sum(e.bytes for e in gets)               # body bytes the registry served
    push_image("oci:DIR:TAG", f"{reg.host}/repo:tag")
    skopeo_copy("oci:DIR:TAG", f"docker://{reg.host}/repo:tag")

    pki = make_pki(workdir / "pki")                # a CA of the test's own, a server and a client cert
    with run_registry(workdir, tls=pki) as reg:  # https://127.0.0.1:PORT (distribution's http.tls)
        ...                                      # client_cas=True: it also wants a client certificate

The access log is distribution's combined-format log on stdout (gorilla
handlers): client, user, time, request line, status, *body bytes written*,
referer, user agent.  It does NOT contain the Range header; a range GET shows
as status 206 with ``bytes`` = bytes actually sent.  (Application log on
stderr: ``registry.log``.)
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import requests

from .process import free_port, spawn, stop_process

REGISTRY_BIN = "/usr/bin/docker-registry"

_LINE_RE = re.compile(
    r'^(?P<client>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] "(?P<method>[A-Z]+) (?P<target>\S+) (?P<proto>[^"]*)" '
    r'(?P<status>\d{3}) (?P<bytes>\d+|-)(?: "(?P<referer>[^"]*)" "(?P<agent>[^"]*)")?')


@dataclass(frozen=True)
class AccessLogEntry:
    method: str
    path: str          # request target without the query string
    query: str
    status: int
    bytes: int         # response body bytes written by the registry
    range: str | None  # always None: distribution 2.8 does not log request headers
    user_agent: str
    user: str

    @property
    def is_blob_get(self) -> bool:
        return self.method == "GET" and "/blobs/sha256:" in self.path

    @property
    def digest(self) -> str | None:
        m = re.search(r"/(?:blobs|manifests)/(sha256:[0-9a-f]{64})$", self.path)
        return m.group(1) if m else None


def parse_access_log(text: str) -> list[AccessLogEntry]:
    out = []
    for line in text.splitlines():
        m = _LINE_RE.match(line)
        if not m:
            continue
        path, _, query = m.group("target").partition("?")
        out.append(AccessLogEntry(
            method=m.group("method"), path=path, query=query, status=int(m.group("status")),
            bytes=0 if m.group("bytes") == "-" else int(m.group("bytes")), range=None,
            user_agent=m.group("agent") or "", user=m.group("user")))
    return out


@dataclass(frozen=True)
class TlsPki:
    """A CA made for a test, a server certificate it signed (for `ips` / `dns` names) and a client one."""
    dir: Path
    ca: Path             # ca.crt (PEM): what a client must trust
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(dir: str | os.PathLike, *, ips: tuple[str, ...] = ("127.0.0.1",), dns: tuple[str, ...] = ("localhost",),
             days: int = 2) -> TlsPki:
    """A CA, a server certificate for ``ips``/``dns`` and a client certificate, all by ``openssl``
    (EC P-256 keys; Debian's openssl package)."""
    exe = shutil.which("openssl")
    if exe is None:
        raise RuntimeError("need `openssl` (apt-get install openssl) to make test certificates")
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        r = subprocess.run([exe, *args], capture_output=True, text=True, cwd=d, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args)} failed:\n{r.stderr}")

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", str(days), "-subj",
        "/CN=pynydus test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    san = ",".join([f"IP:{ip}" for ip in ips] + [f"DNS:{n}" for n in dns])
    for name, usage, subject in (("server", "serverAuth", ips[0] if ips else dns[0]), ("client", "clientAuth",
                                                                                        "pynydus test client")):
        (d / f"{name}.ext").write_text(f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                       f"extendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if name == "server"
                                                                         else ""))
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={subject}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", str(days), "-extfile", f"{name}.ext")
    return TlsPki(d, d / "ca.crt", d / "ca.key", d / "server.crt", d / "server.key", d / "client.crt",
                   d / "client.key")


def make_htpasswd(path: str | os.PathLike, users: Mapping[str, str]) -> Path:
    """A bcrypt htpasswd file (the only hash distribution accepts).

    Uses ``htpasswd`` from apache2-utils; falls back to the python ``bcrypt`` package.
    """
    lines = []
    exe = shutil.which("htpasswd")
    for user, pw in users.items():
        if exe:
            r = subprocess.run([exe, "-nbB", "-C", "5", user, pw], capture_output=True, text=True, check=True)
            lines.append(r.stdout.strip())
        else:
            try:
                import bcrypt  # type: ignore
            except ImportError:
                raise RuntimeError("need `htpasswd` (apt-get install apache2-utils) or python bcrypt "
                                   "to make an htpasswd file") from None
            lines.append(f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(5)).decode()}")
    p = Path(path)
    p.write_text("\n".join(lines) + "\n")
    return p


class Registry:
    """One docker-registry process; start()/stop() may be repeated (same port and storage).

    It listens on `ip` (default loopback; e.g. a network lab's host address, testbed.netns). With
    `tls` (a `TlsPki`) it serves HTTPS with the PKI's server certificate (distribution's ``http.tls``);
    with `client_cas` too it wants a client certificate the PKI's CA signed (``http.tls.clientcas``).
    """

    def __init__(self, workdir: str | os.PathLike, *, htpasswd: str | os.PathLike | Mapping[str, str] | None = None,
                 port: int | None = None, ip: str = "127.0.0.1", tls: TlsPki | None = None,
                 client_cas: bool = False):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage_dir = self.workdir / "storage"
        self.storage_dir.mkdir(exist_ok=True)
        self.access_log_path = self.workdir / "access.log"
        self.app_log_path = self.workdir / "registry.log"
        self.config_path = self.workdir / "config.yml"
        if isinstance(htpasswd, Mapping):
            htpasswd = make_htpasswd(self.workdir / "htpasswd", htpasswd)
        self.htpasswd = Path(htpasswd) if htpasswd else None
        self.ip = ip
        self.tls = tls
        self.client_cas = client_cas
        self.port = port or free_port(ip)
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def _write_config(self) -> None:
        q = json.dumps  # a JSON string is a valid YAML double-quoted scalar
        cfg = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  formatter: text",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {q(str(self.storage_dir))}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: {q(self.host)}",
            "  secret: pynydus-test-secret",
            "  headers:",
            "    X-Content-Type-Options: [nosniff]",
        ]
        if self.tls:
            cfg += ["  tls:", f"    certificate: {q(str(self.tls.server_cert))}", f"    key: {q(str(self.tls.server_key))}"]
            if self.client_cas:
                cfg += ["    clientcas:", f"      - {q(str(self.tls.ca))}"]
        if self.htpasswd:
            cfg += ["auth:", "  htpasswd:", "    realm: pynydus-test", f"    path: {q(str(self.htpasswd))}"]
        self.config_path.write_text("\n".join(cfg) + "\n")

    def start(self, timeout: float = 15.0) -> "Registry":
        if self.proc and self.proc.poll() is None:
            return self
        if not os.path.exists(REGISTRY_BIN):
            raise RuntimeError(f"{REGISTRY_BIN} missing (apt-get install docker-registry)")
        for attempt in range(3):
            self._write_config()
            self.proc = spawn([REGISTRY_BIN, "serve", self.config_path], self.app_log_path,
                              stdout_path=self.access_log_path)
            if self._wait_ready(timeout):
                return self
            self.stop()
            if "address already in use" in self.app_log_path.read_text(errors="replace") and attempt < 2:
                self.port = free_port(self.ip)
                continue
            break
        tail = self.app_log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"docker-registry did not come up on {self.host}:\n{tail}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                kw = {"verify": str(self.tls.ca), "cert": (str(self.tls.client_cert), str(self.tls.client_key))} \
                    if self.tls else {}
                r = requests.get(f"{self.url}/v2/", timeout=1, **kw)
                if r.status_code in (200, 401):
                    return True
            except requests.RequestException:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        p, self.proc = self.proc, None
        stop_process(p, 5)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- access log
    def access_log(self, since: int = 0, settle: float = 0.1) -> list[AccessLogEntry]:
        """Parsed access-log entries (from entry number ``since``).

        The registry writes a line after it finished the response, so a client
        can see the last byte before the line exists: wait until the log has
        been quiet for ``settle`` seconds (at most 2 s).
        """
        deadline = time.monotonic() + 2.0
        last = -1
        while True:
            size = self.access_log_path.stat().st_size if self.access_log_path.exists() else 0
            if size == last or time.monotonic() > deadline:
                break
            last = size
            time.sleep(settle)
        text = self.access_log_path.read_text(errors="replace") if self.access_log_path.exists() else ""
        return parse_access_log(text)[since:]

    def mark(self) -> int:
        """Number of entries so far; pass as ``since=`` to see only what follows."""
        return len(self.access_log())

    def blob_gets(self, since: int = 0, digest: str | None = None) -> list[AccessLogEntry]:
        return [e for e in self.access_log(since) if e.is_blob_get and (digest is None or e.digest == digest)]

    # -- storage (for tampering tests)
    def blob_data_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage_dir / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def __enter__(self) -> "Registry":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def run_registry(tmpdir: str | os.PathLike, *, htpasswd: str | os.PathLike | Mapping[str, str] | None = None,
                 tls: TlsPki | None = None, client_cas: bool = False) -> Iterator[Registry]:
    """Start a real registry under ``tmpdir`` (HTTPS with ``tls``); always stopped on exit."""
    reg = Registry(tmpdir, htpasswd=htpasswd, tls=tls, client_cas=client_cas)
    try:
        reg.start()
        yield reg
    finally:
        reg.stop()


def push_image(source: str, target: str, *, plain_http: bool = True) -> str:
    """Copy one image (a single manifest, not an index) from ``source`` (oci:DIR[:TAG] or a
    registry) to registry reference ``target`` with pynydus's own image store; returns the
    manifest digest."""
    from rafs.image.store import open_store
    with open_store(source) as src, open_store(target, plain_http=plain_http) as dst:
        desc = src.resolve()
        raw = src.get_bytes(desc.digest)
        manifest = json.loads(raw)
        if "layers" not in manifest:
            raise ValueError(f"{source} is an image index; push one platform's manifest")
        for blob in [manifest["config"], *manifest["layers"]]:
            if dst.has_blob(blob["digest"]):
                continue
            path = getattr(src, "blob_path", None)
            if path is not None:
                dst.put_blob(blob["digest"], path(blob["digest"]))
            else:
                dst.put_bytes(blob["digest"], src.get_bytes(blob["digest"]))
        dst.tag(raw, desc.media_type)
        return desc.digest


def skopeo_copy(src: str, dst: str, *, all_images: bool = False, preserve_digests: bool = True,
                src_creds: str | None = None, dest_creds: str | None = None, authfile: str | None = None,
                extra: tuple[str, ...] = (), timeout: float = 120) -> subprocess.CompletedProcess:
    """``skopeo copy`` with TLS verification off (plain-http loopback registries) and no signature policy."""
    cmd = ["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false"]
    if all_images:
        cmd.append("--all")
    if preserve_digests:
        cmd.append("--preserve-digests")
    if src_creds:
        cmd += ["--src-creds", src_creds]
    if dest_creds:
        cmd += ["--dest-creds", dest_creds]
    if authfile:
        cmd += ["--authfile", authfile]
    cmd += [*extra, src, dst]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}{r.stdout}")
    return r


def write_docker_config(config_dir: str | os.PathLike, auths: Mapping[str, tuple[str, str]]) -> Path:
    """``config_dir/config.json`` with ``auths[host].auth`` = base64(user:password)."""
    d = Path(config_dir)
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"auths": {h: {"auth": base64.b64encode(f"{u}:{p}".encode()).decode()} for h, (u, p) in auths.items()}}
    (d / "config.json").write_text(json.dumps(cfg))
    return d / "config.json"
