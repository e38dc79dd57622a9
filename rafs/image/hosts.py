"""containerd's registry host configuration, read as containerd reads it.

    hosts = resolve_hosts("registry.example.com:5000", "/etc/containerd/certs.d")
    hosts[:-1]        # mirrors ([host."…"] tables), in the order the file lists them
    hosts[-1]         # the origin: `server` (default: the registry itself)
    hosts[-1].url     # "https://registry.example.com:5000/v2"

The hosts directory (containerd's CRI ``config_path``, ``ctr --hosts-dir``;
default ``/etc/containerd/certs.d``) holds one directory per registry host
namespace, the host of an image reference (``docker.io``, ``quay.io``,
``10.0.0.5:5000``). For ``HOST:PORT`` the first of ``HOST_PORT_``,
``HOST:PORT`` and ``_default`` that exists is used; for ``HOST``, ``HOST``
then ``_default``. In it:

* ``hosts.toml``::

      server = "https://registry.example.com:5000"   # the origin (default: the namespace itself)
      ca = "ca.crt"                                   # root-level keys configure the server
      [host."https://mirror.internal"]                # tried first, in this order
        capabilities = ["pull", "resolve"]            # pull, resolve, push, referrers (default: all)
        ca = ["/etc/certs/a.pem", "b.pem"]            # a path or a list; relative to hosts.toml
        client = [["client.cert", "client.key"]]      # a path, a list, or [cert, key] pairs
        skip_verify = false
        override_path = false                         # true: the URL's path IS the API root (no /v2)
        dial_timeout = "1s"
        [host."https://mirror.internal".header]
          x-custom = "v"                              # a string or a list of strings

  A ``host``/``server`` without a scheme is ``https://``; an ``http://`` one is
  plain HTTP, except that one with a TLS setting (``ca``, ``client``,
  ``skip_verify``) on a port other than 80 is tried over HTTPS first and spoken
  to over HTTP only if it answers in plain HTTP. A path in the URL is the API
  root's prefix (``/v2`` appended unless it ends in ``/v2`` or
  ``override_path``). A host that is not the namespace (a mirror, or another
  ``server``) gets the query parameter ``ns=NAMESPACE``.

* no ``hosts.toml``: Docker's certificate files, ``*.crt`` (CAs) and
  ``*.cert`` + ``*.key`` (client pairs), configure the origin. A ``hosts.toml``
  that cannot be parsed is reported (a warning) and the certificate files are
  used instead, as containerd does.

What a registry answers with is decided by the hosts' capabilities: tags are
resolved by ``resolve`` hosts, content is pulled from ``pull`` hosts (each in
order; the next on failure), pushes go to the first ``push`` host.

Our defaults where containerd's come from its caller: ``plain_http`` makes an
unconfigured origin ``http://`` (containerd's ``DefaultScheme``; the snapshotter
passes its ``[backend] plain_http`` rule, which also covers loopback
registries), and ``insecure`` (nydusify's ``--source-insecure`` and friends)
skips certificate verification on every host of that side and lets a host that
answers in plain HTTP be spoken to over HTTP.

This module only reads configuration; `rafs.image.tls` turns a `RegistryHost`
into a TLS context and `rafs.image.client.RegistryClient` speaks to it.
"""
from __future__ import annotations

import logging
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from rafs.errors import BackendError

from .refs import DOCKER_HUB_HOSTS, DOCKER_HUB_REGISTRY

log = logging.getLogger(__name__)

#: containerd's hosts directory (its CRI ``config_path`` as the docs set it; ``ctr --hosts-dir``).
DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"
HOSTS_FILE = "hosts.toml"
DEFAULT_NAMESPACE_DIR = "_default"
CAPABILITIES = ("pull", "resolve", "push", "referrers")
ALL_CAPABILITIES = frozenset(CAPABILITIES)
_HOST_KEYS = frozenset({"capabilities", "ca", "client", "skip_verify", "header", "override_path", "dial_timeout"})


class HostsConfigError(BackendError):
    """A hosts directory entry that cannot be used (a bad value, an unreadable file)."""


