"""``image-agent verify``: check an archive without importing it.

The archive goes through the importer itself, with an in-memory content
store in place of containerd that only hashes and records, so verify
checks exactly what import would: the format, every digest and size, that
each image's blobs are there for the platforms present, and the names.

Before that, one cheap pass over the tar headers checks what import does not
need to: a name carried twice must carry the same bytes both times (``tar
-x`` keeps the last copy, the importer the first), and every file under
``blobs/`` must be named by a valid digest. Only names that occur twice are
read and hashed, in a second pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent._proto.containerd.types import descriptor_pb2
from agent.archive import layout
from agent.archive.tarstream import walk
from agent.containerd.client import Blob, ImageRecord, Put
from agent.errors import ArchiveError, ContainerdError, NotFound
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


@dataclass
class Report:
    result: ImportResult
    blobs: int
    total_size: int
    platforms: list[str] = field(default_factory=list)


def _members(path: str) -> dict[str, list[tuple[str, int]]]:
    """Every file and link name with the (kind, size) of each of its copies; checks blob names."""
    seen: dict[str, list[tuple[str, int]]] = {}
    with Path(path).open("rb") as f:
        for member, _ in walk(f):
            if member.kind == "other":
                continue  # directories may be listed more than once
            if member.kind == "file":
                layout.digest_of_blob_path(member.name)  # raises for a bad blob name
            seen.setdefault(member.name, []).append((member.kind, member.size))
    return seen


def _hashes_of(path: str, names: set[str]) -> dict[str, set[str]]:
    """The sha256 of every copy of ``names`` (links hash their target path)."""
    found: dict[str, set[str]] = {}
    with Path(path).open("rb") as f:
        for member, data in walk(f):
            if member.name not in names:
                continue
            h = hashlib.sha256()
            if data is None:
                h.update(f"{member.kind}:{member.link}".encode())
            else:
                while chunk := data.read(1 << 20):
                    h.update(chunk)
            found.setdefault(member.name, set()).add(h.hexdigest())
    return found


def _check_duplicates(path: str) -> None:
    """Raise ArchiveError (without the file name) for duplicate names that differ."""
    seen = _members(path)
    twice = {name: copies for name, copies in seen.items() if len(copies) > 1}
    for name, copies in twice.items():
        if len(set(copies)) > 1:
            raise ArchiveError(f"{name} is in the archive {len(copies)} times, not the same")
    if twice:
        for name, hashes in _hashes_of(path, set(twice)).items():
            if len(hashes) > 1:
                raise ArchiveError(
                    f"{name} is in the archive {len(twice[name])} times "
                    "with different contents (tar -x would keep the last)"
                )


def check_members(path: str) -> None:
    """Refuse an archive whose duplicate names differ, or whose blob names are not digests."""
    try:
        _check_duplicates(path)
    except ArchiveError as err:
        raise err.for_file(path) from None
    except OSError as err:
        raise ArchiveError(err.strerror or str(err), file=path) from None


def verify(path: str, progress: ProgressFn | None = None) -> Report:
    """Check ``path``; raises ArchiveError (naming the file) on the first problem."""
    check_members(path)
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
