"""``image-agent cluster serve``: the HTTP side (aiohttp, one event loop).

Sources are fetched asynchronously and the view is built off the loop
(:mod:`agent.cluster.server`). Hostile or broken clients cannot take the
server down:

- connections are capped below the file limit, idle ones making room for
  new ones (:mod:`agent.cluster.connections`);
- a connection must send its request headers within ``header_timeout``
  (half-sent requests are closed; a TLS handshake counts as part of it),
  and a body within ``body_timeout``;
- at most ``max_long_polls`` requests wait at once; more are answered now;
- errors of the HTTP machinery are logged in one line, at most once per
  ``LOG_EVERY_S``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from agent.cluster.connections import (
    BACKLOG,
    HANDSHAKE_MARGIN_S,
    ConnectionLimit,
    Throttled,
    raise_file_limit,
)
from agent.cluster.fetch import Fetcher, Sources
from agent.cluster.server import Server
from agent.cluster.state import State
from agent.cluster.tokens import Credentials

Log = structlog.typing.FilteringBoundLogger

ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - a server's default is to listen on every interface


@dataclass(frozen=True)
class Options:
    """How the server behaves; built from ``ClusterServeConfig`` by the CLI."""

    listen: str = f"{ALL_INTERFACES}:8080"
    credentials: Credentials = field(default_factory=Credentials)
    auth_reads: bool = False
    tls: tuple[str, str] | None = None
    source_interval: float = 60.0
    max_connections: int = 10_000
    max_long_polls: int = 8_000
    header_timeout: float = 15.0
    body_timeout: float = 30.0
    stale_after: float = 900.0
    forget_after: float = 86_400.0


class _OneLine(logging.Handler):
    """aiohttp's and asyncio's own log records as one throttled JSON line each, no traceback."""

    def __init__(self, log: Log) -> None:
        super().__init__(logging.WARNING)
        self.throttled = Throttled(log, "http.error")

    def emit(self, record: logging.LogRecord) -> None:
        error = record.getMessage().splitlines()[0][:300] if record.msg else ""
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            error = f"{error}: {type(exc).__name__}: {str(exc)[:200]}"
        self.throttled(error=error, logger=record.name)


def _quiet_machinery(log: Log, loop: asyncio.AbstractEventLoop) -> None:
    """aiohttp's, asyncio's and the loop's errors become throttled one-line events."""
    handler = _OneLine(log)
    for name in ("aiohttp", "asyncio"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
    loop_errors = Throttled(log, "loop.error")

    def on_error(_loop: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
        exc = ctx.get("exception")
        suffix = f": {type(exc).__name__}" if exc else ""
        loop_errors(error=str(ctx.get("message", ""))[:200] + suffix)

    loop.set_exception_handler(on_error)


def _connection_cap(options: Options, log: Log) -> int:
    """The connections that fit under the file limit; a warning if fewer than asked."""
    limit = raise_file_limit(options.max_connections)
    if limit < options.max_connections:
        log.warning("connections.capped", wanted=options.max_connections, limit=limit)
    return limit


async def _listen(
    runner: web.AppRunner, server: Server, options: Options, limit: int, log: Log
) -> asyncio.Server:
    """Listen on ``options.listen`` with the connection cap, TLS if configured."""
    if runner.server is None:
        raise RuntimeError("the app runner was not set up")
    host, _, port = options.listen.rpartition(":")
    context = None
    if options.tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*options.tls)
    factory = ConnectionLimit(
        runner.server,
        limit,
        server.busy,
        log,
        unmade_after=options.header_timeout + HANDSHAKE_MARGIN_S if context else math.inf,
    )
    return await asyncio.get_running_loop().create_server(
        factory,
        host.strip("[]") or ALL_INTERFACES,
        int(port),
        ssl=context,
        # A TLS handshake counts as part of the request headers' time.
        ssl_handshake_timeout=options.header_timeout if context else None,
        backlog=BACKLOG,
        reuse_address=True,
    )


async def serve(
    state: State,
    srcs: Sources,
    options: Options,
    *,
    log: Log,
    ready: Callable[[int], None] = lambda port: None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set; the background tasks are supervised by the server."""
    _quiet_machinery(log, asyncio.get_running_loop())
    limit = _connection_cap(options, log)
    creds = options.credentials
    if creds.shared and not creds.node_secret:
        log.warning("auth.shared_token_writes", note="any holder of the token can write any node")
    server = Server(state, srcs, options, log)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        fetcher = Fetcher(session)
        await server.refresh(fetcher, force=True)
        runner = web.AppRunner(
            server.app(),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=3.0,
            keepalive_timeout=options.header_timeout,
        )
        await runner.setup()
        listener = await _listen(runner, server, options, limit, log)
        bound = int(listener.sockets[0].getsockname()[1])
        host = options.listen.rpartition(":")[0]
        log.info(
            "cluster.serving",
            listen=f"{host}:{bound}",
            sources=len(srcs.items),
            images=len(state.assembled.items),
            max_connections=limit,
        )
        ready(bound)
        server.supervise("refresher", server.refresher(fetcher))
        server.supervise("view", server.view_builder())
        server.supervise("expiry", server.expiry())
        try:
            await (stop or asyncio.Event()).wait()
        finally:
            listener.close()
            await server.stop_tasks()
            await runner.cleanup()
