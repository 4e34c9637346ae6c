"""``image-agent cluster serve``: the HTTP side (aiohttp, one event loop).

Nothing slow runs on the loop: sources are fetched asynchronously, the
node x image view is built in a worker thread (when asked for after a
change, paced by its own cost) and served as ready bytes. Hostile or
broken clients cannot take the server down:

- connections are capped (below the file limit); at the cap, the oldest
  connection that is not in a request is closed to make room, and TLS
  connections whose handshake failed (asyncio never tells their protocol)
  are let go once the handshake timeout has passed;
- a connection must send its request headers within ``header_timeout``
  (half-sent requests are closed), and a body within ``body_timeout``;
- at most ``max_long_polls`` requests wait at once; more are answered now;
- bodies are read whole up to the schema's limit, JSON depth is bounded,
  node names are DNS-1123 subdomains, and every error is a one-line JSON
  answer (4xx); errors of the HTTP machinery are logged in one line, at most
  once per ``LOG_EVERY_S``.

Background tasks (source refresher, view builder, node expiry) are
supervised: one that ends brings ``/healthz`` to 503 and is logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import resource
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from agent import config
from agent.cluster import openapi, schema
from agent.cluster.fetch import Fetcher, Sources
from agent.cluster.state import State, parse_selector, render_view, weak_match
from agent.cluster.tokens import Credentials, bearer

Log = structlog.typing.FilteringBoundLogger

MAX_WAIT_S = 60.0
FILE_POLL_S = 2.0
VIEW_MIN_INTERVAL_S = 1.0
VIEW_REFRESH_S = 30.0
LOG_EVERY_S = 10.0
BACKLOG = 1024
FD_RESERVE = 128  # files the process needs besides client connections
HANDSHAKE_MARGIN_S = 2.0  # after the handshake timeout, before an unmade connection is let go


@dataclass(frozen=True)
class Options:
    """How the server behaves; built from ``ClusterServeConfig`` by the CLI."""

    listen: str = "0.0.0.0:8080"
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
    return max(16, min(wanted, soft - FD_RESERVE - BACKLOG))


def _error(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": text}, status=status, headers=headers)


class Server:
    def __init__(self, state: State, srcs: Sources, options: Options, log: Log) -> None:
        self.state = state
        self.sources = srcs
        self.options = options
        self.log = log
        self.changed = asyncio.Event()
        self.busy: set[object] = set()
        self.long_polls = 0
        self.died: dict[str, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._view: bytes | None = None
        self._view_at = -math.inf  # monotonic time the copy was built
        self._view_ready = asyncio.Event()
        self._view_wanted = asyncio.Event()
        self._view_dirty = True
        # Staleness moves with the clock: a copy this old is built again even without a change.
        self._view_max_age = min(
            VIEW_REFRESH_S, max(VIEW_MIN_INTERVAL_S, self.options.stale_after / 4)
        )
        self._openapi = json.dumps(openapi.document()).encode()
        self.registry = CollectorRegistry()
        self.m_requests = Counter(
            "image_agent_cluster_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "code"],
            registry=self.registry,
        )
        self.m_source_ok = Gauge(
            "image_agent_cluster_source_ok",
            "1 if the source's last read worked",
            ["source"],
            registry=self.registry,
        )
        self.m_images = Gauge(
            "image_agent_cluster_images", "Images in the assembled list", registry=self.registry
        )
        self.m_nodes = Gauge(
            "image_agent_cluster_nodes", "Nodes that reported", registry=self.registry
        )
        self.m_long_polls = Gauge(
            "image_agent_cluster_long_polls", "Requests held for a change", registry=self.registry
        )

    # -- background work ----------------------------------------------------------

    async def refresh(self, fetcher: Fetcher, force: bool = False) -> None:
        contributed = await self.sources.refresh(self.state, fetcher, self.log, force=force)
        for source_id, st in self.sources.status.items():
            self.m_source_ok.labels(source_id).set(1 if st["ok"] else 0)
        if contributed and self.state.rebuild():
            self.m_images.set(len(self.state.assembled.items))
            self.log.info(
                "list.changed", version=self.state.version, images=len(self.state.assembled.items)
            )
            self.changed.set()
            self.changed = asyncio.Event()
            self._view_dirty = True

    async def refresher(self, fetcher: Fetcher) -> None:
        while True:
            await asyncio.sleep(FILE_POLL_S)
            await self.refresh(fetcher)

    async def view_builder(self) -> None:
        """Build the status view off the loop when it is asked for and something changed.

        Builds are at least ``VIEW_MIN_INTERVAL_S`` and twice the last build's
        time apart, so a client asking in a loop cannot keep a core busy.
        """
        while True:
            await self._view_wanted.wait()
            self._view_wanted.clear()
            self._view_dirty = False
            started = time.monotonic()
            snap = self.state.snapshot()
            self._view = await asyncio.to_thread(
                render_view, snap, time.time(), self.options.stale_after
            )
            self._view_at = time.monotonic()
            self._view_ready.set()
            took = self._view_at - started
            await asyncio.sleep(max(VIEW_MIN_INTERVAL_S, 2 * took))

    async def expiry(self) -> None:
        """Nodes unseen for ``forget_after`` leave the view."""
        every = max(1.0, min(60.0, self.options.forget_after / 10))
        while True:
            await asyncio.sleep(every)
            gone = self.state.forget_older_than(time.time() - self.options.forget_after)
            if gone:
                self.m_nodes.set(len(self.state.nodes))
                self._view_dirty = True
                self.log.info("nodes.forgotten", nodes=len(gone), first=gone[0])

    def supervise(self, name: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work``; if it ends but by cancellation, /healthz fails and it is logged once."""
        task = asyncio.create_task(work, name=name)

        def done(t: asyncio.Task[None]) -> None:
            if t.cancelled():
                return
            exc = t.exception()
            why = f"{type(exc).__name__}: {exc}" if exc else "returned"
            self.died[name] = why
            self.log.error("task.died", task=name, error=why)

        task.add_done_callback(done)
        self._tasks.append(task)
        return task

    async def stop_tasks(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.changed.set()  # long polls answer now instead of holding the shutdown

    # -- HTTP -----------------------------------------------------------------------

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "unmatched"
        self.busy.add(request.protocol)
        try:
            response = await handler(request)
        except web.HTTPException as err:
            text = err.text or err.reason if err.status >= 400 else ""
            response = _error(err.status, str(text).strip()) if err.status >= 400 else err
        except Exception as err:  # the last line of defence: one line, never a traceback
            self.log.error("request.failed", endpoint=endpoint, error=f"{type(err).__name__}")
            response = _error(500, "internal error")
        finally:
            self.busy.discard(request.protocol)
        self.m_requests.labels(endpoint, str(response.status)).inc()
        return response

    def _token(self, request: web.Request) -> str | None:
        return bearer(request.headers.get("Authorization", ""))

    def _deny(self, status: int = 401, text: str = "a bearer token is required") -> web.Response:
        return _error(status, text, {"WWW-Authenticate": 'Bearer realm="image-agent"'})

    def _may_read(self, request: web.Request, node: str = "") -> bool:
        return not self.options.auth_reads or self.options.credentials.may_read(
            self._token(request), node
        )

    async def images(self, request: web.Request) -> web.StreamResponse:
        node = request.query.get("node", "")
        if node and not schema.valid_node_name(node):
            return _error(400, "node: not a DNS-1123 name of at most 253 characters")
        if not self._may_read(request, node):
            return self._deny()
        try:
            labels = parse_selector(request.query.get("labels", ""))
            wait = config.parse_duration(request.query.get("wait", "0"))
        except ValueError as err:
            return _error(400, str(err))
        if not math.isfinite(wait) or wait < 0:
            return _error(400, "wait: want a duration such as 30s")
        wait = min(MAX_WAIT_S, wait)
        condition = request.headers.get("If-None-Match", "")
        images, tag = self.state.for_labels(labels)
        room = self.long_polls < self.options.max_long_polls
        if weak_match(condition, tag) and wait > 0 and room:
            event = self.changed
            self.long_polls += 1
            self.m_long_polls.set(self.long_polls)
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await event.wait()
            finally:
                self.long_polls -= 1
                self.m_long_polls.set(self.long_polls)
            images, tag = self.state.for_labels(labels)
        headers = {"ETag": tag, "Cache-Control": "no-cache", "Vary": "Accept"}
        if weak_match(condition, tag):
            return web.Response(status=304, headers=headers)
        if "application/json" in request.headers.get("Accept", ""):
            body = schema.ImageList(images=images, version=self.state.version).model_dump_json()
            return web.Response(
                body=body.encode(), content_type="application/json", headers=headers
            )
        text = "".join(f"{i}\n" for i in images)
        return web.Response(text=text, content_type="text/plain", headers=headers)

    async def put_status(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if not schema.valid_node_name(name):
            return _error(400, "node name: not a DNS-1123 name of at most 253 characters")
        creds, token = self.options.credentials, self._token(request)
        if not creds.may_write(token, name):
            if creds.is_shared(token):  # known, but not allowed to write
                return self._deny(403, "the shared token is for reads; use the node's token")
            return self._deny(401, f"a valid token for node {name} is required")
        limit = schema.MAX_REPORT_BYTES
        if request.content_length is not None and request.content_length > limit:
            return _error(413, f"report is larger than {limit} bytes")
        try:
            async with asyncio.timeout(self.options.body_timeout):
                body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"report is larger than {limit} bytes")
        except TimeoutError:
            return _error(408, f"the body did not arrive within {self.options.body_timeout:g}s")
        try:
            report = schema.parse_report(body)
        except schema.SchemaError as err:
            return _error(400, str(err))
        if report.node is not None and report.node != name:
            return _error(400, f"node: {report.node!r} does not match the name in the path")
        self.state.record(name, report, time.time())
        self.m_nodes.set(len(self.state.nodes))
        self._view_dirty = True
        return web.Response(status=204)

    async def status(self, request: web.Request) -> web.Response:
        if not self._may_read(request):
            return self._deny()
        if self._view_dirty or time.monotonic() - self._view_at > self._view_max_age:
            self._view_wanted.set()  # served from the last copy meanwhile
        if self._view is None:
            try:
                async with asyncio.timeout(30):
                    await self._view_ready.wait()
            except TimeoutError:
                return _error(503, "the view is not built yet", {"Retry-After": "5"})
        assert self._view is not None
        return web.Response(body=self._view, content_type="application/json")

    async def listing(self, request: web.Request) -> web.Response:
        if not self._may_read(request):
            return self._deny()
        return web.json_response(self.state.listing(self.sources.status))

    async def healthz(self, request: web.Request) -> web.Response:
        if self.died:
            name, why = next(iter(self.died.items()))
            return web.Response(status=503, text=f"task {name} ended: {why}\n")
        return web.Response(text="ok\n")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=schema.MAX_REPORT_BYTES, middlewares=[self.middleware]
        )
        app.add_routes(
            [
                web.get("/v1/images", self.images),
                web.put("/v1/nodes/{name}/status", self.put_status),
                web.get("/v1/status", self.status),
                web.get("/v1/list", self.listing),
                web.get("/v1/openapi.json", self.openapi),
                web.get("/healthz", self.healthz),
                web.get("/metrics", self.metrics),
            ]
        )
        return app


