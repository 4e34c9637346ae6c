"""Image references: parsing, validation and normalization.

Pure functions over text, following the distribution reference grammar:
``[domain[:port]/]path[:tag][@algorithm:hex]``. Short Docker Hub names are
normalized the way containerd and the kubelet do (``alpine`` becomes
``docker.io/library/alpine:latest``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_DOMAIN = "docker.io"
LEGACY_DOMAINS = frozenset({"index.docker.io", "registry-1.docker.io"})
MAX_NAME_LENGTH = 255

# Every pattern is ASCII-only and matched whole (fullmatch, the same as
# anchoring with \A ... \Z): ``$`` would also match before a final newline.
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"

_DOMAIN_RE = re.compile(_DOMAIN, re.ASCII)
_PATH_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*", re.ASCII)
_TAG_RE = re.compile(_TAG, re.ASCII)
_DIGEST_RE = re.compile(_DIGEST, re.ASCII)
_SHA256_RE = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)
# The algorithms a reference's digest may use, with their hex lengths.
DIGEST_ALGORITHMS = {"sha256": 64, "sha512": 128}


class InvalidReference(ValueError):
    """The text is not a valid image reference; the message says why."""


@dataclass(frozen=True)
class Reference:
    """A fully qualified image reference."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository(self) -> str:
        return f"{self.domain}/{self.path}"

    @property
    def _suffix(self) -> str:
        return (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    def __str__(self) -> str:
        return self.repository + self._suffix

    def with_digest(self, digest: str) -> Reference:
        """``repository@digest``, the form CRI lists as a repo digest."""
        return Reference(self.domain, self.path, None, digest)

    @property
    def familiar(self) -> str:
        """The short form people type (``alpine:3.19`` for Docker Hub library)."""
        if self.domain == DEFAULT_DOMAIN:
            return self.path.removeprefix("library/") + self._suffix
        return self.repository + self._suffix


def is_digest(text: str) -> bool:
    """True for a well-formed ``sha256:<64 hex>`` digest (nothing before or after)."""
    return bool(_SHA256_RE.fullmatch(text))


def parse(text: str, *, default_tag: bool = True) -> Reference:
    """Parse and normalize ``text``; raise :class:`InvalidReference` if it is not one.

    With ``default_tag``, a reference without tag or digest gets ``latest``.
    References are ASCII; white space anywhere (a trailing newline too) is
    refused rather than stripped.
    """
    raw = text
    _check_text(raw)
    remainder, _, digest = raw.partition("@")
    if digest:
        _check_digest(raw, digest)

    tag: str | None = None
    # A tag follows the last ':' that comes after the last '/' (a ':' before
    # it belongs to a registry port).
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > last_slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise InvalidReference(
                f"{raw!r}: invalid tag {tag!r} (letters, digits, '_', '.', '-', at most 128)"
            )

    domain, path = _split_domain(remainder)
    if not _DOMAIN_RE.fullmatch(domain):
        raise InvalidReference(f"{raw!r}: invalid registry {domain!r}")
    if not path or not _PATH_RE.fullmatch(path):
        if path and path.lower() != path:
            raise InvalidReference(f"{raw!r}: repository names must be lower case")
        raise InvalidReference(f"{raw!r}: invalid repository name {path!r}")
    if len(domain) + 1 + len(path) > MAX_NAME_LENGTH:
        raise InvalidReference(f"{raw!r}: repository name longer than {MAX_NAME_LENGTH}")
    if tag is None and not digest and default_tag:
        tag = "latest"
    return Reference(domain, path, tag, digest or None)


def _check_text(raw: str) -> None:
    if not raw:
        raise InvalidReference("empty reference")
    if len(raw) > MAX_NAME_LENGTH + 150:
        raise InvalidReference("reference is too long")
    if any(c.isspace() for c in raw):
        raise InvalidReference(f"{raw!r} contains white space")
    if not raw.isascii():
        raise InvalidReference(f"{raw!r} contains characters that are not ASCII")


def _check_digest(raw: str, digest: str) -> None:
    if not _DIGEST_RE.fullmatch(digest):
        raise InvalidReference(f"{raw!r}: invalid digest {digest!r}")
    algorithm, _, hexd = digest.partition(":")
    length = DIGEST_ALGORITHMS.get(algorithm)
    if length is None:
        raise InvalidReference(f"{raw!r}: unsupported digest algorithm {algorithm!r}")
    if len(hexd) != length or hexd.lower() != hexd:
        raise InvalidReference(f"{raw!r}: a {algorithm} digest has {length} lower-case hex digits")


def normalize(text: str) -> str:
    """The canonical string form of ``text`` (``alpine`` -> ``docker.io/library/alpine:latest``)."""
    return str(parse(text))


def _split_domain(name: str) -> tuple[str, str]:
    first, sep, rest = name.partition("/")
    if sep and (("." in first or ":" in first) or first == "localhost" or first.startswith("[")):
        domain, path = first, rest
    else:
        domain, path = DEFAULT_DOMAIN, name
    if domain in LEGACY_DOMAINS:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = f"library/{path}"
    return domain, path
