"""Image metadata documents: media types, descriptors, indexes, manifests, configs.

Pure functions over bytes. Every parser validates what it returns and raises
:class:`ArchiveError` with a reason naming the document, so a malformed
archive is reported instead of half-imported.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from agent import boundedjson
from agent.archive import limits
from agent.archive.compression import Compression
from agent.archive.tarstream import safe_name
from agent.errors import ArchiveError
from agent.image import platforms, refs
from agent.image.platforms import Platform

# No metadata document is allowed to be larger than this.
MAX_JSON = 4 << 20
_BLOB_PATH_PARTS = 3  # blobs/<algorithm>/<hex>

OCI_LAYOUT_FILE = "oci-layout"
OCI_INDEX_FILE = "index.json"
DOCKER_MANIFEST_FILE = "manifest.json"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = OCI_LAYER + "+gzip"
OCI_LAYER_ZSTD = OCI_LAYER + "+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = DOCKER_LAYER + ".gzip"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})

ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, compare=False)
    platform: Platform | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The descriptor as it appears in a manifest (Go field order)."""
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageConfig:
    platform: Platform | None
    diff_ids: tuple[str, ...]


@dataclass(frozen=True)
class DockerEntry:
    """One image of a docker-archive ``manifest.json``."""

    config: str
    repo_tags: tuple[str, ...]
    layers: tuple[str, ...]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def load_json(data: bytes, what: str) -> Any:
    """Parse a metadata document within the size and nesting limits."""
    if len(data) > MAX_JSON:
        raise ArchiveError(f"{what} is larger than {MAX_JSON >> 20} MiB")
    try:
        return boundedjson.loads(
            data, what=what, max_bytes=MAX_JSON, max_depth=limits.current().max_json_depth
        )
    except boundedjson.JSONLimitError as err:
        raise ArchiveError(str(err)) from None
    except UnicodeDecodeError:
        raise ArchiveError(f"{what} is not valid JSON (not UTF-8)") from None


def _check_count(n: int, limit: int, what: str, things: str, setting: str) -> None:
    if n > limit:
        raise ArchiveError(f"{what} has {n} {things}, more than the limit of {limit} ({setting})")


def dump_json(obj: Any) -> bytes:
    """Compact JSON, the form containerd itself writes documents in."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def digest_of_blob_path(name: str) -> str | None:
    """``sha256:<hex>`` if ``name`` is an OCI layout blob path (``blobs/sha256/<hex>``).

    None for names outside ``blobs/``. A file inside it that is not named by
    a valid digest of a supported algorithm raises ArchiveError: its content
    could never be checked, and a consumer unpacking the layout would take it
    for a blob.
    """
    parts = name.split("/")
    if parts[0] != "blobs" or len(parts) == 1:
        return None
    if len(parts) != _BLOB_PATH_PARTS:
        raise ArchiveError(f"{name}: not a blob path (blobs/<algorithm>/<hex>)")
    if parts[1] != "sha256":
        raise ArchiveError(f"{name}: unsupported digest algorithm {parts[1]!r} (sha256 only)")
    digest = f"sha256:{parts[2]}"
    if not refs.is_digest(digest):
        raise ArchiveError(f"{name}: blob name is not a sha256 digest (64 lower-case hex)")
    return digest


def digest_of_docker_path(name: str) -> str | None:
    """``sha256:<hex>`` for digest-named docker-archive files (``<hex>.tar``, ``<hex>.json``).

    Archives written by podman and skopeo name layers and configs by digest;
    legacy ``docker save`` (``<id>/layer.tar``) does not.
    """
    base, dot, ext = name.rpartition(".")
    if dot and "/" not in base and ext in ("tar", "json"):
        digest = f"sha256:{base}"
        if refs.is_digest(digest):
            return digest
    return None


def _descriptor(obj: Any, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise ArchiveError(f"{what}: descriptor is not an object")
    digest = obj.get("digest")
    size = obj.get("size")
    media_type = obj.get("mediaType", "")
    if not isinstance(digest, str) or not refs.is_digest(digest):
        raise ArchiveError(f"{what}: unsupported or invalid digest {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ArchiveError(f"{what}: invalid size {size!r}")
    if not isinstance(media_type, str):
        raise ArchiveError(f"{what}: invalid mediaType")
    annotations = obj.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise ArchiveError(f"{what}: invalid annotations")
    return Descriptor(
        media_type, digest, size, annotations, platforms.from_json(obj.get("platform"))
    )


def parse_index(data: bytes, what: str = OCI_INDEX_FILE) -> tuple[Descriptor, ...]:
    doc = load_json(data, what)
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
        raise ArchiveError(f"{what} has no manifests list")
    bound = limits.current().max_manifests
    _check_count(len(doc["manifests"]), bound, what, "manifests", "max_manifests")
    limits.count_index_entries(len(doc["manifests"]), what)
    return tuple(_descriptor(m, f"{what} manifests[{i}]") for i, m in enumerate(doc["manifests"]))


def document_kind(media_type: str, data: bytes, what: str) -> str:
    """``index`` or ``manifest``, from the descriptor's media type or the document."""
    if media_type in INDEX_TYPES:
        return "index"
    if media_type in MANIFEST_TYPES:
        return "manifest"
    doc = load_json(data, what)
    if isinstance(doc, dict):
        inner = doc.get("mediaType")
        if inner is not None and not isinstance(inner, str):
            raise ArchiveError(f"{what}: mediaType is not a string")
        if inner in INDEX_TYPES or (inner is None and "manifests" in doc):
            return "index"
        if inner in MANIFEST_TYPES or (inner is None and "layers" in doc and "config" in doc):
            return "manifest"
    raise ArchiveError(f"{what}: unsupported media type {media_type or '(none)'}")


