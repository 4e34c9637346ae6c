"""Configuration as frozen dataclasses.

Every field has a default, a unit where it has one, a ``--flag`` and an
environment variable. Precedence: flag, then environment, then default.
:func:`add_arguments` and :func:`resolve` are the only code that knows this.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from agent.errors import UsageError


def setting(
    default: Any, *, flag: str, env: str, help: str, unit: str = "", lines: bool = False
) -> Any:
    """A config field: its default, command-line flag, environment variable and unit.

    ``lines``: a repeatable setting whose items may hold commas themselves; its
    variable is split at newlines only.
    """
    return dataclasses.field(
        default=default,
        metadata={"flag": flag, "env": env, "help": help, "unit": unit, "lines": lines},
    )


@dataclasses.dataclass(frozen=True)
class ContainerdConfig:
    address: str = setting(
        "",
        flag="--address",
        env="CONTAINERD_ADDRESS",
        help="containerd socket (default: the k3s socket if present, else "
        "/run/containerd/containerd.sock)",
    )
    namespace: str = setting(
        "k8s.io", flag="--namespace", env="CONTAINERD_NAMESPACE", help="containerd namespace"
    )
    snapshotter: str = setting(
        "overlayfs",
        flag="--snapshotter",
        env="CONTAINERD_SNAPSHOTTER",
        help="snapshotter to unpack into (the CRI's)",
    )
    timeout_s: float = setting(
        30.0,
        flag="--timeout",
        env="IMAGE_AGENT_TIMEOUT",
        unit="s",
        help="deadline for each containerd call (unpacking a layer has none)",
    )


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    images_dir: str = setting(
        "/var/lib/rancher/k3s/agent/images",
        flag="--images-dir",
        env="IMAGE_AGENT_IMAGES_DIR",
        help="directory to watch for archives and pull lists",
    )
    state_dir: str = setting(
        "/var/lib/image-agent",
        flag="--state-dir",
        env="IMAGE_AGENT_STATE_DIR",
        help="where the processed-archive records are kept",
    )
    settle_s: float = setting(
        2.0,
        flag="--settle",
        env="IMAGE_AGENT_SETTLE",
        unit="s",
        help="a file must be closed and unchanged this long before it is imported",
    )
    containerd_root: str = setting(
        "",
        flag="--containerd-root",
        env="IMAGE_AGENT_CONTAINERD_ROOT",
        help="containerd's root, checked for free space (default: k3s's if present, else "
        "/var/lib/containerd)",
    )
    delete_after_import: bool = setting(
        False,
        flag="--delete-after-import",
        env="IMAGE_AGENT_DELETE_AFTER_IMPORT",
        help="remove archives once imported (true/false), for small disks",
    )
    platforms: str = setting(
        "",
        flag="--platforms",
        env="IMAGE_AGENT_PLATFORMS",
        help="comma-separated platforms to import, or 'all' (default: the node's)",
    )
    unpack: bool = setting(
        True,
        flag="--unpack",
        env="IMAGE_AGENT_UNPACK",
        help="unpack into the snapshotter (true/false)",
    )
    listen: str = setting(
        "127.0.0.1:9440",
        flag="--listen",
        env="IMAGE_AGENT_LISTEN",
        help="address for /healthz and /metrics ('' to disable)",
    )


@dataclasses.dataclass(frozen=True)
class PullConfig:
    pull_lists: tuple[str, ...] = setting(
        (),
        flag="--pull-list",
        env="IMAGE_AGENT_PULL_LISTS",
        help="pull-list file to keep warm, besides .txt files in the images directory "
        "(repeatable; env: comma-separated)",
    )
    concurrency: int = setting(
        3, flag="--pull-concurrency", env="IMAGE_AGENT_PULL_CONCURRENCY", help="pulls at once"
    )
    timeout_s: float = setting(
        1800.0,
        flag="--pull-timeout",
        env="IMAGE_AGENT_PULL_TIMEOUT",
        unit="s",
        help="deadline of one pull (e.g. 30m)",
    )
    refresh_s: float = setting(
        3600.0,
        flag="--refresh-interval",
        env="IMAGE_AGENT_REFRESH_INTERVAL",
        unit="s",
        help="how often tag references are pulled again to follow moved tags (e.g. 1h)",
    )
    auth_file: str = setting(
        "",
        flag="--auth-file",
        env="IMAGE_AGENT_AUTH_FILE",
        help="docker config.json with registry credentials (auths)",
    )


@dataclasses.dataclass(frozen=True)
class ClusterAgentConfig:
    cluster_url: str = setting(
        "",
        flag="--cluster-url",
        env="IMAGE_AGENT_CLUSTER_URL",
        help="image-agent cluster serve to follow for the image list",
    )
    cluster_token_file: str = setting(
        "",
        flag="--cluster-token-file",
        env="IMAGE_AGENT_CLUSTER_TOKEN_FILE",
        help="file holding this node's token (image-agent cluster token NODE) or the shared one",
    )
    cluster_ca_file: str = setting(
        "",
        flag="--cluster-ca-file",
        env="IMAGE_AGENT_CLUSTER_CA_FILE",
        help="CA certificate(s) to trust for an https --cluster-url (default: the system's)",
    )
    node_name: str = setting(
        "", flag="--node-name", env="NODE_NAME", help="this node's name (default: hostname)"
    )
    node_labels: str = setting(
        "",
        flag="--node-labels",
        env="IMAGE_AGENT_NODE_LABELS",
        help="this node's labels, k=v[,k=v], matched against source node selectors",
    )
    report_interval_s: float = setting(
        120.0,
        flag="--report-interval",
        env="IMAGE_AGENT_REPORT_INTERVAL",
        unit="s",
        help="status goes to the cluster when it changes and at least this often",
    )
    min_poll_s: float = setting(
        10.0,
        flag="--cluster-min-poll",
        env="IMAGE_AGENT_CLUSTER_MIN_POLL",
        unit="s",
        help="never ask for the list again sooner than this after the last ask, "
        "whatever the server answers",
    )


@dataclasses.dataclass(frozen=True)
class ClusterServeConfig:
    listen: str = setting(
        "0.0.0.0:8080", flag="--listen", env="IMAGE_AGENT_CLUSTER_LISTEN", help="HOST:PORT"
    )
    source_images: tuple[str, ...] = setting(
        (),
        flag="--source-images",
        env="IMAGE_AGENT_CLUSTER_SOURCE_IMAGES",
        lines=True,
        help="Image Puller IMAGES string, or @FILE (repeatable; env: one a line)",
    )
    source_cr: tuple[str, ...] = setting(
        (),
        flag="--source-cr",
        env="IMAGE_AGENT_CLUSTER_SOURCE_CR",
        lines=True,
        help="KubernetesImagePuller resource, a YAML file (repeatable; env: one a line)",
    )
    source_list: tuple[str, ...] = setting(
        (),
        flag="--source-list",
        env="IMAGE_AGENT_CLUSTER_SOURCE_LIST",
        lines=True,
        help="list file or URL, one image a line (repeatable; env: one a line)",
    )
    source_che: tuple[str, ...] = setting(
        (),
        flag="--source-che",
        env="IMAGE_AGENT_CLUSTER_SOURCE_CHE",
        lines=True,
        help="Che base URL (dashboard editors and air-gap samples) (repeatable; env: one a line)",
    )
    source_env: tuple[str, ...] = setting(
        (),
        flag="--source-env",
        env="IMAGE_AGENT_CLUSTER_SOURCE_ENV",
        lines=True,
        help="file of RELATED_IMAGE_* variables (repeatable; env: one a line)",
    )
    source_interval_s: float = setting(
        60.0,
        flag="--source-interval",
        env="IMAGE_AGENT_CLUSTER_SOURCE_INTERVAL",
        unit="s",
        help="re-read URL sources this often (files: when they change)",
    )
    rewrite: tuple[str, ...] = setting(
        (),
        flag="--rewrite",
        env="IMAGE_AGENT_CLUSTER_REWRITE",
        help="FROM=TO: map a registry onto a mirror (repeatable)",
    )
    token_file: str = setting(
        "",
        flag="--token-file",
        env="IMAGE_AGENT_CLUSTER_TOKEN_FILE",
        help="shared bearer token: every read; writes only while no node secret is set",
    )
    node_secret_file: str = setting(
        "",
        flag="--node-secret-file",
        env="IMAGE_AGENT_CLUSTER_NODE_SECRET_FILE",
        help="secret that node tokens are derived from (image-agent cluster token NODE)",
    )
    auth_reads: bool = setting(
        False,
        flag="--auth-reads",
        env="IMAGE_AGENT_CLUSTER_AUTH_READS",
        help="require a token for reads too (true/false)",
    )
    tls_cert: str = setting(
        "", flag="--tls-cert", env="IMAGE_AGENT_CLUSTER_TLS_CERT", help="serve HTTPS: certificate"
    )
    tls_key: str = setting(
        "", flag="--tls-key", env="IMAGE_AGENT_CLUSTER_TLS_KEY", help="serve HTTPS: its key"
    )
    max_connections: int = setting(
        10_000,
        flag="--max-connections",
        env="IMAGE_AGENT_CLUSTER_MAX_CONNECTIONS",
        help="open connections at most (lowered to fit the file limit)",
    )
    max_long_polls: int = setting(
        8_000,
        flag="--max-long-polls",
        env="IMAGE_AGENT_CLUSTER_MAX_LONG_POLLS",
        help="requests held waiting for a change at once; more are answered at once",
    )
    header_timeout_s: float = setting(
        15.0,
        flag="--header-timeout",
        env="IMAGE_AGENT_CLUSTER_HEADER_TIMEOUT",
        unit="s",
        help="a connection must send its request headers within this (also the idle time)",
    )
    body_timeout_s: float = setting(
        30.0,
        flag="--body-timeout",
        env="IMAGE_AGENT_CLUSTER_BODY_TIMEOUT",
        unit="s",
        help="a report's body must arrive within this",
    )
    stale_after_s: float = setting(
        900.0,
        flag="--stale-after",
        env="IMAGE_AGENT_CLUSTER_STALE_AFTER",
        unit="s",
        help="a node not heard from this long shows as stale",
    )
    forget_after_s: float = setting(
        86_400.0,
        flag="--forget-after",
        env="IMAGE_AGENT_CLUSTER_FORGET_AFTER",
        unit="s",
        help="a node not heard from this long leaves the view",
    )


@dataclasses.dataclass(frozen=True)
class ArchiveConfig:
    """Bounds on untrusted archives (see agent.archive.limits for the reasons)."""

    memory_budget: int = setting(
        224 << 20,
        flag="--memory-budget",
        env="IMAGE_AGENT_MEMORY_BUDGET",
        unit="bytes",
        help="memory the agent plans for; what is left after 96Mi is the largest zstd "
        "window accepted (e.g. 224Mi allows --long=27 archives; 1Gi allows --long=29)",
    )
    max_members: int = setting(
        100_000,
        flag="--max-archive-members",
        env="IMAGE_AGENT_MAX_ARCHIVE_MEMBERS",
        help="tar headers in one archive",
    )
    max_manifests: int = setting(
        1000,
        flag="--max-archive-images",
        env="IMAGE_AGENT_MAX_ARCHIVE_IMAGES",
        help="images in one manifest.json, or manifests in one index",
    )
    max_layers: int = setting(
        500,
        flag="--max-image-layers",
        env="IMAGE_AGENT_MAX_IMAGE_LAYERS",
        help="layers of one image (overlayfs stacks at most 500)",
    )
    max_index_entries: int = setting(
        0,
        flag="--max-index-entries",
        env="IMAGE_AGENT_MAX_INDEX_ENTRIES",
        help="index entries read for one archive, an index counted each time it is reached "
        "(0: 33 per --max-archive-images, 33000 by default)",
    )
    max_layer_entries: int = setting(
        100_000,
        flag="--max-layer-entries",
        env="IMAGE_AGENT_MAX_LAYER_ENTRIES",
        help="layer entries read for one archive, a manifest counted each time it is reached",
    )


def _cores() -> int:
    return len(os.sched_getaffinity(0)) or 1


@dataclasses.dataclass(frozen=True)
class ImportConfig:
    unpack_concurrency: int = setting(
        _cores(),
        flag="--unpack-concurrency",
        env="IMAGE_AGENT_UNPACK_CONCURRENCY",
        unit="layers",
        help="layers unpacked at once, independent chains in parallel (default: the node's "
        "cores); 1 unpacks image after image, bottom layer first, as the archive lists them",
    )


@dataclasses.dataclass(frozen=True)
class LogConfig:
    level: str = setting(
        "info", flag="--log-level", env="IMAGE_AGENT_LOG_LEVEL", help="debug, info, warning, error"
    )


C = TypeVar("C")


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Add one option for each field of config class ``cls``."""
    group = parser.add_argument_group(cls.__name__.removesuffix("Config").lower() or "config")
    for f in dataclasses.fields(cls):
        meta = f.metadata
        unit = f" [{meta['unit']}]" if meta["unit"] else ""
        default = f.default if f.default not in ("", None, ()) else "none"
        # A bare boolean flag means true (``--auth-reads``), as does ``--auth-reads=true``.
        optional: dict[str, Any] = (
            {"nargs": "?", "const": "true"} if isinstance(f.default, bool) else {}
        )
        group.add_argument(
            meta["flag"],
            dest=f"{cls.__name__}.{f.name}",
            default=None,
            action="append" if isinstance(f.default, tuple) else "store",
            metavar=f.name.upper().removesuffix("_S"),
            help=f"{meta['help']}{unit} (env {meta['env']}; default {default})",
            **optional,
        )


