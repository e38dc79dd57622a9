"""TLS for registry connections: whom to trust, which client certificate to show, and a certificate
problem said in one line.

Trust: the **system CA store** (what ``update-ca-certificates`` and the distribution's
ca-certificates package manage, what containerd and every Go program on the node trusts): the
first of ``$SSL_CERT_FILE`` and the distributions' bundle files (`SYSTEM_CA_FILES`), plus OpenSSL's
default paths (``$SSL_CERT_DIR``, the hashed ``/etc/ssl/certs``). requests would use certifi's
bundle instead; it is not merged in, because a CA an operator removed from (or never put into) the
node's store must not be trusted behind their back. Only a machine without any system store falls
back to certifi. A host's ``ca`` files (hosts.toml) are trusted besides the system store, as
containerd does; its ``client`` pairs are presented when the registry asks; ``skip_verify`` turns
verification off for that host only.

    session = new_session(host)              # a requests.Session whose https:// connections use
                                             # the system store, and host's own context for it
    except requests.exceptions.SSLError as e:
        raise tls_error(e, host)             # TLSError: "HOST: TLS certificate not trusted (...); ..."
"""
from __future__ import annotations

import functools
import logging
import os
import ssl
import threading

import requests
import urllib3
from requests.adapters import HTTPAdapter

from rafs.errors import BackendError

from .hosts import RegistryHost

log = logging.getLogger(__name__)

#: Where distributions keep the system CA bundle (the list Go's crypto/x509 reads on Linux).
SYSTEM_CA_FILES = (
    "/etc/ssl/certs/ca-certificates.crt",                  # Debian, Ubuntu, Gentoo, Arch, Alpine
    "/etc/pki/tls/certs/ca-bundle.crt",                    # Fedora, RHEL 6
    "/etc/ssl/ca-bundle.pem",                              # openSUSE
    "/etc/pki/tls/cacert.pem",                             # OpenELEC
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",   # CentOS, RHEL 7
    "/etc/ssl/cert.pem",                                   # Alpine, macOS-like layouts
)


class TLSError(BackendError):
    """A TLS connection to a registry host failed; the message says what to configure.

    ``host``: the host contacted; ``kind``: "untrusted", "hostname", "client-cert",
    "plain-http" (the server answered in plain HTTP) or "handshake"."""

    def __init__(self, message: str, host: str = "", kind: str = "handshake"):
        super().__init__(message)
        self.host = host
        self.kind = kind


def system_ca_file() -> str | None:
    """The system CA bundle: ``$SSL_CERT_FILE`` if set, else the first of `SYSTEM_CA_FILES` that exists."""
    env = os.environ.get("SSL_CERT_FILE")
    if env:
        return env if os.path.isfile(env) else None
    for p in SYSTEM_CA_FILES:
        if os.path.isfile(p):
            return p
    return None


@functools.lru_cache(maxsize=64)
def ssl_context(ca: tuple[str, ...] = (), client: tuple[tuple[str, str], ...] = (),
                skip_verify: bool = False, where: str = "") -> ssl.SSLContext:
    """A client SSLContext: the system store + ``ca``, ``client`` certificates, or no verification.

    Cached per configuration (contexts are thread-safe and cheap to share). ``where`` names the
    configuration in errors (a HostsConfigError-like BackendError for a file that cannot be used).
    """
    ctx = ssl.create_default_context()          # OpenSSL's default paths: $SSL_CERT_DIR, /etc/ssl/certs
    if skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        system = system_ca_file()
        if system:
            try:
                ctx.load_verify_locations(cafile=system)
            except (OSError, ssl.SSLError) as e:
                log.warning("cannot load the system CA store %s: %s", system, e)
                system = None
        if not system and not ctx.cert_store_stats().get("x509_ca"):
            from requests.certs import where    # certifi's bundle: the last resort, said in the log
            log.info("no system CA store found (%s); trusting certifi's bundle", ", ".join(SYSTEM_CA_FILES[:2]))
            ctx.load_verify_locations(cafile=where())
        for f in ca:
            try:
                ctx.load_verify_locations(cafile=f)
            except FileNotFoundError:
                raise BackendError(f"{where}: ca {f}: no such file") from None
            except (OSError, ssl.SSLError, ValueError) as e:
                raise BackendError(f"{where}: ca {f}: not a PEM certificate file ({_reason(e)})") from None
    for cert, key in client:
        try:
            ctx.load_cert_chain(cert, key or None)
        except FileNotFoundError as e:
            raise BackendError(f"{where}: client {cert}{' ' + key if key else ''}: "
                               f"no such file {e.filename or ''}".rstrip()) from None
        except (OSError, ssl.SSLError, ValueError) as e:
            raise BackendError(f"{where}: client {cert}{' ' + key if key else ''}: not a usable PEM "
                               f"certificate and key ({_reason(e)})") from None
    return ctx


def context_for(endpoint: RegistryHost | None) -> ssl.SSLContext:
    if endpoint is None or not endpoint.has_tls_config:
        return ssl_context()
    return ssl_context(endpoint.ca, endpoint.client, bool(endpoint.skip_verify), endpoint.config_hint())


_warned: set[str] = set()
_warned_lock = threading.Lock()


