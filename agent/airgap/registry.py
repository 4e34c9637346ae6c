"""A small client for the registry HTTP API (distribution v2), for building bundles.

Bundles are made on a connected machine for any platform, so they are
fetched straight from registries: containerd's CRI only pulls the node's
own platform. Handles anonymous, basic and bearer-token auth, follows blob
and token-server redirects without leaking credentials to another host, and resumes
interrupted blob downloads with HTTP ranges.

Bearer tokens are kept until the ``expires_in`` their server stated (60 s
when it states none) and fetched again before that, or at once when the
registry answers 401 to one. Registries are reached over HTTPS, except
loopback ones (127.0.0.0/8, ::1 and the exact name ``localhost``) and hosts
named with ``--plain-http``; credentials and tokens never go over plain HTTP
to a host that is not loopback.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.client import HTTPMessage, HTTPResponse
from typing import IO

from agent import boundedjson
from agent.archive import layout
from agent.errors import AgentError
from agent.image.refs import Reference
from agent.pull import auth

MANIFEST_ACCEPT = ", ".join(
    [layout.OCI_INDEX, layout.DOCKER_LIST, layout.OCI_MANIFEST, layout.DOCKER_MANIFEST]
)
DOCKER_HUB_API = "registry-1.docker.io"
MAX_MANIFEST = layout.MAX_JSON
# A token answer larger than this is refused.
MAX_TOKEN_DOC = 1 << 20
# Lifetime of a token whose server states none (the distribution token spec's default).
DEFAULT_TOKEN_LIFETIME_S = 60.0
# Tokens are fetched again this long before they expire, so none expires in flight.
TOKEN_MARGIN_S = 10.0
# Redirects followed when fetching a token.
MAX_TOKEN_REDIRECTS = 5


def web_request(url: str, headers: dict[str, str] | None = None) -> urllib.request.Request:
    """A request for an http(s) URL; any other scheme (``file:``, ``ftp:``) is a RegistryError.

    URLs come from registries (redirects, token realms), so the scheme is checked
    here rather than trusted.
    """
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise RegistryError(f"{url}: not an http or https URL")
    return urllib.request.Request(url, headers=headers or {})  # noqa: S310 - scheme checked above


def split_host(host: str) -> str:
    """The host name or address of ``host[:port]`` (``[::1]:5000`` -> ``::1``)."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the exact name ``localhost`` (with any port).

    Names that merely start like them (``localhost.corp.com``, ``127.example``)
    are other hosts.
    """
    name = split_host(host).lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class RegistryError(AgentError):
    """The registry refused or failed a request; ``retryable`` for network trouble and 5xx."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


class _HttpOnlyRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects of blob storage are followed, each hop only to http(s) (never ftp: or file:)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        web_request(newurl)  # refuses any other scheme, in one line
        return super().redirect_request(req, fp, code, msg, headers, newurl)


@dataclass(frozen=True)
class Manifest:
    media_type: str
    digest: str
    data: bytes


