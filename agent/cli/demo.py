"""``demo``: a private containerd, a sample archive imported into it, the result listed."""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
from pathlib import Path

from agent.cli import render
from agent.cli.common import EXIT_OK
from agent.cli.images import image_rows
from agent.containerd.client import Containerd
from agent.errors import AgentError, UsageError
from agent.image import platforms
from agent.importer import Importer, ImportOptions
from agent.testing import samples
from agent.testing.sandbox import PrivateContainerd


def cmd_demo(args: argparse.Namespace, stop: threading.Event) -> int:
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
        with archive.open("wb") as f:
            samples.write(f, samples.oci_archive(samples.demo_images(node)), "zstd")
        print(f"built sample archive {archive} ({render.human_bytes(archive.stat().st_size)})")
        with Containerd(ctd.address) as client:
            cmd = ["image-agent", "import", "--address", ctd.address, str(archive)]
            print(f"$ {' '.join(cmd)}")
            importer = Importer(
                client,
                ImportOptions(platforms=(node,)),
                progress=render.ProgressLine(),
                stop=stop,
            )
            render.import_result(importer.import_file(str(archive)))
            print(f"$ image-agent images --address {ctd.address}")
            rows = image_rows(client)
        render.demo_images(rows)
        if not rows:
            raise AgentError("the CRI lists no image after the import")
        return EXIT_OK
    finally:
        ctd.stop()
        if not args.keep:
            ctd.cleanup()
