"""Deterministic large image archives for the benchmarks.

``docker save`` shape (layers as ``<digest>.tar``, config, ``manifest.json``
last), compressed as a whole with zstd, the way air-gap bundles are usually
carried. Layers mix many small compressible files with large incompressible
ones. Layer tars are staged in a work directory (the generator may use disk;
the importer under test may not).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from agent.image import platforms
from agent.testing import samples

MiB = 1 << 20


@dataclass(frozen=True)
class LayerSpec:
    small_files: int  # count of ~4-12 KiB text-like files
    big_files: int  # count of incompressible files
    big_size: int  # bytes each


# About 1.1 GB of layers in all.
DEFAULT_LAYERS = (
    LayerSpec(small_files=12000, big_files=2, big_size=16 * MiB),
    LayerSpec(small_files=0, big_files=3, big_size=100 * MiB),
    LayerSpec(small_files=8000, big_files=4, big_size=40 * MiB),
    LayerSpec(small_files=0, big_files=1, big_size=300 * MiB),
    LayerSpec(small_files=20000, big_files=5, big_size=20 * MiB),
)

_WORDS = [b"lorem", b"ipsum", b"dolor", b"sit", b"amet", b"elit", b"sed", b"do", b"tempor"]


def _text(rng: random.Random, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        out += rng.choice(_WORDS) + (b"\n" if rng.random() < 0.1 else b" ")
    return bytes(out[:size])


def write_layer(path: Path, spec: LayerSpec, seed: int) -> tuple[str, int]:
    """Write one layer tar; return its digest and size."""
    rng = random.Random(seed)  # noqa: S311 - repeatable sample data, not a secret
    with path.open("wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(spec.small_files):
            data = _text(rng, rng.randint(4096, 12288))
            info = tarfile.TarInfo(f"usr/share/l{seed}/d{i % 97}/f{i}.txt")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
        for i in range(spec.big_files):
            info = tarfile.TarInfo(f"opt/l{seed}/blob{i}.bin")
            info.size, info.mtime, info.mode = spec.big_size, 0, 0o644
            tar.addfile(info, _RandomReader(rng, spec.big_size))
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while chunk := src.read(4 * MiB):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest(), path.stat().st_size


class _RandomReader(io.RawIOBase):
    def __init__(self, rng: random.Random, size: int) -> None:
        self.rng, self.left = rng, size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return self.rng.randbytes(n)


def make_archive(
    out: Path, work: Path, layers: tuple[LayerSpec, ...] = DEFAULT_LAYERS, name: str = "bench:big"
) -> Path:
    """Write ``out`` (.tar.zst) unless it exists; returns it."""
    if out.exists():
        return out
    work.mkdir(parents=True, exist_ok=True)
    node = platforms.node()
    entries: list[tuple[str, Path]] = []
    diff_ids = []
    for n, spec in enumerate(layers):
        tmp = work / f"layer{n}.tar"
        digest, _ = write_layer(tmp, spec, seed=n)
        diff_ids.append(digest)
        entries.append((f"{digest[7:]}.tar", tmp))
    config = samples.config_bytes(node, diff_ids)
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [name], "Layers": [e[0] for e in entries]}]
    ).encode()
    _write_zstd_tar(out, dict(entries), [(config_name, config), ("manifest.json", manifest)])
    for _, path in entries:
        path.unlink()
    return out


# The site bundle: many images sharing one base, as `docker save a b c …`
# carries them. About 560 MB uncompressed for 30 images.
BUNDLE_BASE = LayerSpec(small_files=3000, big_files=0, big_size=0)
BUNDLE_APP = (
    LayerSpec(small_files=600, big_files=0, big_size=0),
    LayerSpec(small_files=0, big_files=1, big_size=16 * MiB),
)


# Per image a tenth of that: many images, little data (memory, not throughput).
BUNDLE_APP_SMALL = (
    LayerSpec(small_files=60, big_files=0, big_size=0),
    LayerSpec(small_files=0, big_files=1, big_size=1 * MiB),
)


def make_bundle(
    out: Path,
    work: Path,
    images: int = 30,
    app: tuple[LayerSpec, ...] = BUNDLE_APP,
) -> Path:
    """Write a docker-shaped ``.tar.zst`` of ``images`` images on one shared base; returns it.

    Deterministic: the same ``images`` gives the same bytes. Layers are
    written in image order and ``manifest.json`` comes last, as docker does.
    """
    if out.exists():
        return out
    work.mkdir(parents=True, exist_ok=True)
    node = platforms.node()
    layers: dict[str, Path] = {}  # arcname -> staged tar, in archive order
    base_digest, _ = write_layer(work / "base.tar", BUNDLE_BASE, seed=1000)
    layers[f"{base_digest[7:]}.tar"] = work / "base.tar"
    configs: list[tuple[str, bytes]] = []
    manifest = []
    for i in range(images):
        diff_ids = [base_digest]
        for j, spec in enumerate(app):
            path = work / f"app{i}-{j}.tar"
            digest, _ = write_layer(path, spec, seed=2000 + i * 10 + j)
            diff_ids.append(digest)
            layers[f"{digest[7:]}.tar"] = path
        config = samples.config_bytes(node, diff_ids)
        config_name = f"{hashlib.sha256(config).hexdigest()}.json"
        configs.append((config_name, config))
        manifest.append(
            {
                "Config": config_name,
                "RepoTags": [f"bench/app{i:03d}:1"],
                "Layers": [f"{d[7:]}.tar" for d in diff_ids],
            }
        )
    _write_zstd_tar(out, layers, [*configs, ("manifest.json", json.dumps(manifest).encode())])
    for path in layers.values():
        path.unlink()
    return out


def _write_zstd_tar(out: Path, files: dict[str, Path], docs: list[tuple[str, bytes]]) -> None:
    """Staged ``files`` then in-memory ``docs``, as one zstd-compressed tar, atomically."""
    partial = out.with_suffix(".partial")
    with partial.open("wb") as f:
        zstd = subprocess.Popen(["zstd", "-q", "-3", "-T0", "-c"], stdin=subprocess.PIPE, stdout=f)
        assert zstd.stdin is not None
        with tarfile.open(fileobj=zstd.stdin, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for arcname, path in files.items():
                info = tar.gettarinfo(str(path), arcname)
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                with path.open("rb") as src:
                    tar.addfile(info, src)
            for arcname, data in docs:
                info = tarfile.TarInfo(arcname)
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
        zstd.stdin.close()
        if zstd.wait() != 0:
            raise RuntimeError("zstd failed")
    partial.rename(out)
