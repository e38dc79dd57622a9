"""A client for the OCI distribution / Docker Registry HTTP API v2: `RegistryClient`.

Used by the image store (pull source images, push converted ones) and by the
lazy mount daemon's registry backend (HTTP Range GETs of blob chunks). Written
from the OCI distribution spec (endpoints, upload protocol); authentication is
`rafs.image.auth`, the verified blob stream `rafs.image.stream`.

Behaviour worth knowing:

* Basic credentials and bearer tokens are sent only to the registry's own
  origin (scheme + host + port); redirects are followed by hand and lose the
  Authorization header when they leave that origin (blob GETs are often
  redirected to object storage). A challenge from any other origin is never
  answered.
* Transient failures (connection refused/reset, timeouts, truncated bodies,
  HTTP 5xx and 429) are retried by one loop (`RegistryClient._retrying`):
  ``retries`` more attempts (default `RETRIES`), sleeping ``backoff`` (default
  `BACKOFF`) doubled each time, capped at `MAX_BACKOFF`, jittered; then a
  :class:`~rafs.errors.BackendError` says what failed and why. A blob stream
  is one retried operation: a connection lost mid-stream is resumed with a
  Range request, and the stream's resumes and re-requests share its
  ``retries``.
* A 404 is :class:`~rafs.errors.NotFound`.
* Where and how to connect is a `rafs.image.hosts.RegistryHost` (``endpoint``; default
  ``https://HOST/v2``): containerd's hosts.toml gives the scheme, API root, headers, ``ns`` of a
  mirror and TLS. Connections trust the system CA store plus the host's ``ca`` (`rafs.image.tls`);
  a certificate problem is one :class:`~rafs.image.tls.TLSError` line naming the host and what to
  configure. A host allowed to (``http_fallback``) that answers TLS in plain HTTP is spoken to over
  http from then on.
* Everything read is verified: manifests fetched by digest, whole blobs (at
  EOF).  A mismatch is an :class:`~rafs.errors.IntegrityError`, never retried.
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import random
import re
import time
from contextlib import contextmanager
from typing import BinaryIO, Callable, Iterator
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests
import urllib3

from rafs.errors import BackendError, FormatError, IntegrityError, NotFound

from .auth import Credentials, OAuthUnsupported, RegistryAuth, load_docker_credentials
from .digests import check_digest, is_digest, sha256_digest
from .hosts import RegistryHost
from .media import MANIFEST_ACCEPT, MANIFEST_TYPES
from .stream import IO_BLOCK, verified_stream
from .tls import is_plain_http_answer, new_session, tls_error

log = logging.getLogger(__name__)

#: Manifests larger than this are refused (the OCI spec asks registries to take 4 MiB).
MAX_MANIFEST_SIZE = 8 << 20
#: Blobs at least this large are uploaded in PATCH chunks of UPLOAD_CHUNK_SIZE.
CHUNKED_UPLOAD_THRESHOLD = 256 << 20
UPLOAD_CHUNK_SIZE = 64 << 20
_MAX_REDIRECTS = 5
USER_AGENT = "pynydus/0.1"

#: Retries of a transient failure (more attempts after the first), by default.
RETRIES = 3
#: The first retry's delay in seconds, by default; doubled for each further retry.
BACKOFF = 0.25
#: No delay between two attempts is longer than this (seconds, before jitter).
MAX_BACKOFF = 8.0


# --------------------------------------------------------------------------- helpers

class _RetryableStatus(Exception):
    """An HTTP status worth another try (5xx, 429)."""


class _Truncated(Exception):
    """A body that ended before the promised length."""


_TRANSIENT = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
    _RetryableStatus,
    _Truncated,
)


def _no_auth(r):  # stops requests from adding ~/.netrc credentials on its own
    return r


def _add_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    q = parse_qsl(parts.query, keep_blank_values=True)
    q.extend(params.items())
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(q), parts.fragment))


def _origin(url: str) -> tuple[str, str]:
    p = urlsplit(url)
    return p.scheme.lower(), p.netloc.lower()


def _error_detail(resp: requests.Response) -> str:
    """The registry's ``{"errors":[{code,message,detail}]}`` as one line (or a snippet)."""
    try:
        body = resp.content[:4096]
    except Exception:  # body already consumed or connection gone
        return ""
    try:
        errs = json.loads(body).get("errors") or []
        parts = []
        for e in errs[:3]:
            s = f"{e.get('code', '')}: {e.get('message', '')}"
            if e.get("detail") and not isinstance(e["detail"], (dict, list)):
                s += f" ({e['detail']})"
            parts.append(s)
        if parts:
            return "; ".join(parts)
    except (ValueError, AttributeError, TypeError):
        pass
    return body[:200].decode("utf-8", "replace").strip()


