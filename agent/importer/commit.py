"""Commit: what makes the imported content an image: labels, snapshots, records.

In this order, for all images of the archive before the next step:

1. manifests made for docker archives are written;
2. labels are set on the content: GC references (so that containerd keeps
   it once the lease is gone), each layer's uncompressed digest, and the
   registry each image is named after (``containerd.io/distribution.source``,
   as a registry pull sets it, so that a node-local mirror can serve it);
3. layers are unpacked into the snapshotter, independent chains in
   parallel (:mod:`agent.importer.unpack`), ``stop`` looked at between any
   two layers and while one is applied;
4. the image records are written, last. When one fails, the records this
   import created are removed and the tags it moved are moved back.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

from agent.archive import layout
from agent.containerd.images import ImageRecord
from agent.errors import ArchiveError, ContainerdError
from agent.image import refs
from agent.image.labels import (
    GC_SNAPSHOT,
    MANAGED_LABEL,
    MANAGED_VALUE,
    PINNED_LABEL,
    PINNED_VALUE,
    distribution_source,
    merge_sources,
)
from agent.importer.eager import LayerStore
from agent.importer.ingest import check_stop
from agent.importer.model import ImagePlan, ImportedImage, ImportOptions, Resolution
from agent.importer.store import ImportTarget
from agent.importer.trace import QUIET, Timeline
from agent.importer.unpack import ChainLayer, ParallelUnpack

# Label and record calls in flight at once (each is one short round trip).
ROUND_TRIPS_AT_ONCE = 8
T = TypeVar("T")


class Commit:
    """The commit step of one import under ``lease``."""

    def __init__(
        self,
        store: ImportTarget,
        options: ImportOptions,
        lease: str,
        *,
        stop: threading.Event,
        unpacker: LayerStore | None,
        timeline: Timeline = QUIET,
    ) -> None:
        self.timeline = timeline
        self.store = store
        self.options = options
        self.lease = lease
        self.stop = stop
        self.unpacker = unpacker
        # (name, our target digest) of records this import created, and
        # (record as it was, our target digest) of those it moved.
        self.created: list[tuple[str, str]] = []
        self.moved: list[tuple[ImageRecord, str]] = []

    def run(
        self,
        plan: Resolution,
        *,
        settle: Callable[[], set[str]] | None = None,
        written: dict[str, dict[str, str]] | None = None,
    ) -> list[ImportedImage]:
        """Label, unpack and record ``plan``.

        ``settle``, called once labels are set, waits for unpacking begun
        earlier and returns the ChainIDs it committed. ``written``: the blobs
        this import wrote, with the labels they were written with (they
        carry no others, so need not be read, and are not labelled again
        with the same).
        """
        written = written if written is not None else {}
        wanted = self.planned_labels(plan.images)
        with self.timeline.phase("synthesized", count=len(plan.synthesized)):
            write = self._write_synthesized(plan.synthesized, wanted, written)
            self._each(write, list(plan.synthesized))
        with self.timeline.phase("labels"):
            self.label(plan.images, written)
        if self.unpacker is not None:
            with self.timeline.phase("unpack", concurrency=self.options.unpack_concurrency):
                self.unpack_all(self.unpacker, plan.images, settle() if settle else set())
        with self.timeline.phase("records", images=len(plan.images)):
            return self.records(plan.images)

    def _write_synthesized(
        self,
        bodies: dict[str, bytes],
        wanted: dict[str, dict[str, str]],
        written: dict[str, dict[str, str]],
    ) -> Callable[[str], None]:
        def write(digest: str) -> None:
            check_stop(self.stop)
            if digest in written:
                return  # written early, from the pre-scan's plan
            body = bodies[digest]
            if self.store.blob_info(digest) is None:
                labels = wanted.get(digest, {})
                self.store.write_blob(
                    [body], lease=self.lease, total=len(body), expected=digest, labels=labels
                )
                written[digest] = labels

        return write

    def write_early(self, plan: Resolution, written: dict[str, dict[str, str]]) -> None:
        """Write a pre-scan plan's manifests, labelled, while the archive still streams.

        Only manifests whose layers the archive names by digest: a manifest
        is addressed by its own digest, so one that the final plan does not
        make is left unreferenced, for containerd to collect.
        """
        wanted = self.planned_labels(plan.images)
        for digest, body in plan.synthesized.items():
            check_stop(self.stop)
            if b'"path:' in body or self.store.blob_info(digest) is not None:
                continue
            labels = wanted.get(digest, {})
            self.store.write_blob(
                [body], lease=self.lease, total=len(body), expected=digest, labels=labels
            )
            written[digest] = labels

    # -- labels ----------------------------------------------------------------

    def _wanted(
        self, images: list[ImagePlan]
    ) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, set[str]]]]:
        """Labels each blob gets, and the distribution sources to merge into them."""
        wanted: dict[str, dict[str, str]] = defaultdict(dict)
        sources: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        snapshot_key = f"{GC_SNAPSHOT}.{self.options.snapshotter}"
        for image in images:
            for digest, labels in image.labels:
                wanted[digest].update(labels)
            named = [s for s in map(distribution_source, image.names) if s is not None]
            for digest in image.contents():
                wanted.setdefault(digest, {})
                for key, repository in named:
                    sources[digest][key].add(repository)
            if self.unpacker is not None:
                for sel in image.selected:
                    if sel.config.diff_ids:
                        top = layout.chain_ids(sel.config.diff_ids)[-1]
                        wanted[sel.doc.config.digest][snapshot_key] = top
        return wanted, sources

    def planned_labels(self, images: list[ImagePlan]) -> dict[str, dict[str, str]]:
        """The labels of each blob of ``images``, for a blob that carries none yet."""
        wanted, sources = self._wanted(images)
        for digest, keys in sources.items():
            for key, repos in keys.items():
                wanted[digest][key] = merge_sources("", *repos, key=key)
        return dict(wanted)

    def label(self, images: list[ImagePlan], written: dict[str, dict[str, str]]) -> None:
        """GC references, uncompressed digests and distribution sources, blob by blob.

        With unpacking on, each config also gets its GC reference to the
        top snapshot of its chain here, in the same call (the chain is
        unpacked before the lease that holds it goes). Blobs are labelled
        several at a time: each is its own round trip. A blob this import
        wrote with exactly these labels is left as it is.
        """
        wanted, sources = self._wanted(images)

        def one(digest: str) -> None:
            check_stop(self.stop)
            labels = wanted[digest]
            if sources.get(digest):
                info = None if digest in written else self.store.blob_info(digest)
                have = info.labels if info is not None else {}
                for key, repos in sources[digest].items():
                    labels[key] = merge_sources(have.get(key, ""), *repos, key=key)
            if written.get(digest) == labels:
                return
            self.store.label_blob(digest, labels)

        self._each(one, list(wanted))

    def _each(self, fn: Callable[[str], T], items: list[str]) -> list[T]:
        """``fn`` over ``items``, up to ROUND_TRIPS_AT_ONCE at a time; results in order.

        The first failure is raised once every call has ended (none is left
        running behind the caller's back).
        """
        if len(items) <= 1:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(ROUND_TRIPS_AT_ONCE, thread_name_prefix="commit") as pool:
            futures = [pool.submit(fn, i) for i in items]
            wait(futures)
        return [f.result() for f in futures]

    # -- unpacking ---------------------------------------------------------------

    def unpack_all(self, unpacker: LayerStore, images: list[ImagePlan], unpacked: set[str]) -> None:
        """Every selected image's chain, independent ones in parallel; raises the first failure."""
        run = ParallelUnpack(
            unpacker,
            self.options.snapshotter,
            self.lease,
            stop=self.stop,
            concurrency=self.options.unpack_concurrency,
            strict=True,
            done=unpacked,
            timeline=self.timeline,
        )
        try:
            for n, sel in enumerate(s for image in images for s in image.selected):
                layers = [
                    ChainLayer(layer.digest, diff_id, layer)
                    for layer, diff_id in zip(sel.doc.layers, sel.config.diff_ids, strict=True)
                ]
                run.add_chain(n, layers)
        except BaseException:
            run.finish(cancel=True)
            raise
        run.finish()

    # -- records -------------------------------------------------------------------

    def records(self, images: list[ImagePlan]) -> list[ImportedImage]:
        """Write every image record; on failure put back what was there, and raise."""
        labels = {MANAGED_LABEL: MANAGED_VALUE}
        if self.options.pin:
            labels[PINNED_LABEL] = PINNED_VALUE
        names = [n for image in images for n in image.names]
        if len(names) != len(set(names)):
            # A name carried twice: the later entry wins, as it would one by one.
            return [d for image in images for d in self._records(image, labels)]
        by_index = {str(i): image for i, image in enumerate(images)}
        results = self._each(lambda i: self._records(by_index[i], labels), list(by_index))
        return [d for done in results for d in done]

    def _records(self, image: ImagePlan, labels: dict[str, str]) -> list[ImportedImage]:
        target = image.target
        plats = tuple(sorted({str(s.config.platform) for s in image.selected if s.config.platform}))
        config_digest = image.selected[0].doc.config.digest
        names: list[str] = []
        for name in image.names:
            ref = refs.parse(name)
            if ref.digest and ref.digest != target.digest:
                # The CRI resolves a digest reference by its record's name:
                # writing this one would let the archive pass other content
                # off as the pinned digest.
                raise ArchiveError(f"{name} names a digest, but the image is {target.digest}")
            names.append(name)
            if not ref.digest:
                names.append(str(ref.with_digest(target.digest)))
        done = []
        for name in dict.fromkeys(names):
            check_stop(self.stop)
            put = self.store.put_image(name, target.media_type, target.digest, target.size, labels)
            action = put.action
            if put.previous is None:
                self.created.append((name, target.digest))
            elif put.previous.target.digest != target.digest:
                self.moved.append((put.previous, target.digest))
            if "@" not in name or name in image.names:
                unpacked = self.unpacker is not None
                done.append(
                    ImportedImage(name, target.digest, config_digest, plats, unpacked, action)
                )
        return done

    def rollback(self) -> None:
        """Undo the records written: remove those created, move moved tags back.

        Only a record that still points at this import's target is touched:
        one another tool moved or created since is theirs now. Labels the
        import added to a moved record (its pin) stay; the target is what
        decides which image the name runs.
        """
        for name, ours in self.created:
            with contextlib.suppress(ContainerdError):
                if self._still_ours(name, ours):
                    self.store.delete_image(name)
        for old, ours in self.moved:
            with contextlib.suppress(ContainerdError):
                if self._still_ours(old.name, ours):
                    t = old.target
                    self.store.put_image(old.name, t.media_type, t.digest, t.size, old.labels)

    def _still_ours(self, name: str, digest: str) -> bool:
        current = self.store.get_image(name)
        return current is not None and current.target.digest == digest