@dataclass(frozen=True)
class RegistryHost:
    """One place to send registry requests to: a mirror (``[host."…"]``) or the origin (``server``).

    The spec the image store, the blob backends and the mirror backend share: `url` is the API
    root requests go under (``{url}/{repo}/blobs/{digest}``), `ns` the query parameter a mirror
    gets, the TLS fields are `rafs.image.tls`'s, `headers` go with every request to it.
    """
    host: str                                   # "name[:port]" that is contacted
    scheme: str = "https"                       # "https" | "http"
    path: str = "/v2"                           # the API root ("" with override_path and no path)
    capabilities: frozenset = ALL_CAPABILITIES
    ca: tuple[str, ...] = ()                    # CA files trusted besides the system store
    client: tuple[tuple[str, str], ...] = ()    # (cert file, key file or "" = in the cert file)
    skip_verify: bool | None = None             # None: not set (verify)
    header: tuple[tuple[str, tuple[str, ...]], ...] = ()
    dial_timeout: float | None = None           # seconds to connect
    http_fallback: bool = False                 # https first; a plain-HTTP answer switches to http
    namespace: str = ""                         # the image reference's registry host
    mirror: bool = False                        # a [host."…"] entry (False: the origin)
    config: str = ""                            # the hosts.toml / certificate dir it came from ("" none)
    hosts_dir: str = ""                         # where the configuration was looked for ("" none)

    @property
    def origin(self) -> str:
        """``scheme://host``."""
        return f"{self.scheme}://{self.host}"

    @property
    def url(self) -> str:
        """The API root: ``scheme://host/v2`` (or the configured path)."""
        return self.origin + self.path

    @property
    def ns(self) -> str | None:
        """The ``ns`` query parameter requests to this host carry: the namespace, unless this is it."""
        if not self.namespace or self.host == self.namespace:
            return None
        if self.namespace == "docker.io" and self.host == DOCKER_HUB_REGISTRY:
            return None
        return self.namespace

    @property
    def has_tls_config(self) -> bool:
        return bool(self.ca or self.client or self.skip_verify is not None)

    @property
    def verify(self) -> bool:
        return not self.skip_verify

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    def headers(self) -> dict[str, str]:
        """The configured headers (several values of one header joined by ", ", as HTTP allows)."""
        return {k: ", ".join(v) for k, v in self.header}

    def config_hint(self) -> str:
        """Where to configure this host, for messages: its hosts.toml, or the one to create."""
        if self.config:
            return self.config if self.config.endswith(HOSTS_FILE) else f"{self.config}/{HOSTS_FILE}"
        base = self.hosts_dir or DEFAULT_HOSTS_DIR
        return os.path.join(base, self.namespace or self.host, HOSTS_FILE)

    def __str__(self) -> str:
        return self.url


@dataclass
class _HostSettings:
    """One table of a hosts.toml (the root one or a [host."…"]), as read, before defaults."""
    capabilities: frozenset = ALL_CAPABILITIES
    ca: tuple[str, ...] = ()
    client: tuple[tuple[str, str], ...] = ()
    skip_verify: bool | None = None
    header: tuple = ()
    override_path: bool = False
    dial_timeout: float | None = None
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- the directory

def namespace_of(host: str) -> str:
    """The registry host namespace of a reference's host (Docker Hub's names are ``docker.io``)."""
    h = host.lower() if host.lower() in DOCKER_HUB_HOSTS else host
    return "docker.io" if h in DOCKER_HUB_HOSTS else h


def host_dir_candidates(hosts_dir: str, namespace: str) -> list[str]:
    """The directories looked at for ``namespace``, in order (containerd's, on Unix)."""
    out = []
    i = namespace.rfind(":")
    if i > 0:
        out.append(os.path.join(hosts_dir, f"{namespace[:i]}_{namespace[i + 1:]}_"))
    out.append(os.path.join(hosts_dir, namespace))
    out.append(os.path.join(hosts_dir, DEFAULT_NAMESPACE_DIR))
    return out


def find_host_dir(hosts_dir: str | None, namespace: str) -> str | None:
    """The directory configuring ``namespace`` under ``hosts_dir``, or None."""
    if not hosts_dir:
        return None
    for d in host_dir_candidates(hosts_dir, namespace):
        if os.path.isdir(d):
            return d
    return None


