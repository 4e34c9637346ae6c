"""Outer compression of archives, detected from magic bytes (never the file name)."""

from __future__ import annotations

import bz2
import gzip
import io
from enum import StrEnum
from typing import BinaryIO

import lz4.frame
import zstandard

from agent.archive import limits
from agent.errors import ArchiveError

# zstd frames made with --long=31 need windows up to 2 GiB: the largest
# accepted is decided by the memory budget (agent.archive.limits).
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Magic (4) + frame header (at most 14): enough to read the window size.
_ZSTD_HEAD = 18


class Compression(StrEnum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"
    BZIP2 = "bzip2"
    LZ4 = "lz4"


_MAGIC = (
    (b"\x1f\x8b", Compression.GZIP),
    (ZSTD_MAGIC, Compression.ZSTD),
    (b"BZh", Compression.BZIP2),
    (b"\x04\x22\x4d\x18", Compression.LZ4),
)


def detect(head: bytes) -> Compression:
    """The compression that ``head`` (the first bytes of a stream) starts with."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return Compression.NONE


class _Prefixed(io.RawIOBase):
    """A stream that first returns ``head`` and then the rest of ``raw``."""

    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        self._head = memoryview(head)
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._raw.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def zstd_window(head: bytes) -> int | None:
    """The window the zstd frame starting ``head`` declares, or None if unreadable."""
    try:
        return int(zstandard.get_frame_parameters(head).window_size)
    except zstandard.ZstdError:
        return None


def check_zstd_window(head: bytes) -> None:
    """Refuse a zstd frame whose window exceeds what the memory budget allows.

    Checked on the frame header, before the decoder allocates anything. Later
    frames of a multi-frame file are held to the same bound by the decoder.
    """
    window = zstd_window(head)
    allowed = limits.current().zstd_window
    if window is not None and window > allowed:
        budget = limits.current().memory_budget
        raise ArchiveError(
            f"zstd window of {limits.human(window)} (--long={window.bit_length() - 1}) "
            f"exceeds the {limits.human(allowed)} allowed by --memory-budget "
            f"{limits.human(budget)}; raise --memory-budget / IMAGE_AGENT_MEMORY_BUDGET "
            f"to at least {limits.human(window + limits.RESERVED)}, or recompress "
            f"with a smaller --long"
        )


def open_stream(raw: BinaryIO) -> tuple[Compression, BinaryIO]:
    """Detect the compression of ``raw`` and return a stream of decompressed bytes.

    An empty stream gives ``(NONE, <empty stream>)``; the caller reports it.
    A zstd frame needing a larger window than the memory budget allows raises
    :class:`ArchiveError` naming the window and the setting.
    """
    head = raw.read(8)
    kind = detect(head)
    if kind is Compression.ZSTD:
        while len(head) < _ZSTD_HEAD:
            more = raw.read(_ZSTD_HEAD - len(head))
            if not more:
                break
            head += more
        check_zstd_window(head)
    source: BinaryIO = io.BufferedReader(_Prefixed(head, raw), buffer_size=1 << 20)
    if kind is Compression.GZIP:
        return kind, gzip.GzipFile(fileobj=source, mode="rb")  # type: ignore[return-value]
    if kind is Compression.ZSTD:
        decoder = zstandard.ZstdDecompressor(max_window_size=limits.current().zstd_window)
        reader = decoder.stream_reader(source, read_size=1 << 20, read_across_frames=True)
        return kind, reader
    if kind is Compression.BZIP2:
        return kind, bz2.BZ2File(source, mode="rb")  # type: ignore[return-value]
    if kind is Compression.LZ4:
        return kind, lz4.frame.LZ4FrameFile(source, mode="rb")
    return kind, source
