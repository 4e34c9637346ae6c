"""The cluster component at its edges: long bodies, failed TLS handshakes, mistyped
credentialed URLs, settings from the environment, the agent's pace after errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.testing.processes import wait_for
from tests.cluster_servers import FixtureServer
from tests.conftest import ROOT, StartCluster, StartDaemon

BIG = 40_000  # images; their list is well over 1 MB in every form


def big_list() -> list[str]:
    return [f"registry.example.com/team/image-{i:05d}:1" for i in range(BIG)]


def test_url_source_over_a_megabyte_is_read_whole(cluster: StartCluster) -> None:
    """A list URL whose body arrives in many pieces contributes every image, not its first chunk."""
    body = "".join(f"{i}\n" for i in big_list()).encode()
    assert len(body) > 1 << 20
    src = FixtureServer({"/big.txt": body}, trickle=16 << 10)
    try:
        c = cluster("--source-list", f"{src.url}/big.txt")
        status = c.listing()["sources"][f"list:{src.url}/big.txt"]
        assert status["ok"], status
        assert status["images"] == BIG
        assert c.get("/v1/images")[2].count(b"\n") == BIG
    finally:
        src.close()


def test_agent_client_and_cli_read_lists_over_a_megabyte(
    cluster: StartCluster, tmp_path: Path
) -> None:
    """The agent's client and `cluster images`/`status` take answers of several MB whole."""
    from agent.cluster.sync import ClusterClient

    lst = tmp_path / "big.txt"
    lst.write_text("".join(f"{i}\n" for i in big_list()))
    c = cluster("--source-list", str(lst))

    async def poll() -> tuple[int, list[str]]:
        async with ClusterClient(c.url) as client:
            status, _, images = await client.images("n1", {})
            return status, images

    status, images = asyncio.run(poll())
    assert status == 200 and images == sorted(f"{i}" for i in big_list())
    for command in ("images", "status"):
        proc = subprocess.run(
            [sys.executable, "-m", "agent", "cluster", command, "--cluster-url", c.url, "-ojson"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, (command, proc.stderr[-500:])
        assert len(proc.stdout) > 1 << 20
        assert len(json.loads(proc.stdout)["images"]) == BIG, command


class Answers503:
    """An HTTP server that answers every request 503 at once and notes when each list poll came."""

    def __init__(self) -> None:
        self.polls: list[float] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _refuse(self) -> None:
                if self.path.startswith("/v1/images"):
                    outer.polls.append(time.monotonic())
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = _refuse  # noqa: N815 - the name http.server dispatches GET to
            do_PUT = _refuse  # noqa: N815 - the name http.server dispatches PUT to

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.containerd
def test_agent_keeps_its_minimum_poll_interval_after_errors(daemon: StartDaemon) -> None:
    """A cluster answering 503 at once is polled no more often than --cluster-min-poll (backoff starts there)."""
    server = Answers503()
    try:
        a = daemon("--cluster-url", server.url, "--node-name", "n1", "--cluster-min-poll", "3")
        a.start()
        wait_for(lambda: len(server.polls) >= 3, 60, "three polls")
        gaps = [t1 - t0 for t0, t1 in zip(server.polls, server.polls[1:], strict=False)]
        assert min(gaps) >= 3 - 0.2, f"polls {gaps} s apart"
        assert len(a.named("cluster.unreachable")) == 1  # logged once, not per retry
    finally:
        server.close()


def _serve_fails(*args: str, env: dict[str, str] | None = None) -> str:
    """Run cluster serve expecting a start-up refusal; its one stderr line."""
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "cluster", "serve", "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 2, (args, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("image-agent: "), (args, proc.stderr)
    return lines[0]


def test_mistyped_credentialed_url_is_a_one_line_error_without_the_secret() -> None:
    """A source URL that does not parse stops cluster serve with one line, the password left out."""
    for url in ("https://user:s3cret@[::1/list", "http://user:s3cret@host:99999/l", "https://"):
        line = _serve_fails("--source-list", url)
        assert "not a valid URL" in line, line
        assert "s3cret" not in line, line


def test_redaction_never_raises_and_covers_query_tokens() -> None:
    """Userinfo and secret query parameters leave URLs and error texts, even from URLs that do not parse."""
    from agent.cluster.fetch import parse_source, redact, scrub

    broken = "https://user:s3cret@[::1/list"
    assert redact(broken) == "https://***@[::1/list"
    assert "s3cret" not in scrub(f"Invalid IPv6 URL {broken} (user:s3cret)", broken)
    assert "s3cret" not in scrub("password s3cret refused", broken)
    url = (
        "https://gitlab.example/raw/l.txt?ref=main&private_token=glpat-abc123&X-Amz-Signature=f00d"
    )
    shown = redact(url)
    assert (
        shown == "https://gitlab.example/raw/l.txt?ref=main&private_token=***&X-Amz-Signature=***"
    )
    for secret_param in ("access_token", "token", "password", "sig", "api_key", "client_secret"):
        assert "hunter22" not in redact(f"http://h/l?{secret_param}=hunter22&a=b"), secret_param
    assert redact("http://h/l?page=2&tag=v1") == "http://h/l?page=2&tag=v1"
    assert "glpat-abc123" not in scrub("401 for token glpat-abc123", url)
    assert "glpat-abc123" not in parse_source("list", url).id
    assert redact("a=alpine:3;b=busybox?token=x") == "a=alpine:3;b=busybox?token=x"  # no URL


def test_placeholder_secrets_from_the_manifest_are_refused(tmp_path: Path) -> None:
    """cluster serve will not start on the example node secret or token deploy/cluster.yaml ships."""
    import yaml

    docs = list(yaml.safe_load_all((ROOT / "deploy" / "cluster.yaml").read_text()))
    secret = next(d for d in docs if d and d["kind"] == "Secret")["stringData"]
    for key, flag in (("node-secret", "--node-secret-file"), ("token", "--token-file")):
        path = tmp_path / key
        path.write_text(secret[key] + "\n")
        line = _serve_fails(flag, str(path))
        assert "example value" in line and "generate" in line, line
    (tmp_path / "real").write_text("0123456789abcdef0123456789abcdef\n")
    from agent.cluster.tokens import is_placeholder

    assert not is_placeholder((tmp_path / "real").read_text())


def test_node_selector_with_commas_in_one_line_of_environment() -> None:
    """IMAGE_AGENT_CLUSTER_SOURCE_* split at newlines only: a selector's commas stay in its source."""
    import argparse

    from agent import config

    parser = argparse.ArgumentParser()
    config.add_arguments(parser, config.ClusterServeConfig)
    env = {
        "IMAGE_AGENT_CLUSTER_SOURCE_LIST": "https://h/l?a=1,2;node-selector=a=b,c=d",
        "IMAGE_AGENT_CLUSTER_SOURCE_IMAGES": "a=alpine:3;node-selector=k=v,x=y\nb=busybox",
        "IMAGE_AGENT_CLUSTER_REWRITE": "quay.io=mirror/quay,docker.io=mirror/hub",
    }
    cfg = config.resolve(config.ClusterServeConfig, parser.parse_args([]), env)
    assert cfg.source_list == ("https://h/l?a=1,2;node-selector=a=b,c=d",)
    assert cfg.source_images == ("a=alpine:3;node-selector=k=v,x=y", "b=busybox")
    assert cfg.rewrite == ("quay.io=mirror/quay", "docker.io=mirror/hub")  # still comma-separated


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_failed_tls_handshakes_give_their_connection_slots_back(
    cluster: StartCluster, tmp_path: Path
) -> None:
    """Plain HTTP sent to the TLS port (a failed handshake each) cannot use up --max-connections for good."""
    cert, key = _self_signed(tmp_path)
    c = cluster(
        "--source-images",
        "alpine:3.19",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--max-connections",
        "20",
        "--header-timeout",
        "2",
        scheme="https",
        cafile=str(cert),
    )
    for _ in range(25):
        with socket.create_connection(("127.0.0.1", c.port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(OSError):
                while s.recv(4096):  # until the server gives up on the handshake
                    pass
    # Each slot is given back at the handshake timeout (2 s) and a margin (2 s).
    wait_for(c._up, 30, "HTTPS /healthz to answer again")
    assert all(c._up() for _ in range(30))  # more connections than the cap: slots are reused
    assert b"Traceback" not in c.log.read_bytes()


@pytest.mark.containerd
def test_agent_takes_a_list_over_a_megabyte(
    cluster: StartCluster, daemon: StartDaemon, tmp_path: Path
) -> None:
    """The agent applies and caches a cluster list of more than 1 MB whole (it was cut at one chunk)."""
    long_path = "p" * 200
    images = [f"127.0.0.1:1/{long_path}/image-{i:04d}:1" for i in range(5_000)]
    lst = tmp_path / "long.txt"
    lst.write_text("".join(f"{i}\n" for i in images))
    c = cluster("--source-list", str(lst))
    assert len(c.get("/v1/images", {"Accept": "application/json"})[2]) > 1 << 20
    a = daemon("--cluster-url", c.url, "--node-name", "n1", "--pull-concurrency", "1")
    a.start()
    wait_for(lambda: a.named("cluster.list"), 60, "the list")
    assert [int(e["images"]) for e in a.named("cluster.list")] == [len(images)]
    cached = json.loads((a.state / "cluster-list.json").read_text())
    assert cached["images"] == images
    assert not a.named("cluster.unreachable")


@settings(max_examples=300, deadline=None)
@given(
    user=st.text(min_size=1, max_size=12),
    password=st.text(alphabet=st.characters(blacklist_characters="/?#@"), min_size=8, max_size=16),
    rest=st.text(max_size=40),
)
def test_redaction_of_arbitrary_urls(user: str, password: str, rest: str) -> None:
    """Whatever follows the credentials (unparseable hosts included), redact and scrub never raise nor show the password."""
    from agent.cluster.fetch import redact, scrub

    user = "".join(ch for ch in user if ch not in "/?#@") or "u"
    password = "P" + password + "wwww"
    url = f"https://{user}:{password}@{rest}"
    shown = scrub(f"GET {url}: failed", url)
    assert password not in redact(url) or password in rest
    assert password not in shown or password in rest
