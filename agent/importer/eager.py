"""Unpacking layers while the archive is still streaming.

Most archives store an image's layers in order (podman, skopeo, and archives
written metadata-first), but the document that says so (manifest, config)
often comes after them. So the layers are applied speculatively, on a
worker thread, in the order they appear, each on top of the previous one.
A snapshot is named by its ChainID, which follows from the actual layer
contents, so a guess is either exactly right, and the authoritative unpack
afterwards finds the snapshot and skips it, or names a chain nobody asks
for, which the import's lease holds until containerd collects it.

This guess serves archives read as a stream (and ``--unpack-concurrency
1``). For a regular file the importer knows the chains before the layers
arrive (:mod:`agent.importer.prescan`) and applies them exactly
(:mod:`agent.importer.unpack`): in a many-image bundle the arrival-order
guess is wrong from the second image on.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from agent.archive import layout
from agent.archive.compression import Compression
from agent.containerd.content import ContentStore
from agent.containerd.snapshots import SnapshotStore
from agent.errors import AgentError, AlreadyExists, ArchiveError
from agent.image.labels import UNCOMPRESSED_LABEL

if TYPE_CHECKING:
    from agent.importer.trace import Timeline


@runtime_checkable
class LayerStore(ContentStore, SnapshotStore, Protocol):
    """Content and snapshots: what unpacking needs (containerd, not verify's store)."""


def apply_layer(
    client: LayerStore,
    snapshotter: str,
    lease: str,
    parent: str,
    media_type: str,
    digest: str,
    size: int,
    *,
    stop: threading.Event,
    diff_id: str = "",
    timeline: Timeline | None = None,
) -> str:
    """Unpack one layer blob on top of snapshot ``parent``; returns the committed ChainID.

    With ``diff_id`` the layer must unpack to it, else ArchiveError. A ChainID
    committed meanwhile by someone else (CRI, another import) is as good. On
    any failure the temporary active snapshot is removed.
    """
    key = f"image-agent-unpack-{uuid.uuid4().hex}"
    started = time.monotonic()
    mounts = client.prepare(snapshotter, key, parent, lease=lease)
    prepared = time.monotonic()
    try:
        applied = client.apply(media_type, digest, size, mounts, lease=lease, stop=stop)
        done = time.monotonic()
        _check_diff_id(digest, applied, diff_id)
        committed = layout.chain_id(parent, applied)
        try:
            client.commit(snapshotter, committed, key, lease=lease)
        except AlreadyExists:
            client.remove_snapshot(snapshotter, key)
    except BaseException:
        client.remove_snapshot(snapshotter, key)
        raise
    if timeline is not None:
        timeline.event(
            "layer unpacked",
            digest=digest,
            bytes=size,
            start_s=round(started - timeline.started, 4),
            prepare_s=round(prepared - started, 4),
            apply_s=round(done - prepared, 4),
            commit_s=round(time.monotonic() - done, 4),
        )
    return committed


def _check_diff_id(digest: str, applied: str, diff_id: str | None) -> None:
    """With a ``diff_id`` from the config, the layer must have unpacked to it."""
    if diff_id and applied != diff_id:
        raise ArchiveError(f"layer {digest} unpacks to {applied}, but its config says {diff_id}")


def looks_like_layer(head: bytes, compression: Compression) -> bool:
    """From a blob's first 512 bytes: a (compressed) tar, i.e. a layer."""
    if compression in (Compression.GZIP, Compression.ZSTD):
        return True
    return compression is Compression.NONE and head[257:262] == b"ustar"


# How often finish() looks at the import's stop while the worker runs.
JOIN_POLL_S = 0.1


class EagerUnpacker:
    """Apply layers in arrival order on a worker thread; best effort."""

    def __init__(
        self,
        client: LayerStore,
        snapshotter: str,
        lease: str,
        stop: threading.Event,
        timeline: Timeline | None = None,
    ) -> None:
        self.client = client
        self.timeline = timeline
        self.snapshotter = snapshotter
        self.lease = lease
        self.applied = 0
        self.failed: str | None = None
        self._parent = ""
        self._queue: queue.SimpleQueue[tuple[Compression, str, int] | None] = queue.SimpleQueue()
        # Set by finish(cancel=True) or by the import's own stop (SIGTERM).
        self._stop = threading.Event()
        self._import_stop = stop
        self._thread = threading.Thread(target=self._run, name="eager-unpack", daemon=True)
        self._thread.start()

    def layer(self, compression: Compression, digest: str, size: int) -> None:
        """A layer blob is in the content store (just written, or there before)."""
        self._queue.put((compression, digest, size))

    def image_boundary(self) -> None:
        """A config went by: the next layer most likely starts a new image."""
        self._queue.put((Compression.NONE, "", 0))

    def finish(self, *, cancel: bool = False) -> None:
        """Wait for queued work (or abandon it) and end the worker.

        A layer being applied is cancelled too (``cancel``, or the import's
        stop while waiting), so this never waits for a big layer to finish.
        """
        if cancel:
            self._stop.set()
        self._queue.put(None)
        while self._thread.is_alive():
            self._thread.join(JOIN_POLL_S)
            if self._import_stop.is_set():
                self._stop.set()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._stop.is_set() or self._import_stop.is_set() or self.failed:
                continue
            compression, digest, size = item
            if not digest:
                self._parent = ""
                continue
            try:
                self._apply(compression, digest, size)
            except AgentError as err:
                # The authoritative unpack will meet (and report) the problem.
                self.failed = str(err)

    def _apply(self, compression: Compression, digest: str, size: int) -> None:
        diff_id = digest if compression is Compression.NONE else ""
        if not diff_id:
            info = self.client.blob_info(digest)
            diff_id = info.labels.get(UNCOMPRESSED_LABEL, "") if info else ""
        known = layout.chain_id(self._parent, diff_id) if diff_id else ""
        if known and self.client.snapshot_exists(self.snapshotter, known):
            self._parent = known
            return
        media_type = layout.layer_media_type(compression, docker=True)
        self._parent = apply_layer(
            self.client,
            self.snapshotter,
            self.lease,
            self._parent,
            media_type,
            digest,
            size,
            stop=self._stop,
            timeline=self.timeline,
        )
        self.applied += 1
