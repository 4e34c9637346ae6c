"""The wiring point: parse the command line, build config, logger and clients, run.

Nothing else in the package reads flags or the environment, creates a client
or installs signal handlers; everything receives its dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, TypedDict

import structlog

from agent import __version__, config, logs
from agent.cli import render as report
from agent.containerd.client import Containerd, CriImage, default_address
from agent.errors import AgentError, ArchiveError, ContainerdUnavailable, UsageError
from agent.image import platforms
from agent.importer import PINNED_LABEL, Importer, ImportOptions, ImportResult, Progress
from agent.pull import auth as pull_auth
from agent.pull.engine import Puller

if TYPE_CHECKING:
    from agent.cluster.sync import ClusterSync
    from agent.node.service import Daemon

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="image-agent",
        description="Load image archives into containerd and keep images warm on this node.",
    )
    parser.add_argument("--version", action="version", version=f"image-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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

    demo = sub.add_parser(
        "demo",
        help="start a private containerd, import a sample archive into it and list the result",
    )
    demo.add_argument("--dir", help="working directory (default: a new temporary directory)")
    demo.add_argument("--keep", action="store_true", help="leave containerd's files behind")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(os.environ.get("IMAGE_AGENT_LOG_LEVEL", "warning"), stream=sys.stderr)
    stop = threading.Event()
    _install_signal_handlers(stop)
    try:
        if args.command == "import":
            return cmd_import(args, stop)
        if args.command == "images":
            return cmd_images(args)
        if args.command == "demo":
            return cmd_demo(args, stop)
        if args.command == "run":
            return cmd_run(args, stop)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "retry":
            return cmd_retry(args)
        if args.command == "pull":
            return cmd_pull(args)
        if args.command == "bundle":
            return cmd_bundle(args)
        if args.command == "verify":
            return cmd_verify(args)
        if args.command == "cluster":
            return cmd_cluster(args, stop)
        raise UsageError(f"unknown command {args.command}")
    except UsageError as err:
        print(f"image-agent: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ContainerdUnavailable as err:
        print(f"image-agent: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except AgentError as err:
        print(f"image-agent: {err}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as err:
        # The last resort for the system saying no (a port in use, a directory
        # that cannot be made): one line, never a traceback.
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        print(f"image-agent: {where}{err.strerror or err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("image-agent: interrupted", file=sys.stderr)
        return 130


def _install_signal_handlers(stop: threading.Event) -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _apply_limits(args: argparse.Namespace) -> None:
    """Put the archive bounds of --memory-budget and friends in force for this process."""
    from agent.archive import limits

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


def _client(args: argparse.Namespace) -> tuple[Containerd, config.ContainerdConfig]:
    cfg = config.resolve(config.ContainerdConfig, args)
    client = Containerd(cfg.address or default_address(), cfg.namespace, timeout=cfg.timeout_s)
    return client, cfg


def _import_options(args: argparse.Namespace, cfg: config.ContainerdConfig) -> ImportOptions:
    if args.all_platforms:
        wanted = None
    else:
        try:
            wanted = tuple(platforms.parse(p) for p in args.platform or ()) or (platforms.node(),)
        except ValueError as err:
            raise UsageError(str(err)) from None
    return ImportOptions(
        snapshotter=cfg.snapshotter,
        unpack=not args.no_unpack,
        platforms=wanted,
        pin=not args.no_pin,
        base_name=args.base_name,
        unpack_concurrency=_unpack_concurrency(args),
    )


def _unpack_concurrency(args: argparse.Namespace) -> int:
    n = config.resolve(config.ImportConfig, args).unpack_concurrency
    if n < 1:
        raise UsageError(f"--unpack-concurrency / IMAGE_AGENT_UNPACK_CONCURRENCY: {n} is below 1")
    return n


def cmd_import(args: argparse.Namespace, stop: threading.Event) -> int:
    _apply_limits(args)
    client, cfg = _client(args)
    with client:
        options = _import_options(args, cfg)  # usage errors before any connection
        client.version()  # a clear error now if containerd is not there
        progress = report.ProgressLine()
        importer = Importer(client, options, progress=progress, stop=stop)
        failed = 0
        for path in args.files:
            try:
                result = importer.import_file(path)
            except ArchiveError as err:
                progress.done()
                print(f"image-agent: {err}", file=sys.stderr)
                failed += 1
                continue
            finally:
                progress.done()
            print_import(result)
        return EXIT_FAILED if failed else EXIT_OK


def print_import(result: ImportResult) -> None:
    for image in result.images:
        state = "unpacked" if image.unpacked else "not unpacked"
        plats = ", ".join(image.platforms) or "any platform"
        print(f"{image.action} {image.name} {image.digest} ({plats}, {state})")
    for digest in result.unnamed:
        print(f"skipped unnamed image {digest}")
    for name in result.not_in_cri:
        print(f"image-agent: warning: the CRI does not list {name} yet", file=sys.stderr)
    print(
        f"{result.file}: {len(result.images)} image(s), {report.human_bytes(result.bytes_read)} "
        f"read, {result.blobs_written} blob(s) written, {result.blobs_present} already present, "
        f"{result.duration_s:.2f}s"
    )


class ImageRow(TypedDict):
    tags: list[str]
    digests: list[str]
    id: str
    size: int
    pinned: bool


def image_rows(client: Containerd) -> list[ImageRow]:
    """CRI's image list, with pinning read from the image records where CRI does not report it."""
    pinned_names = {r.name for r in client.list_images() if r.labels.get(PINNED_LABEL) == "pinned"}
    rows: list[ImageRow] = []
    images: list[CriImage] = sorted(client.cri_images(), key=lambda i: (i.repo_tags, i.id))
    for img in images:
        names = set(img.repo_tags) | set(img.repo_digests)
        rows.append(
            {
                "tags": list(img.repo_tags),
                "digests": list(img.repo_digests),
                "id": img.id,
                "size": img.size,
                "pinned": img.pinned or bool(names & pinned_names),
            }
        )
    return rows


