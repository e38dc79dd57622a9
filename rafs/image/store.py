"""One interface over the two places images live: a registry and an OCI image layout.

    with open_store("oci:/tmp/img:v1", create=True) as dst, open_store("localhost:5000/app:v1") as src:
        top = src.resolve()
        for platform, desc in src.manifests_for(top, "linux/amd64"): ...
        dst.put_blob(digest, path); dst.tag(manifest_bytes, media_type)   # tag() is the LAST step

Every read is verified against its digest (whole reads at once, streams at EOF
and again when the ``with`` block is left normally, which reads what is left).
Every write of an OCI layout is `rafs.osutil.atomic_write` (temp file in the same
directory, fsync, rename, fsync of the directory), so readers never see a
half-written blob or ``index.json``; ``tag()`` publishes atomically.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from abc import ABC, abstractmethod
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, ContextManager, Iterator

from rafs.errors import BackendError, FormatError, IntegrityError, NotFound
from rafs.osutil import atomic_file, atomic_write

from . import media
from .auth import ANONYMOUS
from .client import RegistryClient
from .digests import SHA256_PREFIX, check_digest, sha256_digest
from .hosts import RegistryHost, describe, resolve_hosts
from .platform import Platform
from .refs import ImageRef, parse_ref
from .stream import IO_BLOCK, verified_stream

log = logging.getLogger(__name__)

OCI_LAYOUT_VERSION = "1.0.0"
_MAX_NESTING = 4


# --------------------------------------------------------------------------- descriptor

@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    urls: list[str] | None = None

    def to_json(self) -> dict:
        d: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            d["urls"] = list(self.urls)
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform:
            d["platform"] = self.platform.to_json()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Descriptor":
        """Validate an untrusted descriptor (FormatError on anything odd)."""
        if not isinstance(d, dict):
            raise FormatError(f"descriptor is not an object: {d!r}")
        mt, dg, size = d.get("mediaType", ""), d.get("digest"), d.get("size")
        if not isinstance(mt, str):
            raise FormatError(f"descriptor mediaType is not a string: {mt!r}")
        check_digest(dg)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError(f"descriptor {dg}: invalid size {size!r}")
        ann = d.get("annotations") or {}
        if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
            raise FormatError(f"descriptor {dg}: annotations must map strings to strings")
        plat = Platform.from_json(d["platform"]) if d.get("platform") else None
        urls = d.get("urls")
        if urls is not None and not (isinstance(urls, list) and all(isinstance(u, str) for u in urls)):
            raise FormatError(f"descriptor {dg}: invalid urls")
        return cls(mt, dg, size, dict(ann), plat, urls)


def _manifest_kind(media_type: str, data: bytes | None = None) -> str:
    """'index', 'manifest' or '' — from the media type, else from the JSON's shape."""
    if media_type in media.INDEX_TYPES:
        return "index"
    if media_type in media.IMAGE_MANIFEST_TYPES:
        return "manifest"
    if data is not None:
        try:
            j = json.loads(data)
        except ValueError:
            return ""
        if isinstance(j, dict):
            mt = j.get("mediaType")
            if mt in media.INDEX_TYPES:
                return "index"
            if mt in media.IMAGE_MANIFEST_TYPES:
                return "manifest"
            if isinstance(j.get("manifests"), list):
                return "index"
            if isinstance(j.get("layers"), list) and isinstance(j.get("config"), dict):
                return "manifest"
    return ""


def _parse_json(data: bytes, what: str) -> dict:
    try:
        j = json.loads(data)
    except ValueError as e:
        raise FormatError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(j, dict):
        raise FormatError(f"{what} is not a JSON object")
    return j


# --------------------------------------------------------------------------- interface

