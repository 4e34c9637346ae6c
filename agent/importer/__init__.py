"""Import image archives into containerd in one streaming pass.

Three steps, each its own module:

- :mod:`~agent.importer.ingest` reads the archive once, front to back, and
  streams every blob into the content store under a lease (and, while it
  streams, hands layers to the eager unpacker);
- :mod:`~agent.importer.resolve` turns the archive's documents into image
  plans for the selected platforms, writing nothing;
- :mod:`~agent.importer.commit` labels the content, unpacks the layers and
  writes the image records, last.

Beside them, :mod:`~agent.importer.prescan` reads a regular file a second
time for its metadata only, so that :mod:`~agent.importer.unpack` applies
layer chains, independent ones in parallel, while the archive streams;
:mod:`~agent.importer.trace` logs where the time goes (at debug level).

Only then is the lease released; an import that fails at any point leaves
no image record (tags it moved are moved back) and lets containerd collect
what it wrote.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

from agent.archive import layout
from agent.archive.compression import Compression
from agent.archive.layout import Descriptor
from agent.errors import ArchiveError, Cancelled, ContainerdError, UsageError
from agent.image import platforms
from agent.image.labels import GC_CONTENT, GC_SNAPSHOT, MANAGED_LABEL, PINNED_LABEL
from agent.importer import prescan
from agent.importer.commit import Commit
from agent.importer.eager import EagerUnpacker, LayerStore
from agent.importer.ingest import Ingest, open_regular
from agent.importer.model import (
    BUNDLE_CONTENTS,
    CRI_NAMESPACE,
    ImportedImage,
    ImportOptions,
    ImportResult,
    Progress,
    ProgressFn,
    Resolution,
)
from agent.importer.resolve import resolve
from agent.importer.store import CriView, ImportTarget
from agent.importer.trace import Timeline
from agent.importer.unpack import ChainLayer, ParallelUnpack

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
            head = os.pread(f.fileno(), 64, 0)
            reread = path if prescan.worth_it(head) else ""
            return self.import_stream(f, name=path, size=size, reread=reread)

    def import_stream(
        self, raw: BinaryIO, *, name: str, size: int = 0, reread: str = ""
    ) -> ImportResult:
        """Import the archive ``raw``; ``reread``: a regular file with the same bytes.

        With ``reread``, unpacking on and more than one layer at a time, the
        file is pre-scanned for its metadata (:mod:`agent.importer.prescan`)
        so that layers are applied while the archive streams.
        """
        started = time.monotonic()
        timeline = Timeline(name)
        unpacker = self._unpacker()
        lease = self.client.create_lease(labels=self.lease_labels)
        commit = Commit(
            self.client,
            self.options,
            lease,
            stop=self.stop,
            unpacker=unpacker,
            timeline=timeline,
        )
        succeeded = False
        try:
            result = self._run(raw, name, size, lease, commit, reread)
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
            with contextlib.suppress(ContainerdError), timeline.phase("lease release"):
                self.client.delete_lease(lease, sync=succeeded)
        with timeline.phase("cri wait", images=len(result.images)):
            result.not_in_cri = self._wait_for_cri(result)
        result.duration_s = time.monotonic() - started
        timeline.event("import done", duration_s=round(result.duration_s, 4))
        return result

    def _unpacker(self) -> LayerStore | None:
        if not self.options.unpack:
            return None
        if not isinstance(self.client, LayerStore):
            raise UsageError("this store cannot unpack layers (import with unpack=False)")
        return self.client

    def _stages(
        self, name: str, size: int, lease: str, commit: Commit, reread: str
    ) -> tuple[Ingest, ParallelUnpack | None, prescan.Prescan | None]:
        """The ingest, and the early unpacker and pre-scan feeding it when they are worth it.

        With a file to re-read and more than one layer at a time, layers are
        applied as they land; else, with unpacking, one after another.
        """
        timeline = commit.timeline
        early = scan = None
        concurrency = self.options.unpack_concurrency
        ingest = Ingest(
            self.client,
            lease,
            stop=self.stop,
            progress=self.progress,
            file=name,
            size=size,
        )
        if commit.unpacker is not None and reread and concurrency > 1:
            early = ParallelUnpack(
                commit.unpacker,
                self.options.snapshotter,
                lease,
                stop=self.stop,
                concurrency=concurrency,
                strict=False,
                timeline=timeline,
                name="early-unpack",
            )
            ingest.on_blob = _provider(early)
            scan = prescan.Prescan(
                reread, self.options, _planner(early, ingest, commit), timeline=timeline
            )
        elif commit.unpacker is not None:
            ingest.eager = EagerUnpacker(
                commit.unpacker, self.options.snapshotter, lease, self.stop, timeline
            )
        return ingest, early, scan

    def _run(
        self, raw: BinaryIO, name: str, size: int, lease: str, commit: Commit, reread: str
    ) -> ImportResult:
        timeline = commit.timeline
        ingest, early, scan = self._stages(name, size, lease, commit, reread)
        try:
            with timeline.phase("stream"):
                ingest.run(raw)
            if scan is not None:
                scan.close()
                timeline.event("prescan outcome", outcome=scan.outcome)
            with timeline.phase("resolve"):
                plan = resolve(ingest.docs, ingest, self.options, self.stop)

            def settle() -> set[str]:
                """Let the early unpacker finish what it can; the ChainIDs it committed."""
                if early is None:
                    return set()
                with timeline.phase("early unpack tail"):
                    early.finish()
                return early.done_ids()

            # Labels are written while the early unpacker still applies.
            images = commit.run(plan, settle=settle, written=ingest.written)
        except BaseException:
            if scan is not None:
                scan.close()
            if early is not None:
                early.finish(cancel=True)
            raise
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


def _planner(early: ParallelUnpack, ingest: Ingest, commit: Commit) -> Callable[[Resolution], None]:
    """Put a pre-scan's plan to work while the archive streams.

    The chains go to the early unpacker, image by image; blobs still to
    come are written with their labels; the manifests docker archives lack
    are written now.
    """

    def found(plan: Resolution) -> None:
        selected = [s for image in plan.images for s in image.selected]
        for n, sel in enumerate(selected):
            early.add_chain(
                n,
                [
                    ChainLayer(layer.digest, diff_id)
                    for layer, diff_id in zip(sel.doc.layers, sel.config.diff_ids, strict=True)
                ],
            )
        ingest.planned = commit.planned_labels(plan.images)
        with commit.timeline.phase("early manifests", count=len(plan.synthesized)):
            commit.write_early(plan, ingest.written)

    return found


def _provider(early: ParallelUnpack) -> Callable[[str, str, int, Compression], None]:
    """Tell the early unpacker of each layer blob as it lands in the content store."""

    def on_blob(path: str, digest: str, size: int, compression: Compression) -> None:
        if compression not in (Compression.NONE, Compression.GZIP, Compression.ZSTD):
            return  # not a layer containerd can apply: the final pass reports it
        blob = Descriptor(layout.layer_media_type(compression, docker=True), digest, size)
        early.provide(digest, blob)
        early.provide(prescan.path_key(path), blob)

    return on_blob