def resolve(cls: type[C], args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> C:
    """Build ``cls`` from parsed flags, the environment and defaults."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind: type[Any] = type(f.default)
        raw = getattr(args, f"{cls.__name__}.{f.name}", None)
        if raw == "" and kind is str:
            values[f.name] = ""  # an explicit empty flag turns a setting off (--listen '')
            continue
        if raw is None:
            raw = env.get(f.metadata["env"])
        if raw is None or raw == "":
            continue
        try:
            values[f.name] = _convert(raw, kind, f.metadata["unit"], f.metadata.get("lines", False))
        except ValueError:
            where = f"{f.metadata['flag']} / {f.metadata['env']}"
            raise UsageError(f"{where}: {raw!r} is not a valid {kind.__name__}") from None
    return cls(**values)


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``1h``, ``1h30m``."""
    text = text.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r}")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def _convert(raw: Any, kind: type[Any], unit: str, lines: bool = False) -> Any:
    if kind is tuple:
        # Environment values: one item a line, or comma-separated on one line
        # (one a line only for ``lines`` settings, whose items hold commas).
        text = str(raw)
        split = "\n" if lines or "\n" in text else ","
        items = raw if isinstance(raw, list) else text.split(split)
        return tuple(i.strip() for i in items if i.strip())
    if kind is bool:
        if str(raw).lower() in ("1", "true", "yes", "on"):
            return True
        if str(raw).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if kind is float and unit == "s":
        return parse_duration(str(raw))
    if kind is int and unit == "bytes":
        return parse_size(str(raw))
    return kind(raw)


_SIZE_UNITS = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "ki": 1 << 10,
    "mi": 1 << 20,
    "gi": 1 << 30,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
}


def parse_size(text: str) -> int:
    """Bytes from ``268435456``, ``256Mi``, ``256MiB``, ``1Gi`` (Kubernetes quantities too)."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"invalid size {text!r}")
    return int(match.group(1)) * _SIZE_UNITS[unit]