class ImageStore(ABC):
    """A registry repository or an OCI layout, seen through one image reference."""

    ref: ImageRef

    def __enter__(self) -> "ImageStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    @property
    @abstractmethod
    def location(self) -> str:
        """Human-readable place for messages."""

    @abstractmethod
    def resolve(self) -> Descriptor:
        """The ref's top manifest or index."""

    @abstractmethod
    def get_bytes(self, digest: str) -> bytes:
        """A small blob or a manifest, fully read and verified."""

    @abstractmethod
    def open_blob(self, digest: str) -> ContextManager[BinaryIO]:
        """Stream a blob; IntegrityError at EOF (or on normal exit of the with block) on mismatch."""

    @abstractmethod
    def has_blob(self, digest: str) -> bool:
        ...

    @abstractmethod
    def read_range(self, digest: str, offset: int, size: int) -> bytes:
        """Exactly `size` bytes of a blob from `offset` (not digest-checked: callers check chunks)."""

    @abstractmethod
    def put_blob(self, digest: str, path: str | os.PathLike) -> bool:
        """Store a local file as a blob (streamed); False if it was already there."""

    @abstractmethod
    def put_bytes(self, digest: str, data: bytes) -> bool:
        ...

    @abstractmethod
    def put_manifest(self, data: bytes, media_type: str) -> str:
        """Store a manifest or index by digest (untagged); returns the digest."""

    @abstractmethod
    def tag(self, data: bytes, media_type: str) -> None:
        """Publish ``data`` under the ref's tag — the last step of a conversion."""

    # -- helpers common to both
    def get_json(self, digest: str) -> dict:
        return _parse_json(self.get_bytes(digest), f"{self.location}@{digest}")

    def manifests_for(self, desc: Descriptor, platform: "str | Platform | None" = None
                      ) -> list[tuple[Platform | None, Descriptor]]:
        """[(platform, image manifest descriptor)] for an index (nested indexes flattened,
        attestation entries with platform unknown/unknown skipped) or a single manifest
        (its platform read from its config).  ``platform`` filters; [] if nothing matches."""
        want = Platform.parse(platform) if isinstance(platform, str) else platform
        out: list[tuple[Platform | None, Descriptor]] = []
        self._collect(desc, want, out, 0)
        return out

    def _collect(self, desc: Descriptor, want: Platform | None, out: list, depth: int) -> None:
        if depth > _MAX_NESTING:
            raise FormatError(f"{self.location}: indexes nested deeper than {_MAX_NESTING}")
        data = self.get_bytes(desc.digest)
        kind = _manifest_kind(desc.media_type, data)
        what = f"{self.location}@{desc.digest}"
        j = _parse_json(data, what)
        if kind == "index":
            entries = j.get("manifests")
            if not isinstance(entries, list):
                raise FormatError(f"{what}: index without a manifests list")
            for e in entries:
                d = Descriptor.from_json(e)
                self._note_manifest(d)
                k = _manifest_kind(d.media_type)
                if k == "index":
                    self._collect(d, want, out, depth + 1)
                    continue
                if k != "manifest":
                    continue  # artifacts and other things an image tool does not run
                plat = d.platform
                if plat is None:
                    plat = self._config_platform(d)
                if plat is not None and (plat.os == "unknown" or plat.architecture == "unknown"):
                    continue  # e.g. buildkit attestation manifests
                if want is None or (plat is not None and plat.matches(want)):
                    out.append((plat, d))
        elif kind == "manifest":
            d = Descriptor(desc.media_type or j.get("mediaType") or media.OCI_MANIFEST, desc.digest, desc.size,
                           dict(desc.annotations), desc.platform, desc.urls)
            plat = desc.platform or self._platform_of_manifest(j, what)
            if want is None or (plat is not None and plat.matches(want)):
                out.append((plat, d))
        else:
            raise FormatError(f"{what}: not an image manifest or index (media type {desc.media_type!r})")

    def _config_platform(self, desc: Descriptor) -> Platform | None:
        what = f"{self.location}@{desc.digest}"
        return self._platform_of_manifest(_parse_json(self.get_bytes(desc.digest), what), what)

    def _platform_of_manifest(self, manifest: dict, what: str) -> Platform | None:
        cfg = manifest.get("config")
        if not isinstance(cfg, dict):
            raise FormatError(f"{what}: manifest without config")
        cd = Descriptor.from_json(cfg)
        c = self.get_json(cd.digest)
        if not isinstance(c.get("os"), str) or not isinstance(c.get("architecture"), str):
            return None
        return Platform(c["os"], c["architecture"], c.get("variant") or None, c.get("os.version") or None)

    def _note_manifest(self, desc: Descriptor) -> None:
        """Hook: a digest that is known to be a manifest (registries keep those apart from blobs)."""


# --------------------------------------------------------------------------- OCI layout