def load_host_dir(path: str) -> list[tuple[str, _HostSettings]]:
    """What one host directory configures: [(host URL, settings)..., (server or "", settings)]."""
    toml_path = os.path.join(path, HOSTS_FILE)
    try:
        with open(toml_path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        data = b""
    except OSError as e:
        raise HostsConfigError(f"{toml_path}: cannot read: {e.strerror or e}") from None
    if not data:
        return [("", _cert_files(path))]
    try:
        return parse_hosts_toml(data, path)
    except HostsConfigError as e:
        log.warning("%s; ignoring it, as containerd does, and using the certificate files of %s "
                    "(*.crt, *.cert + *.key)", e, path)
        return [("", _cert_files(path))]


def _cert_files(path: str) -> _HostSettings:
    """Docker's certificate file pattern: *.crt are CAs, *.cert + *.key client pairs."""
    s = _HostSettings()
    try:
        names = sorted(os.listdir(path))
    except FileNotFoundError:
        return s
    ca, client = [], []
    for name in names:
        p = os.path.join(path, name)
        if os.path.isdir(p):
            continue
        if name.endswith(".crt"):
            ca.append(p)
        elif name.endswith(".cert"):
            key = p[:-len(".cert")] + ".key"
            client.append((p, key if os.path.exists(key) else ""))
    s.ca, s.client = tuple(ca), tuple(client)
    return s


# --------------------------------------------------------------------------- hosts.toml

def parse_hosts_toml(data: bytes | str, base_dir: str) -> list[tuple[str, _HostSettings]]:
    """[(host URL, settings) for each [host."…"] in file order..., (server or "", root settings)].

    Relative paths are taken from ``base_dir`` (the file's directory). HostsConfigError on anything
    containerd would reject (bad TOML, an unknown capability, a value of the wrong type).
    """
    where = os.path.join(base_dir, HOSTS_FILE)
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise HostsConfigError(f"{where}: not valid TOML: {e}") from None
    server = doc.get("server", "")
    if not isinstance(server, str):
        raise HostsConfigError(f"{where}: server must be a string, got {server!r}")
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise HostsConfigError(f"{where}: host must be a table of [host.\"URL\"] tables")
    out = []
    for url, table in hosts.items():       # tomllib keeps the file's order
        if not isinstance(table, dict):
            raise HostsConfigError(f"{where}: host.{url!r} must be a table")
        if not url:
            raise HostsConfigError(f"{where}: a [host.\"\"] table needs a URL")
        out.append((url, _settings(table, base_dir, f"{where}: [host.{_quote(url)}]")))
    root = {k: v for k, v in doc.items() if k not in ("server", "host")}
    out.append((server, _settings(root, base_dir, where)))
    return out


def _quote(s: str) -> str:
    return '"' + s.replace('"', '\\"') + '"'


def _settings(table: dict, base_dir: str, where: str) -> _HostSettings:
    s = _HostSettings()
    for k, v in table.items():
        if k not in _HOST_KEYS:
            s.extra[k] = v            # containerd ignores keys it does not know; so do we (debug log)
            log.debug("%s: ignoring unknown key %r", where, k)
    caps = table.get("capabilities")
    if caps is not None:
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise HostsConfigError(f"{where}: capabilities must be a list of strings")
        if caps:
            got = set()
            for c in caps:
                if c.lower() not in ALL_CAPABILITIES:
                    raise HostsConfigError(f"{where}: unknown capability {c!r} "
                                           f"(known: {', '.join(CAPABILITIES)})")
                got.add(c.lower())
            s.capabilities = frozenset(got)
    if "ca" in table:
        s.ca = tuple(_abs(p, base_dir) for p in _strings(table["ca"], f"{where}: ca"))
    if "client" in table:
        s.client = _client_pairs(table["client"], base_dir, f"{where}: client")
    if "skip_verify" in table:
        if not isinstance(table["skip_verify"], bool):
            raise HostsConfigError(f"{where}: skip_verify must be true or false")
        s.skip_verify = table["skip_verify"]
    if "override_path" in table:
        if not isinstance(table["override_path"], bool):
            raise HostsConfigError(f"{where}: override_path must be true or false")
        s.override_path = table["override_path"]
    if "header" in table:
        hdr = table["header"]
        if not isinstance(hdr, dict):
            raise HostsConfigError(f"{where}: header must be a table")
        s.header = tuple((str(k), tuple(_strings(v, f"{where}: header {k!r}"))) for k, v in hdr.items())
    if table.get("dial_timeout"):
        s.dial_timeout = parse_duration(table["dial_timeout"], f"{where}: dial_timeout")
    return s


def _strings(v, where: str) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return list(v)
    raise HostsConfigError(f"{where}: want a string or a list of strings, got {v!r}")


def _client_pairs(v, base_dir: str, where: str) -> tuple[tuple[str, str], ...]:
    if isinstance(v, str):
        return ((_abs(v, base_dir), ""),)
    if not isinstance(v, list):
        raise HostsConfigError(f"{where}: want a path, a list of paths or of [cert, key] pairs, got {v!r}")
    out = []
    for item in v:
        if isinstance(item, str):
            out.append((_abs(item, base_dir), ""))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item):
            out.append((_abs(item[0], base_dir), _abs(item[1], base_dir) if item[1] else ""))
        else:
            raise HostsConfigError(f"{where}: invalid entry {item!r} (a path or a [cert, key] pair)")
    return tuple(out)


