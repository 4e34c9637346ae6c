"""``image-agent cluster serve``: the assembled list over HTTP, and every node's report.

One asyncio process (aiohttp). Sources are re-read when their file changes
(checked every 2 s) or every ``source_interval`` for URLs; a failing source
keeps its last good contribution. Each node gets the list for its labels
with a strong ETag; ``If-None-Match`` answers 304, and ``?wait=30s`` holds
the request until the list changes. Agents PUT their status; ``/v1/status``
is the cluster view.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import ssl
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from agent import config
from agent.cluster import assemble, sources
from agent.cluster.assemble import Assembled, Contribution

MAX_BODY = 1 << 20
MAX_WAIT_S = 60.0
URL_TIMEOUT_S = 5.0
FILE_POLL_S = 2.0
STALE_AFTER_S = 900.0


@dataclass
class Source:
    """One configured source: how to read it and which nodes it is for."""

    kind: str  # images, cr, list, che, env
    target: str
    selector: tuple[tuple[str, str], ...] = ()
    number: int = 0  # tells inline strings apart

    @property
    def id(self) -> str:
        if self.kind == "images" and not self.target.startswith("@"):
            return f"images:inline#{self.number}"
        return f"{self.kind}:{self.target}"

    @property
    def is_url(self) -> bool:
        return self.target.startswith(("http://", "https://"))

    def load(self) -> Contribution:
        """Read and parse (blocking: run it in a thread). Raises SourceError."""
        text = self.target
        if self.kind == "images" and text.startswith("@"):
            text = _read_file(text[1:])
        elif self.kind == "che":
            return self._load_che()
        elif self.kind != "images":
            text = _fetch(self.target) if self.is_url else _read_file(self.target)
        parser = {
            "images": sources.images_string,
            "cr": sources.custom_resource,
            "list": sources.plain_list,
            "env": sources.env_file,
        }[self.kind]
        parsed = parser(text, self.id)
        return Contribution(self.id, tuple(parsed.entries), tuple(parsed.problems), self.selector)

    def _load_che(self) -> Contribution:
        base = self.target.rstrip("/")
        editors = sources.che_editors(
            _fetch(base + sources.EDITORS_PATH), base + sources.EDITORS_PATH
        )
        entries, problems = list(editors.entries), list(editors.problems)
        samples_url = base + sources.SAMPLES_PATH
        for name, url in sources.che_sample_urls(_fetch(samples_url), samples_url):
            full = url if url.startswith(("http://", "https://")) else base + "/" + url.lstrip("/")
            parsed = sources.che_sample_devfile(_fetch(full), full, name)
            entries += parsed.entries
            problems += parsed.problems
        return Contribution(self.id, tuple(entries), tuple(problems), self.selector)

    def signature(self) -> tuple[int, int] | None:
        """(mtime in ns, size) of a file source, so a rewrite within one mtime tick still shows."""
        path = (
            self.target[1:]
            if self.kind == "images" and self.target.startswith("@")
            else (
                None if self.kind == "images" or self.is_url or self.kind == "che" else self.target
            )
        )
        if path is None:
            return None
        try:
            st = os.stat(path)
        except OSError:
            return -1, -1
        return st.st_mtime_ns, st.st_size


def _read_file(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as err:
        raise sources.SourceError(f"{path}: {err.strerror or err}") from None


def _fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as resp:
            return str(resp.read(8 << 20).decode())
    except (OSError, ValueError) as err:
        raise sources.SourceError(f"{url}: {getattr(err, 'reason', err)}") from None


def parse_selector(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"node selector {text!r}: want key=value[,key=value]")
        pairs.append((k.strip(), v.strip()))
    return tuple(sorted(pairs))


def parse_source(kind: str, text: str, number: int = 0) -> Source:
    """``VALUE`` or ``VALUE;node-selector=k=v,k2=v2``."""
    value, _, extra = text.partition(";node-selector=")
    return Source(kind, value, parse_selector(extra) if extra else (), number)


@dataclass
class NodeReport:
    """What the cluster keeps of a node's report: compact, strings shared across nodes."""

    name: str
    labels: dict[str, str]
    pulls: dict[str, tuple[str, str]]  # image -> (state, last error)
    archives: dict[str, int]  # state -> count
    received_at: float

    @classmethod
    def from_doc(cls, name: str, doc: dict[str, Any], now: float) -> NodeReport:
        intern = sys.intern
        labels = {intern(str(k)): intern(str(v)) for k, v in (doc.get("labels") or {}).items()}
        pulls = {
            intern(p["image"]): (intern(p["state"]), str(p.get("last_error") or ""))
            for p in doc.get("pulls", [])
        }
        archives: dict[str, int] = {}
        for a in doc.get("archives") or []:
            state = intern(str(a.get("state", "")) if isinstance(a, dict) else "")
            archives[state] = archives.get(state, 0) + 1
        return cls(intern(name), labels, pulls, archives, now)


