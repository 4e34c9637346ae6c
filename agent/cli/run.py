"""``run``: the node daemon, and the one place where its parts are built and handed over.

Every part gets what it talks to when it is built; nothing is assigned onto
another object afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import ssl
import sys
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import structlog

from agent import __version__, config, logs
from agent.cli.common import (
    EXIT_OK,
    apply_limits,
    containerd_client,
    puller,
    read_token,
    unpack_concurrency,
)
from agent.cluster import schema
from agent.cluster.state import parse_selector
from agent.cluster.sync import ClusterClient, ClusterSync
from agent.containerd.client import Containerd
from agent.errors import UsageError
from agent.image import platforms
from agent.importer import Importer, ImportOptions
from agent.node.archives import ImportedImages, Settings
from agent.node.health import ProgressSink
from agent.node.lock import StateLock
from agent.node.metrics import Metrics, serve
from agent.node.notify import Notifier
from agent.node.service import OWNER, OWNER_LABEL, Daemon
from agent.node.state import Store
from agent.pull.engine import Puller

Log = structlog.typing.FilteringBoundLogger


def _daemon_platforms(text: str) -> tuple[platforms.Platform, ...] | None:
    if text.strip().lower() == "all":
        return None
    try:
        return tuple(platforms.parse(p) for p in text.split(",") if p.strip()) or (
            platforms.node(),
        )
    except ValueError as err:
        raise UsageError(f"--platforms: {err}") from None


def _containerd_root(text: str) -> Path:
    if text:
        return Path(text)
    k3s = Path("/var/lib/rancher/k3s/agent/containerd")
    return k3s if k3s.exists() else Path("/var/lib/containerd")


@dataclass
class _Node:
    """The daemon's parts, built once and released in reverse on the way out."""

    client: Containerd
    daemon: Daemon
    metrics: Metrics
    store: Store
    puller: Puller


def _build_daemon(
    args: argparse.Namespace,
    dcfg: config.DaemonConfig,
    stop: threading.Event,
    log: Log,
) -> _Node:
    client, ccfg = containerd_client(args)
    wanted = _daemon_platforms(dcfg.platforms)
    options = ImportOptions(
        snapshotter=ccfg.snapshotter,
        unpack=dcfg.unpack,
        platforms=wanted,
        unpack_concurrency=unpack_concurrency(args),
    )
    progress = ProgressSink()
    importer = Importer(
        client, options, progress=progress, stop=stop, lease_labels={OWNER_LABEL: OWNER}
    )
    settings = Settings(
        images_dir=Path(dcfg.images_dir),
        settle_s=dcfg.settle_s,
        containerd_root=_containerd_root(dcfg.containerd_root),
        delete_after_import=dcfg.delete_after_import,
        platforms=wanted,
        unpack=dcfg.unpack,
        pin=options.pin,
    )
    metrics = Metrics()
    imported = ImportedImages()
    pulls_changed = threading.Event()
    pcfg = config.resolve(config.PullConfig, args)
    engine = puller(
        client,
        pcfg,
        log,
        on_change=pulls_changed.set,
        protected=imported,
        observe=metrics.pull_outcome,
    )

    def log_store(event: str, **fields: object) -> None:
        log.warning(event, **fields)

    store = Store(Path(dcfg.state_dir), log=log_store)
    daemon = Daemon(
        settings,
        client,
        importer,
        store,
        metrics,
        Notifier(),
        log,
        progress=progress,
        imported=imported,
        puller=engine,
        pulls_changed=pulls_changed,
        pull_lists=tuple(Path(p) for p in pcfg.pull_lists),
    )
    return _Node(client, daemon, metrics, store, engine)


def _http(listen: str, node: _Node, log: Log) -> ThreadingHTTPServer | None:
    """/healthz and /metrics on ``listen``, or None when it is ''."""
    if not listen:
        return None
    try:
        server = serve(listen, node.metrics, node.daemon.health)
    except (OSError, ValueError) as err:
        raise UsageError(f"--listen {listen}: {err}") from None
    # The bound port, also when asked for :0.
    log.info("http.listening", listen=f"{listen.rpartition(':')[0]}:{server.server_port}")
    return server


