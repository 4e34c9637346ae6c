"""Air-gap bundles: every listed image, for the chosen platforms, in one streamed archive.

The archive is an OCI image layout compressed with zstd, written in one
pass and never staged whole on disk. Metadata comes first (``oci-layout``,
``index.json``, the contents file, then indexes, manifests and configs),
layers last, so an importer knows every image before the big blobs arrive.
A blob shared by several images is stored once. Registry indexes are kept
as they are (digests stay those of the registry); blobs of platforms not
asked for are left out, as ``ctr export`` does.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

from agent import __version__
from agent.airgap.registry import RegistryClient, RegistryError
from agent.archive import layout, limits
from agent.errors import AgentError
from agent.image import refs
from agent.image.platforms import Platform
from agent.importer import BUNDLE_CONTENTS

RESUME_ATTEMPTS = 3
# Sizes from 8 GiB on need a pax header in the tar.
_USTAR_MAX_SIZE = 8 << 30


@dataclass
class BundledImage:
    name: str
    digest: str
    media_type: str
    size: int
    platforms: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """What goes into the bundle: small documents in memory, layers by reference."""

    images: list[BundledImage] = field(default_factory=list)
    docs: dict[str, bytes] = field(default_factory=dict)
    layers: dict[str, tuple[refs.Reference, int]] = field(default_factory=dict)
    # Entries of the images' indexes, and layers of their chosen manifests:
    # what import will count against --max-index-entries / --max-layer-entries.
    index_entries: int = 0
    layer_entries: int = 0

    @property
    def tar_headers(self) -> int:
        """Headers the archive will have: oci-layout, index.json, contents, each blob, and a
        pax header for each blob too large for a ustar size field."""
        big = sum(1 for _, size in self.layers.values() if size >= _USTAR_MAX_SIZE)
        return 3 + len(self.docs) + len(self.layers) + big

    @property
    def total_size(self) -> int:
        return sum(len(d) for d in self.docs.values()) + sum(s for _, s in self.layers.values())


def default_name(platforms: tuple[Platform, ...]) -> str:
    """``bundle-linux-amd64.tar.zst``: the platform in the name, which the agent's filter reads."""
    if len(platforms) == 1:
        p = platforms[0]
        suffix = f"{p.os}-{p.architecture}" + (f"-{p.variant}" if p.variant else "")
    else:
        suffix = "multiarch"
    return f"bundle-{suffix}.tar.zst"


def plan(client: RegistryClient, wanted: list[str], platforms: tuple[Platform, ...]) -> Plan:
    """Fetch every manifest and config; decide which blobs the bundle carries."""
    out = Plan()
    for text in wanted:
        ref = refs.parse(text)
        limits.begin_archive()  # each image's indexes are counted on their own
        top = client.manifest(ref)
        kind = layout.document_kind(top.media_type, top.data, str(ref))
        media_type = top.media_type or (
            layout.OCI_INDEX if kind == "index" else layout.OCI_MANIFEST
        )
        image = BundledImage(str(ref), top.digest, media_type, len(top.data))
        out.docs[top.digest] = top.data
        if kind == "index":
            children = layout.parse_index(top.data, str(ref))
            out.index_entries += len(children)
            for child in children:
                if child.platform is not None and not any(
                    p.matches(child.platform) for p in platforms
                ):
                    continue
                m = client.manifest(ref, child.digest)
                if _add_manifest(client, ref, m.data, m.digest, platforms, out, image):
                    out.docs[m.digest] = m.data
        elif _add_manifest(client, ref, top.data, top.digest, platforms, out, image) is False:
            raise AgentError(f"{ref} has no image for {', '.join(map(str, platforms))}")
        if not image.platforms:
            raise AgentError(f"{ref} has no image for {', '.join(map(str, platforms))}")
        out.images.append(image)
    check_limits(out)
    return out


def check_limits(p: Plan) -> None:
    """Refuse a plan whose archive import and verify would refuse under the limits in force."""
    bounds = limits.current()
    index_total = len(p.images) + p.index_entries  # index.json, then each image's index
    for have, bound, what, flag in (
        (len(p.images), bounds.max_manifests, "images", "--max-archive-images"),
        (index_total, bounds.index_entry_limit, "index entries", "--max-index-entries"),
        (p.layer_entries, bounds.max_layer_entries, "layer entries", "--max-layer-entries"),
        (p.tar_headers, bounds.max_members, "tar headers", "--max-archive-members"),
    ):
        if have > bound:
            raise AgentError(
                f"the bundle would hold {have} {what}, more than the {bound} that import "
                f"allows ({flag}); split the list, or raise {flag} here and on the nodes"
            )


def _add_manifest(
    client: RegistryClient,
    ref: refs.Reference,
    data: bytes,
    digest: str,
    platforms: tuple[Platform, ...],
    out: Plan,
    image: BundledImage,
) -> bool:
    manifest = layout.parse_manifest(data, f"{ref}@{digest}")
    config_data = _small_blob(client, ref, manifest.config)
    if layout.sha256(config_data) != manifest.config.digest:
        raise RegistryError(f"{ref}: config does not match its digest {manifest.config.digest}")
    config = layout.parse_config(config_data, f"{ref} config")
    if config.platform is not None and not any(p.matches(config.platform) for p in platforms):
        return False
    out.docs[manifest.config.digest] = config_data
    out.layer_entries += len(manifest.layers)
    for layer in manifest.layers:
        out.layers.setdefault(layer.digest, (ref, layer.size))
    image.platforms.append(str(config.platform or "any"))
    return True


