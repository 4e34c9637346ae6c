"""Facts about files in the images directory: kind, platform, identity, writers, size.

Small functions over paths and bytes; the daemon loop calls them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import struct
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO

import zstandard

from agent.archive.compression import Compression, detect
from agent.image.platforms import Platform

ARCHIVE_SUFFIXES = (
    ".tar",
    ".tar.gz",
    ".tgz",
    ".tar.zst",
    ".tzst",
    ".tar.bz2",
    ".tbz",
    ".tar.lz4",
)
PULL_LIST_SUFFIX = ".txt"
FINGERPRINT_SAMPLE = 1 << 20
_GZIP_MIN_BYTES = 18  # a 10-byte header and an 8-byte trailer (CRC32, ISIZE)

_ARCHES = "amd64|arm64|arm|386|ppc64le|s390x|riscv64|x86_64|aarch64"
_PLATFORM_IN_NAME = re.compile(rf"(?:^|[-_.])(linux)[-_]({_ARCHES})(?:[-_](v\d))?(?=[-_.]|$)")


class Kind(StrEnum):
    ARCHIVE = "archive"
    PULL_LIST = "pull-list"
    IGNORED = "ignored"


def classify(path: Path, root: Path) -> Kind:
    """Archives and pull lists by extension; dotfiles (and dot-directories) are ignored."""
    rel = path.relative_to(root) if path.is_relative_to(root) else path
    if any(part.startswith(".") for part in rel.parts):
        return Kind.IGNORED
    name = path.name.lower()
    if name.endswith(ARCHIVE_SUFFIXES):
        return Kind.ARCHIVE
    if name.endswith(PULL_LIST_SUFFIX):
        return Kind.PULL_LIST
    return Kind.IGNORED


def platform_in_name(name: str) -> Platform | None:
    """``site-linux-arm64.tar.zst`` names linux/arm64; most names name none."""
    m = _PLATFORM_IN_NAME.search(name.lower())
    if not m:
        return None
    return Platform(m.group(1), m.group(2), m.group(3) or "").normalized()


@dataclass(frozen=True)
class Stat:
    size: int
    mtime_ns: int


def stat(path: Path) -> Stat | None:
    """Size and mtime of a regular file; None if it is gone or not a regular file.

    A FIFO, socket or device named like an archive is never an archive: opening
    a FIFO for reading blocks until a writer comes, possibly for ever.
    """
    try:
        st = path.stat()
    except OSError:
        return None
    if not S_ISREG(st.st_mode):
        return None
    return Stat(st.st_size, st.st_mtime_ns)


class NotRegular(OSError):
    """The path is not a regular file (FIFO, socket, device, directory)."""


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading without ever blocking (O_NONBLOCK, then checked)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        _require_regular(fd, path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _require_regular(fd: int, path: Path) -> None:
    if not S_ISREG(os.fstat(fd).st_mode):
        raise NotRegular(errno.EINVAL, "not a regular file", str(path))


def fingerprint(path: Path) -> str:
    """sha256 over the size and three 1 MiB samples (start, middle, end).

    Catches a same-size replacement (k3s #14284) without reading gigabytes.
    """
    h = hashlib.sha256()
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        for offset in sorted(
            {0, max(0, size // 2 - FINGERPRINT_SAMPLE // 2), max(0, size - FINGERPRINT_SAMPLE)}
        ):
            f.seek(offset)
            h.update(f.read(FINGERPRINT_SAMPLE))
    return "sha256:" + h.hexdigest()


def open_for_writing(path: Path, proc: Path = Path("/proc")) -> bool:
    """True if any process has ``path`` open for writing (a copy still under way).

    Only the text of each ``/proc/PID/fd/N`` link is read, never the file it
    names: a stat through the link would reach whatever file system that
    file is on, and a dead hard NFS mount blocks it for ever. A link whose
    text is our path is then checked against our inode via ``fdinfo``.
    """
    try:
        target = path.stat()
        text = os.path.realpath(path)
    except OSError:
        return False
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        fd_dir = pid_dir / "fd"
        try:
            fds = list(fd_dir.iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if str(fd.readlink()) != text:
                    continue
                flags, ino = _fd_info(pid_dir / "fdinfo" / fd.name)
            except (OSError, ValueError):
                continue
            if ino is not None and ino != target.st_ino:
                continue  # the name now belongs to another file
            if flags & 0o3 in (0o1, 0o2):
                return True
    return False


def _fd_info(fdinfo: Path) -> tuple[int, int | None]:
    """The open flags and (on kernels that show it) the inode of one ``fdinfo`` entry."""
    flags, ino = 0, None
    for line in fdinfo.read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "flags":
            flags = int(value.strip(), 8)
        elif key == "ino":
            ino = int(value.strip())
    return flags, ino


def uncompressed_size(path: Path) -> tuple[int, bool]:
    """The archive's uncompressed size and whether it is exact (else an estimate)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(18)
        kind = detect(head)
        if kind is Compression.NONE:
            return size, True
        if kind is Compression.ZSTD:
            try:
                n = zstandard.frame_content_size(head)
            except zstandard.ZstdError:
                n = -1
            if n > 0:
                return n, False  # first frame only; multi-frame archives have more
        if kind is Compression.GZIP and size >= _GZIP_MIN_BYTES:
            f.seek(-4, os.SEEK_END)
            (isize,) = struct.unpack("<I", f.read(4))
            # ISIZE is modulo 4 GiB; never trust it below the compressed size.
            if isize >= size:
                return isize, False
    return size * 3, False
