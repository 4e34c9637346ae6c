"""Commit: what makes the imported content an image: labels, snapshots, records.

In this order, for all images of the archive before the next step:

1. manifests made for docker archives are written;
2. labels are set on the content: GC references (so that containerd keeps
   it once the lease is gone), each layer's uncompressed digest, and the
   registry each image is named after (``containerd.io/distribution.source``,
   as a registry pull sets it, so that a node-local mirror can serve it);
3. layers are unpacked into the snapshotter, ``stop`` looked at between
   any two layers and while one is applied;
4. the image records are written, last. When one fails, the records this
   import created are removed and the tags it moved are moved back.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict

from agent import refs
from agent.archive import layout
from agent.containerd.images import ImageRecord
from agent.containerd.labels import (
    GC_SNAPSHOT,
    MANAGED_LABEL,
    MANAGED_VALUE,
    PINNED_LABEL,
    PINNED_VALUE,
    distribution_source,
    merge_sources,
)
from agent.eager import LayerStore, apply_layer
from agent.errors import ArchiveError, ContainerdError
from agent.importer.ingest import check_stop
from agent.importer.model import ImagePlan, ImportedImage, ImportOptions, Resolution, Selected
from agent.importer.store import ImportTarget


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
    ) -> None:
        self.store = store
        self.options = options
        self.lease = lease
        self.stop = stop
        self.unpacker = unpacker
        # (name, our target digest) of records this import created, and
        # (record as it was, our target digest) of those it moved.
        self.created: list[tuple[str, str]] = []
        self.moved: list[tuple[ImageRecord, str]] = []

    def run(self, plan: Resolution) -> list[ImportedImage]:
        for digest, body in plan.synthesized.items():
            if self.store.blob_info(digest) is None:
                self.store.write_blob([body], lease=self.lease, total=len(body), expected=digest)
        self.label(plan.images)
        if self.unpacker is not None:
            for image in plan.images:
                for sel in image.selected:
                    self.unpack(self.unpacker, sel)
        return self.records(plan.images)

    # -- labels ----------------------------------------------------------------

    def label(self, images: list[ImagePlan]) -> None:
        """GC references, uncompressed digests and distribution sources, blob by blob."""
        wanted: dict[str, dict[str, str]] = defaultdict(dict)
        sources: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        for image in images:
            for digest, labels in image.labels:
                wanted[digest].update(labels)
            named = [s for s in map(distribution_source, image.names) if s is not None]
            for digest in image.contents():
                wanted.setdefault(digest, {})
                for key, repository in named:
                    sources[digest][key].add(repository)
        for digest, labels in wanted.items():
            check_stop(self.stop)
            if sources.get(digest):
                info = self.store.blob_info(digest)
                have = info.labels if info is not None else {}
                for key, repos in sources[digest].items():
                    labels[key] = merge_sources(have.get(key, ""), *repos, key=key)
            self.store.label_blob(digest, labels)

    # -- unpacking ---------------------------------------------------------------

    def unpack(self, unpacker: LayerStore, sel: Selected) -> None:
        snapshotter = self.options.snapshotter
        chain = layout.chain_ids(sel.config.diff_ids)
        parent = ""
        for layer, diff_id, chain_id in zip(
            sel.doc.layers, sel.config.diff_ids, chain, strict=True
        ):
            check_stop(self.stop)
            if not unpacker.snapshot_exists(snapshotter, chain_id):
                apply_layer(
                    unpacker,
                    snapshotter,
                    self.lease,
                    parent,
                    layer.media_type,
                    layer.digest,
                    layer.size,
                    stop=self.stop,
                    diff_id=diff_id,
                )
            parent = chain_id
        if chain:
            self.store.label_blob(
                sel.doc.config.digest, {f"{GC_SNAPSHOT}.{snapshotter}": chain[-1]}
            )

    # -- records -------------------------------------------------------------------

    def records(self, images: list[ImagePlan]) -> list[ImportedImage]:
        """Write every image record; on failure put back what was there, and raise."""
        labels = {MANAGED_LABEL: MANAGED_VALUE}
        if self.options.pin:
            labels[PINNED_LABEL] = PINNED_VALUE
        done: list[ImportedImage] = []
        for image in images:
            done.extend(self._records(image, labels))
        return done

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
