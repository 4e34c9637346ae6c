"""One forward pass over a (possibly compressed) tar stream.

Members are yielded in archive order with a reader for their data; nothing
is extracted or written to disk. Every member name is checked: absolute
paths and ``..`` components are refused, since an archive that carries them
is either broken or hostile.

The standard :mod:`tarfile` reads pax and GNU long-name headers whole into
memory and, before CPython 3.11.10 / 3.12.6, parses pax records in quadratic
time (CVE-2024-6232). So every 512-byte header is checked here, in the raw
stream, before tarfile sees it (:class:`HeaderGuard`): the size of extended
headers, the shape of pax records and the number of headers are bounded by
:mod:`agent.archive.limits`, whatever the interpreter's patch level.
"""

from __future__ import annotations

import io
import posixpath
import re
import struct
import tarfile
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import IO, BinaryIO, Protocol

import zstandard

from agent import logs
from agent.archive import limits
from agent.archive.compression import Compression, open_stream
from agent.errors import ArchiveError

BLOCK = 512
# Type flags, as in POSIX and GNU tar.
_PAX_TYPES = frozenset(b"xX")  # one member's extended header ('X': Solaris)
_GLOBAL_TYPE = ord("g")
_GNU_LONG_TYPES = frozenset(b"LK")  # GNU long name / long link name
_SPARSE_TYPE = ord("S")
_AREG_TYPE = 0
# Types tarfile knows; for these only regular files carry data blocks.
_REGULAR_TYPES = frozenset(b"07\0S")
_SUPPORTED_TYPES = _REGULAR_TYPES | frozenset(b"123456LKxgX")
# The longest run of decimal digits allowed in an extended header. The
# vulnerable pax parsers backtrack over digit runs; real headers hold numbers
# of at most 20 digits (sizes, times) and paths.
MAX_DIGIT_RUN = 64
_DIGIT_RUN = re.compile(rb"[0-9]{%d}" % (MAX_DIGIT_RUN + 1))
# The most extended headers (pax, global pax, GNU long names) allowed in a row
# before a member. Real archives use at most three (g, x; or L, K); tarfile
# reads each further one a level deeper in recursion.
MAX_EXTENDED_CHAIN = 8

READ_BUFFER = 1 << 20
_BLOB_PATH_PARTS = 3  # blobs/<algorithm>/<hex>
# The first byte of a numeric field in base-256 (GNU): a positive or a negative number.
_BASE256_POSITIVE = 0o200
_BASE256_NEGATIVE = 0o377
_MAX_SIZE_DIGITS = 20  # a pax size longer than this is past any 64-bit size

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


def is_appledouble_blob(name: str) -> bool:
    """True for ``blobs/<algorithm>/._<hex>``: the resource forks macOS bsdtar adds beside files."""
    parts = name.split("/")
    return len(parts) == _BLOB_PATH_PARTS and parts[0] == "blobs" and parts[2].startswith("._")


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


def _number(field: bytes) -> int | None:
    """A numeric header field exactly as tarfile reads it (base-256, or octal text); None
    where tarfile finds it invalid (and stops reading the archive).

    Exactly, quirks included (``int()`` takes ``0o17``, ``1_0``, signs and
    white space): a field the guard read differently from tarfile would let a
    header through unchecked.
    """
    if field[0] in (_BASE256_POSITIVE, _BASE256_NEGATIVE):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == _BASE256_NEGATIVE else n
    try:
        text = field.split(b"\0", 1)[0].decode("ascii")
        return int(text.strip() or "0", 8)
    except ValueError:  # UnicodeDecodeError is one
        return None


def _checksum_ok(block: bytes) -> bool:
    stored = _number(block[148:156])
    unsigned = 256 + sum(struct.unpack_from("148B8x356B", block))
    signed = 256 + sum(struct.unpack_from("148b8x356b", block))
    return stored is not None and stored in (unsigned, signed)


