"""Import image archives into containerd in one streaming pass.

Three steps, each its own module:

- :mod:`~agent.importer.ingest` reads the archive once, front to back, and
  streams every blob into the content store under a lease (and, while it
  streams, hands layers to the eager unpacker);
- :mod:`~agent.importer.resolve` turns the archive's documents into image
  plans for the selected platforms, writing nothing;
- :mod:`~agent.importer.commit` labels the content, unpacks the layers and
  writes the image records, last.

Only then is the lease released; an import that fails at any point leaves
no image record (tags it moved are moved back) and lets containerd collect
what it wrote.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import threading
import time
from typing import BinaryIO

from agent import platforms
from agent.containerd.labels import GC_CONTENT, GC_SNAPSHOT, MANAGED_LABEL, PINNED_LABEL
from agent.eager import EagerUnpacker, LayerStore
from agent.errors import ArchiveError, Cancelled, ContainerdError, UsageError
from agent.importer.commit import Commit
from agent.importer.ingest import Ingest
from agent.importer.model import (
    BUNDLE_CONTENTS,
    CRI_NAMESPACE,
    ImportedImage,
    ImportOptions,
    ImportResult,
    Progress,
    ProgressFn,
)
from agent.importer.resolve import resolve
from agent.importer.store import CriView, ImportTarget

__all__ = [
    "BUNDLE_CONTENTS",
    "CRI_NAMESPACE",
    "GC_CONTENT",
    "GC_SNAPSHOT",
    "MANAGED_LABEL",
    "PINNED_LABEL",
    "ImportOptions",
    "ImportResult",
    "ImportTarget",
    "ImportedImage",
    "Importer",
    "Progress",
    "ProgressFn",
]


class Importer:
    """Imports archives through one store (containerd). Safe to reuse, not to share.

    ``progress`` is a passive sink: it is handed :class:`Progress` values and
    nothing more is expected of it. ``stop`` ends the import in any step
    with :class:`~agent.errors.Cancelled`, releasing its lease; once the
    records are written the import is complete, and a stop while waiting
    for the CRI only ends the wait (the names go to ``not_in_cri``).
    """

    def __init__(
        self,
        client: ImportTarget,
        options: ImportOptions,
        *,
        progress: ProgressFn | None = None,
        stop: threading.Event | None = None,
        lease_labels: dict[str, str] | None = None,
    ) -> None:
        self.client = client
        self.options = options
        self.progress = progress
        self.stop = stop or threading.Event()
        self.lease_labels = lease_labels or {}

    def import_file(self, path: str) -> ImportResult:
        """Import one archive file. Raises ArchiveError (naming the file) or ContainerdError.

        Only a regular file is read, and opening never blocks: a FIFO or a
        device in its place is an ArchiveError at once.
        """
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ArchiveError("file is empty", file=path)
            return self.import_stream(f, name=path, size=size)

    def import_stream(self, raw: BinaryIO, *, name: str, size: int = 0) -> ImportResult:
        started = time.monotonic()
        unpacker = self._unpacker()
        lease = self.client.create_lease(labels=self.lease_labels)
        commit = Commit(self.client, self.options, lease, stop=self.stop, unpacker=unpacker)
        succeeded = False
        try:
            result = self._run(raw, name, size, lease, commit)
            succeeded = True
        except ArchiveError as err:
            commit.rollback()
            raise err.for_file(name) from None
        except BaseException:
            commit.rollback()
            raise
        finally:
            # If containerd is gone, the lease expires by itself. Only a
            # complete import waits (within the client's deadline) for
            # containerd to collect; a failed or cancelled one, whose
            # leftovers may take long to remove, lets it collect them later.
            with contextlib.suppress(ContainerdError):
                self.client.delete_lease(lease, sync=succeeded)
        result.not_in_cri = self._wait_for_cri(result)
        result.duration_s = time.monotonic() - started
        return result

    def _unpacker(self) -> LayerStore | None:
        if not self.options.unpack:
            return None
        if not isinstance(self.client, LayerStore):
            raise UsageError("this store cannot unpack layers (import with unpack=False)")
        return self.client

    def _run(self, raw: BinaryIO, name: str, size: int, lease: str, commit: Commit) -> ImportResult:
        eager = None
        if commit.unpacker is not None:
            eager = EagerUnpacker(commit.unpacker, self.options.snapshotter, lease, self.stop)
        ingest = Ingest(
            self.client,
            lease,
            stop=self.stop,
            eager=eager,
            progress=self.progress,
            file=name,
            size=size,
        )
        ingest.run(raw)
        plan = resolve(ingest.docs, ingest, self.options, self.stop)
        images = commit.run(plan)
        return ImportResult(
            file=name,
            images=images,
            unnamed=plan.unnamed,
            absent_platforms=plan.absent_platforms,
            bytes_read=ingest.bytes_read,
            blobs_written=ingest.blobs_written,
            blobs_present=ingest.blobs_present,
        )

    def _wait_for_cri(self, result: ImportResult) -> list[str]:
        """Return once the kubelet can see the node's images (the CRI caches image records)."""
        client = self.client
        if self.options.cri_wait_s <= 0 or not isinstance(client, CriView):
            return []
        if client.namespace != CRI_NAMESPACE:
            return []
        node = platforms.node()
        expect = {
            image.name: image.digest
            for image in result.images
            if "@" not in image.name
            and (
                not image.platforms
                or any(node.matches(platforms.parse(p)) for p in image.platforms)
            )
        }
        if not expect:
            return []
        try:
            return client.cri_wait(expect, self.options.cri_wait_s, stop=self.stop)
        except Cancelled:
            # The import itself is complete: report what the CRI had not shown yet.
            return sorted(expect)


def open_regular(path: str) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file, without ever blocking.

    O_NONBLOCK makes opening a FIFO with no writer return at once (a plain
    open would wait for one for ever); the file type is then checked on
    the open descriptor itself, so a swap in between cannot fool it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as err:
        raise ArchiveError(err.strerror or str(err), file=path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArchiveError(f"not a regular file ({_kind(st.st_mode)})", file=path)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _kind(mode: int) -> str:
    for test, what in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return what
    return "not a file"
