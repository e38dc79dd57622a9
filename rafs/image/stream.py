"""The verified stream: a blob read through it has its sha256 checked at EOF.

`verified_stream(raw, digest, name)` is the one way pynydus streams a blob it
trusts by digest, from an OCI layout file or from a registry (whose raw source,
`rafs.image.client`, resumes broken connections underneath). Leaving the
``with`` block normally reads what is left and checks too, so a caller that
stops early still learns of a mismatch; a mismatch is an
`~rafs.errors.IntegrityError` and every later read raises it again. Errors of
the raw stream pass through as they are.
"""

from __future__ import annotations

import hashlib
import io
from contextlib import contextmanager
from typing import BinaryIO, Iterator

from rafs.errors import IntegrityError

from .digests import SHA256_PREFIX

#: Read size of streams (and of the buffer over them).
IO_BLOCK = 1 << 20


class VerifyingReader(io.RawIOBase):
    """Wraps a raw stream (``readinto``); its sha256 is checked against ``digest`` when EOF is reached.

    ``name`` says what is read in messages (``blob NAME: content has digest ...``).
    """

    def __init__(self, raw: BinaryIO, digest: str, name: str):
        super().__init__()
        self._raw = raw
        self._digest = digest
        self._name = name
        self._hash = hashlib.sha256()
        self._error: BaseException | None = None
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._error is not None:
            raise self._error
        if self._done:
            return 0
        n = self._raw.readinto(b)
        if not n:
            got = SHA256_PREFIX + self._hash.hexdigest()
            if got != self._digest:
                self._error = IntegrityError(f"blob {self._name}: content has digest {got}")
                raise self._error
            self._done = True
            return 0
        self._hash.update(memoryview(b)[:n])
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


@contextmanager
def verified_stream(raw: BinaryIO, digest: str, name: str) -> Iterator[BinaryIO]:
    """A buffered reader over ``raw`` checked against ``digest`` (see the module docstring); closes ``raw``."""
    buf = io.BufferedReader(VerifyingReader(raw, digest, name), buffer_size=IO_BLOCK)
    try:
        yield buf
        while buf.read(IO_BLOCK):
            pass
    finally:
        buf.close()
