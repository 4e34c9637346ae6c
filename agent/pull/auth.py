"""Registry credentials from a docker ``config.json`` (``auths``), matched per registry host."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import UsageError
from agent.image import refs

_DOCKER_HUB_KEYS = {"index.docker.io", "registry-1.docker.io", "docker.io"}


@dataclass(frozen=True)
class Credentials:
    """What goes into CRI's AuthConfig. Never printed: repr hides the secrets."""

    server: str
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)


def host_of(server: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; ``reg:5000/path`` -> ``reg:5000``."""
    host = server.strip()
    for scheme in ("https://", "http://"):
        host = host.removeprefix(scheme)
    host = host.split("/", 1)[0].lower()
    return "docker.io" if host in _DOCKER_HUB_KEYS else host


def load(path: str | Path) -> dict[str, Credentials]:
    """Credentials by registry host. A bad file is a UsageError naming what is wrong."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as err:
        raise UsageError(f"--auth-file {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise UsageError(f"--auth-file {path}: not valid JSON ({err})") from None
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        raise UsageError(f'--auth-file {path}: no "auths" object')
    out: dict[str, Credentials] = {}
    for server, entry in auths.items():
        if not isinstance(entry, dict):
            raise UsageError(f"--auth-file {path}: entry for {server} is not an object")
        username, password = str(entry.get("username", "")), str(entry.get("password", ""))
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise UsageError(
                    f'--auth-file {path}: "auth" for {server} is not base64 of user:password'
                ) from None
            username, _, password = decoded.partition(":")
        out[host_of(server)] = Credentials(
            server=server,
            username=username,
            password=password,
            identity_token=str(entry.get("identitytoken", "")),
        )
    return out


def for_ref(creds: dict[str, Credentials], ref: str) -> Credentials | None:
    """The credentials for the registry ``ref`` lives on, if any."""
    try:
        domain = refs.parse(ref).domain
    except refs.InvalidReference:
        return None
    return creds.get(host_of(domain))
