"""Who may do what: the shared token and per-node tokens (pure).

A node token is ``HMAC-SHA256(secret, NODE)`` in hex. The server holds only
the secret, so it needs no store of tokens: it recomputes the node's token
from the name in the request and compares. ``image-agent cluster token NODE``
prints it for the admin to install on that node.

- node token: write that node's report, read that node's list
  (``/v1/images?node=NODE``); nothing else.
- shared token: every read. Writes for any node only while no node secret is
  configured (how it worked before node tokens; the server warns at start).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

MIN_SECRET_BYTES = 16
# The values deploy/cluster.yaml ships in place of real secrets all begin so;
# the server refuses them rather than run with a secret everyone knows.
PLACEHOLDER_PREFIX = "change-me"


def is_placeholder(value: str | bytes) -> bool:
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    return text.strip().lower().startswith(PLACEHOLDER_PREFIX)


def node_token(secret: bytes, node: str) -> str:
    return hmac.new(secret, node.encode(), hashlib.sha256).hexdigest()


def bearer(header: str) -> str | None:
    """The token of an ``Authorization: Bearer ...`` header, None if absent or malformed."""
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or not token.isascii() or not token.isprintable():
        return None
    return token


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True)
class Credentials:
    shared: str = ""
    node_secret: bytes = b""

    @property
    def writes_open(self) -> bool:
        """No credential configured at all: anyone may write (a lab set-up)."""
        return not self.shared and not self.node_secret

    def is_shared(self, token: str | None) -> bool:
        return bool(self.shared) and token is not None and _same(token, self.shared)

    def is_node(self, token: str | None, node: str) -> bool:
        return (
            bool(self.node_secret)
            and token is not None
            and bool(node)
            and _same(token, node_token(self.node_secret, node))
        )

    def may_write(self, token: str | None, node: str) -> bool:
        if self.writes_open:
            return True
        if self.is_node(token, node):
            return True
        return not self.node_secret and self.is_shared(token)

    def may_read(self, token: str | None, node: str = "") -> bool:
        """For reads that need a credential (``--auth-reads``)."""
        if self.writes_open:
            return True
        return self.is_shared(token) or self.is_node(token, node)
