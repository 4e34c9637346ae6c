"""``import`` (archives into containerd, one shot) and ``images`` (what the kubelet sees)."""

from __future__ import annotations

import argparse
import json
import threading

from agent import config
from agent.cli import render
from agent.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    apply_limits,
    containerd_client,
    unpack_concurrency,
    wanted_platforms,
)
from agent.containerd.client import Containerd
from agent.errors import ArchiveError
from agent.importer import PINNED_LABEL, Importer, ImportOptions


def import_options(args: argparse.Namespace, cfg: config.ContainerdConfig) -> ImportOptions:
    """The import's options from its flags; a bad platform or concurrency is a usage error."""
    return ImportOptions(
        snapshotter=cfg.snapshotter,
        unpack=not args.no_unpack,
        platforms=None if args.all_platforms else wanted_platforms(args.platform),
        pin=not args.no_pin,
        base_name=args.base_name,
        unpack_concurrency=unpack_concurrency(args),
    )


def cmd_import(args: argparse.Namespace, stop: threading.Event) -> int:
    apply_limits(args)
    client, cfg = containerd_client(args)
    with client:
        options = import_options(args, cfg)  # usage errors before any connection
        client.version()  # a clear error now if containerd is not there
        progress = render.ProgressLine()
        importer = Importer(client, options, progress=progress, stop=stop)
        failed = 0
        for path in args.files:
            try:
                result = importer.import_file(path)
            except ArchiveError as err:
                progress.done()
                render.error(err)
                failed += 1
                continue
            finally:
                progress.done()
            render.import_result(result)
        return EXIT_FAILED if failed else EXIT_OK


def image_rows(client: Containerd) -> list[render.ImageRow]:
    """CRI's image list, with pinning read from the image records where CRI does not report it."""
    pinned_names = {r.name for r in client.list_images() if r.labels.get(PINNED_LABEL) == "pinned"}
    rows: list[render.ImageRow] = []
    for img in sorted(client.cri_images(), key=lambda i: (i.repo_tags, i.id)):
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


def cmd_images(args: argparse.Namespace, stop: threading.Event) -> int:
    client, _ = containerd_client(args)
    with client:
        rows = image_rows(client)
    if args.output == "json":
        print(json.dumps(rows, indent=2))
    else:
        print(render.images_table(rows))
    return EXIT_OK
