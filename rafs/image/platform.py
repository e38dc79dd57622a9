"""Platforms of images (``linux/amd64``, ``linux/arm64/v8``): parsing, normalising, matching."""

from __future__ import annotations

import platform as _host
from dataclasses import dataclass

from rafs.errors import FormatError

# machine / architecture names -> the OCI architecture (and the variant the name implies)
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "i386": "386", "i686": "386",
                 "armhf": "arm", "armel": "arm", "armv7l": "arm"}
_ARCH_VARIANT_FROM_ALIAS = {"armhf": "v7", "armel": "v6", "armv7l": "v7"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None
    os_version: str | None = None
    os_features: tuple[str, ...] = ()

    @classmethod
    def parse(cls, s: str) -> "Platform":
        """``linux/amd64``, ``linux/arm64/v8``, ``linux/arm/v7``."""
        parts = [p.strip() for p in (s or "").split("/")]
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"invalid platform {s!r} (want OS/ARCH[/VARIANT], e.g. linux/amd64)")
        return cls(parts[0].lower(), parts[1].lower(), parts[2].lower() if len(parts) == 3 else None)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def normalized(self) -> "Platform":
        arch = _ARCH_ALIASES.get(self.architecture, self.architecture)
        variant = self.variant or _ARCH_VARIANT_FROM_ALIAS.get(self.architecture)
        if arch == "arm64" and variant in (None, "8", "v8"):
            variant = "v8"
        elif arch == "arm" and variant is None:
            variant = "v7"
        elif variant and variant.isdigit():
            variant = "v" + variant
        if arch == "amd64" and variant == "v1":
            variant = None
        return Platform(self.os, arch, variant, self.os_version, self.os_features)

    def matches(self, want: "Platform | str") -> bool:
        """Does this (an image's) platform satisfy ``want``?  A want without variant takes any."""
        w = Platform.parse(want) if isinstance(want, str) else want
        a, b = self.normalized(), w.normalized()
        if a.os != b.os or a.architecture != b.architecture:
            return False
        return w.variant is None or a.variant == b.variant

    def to_json(self) -> dict:
        d = {"architecture": self.architecture, "os": self.os}
        if self.os_version:
            d["os.version"] = self.os_version
        if self.os_features:
            d["os.features"] = list(self.os_features)
        if self.variant:
            d["variant"] = self.variant
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Platform":
        if not isinstance(d, dict) or not isinstance(d.get("os"), str) or not isinstance(d.get("architecture"), str):
            raise FormatError(f"invalid platform {d!r}")
        feats = d.get("os.features") or ()
        return cls(d["os"], d["architecture"], d.get("variant") or None, d.get("os.version") or None,
                   tuple(str(f) for f in feats) if isinstance(feats, list) else ())


def host_platform() -> str:
    """This machine's platform as OS/ARCH[/VARIANT]: ``linux/amd64``, ``linux/arm64``, ``linux/arm/v7``."""
    m = _host.machine().lower()
    variant = _ARCH_VARIANT_FROM_ALIAS.get(m)
    return f"linux/{_ARCH_ALIASES.get(m, m)}" + (f"/{variant}" if variant else "")