def cmd_images(args: argparse.Namespace) -> int:
    client, _ = _client(args)
    with client:
        rows = image_rows(client)
    if args.output == "json":
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    table_rows = []
    for row in rows:
        tags = row["tags"] or ["<none>"]
        digests = row["digests"] or [""]
        assert isinstance(tags, list) and isinstance(digests, list)
        digest = str(digests[0]).rpartition("@")[2][:19]
        for tag in tags:
            table_rows.append(
                [
                    str(tag),
                    digest,
                    str(row["id"])[7:20],
                    report.human_bytes(int(str(row["size"]))),
                    "yes" if row["pinned"] else "no",
                ]
            )
    print(report.table(["IMAGE", "DIGEST", "ID", "SIZE", "PINNED"], table_rows))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace, stop: threading.Event) -> int:
    from agent.testing import samples
    from agent.testing.sandbox import PrivateContainerd

    if os.geteuid() != 0:
        raise UsageError("the demo starts a private containerd, which needs root (try sudo)")
    base = Path(args.dir or tempfile.mkdtemp(prefix="image-agent-demo-"))
    ctd = PrivateContainerd(base / "containerd")
    print(f"starting a private containerd under {ctd.base}")
    ctd.start()
    try:
        node = platforms.node()
        archive = base / "images" / f"sample-{node.os}-{node.architecture}.tar.zst"
        archive.parent.mkdir(parents=True, exist_ok=True)
        with open(archive, "wb") as f:
            samples.write(f, samples.oci_archive(samples.demo_images(node)), "zstd")
        print(f"built sample archive {archive} ({report.human_bytes(archive.stat().st_size)})")
        with Containerd(ctd.address) as client:
            cmd = ["image-agent", "import", "--address", ctd.address, str(archive)]
            print(f"$ {' '.join(cmd)}")
            importer = Importer(
                client,
                ImportOptions(platforms=(node,)),
                progress=report.ProgressLine(),
                stop=stop,
            )
            print_import(importer.import_file(str(archive)))
            print(f"$ image-agent images --address {ctd.address}")
            rows = image_rows(client)
        for row in rows:
            print(
                f"  {', '.join(map(str, row['tags']))}  {str(row['id'])[:19]}  "
                f"pinned={row['pinned']}"
            )
        if not rows:
            raise AgentError("the CRI lists no image after the import")
        return EXIT_OK
    finally:
        ctd.stop()
        if not args.keep:
            ctd.cleanup()


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(
        args.state_dir or os.environ.get("IMAGE_AGENT_STATE_DIR") or config.DaemonConfig().state_dir
    )


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