def parse_pax(data: bytes, what: str) -> dict[bytes, bytes]:
    """The records of a pax extended header; ArchiveError unless every one is well-formed.

    A record is ``<length> <keyword>=<value>\\n`` where length counts the whole
    record. Parsed in one linear pass; the records must tile the data exactly.
    """
    if _DIGIT_RUN.search(data):
        raise ArchiveError(f"{what}: pax header holds a run of more than {MAX_DIGIT_RUN} digits")
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 12)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit() or not digits.isascii():
            raise ArchiveError(f"{what}: malformed pax record at byte {pos}")
        length = int(digits)
        end = pos + length
        if length < len(digits) + 4 or end > len(data) or data[end - 1 : end] != b"\n":
            raise ArchiveError(f"{what}: pax record at byte {pos} has a wrong length")
        keyword, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not keyword:
            raise ArchiveError(f"{what}: pax record at byte {pos} has no keyword=value")
        records[keyword] = value
        pos = end
    return records


class HeaderGuard(io.RawIOBase):
    """Reads a tar stream and checks every header before the reader sees it.

    Follows the archive's structure (header, data blocks, header, ...) the
    way tarfile does, and raises :class:`ArchiveError` on an extended header
    over the limit, a malformed pax record, sparse members, or too many
    headers. After the end-of-archive block, or a header tarfile would stop
    at, bytes pass unchecked: tarfile reads no further headers.
    """

    def __init__(self, raw: Reader, bounds: limits.Limits) -> None:
        super().__init__()
        self._raw = raw
        self._limits = bounds
        self._offset = 0  # bytes passed through so far
        self._skip = 0  # data bytes to pass before the next block of interest
        self._need = BLOCK  # bytes of the current header or extended data to collect
        self._buf = bytearray()
        self._ext_type = -1  # type of the extended header whose data is being collected
        self._ext_start = 0
        self._ext_size = 0  # declared size of that header's data (the rest is padding)
        self._chain = 0  # extended headers since the last member
        self._size_override: int | None = None
        self._seen_pax = False
        self._extended_total = 0
        self.headers = 0
        self.done = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1, /) -> bytes:
        data = self._raw.read(size)
        if not self.done and data:
            self._scan(memoryview(data))
        return data

    def _scan(self, view: memoryview) -> None:
        i, n = 0, len(view)
        while i < n and not self.done:
            if self._skip:
                k = min(self._skip, n - i)
                self._skip -= k
                i += k
                continue
            k = min(self._need - len(self._buf), n - i)
            self._buf += view[i : i + k]
            i += k
            if len(self._buf) == self._need:
                chunk = bytes(self._buf)
                self._buf.clear()
                start = self._offset + i - len(chunk)
                if self._ext_type >= 0:
                    self._extended(chunk)
                else:
                    self._header(chunk, start)
        self._offset += n

    def _header(self, block: bytes, offset: int) -> None:
        if block.count(0) == BLOCK or not _checksum_ok(block):
            self.done = True  # the end, or a header tarfile stops at
            return
        size = _number(block[124:136])
        if size is None:
            self.done = True
            return
        self.headers += 1
        bounds = self._limits
        if self.headers > bounds.max_members:
            raise ArchiveError(
                f"archive has more than {bounds.max_members} tar headers (limit max_members)"
            )
        kind = block[156]
        where = f"tar header at byte {offset}"
        if size < 0:
            raise ArchiveError(f"{where} has a negative size")
        if kind == _SPARSE_TYPE:
            raise ArchiveError(f"{where}: sparse members are not supported in image archives")
        if kind in _PAX_TYPES or kind == _GLOBAL_TYPE or kind in _GNU_LONG_TYPES:
            self._extended_header(kind, size, offset, where)
            return
        # A member: its data blocks follow (tarfile skips data only for these).
        if self._size_override is not None:
            size = self._size_override
        name = block[0:100].split(b"\0", 1)[0]
        is_dir = kind == _AREG_TYPE and name.endswith(b"/")
        if (kind in _REGULAR_TYPES and not is_dir) or kind not in _SUPPORTED_TYPES:
            self._skip = _blocks(size)
        self._size_override = None
        self._seen_pax = False
        self._chain = 0

    def _extended_header(self, kind: int, size: int, offset: int, where: str) -> None:
        """A pax, global or GNU long-name header: bounded, then its blocks collected."""
        bounds = self._limits
        self._chain += 1
        if self._chain > MAX_EXTENDED_CHAIN:
            raise ArchiveError(f"{where}: more than {MAX_EXTENDED_CHAIN} extended headers in a row")
        if size > bounds.max_extended_header:
            raise ArchiveError(
                f"{where}: extended header of {size} bytes exceeds the "
                f"{limits.human(bounds.max_extended_header)} limit"
            )
        self._extended_total += size
        if self._extended_total > bounds.max_extended_total:
            raise ArchiveError(
                f"{where}: extended headers exceed "
                f"{limits.human(bounds.max_extended_total)} in all (limit max_extended_total)"
            )
        if kind in _PAX_TYPES:
            if self._seen_pax:
                raise ArchiveError(f"{where}: two pax headers for one member")
            self._seen_pax = True
        self._ext_type, self._ext_start, self._ext_size = kind, offset, size
        # The padding is collected too: tarfile reads the whole blocks and,
        # for pax, parses records in the padding as well.
        self._need = _blocks(size)
        self._skip = 0
        if size == 0:
            self._extended(b"")

    def _extended(self, blocks: bytes) -> None:
        kind, size = self._ext_type, self._ext_size
        where = f"tar header at byte {self._ext_start}"
        self._ext_type = -1
        self._need = BLOCK
        data, padding = blocks[:size], blocks[size:]
        if padding.count(0) != len(padding):
            # Tools pad with zeros. Anything else is read by tarfile (as more
            # pax records, on some versions) but not by this guard.
            raise ArchiveError(f"{where}: extended header padding is not all zero bytes")
        if kind in _PAX_TYPES or kind == _GLOBAL_TYPE:
            records = parse_pax(data, where)
            if any(k.startswith(b"GNU.sparse.") for k in records):
                raise ArchiveError(f"{where}: sparse members are not supported in image archives")
            if b"size" in records:
                value = records[b"size"]
                if kind == _GLOBAL_TYPE:
                    raise ArchiveError(f"{where}: a global pax header sets a size")
                if not value.isdigit() or not value.isascii() or len(value) > _MAX_SIZE_DIGITS:
                    raise ArchiveError(f"{where}: invalid pax size {value[:32]!r}")
                self._size_override = int(value)


