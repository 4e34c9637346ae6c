"""Import image archives into containerd in one streaming pass.

The archive is read once, front to back. Every blob is streamed into
containerd's content store under a lease as it goes by (blobs named by digest
are checked first and skipped when present). Once the tar ends, the metadata
is resolved into images for the selected platforms, GC labels are set, layers
are unpacked into the snapshotter, and the image records are written last.
Only then is the lease released; an import that fails at any point leaves no
image record and lets containerd collect what it wrote.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from agent import platforms, refs
from agent.archive import layout
from agent.archive.compression import Compression, detect
from agent.archive.layout import Descriptor, ImageConfig, Manifest
from agent.archive.tarstream import Member, Reader, walk
from agent.containerd.client import Containerd
from agent.eager import UNCOMPRESSED_LABEL, EagerUnpacker, apply_layer, looks_like_layer
from agent.errors import ArchiveError, Cancelled, ContainerdError, PlatformMismatch
from agent.platforms import Platform

CHUNK = 1 << 20
# Small JSON blobs kept in memory so that manifests and configs need not be
# read back from containerd; past this budget they are.
CACHE_BUDGET = 16 << 20

PINNED_LABEL = "io.cri-containerd.pinned"
CRI_NAMESPACE = "k8s.io"  # the namespace the CRI, and so the kubelet, reads
# The contents list written into bundles by ``image-agent bundle``.
BUNDLE_CONTENTS = "image-agent-bundle.json"
MANAGED_LABEL = "io.cri-containerd.image"
GC_CONTENT = "containerd.io/gc.ref.content"
GC_SNAPSHOT = "containerd.io/gc.ref.snapshot"


@dataclass(frozen=True)
class ImportOptions:
    snapshotter: str = "overlayfs"
    unpack: bool = True
    # None imports every platform present.
    platforms: tuple[Platform, ...] | None = None
    pin: bool = True
    # Repository for OCI entries named only by a bare tag (ctr's --base-name).
    base_name: str = ""
    # Seconds to wait for the CRI to list what was imported (0: don't wait).
    cri_wait_s: float = 10.0


@dataclass(frozen=True)
class Progress:
    file: str
    done: int
    total: int
    elapsed_s: float


@dataclass(frozen=True)
class ImportedImage:
    name: str
    digest: str
    config: str
    platforms: tuple[str, ...]
    unpacked: bool
    action: str


@dataclass
class ImportResult:
    file: str
    images: list[ImportedImage] = field(default_factory=list)
    unnamed: list[str] = field(default_factory=list)
    absent_platforms: list[str] = field(default_factory=list)
    # Imported for this node, yet not listed by the CRI within ImportOptions.cri_wait_s.
    not_in_cri: list[str] = field(default_factory=list)
    bytes_read: int = 0
    blobs_written: int = 0
    blobs_present: int = 0
    duration_s: float = 0.0


@dataclass(frozen=True)
class _Selected:
    """One platform image of an archive entry, ready to label and unpack."""

    manifest: Descriptor
    doc: Manifest
    config: ImageConfig


@dataclass
class _Image:
    """One archive entry (a name, or no name) with what it resolved to."""

    names: list[str]
    target: Descriptor
    selected: list[_Selected]
    # (blob digest, labels) to set before the record exists.
    labels: list[tuple[str, dict[str, str]]] = field(default_factory=list)


class _CountingReader:
    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        return data


ProgressFn = Callable[[Progress], None]


class Importer:
    """Imports archives through one containerd client. Safe to reuse, not to share."""

    def __init__(
        self,
        client: Containerd,
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
        """Import one archive file. Raises ArchiveError (naming the file) or ContainerdError."""
        try:
            f = open(path, "rb")
        except OSError as err:
            raise ArchiveError(err.strerror or str(err), file=path) from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ArchiveError("file is empty", file=path)
            return self.import_stream(f, name=path, size=size)

    def import_stream(self, raw: BinaryIO, *, name: str, size: int = 0) -> ImportResult:
        started = time.monotonic()
        lease = self.client.create_lease(labels=self.lease_labels)
        session = _Session(self, lease, name, size, started)
        try:
            result = session.run(raw)
        except ArchiveError as err:
            session.rollback()
            raise err.for_file(name) from None
        except BaseException:
            session.rollback()
            raise
        finally:
            # If containerd is gone, the lease expires by itself.
            with contextlib.suppress(ContainerdError):
                self.client.delete_lease(lease)
        result.not_in_cri = self._wait_for_cri(result)
        result.duration_s = time.monotonic() - started
        return result

    def _wait_for_cri(self, result: ImportResult) -> list[str]:
        """Return once the kubelet can see the node's images (the CRI caches image records)."""
        if self.options.cri_wait_s <= 0 or self.client.namespace != CRI_NAMESPACE:
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
        return self.client.cri_wait(expect, self.options.cri_wait_s) if expect else []


