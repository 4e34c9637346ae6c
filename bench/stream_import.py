"""Import an archive as from a pipe: the same importer, without the metadata pre-scan.

    CONTAINERD_ADDRESS=... .venv/bin/python -m bench.stream_import FILE

For measuring what the pre-scan of regular files saves (``import_bench
--trace FILE --no-prescan``): the file is read once, front to back, as
``zstd -dc x.tar.zst | ...`` would give it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from agent import logs
from agent.containerd import Containerd
from agent.image import platforms
from agent.importer import Importer, ImportOptions


def main() -> int:
    logs.configure(os.environ.get("IMAGE_AGENT_LOG_LEVEL", "warning"), stream=sys.stderr)
    path = sys.argv[1]
    with Containerd(os.environ["CONTAINERD_ADDRESS"]) as client, Path(path).open("rb") as f:
        importer = Importer(client, ImportOptions(platforms=(platforms.node(),)))
        result = importer.import_stream(f, name=path, size=os.fstat(f.fileno()).st_size)
    print(f"{len(result.images)} image(s), {result.duration_s:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