def _error_codes(resp: requests.Response) -> set[str]:
    try:
        return {e.get("code", "") for e in json.loads(resp.content[:4096]).get("errors") or []}
    except Exception:
        return set()


def _read_exact(raw, n: int) -> bytes:
    """Read up to n bytes from a urllib3 response (fewer only at EOF)."""
    parts = []
    left = n
    while left > 0:
        b = raw.read(min(left, IO_BLOCK), decode_content=False)
        if not b:
            break
        parts.append(b)
        left -= len(b)
    return b"".join(parts)


def _skip(raw, n: int) -> int:
    left = n
    while left > 0:
        b = raw.read(min(left, IO_BLOCK), decode_content=False)
        if not b:
            break
        left -= len(b)
    return n - left


_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")


class _FileSlice:
    """A request body streaming ``length`` bytes of a file from ``start`` (never all in memory)."""

    def __init__(self, path: str, start: int, length: int):
        self._f = open(path, "rb")
        self._f.seek(start)
        self._left = length
        self._len = length

    def __len__(self) -> int:
        return self._len

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        if n is None or n < 0 or n > self._left:
            n = self._left
        b = self._f.read(min(n, IO_BLOCK))
        if not b:
            raise BackendError(f"{self._f.name}: file shrank while uploading")
        self._left -= len(b)
        return b

    def close(self) -> None:
        self._f.close()


# --------------------------------------------------------------------------- client