def node_report(daemon: Daemon, engine: Puller) -> dict[str, Any]:
    """The daemon's and the puller's records, for :func:`agent.cluster.sync.build_report`."""
    archives = [
        {"path": r.path, "state": str(r.state), "images": r.images, "error": r.error}
        for r in list(daemon.records.values())
    ]
    pulls = [
        {"image": p["image"], "state": p["state"], "last_error": p["last_error"]}
        for p in engine.snapshot()
    ]
    return {"archives": archives, "pulls": pulls}


def _node_name(ccfg: config.ClusterAgentConfig) -> str:
    node = ccfg.node_name or socket.gethostname().lower()
    if not schema.valid_node_name(node):
        raise UsageError(
            f"--node-name / NODE_NAME {node!r}: not a DNS-1123 name (lower-case letters, "
            "digits, '-' and '.', at most 253 characters)"
        )
    return node


def _cluster_sync(
    args: argparse.Namespace, node: _Node, state_dir: Path, log: Log
) -> ClusterSync | None:
    """The list follower and status reporter, or None without --cluster-url."""
    ccfg = config.resolve(config.ClusterAgentConfig, args)
    if not ccfg.cluster_url:
        return None
    name = _node_name(ccfg)
    if ccfg.cluster_ca_file:
        try:
            ssl.create_default_context(cafile=ccfg.cluster_ca_file)
        except (OSError, ssl.SSLError) as err:
            raise UsageError(f"--cluster-ca-file {ccfg.cluster_ca_file}: {err}") from None
    if ccfg.min_poll_s <= 0:
        raise UsageError("--cluster-min-poll: want a positive duration")
    try:
        labels = dict(parse_selector(ccfg.node_labels))
    except ValueError as err:
        raise UsageError(str(err)) from None
    return ClusterSync(
        ClusterClient(
            ccfg.cluster_url, read_token(ccfg.cluster_token_file), ca_file=ccfg.cluster_ca_file
        ),
        node=name,
        labels=labels,
        state_dir=state_dir,
        puller=node.puller,
        report=lambda: node_report(node.daemon, node.puller),
        log=log,
        report_interval=ccfg.report_interval_s,
        min_interval=ccfg.min_poll_s,
    )


def cmd_run(args: argparse.Namespace, stop: threading.Event) -> int:
    apply_limits(args)
    dcfg = config.resolve(config.DaemonConfig, args)
    if not dcfg.settle_s > 0:
        # 0 would import (or look again) at once, in a loop, while a copy holds the file open.
        raise UsageError(f"--settle must be more than 0 s (got {dcfg.settle_s:g})")
    lcfg = config.resolve(config.LogConfig, args)
    logs.configure(lcfg.level, stream=sys.stdout)
    log = logs.get()
    state_dir = Path(dcfg.state_dir)
    # Everything built is released in reverse, also when a later part fails
    # to build (a bad --listen or --cluster-url releases the lock and the store).
    with contextlib.ExitStack() as parts:
        lock = StateLock(state_dir)
        lock.acquire()  # one daemon per state directory; a second one says who holds it
        parts.callback(lock.release)
        node = _build_daemon(args, dcfg, stop, log)
        parts.callback(node.store.close)
        server = _http(dcfg.listen, node, log)
        if server is not None:
            parts.callback(server.server_close)  # after the loop below has stopped
            parts.callback(server.shutdown)
        sync = _cluster_sync(args, node, state_dir, log)
        log.info(
            "starting",
            version=__version__,
            address=node.client.address,
            images_dir=dcfg.images_dir,
        )
        if sync is not None:
            sync.start()
            parts.callback(sync.stop)
        with node.client:
            node.daemon.run(stop)
    log.info("stopped")
    return EXIT_OK
