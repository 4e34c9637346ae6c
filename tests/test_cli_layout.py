"""The command line's wiring: every command dispatches, and server documents are read typed."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agent.cli import COMMANDS, command, render
from agent.cli.parser import build_parser
from agent.cluster import schema
from tests.conftest import ROOT


def _names(parser: argparse.ArgumentParser, prefix: str = "") -> Iterator[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{prefix}{name}"
                nested = list(_names(sub, f"{full} "))
                yield from nested or [full]


def test_every_command_in_the_parser_dispatches_to_a_function() -> None:
    """Each command and cluster subcommand the parser accepts names a function in COMMANDS, and no entry is left over."""
    names = set(_names(build_parser()))
    assert "cluster serve" in names and "import" in names
    assert names == set(COMMANDS)
    for name in names:
        assert callable(command(name)), name


def _serve(doc: object) -> ThreadingHTTPServer:
    body = json.dumps(doc).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def off_schema_server() -> Iterator[str]:
    server = _serve({"summary": {"nodes": "many"}, "images": [], "version": "x"})
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("sub", ["status", "images"])
def test_cluster_view_of_a_document_off_the_schema(off_schema_server: str, sub: str) -> None:
    """`cluster status|images` given a document that does not fit the schema exits 3 with one line naming the field; -o json still prints it as received."""
    args = [sys.executable, "-m", "agent", "cluster", sub, "--cluster-url", off_schema_server]
    result = subprocess.run(args, check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("image-agent: "), result.stderr
    assert {"status": ": summary.nodes: ", "images": ": version: "}[sub] in lines[0]
    as_json = subprocess.run(
        [*args, "-o", "json"], check=False, capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout)["version"] == "x"


def test_cluster_matrix_cells() -> None:
    """The node x image matrix puts ok, failed, pulling, stale, missing or - in each cell, nodes in name order."""
    row = {"present": ["a"], "pulling": ["c"], "failed": {"b": "unauthorized"}}
    view = schema.StatusView.model_validate(
        {
            "summary": {"nodes": 5, "complete": 1, "images": 1, "version": 1, "built_at": 0.0},
            "images": {"x:1": {**row, "missing": ["e"], "stale": ["d"]}},
            "nodes": {n: {"labels": {}, "received_at": 0.0, "archives": {}} for n in "fedcba"},
        }
    )
    lines = render.cluster_matrix(view).splitlines()
    assert lines[0].split() == ["IMAGE", "a", "b", "c", "d", "e", "f"]
    assert lines[1].split() == ["x:1", "ok", "failed", "pulling", "stale", "missing", "-"]
    empty = view.model_copy(update={"images": {}})
    assert render.cluster_matrix(empty) == ""
