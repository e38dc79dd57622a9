"""Mirrors (registry mirrors, pull-through caches, Dragonfly dfdaemon) first, then the origin.

`MirrorConfig` is one mirror as Nydus users write it (nydusd's backend `mirrors`), and the one type
every source of mirrors produces: `nydusify mount --mirror SPEC` and the snapshotter's
`[[backend.mirrors]]` (`parse_mirror`, `MirrorConfig.from_dict`), containerd's hosts.toml
(`rafs.image.hosts`' `[host."…"]`, turned into MirrorConfigs by `rafs.storage.factory.hosts_mirror`).
`rafs.storage.factory` builds the backends from it (the transport: `mirror_endpoint`).

    host                    "http://127.0.0.1:65001": scheme://host[:port] (no scheme: https); a path
                            is containerd's (the API under PATH/v2, or PATH with override_path)
    headers                 {"X-Dragonfly-Registry": "https://index.docker.io"}: sent to the mirror only
    auth_through            false (default): the mirror never gets credentials (Dragonfly's dfdaemon
                            relays to the registry on its own); true: the mirror is a registry that
                            authenticates itself, answered with the credentials docker's config holds
                            for the *mirror's* host. The origin's credentials never go to a mirror.
    ping_url                health check of a disabled mirror (default HOST/v2/); any answer below 500
                            brings it back
    health_check_interval   seconds between health checks (default 5)
    failure_limit           failures in a row that disable the mirror until a health check passes
                            (default 5)
    capabilities            what it may do, as containerd's hosts.toml says: "pull" (blobs, manifests
                            by digest), "resolve" (tags); default both
    kind                    "registry" (a mirror serving the registry's paths) or "proxy" (an HTTP proxy,
                            e.g. dfdaemon's proxy, through which the origin is reached)
    skip_verify, ca, client TLS of an https mirror (containerd hosts.toml: skip_verify, ca, client)
    override_path           containerd hosts.toml: the host's path is the API root itself

`MirrorBackend` reads through the first usable mirror; on any `BackendError` the next one is tried
and finally the origin, whose answer (or error) is final. A mirror that failed is skipped for
`penalty` seconds (a short time: long enough not to pay a refused connection or a 500 on every
chunk, short enough to come back soon); after `failure_limit` failures in a row it is disabled
until its health check answers (checked every `health_check_interval` seconds by a background
thread, only while it is disabled; without a ping it is tried again after that interval). A mirror
that does not have a blob (404) is skipped for that blob only, for `penalty` seconds, and that is
not a failure.

Mirrors are untrusted like every backend: the blob cache verifies each chunk, and when bytes fail
verification it calls `read_from_origin`, which counts a failure against the mirror that served
them (if this thread's last read of that range came from one) and reads the origin directly.

`source_stats()` reports bytes / requests / errors per mirror and for the origin (keys "mirror
<name>" and "origin <name>"), so a mount's stats show how much the mirrors saved.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Sequence
from urllib.parse import urlsplit

from rafs.errors import BackendError, NotFound

from .base import BlobBackend

log = logging.getLogger(__name__)

DEFAULT_PENALTY = 5.0
DEFAULT_HEALTH_CHECK_INTERVAL = 5.0
DEFAULT_FAILURE_LIMIT = 5
MIRROR_KINDS = ("registry", "proxy")
CAPABILITIES = ("pull", "resolve", "push", "referrers")       # containerd's hosts.toml capabilities

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")        # an HTTP header name (RFC 9110 token)
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


# --------------------------------------------------------------------------- config

@dataclass
class MirrorConfig:
    """One mirror (see the module's docstring for the fields)."""
    host: str
    headers: dict[str, str] = field(default_factory=dict)
    auth_through: bool = False
    ping_url: str = ""
    health_check_interval: float = DEFAULT_HEALTH_CHECK_INTERVAL
    failure_limit: int = DEFAULT_FAILURE_LIMIT
    capabilities: list[str] = field(default_factory=lambda: ["pull", "resolve"])
    kind: str = "registry"
    skip_verify: bool = False
    ca: list[str] = field(default_factory=list)             # CA certificate files (PEM)
    client: list[list[str]] = field(default_factory=list)   # client certificates: [cert] or [cert, key]
    override_path: bool = False     # containerd: the host's path is the API root (else path + "/v2")

    def __post_init__(self) -> None:
        host = str(self.host or "").strip()
        if not host:
            raise ValueError("a mirror needs a host (e.g. http://127.0.0.1:65001)")
        if "://" not in host:
            host = "https://" + host                 # as containerd and docker take a bare host
        parts = urlsplit(host)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"mirror host {self.host!r}: want http://HOST[:PORT] or https://HOST[:PORT]")
        if parts.query or parts.fragment:
            raise ValueError(f"mirror host {self.host!r}: want scheme://host[:port][/path]")
        self.host = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        if self.kind not in MIRROR_KINDS:
            raise ValueError(f"mirror {self.host}: kind must be one of {', '.join(MIRROR_KINDS)}, "
                             f"got {self.kind!r}")
        if not isinstance(self.headers, dict):
            raise ValueError(f"mirror {self.host}: headers must be a table of NAME = VALUE")
        self.headers = {str(k): str(v) for k, v in self.headers.items()}
        for k, v in self.headers.items():
            if not _TOKEN.match(k) or "\r" in v or "\n" in v:
                raise ValueError(f"mirror {self.host}: bad header {k!r}: {v!r}")
        self.auth_through = _bool(self.auth_through, f"mirror {self.host}: auth_through")
        self.skip_verify = _bool(self.skip_verify, f"mirror {self.host}: skip_verify")
        self.override_path = _bool(self.override_path, f"mirror {self.host}: override_path")
        try:
            self.health_check_interval = float(self.health_check_interval)
            self.failure_limit = int(self.failure_limit)
        except (TypeError, ValueError):
            raise ValueError(f"mirror {self.host}: health_check_interval and failure_limit must be "
                             "numbers") from None
        if self.health_check_interval <= 0 or self.failure_limit < 1:
            raise ValueError(f"mirror {self.host}: health_check_interval must be > 0 seconds and "
                             "failure_limit >= 1")
        if self.ping_url:
            p = urlsplit(self.ping_url)
            if p.scheme not in ("http", "https") or not p.netloc:
                raise ValueError(f"mirror {self.host}: ping_url {self.ping_url!r} is not an http(s) URL")
        if isinstance(self.capabilities, str):
            self.capabilities = [self.capabilities]
        self.capabilities = list(self.capabilities)
        bad = [c for c in self.capabilities if c not in CAPABILITIES]
        if bad:
            raise ValueError(f"mirror {self.host}: unknown capabilities {bad} "
                             f"(known: {', '.join(CAPABILITIES)})")
        self.ca = [self.ca] if isinstance(self.ca, str) else list(self.ca)
        if isinstance(self.client, str):
            self.client = [[self.client]]
        self.client = [[c] if isinstance(c, str) else list(c) for c in self.client]

    # -- derived
    @property
    def scheme(self) -> str:
        return urlsplit(self.host).scheme

    @property
    def address(self) -> str:
        """"host[:port]" (the RegistryClient's host)."""
        return urlsplit(self.host).netloc

    @property
    def plain_http(self) -> bool:
        return self.scheme == "http"

    @property
    def api_root(self) -> str:
        """The path the registry API lives under: "/v2", or the host's path (+ "/v2" unless it ends so
        or `override_path`), as containerd reads a hosts.toml URL."""
        path = urlsplit(self.host).path
        return path if self.override_path or path.endswith("/v2") else path + "/v2"

    @property
    def health_url(self) -> str:
        return self.ping_url or f"{urlsplit(self.host).scheme}://{self.address}{self.api_root}/"

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    # -- (de)serialisation: Nydus's field names
    @classmethod
    def from_dict(cls, d: dict) -> "MirrorConfig":
        """A mirror from a JSON object / TOML table with nydusd's field names (and ours above)."""
        if not isinstance(d, dict):
            raise ValueError(f"a mirror is a table / JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"mirror: unknown keys {', '.join(map(repr, unknown))} "
                             f"(known: {', '.join(sorted(known))})")
        if "host" not in d:
            raise ValueError("a mirror needs a host (e.g. http://127.0.0.1:65001)")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        """The one-line JSON form `parse_mirror` reads (what the snapshotter passes to --mirror)."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)


def _bool(v, what: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in _TRUE + _FALSE:
        return v.strip().lower() in _TRUE
    raise ValueError(f"{what} must be true or false, got {v!r}")


_SPEC_KEYS = {"host", "header", "auth_through", "ping_url", "health_check_interval", "failure_limit",
              "capabilities", "kind", "skip_verify", "ca", "client", "override_path"}


def parse_mirror(spec: str) -> MirrorConfig:
    """A mirror from one `--mirror` value:

        http://127.0.0.1:65001                                  just the host
        host=http://127.0.0.1:65001,header=X-Dragonfly-Registry:https://index.docker.io,
            auth_through=false,ping_url=http://127.0.0.1:40901/server/ping,health_check_interval=5,
            failure_limit=5                                      KEY=VALUE,...  (header repeatable;
                                                                 capabilities=pull+resolve)
        {"host": "http://127.0.0.1:65001", "headers": {...}}    a JSON object (nydusd's fields)
    """
    text = spec.strip()
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--mirror {spec!r}: bad JSON: {e}") from None
        return MirrorConfig.from_dict(d)
    first = text.split(",", 1)[0]
    if "=" not in first or first.split("=", 1)[0].strip() not in _SPEC_KEYS:
        return MirrorConfig(text)                              # a bare host
    kw: dict = {"headers": {}, "ca": [], "client": []}
    for item in text.split(","):
        if not item.strip():
            continue
        k, sep, v = item.partition("=")
        k, v = k.strip(), v.strip()
        if not sep or k not in _SPEC_KEYS:
            raise ValueError(f"--mirror {spec!r}: {item!r} is not one of "
                             f"{', '.join(sorted(_SPEC_KEYS))} = VALUE")
        if k == "header":
            name, colon, value = v.partition(":")
            if not colon:
                raise ValueError(f"--mirror {spec!r}: header={v!r}: want header=NAME:VALUE")
            kw["headers"][name.strip()] = value.strip()
        elif k == "capabilities":
            kw["capabilities"] = [c for c in re.split(r"[+| ]", v) if c]
        elif k == "ca":
            kw["ca"].append(v)
        elif k == "client":
            kw["client"].append(v.split(":", 1))
        else:
            if k in kw:
                raise ValueError(f"--mirror {spec!r}: {k} given twice")
            kw[k] = v
    return MirrorConfig.from_dict(kw)


def parse_mirrors(specs: Sequence[str] | None) -> list[MirrorConfig]:
    """`parse_mirror` of every repeated `--mirror` value, in order."""
    return [parse_mirror(s) for s in specs or ()]


# --------------------------------------------------------------------------- backend

@dataclass(frozen=True)
class MirrorHealth:
    """How one mirror's health is judged: `failure_limit` failures in a row disable it; then `ping()`
    (True: healthy) is asked every `interval` seconds until it says so (None: the mirror itself is
    tried again after `interval`)."""
    failure_limit: int = DEFAULT_FAILURE_LIMIT
    interval: float = DEFAULT_HEALTH_CHECK_INTERVAL
    ping: Callable[[], bool] | None = None


class _State:
    __slots__ = ("failures", "down_until", "disabled", "disabled_at", "next_check")

    def __init__(self) -> None:
        self.failures = 0           # in a row
        self.down_until = 0.0       # clock time: skipped until then after a failure
        self.disabled = False       # failure_limit reached: until the health check passes
        self.disabled_at = 0.0
        self.next_check = 0.0


class MirrorBackend(BlobBackend):
    """`mirrors` in order of preference, then `origin`. Owns (closes) all of them."""

    retry = None                       # the wrapped backends retry on their own

    def __init__(self, mirrors: Sequence[BlobBackend], origin: BlobBackend, *,
                 penalty: float = DEFAULT_PENALTY, health: Sequence[MirrorHealth] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        if penalty < 0:
            raise ValueError(f"penalty must be >= 0 seconds, got {penalty}")
        self.mirrors = list(mirrors)
        self.origin = origin
        self.penalty = penalty
        self.health = list(health) if health is not None else [MirrorHealth() for _ in self.mirrors]
        if len(self.health) != len(self.mirrors):
            raise ValueError("one MirrorHealth per mirror")
        self._clock = clock
        self._lock = threading.Lock()
        self._state = [_State() for _ in self.mirrors]
        self._missing: dict[tuple[int, str], float] = {}      # (mirror, blob) -> clock time
        self._fallbacks = 0                                   # reads the origin served
        self._tls = threading.local()                         # last (blob, offset, size, mirror)
        self._closed = threading.Event()
        self._checker: threading.Thread | None = None

    @property
    def name(self) -> str:
        names = ", ".join(m.name for m in self.mirrors)
        return f"mirrors [{names}] -> {self.origin.name}"

    # -- mirror health
    def _usable(self, i: int, blob_id: str, now: float) -> bool:
        with self._lock:
            st = self._state[i]
            if st.disabled:
                h = self.health[i]
                if h.ping is not None or now < st.disabled_at + h.interval:
                    return False
                st.disabled_at = now            # no ping: try the mirror itself once per interval
            elif st.down_until > now:
                return False
            until = self._missing.get((i, blob_id))
            if until is not None:
                if until > now:
                    return False
                del self._missing[(i, blob_id)]
            return True

    def _succeeded(self, i: int) -> None:
        st = self._state[i]
        if st.failures or st.disabled:
            with self._lock:
                if st.disabled:
                    log.info("mirror %s answers again; enabled", self.mirrors[i].name)
                st.failures, st.disabled, st.down_until = 0, False, 0.0

    def _penalize(self, i: int, blob_id: str, e: BackendError) -> None:
        now = self._clock()
        name, h = self.mirrors[i].name, self.health[i]
        with self._lock:
            if isinstance(e, NotFound):
                self._missing[(i, blob_id)] = now + self.penalty
                log.info("mirror %s does not have blob %s (%s); using the next source", name, blob_id[:12], e)
                return
            st = self._state[i]
            st.failures += 1
            if st.failures < h.failure_limit:
                st.down_until = now + self.penalty
                log.warning("mirror %s failed (%s; %d of %d in a row); using the next source, skipping it "
                            "for %.0fs", name, e, st.failures, h.failure_limit, self.penalty)
                return
            first = not st.disabled
            st.disabled, st.disabled_at, st.next_check = True, now, time.monotonic() + h.interval
            start_checker = h.ping is not None and self._checker is None and not self._closed.is_set()
            if start_checker:
                self._checker = threading.Thread(target=self._check_loop, name="mirror-health", daemon=True)
        if first:
            log.warning("mirror %s failed %d times in a row (last: %s); disabled until %s", name, st.failures, e,
                        "its health check passes" if h.ping is not None else f"tried again in {h.interval:.0f}s")
        if start_checker:
            self._checker.start()

    def check_health(self, *, due_only: bool = True) -> list[int]:
        """Ask the health check of every disabled mirror that has one (and is due, with `due_only`);
        enable those that pass. Returns the indices of the mirrors still disabled with a ping."""
        now = time.monotonic()
        with self._lock:
            due = [i for i, st in enumerate(self._state)
                   if st.disabled and self.health[i].ping is not None and (st.next_check <= now or not due_only)]
        for i in due:
            try:
                ok = bool(self.health[i].ping())
            except Exception as e:             # a ping that cannot be sent is a failed ping
                log.debug("mirror %s health check: %s", self.mirrors[i].name, e)
                ok = False
            with self._lock:
                st = self._state[i]
                if ok:
                    st.failures, st.disabled, st.down_until = 0, False, 0.0
                else:
                    st.next_check = time.monotonic() + self.health[i].interval
            if ok:
                log.info("mirror %s passed its health check; enabled", self.mirrors[i].name)
        with self._lock:
            return [i for i, st in enumerate(self._state) if st.disabled and self.health[i].ping is not None]

    def _check_loop(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                waiting = [(self._state[i].next_check, i) for i in range(len(self.mirrors))
                           if self._state[i].disabled and self.health[i].ping is not None]
                if not waiting:
                    self._checker = None        # the next disabled mirror starts another one
                    return
            self._closed.wait(max(0.0, min(waiting)[0] - time.monotonic()))
            if not self._closed.is_set():
                self.check_health()

    def _through(self, blob_id: str, call: Callable[[BlobBackend], object], remember=None):
        now = self._clock()
        for i, m in enumerate(self.mirrors):
            if not self._usable(i, blob_id, now):
                continue
            try:
                result = call(m)
            except BackendError as e:
                self._penalize(i, blob_id, e)
                continue
            self._succeeded(i)
            self._tls.last = (remember, i) if remember is not None else None
            return result
        with self._lock:
            self._fallbacks += 1
        self._tls.last = None
        return call(self.origin)

    # -- BlobBackend
    def _read_range(self, blob_id: str, offset: int, size: int) -> bytes:
        return self._through(blob_id, lambda b: b.read_range(blob_id, offset, size),
                             remember=(blob_id, offset, size))

    def _blob_size(self, blob_id: str) -> int:
        return self._through(blob_id, lambda b: b.blob_size(blob_id))

    def read_from_origin(self, blob_id: str, offset: int, size: int) -> bytes | None:
        last = getattr(self._tls, "last", None)
        if last is not None:
            (b, o, s), i = last
            if b == blob_id and o <= offset and offset + size <= o + s:
                self._penalize(i, blob_id, BackendError(
                    f"served bytes of blob sha256:{blob_id} that failed verification"))
        self._tls.last = None
        return self.origin.read_range(blob_id, offset, size)

    def source_stats(self) -> dict:
        now = self._clock()
        out = {}
        for i, m in enumerate(self.mirrors):
            for name, st in m.source_stats().items():
                with self._lock:
                    s = self._state[i]
                    st["penalized"] = s.disabled or s.down_until > now
                    st["disabled"] = s.disabled
                    st["failures_in_a_row"] = s.failures
                out[f"mirror {name}"] = st
        for name, st in self.origin.source_stats().items():
            with self._lock:
                st["fallbacks"] = self._fallbacks
            out[f"origin {name}"] = st
        return out

    def close(self) -> None:
        self._closed.set()
        checker = self._checker
        if checker is not None and checker is not threading.current_thread():
            checker.join(timeout=5)
        for b in [*self.mirrors, self.origin]:
            try:
                b.close()
            except Exception as e:              # closing must not hide the others
                log.warning("closing %s: %s", b.name, e)