class RegistryClient:
    def __init__(
        self,
        credentials: dict[str, auth.Credentials] | None = None,
        *,
        plain_http: frozenset[str] = frozenset(),
        timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.credentials = credentials or {}
        self.plain_http = plain_http
        self.timeout = timeout
        self.clock = clock
        # (host, scope) -> (token, monotonic time it is to be renewed at)
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._basic_hosts: set[str] = set()
        self._opener = urllib.request.build_opener(_NoRedirect)
        self._storage = urllib.request.build_opener(_HttpOnlyRedirect)

    def _plain(self, host: str) -> bool:
        return host in self.plain_http or is_loopback(host)

    def _base(self, host: str) -> str:
        api = DOCKER_HUB_API if host == "docker.io" else host
        return f"{'http' if self._plain(host) else 'https'}://{api}"

    def _secret_ok(self, host: str, url: str) -> None:
        """Refuse to send credentials to ``url`` over plain HTTP unless it is loopback."""
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme == "http" and not is_loopback(parsed.netloc):
            raise RegistryError(
                f"{host}: refusing to send credentials over plain HTTP to {parsed.netloc} "
                "(only loopback registries get them without HTTPS)"
            )

    def _token(self, host: str, scope: str) -> str:
        cached = self._tokens.get((host, scope))
        if cached is None:
            return ""
        token, renew_at = cached
        if self.clock() >= renew_at:
            del self._tokens[(host, scope)]  # expired or about to: fetch a new one
            return ""
        return token

    def _open(self, host: str, path: str, scope: str, headers: dict[str, str]) -> HTTPResponse:
        """GET with auth negotiation and manual redirects."""
        url = self._base(host) + path
        renewed = False
        for _ in range(3):
            req = web_request(url, dict(headers))
            token = self._token(host, scope)
            creds = self.credentials.get(auth.host_of(host))
            if token:
                self._secret_ok(host, url)
                req.add_header("Authorization", f"Bearer {token}")
            elif creds and host in self._basic_hosts:
                self._secret_ok(host, url)
                req.add_header("Authorization", self._basic(creds))
            try:
                return self._opener.open(req, timeout=self.timeout)  # type: ignore[no-any-return]
            except urllib.error.HTTPError as err:
                if err.code in (301, 302, 303, 307, 308):
                    return self._follow(err.headers.get("Location", ""), url, headers)
                if err.code == HTTPStatus.UNAUTHORIZED and token and not renewed:
                    # Revoked or expired early: one new token, then give up.
                    self._tokens.pop((host, scope), None)
                    renewed = True
                if err.code == HTTPStatus.UNAUTHORIZED and self._authenticate(
                    host, scope, err.headers, creds, url
                ):
                    continue
                raise self._error(err, url) from None
            except (urllib.error.URLError, OSError) as err:
                raise RegistryError(
                    f"{url}: {getattr(err, 'reason', err)}", retryable=True
                ) from None
        raise RegistryError(f"{url}: unauthorized (credentials refused)")

    def _follow(self, location: str, url: str, headers: dict[str, str]) -> HTTPResponse:
        # Blob storage (S3, CDN) gets no registry credentials.
        target = urllib.parse.urljoin(url, location)
        plain = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        request = web_request(target, plain)
        try:
            return self._storage.open(request, timeout=self.timeout)  # type: ignore[no-any-return]
        except urllib.error.HTTPError as err:
            raise self._error(err, target) from None
        except (urllib.error.URLError, OSError) as err:
            raise RegistryError(
                f"{target}: {getattr(err, 'reason', err)}", retryable=True
            ) from None

    @staticmethod
    def _basic(creds: auth.Credentials) -> str:
        raw = f"{creds.username}:{creds.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _authenticate(
        self,
        host: str,
        scope: str,
        headers: object,
        creds: auth.Credentials | None,
        url: str,
    ) -> bool:
        challenge = getattr(headers, "get", lambda _k, _d=None: None)("WWW-Authenticate", "") or ""
        if challenge.lower().startswith("basic"):
            if creds is None or host in self._basic_hosts:
                return False
            self._secret_ok(host, url)
            self._basic_hosts.add(host)
            return True
        if not challenge.lower().startswith("bearer") or (host, scope) in self._tokens:
            return False
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge[:4096]))
        realm = params.pop("realm", "")
        if not realm.startswith(("https://", "http://")):
            return False
        query = {k: v for k, v in params.items() if k in ("service", "scope")}
        query.setdefault("scope", scope)
        body = self._token_request(host, f"{realm}?{urllib.parse.urlencode(query)}", creds)
        try:
            doc = boundedjson.loads(body, what=f"{realm} token", max_bytes=MAX_TOKEN_DOC)
        except boundedjson.JSONLimitError as err:
            raise RegistryError(str(err)) from None
        if not isinstance(doc, dict):
            raise RegistryError(f"{realm}: token answer is not a JSON object")
        token = doc.get("token") or doc.get("access_token")
        if not token or not isinstance(token, str):
            return False
        lifetime = doc.get("expires_in")
        if (
            not isinstance(lifetime, int | float)
            or isinstance(lifetime, bool)
            or not math.isfinite(lifetime)
            or lifetime <= 0
        ):
            lifetime = DEFAULT_TOKEN_LIFETIME_S
        lifetime = min(float(lifetime), 86400.0)
        renew_in = lifetime - min(TOKEN_MARGIN_S, lifetime / 2)
        self._tokens[(host, scope)] = (token, self.clock() + renew_in)
        return True

    def _token_request(self, host: str, url: str, creds: auth.Credentials | None) -> bytes:
        """The token server's answer, following redirects by hand: the credentials go
        only to the realm's own scheme and host, never to where it redirects elsewhere."""
        origin = urllib.parse.urlsplit(url)[:2]
        if creds is not None:
            self._secret_ok(host, url)
        for _ in range(MAX_TOKEN_REDIRECTS + 1):
            req = web_request(url)
            if creds is not None and urllib.parse.urlsplit(url)[:2] == origin:
                req.add_header("Authorization", self._basic(creds))
            try:
                with self._opener.open(req, timeout=self.timeout) as resp:
                    return resp.read(MAX_TOKEN_DOC + 1)  # type: ignore[no-any-return]
            except urllib.error.HTTPError as err:
                if err.code not in (301, 302, 303, 307, 308):
                    raise self._error(err, url) from None
                url = urllib.parse.urljoin(url, err.headers.get("Location", ""))
                if not url.startswith(("https://", "http://")):
                    raise RegistryError(f"{host}: token server redirects to {url!r}") from None
            except (urllib.error.URLError, OSError) as err:
                raise RegistryError(
                    f"{url}: token request failed ({err})", retryable=True
                ) from None
        raise RegistryError(f"{host}: token server redirects more than {MAX_TOKEN_REDIRECTS} times")

    @staticmethod
    def _error(err: urllib.error.HTTPError, url: str) -> RegistryError:
        if err.code in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN):
            return RegistryError(f"{url}: unauthorized ({err.code})")
        if err.code == HTTPStatus.NOT_FOUND:
            return RegistryError(f"{url}: not found")
        return RegistryError(
            f"{url}: HTTP {err.code} {err.reason}",
            retryable=err.code >= HTTPStatus.INTERNAL_SERVER_ERROR,
        )

    def manifest(self, ref: Reference, reference: str | None = None) -> Manifest:
        """A manifest or index by tag or digest (``reference`` defaults to the ref's own)."""
        target = reference or ref.digest or ref.tag or "latest"
        path = f"/v2/{ref.path}/manifests/{target}"
        with self._open(
            ref.domain, path, f"repository:{ref.path}:pull", {"Accept": MANIFEST_ACCEPT}
        ) as resp:
            data = resp.read(MAX_MANIFEST + 1)
            media_type = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
        if len(data) > MAX_MANIFEST:
            raise RegistryError(f"{ref}: manifest larger than {MAX_MANIFEST >> 20} MiB")
        digest = layout.sha256(data)
        if target.startswith("sha256:") and digest != target:
            raise RegistryError(f"{ref}: manifest does not match its digest {target}")
        return Manifest(media_type, digest, data)

    def blob(self, ref: Reference, digest: str, offset: int = 0) -> Iterator[bytes]:
        """The blob's bytes from ``offset`` on, in chunks."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self._open(
            ref.domain, f"/v2/{ref.path}/blobs/{digest}", f"repository:{ref.path}:pull", headers
        )
        with resp:
            if offset and resp.status != HTTPStatus.PARTIAL_CONTENT:
                raise RegistryError(f"{ref}: registry cannot resume {digest}", retryable=False)
            try:
                while chunk := resp.read(1 << 20):
                    yield chunk
            except (OSError, http.client.HTTPException) as err:
                raise RegistryError(
                    f"{ref}: download of {digest} broke ({err})", retryable=True
                ) from None
