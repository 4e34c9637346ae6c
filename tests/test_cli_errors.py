"""The system saying no (busy port, impossible directory, bad flags): one line, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("image-agent:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_cluster_serve_on_a_busy_port() -> None:
    """`cluster serve` on a port in use exits 1 with one line naming the cause."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run(
            "cluster", "serve", "--listen", f"127.0.0.1:{port}", "--source-images", "alpine"
        )
    assert result.returncode == 1
    assert "address already in use" in one_line(result)


def test_run_with_an_images_dir_that_cannot_be_made(tmp_path: Path) -> None:
    """`run` with an images directory it cannot create exits with one line, no traceback."""
    result = run(
        "run",
        "--images-dir",
        "/proc/nope/images",
        "--state-dir",
        str(tmp_path / "s"),
        "--listen",
        "",
        "--address",
        str(tmp_path / "none.sock"),
    )
    assert result.returncode == 1
    assert "/proc/nope" in one_line(result)


def test_bad_flags_are_usage_errors(tmp_path: Path) -> None:
    """Invalid durations, platforms and selectors exit 2 with the flag named."""
    bad_timeout = run("pull", "--pull-timeout", "soon", "alpine")
    assert bad_timeout.returncode == 2 and "--pull-timeout" in one_line(bad_timeout)
    bad_platform = run("import", "--platform", "a/b/c/d", str(tmp_path / "x.tar"))
    assert bad_platform.returncode == 2 and "invalid platform" in one_line(bad_platform)
    bad_selector = run("cluster", "serve", "--source-images", "alpine;node-selector=oops")
    assert bad_selector.returncode == 2 and "node selector" in one_line(bad_selector)
