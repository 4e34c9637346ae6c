"""Ingest: one pass over the archive's tar stream, every blob into the content store.

Blobs named by digest are checked first and skipped when present. Small
JSON documents are kept in memory (up to a budget) so that resolving need
not read them back. The layout's own documents (``index.json``,
``manifest.json``, ``oci-layout``) are kept aside for resolving. Layers are
handed to the eager unpacker, if there is one, as they go by.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

from agent.archive import layout
from agent.archive.compression import Compression, detect
from agent.archive.tarstream import Member, Reader, walk
from agent.containerd.content import ContentStore
from agent.errors import ArchiveError, Cancelled, ContainerdError
from agent.importer.eager import EagerUnpacker, looks_like_layer
from agent.importer.model import BUNDLE_CONTENTS, Progress, ProgressFn

CHUNK = 512 << 10
# Small JSON blobs kept in memory so that manifests and configs need not be
# read back from containerd; past this budget they are.
CACHE_BUDGET = 16 << 20
# Least time between two progress reports.
PROGRESS_EVERY_S = 0.5
MAX_LINK_HOPS = 16  # links followed to a file in the archive before giving up (a loop)
_LAYOUT_DOCS = (layout.OCI_LAYOUT_FILE, layout.OCI_INDEX_FILE, layout.DOCKER_MANIFEST_FILE)


class CountingReader:
    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.count = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        return data


def check_stop(stop: threading.Event, what: str = "import") -> None:
    if stop.is_set():
        raise Cancelled(f"{what} cancelled")


class Ingest:
    """Streams one archive into ``store`` under ``lease``; afterwards, reads blobs for resolving."""

    def __init__(
        self,
        store: ContentStore,
        lease: str,
        *,
        stop: threading.Event,
        eager: EagerUnpacker | None = None,
        progress: ProgressFn | None = None,
        file: str = "",
        size: int = 0,
        on_blob: Callable[[str, str, int, Compression], None] | None = None,
    ) -> None:
        # Told (archive path, digest, size, compression) of each blob once it is in the store.
        self.on_blob = on_blob
        self.store = store
        self.lease = lease
        self.stop = stop
        self.eager = eager
        self.progress = progress
        self.file = file
        self.size = size
        self.started = time.monotonic()
        self.docs: dict[str, bytes] = {}
        self.present: set[str] = set()
        # Written by this import, with the labels written with them (no others).
        self.written: dict[str, dict[str, str]] = {}
        # Labels to write blobs with, once a pre-scan has planned them.
        self.planned: dict[str, dict[str, str]] = {}
        self.by_path: dict[str, tuple[str, int]] = {}
        self.links: dict[str, str] = {}
        self.compression: dict[str, Compression] = {}
        self.cache: dict[str, bytes] = {}
        self.cached_bytes = 0
        self.bytes_read = 0
        self.blobs_written = 0
        self.blobs_present = 0
        self._reader: CountingReader | None = None
        self._last_progress = 0.0

    # -- the stream ----------------------------------------------------------

    def run(self, raw: BinaryIO) -> None:
        """Read the whole archive; the eager unpacker is finished (or abandoned) on return."""
        self._reader = CountingReader(raw)
        try:
            for member, data in walk(self._reader):  # type: ignore[arg-type]
                check_stop(self.stop)
                if member.kind == "link":
                    self.links[member.name] = member.link
                elif data is not None:
                    self._member(member, data)
        except BaseException:
            if self.eager:
                self.eager.finish(cancel=True)
            raise
        if self.eager:
            self.eager.finish()
        self.report(force=True)
        self.bytes_read = self._reader.count

    def report(self, force: bool = False) -> None:
        """Hand the progress sink where the stream is (at most every PROGRESS_EVERY_S)."""
        if self.progress is None or self._reader is None:
            return
        now = time.monotonic()
        if force or now - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = now
            self.progress(Progress(self.file, self._reader.count, self.size, now - self.started))

    def _member(self, member: Member, data: Reader) -> None:
        name = member.name
        if name in _LAYOUT_DOCS:
            self.docs[name] = read_limited(data, layout.MAX_JSON, name)
            return
        if name in ("repositories", BUNDLE_CONTENTS) or name.endswith(("/json", "/VERSION")):
            return  # docker's legacy metadata and our bundles' contents list: not content
        digest = layout.digest_of_blob_path(name) or layout.digest_of_docker_path(name)
        if digest is None and member.size <= layout.MAX_JSON:
            body = read_limited(data, layout.MAX_JSON, name)
            self._store_small(name, layout.sha256(body), body)
            return
        if digest is not None and self.known(digest):
            # Present already: only sniff the first bytes, skip the rest.
            self.by_path[name] = (digest, member.size)
            self._sniffed(digest, member.size, data.read(512), name)
            return
        if member.size <= layout.MAX_JSON:
            body = read_limited(data, layout.MAX_JSON, name)
            self._store_small(name, digest or layout.sha256(body), body, expected=digest)
            return
        self.by_path[name] = (self._write(data, member, expected=digest or ""), member.size)
        digest, size = self.by_path[name]
        if self.on_blob is not None:
            self.on_blob(name, digest, size, self.compression_of(digest))

    def _store_small(
        self, name: str, digest: str, body: bytes, expected: str | None = None
    ) -> None:
        if expected is not None and layout.sha256(body) != expected:
            raise ArchiveError(f"{name}: content does not match its digest {expected}")
        self.by_path[name] = (digest, len(body))
        fits = self.cached_bytes + len(body) <= CACHE_BUDGET
        if body.startswith(b"{") and fits and digest not in self.cache:
            self.cache[digest] = body
            self.cached_bytes += len(body)
        if not self.known(digest):
            labels = self.planned.get(digest, {})
            self.store.write_blob(
                [body], lease=self.lease, total=len(body), expected=digest, labels=labels
            )
            self.present.add(digest)
            self.written[digest] = labels
            self.blobs_written += 1
        self._sniffed(digest, len(body), body[:512], name)
        if self.eager and body.startswith(b"{") and b'"rootfs"' in body:
            self.eager.image_boundary()

    def _sniffed(self, digest: str, size: int, head: bytes, name: str = "") -> None:
        """Record a blob's compression; hand layers to the eager unpacker and ``on_blob``."""
        compression = detect(head)
        self.compression.setdefault(digest, compression)
        if self.eager and looks_like_layer(head, compression):
            self.eager.layer(compression, digest, size)
        if name and self.on_blob is not None:
            self.on_blob(name, digest, size, compression)

    def _write(self, data: Reader, member: Member, *, expected: str) -> str:
        head: list[bytes] = []

        def chunks() -> Iterator[bytes]:
            remaining = member.size
            while remaining > 0:
                check_stop(self.stop)
                chunk = data.read(min(CHUNK, remaining))
                if not chunk:
                    raise ArchiveError(f"{member.name}: archive is truncated")
                if not head:
                    head.append(chunk[:512])
                remaining -= len(chunk)
                yield chunk
                self.report()

        labels = self.planned.get(expected, {}) if expected else {}
        try:
            digest = self.store.write_blob(
                chunks(), lease=self.lease, total=member.size, expected=expected, labels=labels
            )
        except ContainerdError as err:
            if err.code in ("FAILED_PRECONDITION", "INVALID_ARGUMENT"):
                raise ArchiveError(
                    f"{member.name}: content does not match its digest or size ({err})"
                ) from None
            raise
        self.present.add(digest)
        self.written[digest] = labels
        self.blobs_written += 1
        self._sniffed(digest, member.size, head[0] if head else b"")
        return digest

    # -- the blob reader resolving uses ----------------------------------------

    def known(self, digest: str) -> bool:
        """The blob is in the store (written by this import, or there before)."""
        if digest in self.present:
            return True
        if self.store.blob_info(digest) is not None:
            self.present.add(digest)
            self.blobs_present += 1
            return True
        return False

    def read(self, digest: str, what: str) -> bytes:
        """A small document by digest, from memory or the store."""
        cached = self.cache.get(digest)
        if cached is not None:
            return cached
        if not self.known(digest):
            raise ArchiveError(f"{what} ({digest}) is missing from the archive")
        return self.store.read_blob(digest, layout.MAX_JSON)

    def path(self, path: str, what: str) -> tuple[str, int]:
        """(digest, size) of the file at ``path`` in the archive, following links."""
        return follow_links(self.links, self.by_path, path, what, "is missing from the archive")

    def compression_of(self, digest: str) -> Compression:
        return self.compression.get(digest, Compression.NONE)


