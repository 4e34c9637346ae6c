"""The cluster server's connection cap and its throttled log lines.

At the cap, the oldest connection that is not in a request is closed to
make room; TLS connections whose handshake failed (asyncio never tells
their protocol) are let go once the handshake timeout has passed. The cap
stays below the process's file limit (:func:`raise_file_limit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import resource
import time
from typing import Any

import structlog
from aiohttp import web

Log = structlog.typing.FilteringBoundLogger

LOG_EVERY_S = 10.0
BACKLOG = 1024
FD_RESERVE = 128  # files the process needs besides client connections
HANDSHAKE_MARGIN_S = 2.0  # after the handshake timeout, before an unmade connection is let go
MIN_CONNECTIONS = 16  # the cap never goes below this, however low the file limit


class Throttled:
    """Count an event; log it at most once per ``LOG_EVERY_S`` with how many were folded in."""

    def __init__(self, log: Log, event: str) -> None:
        self.log = log
        self.event = event
        self.count = 0
        self.last = -math.inf

    def __call__(self, **fields: Any) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= LOG_EVERY_S:
            self.log.warning(self.event, count=self.count, **fields)
            self.count = 0
            self.last = now


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]


class _Tracked(asyncio.Protocol):
    """Relays to aiohttp's protocol and keeps the connection's place in :class:`ConnectionLimit`."""

    def __init__(self, inner: asyncio.Protocol, owner: ConnectionLimit) -> None:
        self.inner = inner
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.accepted = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.live.pop(self, None)
        self.owner.evicted.discard(self)
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class ConnectionLimit:
    """The protocol factory: at most ``limit`` connections; idle ones make room for new ones.

    At the cap, the oldest connection that is not inside a request (half-sent
    headers, or idle keep-alive) is closed; if every connection is inside a
    request, the new one is refused.
    """

    def __init__(
        self,
        server: web.Server,
        limit: int,
        busy: set[object],
        log: Log,
        unmade_after: float = math.inf,
    ) -> None:
        self.server = server
        self.limit = limit
        self.busy = busy
        # A TLS connection whose handshake fails is closed by asyncio without a
        # word to its protocol (neither connection_made nor connection_lost):
        # one still not made this long after its accept (the handshake timeout
        # and a margin) is gone, and its place is free.
        self.unmade_after = unmade_after
        self.live: dict[_Tracked, None] = {}  # in order of acceptance
        self.evicted: set[_Tracked] = set()
        self.log_evicted = Throttled(log, "connections.evicted")
        self.log_refused = Throttled(log, "connections.refused")
        self.log_unmade = Throttled(log, "connections.handshake_failed")

    def forget_unmade(self) -> int:
        """Drop connections never made within ``unmade_after`` (failed handshakes); how many."""
        deadline = time.monotonic() - self.unmade_after
        gone = [c for c in self.live if c.transport is None and c.accepted < deadline]
        for conn in gone:
            del self.live[conn]
        return len(gone)

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self.live) - len(self.evicted) >= self.limit and self.forget_unmade():
            self.log_unmade(limit=self.limit)
        if len(self.live) - len(self.evicted) >= self.limit:
            for conn in self.live:
                if conn.transport is None:
                    continue  # accepted in this batch, not made yet
                if conn.inner not in self.busy and conn not in self.evicted:
                    self.evicted.add(conn)
                    if conn.transport is not None:
                        conn.transport.abort()
                    self.log_evicted(limit=self.limit)
                    break
            else:
                self.log_refused(limit=self.limit)
                return _Refuse()
        # Counted from here, not from connection_made: asyncio accepts a whole
        # batch (up to the backlog) before any of them is made.
        conn = _Tracked(self.server(), self)
        self.live[conn] = None
        return conn


def raise_file_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit toward the hard one; the connections that fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    goal = wanted + FD_RESERVE + BACKLOG
    if soft != resource.RLIM_INFINITY and soft < goal:
        new = goal if hard == resource.RLIM_INFINITY else min(goal, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(MIN_CONNECTIONS, min(wanted, soft - FD_RESERVE - BACKLOG))
