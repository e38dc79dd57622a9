"""Chunk digesters of RAFS v6, with Nydus's ids: blake3 (the default, as in Nydus) and sha256.

A chunk digest is always 32 bytes and always covers the chunk's *plain*
(uncompressed) bytes, so the same content has the same digest whatever the
compressor; that is what chunk deduplication keys on. blake3 comes from the
`blake3` package (a declared dependency), imported when first asked for.

Both hashers release the GIL on large inputs, so digests parallelise in threads.
"""
from __future__ import annotations

import hashlib

from .errors import RafsError

DIGESTERS = ("blake3", "sha256")
# Nydus's ids (utils/src/digest.rs: Blake3 0, Sha256 1), as the blob table stores them.
DIGESTER_IDS = {"blake3": 0, "sha256": 1}
DIGESTER_NAMES = {v: k for k, v in DIGESTER_IDS.items()}
DIGEST_SIZE = 32


class DigesterUnavailable(RafsError, ImportError):
    """A digester whose optional package is not installed."""


def check_digester(name: str) -> str:
    """Return `name` if it is a known digester, else raise ValueError listing the choices."""
    if name not in DIGESTER_IDS:
        raise ValueError(
            f"unknown digester {name!r}; choose one of: {', '.join(DIGESTERS)}")
    return name


def _blake3():
    try:
        import blake3
    except ImportError:
        raise DigesterUnavailable(
            "the blake3 digester needs the 'blake3' package, which is not installed: "
            "run `pip install blake3` (or `pip install -e .`), or use the sha256 digester") from None
    return blake3.blake3


def hasher(name: str):
    """A new incremental hasher (`update(data)`, `digest()`, `hexdigest()`) for `name`."""
    if name == "sha256":
        return hashlib.sha256()
    if name == "blake3":
        return _blake3()()
    check_digester(name)
    raise AssertionError("unreachable")


def digest(name: str, data: bytes) -> bytes:
    """The 32-byte digest of `data` with digester `name`."""
    if name == "sha256":
        return hashlib.sha256(data).digest()
    if name == "blake3":
        return _blake3()(data).digest()
    check_digester(name)
    raise AssertionError("unreachable")


def blake3_available() -> bool:
    """True if the optional blake3 digester can be used here."""
    try:
        _blake3()
    except DigesterUnavailable:
        return False
    return True
