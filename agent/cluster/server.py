"""The cluster server's state on the loop: its routes, metrics and background tasks.

Nothing slow runs on the loop: the node x image view is built in a worker
thread (when asked for after a change, paced by its own cost) and served as
ready bytes. Bodies are read whole up to the schema's limit, node names are
DNS-1123 subdomains, and every error is a one-line JSON answer (4xx).
Background tasks (source refresher, view builder, node expiry) are
supervised: one that ends brings ``/healthz`` to 503 and is logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from agent import config
from agent.cluster import openapi, schema
from agent.cluster.fetch import Fetcher, Sources
from agent.cluster.state import Labels, State, parse_selector, render_view, weak_match
from agent.cluster.tokens import bearer

if TYPE_CHECKING:
    from agent.cluster.http import Options

Log = structlog.typing.FilteringBoundLogger

MAX_WAIT_S = 60.0
FILE_POLL_S = 2.0
VIEW_MIN_INTERVAL_S = 1.0
VIEW_REFRESH_S = 30.0
VIEW_FIRST_WAIT_S = 30.0  # a request before the first view waits this long for it
NODE_NAME_ERROR = "not a DNS-1123 name of at most 253 characters"


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
        self._metrics()

    def _metrics(self) -> None:
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
            failed = err.status >= HTTPStatus.BAD_REQUEST
            text = err.text or err.reason if failed else ""
            response = _error(err.status, str(text).strip()) if failed else err
        # The last line of defence: any error becomes one log line and a 500, never a traceback.
        except Exception as err:  # noqa: BLE001 - a handler's unforeseen error must not escape
            self.log.error("request.failed", endpoint=endpoint, error=f"{type(err).__name__}")  # noqa: TRY400 - one line by design, no traceback
            response = _error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error")
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

    def _images_query(self, request: web.Request) -> tuple[Labels, float] | web.Response:
        """The labels and the wait asked for, or the answer that refuses the request."""
        node = request.query.get("node", "")
        if node and not schema.valid_node_name(node):
            return _error(400, f"node: {NODE_NAME_ERROR}")
        if not self._may_read(request, node):
            return self._deny()
        try:
            labels = parse_selector(request.query.get("labels", ""))
            wait = config.parse_duration(request.query.get("wait", "0"))
        except ValueError as err:
            return _error(400, str(err))
        if not math.isfinite(wait) or wait < 0:
            return _error(400, "wait: want a duration such as 30s")
        return labels, min(MAX_WAIT_S, wait)

    async def _await_change(self, wait: float) -> None:
        """Hold a long poll until the list changes or ``wait`` seconds pass."""
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

    async def images(self, request: web.Request) -> web.StreamResponse:
        query = self._images_query(request)
        if isinstance(query, web.Response):
            return query
        labels, wait = query
        condition = request.headers.get("If-None-Match", "")
        images, tag = self.state.for_labels(labels)
        room = self.long_polls < self.options.max_long_polls
        if weak_match(condition, tag) and wait > 0 and room:
            await self._await_change(wait)
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

    def _refuse_writer(self, request: web.Request, name: str) -> web.Response | None:
        """The answer that refuses a report for ``name``, or None if it may be written."""
        if not schema.valid_node_name(name):
            return _error(400, f"node name: {NODE_NAME_ERROR}")
        creds, token = self.options.credentials, self._token(request)
        if creds.may_write(token, name):
            return None
        if creds.is_shared(token):  # known, but not allowed to write
            return self._deny(403, "the shared token is for reads; use the node's token")
        return self._deny(401, f"a valid token for node {name} is required")

    async def _read_report(
        self, request: web.Request, name: str
    ) -> schema.NodeReport | web.Response:
        """The report in the body, or the answer that refuses it."""
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
        return report

    async def put_status(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        refused = self._refuse_writer(request, name)
        if refused is not None:
            return refused
        report = await self._read_report(request, name)
        if isinstance(report, web.Response):
            return report
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
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(VIEW_FIRST_WAIT_S):
                    await self._view_ready.wait()
        if self._view is None:
            return _error(503, "the view is not built yet", {"Retry-After": "5"})
        return web.Response(body=self._view, content_type="application/json")

    async def listing(self, request: web.Request) -> web.Response:
        if not self._may_read(request):
            return self._deny()
        return web.json_response(self.state.listing(self.sources.status))

    async def healthz(self, _request: web.Request) -> web.Response:
        if self.died:
            name, why = next(iter(self.died.items()))
            return web.Response(status=503, text=f"task {name} ended: {why}\n")
        return web.Response(text="ok\n")

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def openapi(self, _request: web.Request) -> web.Response:
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
