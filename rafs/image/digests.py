"""sha256 digests and blob ids: the one place that says what a valid one is.

A *digest* is ``sha256:<64 lowercase hex>`` (manifests, descriptors, image
references); a *blob id* is the 64 lowercase hex digits alone (bootstraps,
caches, backends, peers). Both come from untrusted input (manifests, bootstraps,
HTTP paths) and end up in URLs and file names, so nothing else is accepted.
"""
from __future__ import annotations

import hashlib
import re

from rafs.errors import FormatError

#: The only algorithm pynydus accepts in a digest.
SHA256_PREFIX = "sha256:"
_HEX64 = re.compile(r"[0-9a-f]{64}")


def is_hex_id(s: object) -> bool:
    """64 lowercase hex digits (a blob id: a digest without ``sha256:``)."""
    return isinstance(s, str) and _HEX64.fullmatch(s) is not None


def is_digest(s: object) -> bool:
    """``sha256:<64 lowercase hex>``."""
    return isinstance(s, str) and s.startswith(SHA256_PREFIX) and is_hex_id(s[len(SHA256_PREFIX):])


def check_digest(digest: str) -> str:
    """Return the hex part of a ``sha256:<64 lowercase hex>`` digest; FormatError otherwise."""
    if not is_digest(digest):
        raise FormatError(f"invalid digest {digest!r}: only sha256:<64 lowercase hex> is supported")
    return digest[len(SHA256_PREFIX):]


def normalize_blob_id(blob_id: str) -> str:
    """'sha256:<hex>' or '<hex>' (any case, surrounding blanks) -> lowercase hex; ValueError otherwise."""
    if not isinstance(blob_id, str):
        raise ValueError(f"a blob id is a string, got {type(blob_id).__name__}")
    v = blob_id.strip().lower().removeprefix(SHA256_PREFIX)
    if not is_hex_id(v):
        raise ValueError(f"not a blob id: {blob_id!r} (want 64 hex digits or 'sha256:' + 64 hex digits)")
    return v


def sha256_digest(data: bytes) -> str:
    """The digest of ``data``: ``sha256:<hex>``."""
    return SHA256_PREFIX + hashlib.sha256(data).hexdigest()