def follow_links(
    links: dict[str, str],
    by_path: dict[str, tuple[str, int]],
    path: str,
    what: str,
    missing: str,
) -> tuple[str, int]:
    """(digest, size) of the file ``path`` names, through at most MAX_LINK_HOPS links.

    A path with no file is ArchiveError ``<what> <path> <missing>``.
    """
    seen = 0
    while path in links and seen < MAX_LINK_HOPS:
        path, seen = links[path], seen + 1
    found = by_path.get(path)
    if found is None:
        raise ArchiveError(f"{what} {path!r} {missing}")
    return found


def read_limited(data: Reader, limit: int, name: str) -> bytes:
    body = data.read(limit + 1)
    if len(body) > limit:
        raise ArchiveError(f"{name} is larger than {limit >> 20} MiB")
    return body


def open_regular(path: str) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file, without ever blocking.

    O_NONBLOCK makes opening a FIFO with no writer return at once (a plain
    open would wait for one for ever); the file type is then checked on
    the open descriptor itself, so a swap in between cannot fool it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as err:
        raise ArchiveError(err.strerror or str(err), file=path) from None
    try:
        _require_regular(fd, path)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _require_regular(fd: int, path: str) -> None:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        raise ArchiveError(f"not a regular file ({_kind(mode)})", file=path)


def _kind(mode: int) -> str:
    for test, what in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return what
    return "not a file"