def _blocks(size: int) -> int:
    """``size`` rounded up to whole 512-byte blocks."""
    return -(-size // BLOCK) * BLOCK


def walk(raw: BinaryIO) -> Iterator[tuple[Member, Reader | None]]:
    """Yield ``(member, data)`` for each entry of the tar in ``raw``.

    ``data`` is a reader over a regular file's bytes, valid until the next
    member is requested, and ``None`` for other entries. Damaged input raises
    :class:`ArchiveError` with a readable reason.
    """
    compression = Compression.NONE
    limits.begin_archive()
    try:
        compression, stream = open_stream(raw)
        count = yield from _members(stream, compression)
    except ArchiveError:
        raise
    except _DAMAGE as err:
        raise ArchiveError(describe_damage(err, compression)) from None
    if count == 0:
        raise ArchiveError("archive is empty or not a tar archive")


def _members(
    stream: BinaryIO, compression: Compression
) -> Generator[tuple[Member, Reader | None], None, int]:
    """The entries of the decompressed tar ``stream`` (for :func:`walk`); returns how many."""
    guard = HeaderGuard(stream, limits.current())
    tar = tarfile.open(fileobj=guard, mode="r|", bufsize=READ_BUFFER)
    count = 0
    for info in tar:
        count += 1
        tar.members = []  # type: ignore[attr-defined]  # stream mode would keep every header in memory
        name = safe_name(info.name)
        if is_appledouble_blob(name):
            # No document names such a file: skipping it loses nothing.
            logs.get().warning(
                "archive.member_ignored", member=name, reason="macOS AppleDouble file"
            )
            continue
        if info.isreg():
            data = tar.extractfile(info)
            if data is None:  # tarfile gives data for every regular file
                raise ArchiveError(f"{name}: a regular file without data")
            yield Member(name, info.size, "file"), _Guarded(data, compression)
        elif info.issym():
            target = posixpath.normpath(posixpath.join(posixpath.dirname(name), info.linkname))
            yield Member(name, 0, "link", safe_name(target, what="link target")), None
        elif info.islnk():
            yield Member(name, 0, "link", safe_name(info.linkname, what="link target")), None
        else:
            yield Member(name, 0, "other"), None
    return count
