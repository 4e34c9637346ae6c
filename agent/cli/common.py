"""What several commands build the same way: exit codes, limits, clients, paths, tokens."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import structlog

from agent import config
from agent.archive import limits
from agent.containerd.client import Containerd, default_address
from agent.errors import UsageError
from agent.image import platforms
from agent.pull import auth as pull_auth
from agent.pull.engine import Puller

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


def apply_limits(args: argparse.Namespace) -> None:
    """Put the archive bounds of --memory-budget and friends in force for this process."""
    acfg = config.resolve(config.ArchiveConfig, args)
    limits.configure(
        limits.Limits(
            memory_budget=acfg.memory_budget,
            max_members=acfg.max_members,
            max_manifests=acfg.max_manifests,
            max_layers=acfg.max_layers,
            max_index_entries=acfg.max_index_entries,
            max_layer_entries=acfg.max_layer_entries,
        )
    )


def containerd_client(args: argparse.Namespace) -> tuple[Containerd, config.ContainerdConfig]:
    """A client for the containerd the flags and environment name (not yet connected)."""
    cfg = config.resolve(config.ContainerdConfig, args)
    client = Containerd(cfg.address or default_address(), cfg.namespace, timeout=cfg.timeout_s)
    return client, cfg


def unpack_concurrency(args: argparse.Namespace) -> int:
    n = config.resolve(config.ImportConfig, args).unpack_concurrency
    if n < 1:
        raise UsageError(f"--unpack-concurrency / IMAGE_AGENT_UNPACK_CONCURRENCY: {n} is below 1")
    return n


def wanted_platforms(texts: list[str] | None) -> tuple[platforms.Platform, ...]:
    """The repeated --platform values, or this node's platform; a bad one is a usage error."""
    try:
        return tuple(platforms.parse(p) for p in texts or ()) or (platforms.node(),)
    except ValueError as err:
        raise UsageError(str(err)) from None


def state_dir(args: argparse.Namespace) -> Path:
    return Path(
        args.state_dir or os.environ.get("IMAGE_AGENT_STATE_DIR") or config.DaemonConfig().state_dir
    )


def read_token(path: str, what: str = "token") -> str:
    """The stripped content of a token or secret file; '' when no file is named."""
    if not path:
        return ""
    try:
        return Path(path).read_text().strip()
    except OSError as err:
        raise UsageError(f"{what} file {path}: {err.strerror or err}") from None


def puller(
    client: Containerd,
    pcfg: config.PullConfig,
    log: structlog.typing.FilteringBoundLogger,
    *,
    on_change: Callable[[], None] = lambda: None,
    protected: Callable[[], set[str]] = set,
    observe: Callable[[str, float | None], None] = lambda outcome, seconds: None,
) -> Puller:
    """The pull engine with the credentials and bounds of ``pcfg``."""
    creds = pull_auth.load(pcfg.auth_file) if pcfg.auth_file else {}
    return Puller(
        client,
        credentials=creds,
        concurrency=pcfg.concurrency,
        timeout_s=pcfg.timeout_s,
        refresh_s=pcfg.refresh_s,
        log=log,
        on_change=on_change,
        protected=protected,
        observe=observe,
    )
