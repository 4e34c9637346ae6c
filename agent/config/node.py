"""The node's settings: containerd, the daemon, pulls, archive bounds, import and logs."""

from __future__ import annotations

import dataclasses
import os

from agent.config.fields import setting


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
