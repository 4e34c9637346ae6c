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
from dataclasses import dataclass, field
from pathlib import Path

from agent.archive import layout
from agent.archive.tarstream import walk
from agent.containerd.memory import MemoryStore
from agent.errors import ArchiveError
from agent.importer import Importer, ImportOptions, ImportResult, ImportTarget, ProgressFn


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
    store = MemoryStore(keep_small=layout.MAX_JSON)
    target: ImportTarget = store
    importer = Importer(
        target,
        ImportOptions(unpack=False, platforms=None, pin=False, cri_wait_s=0),
        progress=progress,
    )
    result = importer.import_file(path)
    plats = sorted({p for image in result.images for p in image.platforms})
    return Report(result, len(store.sizes), sum(store.sizes.values()), plats)
