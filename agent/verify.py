"""``image-agent verify``: check an archive without importing it.

The archive goes through the importer itself, with an in-memory content
store in place of containerd that only hashes and records, so verify
checks exactly what import would: the format, every digest and size, that
each image's blobs are there for the platforms present, and the names.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent._proto.containerd.types import descriptor_pb2
from agent.archive import layout
from agent.containerd.client import Blob, ImageRecord
from agent.errors import ContainerdError, NotFound
from agent.importer import Importer, ImportOptions, ImportResult, ImportTarget, ProgressFn

KEEP_SMALL = layout.MAX_JSON


class MemoryStore:
    """The part of the containerd client the importer uses, in memory, without keeping layers.

    It is an :class:`~agent.importer.ImportTarget` (so a ``ContentStore``).
    """

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.small: dict[str, bytes] = {}
        self.images: dict[str, ImageRecord] = {}

    def create_lease(
        self, expire_after_s: float = 0.0, labels: dict[str, str] | None = None
    ) -> str:
        return "verify"

    def delete_lease(self, lease_id: str, *, sync: bool = True) -> None:
        pass

    def blob_info(self, digest: str) -> Blob | None:
        size = self.sizes.get(digest)
        return None if size is None else Blob(digest, size, {})

    def write_blob(
        self,
        chunks: Iterable[bytes],
        *,
        lease: str,
        total: int,
        expected: str = "",
        labels: dict[str, str] | None = None,
    ) -> str:
        h = hashlib.sha256()
        size = 0
        head = bytearray()
        for chunk in chunks:
            h.update(chunk)
            size += len(chunk)
            if len(head) <= KEEP_SMALL:
                head += chunk[: KEEP_SMALL + 1 - len(head)]
        digest = "sha256:" + h.hexdigest()
        if (expected and digest != expected) or (total and size != total):
            # As containerd answers a commit that does not match.
            raise ContainerdError(
                f"unexpected commit digest {digest} or size {size}, expected {expected} / {total}",
                code="FAILED_PRECONDITION",
            )
        self.sizes[digest] = size
        if size <= KEEP_SMALL:
            self.small[digest] = bytes(head)
        return digest

    def read_blob(self, digest: str, limit: int) -> bytes:
        data = self.small.get(digest)
        if data is None:
            raise NotFound(f"content {digest} not kept", code="NOT_FOUND")
        return data

    def label_blob(self, digest: str, labels: dict[str, str]) -> None:
        pass

    def get_image(self, name: str) -> ImageRecord | None:
        return self.images.get(name)

    def put_image(
        self, name: str, media_type: str, digest: str, size: int, labels: dict[str, str]
    ) -> str:
        target = descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=size)
        self.images[name] = ImageRecord(name, target, dict(labels))
        return "created"

    def delete_image(self, name: str) -> None:
        self.images.pop(name, None)


@dataclass
class Report:
    result: ImportResult
    blobs: int
    total_size: int
    platforms: list[str] = field(default_factory=list)


def verify(path: str, progress: ProgressFn | None = None) -> Report:
    """Check ``path``; raises ArchiveError (naming the file) on the first problem."""
    store = MemoryStore()
    target: ImportTarget = store
    importer = Importer(
        target,
        ImportOptions(unpack=False, platforms=None, pin=False, cri_wait_s=0),
        progress=progress,
    )
    result = importer.import_file(path)
    plats = sorted({p for image in result.images for p in image.platforms})
    return Report(result, len(store.sizes), sum(store.sizes.values()), plats)
