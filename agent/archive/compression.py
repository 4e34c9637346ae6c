"""Outer compression of archives, detected from magic bytes (never the file name)."""

from __future__ import annotations

import bz2
import gzip
import io
from enum import StrEnum
from typing import BinaryIO

import lz4.frame
import zstandard

# zstd frames made with --long=31 need windows up to 2 GiB.
ZSTD_MAX_WINDOW = 1 << 31


class Compression(StrEnum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"
    BZIP2 = "bzip2"
    LZ4 = "lz4"


_MAGIC = (
    (b"\x1f\x8b", Compression.GZIP),
    (b"\x28\xb5\x2f\xfd", Compression.ZSTD),
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


def open_stream(raw: BinaryIO) -> tuple[Compression, BinaryIO]:
    """Detect the compression of ``raw`` and return a stream of decompressed bytes.

    An empty stream gives ``(NONE, <empty stream>)``; the caller reports it.
    """
    head = raw.read(8)
    kind = detect(head)
    source: BinaryIO = io.BufferedReader(_Prefixed(head, raw), buffer_size=1 << 20)
    if kind is Compression.GZIP:
        return kind, gzip.GzipFile(fileobj=source, mode="rb")  # type: ignore[return-value]
    if kind is Compression.ZSTD:
        reader = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_reader(
            source, read_size=1 << 20, read_across_frames=True
        )
        return kind, reader
    if kind is Compression.BZIP2:
        return kind, bz2.BZ2File(source, mode="rb")  # type: ignore[return-value]
    if kind is Compression.LZ4:
        return kind, lz4.frame.LZ4FrameFile(source, mode="rb")
    return kind, source