class RegistryClient:
    """One repository on one registry.  Thread-safe; reuse it (connections are pooled).

    ``auth``: explicit :class:`Credentials`; ``None`` reads docker's config.json
    for ``host``; :data:`ANONYMOUS` never sends credentials.
    """

    def __init__(
        self,
        host: str,
        repo: str,
        *,
        plain_http: bool = False,
        auth: Credentials | None = None,
        timeout: tuple[float, float] = (5, 30),
        retries: int = RETRIES,
        backoff: float = BACKOFF,
        config_dir: str | None = None,
        session: requests.Session | None = None,
        pool_size: int = 16,
        headers: dict[str, str] | None = None,
        endpoint: RegistryHost | None = None,
    ):
        # endpoint: where and how to connect (rafs.image.hosts: scheme, API root, TLS, headers, ns);
        # default: https://HOST/v2 (http:// with plain_http), the system CA store trusted
        if endpoint is None:
            endpoint = RegistryHost(host=host, scheme="http" if plain_http else "https")
        self.endpoint = endpoint
        self.host = host = endpoint.host
        # sent with every request to this origin only (a mirror's; hosts.toml's [header])
        self.headers = {**endpoint.headers(), **dict(headers or {})}
        self.repo = repo
        self.base = endpoint.origin            # scheme://host
        self.api = endpoint.url                # the API root: scheme://host/v2 (or hosts.toml's path)
        self._ns = endpoint.ns                 # ?ns=NAMESPACE on requests to a mirror (as containerd)
        self._http_fallback = endpoint.http_fallback
        if endpoint.dial_timeout:
            timeout = (endpoint.dial_timeout, timeout[1])
        self.timeout = timeout
        self.retries = max(0, int(retries))
        self.backoff = backoff
        # None: docker's config (credHelpers, credsStore, auths), looked up when a challenge asks
        creds = (lambda: load_docker_credentials(host, config_dir=config_dir)) if auth is None else auth
        self._auth = RegistryAuth(self.name, self.base, creds, self._token_json)
        if session is None:
            session = new_session(endpoint, pool_size=pool_size)     # TLS: rafs.image.tls
            session.headers["User-Agent"] = USER_AGENT
            self._own_session = True
        else:
            new_session(endpoint, pool_size=pool_size, session=session)
            self._own_session = False
        self._session = session

    @property
    def tokens_fetched(self) -> int:
        """Bearer tokens fetched so far (observability, tests)."""
        return self._auth.tokens_fetched

    # -- lifecycle
    def close(self) -> None:
        if self._own_session:
            self._session.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RegistryClient({self.base}/{self.repo})"

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repo}"

    def _url(self, kind: str, ref: str) -> str:
        return f"{self.api}/{self.repo}/{kind}/{ref}"

    def _scope(self, push: bool) -> str:
        return f"repository:{self.repo}:{'pull,push' if push else 'pull'}"

    # -- auth
    def _token_json(self, realm: str, query: list, headers: dict, form: dict | None = None):
        """GET a token from ``realm``, or POST ``form`` there (OAuth2; never redirected: the form
        holds a refresh token), retried like any request: the server's JSON answer."""
        creds = self._auth.creds

        def fn():
            try:
                if form is not None:
                    r = self._session.post(realm, data=form, headers=headers, timeout=self.timeout,
                                           auth=_no_auth, allow_redirects=False)
                else:
                    r = self._session.get(realm, params=query, headers=headers, timeout=self.timeout,
                                          auth=_no_auth)
            except requests.exceptions.InvalidURL as e:
                raise BackendError(f"unauthorized: {self.name}: bad token realm {realm!r}: {e}") from e
            with r:
                if r.status_code >= 500 or r.status_code == 429:
                    raise _RetryableStatus(f"HTTP {r.status_code} from token server {realm}")
                if form is not None and r.status_code in (404, 405):
                    raise OAuthUnsupported(f"token server {realm}: HTTP {r.status_code} to an OAuth2 POST")
                if r.status_code in (401, 403):
                    who = creds.describe() if creds else "anonymously"
                    raise BackendError(
                        f"unauthorized: token server {realm} refused {who} for {self.name} "
                        f"(HTTP {r.status_code}); check credentials for {self.host} in docker config")
                if r.status_code != 200:
                    raise BackendError(f"token server {realm}: HTTP {r.status_code} {_error_detail(r)}")
                try:
                    return r.json()
                except ValueError as e:
                    raise BackendError(f"token server {realm}: answer is not JSON") from e

        return self._retrying(f"token request to {realm}", fn)

    # -- transport
    def _send(self, method: str, url: str, *, headers: dict | None = None, body=None,
              stream: bool = False, push: bool = False, scope: str | None = None) -> requests.Response:
        """One request with auth handling and hand-followed redirects (no retries).

        ``body``: None, bytes, or a callable returning a fresh body (re-sendable after a 401).
        """
        scope = scope or self._scope(push)
        for attempt in range(2):
            sent = self._auth.header(scope)
            resp = self._send_follow(method, url, headers or {}, sent, body, stream)
            if resp.status_code == 401 and attempt == 0 and _origin(resp.url) == _origin(self.base):
                try:
                    retry = self._auth.on_challenge(resp.headers.get("WWW-Authenticate", ""), scope, sent)
                except BaseException:
                    resp.close()
                    raise
                if retry:
                    resp.close()
                    continue
            return resp  # the caller reports a remaining 401
        return resp  # pragma: no cover

    def _send_follow(self, method, url, headers, auth_header, body, stream) -> requests.Response:
        home = _origin(self.base)
        if self._ns and _origin(url) == home and "ns=" not in urlsplit(url).query:
            url = _add_query(url, ns=self._ns)
        for _ in range(_MAX_REDIRECTS + 1):
            h = {**self.headers, **headers} if _origin(url) == home else dict(headers)
            if auth_header and _origin(url) == home:
                h["Authorization"] = auth_header
            data = body() if callable(body) else body
            try:
                resp = self._session.request(method, url, headers=h, data=data, stream=stream,
                                             timeout=self.timeout, allow_redirects=False, auth=_no_auth)
            except requests.exceptions.SSLError as e:
                if not (self._http_fallback and _origin(url) == home and is_plain_http_answer(e)):
                    raise
                url = self._use_http(url)
                home = _origin(self.base)
                continue                     # the same request over http (hosts.toml / --*-insecure)
            finally:
                if data is not None and hasattr(data, "close"):
                    data.close()
            if resp.status_code in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                resp.close()
                url = urljoin(url, resp.headers["Location"])
                if resp.status_code == 303 or (resp.status_code in (301, 302) and method == "POST"):
                    method, body = "GET", None
                continue
            return resp
        raise BackendError(f"{method} {url}: more than {_MAX_REDIRECTS} redirects")

    def _use_http(self, url: str) -> str:
        """The registry answered TLS in plain HTTP and may be spoken to over http: from now on it is."""
        if self.base.startswith("https://"):
            log.info("%s answers in plain HTTP: speaking http to it", self.host)
            self.base = "http://" + self.host
            self.api = self.base + self.endpoint.path
            self._auth.base = self.base
        return "http://" + url[len("https://"):] if url.startswith("https://") else url

    def _retrying(self, what: str, fn: Callable, tries: "_Tries | None" = None):
        """``fn()``, retried on transient failures: the client's one retry loop.

        ``tries`` counts the failures of one operation across calls (a blob stream's
        resumes and re-requests share it); by default each call is an operation of its own.
        """
        tries = tries if tries is not None else _Tries()
        while True:
            if tries.failures:
                delay = min(self.backoff * (2 ** (tries.failures - 1)), MAX_BACKOFF) * (0.75 + random.random() / 2)
                log.debug("%s: %s; retry %d in %.2fs", what, tries.last, tries.failures, delay)
                time.sleep(delay)
            try:
                return fn()
            except requests.exceptions.SSLError as e:   # one line: the host and what to configure
                req = getattr(e, "request", None)
                host = urlsplit(req.url).netloc if req is not None and req.url else self.host
                raise tls_error(e, host, self.endpoint, what) from None
            except _TRANSIENT as e:
                tries.failures += 1
                tries.last = e
                if tries.failures > self.retries:
                    raise BackendError(f"{what}: {_describe(e)} (gave up after {tries.failures} attempts)") from e
            except (BackendError, IntegrityError, FormatError):
                raise
            except requests.RequestException as e:
                raise BackendError(f"{what}: {e}") from e

    def _check(self, resp: requests.Response, what: str, ok=(200,), not_found: str | None = None) -> None:
        code = resp.status_code
        if code in ok:
            return
        if code >= 500 or code == 429:
            raise _RetryableStatus(f"HTTP {code} {_error_detail(resp)}".strip())
        detail = _error_detail(resp)
        if code == 401:
            creds = self._auth.creds
            hint = (creds.describe() if creds
                    else f"no credentials for {self.host} in docker config")
            raise BackendError(f"unauthorized: {what} ({hint}) {detail}".strip())
        if code == 403:
            raise BackendError(f"denied: {what} {detail}".strip())
        if code == 404 and not_found:
            raise NotFound(not_found)
        if code == 400 and "DIGEST_INVALID" in _error_codes(resp):
            raise IntegrityError(f"{what}: registry says content does not match its digest ({detail})")
        raise BackendError(f"{what}: HTTP {code} {detail}".strip())

    # -- API
    def ping(self) -> None:
        """GET /v2/ (authenticating if asked); BackendError if the registry is not usable."""
        def fn():
            with self._send("GET", f"{self.api}/") as r:
                self._check(r, f"ping {self.api}/")
        self._retrying(f"ping {self.api}/", fn)

    def _ref_name(self, ref: str) -> str:
        return f"{self.name}{'@' if is_digest(ref) else ':'}{ref}"

    def get_manifest(self, ref: str) -> tuple[bytes, str, str]:
        """Manifest or index by tag or digest -> (bytes, media type, digest).  Verified if ``ref`` is a digest."""
        if ":" in ref:
            check_digest(ref)
        name = self._ref_name(ref)

        def fn():
            with self._send("GET", self._url("manifests", ref), headers={"Accept": MANIFEST_ACCEPT}, stream=True) as r:
                self._check(r, f"get manifest {name}", not_found=f"manifest not found: {name}")
                buf = bytearray()
                for piece in r.iter_content(65536):
                    buf += piece
                    if len(buf) > MAX_MANIFEST_SIZE:
                        raise BackendError(f"manifest {name} is larger than {MAX_MANIFEST_SIZE} bytes")
                return bytes(buf), r.headers.get("Content-Type", "")

        data, ctype = self._retrying(f"get manifest {name}", fn)
        digest = sha256_digest(data)
        if is_digest(ref) and digest != ref:
            raise IntegrityError(f"manifest {name}: content has digest {digest}")
        media_type = ctype.split(";", 1)[0].strip()
        if media_type not in MANIFEST_TYPES:
            try:
                mt = json.loads(data).get("mediaType")
            except (ValueError, AttributeError):
                mt = None
            if mt:
                media_type = mt
        return data, media_type, digest

    def head_manifest(self, ref: str) -> tuple[str, int] | None:
        """(digest, size) of a manifest if present, else None (no body transferred)."""
        name = self._ref_name(ref)

        def fn():
            with self._send("HEAD", self._url("manifests", ref), headers={"Accept": MANIFEST_ACCEPT}) as r:
                if r.status_code == 404:
                    return None
                self._check(r, f"head manifest {name}")
                return r.headers.get("Docker-Content-Digest", ""), int(r.headers.get("Content-Length") or 0)

        return self._retrying(f"head manifest {name}", fn)

    def put_manifest(self, ref: str, data: bytes, media_type: str) -> str:
        """PUT a manifest under a tag or its digest; returns its digest."""
        digest = sha256_digest(data)
        if is_digest(ref) and ref != digest:
            raise IntegrityError(f"manifest for {self.name}@{ref} has digest {digest}")
        name = self._ref_name(ref)

        def fn():
            with self._send("PUT", self._url("manifests", ref), headers={"Content-Type": media_type},
                            body=bytes(data), push=True) as r:
                self._check(r, f"put manifest {name}", ok=(200, 201, 202))

        self._retrying(f"put manifest {name}", fn)
        return digest

    def head_blob(self, digest: str) -> int | None:
        """Size of a blob if the repository has it, else None."""
        check_digest(digest)

        def fn():
            with self._send("HEAD", self._url("blobs", digest)) as r:
                if r.status_code == 404:
                    return None
                self._check(r, f"head blob {self.name}@{digest}")
                return int(r.headers.get("Content-Length") or 0)

        return self._retrying(f"head blob {self.name}@{digest}", fn)

    @contextmanager
    def open_blob(self, digest: str) -> Iterator[BinaryIO]:
        """Stream a blob.  Its sha256 is checked when the stream reaches EOF; leaving the
        ``with`` block normally reads the rest and checks too (IntegrityError).
        A connection lost mid-stream is resumed with a Range request."""
        check_digest(digest)
        with verified_stream(_BlobSource(self, digest), digest, f"{self.name}@{digest}") as f:
            yield f

    def get_blob(self, digest: str, *, max_size: int = 64 << 20) -> bytes:
        """A small blob (config, ...) fully in memory, verified."""
        with self.open_blob(digest) as f:
            data = f.read(max_size + 1)
            if len(data) > max_size:
                raise BackendError(f"blob {self.name}@{digest} is larger than {max_size} bytes")
        return data

    def read_range(self, digest: str, offset: int, size: int) -> bytes:
        """Exactly ``size`` bytes of a blob from ``offset`` (HTTP Range; a 200 answer is sliced).

        Not verified here (a range has no digest of its own): callers check chunk digests.
        """
        check_digest(digest)
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        if size == 0:
            return b""
        name = f"{self.name}@{digest}"
        what = f"read {size} bytes at {offset} of {name}"
        end = offset + size - 1

        def beyond(total) -> BackendError:
            return BackendError(f"{what}: range is beyond the end of the blob ({total} bytes)")

        def fn():
            with self._send("GET", self._url("blobs", digest), headers={"Range": f"bytes={offset}-{end}"},
                            stream=True) as r:
                if r.status_code == 416:
                    raise beyond(r.headers.get("Content-Range", "?").rpartition("/")[2])
                self._check(r, what, ok=(200, 206), not_found=f"blob not found: {name}")
                if r.status_code == 206:
                    m = _CONTENT_RANGE_RE.match(r.headers.get("Content-Range", ""))
                    if not m or int(m.group(1)) != offset:
                        raise BackendError(f"{what}: bad Content-Range {r.headers.get('Content-Range')!r}")
                    got_len = int(m.group(2)) - offset + 1
                    if got_len < size:
                        raise beyond(m.group(3))
                    data = _read_exact(r.raw, size)
                else:  # 200: the whole blob
                    total = r.headers.get("Content-Length")
                    if total is not None and int(total) < offset + size:
                        raise beyond(total)
                    if _skip(r.raw, offset) < offset:
                        raise _Truncated(f"body ended before offset {offset}")
                    data = _read_exact(r.raw, size)
                if len(data) < size:
                    raise _Truncated(f"got {len(data)} of {size} bytes")
                return data

        return self._retrying(what, fn)

    def _start_upload(self, params: dict | None = None, scope: str | None = None) -> requests.Response:
        url = f"{self.api}/{self.repo}/blobs/uploads/"
        if params:
            url = _add_query(url, **params)
        return self._send("POST", url, push=True, scope=scope, headers={"Content-Length": "0"})

    def push_blob(self, digest: str, source: str | os.PathLike | bytes, size: int | None = None, *,
                  chunk_size: int | None = None) -> bool:
        """Upload a blob unless present (then False).  ``source``: bytes or a file path (streamed).

        Files of ``CHUNKED_UPLOAD_THRESHOLD`` bytes or more (or any, if ``chunk_size`` is
        given) go up as PATCH chunks; others in one monolithic PUT.
        """
        check_digest(digest)
        is_bytes = isinstance(source, (bytes, bytearray, memoryview))
        actual = len(source) if is_bytes else os.path.getsize(source)
        if size is not None and size != actual:
            raise BackendError(f"push {digest}: size {size} given, source has {actual} bytes")
        if is_bytes and sha256_digest(bytes(source)) != digest:
            raise IntegrityError(f"push {digest}: data has digest {sha256_digest(bytes(source))}")
        if self.head_blob(digest) is not None:
            return False
        name = f"{self.name}@{digest}"
        what = f"push blob {name}"
        if chunk_size is None and actual >= CHUNKED_UPLOAD_THRESHOLD:
            chunk_size = UPLOAD_CHUNK_SIZE

        def body(start: int, length: int):
            if is_bytes:
                return bytes(source[start:start + length])
            return lambda: _FileSlice(os.fspath(source), start, length)

        def fn():
            with self._start_upload() as r:
                self._check(r, what, ok=(202,))
                loc = urljoin(r.url, r.headers.get("Location", ""))
            octet = {"Content-Type": "application/octet-stream"}
            if chunk_size and actual > 0:
                pos = 0
                while pos < actual:
                    n = min(chunk_size, actual - pos)
                    hdrs = dict(octet, **{"Content-Range": f"{pos}-{pos + n - 1}", "Content-Length": str(n)})
                    with self._send("PATCH", loc, headers=hdrs, body=body(pos, n), push=True) as r:
                        self._check(r, what, ok=(202,))
                        loc = urljoin(r.url, r.headers.get("Location") or loc)
                    pos += n
                with self._send("PUT", _add_query(loc, digest=digest), headers=octet, push=True) as r:
                    self._check(r, what, ok=(201,))
            else:
                hdrs = dict(octet, **{"Content-Length": str(actual)})
                with self._send("PUT", _add_query(loc, digest=digest), headers=hdrs,
                                body=body(0, actual), push=True) as r:
                    self._check(r, what, ok=(201,))

        self._retrying(what, fn)
        return True

    def mount_blob(self, digest: str, from_repo: str) -> bool:
        """Cross-repository mount (same registry); True if the registry mounted it."""
        check_digest(digest)
        scope = f"{self._scope(True)} repository:{from_repo}:pull"
        what = f"mount {digest} from {from_repo} into {self.name}"

        def fn():
            with self._start_upload({"mount": digest, "from": from_repo}, scope=scope) as r:
                self._check(r, what, ok=(201, 202))
                if r.status_code == 201:
                    return True
                loc = r.headers.get("Location")
            if loc:  # the registry opened an upload instead: cancel it
                try:
                    self._send("DELETE", urljoin(self.base, loc), push=True).close()
                except requests.RequestException:
                    pass
            return False

        return self._retrying(what, fn)

    def list_tags(self) -> list[str]:
        tags: list[str] = []
        url = f"{self.api}/{self.repo}/tags/list"
        while url:
            def fn(u=url):
                with self._send("GET", u) as r:
                    self._check(r, f"list tags of {self.name}", not_found=f"repository not found: {self.name}")
                    return r.json(), r.links.get("next", {}).get("url")
            j, nxt = self._retrying(f"list tags of {self.name}", fn)
            tags += j.get("tags") or []
            url = urljoin(url, nxt) if nxt else None
        return tags