def _small_blob(client: RegistryClient, ref: refs.Reference, desc: layout.Descriptor) -> bytes:
    """A config blob, read no further than its declared size (and the metadata limit)."""
    if desc.size > layout.MAX_JSON:
        raise RegistryError(
            f"{ref}: config {desc.digest} is larger than {layout.MAX_JSON >> 20} MiB"
        )
    data = bytearray()
    for chunk in client.blob(ref, desc.digest):
        data += chunk
        if len(data) > desc.size:
            raise RegistryError(f"{ref}: {desc.digest} is larger than its {desc.size} bytes")
    return bytes(data)


def contents(p: Plan, platforms: tuple[Platform, ...]) -> bytes:
    doc = {
        "tool": f"image-agent {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "platforms": [str(x) for x in platforms],
        "images": [vars(i) for i in p.images],
        "blobs": len(p.docs) + len(p.layers),
        "total_size": p.total_size,
    }
    return json.dumps(doc, indent=1).encode()


def index_json(p: Plan) -> bytes:
    manifests = [
        {
            "mediaType": image.media_type,
            "digest": image.digest,
            "size": image.size,
            "annotations": {
                layout.ANNOTATION_IMAGE_NAME: image.name,
                layout.ANNOTATION_REF_NAME: image.name,
            },
        }
        for image in p.images
    ]
    return layout.dump_json({"schemaVersion": 2, "manifests": manifests})


class _VerifiedBlob(io.RawIOBase):
    """Reads a layer from the registry, checking its digest and resuming when the stream breaks."""

    def __init__(
        self,
        client: RegistryClient,
        ref: refs.Reference,
        digest: str,
        size: int,
        on_bytes: Callable[[int], None],
    ) -> None:
        self.client, self.ref, self.digest, self.size = client, ref, digest, size
        self.hash = hashlib.sha256()
        self.offset = 0  # bytes handed to the reader
        self.received = 0  # bytes received from the registry (where a resume starts)
        self.on_bytes = on_bytes
        self.attempts = 0
        self._chunks: Iterator[bytes] = client.blob(ref, digest)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes, short only at the end (tarfile takes a short read as the end)."""
        want = self.size - self.offset if n < 0 else n
        parts: list[bytes] = []
        got = 0
        while got < want:
            if not self._buf:
                chunk = self._next_chunk()
                if chunk is None:
                    break
                self._buf = chunk
            take = self._buf[: want - got]
            self._buf = self._buf[len(take) :]
            parts.append(take)
            got += len(take)
        data = b"".join(parts)
        if self.offset + len(data) > self.size:
            raise RegistryError(f"{self.ref}: {self.digest} is larger than its {self.size} bytes")
        self.offset += len(data)
        self.hash.update(data)
        self.on_bytes(len(data))
        if self.offset == self.size:
            # tarfile stops reading at the size: check the digest with the last
            # byte, and that the registry sends nothing past it.
            self._check_complete()
            self._check_no_more()
        return data

    def _check_no_more(self) -> None:
        """A registry that sends bytes past the declared size serves something else."""
        extra = len(self._buf)
        if not extra:
            try:
                chunk = next(self._chunks, None)
            except RegistryError:
                chunk = None  # the connection broke after every byte arrived: nothing extra
            extra = len(chunk or b"")
        if extra:
            raise RegistryError(
                f"{self.ref}: {self.digest} is larger than its {self.size} bytes "
                "(the registry sent more)"
            )

    def _next_chunk(self) -> bytes | None:
        """The next piece from the registry, resuming from what was received if it broke."""
        while True:
            try:
                chunk = next(self._chunks, None)
            except RegistryError as err:
                if not err.retryable:
                    raise
                self._resume(err)
                continue
            if chunk is None and self.received < self.size:
                # The connection ended early without an error: resume all the same.
                self._resume(None)
                continue
            if chunk is not None:
                self.received += len(chunk)
            return chunk

    def _resume(self, err: RegistryError | None) -> None:
        self.attempts += 1
        if self.attempts > RESUME_ATTEMPTS:
            if err is not None:
                raise err
            self._check_complete()
        time.sleep(min(10.0, 2.0**self.attempts))
        self._chunks = self.client.blob(self.ref, self.digest, self.received)

    def _check_complete(self) -> None:
        if self.offset != self.size:
            raise RegistryError(
                f"{self.ref}: {self.digest} ended at {self.offset} of {self.size} bytes",
                retryable=True,
            )
        if "sha256:" + self.hash.hexdigest() != self.digest:
            raise RegistryError(f"{self.ref}: blob does not match its digest {self.digest}")


def write(
    client: RegistryClient,
    p: Plan,
    platforms: tuple[Platform, ...],
    out: Path,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> None:
    """Stream the bundle to ``out`` (via ``out.partial``; removed if anything fails)."""
    partial = out.with_name(out.name + ".partial")
    done = 0
    total = p.total_size

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    try:
        with partial.open("wb") as raw:
            cctx = zstandard.ZstdCompressor(level=3, threads=-1)
            with (
                cctx.stream_writer(raw, closefd=False) as zw,
                tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar,
            ):
                _add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
                _add(tar, "index.json", index_json(p))
                _add(tar, BUNDLE_CONTENTS, contents(p, platforms))
                for digest, data in p.docs.items():
                    _add(tar, _blob_path(digest), data)
                    advance(len(data))
                for digest, (ref, size) in p.layers.items():
                    info = _info(_blob_path(digest), size)
                    tar.addfile(info, _VerifiedBlob(client, ref, digest, size, advance))
            raw.flush()
            os.fsync(raw.fileno())
        partial.replace(out)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise AgentError(f"{out}: cannot write the bundle ({err.strerror or err})") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _blob_path(digest: str) -> str:
    algorithm, _, hexd = digest.partition(":")
    return f"blobs/{algorithm}/{hexd}"


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_info(name, len(data)), io.BytesIO(data))
