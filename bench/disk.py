"""A fresh, journaled ext4 filesystem per measured run.

Why: this machine's root filesystem is ext4 without a journal. There, ext4
skips every inode freed in the last minutes when it allocates a new one
(``recently_deleted`` in ``fs/ext4/ialloc.c``), so after one run's state is
deleted the next run's file creates scan the inode table. In perf this was
more than 30 % of all samples (``find_inode_bit`` -> ``recently_deleted``),
containerd's system time rose from about 4 s to 22 s, and which run paid it
depended on the order. A node's filesystem has a journal, where that check
does not run. A new filesystem for each run measures what a node sees and
keeps the runs independent.

Needs root (loop devices and mount), as containerd does.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: Sparse; only what a run writes takes space.
DISK_SIZE = "24G"


def available() -> bool:
    """Whether this machine can make loop filesystems (the tools are there)."""
    return all(shutil.which(t) for t in ("mkfs.ext4", "losetup", "mount", "umount"))


@contextlib.contextmanager
def fresh_disk(parent: Path = Path("/var/tmp")) -> Iterator[Path]:
    """Mount a new ext4 filesystem (default features, journal on) and yield its root.

    The loop device uses direct I/O, so its backing file is not cached twice.
    """
    work = Path(tempfile.mkdtemp(prefix="ia-disk-", dir=parent))
    image, mount_point = work / "disk.img", work / "mnt"
    mount_point.mkdir()
    try:
        subprocess.run(["truncate", "-s", DISK_SIZE, str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        device = subprocess.run(
            ["losetup", "--direct-io=on", "--find", "--show", str(image)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        try:
            subprocess.run(["mount", device, str(mount_point)], check=True)
            try:
                yield mount_point
            finally:
                subprocess.run(["umount", str(mount_point)], check=True)
        finally:
            subprocess.run(["losetup", "--detach", device], check=True)
    finally:
        shutil.rmtree(work)