def _describe(e: BaseException | None) -> str:
    if isinstance(e, requests.exceptions.ConnectTimeout):
        return f"connect timed out ({e})"
    if isinstance(e, requests.ConnectionError):
        return f"connection failed ({e})"
    if isinstance(e, (requests.Timeout, urllib3.exceptions.ReadTimeoutError, TimeoutError)):
        return f"timed out ({e})"
    return str(e) or type(e).__name__


class _Tries:
    """Failures so far of one retried operation (see `RegistryClient._retrying`)."""

    def __init__(self) -> None:
        self.failures = 0
        self.last: BaseException | None = None


class _BlobSource(io.RawIOBase):
    """Raw bytes of one blob by GET; a connection broken mid-stream is resumed with a Range
    request from where it broke.  Checks the size the registry announced; the digest is
    `verified_stream`'s job."""

    def __init__(self, client: RegistryClient, digest: str):
        super().__init__()
        self._c = client
        self._digest = digest
        self._name = f"{client.name}@{digest}"
        self._tries = _Tries()             # resumes and re-requests of this stream share the retries
        self._pos = 0
        self._size: int | None = None
        self._resp: requests.Response | None = None
        self._error: BaseException | None = None
        self._done = False
        self._resp = self._c._retrying(self._what(), self._open, self._tries)

    def readable(self) -> bool:
        return True

    def _what(self) -> str:
        return f"get blob {self._name}" + (f" from offset {self._pos}" if self._pos else "")

    def _open(self) -> requests.Response:
        """One GET from the current position (a Range request past 0)."""
        pos, what = self._pos, self._what()
        hdrs = {"Range": f"bytes={pos}-"} if pos else {}
        r = self._c._send("GET", self._c._url("blobs", self._digest), headers=hdrs, stream=True)
        try:
            self._c._check(r, what, ok=(200, 206), not_found=f"blob not found: {self._name}")
            if r.status_code == 206:
                m = _CONTENT_RANGE_RE.match(r.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != pos:
                    raise BackendError(f"{what}: bad Content-Range {r.headers.get('Content-Range')!r}")
                size = int(m.group(3)) if m.group(3) != "*" else None
            else:
                cl = r.headers.get("Content-Length")
                size = int(cl) if cl is not None else None
                if pos and _skip(r.raw, pos) < pos:
                    raise _Truncated(f"body ended before offset {pos}")
        except BaseException:
            r.close()
            raise
        if size is not None:
            if self._size is not None and size != self._size:
                r.close()
                raise BackendError(f"get blob {self._name}: size changed from {self._size} to {size}")
            self._size = size
        return r

    def _read(self, n: int) -> bytes:
        if self._resp is None:             # broken before: resume where it broke
            self._resp = self._open()
        try:
            return self._resp.raw.read(n, decode_content=False)
        except BaseException:
            self._resp.close()
            self._resp = None
            raise

    def readinto(self, b) -> int:
        if self._error is not None:
            raise self._error
        if self._done:
            return 0
        want = min(len(b), IO_BLOCK)
        if want == 0:
            return 0
        try:
            data = self._c._retrying(self._what(), lambda: self._read(want), self._tries)
        except BackendError as e:
            self._error = e
            raise
        n = len(data)
        if n == 0:
            if self._size is not None and self._pos < self._size:
                self._error = BackendError(f"get blob {self._name}: ended at {self._pos} of {self._size} bytes")
                raise self._error
            self._done = True
            return 0
        if self._size is not None and self._pos + n > self._size:
            self._error = IntegrityError(f"blob {self._name}: more bytes than the announced {self._size}")
            raise self._error
        b[:n] = data
        self._pos += n
        return n

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
        super().close()