class OciLayoutStore(ImageStore):
    """An OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/sha256/``)."""

    def __init__(self, ref: ImageRef, *, create: bool = False):
        self.ref = ref
        self.root = os.path.abspath(ref.path)
        layout_file = os.path.join(self.root, "oci-layout")
        if create:
            os.makedirs(os.path.join(self.root, "blobs", "sha256"), exist_ok=True)
            if not os.path.exists(layout_file):
                atomic_write(layout_file, json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}).encode())
            if not os.path.exists(self._index_path):
                self._write_index({"schemaVersion": 2, "mediaType": media.OCI_INDEX, "manifests": []})
        try:
            with open(layout_file, "rb") as f:
                version = json.load(f).get("imageLayoutVersion")
        except FileNotFoundError:
            raise BackendError(f"not an OCI image layout: {self.root} (no oci-layout file)") from None
        except (OSError, ValueError, AttributeError) as e:
            raise BackendError(f"not an OCI image layout: {self.root} (bad oci-layout file: {e})") from None
        if not isinstance(version, str) or not version.startswith("1."):
            raise BackendError(f"OCI image layout {self.root}: unsupported imageLayoutVersion {version!r}")

    @property
    def location(self) -> str:
        return f"oci:{self.root}"

    @property
    def _index_path(self) -> str:
        return os.path.join(self.root, "index.json")

    def blob_path(self, digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", check_digest(digest))

    def _missing(self, digest: str) -> NotFound:
        return NotFound(f"blob {digest} not found in OCI layout {self.root}")

    # -- index.json
    def read_index(self) -> dict:
        try:
            with open(self._index_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise BackendError(f"OCI image layout {self.root} has no index.json") from None
        idx = _parse_json(data, f"{self._index_path}")
        if not isinstance(idx.get("manifests", []), list):
            raise FormatError(f"{self._index_path}: manifests is not a list")
        return idx

    def tags(self) -> list[str]:
        return [e.get("annotations", {}).get(media.ANNOTATION_REF_NAME)
                for e in self.read_index().get("manifests", [])
                if isinstance(e, dict) and isinstance(e.get("annotations"), dict)
                and e["annotations"].get(media.ANNOTATION_REF_NAME)]

    def _write_index(self, idx: dict) -> None:
        atomic_write(self._index_path, json.dumps(idx, indent=2).encode() + b"\n")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    # -- reads
    def resolve(self) -> Descriptor:
        entries = self.read_index().get("manifests", [])
        ref = self.ref
        if ref.digest:
            for e in entries:
                if isinstance(e, dict) and e.get("digest") == ref.digest:
                    return Descriptor.from_json(e)
            data = self.get_bytes(ref.digest)  # not listed, but maybe present as a blob
            j = _parse_json(data, f"{self.location}@{ref.digest}")
            kind = _manifest_kind(j.get("mediaType", ""), data)
            if not kind:
                raise FormatError(f"{self.location}@{ref.digest} is not a manifest or index")
            return Descriptor(j.get("mediaType") or (media.OCI_INDEX if kind == "index" else media.OCI_MANIFEST),
                              ref.digest, len(data))
        named = [e for e in entries if isinstance(e, dict)
                 and (e.get("annotations") or {}).get(media.ANNOTATION_REF_NAME) == ref.tag]
        if named:
            return Descriptor.from_json(named[-1])
        if not ref.tag_given and len(entries) == 1:
            return Descriptor.from_json(entries[0])
        tags = ", ".join(t for t in self.tags()) or "none"
        raise NotFound(f"tag {ref.tag!r} not found in OCI layout {self.root} (tags: {tags})")

    def get_bytes(self, digest: str) -> bytes:
        try:
            with open(self.blob_path(digest), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise self._missing(digest) from None
        got = sha256_digest(data)
        if got != digest:
            raise IntegrityError(f"blob {digest} in OCI layout {self.root}: content has digest {got}")
        return data

    def open_blob(self, digest: str) -> ContextManager[BinaryIO]:
        try:
            f = open(self.blob_path(digest), "rb", buffering=0)
        except FileNotFoundError:
            raise self._missing(digest) from None
        return verified_stream(f, digest, f"{digest} in OCI layout {self.root}")

    def has_blob(self, digest: str) -> bool:
        return os.path.isfile(self.blob_path(digest))

    def read_range(self, digest: str, offset: int, size: int) -> bytes:
        try:
            fd = os.open(self.blob_path(digest), os.O_RDONLY)
        except FileNotFoundError:
            raise self._missing(digest) from None
        try:
            data = os.pread(fd, size, offset)
        finally:
            os.close(fd)
        if len(data) != size:
            raise BackendError(f"blob {digest} in OCI layout {self.root}: range {offset}+{size} past its end")
        return data

    # -- writes
    def _store(self, digest: str, fill) -> bool:
        dst = self.blob_path(digest)
        if os.path.isfile(dst):
            return False
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with atomic_file(dst) as out:         # a mismatch below leaves nothing behind
            h = hashlib.sha256()
            fill(out, h)
            got = SHA256_PREFIX + h.hexdigest()
            if got != digest:
                raise IntegrityError(f"blob for {digest} has digest {got}; not stored in {self.root}")
        return True

    def put_blob(self, digest: str, path: str | os.PathLike) -> bool:
        def fill(out, h):
            with open(path, "rb") as src:
                while True:
                    b = src.read(IO_BLOCK)
                    if not b:
                        break
                    h.update(b)
                    out.write(b)
        return self._store(digest, fill)

    def put_bytes(self, digest: str, data: bytes) -> bool:
        def fill(out, h):
            h.update(data)
            out.write(data)
        return self._store(digest, fill)

    def put_manifest(self, data: bytes, media_type: str) -> str:
        digest = sha256_digest(data)
        self.put_bytes(digest, data)
        return digest

    def tag(self, data: bytes, media_type: str) -> None:
        digest = self.put_manifest(data, media_type)
        ref = self.ref
        if ref.digest and not ref.tag_given and ref.digest != digest:
            raise IntegrityError(f"cannot publish {digest} as {ref}: digests differ")
        name = ref.tag if ref.tag_given or not ref.digest else None
        with self._locked():
            idx = self.read_index()
            entries = [e for e in idx.get("manifests", []) if not (
                isinstance(e, dict) and (
                    (name is not None and (e.get("annotations") or {}).get(media.ANNOTATION_REF_NAME) == name)
                    or (name is None and e.get("digest") == digest and not e.get("annotations"))))]
            desc = Descriptor(media_type, digest, len(data), {media.ANNOTATION_REF_NAME: name} if name else {})
            entries.append(desc.to_json())
            idx["manifests"] = entries
            idx.setdefault("schemaVersion", 2)
            self._write_index(idx)


# --------------------------------------------------------------------------- registry

class RegistryStore(ImageStore):
    """One repository of a registry (manifests by tag/digest, blobs) via RegistryClient.

    The hosts to talk to are containerd's (`rafs.image.hosts.resolve_hosts`: ``hosts_dir``,
    ``plain_http``, ``insecure``), or ``hosts``: tags are resolved by the first host with the
    ``resolve`` capability that answers, content is read from the ``pull`` hosts in order (a mirror
    that fails, lacks the content or serves bytes that fail verification is left for the next
    one, finally the origin), and pushes go to the first ``push`` host (`client`).
    """

    def __init__(self, ref: ImageRef, *, plain_http: bool = False, client: RegistryClient | None = None,
                 hosts_dir: str | None = None, insecure: bool = False, hosts: list[RegistryHost] | None = None,
                 **client_kw):
        self.ref = ref
        host, repo = ref.endpoint
        if client is not None:
            self.client = client
            self._clients: list[tuple[RegistryHost, RegistryClient]] = [(client.endpoint, client)]
        else:
            if hosts is None:
                hosts = resolve_hosts(ref.host, hosts_dir, plain_http=plain_http, insecure=insecure)
            if len(hosts) > 1:
                log.debug("%s: %s", self.location, describe(hosts))
            mirror_kw = {**client_kw, "retries": 0}  # a failing mirror is left for the next host at once
            if client_kw.get("auth") is not None:   # explicit credentials are the origin's only
                mirror_kw["auth"] = ANONYMOUS
            self._clients = []
            try:
                for h in hosts:
                    self._clients.append((h, RegistryClient(h.host, repo, endpoint=h,
                                                            **(mirror_kw if h.mirror else client_kw))))
            except BaseException:
                self.close()
                raise
            pushers = [c for h, c in self._clients if h.can("push")]
            self.client = pushers[0] if pushers else self._clients[-1][1]
        self._manifests: dict[str, bytes] = {}   # digest -> verified bytes (small)
        self._manifest_digests: set[str] = set()
        self._down: set[int] = set()             # ids of mirror clients that failed: not asked again

    def _hosts(self, capability: str) -> list[tuple[RegistryHost, RegistryClient]]:
        out = [(h, c) for h, c in self._clients if h.can(capability) and id(c) not in self._down]
        if not out:
            h = self._clients[-1][0]
            raise BackendError(f"{self.location}: no host may {capability} ({h.config_hint()} gives the "
                               f"capability to none of {', '.join(x.url for x, _ in self._clients)})")
        return out

    def _first(self, capability: str, what: str, fn):
        """``fn(client)`` on the hosts with ``capability`` in order: the first answer."""
        hosts = self._hosts(capability)
        for i, (h, c) in enumerate(hosts):
            try:
                return fn(c)
            except (BackendError, IntegrityError) as e:
                if i == len(hosts) - 1:
                    raise
                self._next_host(h, what, e)

    def _next_host(self, h: RegistryHost, what: str, e: BaseException) -> None:
        """A mirror did not deliver: one that lacks the content is asked again next time, one that failed
        is not (for this store's life: a conversion or a pull)."""
        if isinstance(e, NotFound):
            log.debug("%s from %s: %s; trying the next host", what, h.url, e)
            return
        log.warning("%s from %s: %s; using the next host from now on", what, h.url, e)
        self._down.update(id(c) for x, c in self._clients if x is h)

    @property
    def location(self) -> str:
        return f"{self.ref.host}/{self.ref.repo}"

    def close(self) -> None:
        for _, c in self._clients:
            c.close()

    def _note_manifest(self, desc: Descriptor) -> None:
        self._manifest_digests.add(desc.digest)

    def resolve(self) -> Descriptor:
        ref = self.ref.reference
        data, media_type, digest = self._first("pull" if self.ref.digest else "resolve", f"manifest {ref}",
                                               lambda c: c.get_manifest(ref))
        self._manifests[digest] = data
        self._manifest_digests.add(digest)
        return Descriptor(media_type, digest, len(data))

    def get_manifest(self, digest: str) -> tuple[bytes, str]:
        check_digest(digest)
        data, media_type, _ = self._first("pull", f"manifest {digest}", lambda c: c.get_manifest(digest))
        self._manifests[digest] = data
        return data, media_type

    def get_bytes(self, digest: str, media_type: str | None = None) -> bytes:
        check_digest(digest)
        if digest in self._manifests:
            return self._manifests[digest]
        if digest in self._manifest_digests or (media_type and media_type in media.MANIFEST_TYPES):
            return self.get_manifest(digest)[0]
        try:
            return self._first("pull", f"blob {digest}", lambda c: c.get_blob(digest))
        except NotFound:
            try:  # registries keep manifests apart from blobs
                return self.get_manifest(digest)[0]
            except NotFound:
                raise NotFound(f"blob not found: {self.location}@{digest}") from None

    def open_blob(self, digest: str) -> ContextManager[BinaryIO]:
        hosts = self._hosts("pull")
        if len(hosts) == 1:
            return hosts[0][1].open_blob(digest)
        return self._open_first(hosts, digest)

    @contextmanager
    def _open_first(self, hosts, digest: str) -> Iterator[BinaryIO]:
        for i, (h, c) in enumerate(hosts):       # the stream opens at the first host that has it
            stack = ExitStack()
            try:
                f = stack.enter_context(c.open_blob(digest))
            except (BackendError, IntegrityError) as e:
                stack.close()
                if i == len(hosts) - 1:
                    raise
                self._next_host(h, f"blob {digest}", e)
                continue
            with stack:
                yield f
            return

    def has_blob(self, digest: str) -> bool:
        """Whether the push host (the target of put_blob) has it."""
        return self.client.head_blob(digest) is not None

    def put_blob(self, digest: str, path: str | os.PathLike) -> bool:
        return self.client.push_blob(digest, path)

    def put_bytes(self, digest: str, data: bytes) -> bool:
        return self.client.push_blob(digest, data)

    def mount_blob(self, digest: str, from_repo: str) -> bool:
        return self.client.mount_blob(digest, from_repo)

    def read_range(self, digest: str, offset: int, size: int) -> bytes:
        return self._first("pull", f"blob {digest}", lambda c: c.read_range(digest, offset, size))

    def put_manifest(self, data: bytes, media_type: str) -> str:
        digest = self.client.put_manifest(sha256_digest(data), data, media_type)
        self._manifest_digests.add(digest)
        return digest

    def tag(self, data: bytes, media_type: str) -> None:
        ref = self.ref
        if ref.tag_given or not ref.digest:
            self.client.put_manifest(ref.tag, data, media_type)
        else:  # a digest-only ref: "publishing" means the content must be exactly that digest
            self.client.put_manifest(ref.digest, data, media_type)


def open_store(ref: "str | ImageRef", *, plain_http: bool = False, create: bool = False,
               hosts_dir: str | None = None, insecure: bool = False, **client_kw) -> ImageStore:
    """An ImageStore for ``oci:DIR[:TAG]`` or ``[docker://]HOST/REPO[:TAG|@DIGEST]``.

    ``create`` makes a new OCI layout if needed (ignored for registries); ``hosts_dir``
    (containerd's hosts directory; None: none), ``plain_http`` and ``insecure`` choose the
    registry hosts and their TLS (`rafs.image.hosts`); ``client_kw`` goes to RegistryClient
    (auth, timeout, retries, ...).
    """
    r = parse_ref(ref)
    if r.kind == "oci":
        return OciLayoutStore(r, create=create)
    return RegistryStore(r, plain_http=plain_http, hosts_dir=hosts_dir, insecure=insecure, **client_kw)
