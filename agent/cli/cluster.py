"""``cluster``: ``serve`` the list, print a node's ``token``, show ``status`` and ``images``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import threading
from dataclasses import dataclass

from pydantic import ValidationError

from agent import config, logs
from agent.cli import render
from agent.cli.common import EXIT_OK, EXIT_UNAVAILABLE, read_token
from agent.cluster import assemble, schema
from agent.cluster.fetch import Source, Sources, parse_source
from agent.cluster.http import Options, serve
from agent.cluster.state import State, summary_line
from agent.cluster.sync import ClusterClient, ClusterError
from agent.cluster.tokens import MIN_SECRET_BYTES, Credentials, is_placeholder, node_token
from agent.errors import UsageError

_MAX_PORT = 65535
_PATHS = {"status": "/v1/status", "images": "/v1/list"}


def cmd_cluster(args: argparse.Namespace, stop: threading.Event) -> int:
    if args.cluster_command == "serve":
        return cmd_cluster_serve(args, stop)
    if args.cluster_command == "token":
        return cmd_cluster_token(args)
    return cmd_cluster_view(args)


def cmd_cluster_view(args: argparse.Namespace) -> int:
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


def _node_secret(path: str) -> bytes:
    secret = read_token(path, "node secret").encode()
    if is_placeholder(secret):
        raise UsageError(
            f"node secret file {path}: still the example value; generate one (openssl rand -hex 32)"
        )
    if secret and len(secret) < MIN_SECRET_BYTES:
        raise UsageError(f"node secret file {path}: want at least {MIN_SECRET_BYTES} bytes")
    return secret


def cmd_cluster_token(args: argparse.Namespace) -> int:
    path = args.node_secret_file or os.environ.get("IMAGE_AGENT_CLUSTER_NODE_SECRET_FILE", "")
    if not path:
        raise UsageError("--node-secret-file (or IMAGE_AGENT_CLUSTER_NODE_SECRET_FILE) is needed")
    if not schema.valid_node_name(args.node):
        raise UsageError(f"{args.node!r}: not a DNS-1123 node name")
    print(node_token(_node_secret(path), args.node))
    return EXIT_OK


def _check_bounds(cfg: config.ClusterServeConfig) -> None:
    """The listen address, TLS pair, counts and durations make sense together."""
    _, sep, port = cfg.listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > _MAX_PORT:
        raise UsageError(f"--listen {cfg.listen!r}: want HOST:PORT")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    for name in ("max_connections", "max_long_polls"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: want a positive number")
    for name in ("source_interval_s", "header_timeout_s", "body_timeout_s"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name[:-2].replace('_', '-')}: want a positive duration")
    if cfg.forget_after_s < cfg.stale_after_s:
        raise UsageError("--forget-after must not be shorter than --stale-after")


@dataclass(frozen=True)
class _Served:
    """What ``cluster serve`` was asked to assemble and how to serve it."""

    sources: list[Source]
    rules: list[tuple[str, str]]
    options: Options


def _served(cfg: config.ClusterServeConfig) -> _Served:
    try:
        srcs = [
            parse_source(kind, value, n)
            for kind in ("images", "cr", "list", "che", "env")
            for n, value in enumerate(getattr(cfg, f"source_{kind}"))
        ]
        rules = [assemble.parse_rewrite(r) for r in cfg.rewrite]
    except ValueError as err:
        raise UsageError(str(err)) from None
    _check_bounds(cfg)
    ids = [s.id for s in srcs]
    if len(set(ids)) != len(ids):
        raise UsageError("a source is given twice")
    shared = read_token(cfg.token_file)
    if is_placeholder(shared):
        raise UsageError(
            f"token file {cfg.token_file}: still the example value; generate one "
            "(openssl rand -hex 32)"
        )
    credentials = Credentials(shared=shared, node_secret=_node_secret(cfg.node_secret_file))
    options = Options(
        listen=cfg.listen,
        credentials=credentials,
        auth_reads=cfg.auth_reads,
        tls=(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None,
        source_interval=cfg.source_interval_s,
        max_connections=cfg.max_connections,
        max_long_polls=cfg.max_long_polls,
        header_timeout=cfg.header_timeout_s,
        body_timeout=cfg.body_timeout_s,
        stale_after=cfg.stale_after_s,
        forget_after=cfg.forget_after_s,
    )
    return _Served(srcs, rules, options)


def cmd_cluster_serve(args: argparse.Namespace, stop: threading.Event) -> int:
    cfg = config.resolve(config.ClusterServeConfig, args)
    lcfg = config.resolve(config.LogConfig, args)
    served = _served(cfg)
    logs.configure(lcfg.level, stream=sys.stdout)
    log = logs.get()

    async def main() -> None:
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=lambda: (stop.wait(), loop.call_soon_threadsafe(done.set)), daemon=True
        ).start()
        await serve(
            State(order=[s.id for s in served.sources], rules=served.rules),
            Sources(served.sources, cfg.source_interval_s),
            served.options,
            log=log,
            stop=done,
        )

    try:
        asyncio.run(main())
    except ssl.SSLError as err:
        raise UsageError(f"--tls-cert/--tls-key: {err.reason or err}") from None
    log.info("stopped")
    return EXIT_OK
