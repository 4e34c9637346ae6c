"""One forward pass over a (possibly compressed) tar stream.

Members are yielded in archive order with a reader for their data; nothing
is extracted or written to disk. Every member name is checked: absolute
paths and ``..`` components are refused, since an archive that carries them
is either broken or hostile.
"""

from __future__ import annotations

import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, BinaryIO, Protocol

import zstandard

from agent.archive.compression import Compression, open_stream
from agent.errors import ArchiveError

READ_BUFFER = 1 << 20

# Errors the decompressors and tarfile raise on damaged input.
_DAMAGE = (
    EOFError,
    OSError,
    zlib.error,
    zstandard.ZstdError,
    tarfile.TarError,
    RuntimeError,  # lz4.frame reports corrupt frames as RuntimeError
    ValueError,
)


class Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True)
class Member:
    """One tar entry. ``link`` is the resolved target path for symlinks and hard links."""

    name: str
    size: int
    kind: str  # "file", "link" or "other"
    link: str = ""


def safe_name(name: str, *, what: str = "tar entry") -> str:
    """``name`` cleaned (``./a//b`` -> ``a/b``); refuse absolute paths and ``..``."""
    if name.startswith("/"):
        raise ArchiveError(f"{what} {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"{what} {name!r} leaves the archive ('..')")
    return "/".join(parts)


def describe_damage(err: BaseException, compression: Compression) -> str:
    """A one-line reason for a decompression or tar error."""
    text = str(err) or type(err).__name__
    lowered = text.lower()
    if isinstance(err, EOFError) or "unexpected end" in lowered or "truncated" in lowered:
        return "archive is truncated (unexpected end of data)"
    if compression is Compression.NONE:
        if isinstance(err, tarfile.ReadError):
            return f"not a tar archive ({text})"
        return f"unreadable archive ({text})"
    if isinstance(err, tarfile.ReadError) and "zlib" not in lowered:
        # Decompressed fine so far, but what came out is no tar header.
        return f"corrupt {compression.value} data, or no tar archive inside ({text})"
    return f"corrupt {compression.value} data ({text})"


class _Guarded:
    """A member reader whose damage errors become :class:`ArchiveError`."""

    def __init__(self, data: IO[bytes], compression: Compression) -> None:
        self._data = data
        self._compression = compression

    def read(self, size: int = -1) -> bytes:
        try:
            return self._data.read(size)
        except _DAMAGE as err:
            raise ArchiveError(describe_damage(err, self._compression)) from None


def walk(raw: BinaryIO) -> Iterator[tuple[Member, Reader | None]]:
    """Yield ``(member, data)`` for each entry of the tar in ``raw``.

    ``data`` is a reader over a regular file's bytes, valid until the next
    member is requested, and ``None`` for other entries. Damaged input raises
    :class:`ArchiveError` with a readable reason.
    """
    compression = Compression.NONE
    try:
        compression, stream = open_stream(raw)
        tar = tarfile.open(fileobj=stream, mode="r|", bufsize=READ_BUFFER)
        count = 0
        for info in tar:
            count += 1
            tar.members = []  # type: ignore[attr-defined]  # stream mode would keep every header in memory
            name = safe_name(info.name)
            if info.isreg():
                data = tar.extractfile(info)
                assert data is not None
                yield Member(name, info.size, "file"), _Guarded(data, compression)
            elif info.issym():
                target = posixpath.normpath(posixpath.join(posixpath.dirname(name), info.linkname))
                yield Member(name, 0, "link", safe_name(target, what="link target")), None
            elif info.islnk():
                yield Member(name, 0, "link", safe_name(info.linkname, what="link target")), None
            else:
                yield Member(name, 0, "other"), None
        if count == 0:
            raise ArchiveError("archive is empty or not a tar archive")
    except ArchiveError:
        raise
    except _DAMAGE as err:
        raise ArchiveError(describe_damage(err, compression)) from None
