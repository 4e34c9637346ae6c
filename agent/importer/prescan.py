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

import gzip
import io
import os
import posixpath
import tarfile
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import IO, BinaryIO, cast

import lz4.frame
import zstandard

from agent.archive import layout, limits
from agent.archive.compression import Compression, detect, zstd_window
from agent.archive.tarstream import HeaderGuard, Member, safe_name
from agent.errors import AgentError, ArchiveError, Cancelled
from agent.importer.ingest import (
    _LAYOUT_DOCS,
    check_stop,
    follow_links,
    open_regular,
    read_limited,
)
from agent.importer.model import BUNDLE_CONTENTS, ImportOptions, Resolution
from agent.importer.resolve import resolve
from agent.importer.trace import QUIET, Timeline

# Small documents kept for resolving; an archive with more gets no pre-scan.
BUDGET = 16 << 20
# The largest zstd window pre-scanned (a second decompressor holds one).
MAX_WINDOW = 32 << 20
# Read and skip in blocks this size: the pass keeps little memory besides the window.
SCAN_BUFFER = 64 << 10
# What a damaged archive makes the decompressors and tarfile raise.
_DAMAGE = (
    EOFError,
    OSError,
    ValueError,
    RuntimeError,
    zlib.error,
    zstandard.ZstdError,
    tarfile.TarError,
)


def worth_it(head: bytes) -> bool:
    """From the file's first bytes: is a second, metadata-only read cheap enough?"""
    kind = detect(head)
    if kind is Compression.BZIP2:
        return False
    if kind is Compression.ZSTD:
        window = zstd_window(head)
        return window is not None and window <= MAX_WINDOW
    return True


class _Stoppable(io.RawIOBase):
    """A file whose reads raise Cancelled once ``stop`` is set (a skipped body is read too)."""

    def __init__(self, raw: BinaryIO, stop: threading.Event) -> None:
        super().__init__()
        self.raw = raw
        self.stop = stop

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        check_stop(self.stop, "pre-scan")
        data = self.raw.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _members(raw: _Stoppable, head: bytes) -> Iterator[tuple[Member, IO[bytes] | None]]:
    """The tar's members with readers for regular files, read in small blocks.

    The same header checks as the import's own pass (:class:`HeaderGuard`),
    with buffers a sixteenth the size: bodies are skipped, not kept.
    """
    kind = detect(head)
    file = cast(IO[bytes], raw)
    source: IO[bytes]
    if kind is Compression.ZSTD:
        decoder = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
        source = decoder.stream_reader(file, read_size=SCAN_BUFFER, read_across_frames=True)
    elif kind is Compression.GZIP:
        source = cast(IO[bytes], gzip.GzipFile(fileobj=file, mode="rb"))
    elif kind is Compression.LZ4:
        source = lz4.frame.LZ4FrameFile(file, mode="rb")
    elif kind is Compression.NONE:
        source = file
    else:
        raise ArchiveError(f"not pre-scanned: {kind.value}")
    limits.begin_archive()
    tar = tarfile.open(
        fileobj=HeaderGuard(source, limits.current()), mode="r|", bufsize=SCAN_BUFFER
    )
    for info in tar:
        tar.members = []  # type: ignore[attr-defined]  # stream mode would keep every header
        name = safe_name(info.name)
        if info.isreg():
            yield Member(name, info.size, "file"), tar.extractfile(info)
        elif info.issym():
            target = posixpath.normpath(posixpath.join(posixpath.dirname(name), info.linkname))
            yield Member(name, 0, "link", safe_name(target, what="link target")), None
        elif info.islnk():
            yield Member(name, 0, "link", safe_name(info.linkname, what="link target")), None


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
        return follow_links(self.links, self.by_path, path, what, "not seen yet")

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
        with self.timeline.phase("prescan"):
            try:
                with open_regular(self.path) as f:
                    head = os.pread(f.fileno(), 64, 0)
                    plan = self._scan(_members(_Stoppable(f, self.stop), head))
            except Cancelled:
                self.outcome = "stopped"
                return
            except (AgentError, *_DAMAGE) as err:
                self.outcome = f"failed: {err}"
                return
            if plan is None:
                self.outcome = "no plan"
                return
        try:
            self.found(plan)
        except (AgentError, Cancelled) as err:
            # The import meets (and reports) the same problem itself.
            self.outcome = f"plan not used: {err}"
            return
        self.outcome = "resolved"

    def _scan(self, members: Iterator[tuple[Member, IO[bytes] | None]]) -> Resolution | None:
        seen = _Seen()
        metadata_seen = tried_early = False
        for member, data in members:
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