def cmd_run(args: argparse.Namespace, stop: threading.Event) -> int:
    from agent.node.archives import ImportedImages, Settings
    from agent.node.health import ProgressSink
    from agent.node.lock import StateLock
    from agent.node.metrics import Metrics, serve
    from agent.node.notify import Notifier
    from agent.node.service import OWNER, OWNER_LABEL, Daemon
    from agent.node.state import Store

    _apply_limits(args)
    dcfg = config.resolve(config.DaemonConfig, args)
    if not dcfg.settle_s > 0:
        # 0 would import (or look again) at once, in a loop, while a copy holds the file open.
        raise UsageError(f"--settle must be more than 0 s (got {dcfg.settle_s:g})")
    lcfg = config.resolve(config.LogConfig, args)
    logs.configure(lcfg.level, stream=sys.stdout)
    log = logs.get()
    state_dir = Path(dcfg.state_dir)
    lock = StateLock(state_dir)
    lock.acquire()  # one daemon per state directory; a second one says who holds it
    client, ccfg = _client(args)
    wanted = _daemon_platforms(dcfg.platforms)
    options = ImportOptions(
        snapshotter=ccfg.snapshotter,
        unpack=dcfg.unpack,
        platforms=wanted,
        unpack_concurrency=_unpack_concurrency(args),
    )
    # The one wiring point: every part gets what it talks to when it is built.
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
    puller = _puller(
        client,
        pcfg,
        log,
        on_change=pulls_changed.set,
        protected=imported,
        observe=metrics.pull_outcome,
    )

    def log_store(event: str, **fields: object) -> None:
        log.warning(event, **fields)

    store = Store(state_dir, log=log_store)
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
        puller=puller,
        pulls_changed=pulls_changed,
        pull_lists=tuple(Path(p) for p in pcfg.pull_lists),
    )
    server = None
    if dcfg.listen:
        try:
            server = serve(dcfg.listen, metrics, daemon.health)
        except (OSError, ValueError) as err:
            raise UsageError(f"--listen {dcfg.listen}: {err}") from None
        # The bound port, also when asked for :0.
        log.info("http.listening", listen=f"{dcfg.listen.rpartition(':')[0]}:{server.server_port}")
    sync = _cluster_sync(args, daemon, puller, state_dir, log)
    log.info("starting", version=__version__, address=client.address, images_dir=dcfg.images_dir)
    try:
        if sync is not None:
            sync.start()
        with client:
            daemon.run(stop)
    finally:
        if sync is not None:
            sync.stop()
        if server is not None:
            server.shutdown()
        store.close()
        lock.release()
    log.info("stopped")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from agent.node.plan import escape
    from agent.node.state import Store
    from agent.node.status import status_doc

    doc = status_doc(Store(_state_dir(args), readonly=True))
    if args.output == "json":
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    d = doc["daemon"]
    if d.get("running"):
        health = (
            "healthy"
            if d.get("healthy")
            else f"unhealthy ({d.get('health') or 'containerd ' + str(d.get('containerd'))})"
        )
        where = escape(str(d.get("images_dir")))
        print(f"daemon: running (pid {d['pid']}), {health}, watching {where}")
    else:
        print("daemon: not running")
    rows = []
    for a in doc["archives"]:  # in mtime order: the order they are imported in
        detail = a["error"] or a["reason"] or ", ".join(a["images"])
        rows.append(
            [
                escape(a["path"]),
                a["state"],
                report.human_bytes(a["size"]),
                str(a["attempts"]),
                escape(detail),
            ]
        )
    if rows:
        print(report.table(["ARCHIVE", "STATE", "SIZE", "ATTEMPTS", "DETAIL"], rows))
    pulls = [
        [
            escape(p["image"]),
            p["state"],
            escape(p["source"]),
            str(p["attempts"]),
            escape(p["last_error"] or p["image_id"]),
        ]
        for p in doc["pulls"]
    ]
    if pulls:
        print(report.table(["IMAGE", "STATE", "SOURCE", "ATTEMPTS", "DETAIL"], pulls))
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    from agent.node.state import Store

    store = Store(_state_dir(args))
    for path in args.paths:
        store.request_retry(str(Path(path).absolute()))
        print(f"retry requested for {path}")
    return EXIT_OK


