"""The cluster server as a separate process, and small HTTP servers that stand in for
the sources it reads (Che dashboards, list URLs), shared by the cluster tests."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from agent.testing.processes import wait_for

ROOT = Path(__file__).resolve().parent.parent


class FixtureServer:
    """Serves Che-shaped JSON/YAML (and lists) from a dict; paths can be made to fail."""

    def __init__(self, files: dict[str, bytes], basic_auth: str = "", trickle: int = 0) -> None:
        """``trickle``: send bodies in pieces of this many bytes, paced, as a slow link would."""
        self.files = files
        self.failing: set[str] = set()
        outer = self
        wanted = "Basic " + base64.b64encode(basic_auth.encode()).decode() if basic_auth else ""

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if wanted and self.headers.get("Authorization") != wanted:
                    self.send_response(401)
                    self.end_headers()
                    return
                if self.path in outer.failing or self.path not in outer.files:
                    self.send_response(500 if self.path in outer.failing else 404)
                    self.end_headers()
                    return
                body = outer.files[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                step = trickle or len(body) or 1
                for at in range(0, len(body), step):
                    self.wfile.write(body[at : at + step])
                    self.wfile.flush()
                    if trickle:
                        time.sleep(0.002)  # pacing, as a slow link would

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class ClusterProcess:
    """``image-agent cluster serve`` on a free loopback port, up and answering /healthz."""

    def __init__(self, tmp: Path, *args: str, scheme: str = "http", cafile: str = "") -> None:
        self.context = ssl.create_default_context(cafile=cafile) if cafile else None
        self.log = Path(tempfile.mkstemp(prefix="cluster-", suffix=".log", dir=tmp)[1])
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agent",
                    "cluster",
                    "serve",
                    "--listen",
                    "127.0.0.1:0",  # binds a free port and logs it
                    *args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        serving = wait_for(self._serving, 120, "the cluster server to log its port")
        assert serving is not None
        self.port = int(serving["listen"].rpartition(":")[2])
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        wait_for(self._up, 120, "the cluster server")

    def _serving(self) -> dict[str, Any] | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"cluster server exited: {self.log.read_text()[-2000:]}")
        for line in self.log.read_text(errors="replace").splitlines():
            if '"cluster.serving"' in line:
                try:
                    serving: dict[str, Any] = json.loads(line)
                except ValueError:
                    return None  # half-written: read again
                return serving
        return None

    def _up(self) -> bool:
        try:
            with urllib.request.urlopen(
                self.url + "/healthz", timeout=2, context=self.context
            ) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def get(
        self, path: str, headers: dict[str, str] | None = None, timeout: float = 10
    ) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.context) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, dict(err.headers), err.read()

    def put(self, path: str, body: bytes, token: str = "") -> int:
        req = urllib.request.Request(self.url + path, data=body, method="PUT")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as err:
            err.close()
            return int(err.code)

    def listing(self) -> dict[str, Any]:
        listing: dict[str, Any] = json.loads(self.get("/v1/list")[2])
        return listing

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
