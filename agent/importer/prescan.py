"""Metadata pre-scan: learn an archive's layer chains before its stream gets there.

``docker save`` writes ``manifest.json`` last and configs near the end, so
an import reading the archive once, front to back, learns which layer goes
on top of which only after every layer has streamed by, and then unpacks
them all after the stream. When the archive is a regular file it can be
read a second time: this pass, on its own thread, decompresses it and
skips the layer bodies, keeping only the small documents (up to a
budget), and resolves them into chains of (blob, diff ID). The streaming
import hands each layer to the unpacker as it lands in the content store,
and the unpacker applies it as soon as the layer below it is committed.

Nothing here is trusted: a layer is applied only from the blob the import
itself wrote, checked against its digest, and a snapshot is named by the
ChainID its applied content gives. A pre-scan that fails, or an archive
that changes between the two reads, costs time, never correctness; the
import's own resolve is the one that decides.

It is used only where it pays (measured in the README's benchmark
section): a zstd frame whose window would make a second decompressor
exceed the memory budget, and bzip2 (which decompresses as slowly as the
whole import runs) are not pre-scanned.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import BinaryIO

from agent.archive import layout
from agent.archive.compression import Compression, detect, zstd_window
from agent.archive.tarstream import walk
from agent.errors import AgentError, ArchiveError, Cancelled
from agent.importer.ingest import _LAYOUT_DOCS, check_stop, read_limited
from agent.importer.model import BUNDLE_CONTENTS, ImportOptions, Resolution
from agent.importer.resolve import resolve
from agent.importer.trace import QUIET, Timeline

# Small documents kept for resolving; an archive with more gets no pre-scan.
BUDGET = 16 << 20
# The largest zstd window pre-scanned (a second decompressor holds one).
MAX_WINDOW = 32 << 20


def worth_it(head: bytes) -> bool:
    """From the file's first bytes: is a second, metadata-only read cheap enough?"""
    kind = detect(head)
    if kind is Compression.BZIP2:
        return False
    if kind is Compression.ZSTD:
        window = zstd_window(head)
        return window is not None and window <= MAX_WINDOW
    return True


class _Stoppable:
    """A file whose reads raise Cancelled once ``stop`` is set (a skipped body is read too)."""

    def __init__(self, raw: BinaryIO, stop: threading.Event) -> None:
        self.raw = raw
        self.stop = stop

    def read(self, size: int = -1, /) -> bytes:
        check_stop(self.stop, "pre-scan")
        return self.raw.read(size)


class _Seen:
    """What the pre-scan kept, as the blob reader resolving needs."""

    def __init__(self) -> None:
        self.docs: dict[str, bytes] = {}
        self.small: dict[str, bytes] = {}
        self.kept = 0
        self.big: set[str] = set()
        self.by_path: dict[str, tuple[str, int]] = {}
        self.links: dict[str, str] = {}
        self.compression: dict[str, Compression] = {}
        # Before the end of the archive: blobs not seen yet are taken to come later.
        self.optimistic = False

    def known(self, digest: str) -> bool:
        return self.optimistic or digest in self.small or digest in self.big

    def read(self, digest: str, what: str) -> bytes:
        body = self.small.get(digest)
        if body is None:
            raise ArchiveError(f"{what} ({digest}) not seen yet")
        return body

    def path(self, path: str, what: str) -> tuple[str, int]:
        seen = 0
        while path in self.links and seen < 16:
            path, seen = self.links[path], seen + 1
        found = self.by_path.get(path)
        if found is None:
            raise ArchiveError(f"{what} {path!r} not seen yet")
        return found

    def compression_of(self, digest: str) -> Compression:
        return self.compression.get(digest, Compression.NONE)


def path_key(name: str) -> str:
    """The blob key of a layer file whose name carries no digest (legacy ``<id>/layer.tar``)."""
    return f"path:{name}"


class Prescan:
    """Read ``path`` for its metadata on a thread; hand the resolution to ``found``."""

    def __init__(
        self,
        path: str,
        options: ImportOptions,
        found: Callable[[Resolution], None],
        *,
        timeline: Timeline = QUIET,
    ) -> None:
        self.path = path
        self.options = options
        self.found = found
        self.timeline = timeline
        self.stop = threading.Event()
        self.outcome = ""
        self._thread = threading.Thread(target=self._run, name="prescan", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """End the pre-scan (if still running) and wait for its thread."""
        self.stop.set()
        self._thread.join()

    def _run(self) -> None:
        from agent.importer import open_regular

        with self.timeline.phase("prescan"):
            try:
                with open_regular(self.path) as f:
                    plan = self._scan(_Stoppable(f, self.stop))  # type: ignore[arg-type]
            except Cancelled:
                self.outcome = "stopped"
                return
            except AgentError as err:
                self.outcome = f"failed: {err}"
                return
            if plan is None:
                self.outcome = "no plan"
                return
            self.outcome = "resolved"
        self.found(plan)

    def _scan(self, raw: BinaryIO) -> Resolution | None:
        seen = _Seen()
        metadata_seen = tried_early = False
        for member, data in walk(raw):
            check_stop(self.stop, "pre-scan")
            name = member.name
            if member.kind == "link":
                seen.links[name] = member.link
                continue
            if data is None:
                continue
            if name in _LAYOUT_DOCS:
                seen.docs[name] = read_limited(data, layout.MAX_JSON, name)
                metadata_seen = True
                continue
            if name in ("repositories", BUNDLE_CONTENTS) or name.endswith(("/json", "/VERSION")):
                continue
            digest = layout.digest_of_blob_path(name) or layout.digest_of_docker_path(name)
            if member.size <= layout.MAX_JSON:
                body = read_limited(data, layout.MAX_JSON, name)
                digest = digest or layout.sha256(body)
                if body.startswith(b"{"):
                    seen.kept += len(body)
                    if seen.kept > BUDGET:
                        return None
                    seen.small[digest] = body
                else:
                    seen.big.add(digest)
                seen.compression.setdefault(digest, detect(body[:512]))
            else:
                if metadata_seen and not tried_early:
                    # Metadata first (our bundles, OCI layouts): no need to read on.
                    tried_early = seen.optimistic = True
                    plan = self._resolve(seen)
                    seen.optimistic = False
                    if plan is not None:
                        return plan
                digest = digest or path_key(name)
                seen.big.add(digest)
                seen.compression.setdefault(digest, detect(data.read(512)))
            seen.by_path[name] = (digest, member.size)
        return self._resolve(seen)

    def _resolve(self, seen: _Seen) -> Resolution | None:
        try:
            return resolve(seen.docs, seen, self.options, self.stop)
        except ArchiveError:
            return None