def parse_manifest(data: bytes, what: str) -> Manifest:
    doc = load_json(data, what)
    if not isinstance(doc, dict) or not isinstance(doc.get("layers"), list):
        raise ArchiveError(f"{what} is not an image manifest")
    bound = limits.current().max_layers
    _check_count(len(doc["layers"]), bound, what, "layers", "max_layers")
    limits.count_layer_entries(len(doc["layers"]), what)
    config = _descriptor(doc.get("config"), f"{what} config")
    layers = tuple(_descriptor(item, f"{what} layers[{i}]") for i, item in enumerate(doc["layers"]))
    media_type = doc.get("mediaType") or OCI_MANIFEST
    if not isinstance(media_type, str):
        raise ArchiveError(f"{what}: mediaType is not a string")
    return Manifest(media_type, config, layers)


def parse_config(data: bytes, what: str) -> ImageConfig:
    doc = load_json(data, what)
    if not isinstance(doc, dict):
        raise ArchiveError(f"{what} is not an image config")
    rootfs = doc.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and refs.is_digest(d) for d in diff_ids
    ):
        raise ArchiveError(f"{what} has no valid rootfs.diff_ids")
    bound = limits.current().max_layers
    _check_count(len(diff_ids), bound, what, "layers", "max_layers")
    return ImageConfig(platforms.from_json(doc), tuple(diff_ids))


def parse_docker_manifest(data: bytes) -> tuple[DockerEntry, ...]:
    what = DOCKER_MANIFEST_FILE
    doc = load_json(data, what)
    if not isinstance(doc, list) or not doc:
        raise ArchiveError(f"{what} is not a non-empty list of images")
    _check_count(len(doc), limits.current().max_manifests, what, "images", "max_manifests")
    entries = []
    for i, item in enumerate(doc):
        where = f"{what}[{i}]"
        if not isinstance(item, dict):
            raise ArchiveError(f"{where} is not an object")
        config, tags, layers = item.get("Config"), item.get("RepoTags") or [], item.get("Layers")
        if not isinstance(config, str) or not config:
            raise ArchiveError(f"{where} has no Config")
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise ArchiveError(f"{where} has no Layers list")
        # Only the per-image bound here: the total is counted once, when the
        # importer reads the manifest it makes for each image.
        _check_count(len(layers), limits.current().max_layers, where, "layers", "max_layers")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ArchiveError(f"{where} has invalid RepoTags")
        entries.append(
            DockerEntry(
                safe_name(config, what=f"{where} Config"),
                tuple(tags),
                tuple(safe_name(x, what=f"{where} layer") for x in layers),
            )
        )
    return tuple(entries)


def layer_media_type(compression: Compression, *, docker: bool) -> str:
    if compression is Compression.GZIP:
        return DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP
    if compression is Compression.ZSTD:
        return OCI_LAYER_ZSTD
    if compression is Compression.NONE:
        return DOCKER_LAYER if docker else OCI_LAYER
    raise ArchiveError(f"layers compressed with {compression.value} are not supported")


def synthesize_manifest(
    config: Descriptor, layers: list[tuple[Descriptor, Compression]]
) -> tuple[str, bytes]:
    """The media type and manifest document for a docker-archive image.

    Docker schema 2 (as ``ctr images import`` writes it, so the digests agree)
    unless a layer is zstd-compressed, which only the OCI media types express.
    """
    docker = all(c in (Compression.NONE, Compression.GZIP) for _, c in layers)
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    config_type = DOCKER_CONFIG if docker else OCI_CONFIG
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": Descriptor(config_type, config.digest, config.size).to_json(),
        "layers": [
            Descriptor(layer_media_type(c, docker=docker), d.digest, d.size).to_json()
            for d, c in layers
        ],
    }
    return media_type, dump_json(doc)


def chain_id(parent: str, diff_id: str) -> str:
    """ChainID(0) = DiffID(0); ChainID(n) = sha256(ChainID(n-1) + " " + DiffID(n))."""
    return diff_id if not parent else sha256(f"{parent} {diff_id}".encode())


def chain_ids(diff_ids: tuple[str, ...]) -> list[str]:
    """The ChainIDs of a layer stack, bottom first: the snapshot names containerd uses."""
    chain: list[str] = []
    for diff_id in diff_ids:
        chain.append(chain_id(chain[-1] if chain else "", diff_id))
    return chain


def image_name(desc: Descriptor, base_name: str = "") -> str | None:
    """The image name carried by an index entry, normalized, or None.

    ``io.containerd.image.name`` wins; ``org.opencontainers.image.ref.name``
    counts when it is a full reference. A bare tag there (``latest``, as
    umoci writes) names an image only with ``base_name`` (``base_name:tag``).
    """
    name = desc.annotations.get(ANNOTATION_IMAGE_NAME)
    if not name:
        ref_name = desc.annotations.get(ANNOTATION_REF_NAME, "")
        if "/" in ref_name or ":" in ref_name:
            name = ref_name
        elif ref_name and base_name:
            name = f"{base_name}:{ref_name}"
    if not name:
        return None
    try:
        return refs.normalize(name)
    except refs.InvalidReference as err:
        raise ArchiveError(f"invalid image name in index.json: {err}") from None
