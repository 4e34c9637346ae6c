"""``pull``: pull images through the CRI and pin them, once."""

from __future__ import annotations

import argparse
import threading
from concurrent.futures import ThreadPoolExecutor

from agent import config, logs
from agent.cli import render
from agent.cli.common import EXIT_FAILED, EXIT_OK, containerd_client, puller
from agent.errors import AgentError
from agent.image import refs
from agent.pull.engine import classify


def cmd_pull(args: argparse.Namespace, stop: threading.Event) -> int:
    """Pull REFs now (ImageStatus first, PullImage if absent), pin them, report each."""
    pcfg = config.resolve(config.PullConfig, args)
    wanted: list[str] = []
    failed = 0
    for text in args.refs:
        try:
            wanted.append(refs.normalize(text))
        except refs.InvalidReference as err:
            render.error(err)
            failed += 1
    client, _ = containerd_client(args)
    with client:
        client.version()
        engine = puller(client, pcfg, logs.get())
        with ThreadPoolExecutor(max(1, pcfg.concurrency)) as pool:
            futures = {ref: pool.submit(engine.ensure, ref) for ref in wanted}
            for ref, future in futures.items():
                try:
                    outcome, image_id = future.result()
                except AgentError as err:
                    render.error(f"{ref}: {classify(err).reason}")
                    failed += 1
                    continue
                print(f"{outcome} {ref} {image_id}")
    return EXIT_FAILED if failed else EXIT_OK
