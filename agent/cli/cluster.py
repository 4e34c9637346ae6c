"""``cluster status`` and ``cluster images`` (what the server has), ``cluster token``."""

from __future__ import annotations

import argparse
import json
import os
import threading

from pydantic import ValidationError

from agent.cli import render
from agent.cli.common import EXIT_OK, EXIT_UNAVAILABLE, read_token
from agent.cluster import schema
from agent.cluster.state import summary_line
from agent.cluster.sync import ClusterClient, ClusterError
from agent.cluster.tokens import MIN_SECRET_BYTES, is_placeholder, node_token
from agent.errors import UsageError

_PATHS = {"status": "/v1/status", "images": "/v1/list"}


def cmd_cluster_view(args: argparse.Namespace, stop: threading.Event) -> int:
    """``cluster status`` (node x image) and ``cluster images`` (the list), from the server."""
    path = _PATHS[args.cluster_command]
    client = ClusterClient(args.cluster_url, read_token(args.token_file))
    try:
        doc = client.get_json_sync(path)
    except ClusterError as err:
        render.error(err)
        return EXIT_UNAVAILABLE
    if args.output == "json":
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    try:
        if args.cluster_command == "status":
            matrix = render.cluster_matrix(schema.StatusView.model_validate(doc))
            if matrix:
                print(matrix)
            print(summary_line(doc))
        else:
            render.cluster_listing(schema.Listing.model_validate(doc))
    except ValidationError as err:
        render.error(f"{args.cluster_url}{path}: {schema.first_error(err)}")
        return EXIT_UNAVAILABLE
    return EXIT_OK


def node_secret(path: str) -> bytes:
    secret = read_token(path, "node secret").encode()
    if is_placeholder(secret):
        raise UsageError(
            f"node secret file {path}: still the example value; generate one (openssl rand -hex 32)"
        )
    if secret and len(secret) < MIN_SECRET_BYTES:
        raise UsageError(f"node secret file {path}: want at least {MIN_SECRET_BYTES} bytes")
    return secret


def cmd_cluster_token(args: argparse.Namespace, stop: threading.Event) -> int:
    path = args.node_secret_file or os.environ.get("IMAGE_AGENT_CLUSTER_NODE_SECRET_FILE", "")
    if not path:
        raise UsageError("--node-secret-file (or IMAGE_AGENT_CLUSTER_NODE_SECRET_FILE) is needed")
    if not schema.valid_node_name(args.node):
        raise UsageError(f"{args.node!r}: not a DNS-1123 node name")
    print(node_token(node_secret(path), args.node))
    return EXIT_OK