def _abs(p: str, base_dir: str) -> str:
    return p if os.path.isabs(p) else os.path.join(base_dir, p)


_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text, where: str = "duration") -> float:
    """A Go duration ("1s", "500ms", "1m30s") in seconds."""
    if not isinstance(text, str):
        raise HostsConfigError(f"{where}: want a duration such as \"1s\", got {text!r}")
    s = text.strip()
    if s in ("0", ""):
        return 0.0
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_RE.match(s, pos)
        if not m:
            raise HostsConfigError(f"{where}: invalid duration {text!r} (e.g. \"1s\", \"500ms\", \"1m30s\")")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return total


# --------------------------------------------------------------------------- resolving

def _endpoint(url: str, s: _HostSettings) -> tuple[str, str, str]:
    """(scheme, host, API path) of a host/server URL, as containerd reads it."""
    if not url.startswith("http"):
        url = "https://" + url
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.netloc:
        raise HostsConfigError(f"invalid registry URL {url!r}")
    path = u.path
    if path:
        path = os.path.normpath(path)
        if path == "/":
            path = ""
        if not path.endswith("/v2") and not s.override_path:
            path += "/v2"
    elif not s.override_path:
        path = "/v2"
    return u.scheme, u.netloc, path


def resolve_hosts(host: str, hosts_dir: str | None = DEFAULT_HOSTS_DIR, *, plain_http: bool = False,
                  insecure: bool = False) -> list[RegistryHost]:
    """The hosts to talk to for registry host ``host``: mirrors in order, then the origin (last).

    ``hosts_dir`` None or "" reads no configuration. ``plain_http``: an origin the configuration
    does not name is ``http://``. ``insecure``: skip certificate verification everywhere and speak
    HTTP to a host that answers in plain HTTP. HostsConfigError on a configuration containerd
    rejects too (an invalid URL).
    """
    namespace = namespace_of(host)
    d = find_host_dir(hosts_dir, namespace)
    entries = load_host_dir(d) if d else [("", _HostSettings())]
    config = os.path.join(d, HOSTS_FILE) if d and os.path.isfile(os.path.join(d, HOSTS_FILE)) else (d or "")
    out = []
    for i, (url, s) in enumerate(entries):
        last = i == len(entries) - 1
        if url:
            try:
                scheme, h, path = _endpoint(url, s)
            except HostsConfigError as e:
                raise HostsConfigError(f"{config or d}: {e}") from None
        else:                                    # the namespace itself is the origin
            h = DOCKER_HUB_REGISTRY if namespace == "docker.io" else namespace
            scheme, path = ("http" if plain_http and namespace != "docker.io" else "https"), "/v2"
        rh = RegistryHost(host=h, scheme=scheme, path=path, capabilities=s.capabilities, ca=s.ca,
                          client=s.client, skip_verify=s.skip_verify, header=s.header,
                          dial_timeout=s.dial_timeout, namespace=namespace, mirror=not last,
                          config=config, hosts_dir=hosts_dir or "")
        if rh.scheme == "http" and rh.has_tls_config and _port(rh.host) != "80":
            # containerd: a TLS setting on an http:// host means "HTTPS first, HTTP if it answers so"
            rh = replace(rh, scheme="https", http_fallback=True)
        if insecure:
            rh = replace(rh, skip_verify=True, http_fallback=rh.http_fallback or rh.scheme == "https")
        out.append(rh)
    return out


def _port(host: str) -> str:
    if host.startswith("["):
        _, _, rest = host.partition("]")
        return rest[1:] if rest.startswith(":") else ""
    return host.rpartition(":")[2] if ":" in host else ""


def hosts_for(hosts: list[RegistryHost], capability: str) -> list[RegistryHost]:
    """The hosts that may be asked for ``capability``, in order."""
    return [h for h in hosts if h.can(capability)]


def describe(hosts: list[RegistryHost]) -> str:
    """One line for logs: "mirror https://m/v2 (pull), origin https://r/v2"."""
    parts = []
    for h in hosts:
        caps = ",".join(c for c in CAPABILITIES if h.can(c))
        parts.append(f"{'mirror' if h.mirror else 'origin'} {h.url} ({caps})")
    return ", ".join(parts)
