"""The node side: follow the cluster's list and report this node's status.

The list is long-polled with its ETag, kept in the state directory (so the
node keeps working from it while the cluster is unreachable) and fed to the
puller as one more source. The status is sent when it changes, and at
least every ``report_interval``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from agent import lists
from agent.daemon.state import write_atomic
from agent.pull.engine import Puller

SOURCE = "cluster"
CACHE_FILE = "cluster-list.json"
WAIT_S = 30.0
CHECK_S = 5.0


class ClusterClient:
    """HTTP calls to ``image-agent cluster serve``."""

    def __init__(self, url: str, token: str = "", timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(
            self.url + path, data=body, method=method, headers=dict(headers or {})
        )
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                return resp.status, dict(resp.headers), resp.read(16 << 20)
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read(1 << 16)

    def images(
        self, node: str, labels: dict[str, str], etag: str = "", wait: float = 0.0
    ) -> tuple[int, str, str]:
        """(HTTP status, ETag, list text); 304 when ``etag`` is still current."""
        query = urllib.parse.urlencode(
            {
                "node": node,
                "labels": ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
                **({"wait": f"{wait:g}s"} if wait else {}),
            }
        )
        status, headers, body = self._request(
            "GET",
            f"/v1/images?{query}",
            headers={"If-None-Match": etag} if etag else {},
            timeout=wait + self.timeout,
        )
        return status, headers.get("ETag", ""), body.decode(errors="replace")

    def put_status(self, node: str, report: dict[str, Any]) -> int:
        status, _, _ = self._request(
            "PUT",
            f"/v1/nodes/{urllib.parse.quote(node, safe='')}/status",
            body=json.dumps(report).encode(),
            headers={"Content-Type": "application/json"},
        )
        return status

    def get_json(self, path: str) -> Any:
        status, _, body = self._request("GET", path)
        if status != 200:
            raise OSError(f"{self.url}{path}: HTTP {status} {body[:200].decode(errors='replace')}")
        return json.loads(body)


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
    ) -> None:
        self.client = client
        self.node = node
        self.labels = labels
        self.cache = state_dir / CACHE_FILE
        self.puller = puller
        self.report = report
        self.log = log
        self.report_interval = report_interval
        self.stop_event = threading.Event()
        self.etag = ""
        self._threads = [
            threading.Thread(target=self._poll, name="cluster-poll", daemon=True),
            threading.Thread(target=self._report, name="cluster-report", daemon=True),
        ]

    def start(self) -> None:
        self._load_cache()
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self._threads:
            t.join(timeout=2)

    def _load_cache(self) -> None:
        try:
            doc = json.loads(self.cache.read_text())
            self.etag, text = str(doc["etag"]), str(doc["list"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        self._apply(text)
        self.log.info("cluster.list_cached", images=len(text.splitlines()))

    def _apply(self, text: str) -> None:
        entries, problems = lists.parse(text, SOURCE)
        self.puller.set_source(SOURCE, entries, problems)

    def _poll(self) -> None:
        delay = 1.0
        failing = False
        while not self.stop_event.is_set():
            try:
                status, etag, text = self.client.images(self.node, self.labels, self.etag, WAIT_S)
            except OSError as err:
                status, etag, text = 0, "", str(getattr(err, "reason", err))
            if status == 200:
                self.etag = etag
                write_atomic(self.cache, json.dumps({"etag": etag, "list": text}).encode())
                self._apply(text)
                self.log.info("cluster.list", images=len(text.splitlines()), etag=etag)
            if status in (200, 304):
                delay, failing = 1.0, False
                continue
            if not failing:
                self.log.warning(
                    "cluster.unreachable", url=self.client.url, status=status, error=text[:200]
                )
                failing = True
            self.stop_event.wait(delay)
            delay = min(60.0, delay * 2)

    def _report(self) -> None:
        last_digest, last_sent = "", 0.0
        while not self.stop_event.wait(CHECK_S if last_sent else 0.5):
            doc = {"node": self.node, "labels": self.labels, **self.report()}
            digest = hashlib.sha256(
                json.dumps(doc, sort_keys=True, default=str).encode()
            ).hexdigest()
            if digest == last_digest and time.monotonic() - last_sent < self.report_interval:
                continue
            try:
                status = self.client.put_status(self.node, {**doc, "sent_at": time.time()})
            except OSError as err:
                status = 0
                self.log.warning("cluster.report_failed", error=str(err))
            if status == 204:
                last_digest, last_sent = digest, time.monotonic()
            elif status:
                self.log.warning("cluster.report_refused", status=status)
                last_sent = time.monotonic()
