"""``status`` (the daemon's health and every archive's state) and ``retry``."""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

from agent.cli import render
from agent.cli.common import EXIT_OK, state_dir
from agent.node.state import Store
from agent.node.status import status_doc


def cmd_status(args: argparse.Namespace, stop: threading.Event) -> int:
    doc = status_doc(Store(state_dir(args), readonly=True))
    if args.output == "json":
        print(json.dumps(doc, indent=2))
    else:
        render.node_status(doc)
    return EXIT_OK


def cmd_retry(args: argparse.Namespace, stop: threading.Event) -> int:
    store = Store(state_dir(args))
    for path in args.paths:
        store.request_retry(str(Path(path).absolute()))
        print(f"retry requested for {path}")
    return EXIT_OK
