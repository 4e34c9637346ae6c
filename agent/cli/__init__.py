"""The command line: parse, configure logging, dispatch to the command's module.

Each command module (:mod:`~agent.cli.images`, :mod:`~agent.cli.run`, ...)
reads its config, builds its objects and hands them over; :mod:`~agent.cli.render`
turns results into text. Nothing else in the package reads flags or the
environment, creates a client or installs signal handlers. A command's module
is loaded only when that command runs, so ``image-agent status`` does not pay
for the cluster server's imports.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import cast

from agent import logs
from agent.cli.common import EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_USAGE
from agent.cli.parser import build_parser
from agent.errors import AgentError, ContainerdUnavailable, UsageError

Command = Callable[[argparse.Namespace, threading.Event], int]

# command (with its subcommand) -> "module:function" in this package
COMMANDS = {
    "import": "images:cmd_import",
    "images": "images:cmd_images",
    "demo": "demo:cmd_demo",
    "run": "run:cmd_run",
    "status": "status:cmd_status",
    "retry": "status:cmd_retry",
    "pull": "pull:cmd_pull",
    "bundle": "airgap:cmd_bundle",
    "verify": "airgap:cmd_verify",
    "cluster serve": "serve:cmd_cluster_serve",
    "cluster token": "cluster:cmd_cluster_token",
    "cluster status": "cluster:cmd_cluster_view",
    "cluster images": "cluster:cmd_cluster_view",
}


def command(name: str) -> Command:
    """The function that runs command ``name`` (its module loaded now)."""
    target = COMMANDS.get(name)
    if target is None:
        raise UsageError(f"unknown command {name}")
    module, _, function = target.partition(":")
    return cast(Command, getattr(importlib.import_module(f"agent.cli.{module}"), function))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(os.environ.get("IMAGE_AGENT_LOG_LEVEL", "warning"), stream=sys.stderr)
    stop = threading.Event()
    _install_signal_handlers(stop)
    try:
        name = " ".join(filter(None, (args.command, getattr(args, "cluster_command", None))))
        return command(name)(args, stop)
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
