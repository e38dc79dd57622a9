"""Registry authentication: credentials from docker's ``config.json``, ``WWW-Authenticate``
challenges, and the bearer tokens a client holds per scope.

Written from the Docker token authentication spec and the docker CLI's
``config.json`` format. Authentication is lazy: a request goes out
anonymously (or with what was learned before); a 401 challenge teaches the
scheme (`RegistryAuth.on_challenge`). Bearer tokens are cached per scope,
refreshed shortly before ``expires_in`` runs out, and fetched again when the
registry answers 401. Credentials are never sent to a non-https token realm of
an https registry. *Where* the Authorization header may go (the registry's own
origin only) is the client's business (`rafs.image.client`).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

from rafs.errors import BackendError

from .refs import DOCKER_HUB_HOSTS

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- credentials

@dataclass(frozen=True)
class Credentials:
    """A user name and password (or token) for one registry host."""

    username: str
    password: str = field(repr=False)

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


#: Pass as ``auth=`` to never look at the docker config.
ANONYMOUS = Credentials("", "")


def _config_key_host(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``index.docker.io``; ``host:5000`` -> ``host:5000``."""
    k = key.strip()
    if "://" in k:
        k = k.split("://", 1)[1]
    return k.split("/", 1)[0].lower()


def docker_config_path(config_dir: str | None = None) -> str:
    d = config_dir or os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return os.path.join(d, "config.json")


def load_docker_credentials(host: str, *, config_dir: str | None = None) -> Credentials | None:
    """Credentials for ``host`` from docker's ``config.json`` (``$DOCKER_CONFIG`` or ``~/.docker``).

    Reads ``auths[HOST].auth`` (base64 ``user:password``) or ``username``/``password``.
    Keys may be written as URLs (``https://HOST/v1/``); any of Docker Hub's names finds
    credentials filed under another.  Credential helpers (``credsStore``/``credHelpers``)
    and ``identitytoken`` are not supported.
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
    auths = cfg.get("auths") if isinstance(cfg, dict) else None
    if not isinstance(auths, dict):
        return None
    want = host.lower()
    hub = want in DOCKER_HUB_HOSTS
    for key, entry in auths.items():
        kh = _config_key_host(key)
        if not (kh == want or (hub and kh in DOCKER_HUB_HOSTS)) or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                user, _, pw = base64.b64decode(entry["auth"]).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                log.warning("ignoring malformed auth for %s in %s", key, path)
                continue
            return Credentials(user, pw)
        if entry.get("username"):
            return Credentials(entry["username"], entry.get("password", ""))
    return None


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

#: ``request_token(realm, query, headers)``: the token server's JSON answer (BackendError otherwise).
TokenRequest = Callable[[str, list, dict], object]


class RegistryAuth:
    """What one client sends as ``Authorization``: basic credentials or a bearer token per scope,
    as the registry's challenges asked.  Thread-safe.

    ``creds`` None means anonymous.  ``request_token`` performs the token server's GET (the
    client's transport and retry loop); ``name`` and ``base`` (``https://HOST``) are for
    messages and the realm check.
    """

    def __init__(self, name: str, base: str, creds: Credentials | None, request_token: TokenRequest):
        self.name = name
        self.base = base
        self.creds = creds
        self._request_token = request_token
        self._lock = threading.Lock()
        self._scheme: str | None = None          # "basic" | "bearer", learned from a challenge
        self._bearer: dict[str, str] = {}        # realm, service
        self._tokens: dict[str, tuple[str, float]] = {}  # scope -> (token, refresh_at)
        #: number of tokens fetched (observability, tests)
        self.tokens_fetched = 0

    def header(self, scope: str) -> str | None:
        """The Authorization header for a request in ``scope`` (None: send none)."""
        with self._lock:
            scheme = self._scheme
            tok = self._tokens.get(scope)
        if scheme == "basic":
            return self.creds.basic_header() if self.creds else None
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
            return self.creds is not None and not (sent or "").startswith("Basic ")
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
        if self.creds and urlsplit(realm).scheme != "https" and self.base.startswith("https:"):
            raise BackendError(f"unauthorized: {self.name}: refusing to send credentials to non-https "
                               f"token realm {realm}")
        scopes = scope.split()
        if extra_scope:
            scopes += [s for s in extra_scope.split() if s not in scopes]
        q = ([("service", service)] if service else []) + [("scope", s) for s in scopes]
        headers = {"Authorization": self.creds.basic_header()} if self.creds else {}
        started = time.monotonic()
        j = self._request_token(realm, q, headers)
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