def _quiet_machinery(log: Log) -> None:
    handler = _OneLine(log)
    for name in ("aiohttp", "asyncio"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False


async def serve(
    state: State,
    srcs: Sources,
    options: Options,
    *,
    log: Log,
    ready: Callable[[int], None] = lambda port: None,
    stop: asyncio.Event | None = None,
) -> None:
    _quiet_machinery(log)
    loop = asyncio.get_running_loop()
    loop_errors = Throttled(log, "loop.error")
    loop.set_exception_handler(
        lambda _loop, ctx: loop_errors(
            error=str(ctx.get("message", ""))[:200]
            + (f": {type(ctx['exception']).__name__}" if ctx.get("exception") else "")
        )
    )
    limit = raise_file_limit(options.max_connections)
    if limit < options.max_connections:
        log.warning("connections.capped", wanted=options.max_connections, limit=limit)
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
        assert runner.server is not None
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
        listener = await loop.create_server(
            factory,
            host.strip("[]") or "0.0.0.0",
            int(port),
            ssl=context,
            # A TLS handshake counts as part of the request headers' time.
            ssl_handshake_timeout=options.header_timeout if context else None,
            backlog=BACKLOG,
            reuse_address=True,
        )
        bound = int(listener.sockets[0].getsockname()[1])
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
