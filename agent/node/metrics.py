"""Prometheus metrics and the /healthz and /metrics HTTP endpoints."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.imported = Counter("image_agent_archives_imported", "Archives imported", registry=r)
        self.failed = Counter(
            "image_agent_archives_failed", "Archives that failed to import", registry=r
        )
        self.pending = Gauge(
            "image_agent_archives_pending", "Archives waiting to be imported", registry=r
        )
        self.bytes = Counter(
            "image_agent_imported_bytes", "Archive bytes read by imports", registry=r
        )
        self.duration = Histogram(
            "image_agent_import_duration_seconds",
            "Time to import one archive",
            registry=r,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
        )
        self.last_success = Gauge(
            "image_agent_last_success_timestamp_seconds",
            "When an archive was last imported",
            registry=r,
        )
        self.containerd_up = Gauge(
            "image_agent_containerd_up", "1 if containerd answers", registry=r
        )
        self.pulls = Counter("image_agent_pulls", "Pull checks by outcome", ["outcome"], registry=r)
        self.images_wanted = Gauge(
            "image_agent_images_wanted", "Images in the pull lists", registry=r
        )
        self.images_present = Gauge(
            "image_agent_images_present", "Listed images present on the node", registry=r
        )
        self.pull_duration = Histogram(
            "image_agent_pull_duration_seconds",
            "Time to pull one image",
            registry=r,
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
        )

    def pull_outcome(self, outcome: str, seconds: float | None) -> None:
        self.pulls.labels(outcome).inc()
        if seconds is not None:
            self.pull_duration.observe(seconds)


def serve(
    listen: str, metrics: Metrics, healthy: Callable[[], tuple[bool, str]]
) -> ThreadingHTTPServer:
    """Start the HTTP endpoints on a daemon thread; returns the server (call shutdown())."""
    host, _, port = listen.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, ctype, code = generate_latest(metrics.registry), CONTENT_TYPE_LATEST, 200
            elif self.path == "/healthz":
                ok, text = healthy()
                body, ctype, code = (text + "\n").encode(), "text/plain", 200 if ok else 503
            else:
                body, ctype, code = b"not found\n", "text/plain", 404
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