@dataclass
class State:
    sources: list[Source]
    rules: list[tuple[str, str]]
    contributions: dict[str, Contribution] = field(default_factory=dict)
    source_status: dict[str, dict[str, Any]] = field(default_factory=dict)
    assembled: Assembled = field(default_factory=lambda: Assembled([], [], []))
    version: int = 0
    nodes: dict[str, NodeReport] = field(default_factory=dict)
    cache: dict[tuple[tuple[str, str], ...], tuple[list[str], str]] = field(default_factory=dict)

    def rebuild(self) -> bool:
        ordered = [self.contributions[s.id] for s in self.sources if s.id in self.contributions]
        new = assemble.assemble(ordered, self.rules)
        changed = [i.to_json() for i in new.items] != [i.to_json() for i in self.assembled.items]
        self.assembled = new
        if changed:
            self.version += 1
            self.cache.clear()
        return changed

    def for_labels(self, labels: tuple[tuple[str, str], ...]) -> tuple[list[str], str]:
        hit = self.cache.get(labels)
        if hit is None:
            images = self.assembled.for_node(dict(labels))
            hit = (images, assemble.etag(images))
            if len(self.cache) < 10_000:
                self.cache[labels] = hit
        return hit


class Server:
    def __init__(
        self,
        state: State,
        *,
        token: str = "",
        auth_reads: bool = False,
        source_interval: float = 60.0,
        log: structlog.typing.FilteringBoundLogger,
    ) -> None:
        self.state = state
        self.token = token
        self.auth_reads = auth_reads
        self.source_interval = source_interval
        self.log = log
        self.changed = asyncio.Event()
        self.registry = CollectorRegistry()
        self.m_requests = Counter(
            "image_agent_cluster_requests",
            "HTTP requests",
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
        self._signatures: dict[str, tuple[int, int] | None] = {}
        self._loaded_at: dict[str, float] = {}

    # -- sources ----------------------------------------------------------------

    async def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        changed_any = False
        for src in self.state.sources:
            signature = src.signature()
            due = force or src.id not in self._loaded_at
            if signature is not None and signature != self._signatures.get(src.id):
                due = True
            if (src.is_url or src.kind == "che") and now - self._loaded_at.get(
                src.id, 0
            ) >= self.source_interval:
                due = True
            if not due:
                continue
            self._signatures[src.id] = signature
            self._loaded_at[src.id] = now
            try:
                contribution = await asyncio.to_thread(src.load)
            except sources.SourceError as err:
                self.state.source_status[src.id] = {
                    "ok": False,
                    "error": str(err),
                    "checked_at": time.time(),
                }
                self.m_source_ok.labels(src.id).set(0)
                self.log.warning("source.failed", source=src.id, error=str(err))
                continue
            self.state.contributions[src.id] = contribution
            self.state.source_status[src.id] = {
                "ok": True,
                "error": "",
                "checked_at": time.time(),
                "images": len(contribution.entries),
                "invalid": len(contribution.problems),
            }
            self.m_source_ok.labels(src.id).set(1)
            changed_any = True
        if changed_any and self.state.rebuild():
            self.m_images.set(len(self.state.assembled.items))
            self.log.info(
                "list.changed", version=self.state.version, images=len(self.state.assembled.items)
            )
            self.changed.set()
            self.changed = asyncio.Event()

    async def refresher(self) -> None:
        while True:
            await asyncio.sleep(FILE_POLL_S)
            await self.refresh()

    # -- HTTP -----------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        if not self.token:
            return True
        header = request.headers.get("Authorization", "")
        return hmac.compare_digest(header.encode(), f"Bearer {self.token}".encode())

    def _deny(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"error": "a valid bearer token is required"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="image-agent"'},
        )

    async def images(self, request: web.Request) -> web.StreamResponse:
        if self.auth_reads and not self._authorized(request):
            return self._deny(request)
        try:
            labels = parse_selector(request.query.get("labels", ""))
            wait = min(MAX_WAIT_S, config.parse_duration(request.query.get("wait", "0")))
        except ValueError as err:
            return web.json_response({"error": str(err)}, status=400)
        images, tag = self.state.for_labels(labels)
        if request.headers.get("If-None-Match") == tag and wait > 0:
            event = self.changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), wait)
            images, tag = self.state.for_labels(labels)
        headers = {"ETag": tag, "Cache-Control": "no-cache"}
        if request.headers.get("If-None-Match") == tag:
            return web.Response(status=304, headers=headers)
        if "application/json" in request.headers.get("Accept", ""):
            return web.json_response(
                {"images": images, "version": self.state.version}, headers=headers
            )
        return web.Response(
            body=assemble.render(images), content_type="text/plain", headers=headers
        )

    async def put_status(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._deny(request)
        name = request.match_info["name"]
        if not name or len(name) > 253:
            return web.json_response({"error": "invalid node name"}, status=400)
        if request.content_length is not None and request.content_length > MAX_BODY:
            return web.json_response({"error": f"body larger than {MAX_BODY} bytes"}, status=413)
        try:
            body = await request.content.read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                return web.json_response(
                    {"error": f"body larger than {MAX_BODY} bytes"}, status=413
                )
            doc = json.loads(body)
        except ValueError as err:
            return web.json_response({"error": f"not valid JSON ({err})"}, status=400)
        problem = _check_report(doc)
        if problem:
            return web.json_response({"error": problem}, status=400)
        self.state.nodes[name] = NodeReport.from_doc(name, doc, time.time())
        self.m_nodes.set(len(self.state.nodes))
        return web.Response(status=204)

    async def status(self, request: web.Request) -> web.Response:
        if self.auth_reads and not self._authorized(request):
            return self._deny(request)
        return web.json_response(cluster_view(self.state, time.time()))

    async def listing(self, request: web.Request) -> web.Response:
        if self.auth_reads and not self._authorized(request):
            return self._deny(request)
        a = self.state.assembled
        return web.json_response(
            {
                "version": self.state.version,
                "images": [i.to_json() for i in a.items],
                "report": a.report,
                "invalid": a.problems,
                "sources": self.state.source_status,
            }
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.add_routes(
            [
                web.get("/v1/images", self.images),
                web.put("/v1/nodes/{name}/status", self.put_status),
                web.get("/v1/status", self.status),
                web.get("/v1/list", self.listing),
                web.get("/healthz", self.healthz),
                web.get("/metrics", self.metrics),
            ]
        )
        return app


def _check_report(doc: Any) -> str:
    if not isinstance(doc, dict):
        return "the report must be a JSON object"
    if not isinstance(doc.get("labels", {}), dict):
        return "labels must be an object"
    pulls = doc.get("pulls", [])
    if not isinstance(pulls, list) or not all(
        isinstance(p, dict) and isinstance(p.get("image"), str) and isinstance(p.get("state"), str)
        for p in pulls
    ):
        return "pulls must be a list of {image, state, ...}"
    return ""


def cluster_view(state: State, now: float) -> dict[str, Any]:
    """For each image: nodes that have it, are pulling it, failed (with reasons), or are stale."""
    images: dict[str, dict[str, Any]] = {}
    for item in state.assembled.items:
        images[item.image] = {
            "present": [],
            "pulling": [],
            "failed": {},
            "missing": [],
            "stale": [],
        }
    complete = 0
    for node in sorted(state.nodes.values(), key=lambda n: n.name):
        stale = now - node.received_at > STALE_AFTER_S
        pulls = node.pulls
        wanted = state.assembled.for_node(node.labels)
        ok = not stale
        for image in wanted:
            row = images[image]
            p = pulls.get(image)
            if stale:
                row["stale"].append(node.name)
            elif p is None:
                row["missing"].append(node.name)
                ok = False
            elif p[0] in ("present", "pulled"):
                row["present"].append(node.name)
            elif p[0] in ("pulling", "retrying") and not p[1]:
                row["pulling"].append(node.name)
                ok = False
            else:
                row["failed"][node.name] = p[1] or p[0]
                ok = False
        complete += ok
    return {
        "summary": {
            "nodes": len(state.nodes),
            "complete": complete,
            "images": len(images),
            "version": state.version,
        },
        "images": images,
        "nodes": {
            n.name: {"labels": n.labels, "received_at": n.received_at, "archives": n.archives}
            for n in state.nodes.values()
        },
    }


def summary_line(view: dict[str, Any]) -> str:
    """``37/40 nodes complete; 3 missing che-code:1.2 (unauthorized)``."""
    s = view["summary"]
    text = f"{s['complete']}/{s['nodes']} nodes complete"
    problems = []
    for image, row in view["images"].items():
        short = image.rsplit("/", 1)[-1]
        failed = row["failed"]
        missing = len(failed) + len(row["missing"]) + len(row["pulling"])
        if missing:
            reasons = sorted({str(r).split(":")[0] for r in failed.values()})
            why = f" ({', '.join(reasons)})" if reasons else ""
            problems.append(f"{missing} missing {short}{why}")
    return text + ("; " + "; ".join(problems) if problems else "")


async def serve(
    state: State,
    listen: str,
    *,
    token: str,
    auth_reads: bool,
    tls: tuple[str, str] | None,
    source_interval: float,
    log: structlog.typing.FilteringBoundLogger,
    ready: Callable[[int], None] = lambda port: None,
    stop: asyncio.Event | None = None,
) -> None:
    server = Server(
        state, token=token, auth_reads=auth_reads, source_interval=source_interval, log=log
    )
    await server.refresh(force=True)
    runner = web.AppRunner(server.app(), access_log=None, shutdown_timeout=3.0)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    context = None
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)
    site = web.TCPSite(
        runner, host.strip("[]") or "0.0.0.0", int(port), ssl_context=context, backlog=1024
    )
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    log.info(
        "cluster.serving",
        listen=f"{host}:{bound}",
        sources=len(state.sources),
        images=len(state.assembled.items),
    )
    ready(int(bound))
    task = asyncio.create_task(server.refresher())
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        task.cancel()
        server.changed.set()  # long polls answer now instead of holding the shutdown
        await runner.cleanup()
