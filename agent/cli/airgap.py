"""``bundle`` (listed images from registries into one archive) and ``verify`` (check one)."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from agent.airgap import bundle
from agent.airgap.registry import RegistryClient
from agent.airgap.verify import Report, verify
from agent.cli import render
from agent.cli.common import EXIT_FAILED, EXIT_OK, apply_limits, wanted_platforms
from agent.errors import ArchiveError, UsageError
from agent.image import lists
from agent.importer import Progress
from agent.pull import auth as pull_auth


def _read_lists(paths: list[str]) -> tuple[list[lists.Entry], list[lists.Problem]]:
    entries: list[lists.Entry] = []
    problems: list[lists.Problem] = []
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise UsageError(f"--list {path}: {err.strerror or err}") from None
        e, p = lists.parse(text, path)
        entries += e
        problems += p
    return entries, problems


def cmd_bundle(args: argparse.Namespace, stop: threading.Event) -> int:
    apply_limits(args)
    plats = wanted_platforms(args.platform)
    entries, problems = _read_lists(args.lists)
    if problems:
        for problem in problems:
            render.error(problem)
        return EXIT_FAILED
    refs_ = list(lists.union(entries))
    if not refs_:
        raise UsageError("the lists name no image")
    creds = pull_auth.load(args.auth_file) if args.auth_file else {}
    client = RegistryClient(creds, plain_http=frozenset(args.plain_http))
    out = Path(args.output or bundle.default_name(plats))
    print(f"resolving {len(refs_)} image(s) for {', '.join(map(str, plats))}", file=sys.stderr)
    the_plan = bundle.plan(client, refs_, plats)
    line = render.ProgressLine()
    start = time.monotonic()

    def progress(done: int, total: int) -> None:
        line(Progress(str(out), done, total, time.monotonic() - start))

    try:
        bundle.write(client, the_plan, plats, out, progress)
    finally:
        line.done()
    render.bundle_result(the_plan, out, time.monotonic() - start)
    return EXIT_OK


def verify_doc(path: str, rep: Report) -> dict[str, Any]:
    """One archive's entry in ``verify -o json``."""
    return {
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


def cmd_verify(args: argparse.Namespace, stop: threading.Event) -> int:
    apply_limits(args)
    failed = 0
    reports = []
    for path in args.files:
        line = render.ProgressLine()
        try:
            rep = verify(path, progress=line)
        except ArchiveError as err:
            line.done()
            render.error(err)
            failed += 1
            continue
        line.done()
        reports.append(verify_doc(path, rep))
        if args.output == "text":
            render.verify_report(path, rep)
    if args.output == "json":
        print(json.dumps(reports, indent=2))
    return EXIT_FAILED if failed else EXIT_OK
