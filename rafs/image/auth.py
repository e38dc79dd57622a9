"""Registry authentication: credentials as docker and containerd tools find them, ``WWW-Authenticate``
challenges, and the bearer tokens a client holds per scope.

Written from the Docker token authentication spec (and its OAuth2 part), the
docker CLI's ``config.json`` format and the docker-credential-helpers protocol.

Where credentials come from (`load_docker_credentials`), as the docker CLI looks
them up in ``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``):

1. ``credHelpers[HOST]``: the program ``docker-credential-<name>``, run as
   ``docker-credential-<name> get`` with the server URL on stdin (``HOST``; for
   Docker Hub ``https://index.docker.io/v1/``); it prints
   ``{"ServerURL": .., "Username": .., "Secret": ..}``. A ``Username`` of
   ``<token>`` means ``Secret`` is an identity token. A helper that fails with
   "credentials not found" means anonymous.
2. otherwise ``credsStore``: the same protocol, for every host.
3. otherwise ``auths[HOST]``: ``auth`` (base64 ``user:password``) or
   ``username``/``password``, and ``identitytoken``.

An identity token is an OAuth2 refresh token: bearer tokens are fetched with a
``POST`` of ``grant_type=refresh_token`` to the challenge's realm (a token server
that answers 404/405 to the POST is asked with the plain ``GET`` instead); a
refresh token the server hands back replaces it for this client.

Authentication is lazy: a request goes out anonymously (or with what was
learned before); a 401 challenge teaches the scheme (`RegistryAuth.on_challenge`),
and only then are the credentials looked up (a helper program runs once per
client). Bearer tokens are cached per scope, refreshed shortly before
``expires_in`` runs out, and fetched again when the registry answers 401.
Credentials are never sent to a non-https token realm of an https registry, and
never appear in a log line or an error message. *Where* the Authorization header
may go (the registry's own origin only: not a redirect target elsewhere, not a
mirror, not a peer) is the client's business (`rafs.image.client`).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Union
from urllib.parse import urlsplit

from rafs.errors import BackendError

from .refs import DOCKER_HUB_HOSTS

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- credentials

#: The ``Username`` a credential helper answers when ``Secret`` is an identity token.
TOKEN_USERNAME = "<token>"
#: The server URL docker files Docker Hub's credentials under (and asks helpers for).
DOCKER_HUB_SERVER_URL = "https://index.docker.io/v1/"
#: How long a credential helper may take (seconds).
HELPER_TIMEOUT = 60.0
#: ``client_id`` of our OAuth2 token requests (the spec requires one).
OAUTH_CLIENT_ID = "pynydus"


@dataclass(frozen=True)
class Credentials:
    """A user name and password, and/or an identity token (an OAuth2 refresh token), for one
    registry host.  The secrets never show in ``repr``."""

    username: str
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    @property
    def has_basic(self) -> bool:
        """True if there is a user name or password to send as HTTP basic credentials."""
        return bool(self.username or self.password)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def describe(self) -> str:
        """How these credentials are named in messages: never the secret."""
        if self.identity_token:
            return f"with the identity token of {self.username!r}" if self.username else "with an identity token"
        return f"as {self.username!r}"


#: Pass as ``auth=`` to never look at the docker config.
ANONYMOUS = Credentials("", "")


def _config_key_host(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``index.docker.io``; ``host:5000`` -> ``host:5000``."""
    k = key.strip()
    if "://" in k:
        k = k.split("://", 1)[1]
    return k.split("/", 1)[0].lower()


def _same_registry(key: str, host: str) -> bool:
    kh, want = _config_key_host(key), host.lower()
    return kh == want or (want in DOCKER_HUB_HOSTS and kh in DOCKER_HUB_HOSTS)


def docker_config_path(config_dir: str | None = None) -> str:
    """``config_dir`` (or ``$DOCKER_CONFIG``, or ``~/.docker``) ``/config.json``, as docker finds it."""
    d = config_dir or os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(d, "config.json")


def helper_server_url(host: str) -> str:
    """The server URL docker hands a credential helper for ``host``."""
    return DOCKER_HUB_SERVER_URL if host.lower() in DOCKER_HUB_HOSTS else host


def load_docker_credentials(host: str, *, config_dir: str | None = None) -> Credentials | None:
    """Credentials for registry ``host`` from docker's ``config.json``, looked up as docker does
    (``credHelpers``, then ``credsStore``, then ``auths``; see the module doc); None: anonymous.

    Keys may be written as URLs (``https://HOST/v1/``); any of Docker Hub's names finds
    credentials filed under another.  A helper that cannot be run, fails or answers garbage is
    a one-line `BackendError` naming the helper, the host and the config file (never a secret).
    """
    path = docker_config_path(config_dir)
    try:
        with open(path, "rb") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable docker config %s: %s", path, e)
        return None
    if not isinstance(cfg, dict):
        log.warning("ignoring docker config %s: not a JSON object", path)
        return None
    helpers = cfg.get("credHelpers")
    if isinstance(helpers, dict):
        for key, name in helpers.items():
            if isinstance(name, str) and name and _same_registry(key, host):
                return run_credential_helper(name, helper_server_url(host), origin=f"credHelpers in {path}")
    store = cfg.get("credsStore")
    if isinstance(store, str) and store:
        return run_credential_helper(store, helper_server_url(host), origin=f"credsStore in {path}")
    return _from_auths(cfg.get("auths"), host, path)


