"""Image references: ``oci:DIR[:TAG|@DIGEST]``, ``[docker://]HOST/REPO[:TAG][@DIGEST]``.

There is no default registry: a registry reference must start with a host,
recognised (like docker does) by a '.' or ':' in the first path component, or
by being ``localhost``.

Docker Hub is the one registry with other names: ``docker.io/app`` means the
repository ``library/app`` on ``registry-1.docker.io`` (`registry_endpoint`),
and a docker config may file its credentials under any of `DOCKER_HUB_HOSTS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

from .digests import is_digest

DEFAULT_TAG = "latest"

#: Every name of Docker Hub's registry.
DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"})
#: The host Docker Hub's registry API answers on.
DOCKER_HUB_REGISTRY = "registry-1.docker.io"
_HUB_SHORT_NAMES = frozenset({"docker.io", "index.docker.io"})   # written in references, not served

_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_HOST_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::[0-9]+)?$")


class RefError(ValueError):
    """A reference string that cannot be parsed."""


def registry_endpoint(host: str, repo: str) -> tuple[str, str]:
    """The (host, repository) to send API requests to: Docker Hub's short names resolved
    (``docker.io/app`` -> ``registry-1.docker.io``, ``library/app``); others as they are."""
    if host in _HUB_SHORT_NAMES:
        return DOCKER_HUB_REGISTRY, repo if "/" in repo else "library/" + repo
    return host, repo


@dataclass(frozen=True)
class ImageRef:
    kind: Literal["oci", "registry"]
    path: str | None = None        # oci: the layout directory, as given
    host: str | None = None        # registry: HOST[:PORT]
    repo: str | None = None        # registry: repository path
    tag: str | None = None         # DEFAULT_TAG when neither tag nor digest was given
    digest: str | None = None      # "sha256:..." when given
    #: False when the tag was filled in as the default (an ``oci:DIR`` with one image uses it whatever its name)
    tag_given: bool = True

    def __str__(self) -> str:
        if self.kind == "oci":
            s = f"oci:{self.path}"
        else:
            s = f"{self.host}/{self.repo}"
        if self.tag and (self.tag_given or not self.digest):
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s

    @property
    def reference(self) -> str:
        """What to resolve: the digest if given, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def is_registry(self) -> bool:
        return self.kind == "registry"

    @property
    def endpoint(self) -> tuple[str, str]:
        """A registry reference's (host, repository) to send requests to (see `registry_endpoint`)."""
        return registry_endpoint(self.host, self.repo)

    def with_tag(self, tag: str) -> "ImageRef":
        if not _TAG_RE.match(tag):
            raise RefError(f"invalid tag {tag!r}")
        return replace(self, tag=tag, digest=None, tag_given=True)

    def with_digest(self, digest: str) -> "ImageRef":
        if not is_digest(digest):
            raise RefError(f"invalid digest {digest!r}")
        return replace(self, digest=digest)


def _split_digest(s: str, whole: str) -> tuple[str, str | None]:
    if "@" not in s:
        return s, None
    s, _, digest = s.rpartition("@")
    if not is_digest(digest):
        raise RefError(f"{whole!r}: invalid digest {digest!r} (want sha256:<64 lowercase hex>)")
    return s, digest


def parse_ref(ref: "str | ImageRef") -> ImageRef:
    """Parse an image reference (an ImageRef is returned as is)."""
    if isinstance(ref, ImageRef):
        return ref
    if not isinstance(ref, str) or not ref.strip():
        raise RefError("empty image reference")
    s = ref.strip()
    if s.startswith("oci:"):
        return _parse_oci(s[4:], ref)
    if s.startswith("docker://"):
        s = s[len("docker://"):]
    elif "://" in s:
        raise RefError(f"{ref!r}: unsupported transport {s.split('://', 1)[0]!r} (use oci: or docker://)")
    return _parse_registry(s, ref)


def _parse_oci(rest: str, whole: str) -> ImageRef:
    rest, digest = _split_digest(rest, whole)
    tag = None
    if ":" in rest:
        head, _, tail = rest.rpartition(":")
        if "/" not in tail:  # otherwise the ':' belongs to the directory name
            if not _TAG_RE.match(tail):
                raise RefError(f"{whole!r}: invalid tag {tail!r}")
            rest, tag = head, tail
    if not rest:
        raise RefError(f"{whole!r}: missing OCI layout directory")
    return ImageRef("oci", path=rest, tag=tag or (None if digest else DEFAULT_TAG), digest=digest,
                    tag_given=tag is not None)


def _parse_registry(s: str, whole: str) -> ImageRef:
    s, digest = _split_digest(s, whole)
    host, slash, rest = s.partition("/")
    if not slash or not (("." in host) or (":" in host) or host == "localhost"):
        raise RefError(
            f"{whole!r}: no registry host (there is no default registry; write HOST/REPO[:TAG], "
            f"e.g. localhost:5000/{s}, or oci:DIR[:TAG])")
    if not _HOST_RE.match(host):
        raise RefError(f"{whole!r}: invalid registry host {host!r}")
    tag = None
    if ":" in rest:
        rest, _, tag = rest.rpartition(":")
        if not _TAG_RE.match(tag):
            raise RefError(f"{whole!r}: invalid tag {tag!r}")
    if not _REPO_RE.match(rest):
        raise RefError(f"{whole!r}: invalid repository name {rest!r} (lowercase, [a-z0-9._-/])")
    return ImageRef("registry", host=host, repo=rest, tag=tag or (None if digest else DEFAULT_TAG),
                    digest=digest, tag_given=tag is not None)