class _Session:
    """The state of one import: what was streamed, and what it resolves to."""

    def __init__(
        self, importer: Importer, lease: str, name: str, size: int, started: float
    ) -> None:
        self.client = importer.client
        self.options = importer.options
        self.progress_fn = importer.progress
        self.stop = importer.stop
        self.lease = lease
        self.result = ImportResult(file=name)
        self.size = size
        self.started = started
        self.reader: _CountingReader | None = None
        self.docs: dict[str, bytes] = {}
        self.present: set[str] = set()
        self.by_path: dict[str, tuple[str, int]] = {}
        self.links: dict[str, str] = {}
        self.compression: dict[str, Compression] = {}
        self.cache: dict[str, bytes] = {}
        self.cached_bytes = 0
        self.created: list[str] = []
        self.last_progress = 0.0
        self.eager: EagerUnpacker | None = None
        self._first_bytes = b""  # head of the blob being written, to sniff its compression

    # -- pass 1: stream the tar -------------------------------------------------

    def run(self, raw: BinaryIO) -> ImportResult:
        self.reader = _CountingReader(raw)
        if self.options.unpack:
            self.eager = EagerUnpacker(self.client, self.options.snapshotter, self.lease, self.stop)
        try:
            for member, data in walk(self.reader):  # type: ignore[arg-type]
                self._check_stop()
                if member.kind == "link":
                    self.links[member.name] = member.link
                elif data is not None:
                    self._ingest(member, data)
        except BaseException:
            if self.eager:
                self.eager.finish(cancel=True)
            raise
        if self.eager:
            self.eager.finish()
        self._report(force=True)
        self.result.bytes_read = self.reader.count
        images = self._resolve()
        for image in images:
            self._finish(image)
        return self.result

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise Cancelled("import cancelled")

    def _report(self, force: bool = False) -> None:
        if self.progress_fn is None or self.reader is None:
            return
        now = time.monotonic()
        if force or now - self.last_progress >= 0.5:
            self.last_progress = now
            self.progress_fn(
                Progress(self.result.file, self.reader.count, self.size, now - self.started)
            )

    def _ingest(self, member: Member, data: Reader) -> None:
        name = member.name
        if name in (layout.OCI_LAYOUT_FILE, layout.OCI_INDEX_FILE, layout.DOCKER_MANIFEST_FILE):
            self.docs[name] = _read_limited(data, layout.MAX_JSON, name)
            return
        if name in ("repositories", BUNDLE_CONTENTS) or name.endswith(("/json", "/VERSION")):
            return  # docker's legacy metadata and our bundles' contents list: not content
        digest = layout.digest_of_blob_path(name) or layout.digest_of_docker_path(name)
        if digest is None and member.size <= layout.MAX_JSON:
            body = _read_limited(data, layout.MAX_JSON, name)
            digest = layout.sha256(body)
            self._store_small(name, digest, body)
            return
        if digest is not None and self._known(digest):
            # Present already: only sniff the first bytes, skip the rest.
            self.by_path[name] = (digest, member.size)
            self._sniffed(digest, member.size, data.read(512))
            return
        if member.size <= layout.MAX_JSON:
            body = _read_limited(data, layout.MAX_JSON, name)
            self._store_small(name, digest or layout.sha256(body), body, expected=digest)
            return
        written = self._write(data, member, expected=digest or "")
        self.by_path[name] = (written, member.size)

    def _known(self, digest: str) -> bool:
        if digest in self.present:
            return True
        info = self.client.blob_info(digest)
        if info is not None:
            self.present.add(digest)
            self.result.blobs_present += 1
            return True
        return False

    def _store_small(
        self, name: str, digest: str, body: bytes, expected: str | None = None
    ) -> None:
        if expected is not None and layout.sha256(body) != expected:
            raise ArchiveError(f"{name}: content does not match its digest {expected}")
        self.by_path[name] = (digest, len(body))
        fits = self.cached_bytes + len(body) <= CACHE_BUDGET
        if body.startswith(b"{") and fits and digest not in self.cache:
            self.cache[digest] = body
            self.cached_bytes += len(body)
        if not self._known(digest):
            self.client.write_blob([body], lease=self.lease, total=len(body), expected=digest)
            self.present.add(digest)
            self.result.blobs_written += 1
        self._sniffed(digest, len(body), body[:512])
        if self.eager and body.startswith(b"{") and b'"rootfs"' in body:
            self.eager.image_boundary()

    def _sniffed(self, digest: str, size: int, head: bytes) -> None:
        """Record a blob's compression; hand layers to the eager unpacker."""
        compression = detect(head)
        self.compression.setdefault(digest, compression)
        if self.eager and looks_like_layer(head, compression):
            self.eager.layer(compression, digest, size)

    def _write(self, data: Reader, member: Member, *, expected: str) -> str:
        first = True

        def chunks() -> Iterator[bytes]:
            nonlocal first
            remaining = member.size
            while remaining > 0:
                self._check_stop()
                chunk = data.read(min(CHUNK, remaining))
                if not chunk:
                    raise ArchiveError(f"{member.name}: archive is truncated")
                if first:
                    first = False
                    self._first_bytes = chunk[:512]
                remaining -= len(chunk)
                yield chunk
                self._report()

        self._first_bytes = b""
        try:
            digest = self.client.write_blob(
                chunks(), lease=self.lease, total=member.size, expected=expected
            )
        except ContainerdError as err:
            if err.code in ("FAILED_PRECONDITION", "INVALID_ARGUMENT"):
                raise ArchiveError(
                    f"{member.name}: content does not match its digest or size ({err})"
                ) from None
            raise
        self.present.add(digest)
        self.result.blobs_written += 1
        self._sniffed(digest, member.size, self._first_bytes)
        return digest

    # -- pass 2: resolve metadata into images ----------------------------------

    def _blob(self, digest: str, what: str) -> bytes:
        cached = self.cache.get(digest)
        if cached is not None:
            return cached
        if not self._known(digest):
            raise ArchiveError(f"{what} ({digest}) is missing from the archive")
        return self.client.read_blob(digest, layout.MAX_JSON)

    def _wanted(self, platform: Platform | None) -> bool:
        wanted = self.options.platforms
        if wanted is None:
            return True
        if platform is None:
            return True  # images that state no platform run anywhere
        return any(w.matches(platform) for w in wanted)

    def _resolve(self) -> list[_Image]:
        if layout.OCI_LAYOUT_FILE in self.docs:
            if layout.OCI_INDEX_FILE not in self.docs:
                raise ArchiveError("OCI layout without index.json")
            images = self._resolve_oci()
        elif layout.DOCKER_MANIFEST_FILE in self.docs:
            images = self._resolve_docker()
        else:
            raise ArchiveError("unknown archive layout: neither an OCI layout nor a docker archive")
        named = [i for i in images if i.names and i.selected]
        for image in images:
            if not image.names and image.selected:
                self.result.unnamed.append(image.target.digest)
        if not named:
            seen = sorted(
                {str(s.config.platform) for i in images for s in i.selected if s.config.platform}
            )
            if any(i.selected for i in images):
                raise ArchiveError(
                    "archive holds no named image (no io.containerd.image.name, "
                    "org.opencontainers.image.ref.name or RepoTags)"
                )
            wanted = ", ".join(str(p) for p in self.options.platforms or ())
            has = f" (it has {', '.join(seen)})" if seen else ""
            raise PlatformMismatch(f"no image for platform {wanted} in archive{has}")
        return named

    def _resolve_oci(self) -> list[_Image]:
        images = []
        for i, entry in enumerate(layout.parse_index(self.docs[layout.OCI_INDEX_FILE])):
            name = layout.image_name(entry, self.options.base_name)
            image = _Image([name] if name else [], entry, [])
            self._walk(entry, image, f"index.json manifests[{i}]", depth=0)
            images.append(image)
        return images

    def _walk(self, desc: Descriptor, image: _Image, what: str, depth: int) -> bool:
        """Select the wanted platform images under ``desc``; True if any was selected."""
        if depth > 4:
            raise ArchiveError(f"{what}: indexes nested too deeply")
        if desc.platform is not None and not self._wanted(desc.platform):
            return False  # another platform's blobs may be absent (ctr export)
        if (
            self.options.platforms is None
            and desc.platform is not None
            and not self._known(desc.digest)
        ):
            self.result.absent_platforms.append(str(desc.platform))
            return False  # all platforms asked for: import those the archive carries
        data = self._blob(desc.digest, what)
        if layout.sha256(data) != desc.digest:
            raise ArchiveError(f"{what}: content does not match its digest {desc.digest}")
        if layout.document_kind(desc.media_type, data, what) == "index":
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
        manifest = layout.parse_manifest(data, what)
        config = layout.parse_config(
            self._blob(manifest.config.digest, f"{what} config"), f"{what} config"
        )
        if not self._wanted(config.platform):
            return False
        if len(config.diff_ids) != len(manifest.layers):
            raise ArchiveError(
                f"{what}: {len(manifest.layers)} layers but "
                f"{len(config.diff_ids)} diff_ids in its config"
            )
        self._select(image, desc, manifest, config, what)
        return True

    def _select(
        self, image: _Image, desc: Descriptor, manifest: Manifest, config: ImageConfig, what: str
    ) -> None:
        for n, layer in enumerate(manifest.layers):
            if not self._known(layer.digest):
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
        image.selected.append(_Selected(desc, manifest, config))

    def _resolve_docker(self) -> list[_Image]:
        images = []
        for i, entry in enumerate(
            layout.parse_docker_manifest(self.docs[layout.DOCKER_MANIFEST_FILE])
        ):
            what = f"manifest.json[{i}]"
            config_digest, config_size = self._path(entry.config, f"{what} Config")
            config_bytes = self._blob(config_digest, f"{what} config")
            config = layout.parse_config(config_bytes, f"{what} config {entry.config}")
            names = [self._name(tag, what) for tag in entry.repo_tags]
            if not self._wanted(config.platform):
                images.append(_Image(names, Descriptor("", config_digest, 0), []))
                continue
            if len(config.diff_ids) != len(entry.layers):
                raise ArchiveError(
                    f"{what}: {len(entry.layers)} layers but "
                    f"{len(config.diff_ids)} diff_ids in its config"
                )
            layers = []
            for n, path in enumerate(entry.layers):
                digest, size = self._path(path, f"{what} layer {n}")
                layers.append(
                    (Descriptor("", digest, size), self.compression.get(digest, Compression.NONE))
                )
            media_type, body = layout.synthesize_manifest(
                Descriptor("", config_digest, config_size), layers
            )
            target = Descriptor(media_type, layout.sha256(body), len(body))
            manifest = layout.parse_manifest(body, what)
            if target.digest not in self.present and not self._known(target.digest):
                self.client.write_blob(
                    [body], lease=self.lease, total=len(body), expected=target.digest
                )
                self.present.add(target.digest)
            self.cache.setdefault(target.digest, body)
            image = _Image(names, target, [])
            self._select(image, target, manifest, config, what)
            images.append(image)
        return images

    def _path(self, path: str, what: str) -> tuple[str, int]:
        seen = 0
        while path in self.links and seen < 16:
            path, seen = self.links[path], seen + 1
        found = self.by_path.get(path)
        if found is None:
            raise ArchiveError(f"{what} {path!r} is missing from the archive")
        return found

    @staticmethod
    def _name(text: str, what: str) -> str:
        try:
            return refs.normalize(text)
        except refs.InvalidReference as err:
            raise ArchiveError(f"{what}: invalid RepoTag ({err})") from None

    # -- pass 3: labels, unpack, records ----------------------------------------

    def _finish(self, image: _Image) -> None:
        for digest, labels in image.labels:
            self.client.label_blob(digest, labels)
        unpacked = False
        if self.options.unpack:
            for sel in image.selected:
                self._check_stop()
                self._unpack(sel)
            unpacked = True
        target = image.target
        media_type = target.media_type or _media_type_of(self._blob(target.digest, "target"))
        labels = (
            {PINNED_LABEL: "pinned", MANAGED_LABEL: "managed"}
            if self.options.pin
            else {MANAGED_LABEL: "managed"}
        )
        plats = tuple(sorted({str(s.config.platform) for s in image.selected if s.config.platform}))
        config_digest = image.selected[0].doc.config.digest
        names: list[str] = []
        for name in image.names:
            names.append(name)
            ref = refs.parse(name)
            if not ref.digest:
                names.append(str(ref.with_digest(target.digest)))
        for record_name in dict.fromkeys(names):
            action = self.client.put_image(
                record_name, media_type, target.digest, target.size, labels
            )
            if action == "created":
                self.created.append(record_name)
            if "@" not in record_name or record_name in image.names:
                self.result.images.append(
                    ImportedImage(
                        record_name, target.digest, config_digest, plats, unpacked, action
                    )
                )

    def _unpack(self, sel: _Selected) -> None:
        snapshotter = self.options.snapshotter
        chain = layout.chain_ids(sel.config.diff_ids)
        parent = ""
        for layer, diff_id, chain_id in zip(
            sel.doc.layers, sel.config.diff_ids, chain, strict=True
        ):
            if not self.client.snapshot_exists(snapshotter, chain_id):
                apply_layer(
                    self.client,
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
            self.client.label_blob(
                sel.doc.config.digest, {f"{GC_SNAPSHOT}.{snapshotter}": chain[-1]}
            )

    def rollback(self) -> None:
        """Remove image records this import created before it failed."""
        for name in self.created:
            with contextlib.suppress(ContainerdError):
                self.client.delete_image(name)


def _media_type_of(data: bytes) -> str:
    doc = layout.load_json(data, "target")
    if isinstance(doc, dict) and isinstance(doc.get("mediaType"), str):
        return str(doc["mediaType"])
    return layout.OCI_INDEX if isinstance(doc, dict) and "manifests" in doc else layout.OCI_MANIFEST


def _read_limited(data: Reader, limit: int, name: str) -> bytes:
    body = data.read(limit + 1)
    if len(body) > limit:
        raise ArchiveError(f"{name} is larger than {limit >> 20} MiB")
    return body
