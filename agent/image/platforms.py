"""Platforms (``os/arch[/variant]``): parsing, the node's own, and matching."""

from __future__ import annotations

import platform as _platform
from dataclasses import dataclass
from typing import Any

_ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "armhf": "arm",
    "armel": "arm",
    "i386": "386",
    "i686": "386",
}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


@dataclass(frozen=True, order=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text

    def normalized(self) -> Platform:
        arch = _ARCH_ALIASES.get(self.architecture.lower(), self.architecture.lower())
        variant = self.variant.lower()
        if variant == _DEFAULT_VARIANT.get(arch) and arch == "arm64":
            variant = ""
        if arch == "arm" and variant in ("", "7"):
            variant = "v7"
        return Platform(self.os.lower(), arch, variant)

    def matches(self, other: Platform) -> bool:
        """True if an image built for ``other`` runs on this platform (same os, arch, variant)."""
        a, b = self.normalized(), other.normalized()
        return a.os == b.os and a.architecture == b.architecture and a.variant == b.variant


def parse(text: str) -> Platform:
    """Parse ``os/arch[/variant]`` (``amd64`` alone means ``linux/amd64``)."""
    parts = [p for p in text.strip().split("/") if p]
    if len(parts) == 1:
        parts = ["linux", *parts]
    if len(parts) not in (2, 3):
        raise ValueError(f"invalid platform {text!r}: want os/arch[/variant], e.g. linux/amd64")
    return Platform(*parts).normalized()


def from_json(obj: Any) -> Platform | None:
    """A platform from an OCI descriptor's ``platform`` or an image config."""
    if not isinstance(obj, dict):
        return None
    os_ = obj.get("os")
    arch = obj.get("architecture")
    if not isinstance(os_, str) or not isinstance(arch, str) or not os_ or not arch:
        return None
    variant = obj.get("variant")
    return Platform(os_, arch, variant if isinstance(variant, str) else "").normalized()


def node() -> Platform:
    """The platform of this machine."""
    arch = _platform.machine()
    variant = ""
    if arch.startswith("armv"):
        variant, arch = arch[3:5], "arm"
        variant = "v" + variant.rstrip("l")
    return Platform("linux", arch, variant).normalized()
