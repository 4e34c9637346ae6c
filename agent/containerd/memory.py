"""The content store, leases and image records in memory: containerd without containerd.

Blobs are hashed and checked as containerd checks a commit; only small ones
(the documents) are kept, so a many-gigabyte archive costs no memory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from agent._proto.containerd.types import descriptor_pb2
from agent.containerd.client import Blob, ImageRecord, Put
from agent.errors import ContainerdError, NotFound


class MemoryStore:
    """The part of the containerd client the importer uses, in memory, without keeping layers.

    It is an ``ImportTarget`` for the importer (so a ``ContentStore``): ``verify``
    runs the importer on it, and the fast tests of the importer do too.
    """

    def __init__(self, keep_small: int = 4 << 20) -> None:
        #: Blobs up to this many bytes are kept (documents); larger ones only hashed.
        self.keep_small = keep_small
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
            if len(head) <= self.keep_small:
                head += chunk[: self.keep_small + 1 - len(head)]
        digest = "sha256:" + h.hexdigest()
        if (expected and digest != expected) or (total and size != total):
            # As containerd answers a commit that does not match.
            raise ContainerdError(
                f"unexpected commit digest {digest} or size {size}, expected {expected} / {total}",
                code="FAILED_PRECONDITION",
            )
        self.sizes[digest] = size
        if size <= self.keep_small:
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
    ) -> Put:
        previous = self.images.get(name)
        target = descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=size)
        merged = {**(previous.labels if previous else {}), **labels}
        self.images[name] = ImageRecord(name, target, merged)
        if previous is None:
            return Put("created", None)
        same = previous.target.digest == digest and previous.labels == merged
        return Put("unchanged" if same else "updated", previous)

    def delete_image(self, name: str) -> None:
        self.images.pop(name, None)
