"""Resolve: the archive's documents plus a blob reader, into image plans.

Pure: nothing is written. What docker archives lack (a manifest) is made
here and returned for the commit step to write. ``stop`` is looked at for
every entry, child and layer, so a huge document cannot hold up SIGTERM.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Protocol

from agent.archive import layout
from agent.archive.compression import Compression
from agent.archive.layout import Descriptor, ImageConfig, Manifest
from agent.errors import ArchiveError, PlatformMismatch
from agent.image import refs
from agent.image.labels import GC_CONTENT, UNCOMPRESSED_LABEL
from agent.image.platforms import Platform
from agent.importer.ingest import check_stop
from agent.importer.model import ImagePlan, ImportOptions, Resolution, Selected

# Indexes inside indexes, at most.
MAX_INDEX_DEPTH = 4


class BlobReader(Protocol):
    """What resolving reads: blobs by digest, archive files by path."""

    def known(self, digest: str) -> bool: ...

    def read(self, digest: str, what: str) -> bytes: ...

    def path(self, path: str, what: str) -> tuple[str, int]: ...

    def compression_of(self, digest: str) -> Compression: ...


def resolve(
    docs: dict[str, bytes], blobs: BlobReader, options: ImportOptions, stop: threading.Event
) -> Resolution:
    """The named images of the archive for the platforms asked for; ArchiveError if none."""
    return _Resolver(blobs, options, stop).run(docs)


class _Resolver:
    def __init__(self, blobs: BlobReader, options: ImportOptions, stop: threading.Event) -> None:
        self.blobs = blobs
        self.options = options
        self.stop = stop
        self.out = Resolution([])

    def run(self, docs: dict[str, bytes]) -> Resolution:
        if layout.OCI_LAYOUT_FILE in docs:
            if layout.OCI_INDEX_FILE not in docs:
                raise ArchiveError("OCI layout without index.json")
            images = self._oci(docs[layout.OCI_INDEX_FILE])
        elif layout.DOCKER_MANIFEST_FILE in docs:
            images = self._docker(docs[layout.DOCKER_MANIFEST_FILE])
        else:
            raise ArchiveError("unknown archive layout: neither an OCI layout nor a docker archive")
        self.out.unnamed = [i.target.digest for i in images if not i.names and i.selected]
        self.out.images = [self._typed(i) for i in images if i.names and i.selected]
        if not self.out.images:
            raise self._nothing(images)
        return self.out

    def _nothing(self, images: list[ImagePlan]) -> ArchiveError:
        if any(i.selected for i in images):
            return ArchiveError(
                "archive holds no named image (no io.containerd.image.name, "
                "org.opencontainers.image.ref.name or RepoTags)"
            )
        seen = sorted(
            {str(s.config.platform) for i in images for s in i.selected if s.config.platform}
        )
        wanted = ", ".join(str(p) for p in self.options.platforms or ())
        has = f" (it has {', '.join(seen)})" if seen else ""
        return PlatformMismatch(f"no image for platform {wanted} in archive{has}")

    def _typed(self, image: ImagePlan) -> ImagePlan:
        """The plan with its target's media type filled in (docker archives name none)."""
        if image.target.media_type:
            return image
        body = self.out.synthesized.get(image.target.digest) or self.blobs.read(
            image.target.digest, "target"
        )
        target = dataclasses.replace(image.target, media_type=media_type_of(body))
        return dataclasses.replace(image, target=target)

    def _wanted(self, platform: Platform | None) -> bool:
        wanted = self.options.platforms
        if wanted is None or platform is None:
            return True  # images that state no platform run anywhere
        return any(w.matches(platform) for w in wanted)

    # -- OCI layouts -------------------------------------------------------------

    def _oci(self, index: bytes) -> list[ImagePlan]:
        images = []
        for i, entry in enumerate(layout.parse_index(index)):
            check_stop(self.stop)
            name = layout.image_name(entry, self.options.base_name)
            image = ImagePlan([name] if name else [], entry, [])
            self._walk(entry, image, f"index.json manifests[{i}]", depth=0)
            images.append(image)
        return images

    def _walk(self, desc: Descriptor, image: ImagePlan, what: str, depth: int) -> bool:
        """Select the wanted platform images under ``desc``; True if any was selected."""
        check_stop(self.stop)
        if depth > MAX_INDEX_DEPTH:
            raise ArchiveError(f"{what}: indexes nested too deeply")
        if desc.platform is not None and not self._wanted(desc.platform):
            return False  # another platform's blobs may be absent (ctr export)
        if (
            self.options.platforms is None
            and desc.platform is not None
            and not self.blobs.known(desc.digest)
        ):
            self.out.absent_platforms.append(str(desc.platform))
            return False  # all platforms asked for: import those the archive carries
        data = self.blobs.read(desc.digest, what)
        if layout.sha256(data) != desc.digest:
            raise ArchiveError(f"{what}: content does not match its digest {desc.digest}")
        if layout.document_kind(desc.media_type, data, what) == "index":
            return self._walk_index(desc, data, image, what, depth)
        manifest = layout.parse_manifest(data, what)
        config = layout.parse_config(
            self.blobs.read(manifest.config.digest, f"{what} config"), f"{what} config"
        )
        if not self._wanted(config.platform):
            return False
        self._select(image, desc, manifest, config, what)
        return True

    def _walk_index(
        self, desc: Descriptor, data: bytes, image: ImagePlan, what: str, depth: int
    ) -> bool:
        children = layout.parse_index(data, what)
        # Only selected children are referenced, so containerd collects
        # the other platforms' blobs once the lease is gone.
        refs_ = {
            f"{GC_CONTENT}.m.{n}": child.digest
            for n, child in enumerate(children)
            if self._walk(child, image, f"{what} > manifests[{n}]", depth + 1)
        }
        image.labels.append((desc.digest, refs_))
        return bool(refs_)

    def _select(
        self, image: ImagePlan, desc: Descriptor, manifest: Manifest, config: ImageConfig, what: str
    ) -> None:
        if len(config.diff_ids) != len(manifest.layers):
            raise ArchiveError(
                f"{what}: {len(manifest.layers)} layers but "
                f"{len(config.diff_ids)} diff_ids in its config"
            )
        for n, layer in enumerate(manifest.layers):
            check_stop(self.stop)
            if not self.blobs.known(layer.digest):
                raise ArchiveError(
                    f"layer {n} ({layer.digest}) of {what} "
                    f"({config.platform or 'any platform'}) is missing from the archive"
                )
        labels = {f"{GC_CONTENT}.config": manifest.config.digest}
        labels.update(
            {f"{GC_CONTENT}.l.{n}": layer.digest for n, layer in enumerate(manifest.layers)}
        )
        image.labels.append((desc.digest, labels))
        for layer, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
            image.labels.append((layer.digest, {UNCOMPRESSED_LABEL: diff_id}))
        image.selected.append(Selected(desc, manifest, config))

    # -- docker archives ------------------------------------------------------------

    def _docker(self, manifest_json: bytes) -> list[ImagePlan]:
        images = []
        for i, entry in enumerate(layout.parse_docker_manifest(manifest_json)):
            check_stop(self.stop)
            what = f"manifest.json[{i}]"
            config_digest, config_size = self.blobs.path(entry.config, f"{what} Config")
            config = layout.parse_config(
                self.blobs.read(config_digest, f"{what} config"), f"{what} config {entry.config}"
            )
            names = [_name(tag, what) for tag in entry.repo_tags]
            if not self._wanted(config.platform):
                images.append(ImagePlan(names, Descriptor("", config_digest, 0), []))
                continue
            config_desc = Descriptor("", config_digest, config_size)
            images.append(self._docker_image(names, config_desc, config, entry.layers, what))
        return images

    def _docker_image(
        self,
        names: list[str],
        config_desc: Descriptor,
        config: ImageConfig,
        layer_paths: tuple[str, ...],
        what: str,
    ) -> ImagePlan:
        if len(config.diff_ids) != len(layer_paths):
            raise ArchiveError(
                f"{what}: {len(layer_paths)} layers but "
                f"{len(config.diff_ids)} diff_ids in its config"
            )
        layers = []
        for n, path in enumerate(layer_paths):
            check_stop(self.stop)
            digest, size = self.blobs.path(path, f"{what} layer {n}")
            layers.append((Descriptor("", digest, size), self.blobs.compression_of(digest)))
        media_type, body = layout.synthesize_manifest(config_desc, layers)
        target = Descriptor(media_type, layout.sha256(body), len(body))
        self.out.synthesized[target.digest] = body
        image = ImagePlan(names, target, [])
        self._select(image, target, layout.parse_manifest(body, what), config, what)
        return image


def _name(text: str, what: str) -> str:
    try:
        return refs.normalize(text)
    except refs.InvalidReference as err:
        raise ArchiveError(f"{what}: invalid RepoTag ({err})") from None


def media_type_of(data: bytes) -> str:
    doc = layout.load_json(data, "target")
    if isinstance(doc, dict) and isinstance(doc.get("mediaType"), str):
        return str(doc["mediaType"])
    return layout.OCI_INDEX if isinstance(doc, dict) and "manifests" in doc else layout.OCI_MANIFEST
