"""The node side: follow the cluster's list and report this node's status.

One thread runs an asyncio loop with one aiohttp session (connections are
reused) and two tasks:

- the poller long-polls the list as JSON with its ETag, validates it against
  the shared schema, keeps it in the state directory (so the node keeps
  working from it while the cluster is unreachable) and feeds it to the
  puller as one more source. A body cut short is an error (aiohttp checks
  Content-Length), never a shorter list. Whatever the server answers, two
  requests are at least ``min_interval`` apart;
- the reporter sends the status when it changes, and at least every
  ``report_interval``.

Neither task ends on an error: each failure is logged once (until the next
success) and retried with backoff, the poller never sooner than
``min_interval`` and the reporter never sooner than ``CHECK_S`` after the
failed request began.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from multidict import CIMultiDict

from agent.cluster import schema
from agent.cluster.bodies import BodyTooLarge, read_whole
from agent.errors import AgentError
from agent.image import lists
from agent.node.state import write_atomic
from agent.pull.engine import Puller

SOURCE = "cluster"
CACHE_FILE = "cluster-list.json"
WAIT_S = 30.0
CHECK_S = 5.0
MIN_INTERVAL_S = 10.0
MAX_BACKOFF_S = 60.0


class ClusterError(AgentError):
    """The cluster component could not be reached, or answered something unusable."""

    retryable = True


class ClusterClient:
    """HTTP calls to ``image-agent cluster serve`` (aiohttp; call from one event loop)."""

    def __init__(
        self, url: str, token: str = "", timeout: float = 10.0, *, ca_file: str = ""
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.ca_file = ca_file
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ClusterClient:
        context = ssl.create_default_context(cafile=self.ca_file or None)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout),
            connector=aiohttp.TCPConnector(limit=4, ssl=context),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        seconds: float | None = None,
        limit: int = schema.MAX_LIST_BYTES,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """(status, headers (case-insensitive), whole body) within ``seconds`` (default
        the client's timeout); ClusterError on any failure, short bodies included."""
        if self._session is None:
            raise RuntimeError("use the client as an async context manager")
        all_headers = dict(headers or {})
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        try:
            async with asyncio.timeout(seconds or self.timeout):
                async with self._session.request(
                    method, self.url + path, data=body, headers=all_headers
                ) as resp:
                    data = await read_whole(resp, limit)
                    return resp.status, CIMultiDict(resp.headers), data
        except BodyTooLarge:
            raise ClusterError(f"{self.url}{path}: answer larger than {limit} bytes") from None
        except TimeoutError:
            raise ClusterError(f"{self.url}{path}: no answer in time") from None
        except aiohttp.ClientPayloadError:
            raise ClusterError(f"{self.url}{path}: the answer was cut short") from None
        except (aiohttp.ClientError, OSError, ValueError) as err:
            raise ClusterError(f"{self.url}{path}: {str(err) or type(err).__name__}") from None

    async def images(
        self, node: str, labels: dict[str, str], etag: str = "", wait: float = 0.0
    ) -> tuple[int, str, list[str]]:
        """(HTTP status, ETag, images); 304 (no images) when ``etag`` is still current."""
        query = urllib.parse.urlencode(
            {
                "node": node,
                "labels": ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
                **({"wait": f"{wait:g}s"} if wait else {}),
            }
        )
        headers = {"Accept": "application/json"}
        if etag:
            headers["If-None-Match"] = etag
        status, got, body = await self._request(
            "GET", f"/v1/images?{query}", headers=headers, seconds=wait + self.timeout
        )
        if status != HTTPStatus.OK:
            return status, got.get("ETag", ""), []
        try:
            doc = schema.parse_image_list(body)
        except schema.SchemaError as err:
            raise ClusterError(f"{self.url}: the list does not follow the schema ({err})") from None
        return status, got.get("ETag", ""), doc.images

    async def put_status(self, node: str, report: schema.NodeReport) -> tuple[int, str]:
        """(HTTP status, the server's error text if any)."""
        status, _, body = await self._request(
            "PUT",
            f"/v1/nodes/{urllib.parse.quote(node, safe='')}/status",
            body=report.model_dump_json().encode(),
            headers={"Content-Type": "application/json"},
            limit=1 << 16,
        )
        return status, body[:300].decode(
            errors="replace"
        ) if status >= HTTPStatus.BAD_REQUEST else ""

    async def get_json(self, path: str) -> Any:
        status, _, body = await self._request("GET", path)
        if status != HTTPStatus.OK:
            text = body[:200].decode(errors="replace")
            raise ClusterError(f"{self.url}{path}: HTTP {status} {text}")
        try:
            return json.loads(body)
        except ValueError:
            raise ClusterError(f"{self.url}{path}: the answer is not JSON") from None

    def get_json_sync(self, path: str) -> Any:
        """One GET from synchronous code (the CLI)."""

        async def once() -> Any:
            async with self:
                return await self.get_json(path)

        return asyncio.run(once())


def _reason(err: Exception) -> str:
    """One stable line: the same failure twice gives the same text (temp names left out)."""
    if isinstance(err, AgentError):
        return str(err)
    if isinstance(err, OSError) and err.strerror:
        where = err.filename2 or err.filename
        return f"{err.strerror}: {where}" if where else err.strerror
    return f"{type(err).__name__}: {err}"


def _clip(text: str) -> str:
    limit = schema.MAX_ERROR_CHARS
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_report(node: str, labels: dict[str, str], raw: dict[str, Any]) -> schema.NodeReport:
    """The wire report from the daemon's and puller's own records (errors clipped to the limit)."""
    pulls = [
        schema.PullStatus(
            image=str(p["image"])[:1024],
            state=str(p["state"])[:32] or "unknown",
            last_error=_clip(str(p.get("last_error") or "")),
        )
        for p in raw.get("pulls", [])[: schema.MAX_PULLS]
        if p.get("image")
    ]
    archives = [
        schema.ArchiveStatus(
            path=str(a["path"])[:4096],
            state=str(a["state"])[:32] or "unknown",
            images=[str(i)[:1024] for i in a.get("images") or []][:1000],
            error=_clip(str(a.get("error") or "")),
        )
        for a in raw.get("archives", [])[: schema.MAX_ARCHIVES]
    ]
    return schema.NodeReport(node=node, labels=labels, archives=archives, pulls=pulls)


class ClusterSync:
    def __init__(
        self,
        client: ClusterClient,
        *,
        node: str,
        labels: dict[str, str],
        state_dir: Path,
        puller: Puller,
        report: Callable[[], dict[str, Any]],
        log: structlog.typing.FilteringBoundLogger,
        report_interval: float = 120.0,
        min_interval: float = MIN_INTERVAL_S,
    ) -> None:
        self.client = client
        self.node = node
        self.labels = labels
        self.cache = state_dir / CACHE_FILE
        self.puller = puller
        self.report = report
        self.log = log
        self.report_interval = report_interval
        self.min_interval = min_interval
        self.etag = ""
        self._last: tuple[str, float] = ("", 0.0)  # digest and time of the last report taken
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cluster-sync", daemon=True)

    def start(self) -> None:
        self._load_cache()
        self._thread.start()
        self._started.wait(10)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = stop = asyncio.Event()
        self._started.set()
        async with self.client:
            tasks = [
                asyncio.create_task(
                    self._forever("cluster.unreachable", self._poll_once, stop, self.min_interval)
                ),
                asyncio.create_task(
                    self._forever("cluster.report_failed", self._report_once, stop, CHECK_S)
                ),
            ]
            await stop.wait()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    async def _sleep(stop: asyncio.Event, seconds: float) -> None:
        """Wait ``seconds``, or less if ``stop`` is set meanwhile."""
        if seconds > 0:
            try:
                async with asyncio.timeout(seconds):
                    await stop.wait()
            except TimeoutError:
                pass

    async def _forever(
        self, event: str, once: Callable[[], Any], stop: asyncio.Event, min_gap: float = 0.0
    ) -> None:
        """Run ``once`` until stopped; it returns the seconds to wait before the next round.

        An error is logged once as ``event`` (until a round works again) and
        retried with backoff, never sooner than ``min_gap`` after the failed
        round began: a server that answers errors at once (a restart) is not
        asked more often than one that answers lists.
        """
        backoff, failing = 1.0, ""
        while not stop.is_set():
            started = time.monotonic()
            try:
                delay = await once()
                if failing:
                    self.log.info("cluster.recovered", after=event)
                backoff, failing = 1.0, ""
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - nothing ends this loop but stop()
                why = _reason(err)
                if why != failing:
                    # Unreachable or refused; anything else (a full disk) is this node's trouble.
                    name = event if isinstance(err, ClusterError) else "cluster.sync_failed"
                    self.log.warning(name, url=self.client.url, error=why[:300], task=event)
                failing = why
                delay = max(backoff, min_gap - (time.monotonic() - started))
                backoff = min(MAX_BACKOFF_S, backoff * 2)
            await self._sleep(stop, delay)

    def _load_cache(self) -> None:
        try:
            doc = json.loads(self.cache.read_text())
            etag = str(doc["etag"])
            images = doc["images"] if "images" in doc else str(doc["list"]).splitlines()
            if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
                return
        except (OSError, ValueError, KeyError, TypeError):
            return
        self.etag = etag
        self._apply(images)
        self.log.info("cluster.list_cached", images=len(images))

    def _apply(self, images: list[str]) -> None:
        entries, problems = lists.parse("".join(f"{i}\n" for i in images), SOURCE)
        self.puller.set_source(SOURCE, entries, problems)

    async def _poll_once(self) -> float:
        started = time.monotonic()
        status, etag, images = await self.client.images(self.node, self.labels, self.etag, WAIT_S)
        if status == HTTPStatus.OK:
            data = json.dumps({"etag": etag, "images": images}).encode()
            await asyncio.to_thread(write_atomic, self.cache, data)
            self.etag = etag
            self._apply(images)
            self.log.info("cluster.list", images=len(images), etag=etag)
        elif status != HTTPStatus.NOT_MODIFIED:
            raise ClusterError(f"{self.client.url}: HTTP {status} for the list")
        return self.min_interval - (time.monotonic() - started)

    async def _report_once(self) -> float:
        raw = await asyncio.to_thread(self.report)
        doc = build_report(self.node, self.labels, raw)
        digest = hashlib.sha256(doc.model_dump_json().encode()).hexdigest()
        if digest == self._last[0] and time.monotonic() - self._last[1] < self.report_interval:
            return CHECK_S
        status, why = await self.client.put_status(self.node, doc)
        if status == HTTPStatus.NO_CONTENT:
            self._last = (digest, time.monotonic())
            return CHECK_S
        if HTTPStatus.BAD_REQUEST <= status < HTTPStatus.INTERNAL_SERVER_ERROR:
            # The server refuses this report (credential, schema): say so, and try
            # again at the next interval rather than at once.
            self.log.warning("cluster.report_refused", status=status, error=why)
            self._last = (digest, time.monotonic())
            return CHECK_S
        raise ClusterError(f"{self.client.url}: HTTP {status} for the report")