def _puller(
    client: Containerd,
    pcfg: config.PullConfig,
    log: structlog.typing.FilteringBoundLogger,
    *,
    on_change: Callable[[], None] = lambda: None,
    protected: Callable[[], set[str]] = set,
    observe: Callable[[str, float | None], None] = lambda outcome, seconds: None,
) -> Puller:
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


def cmd_pull(args: argparse.Namespace) -> int:
    """Pull REFs now (ImageStatus first, PullImage if absent), pin them, report each."""
    from concurrent.futures import ThreadPoolExecutor

    from agent.image import refs
    from agent.pull.engine import classify

    pcfg = config.resolve(config.PullConfig, args)
    wanted: list[str] = []
    failed = 0
    for text in args.refs:
        try:
            wanted.append(refs.normalize(text))
        except refs.InvalidReference as err:
            print(f"image-agent: {err}", file=sys.stderr)
            failed += 1
    client, _ = _client(args)
    with client:
        client.version()
        puller = _puller(client, pcfg, logs.get())
        with ThreadPoolExecutor(max(1, pcfg.concurrency)) as pool:
            futures = {ref: pool.submit(puller.ensure, ref) for ref in wanted}
            for ref, future in futures.items():
                try:
                    outcome, image_id = future.result()
                except AgentError as err:
                    print(f"image-agent: {ref}: {classify(err).reason}", file=sys.stderr)
                    failed += 1
                    continue
                print(f"{outcome} {ref} {image_id}")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_bundle(args: argparse.Namespace) -> int:
    from agent.airgap import bundle
    from agent.airgap.registry import RegistryClient
    from agent.image import lists

    _apply_limits(args)
    try:
        wanted_platforms = tuple(platforms.parse(p) for p in args.platform or ()) or (
            platforms.node(),
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    entries: list[lists.Entry] = []
    problems: list[lists.Problem] = []
    for path in args.lists:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise UsageError(f"--list {path}: {err.strerror or err}") from None
        e, p = lists.parse(text, path)
        entries += e
        problems += p
    if problems:
        for problem in problems:
            print(f"image-agent: {problem}", file=sys.stderr)
        return EXIT_FAILED
    refs_ = list(lists.union(entries))
    if not refs_:
        raise UsageError("the lists name no image")
    creds = pull_auth.load(args.auth_file) if args.auth_file else {}
    client = RegistryClient(creds, plain_http=frozenset(args.plain_http))
    out = Path(args.output or bundle.default_name(wanted_platforms))
    print(
        f"resolving {len(refs_)} image(s) for {', '.join(map(str, wanted_platforms))}",
        file=sys.stderr,
    )
    the_plan = bundle.plan(client, refs_, wanted_platforms)
    line = report.ProgressLine()
    start = time.monotonic()

    def progress(done: int, total: int) -> None:
        line(Progress(str(out), done, total, time.monotonic() - start))

    try:
        bundle.write(client, the_plan, wanted_platforms, out, progress)
    finally:
        line.done()
    for image in the_plan.images:
        print(f"{image.name} {image.digest} ({', '.join(image.platforms)})")
    print(
        f"{out}: {len(the_plan.images)} image(s), "
        f"{len(the_plan.docs) + len(the_plan.layers)} blob(s), "
        f"{report.human_bytes(the_plan.total_size)} uncompressed, "
        f"{report.human_bytes(out.stat().st_size)} written in {time.monotonic() - start:.1f}s"
    )
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from agent.airgap.verify import verify

    _apply_limits(args)
    failed = 0
    reports = []
    for path in args.files:
        line = report.ProgressLine()
        try:
            rep = verify(path, progress=line)
        except ArchiveError as err:
            line.done()
            print(f"image-agent: {err}", file=sys.stderr)
            failed += 1
            continue
        line.done()
        doc = {
            "file": path,
            "ok": True,
            "images": [
                {"name": i.name, "digest": i.digest, "platforms": list(i.platforms)}
                for i in rep.result.images
            ],
            "unnamed": rep.result.unnamed,
            "platforms": rep.platforms,
            "absent_platforms": sorted(set(rep.result.absent_platforms)),
            "blobs": rep.blobs,
            "total_size": rep.total_size,
        }
        reports.append(doc)
        if args.output == "text":
            print(
                f"{path}: ok, {len(doc['images'])} image(s), {rep.blobs} blob(s), "
                f"{report.human_bytes(rep.total_size)}, platforms {', '.join(rep.platforms)}"
            )
            for i in rep.result.images:
                print(f"  {i.name} {i.digest} ({', '.join(i.platforms)})")
            if doc["absent_platforms"]:
                print(f"  not carried: {', '.join(doc['absent_platforms'])}")
    if args.output == "json":
        print(json.dumps(reports, indent=2))
    return EXIT_FAILED if failed else EXIT_OK


def _read_token(path: str, what: str = "token") -> str:
    if not path:
        return ""
    try:
        return Path(path).read_text().strip()
    except OSError as err:
        raise UsageError(f"{what} file {path}: {err.strerror or err}") from None


def _labels(text: str) -> dict[str, str]:
    from agent.cluster.state import parse_selector

    try:
        return dict(parse_selector(text))
    except ValueError as err:
        raise UsageError(str(err)) from None


def _cluster_sync(
    args: argparse.Namespace,
    daemon: Daemon,
    puller: Puller,
    state_dir: Path,
    log: structlog.typing.FilteringBoundLogger,
) -> ClusterSync | None:
    import socket

    from agent.cluster import schema
    from agent.cluster.sync import ClusterClient, ClusterSync

    ccfg = config.resolve(config.ClusterAgentConfig, args)
    if not ccfg.cluster_url:
        return None
    node = ccfg.node_name or socket.gethostname().lower()
    if not schema.valid_node_name(node):
        raise UsageError(
            f"--node-name / NODE_NAME {node!r}: not a DNS-1123 name (lower-case letters, "
            "digits, '-' and '.', at most 253 characters)"
        )
    if ccfg.cluster_ca_file:
        try:
            ssl.create_default_context(cafile=ccfg.cluster_ca_file)
        except (OSError, ssl.SSLError) as err:
            raise UsageError(f"--cluster-ca-file {ccfg.cluster_ca_file}: {err}") from None
    if ccfg.min_poll_s <= 0:
        raise UsageError("--cluster-min-poll: want a positive duration")

    def report() -> dict[str, object]:
        archives = [
            {"path": r.path, "state": str(r.state), "images": r.images, "error": r.error}
            for r in list(daemon.records.values())
        ]
        pulls = [
            {"image": p["image"], "state": p["state"], "last_error": p["last_error"]}
            for p in puller.snapshot()
        ]
        return {"archives": archives, "pulls": pulls}

    return ClusterSync(
        ClusterClient(
            ccfg.cluster_url,
            _read_token(ccfg.cluster_token_file),
            ca_file=ccfg.cluster_ca_file,
        ),
        node=node,
        labels=_labels(ccfg.node_labels),
        state_dir=state_dir,
        puller=puller,
        report=report,
        log=log,
        report_interval=ccfg.report_interval_s,
        min_interval=ccfg.min_poll_s,
    )


def cmd_cluster(args: argparse.Namespace, stop: threading.Event) -> int:
    if args.cluster_command == "serve":
        return cmd_cluster_serve(args, stop)
    if args.cluster_command == "token":
        return cmd_cluster_token(args)
    from agent.cluster.state import summary_line
    from agent.cluster.sync import ClusterClient, ClusterError

    client = ClusterClient(args.cluster_url, _read_token(args.token_file))
    path = "/v1/status" if args.cluster_command == "status" else "/v1/list"
    try:
        doc = client.get_json_sync(path)
    except ClusterError as err:
        print(f"image-agent: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.output == "json":
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    if args.cluster_command == "status":
        nodes = sorted(doc["nodes"])
        rows = []
        for image, row in doc["images"].items():
            cells = []
            for node in nodes:
                if node in row["present"]:
                    cells.append("ok")
                elif node in row["failed"]:
                    cells.append("failed")
                elif node in row["pulling"]:
                    cells.append("pulling")
                elif node in row["stale"]:
                    cells.append("stale")
                elif node in row["missing"]:
                    cells.append("missing")
                else:
                    cells.append("-")
            rows.append([image, *cells])
        if rows:
            print(report.table(["IMAGE", *nodes], rows))
        print(summary_line(doc))
        return EXIT_OK
    for item in doc["images"]:
        where = ", ".join(item["sources"])
        sel = " ".join(
            f"[{','.join(f'{k}={v}' for k, v in s.items())}]" for s in item["node_selectors"]
        )
        print(f"{item['image']}  <- {where}{' ' + sel if sel else ''}")
    for line in doc["report"]:
        print(f"warning: {line}")
    for line in doc["invalid"]:
        print(f"invalid: {line}")
    for src, st in doc["sources"].items():
        if not st["ok"]:
            print(f"source failing (last good list kept): {src}: {st['error']}")
    return EXIT_OK


def _node_secret(path: str) -> bytes:
    from agent.cluster.tokens import MIN_SECRET_BYTES, is_placeholder

    secret = _read_token(path, "node secret").encode()
    if is_placeholder(secret):
        raise UsageError(
            f"node secret file {path}: still the example value; generate one (openssl rand -hex 32)"
        )
    if secret and len(secret) < MIN_SECRET_BYTES:
        raise UsageError(f"node secret file {path}: want at least {MIN_SECRET_BYTES} bytes")
    return secret


def cmd_cluster_token(args: argparse.Namespace) -> int:
    from agent.cluster import schema
    from agent.cluster.tokens import node_token

    path = args.node_secret_file or os.environ.get("IMAGE_AGENT_CLUSTER_NODE_SECRET_FILE", "")
    if not path:
        raise UsageError("--node-secret-file (or IMAGE_AGENT_CLUSTER_NODE_SECRET_FILE) is needed")
    if not schema.valid_node_name(args.node):
        raise UsageError(f"{args.node!r}: not a DNS-1123 node name")
    print(node_token(_node_secret(path), args.node))
    return EXIT_OK


def cmd_cluster_serve(args: argparse.Namespace, stop: threading.Event) -> int:
    import asyncio

    from agent.cluster import assemble
    from agent.cluster.fetch import Sources, parse_source
    from agent.cluster.http import Options, serve
    from agent.cluster.state import State
    from agent.cluster.tokens import Credentials, is_placeholder

    cfg = config.resolve(config.ClusterServeConfig, args)
    lcfg = config.resolve(config.LogConfig, args)
    try:
        srcs = [
            parse_source(kind, value, n)
            for kind in ("images", "cr", "list", "che", "env")
            for n, value in enumerate(getattr(cfg, f"source_{kind}"))
        ]
        rules = [assemble.parse_rewrite(r) for r in cfg.rewrite]
    except ValueError as err:
        raise UsageError(str(err)) from None
    _, sep, port = cfg.listen.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
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
    ids = [s.id for s in srcs]
    if len(set(ids)) != len(ids):
        raise UsageError("a source is given twice")
    shared = _read_token(cfg.token_file)
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
    logs.configure(lcfg.level, stream=sys.stdout)
    log = logs.get()

    async def main() -> None:
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        threading.Thread(
            target=lambda: (stop.wait(), loop.call_soon_threadsafe(done.set)), daemon=True
        ).start()
        await serve(
            State(order=ids, rules=rules),
            Sources(srcs, cfg.source_interval_s),
            options,
            log=log,
            stop=done,
        )

    try:
        asyncio.run(main())
    except ssl.SSLError as err:
        raise UsageError(f"--tls-cert/--tls-key: {err.reason or err}") from None
    log.info("stopped")
    return EXIT_OK