def _from_auths(auths, host: str, path: str) -> Credentials | None:
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if not isinstance(entry, dict) or not _same_registry(key, host):
            continue
        user = pw = ""
        if entry.get("auth"):
            try:
                user, _, pw = base64.b64decode(entry["auth"]).decode("utf-8").partition(":")
            except (ValueError, TypeError, UnicodeDecodeError):
                log.warning("ignoring malformed auth for %s in %s", key, path)
                continue
        elif entry.get("username"):
            user, pw = str(entry["username"]), str(entry.get("password") or "")
        token = entry.get("identitytoken")
        token = token if isinstance(token, str) else ""
        if user or pw or token:
            return Credentials(user, pw, token)
    return None


def _helper_says_not_found(text: str) -> bool:
    # docker-credential-helpers' message is "credentials not found in native keychain"
    return "credentials not found" in text.lower()


def _first_line(text: str, secret_free: bool) -> str:
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not secret_free or line.startswith("{") or "secret" in line.lower():
        return ""
    return line[:200]


def run_credential_helper(name: str, server_url: str, *, origin: str = "docker config",
                          timeout: float = HELPER_TIMEOUT) -> Credentials | None:
    """``docker-credential-<name> get`` for ``server_url``: its credentials, or None when the
    helper has none ("credentials not found": anonymous)."""
    prog = f"docker-credential-{name}"
    where = f"credential helper {prog} ({origin}) for {server_url}"
    exe = shutil.which(prog)
    if exe is None:
        raise BackendError(f"{where}: {prog} is not on PATH; install it, or remove it from the docker config")
    try:
        r = subprocess.run([exe, "get"], input=server_url.encode(), capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BackendError(f"{where}: no answer within {timeout:g} s") from None
    except OSError as e:
        raise BackendError(f"{where}: cannot run it: {e.strerror or e}") from None
    out = r.stdout.decode("utf-8", "replace")
    err = r.stderr.decode("utf-8", "replace")
    if r.returncode != 0:
        if _helper_says_not_found(out) or _helper_says_not_found(err):
            log.debug("%s: no credentials stored (anonymous)", where)
            return None
        said = _first_line(out, True) or _first_line(err, True)
        raise BackendError(f"{where}: failed (exit status {r.returncode})" + (f": {said}" if said else ""))
    try:
        j = json.loads(out)
    except ValueError:
        raise BackendError(f"{where}: answer is not JSON") from None
    if not isinstance(j, dict):
        raise BackendError(f"{where}: answer is not a JSON object")
    user, secret = j.get("Username") or "", j.get("Secret") or ""
    if not isinstance(user, str) or not isinstance(secret, str):
        raise BackendError(f"{where}: Username and Secret must be strings")
    if not user and not secret:
        return None
    if user == TOKEN_USERNAME:
        return Credentials("", "", secret)
    return Credentials(user, secret)


# --------------------------------------------------------------------------- challenges

_PARAM_RE = re.compile(r'\s*([A-Za-z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


def parse_www_authenticate(value: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="..",service="..",scope=".."`` -> ("bearer", {realm, service, scope})."""
    value = (value or "").strip()
    scheme, _, rest = value.partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if not m or m.end() == pos:
            break
        raw = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", raw)
        pos = m.end()
    return scheme.lower(), params


# --------------------------------------------------------------------------- per-client state

#: ``request_token(realm, query, headers, form=None)``: the token server's JSON answer (BackendError
#: otherwise): a GET with ``query``, or, given ``form``, a POST of that form (OAuth2), never redirected.
TokenRequest = Callable[..., object]

#: What a `RegistryAuth` authenticates with: credentials, None (anonymous), or a function that
#: looks them up when a challenge first asks for them.
CredentialSource = Union[Credentials, None, Callable[[], "Credentials | None"]]


class OAuthUnsupported(BackendError):
    """The token server does not take OAuth2 POSTs (it answered 404 or 405): ask it with GET."""


class RegistryAuth:
    """What one client sends as ``Authorization``: basic credentials or a bearer token per scope,
    as the registry's challenges asked.  Thread-safe.

    ``creds`` None means anonymous; a callable is asked once, when a challenge first needs
    credentials.  ``request_token`` performs the token server's GET or POST (the client's
    transport and retry loop); ``name`` and ``base`` (``https://HOST``) are for messages and
    the realm check.
    """

    def __init__(self, name: str, base: str, creds: CredentialSource, request_token: TokenRequest):
        self.name = name
        self.base = base
        if creds is not None and not isinstance(creds, Credentials):
            self._load: Callable[[], Credentials | None] | None = creds
            self._creds: Credentials | None = None
        else:
            self._load = None
            self._creds = None if creds == ANONYMOUS else creds
        self._creds_lock = threading.Lock()
        self._request_token = request_token
        self._lock = threading.Lock()
        self._scheme: str | None = None          # "basic" | "bearer", learned from a challenge
        self._bearer: dict[str, str] = {}        # realm, service
        self._tokens: dict[str, tuple[str, float]] = {}  # scope -> (token, refresh_at)
        self._refresh_token: str | None = None   # a newer refresh token the token server handed back
        #: number of tokens fetched (observability, tests)
        self.tokens_fetched = 0

    @property
    def creds(self) -> Credentials | None:
        """The credentials (looked up on first use; a failed lookup raises and is tried again)."""
        if self._load is None:
            return self._creds
        with self._creds_lock:
            if self._load is not None:
                c = self._load()
                self._creds = None if (c is None or c == ANONYMOUS) else c
                self._load = None
            return self._creds

    def header(self, scope: str) -> str | None:
        """The Authorization header for a request in ``scope`` (None: send none)."""
        with self._lock:
            scheme = self._scheme
            tok = self._tokens.get(scope)
        if scheme == "basic":
            creds = self.creds
            return creds.basic_header() if creds and creds.has_basic else None
        if scheme == "bearer":
            if tok and time.monotonic() < tok[1]:
                return "Bearer " + tok[0]
            return "Bearer " + self.fetch_token(scope)  # proactive refresh
        return None

    def on_challenge(self, header: str, scope: str, sent: str | None) -> bool:
        """Learn from a 401's ``WWW-Authenticate``; True if a retry with new credentials makes sense."""
        scheme, params = parse_www_authenticate(header)
        if scheme == "basic":
            with self._lock:
                self._scheme = "basic"
            creds = self.creds
            return creds is not None and creds.has_basic and not (sent or "").startswith("Basic ")
        if scheme == "bearer" and params.get("realm"):
            with self._lock:
                self._scheme = "bearer"
                self._bearer = {"realm": params["realm"], "service": params.get("service", "")}
            self.fetch_token(scope, params.get("scope"))
            return True
        return False

    def fetch_token(self, scope: str, extra_scope: str | None = None) -> str:
        """A new bearer token for ``scope`` (plus the challenge's ``extra_scope``), cached."""
        with self._lock:
            realm = self._bearer.get("realm")
            service = self._bearer.get("service")
        if not realm:
            raise BackendError(f"unauthorized: {self.name}: bearer challenge without realm")
        creds = self.creds
        if creds and urlsplit(realm).scheme != "https" and self.base.startswith("https:"):
            raise BackendError(f"unauthorized: {self.name}: refusing to send credentials to non-https "
                               f"token realm {realm}")
        scopes = scope.split()
        if extra_scope:
            scopes += [s for s in extra_scope.split() if s not in scopes]
        q = ([("service", service)] if service else []) + [("scope", s) for s in scopes]
        basic = {"Authorization": creds.basic_header()} if creds and creds.has_basic else {}
        started = time.monotonic()
        if creds and creds.identity_token:
            j = self._oauth_token(realm, service or "", scopes, q, creds, basic)
        else:
            j = self._request_token(realm, q, basic)
        token = j.get("token") or j.get("access_token") if isinstance(j, dict) else None
        if not token or not isinstance(token, str):
            raise BackendError(f"token server {realm}: no token in answer")
        try:
            ttl = float(j.get("expires_in") or 60)
        except (TypeError, ValueError):
            ttl = 60.0
        margin = min(10.0, ttl / 4)
        with self._lock:
            self._tokens[scope] = (token, started + ttl - margin)
            self.tokens_fetched += 1
        log.debug("%s: new token for %s (expires in %.0fs)", self.name, scope, ttl)
        return token

    def _oauth_token(self, realm: str, service: str, scopes: list[str], q: list, creds: Credentials,
                     basic: dict):
        """The token server's answer to an OAuth2 ``grant_type=refresh_token`` POST (the identity
        token, or the newer refresh token it handed back before); GET if it takes no POSTs."""
        with self._lock:
            refresh = self._refresh_token or creds.identity_token
        form = {"grant_type": "refresh_token", "refresh_token": refresh, "service": service,
                "scope": " ".join(scopes), "client_id": OAUTH_CLIENT_ID}
        try:
            j = self._request_token(realm, q, {}, form=form)
        except OAuthUnsupported:
            log.debug("%s: token server %s takes no OAuth2 POST; asking with GET", self.name, realm)
            return self._request_token(realm, q, basic)
        new = j.get("refresh_token") if isinstance(j, dict) else None
        if isinstance(new, str) and new:
            with self._lock:
                self._refresh_token = new
        return j