class TLSAdapter(HTTPAdapter):
    """An HTTPAdapter whose https connections use ``ctx`` (not certifi, not ``verify=``)."""

    def __init__(self, ctx: ssl.SSLContext, **kw):
        self._ctx = ctx
        self._cert_reqs = "CERT_NONE" if ctx.verify_mode == ssl.CERT_NONE else "CERT_REQUIRED"
        super().__init__(**kw)

    def init_poolmanager(self, *args, **kw):
        kw["ssl_context"] = self._ctx
        super().init_poolmanager(*args, **kw)

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        proxy_kwargs.setdefault("ssl_context", self._ctx)
        return super().proxy_manager_for(proxy, **proxy_kwargs)

    def build_connection_pool_key_attributes(self, request, verify, cert=None):   # requests >= 2.32.2
        host_params, _ = super().build_connection_pool_key_attributes(request, True, None)
        return host_params, {"cert_reqs": self._cert_reqs}

    def cert_verify(self, conn, url, verify, cert):
        # the context decides: no certifi bundle, no per-request verify= or cert=
        conn.cert_reqs = self._cert_reqs
        conn.ca_certs = None
        conn.ca_cert_dir = None


def new_session(endpoint: RegistryHost | None = None, *, pool_size: int = 16,
                session: requests.Session | None = None) -> requests.Session:
    """A Session (or ``session``, adapted) whose https:// connections trust the system store, and
    use ``endpoint``'s own TLS configuration for its host; no urllib3 retries (the client retries)."""
    if session is None:
        session = requests.Session()
        session.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0))
        session.mount("https://", TLSAdapter(context_for(None), pool_connections=4, pool_maxsize=pool_size,
                                             max_retries=0))
    elif not isinstance(session.get_adapter("https://x/"), TLSAdapter):
        session.mount("https://", TLSAdapter(context_for(None), pool_connections=4, pool_maxsize=pool_size,
                                             max_retries=0))
    if endpoint is not None and endpoint.has_tls_config:
        ctx = context_for(endpoint)
        session.mount(f"https://{endpoint.host}/", TLSAdapter(ctx, pool_connections=1, pool_maxsize=pool_size,
                                                               max_retries=0))
        if endpoint.skip_verify:
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            with _warned_lock:
                first = endpoint.host not in _warned
                _warned.add(endpoint.host)
            if first:
                log.info("TLS certificate verification is off for %s (skip_verify)", endpoint.host)
    return session


# --------------------------------------------------------------------------- errors

def find_ssl_error(exc: BaseException | None) -> ssl.SSLError | None:
    """The ssl.SSLError somewhere inside a requests/urllib3 exception (args, reason, cause, context)."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLError):
            return e
        if isinstance(e, BaseException):
            todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
            todo += [getattr(e, "reason", None), e.__cause__, e.__context__]
    return None


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError) and e.verify_message:
        return e.verify_message
    if isinstance(e, ssl.SSLError):
        r = e.reason or ""
        if r:
            return r.replace("_", " ").lower()
        text = str(e.args[1] if len(e.args) > 1 else e)
        return text.split("] ", 1)[-1].split(" (_ssl.c", 1)[0]
    return str(e.strerror if isinstance(e, OSError) and e.strerror else e)


_PLAIN_HTTP_REASONS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST",
                       "UNKNOWN_PROTOCOL")
_CLIENT_CERT_REASONS = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN",
                        "HANDSHAKE_FAILURE", "ACCESS_DENIED", "UNSUPPORTED_CERTIFICATE")


def is_plain_http_answer(exc: BaseException) -> bool:
    """True if a TLS handshake failed because the server answered in plain HTTP."""
    e = find_ssl_error(exc)
    return e is not None and not isinstance(e, ssl.SSLCertVerificationError) and \
        any(r in f"{e.reason} {e}".upper().replace(" ", "_") for r in _PLAIN_HTTP_REASONS)


def tls_error(exc: BaseException, host: str, endpoint: RegistryHost | None = None, what: str = "") -> TLSError:
    """One line for a failed TLS connection to ``host``: what went wrong and what to configure."""
    e = find_ssl_error(exc)
    where = (endpoint.config_hint() if endpoint is not None and host == endpoint.host
             else os.path.join(endpoint.hosts_dir if endpoint is not None and endpoint.hosts_dir else
                               "/etc/containerd/certs.d", host, "hosts.toml"))
    prefix = f"{what}: " if what else ""
    reason = _reason(e) if e is not None else str(exc)
    if isinstance(e, ssl.SSLCertVerificationError):
        msg = (e.verify_message or "").lower()
        if "mismatch" in msg or "not valid for" in msg:
            return TLSError(f"{prefix}TLS certificate of {host} does not name {host} ({reason}): reach it by a "
                            f"name its certificate lists, or set skip_verify = true in {where}", host, "hostname")
        return TLSError(f"{prefix}TLS certificate of {host} is not trusted ({reason}): name its CA in {where} "
                        f"(ca = \"/path/to/ca.crt\") or add it to the system CA store, or set skip_verify = true "
                        f"there", host, "untrusted")
    if e is not None:
        up = f"{e.reason} {e}".upper().replace(" ", "_")
        if any(r in up for r in _PLAIN_HTTP_REASONS):
            return TLSError(f"{prefix}{host} does not speak TLS ({reason}): it is a plain-HTTP registry; "
                            f"use http:// for it (server = \"http://{host}\" in {where}, or --plain-http)",
                            host, "plain-http")
        if any(r in up for r in _CLIENT_CERT_REASONS):
            return TLSError(f"{prefix}{host} refused the TLS handshake ({reason}): if it wants a client "
                            f"certificate, configure client = [[\"/path/client.cert\", \"/path/client.key\"]] "
                            f"in {where}", host, "client-cert")
    return TLSError(f"{prefix}TLS handshake with {host} failed ({reason}); its TLS settings live in {where}",
                    host, "handshake")
