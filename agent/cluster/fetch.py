"""Reading the sources: files when they change, URLs every ``interval``.

A source that fails keeps its last good contribution and its status says
why. Anything a source throws (a parser bug included) is a failure of that
source, never of the refresher. Credentials in URLs (``user:pass@``) are
used for the request and shown nowhere: ids, messages and labels carry the
redacted form.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from agent.cluster import sources
from agent.cluster.assemble import Contribution
from agent.cluster.bodies import BodyTooLarge, read_whole
from agent.cluster.state import Labels, State, parse_selector

URL_TIMEOUT_S = 10.0
MAX_DOCUMENT_BYTES = sources.MAX_DOCUMENT_BYTES
KINDS = ("images", "cr", "list", "che", "env")
# Found secrets shorter than this are not blanked out of messages (they would hit
# ordinary words); the URLs that hold them are redacted whole anyway.
MIN_SECRET_CHARS = 4


# Query parameters whose values are credentials (GitLab private_token, OAuth
# access_token, signed URLs' sig/signature, ...); names compared in lower case.
SECRET_PARAMS = frozenset(
    {
        "token",
        "private_token",
        "access_token",
        "refresh_token",
        "id_token",
        "auth",
        "password",
        "passwd",
        "pass",
        "pwd",
        "secret",
        "client_secret",
        "key",
        "api_key",
        "apikey",
        "sig",
        "signature",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
    }
)
_SECRET_SUFFIXES = ("token", "secret", "password", "signature")
_URL = re.compile(r"(?i)\bhttps?://[^\s<>]+")
_USERINFO = re.compile(r"^([A-Za-z]+://)[^/?#]*@")
_PARAM = re.compile(r"([?&;])([^=&;#]+)=([^&;#]*)")


def _secret_param(name: str) -> bool:
    name = urllib.parse.unquote(name).strip().lower()
    return name in SECRET_PARAMS or name.endswith(_SECRET_SUFFIXES)


def _redact_url(url: str) -> str:
    url = _USERINFO.sub(r"\1***@", url)
    return _PARAM.sub(lambda m: f"{m[1]}{m[2]}=***" if m[3] and _secret_param(m[2]) else m[0], url)


def redact(text: str) -> str:
    """Credentials out of every http(s) URL in ``text``: ``https://user:pass@host/x?token=t``
    -> ``https://***@host/x?token=***``. Pure text work: never raises, even on URLs that
    do not parse; other text unchanged. A ``text`` that begins with a scheme is one URL
    (a source's own, whose user name may hold any character)."""
    if text[:8].lower().startswith(("http://", "https://")):
        text = _redact_url(text)
    return _URL.sub(lambda m: _redact_url(m[0]), text)


def _secrets(url: str) -> list[str]:
    """The credentials in ``url`` as they may show up on their own in an error text."""
    found: list[str] = []
    match = _USERINFO.match(url)
    if match:
        userinfo = match[0][len(match[1]) : -1]
        found += [userinfo, userinfo.partition(":")[2]]
    found += [m[3] for m in _PARAM.finditer(url) if _secret_param(m[2])]
    found += [urllib.parse.unquote(s) for s in found]
    return sorted({s for s in found if len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """``text`` with the credentials of ``url`` (and of any URL in it) removed; never raises."""
    text = redact(text)
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return text


@dataclass
class Source:
    """One configured source: how to read it and which nodes it is for."""

    kind: str  # images, cr, list, che, env
    target: str
    selector: Labels = ()
    number: int = 0  # tells inline strings apart

    @property
    def id(self) -> str:
        if self.kind == "images" and not self.target.startswith("@"):
            return f"images:inline#{self.number}"
        return f"{self.kind}:{redact(self.target)}"

    @property
    def is_url(self) -> bool:
        return self.target.startswith(("http://", "https://"))

    @property
    def path(self) -> str | None:
        """The file behind this source, if it is one."""
        if self.kind == "images":
            return self.target[1:] if self.target.startswith("@") else None
        if self.is_url or self.kind == "che":
            return None
        return self.target

    def signature(self) -> tuple[int, int] | None:
        """(mtime in ns, size) of a file source, so a rewrite within one mtime tick still shows."""
        if self.path is None:
            return None
        try:
            st = Path(self.path).stat()
        except OSError:
            return -1, -1
        return st.st_mtime_ns, st.st_size


def parse_source(kind: str, text: str, number: int = 0) -> Source:
    """``VALUE`` or ``VALUE;node-selector=k=v,k2=v2``; ValueError (one line) if malformed."""
    if kind not in KINDS:
        raise ValueError(f"unknown source kind {kind!r}")
    value, _, extra = text.partition(";node-selector=")
    if not value.strip():
        raise ValueError(f"--source-{kind} {text!r}: empty")
    value = value.strip()
    if kind == "che" and not value.startswith(("http://", "https://")):
        raise ValueError(f"--source-che {redact(value)!r}: want an http(s) URL")
    if value.startswith(("http://", "https://")):
        try:
            parts = urllib.parse.urlsplit(value)
            valid = bool(parts.hostname) and (parts.port or 0) >= 0
        except ValueError:
            valid = False
        if not valid:
            raise ValueError(f"--source-{kind} {redact(value)!r}: not a valid URL")
    return Source(kind, value, parse_selector(extra) if extra else (), number)


class Fetcher:
    """HTTP GETs of source documents: whole bodies (a short one is an error), bounded, timed."""

    def __init__(self, session: aiohttp.ClientSession, timeout: float = URL_TIMEOUT_S) -> None:
        self.session = session
        self.timeout = timeout

    async def text(self, url: str) -> str:
        shown = redact(url)
        try:
            async with asyncio.timeout(self.timeout):
                async with self.session.get(url, allow_redirects=True) as resp:
                    if resp.status != HTTPStatus.OK:
                        raise sources.SourceError(f"{shown}: HTTP {resp.status}")
                    body = await read_whole(resp, MAX_DOCUMENT_BYTES)
                    return body.decode("utf-8", errors="replace")
        except BodyTooLarge:
            raise sources.SourceError(f"{shown}: larger than {MAX_DOCUMENT_BYTES} bytes") from None
        except TimeoutError:
            raise sources.SourceError(f"{shown}: no answer within {self.timeout:g}s") from None
        except aiohttp.ClientPayloadError:
            raise sources.SourceError(f"{shown}: the body was cut short") from None
        except (aiohttp.ClientError, OSError, ValueError) as err:
            why = scrub(str(err) or type(err).__name__, url)
            raise sources.SourceError(f"{shown}: {why}") from None

    async def load(self, src: Source) -> Contribution:
        """Read and parse one source. Raises SourceError."""
        if src.kind == "che":
            return await self._load_che(src)
        if src.path is not None:
            text = await asyncio.to_thread(_read_file, src.path)
        elif src.is_url:
            text = await self.text(src.target)
        else:
            text = src.target
        parser = {
            "images": sources.images_string,
            "cr": sources.custom_resource,
            "list": sources.plain_list,
            "env": sources.env_file,
        }[src.kind]
        parsed = parser(text, src.id)
        return Contribution(src.id, tuple(parsed.entries), tuple(parsed.problems), src.selector)

    async def _load_che(self, src: Source) -> Contribution:
        base = src.target.rstrip("/")
        editors_url = base + sources.EDITORS_PATH
        editors = sources.che_editors(await self.text(editors_url), redact(editors_url))
        entries, problems = list(editors.entries), list(editors.problems)
        samples_url = base + sources.SAMPLES_PATH
        pairs = sources.che_sample_urls(await self.text(samples_url), redact(samples_url))
        for name, url in pairs:
            full = url if url.startswith(("http://", "https://")) else base + "/" + url.lstrip("/")
            parsed = sources.che_sample_devfile(await self.text(full), redact(full), name)
            entries += parsed.entries
            problems += parsed.problems
        return Contribution(src.id, tuple(entries), tuple(problems), src.selector)


def _read_file(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError as err:
        raise sources.SourceError(f"{path}: {err.strerror or err}") from None


@dataclass
class Sources:
    """The configured sources, when each was last read, and how that went."""

    items: list[Source]
    interval: float
    status: dict[str, dict[str, Any]] = field(default_factory=dict)
    _signatures: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    _loaded_at: dict[str, float] = field(default_factory=dict)

    def due(self, src: Source, now: float, force: bool) -> bool:
        signature = src.signature()
        due = force or src.id not in self._loaded_at
        if signature is not None and signature != self._signatures.get(src.id):
            due = True
        if src.path is None and now - self._loaded_at.get(src.id, 0.0) >= self.interval:
            due = True
        if due:
            self._signatures[src.id] = signature
            self._loaded_at[src.id] = now
        return due

    async def refresh(
        self,
        state: State,
        fetcher: Fetcher,
        log: structlog.typing.FilteringBoundLogger,
        *,
        force: bool = False,
    ) -> bool:
        """Read the sources that are due into ``state``; True when any contribution changed."""
        now = time.monotonic()
        changed = False
        for src in self.items:
            if not self.due(src, now, force):
                continue
            try:
                contribution = await fetcher.load(src)
            except sources.SourceError as err:
                self._failed(src, str(err), log)
                continue
            except Exception as err:  # noqa: BLE001 - a parser bug must not end the refresher
                self._failed(src, f"{type(err).__name__}: {err}", log)
                continue
            state.contribute(contribution)
            self.status[src.id] = {
                "ok": True,
                "error": "",
                "checked_at": time.time(),
                "images": len(contribution.entries),
                "invalid": len(contribution.problems),
            }
            changed = True
        return changed

    def _failed(self, src: Source, error: str, log: structlog.typing.FilteringBoundLogger) -> None:
        error = scrub(error, src.target)
        was_ok = self.status.get(src.id, {}).get("ok", True)
        previous = self.status.get(src.id, {})
        self.status[src.id] = {**previous, "ok": False, "error": error, "checked_at": time.time()}
        if was_ok or previous.get("error") != error:
            log.warning("source.failed", source=src.id, error=error)
