"""Deterministic image archives made by image-agent itself.

Used by ``image-agent demo``, the tests and the benchmarks. Archives are
byte-for-byte reproducible: fixed mtimes and owners, sorted entries.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

import zstandard

from agent.archive import layout
from agent.image.platforms import Platform


@dataclass(frozen=True)
class Layer:
    files: dict[str, bytes]
    compression: str = "none"  # none, gzip, zstd

    def tar(self) -> bytes:
        return tar_bytes(self.files)

    def blob(self) -> bytes:
        return compress(self.tar(), self.compression)

    @property
    def media_type(self) -> str:
        return {
            "none": layout.OCI_LAYER,
            "gzip": layout.OCI_LAYER_GZIP,
            "zstd": layout.OCI_LAYER_ZSTD,
        }[self.compression]


@dataclass(frozen=True)
class Variant:
    platform: Platform
    layers: tuple[Layer, ...]


@dataclass(frozen=True)
class SampleImage:
    name: str
    variants: tuple[Variant, ...]
    annotations: dict[str, str] = field(default_factory=dict)


def simple_image(
    name: str, files: dict[str, bytes], platform: Platform, compression: str = "none"
) -> SampleImage:
    return SampleImage(name, (Variant(platform, (Layer(files, compression),)),))


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for path in sorted(files):
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                    tar.addfile(info)
            data = files[path]
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    return data


def config_bytes(platform: Platform, diff_ids: list[str]) -> bytes:
    doc: dict[str, object] = {
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {"Cmd": ["/hello"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    if platform.variant:
        doc["variant"] = platform.variant
    return json.dumps(doc, sort_keys=True).encode()


@dataclass
class _Blobs:
    """Blobs of an archive in the order they are first added."""

    items: dict[str, bytes] = field(default_factory=dict)

    def add(self, data: bytes) -> layout.Descriptor:
        digest = layout.sha256(data)
        self.items.setdefault(digest, data)
        return layout.Descriptor("", digest, len(data))


def _oci_manifest(blobs: _Blobs, variant: Variant) -> tuple[bytes, bytes]:
    diff_ids = [layout.sha256(layer.tar()) for layer in variant.layers]
    layers = []
    for layer in variant.layers:
        d = blobs.add(layer.blob())
        layers.append({"mediaType": layer.media_type, "digest": d.digest, "size": d.size})
    config = config_bytes(variant.platform, diff_ids)
    c = blobs.add(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": layout.OCI_MANIFEST,
        "config": {"mediaType": layout.OCI_CONFIG, "digest": c.digest, "size": c.size},
        "layers": layers,
    }
    return layout.dump_json(manifest), config


def oci_archive(
    images: Iterable[SampleImage], *, metadata_first: bool = False, name_annotation: str = ""
) -> bytes:
    """An OCI image layout as a tar. Multi-variant images get an index.

    ``name_annotation`` picks the annotation carrying the name (default: both
    ``io.containerd.image.name`` and ``org.opencontainers.image.ref.name``).
    """
    blobs = _Blobs()
    entries = []
    for image in images:
        descs = []
        for variant in image.variants:
            manifest, _ = _oci_manifest(blobs, variant)
            d = blobs.add(manifest)
            p = variant.platform
            plat = {"architecture": p.architecture, "os": p.os}
            if p.variant:
                plat["variant"] = p.variant
            descs.append(
                {
                    "mediaType": layout.OCI_MANIFEST,
                    "digest": d.digest,
                    "size": d.size,
                    "platform": plat,
                }
            )
        if len(descs) == 1:
            top = dict(descs[0])
            top.pop("platform")
        else:
            index = layout.dump_json(
                {"schemaVersion": 2, "mediaType": layout.OCI_INDEX, "manifests": descs}
            )
            d = blobs.add(index)
            top = {"mediaType": layout.OCI_INDEX, "digest": d.digest, "size": d.size}
        annotations = dict(image.annotations)
        if image.name:
            if name_annotation in ("", layout.ANNOTATION_IMAGE_NAME):
                annotations[layout.ANNOTATION_IMAGE_NAME] = image.name
            if name_annotation in ("", layout.ANNOTATION_REF_NAME):
                annotations[layout.ANNOTATION_REF_NAME] = image.name
        if annotations:
            top["annotations"] = annotations
        entries.append(top)
    index_json = layout.dump_json({"schemaVersion": 2, "manifests": entries})
    files: list[tuple[str, bytes]] = [
        (f"blobs/sha256/{d.removeprefix('sha256:')}", data) for d, data in blobs.items.items()
    ]
    meta = [("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), ("index.json", index_json)]
    return archive_bytes(meta + files if metadata_first else files + meta)


def docker_archive(images: Iterable[SampleImage], *, legacy_names: bool = False) -> bytes:
    """A docker-archive tar (``docker save``/``podman save`` shape), manifest.json last.

    With ``legacy_names`` layers are stored as ``<id>/layer.tar`` as older
    ``docker save`` does, else as ``<digest-hex>.tar`` as podman does.
    """
    files: dict[str, bytes] = {}
    manifest = []
    for n, image in enumerate(images):
        (variant,) = image.variants
        layer_paths = []
        diff_ids = []
        for i, layer in enumerate(variant.layers):
            data = layer.blob()
            digest = layout.sha256(data)
            diff_ids.append(layout.sha256(layer.tar()))
            hexd = digest.removeprefix("sha256:")
            path = (
                f"{layout.sha256(f'{n}/{i}'.encode())[7:]}/layer.tar"
                if legacy_names
                else f"{hexd}.tar"
            )
            files[path] = data
            layer_paths.append(path)
        config = config_bytes(variant.platform, diff_ids)
        config_path = f"{layout.sha256(config)[7:]}.json"
        files[config_path] = config
        manifest.append(
            {
                "Config": config_path,
                "RepoTags": [image.name] if image.name else [],
                "Layers": layer_paths,
            }
        )
    entries = sorted(files.items())
    entries.append(("manifest.json", json.dumps(manifest).encode()))
    return archive_bytes(entries)


def archive_bytes(entries: Iterable[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write(out: BinaryIO, data: bytes, compression: str = "none") -> None:
    """Write an archive, compressed as a whole with ``compression``."""
    out.write(compress(data, compression))


def demo_images(platform: Platform) -> list[SampleImage]:
    """Two small images sharing a base layer, as in a real site bundle."""
    base = Layer({"etc/os-release": b"ID=image-agent-sample\n", "bin/.keep": b""}, "gzip")
    app = Layer({"app/hello.txt": b"hello from image-agent\n"}, "zstd")
    tools = Layer({"opt/tools/README": b"sample tools layer\n" * 64}, "gzip")
    return [
        SampleImage("image-agent/sample-app:1.0", (Variant(platform, (base, app)),)),
        SampleImage("registry.local:5000/sample/tools:2024.1", (Variant(platform, (base, tools)),)),
    ]
