"""``cluster serve``: assemble the list from its sources and serve it to the nodes."""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import threading
from dataclasses import dataclass

from agent import config, logs
from agent.cli.cluster import node_secret
from agent.cli.common import EXIT_OK, read_token
from agent.cluster import assemble
from agent.cluster.fetch import Source, Sources, parse_source
from agent.cluster.http import Options, serve
from agent.cluster.state import State
from agent.cluster.tokens import Credentials, is_placeholder
from agent.errors import UsageError

_MAX_PORT = 65535


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
    credentials = Credentials(shared=shared, node_secret=node_secret(cfg.node_secret_file))
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
