"""The command line's shape: every command, its flags and their help."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, TypeAlias

from agent import __version__, config
from agent.image import platforms

if TYPE_CHECKING:
    Commands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]


def _import(sub: Commands) -> None:
    imp = sub.add_parser("import", help="import image archives into containerd")
    imp.add_argument("files", nargs="+", metavar="FILE", help=".tar, .tar.gz, .tar.zst, ...")
    plat = imp.add_mutually_exclusive_group()
    plat.add_argument("--all-platforms", action="store_true", help="import every platform present")
    plat.add_argument(
        "--platform",
        action="append",
        metavar="OS/ARCH[/VARIANT]",
        help=f"platform to import (repeatable; default: this node's, {platforms.node()})",
    )
    imp.add_argument("--no-unpack", action="store_true", help="do not unpack into the snapshotter")
    imp.add_argument("--no-pin", action="store_true", help="do not pin against kubelet image GC")
    imp.add_argument(
        "--base-name",
        default="",
        metavar="REPO",
        help="name OCI images tagged only with a bare tag (e.g. umoci's) as REPO:TAG",
    )
    config.add_arguments(imp, config.ContainerdConfig)
    config.add_arguments(imp, config.ArchiveConfig)
    config.add_arguments(imp, config.ImportConfig)

    images = sub.add_parser("images", help="list images as the kubelet sees them (CRI)")
    images.add_argument("-o", "--output", choices=("table", "json"), default="table")
    config.add_arguments(images, config.ContainerdConfig)


def _node(sub: Commands) -> None:
    run = sub.add_parser("run", help="the node daemon: watch the images directory and import")
    config.add_arguments(run, config.DaemonConfig)
    config.add_arguments(run, config.PullConfig)
    config.add_arguments(run, config.ClusterAgentConfig)
    config.add_arguments(run, config.ContainerdConfig)
    config.add_arguments(run, config.LogConfig)
    config.add_arguments(run, config.ArchiveConfig)
    config.add_arguments(run, config.ImportConfig)

    status = sub.add_parser("status", help="the daemon's health and every archive's state")
    status.add_argument("-o", "--output", choices=("table", "json"), default="table")
    status.add_argument("--state-dir", default=None, help="(env IMAGE_AGENT_STATE_DIR)")

    retry = sub.add_parser("retry", help="ask the daemon to import a failed archive again")
    retry.add_argument("paths", nargs="+", metavar="PATH")
    retry.add_argument("--state-dir", default=None, help="(env IMAGE_AGENT_STATE_DIR)")

    pull = sub.add_parser("pull", help="pull images through the CRI and pin them (one shot)")
    pull.add_argument("refs", nargs="+", metavar="REF")
    config.add_arguments(pull, config.PullConfig)
    config.add_arguments(pull, config.ContainerdConfig)


def _airgap(sub: Commands) -> None:
    bundle = sub.add_parser(
        "bundle", help="pull listed images from registries into one air-gap archive"
    )
    bundle.add_argument(
        "--list",
        action="append",
        required=True,
        metavar="FILE",
        dest="lists",
        help="image list (pull-list formats; repeatable)",
    )
    bundle.add_argument(
        "--platform",
        action="append",
        metavar="OS/ARCH[/VARIANT]",
        help=f"platform to include (repeatable; default {platforms.node()})",
    )
    bundle.add_argument(
        "-o", "--output", help="archive to write (default: bundle-<platform>.tar.zst)"
    )
    bundle.add_argument("--auth-file", default="", help="docker config.json with credentials")
    bundle.add_argument(
        "--plain-http",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="registry to reach over plain HTTP, without credentials (loopback: always)",
    )
    config.add_arguments(bundle, config.ArchiveConfig)  # a bundle must fit the import limits

    verify = sub.add_parser("verify", help="check an archive without importing it")
    verify.add_argument("files", nargs="+", metavar="FILE")
    verify.add_argument("-o", "--output", choices=("text", "json"), default="text")
    config.add_arguments(verify, config.ArchiveConfig)


def _cluster(sub: Commands) -> None:
    cluster = sub.add_parser("cluster", help="the cluster component: one list for every node")
    csub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    serve = csub.add_parser("serve", help="assemble the list from sources and serve it")
    config.add_arguments(serve, config.ClusterServeConfig)
    config.add_arguments(serve, config.LogConfig)
    token = csub.add_parser(
        "token", help="print the token of node NODE (HMAC of the node secret and the name)"
    )
    token.add_argument("node", metavar="NODE", help="the node's name, as it reports it")
    token.add_argument(
        "--node-secret-file",
        default=None,
        help="the server's node secret (env IMAGE_AGENT_CLUSTER_NODE_SECRET_FILE)",
    )
    for name, helptext in (
        ("status", "node x image view with a summary"),
        ("images", "the assembled list with provenance and the report"),
    ):
        c = csub.add_parser(name, help=helptext)
        c.add_argument("--cluster-url", required=True)
        c.add_argument("--token-file", default="")
        c.add_argument("-o", "--output", choices=("table", "json"), default="table")


def _demo(sub: Commands) -> None:
    demo = sub.add_parser(
        "demo",
        help="start a private containerd, import a sample archive into it and list the result",
    )
    demo.add_argument("--dir", help="working directory (default: a new temporary directory)")
    demo.add_argument("--keep", action="store_true", help="leave containerd's files behind")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="image-agent",
        description="Load image archives into containerd and keep images warm on this node.",
    )
    parser.add_argument("--version", action="version", version=f"image-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # In the order of the help text: import, images, run, status, retry, pull, bundle,
    # verify, cluster, demo.
    for add in (_import, _node, _airgap, _cluster, _demo):
        add(sub)
    return parser
