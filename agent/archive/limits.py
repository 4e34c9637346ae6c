"""Bounds on what one archive may ask of the agent: time, memory and counts.

Archives come from USB sticks and other machines: untrusted input. Every
parser of :mod:`agent.archive` reads its bounds from :func:`current`, so that
one setting (``--memory-budget`` / ``IMAGE_AGENT_MEMORY_BUDGET``) applies to
``import``, ``verify`` and the daemon alike. The process sets them once at
start with :func:`configure`; the defaults fit the DaemonSet's 256 MiB
memory limit.
"""

from __future__ import annotations

import dataclasses
import threading

from agent.errors import ArchiveError, UsageError

MiB = 1 << 20

# What the agent needs besides the zstd window: the interpreter and gRPC
# (about 45 MiB resident), the 16 MiB metadata cache, 4 MiB metadata
# documents, 1 MiB read buffers in the decompressor and tarfile, and slack.
RESERVED = 96 * MiB

# zstd's smallest window is 1 KiB; a budget that leaves less than this for
# it is a mistake, not a choice.
MIN_WINDOW = 8 * MiB

DEFAULT_MEMORY_BUDGET = 224 * MiB

# Index entries allowed per image when max_index_entries is derived (0).
INDEX_ENTRIES_PER_IMAGE = 32


@dataclasses.dataclass(frozen=True)
class Limits:
    # Total memory the agent plans for, in bytes. What is left after RESERVED
    # is the largest zstd window accepted (rounded down to a power of two).
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    # Tar headers of any kind (members, pax and GNU long-name headers) in
    # one archive. A bundle of 500 images of 20 layers has about 11,000.
    max_members: int = 100_000
    # One pax ('x', 'g') or GNU long-name ('L', 'K') header's data. Real ones
    # hold a path (at most 4 KiB) and a few numbers; 64 KiB leaves room for xattrs.
    max_extended_header: int = 64 << 10
    # All extended headers of one archive together: parsing them costs up to
    # 0.2 s per MiB on the standard tarfile, so this bounds the time they take.
    max_extended_total: int = 32 * MiB
    # Nesting of arrays and objects in one metadata document.
    max_json_depth: int = 64
    # Images in one manifest.json, or manifests in one index.
    max_manifests: int = 1000
    # Layers of one image. overlayfs stacks at most 500 lower directories
    # (the kernel's OVL_MAX_STACK): an image with more could never run.
    max_layers: int = 500
    # Index entries read while resolving one archive, counting an index each
    # time it is reached. Without it, indexes that all point at the same next
    # index multiply: 1,000 x 1,000 x 1,000 entries from three small blobs.
    # 0 means INDEX_ENTRIES_PER_IMAGE for each of max_manifests images, plus
    # the top index: bundles keep every image's registry index whole, about
    # 16 entries of platforms and attestations for an official image. Each
    # entry followed costs a manifest and a config parsed: at the default
    # (33,000) a hostile archive is refused after some seconds, not hours.
    max_index_entries: int = 0
    # Layer entries read for one archive, counted per manifest reached (so
    # the same way): 500 images x 10 platforms x 10 layers need 50,000.
    max_layer_entries: int = 100_000

    @property
    def index_entry_limit(self) -> int:
        """max_index_entries, or the bound derived from max_manifests when it is 0."""
        if self.max_index_entries:
            return self.max_index_entries
        return self.max_manifests * (1 + INDEX_ENTRIES_PER_IMAGE)

    @property
    def zstd_window(self) -> int:
        """The largest zstd window accepted: a power of two within the budget's share."""
        room = self.memory_budget - RESERVED
        window = MIN_WINDOW
        while window * 2 <= room:
            window *= 2
        return window

    def check(self) -> None:
        """Raise UsageError for settings that cannot work."""
        if self.memory_budget < RESERVED + MIN_WINDOW:
            raise UsageError(
                f"--memory-budget {self.memory_budget >> 20} MiB is below the "
                f"{(RESERVED + MIN_WINDOW) >> 20} MiB the agent needs"
            )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value < 0 or (value == 0 and f.name != "max_index_entries"):
                raise UsageError(f"archive limit {f.name} must be positive")


_current = Limits()
_archive = threading.local()


def current() -> Limits:
    """The limits in force."""
    return _current


def configure(limits: Limits) -> Limits:
    """Put ``limits`` in force (checked); return the previous ones."""
    global _current
    limits.check()
    previous, _current = _current, limits
    return previous


def begin_archive() -> None:
    """Start the per-archive counts of this thread (the tar walk calls it for each archive)."""
    _archive.counts = {}


def counted() -> dict[str, int]:
    """The counts of this thread's current archive so far (empty before any archive)."""
    return dict(getattr(_archive, "counts", None) or {})


def count_index_entries(n: int, what: str) -> None:
    """Add ``n`` index entries read for the current archive; ArchiveError past the limit."""
    _count("index", n, _current.index_entry_limit, what, "--max-index-entries")


def count_layer_entries(n: int, what: str) -> None:
    """Add ``n`` layer entries read for the current archive; ArchiveError past the limit."""
    _count("layer", n, _current.max_layer_entries, what, "--max-layer-entries")


def _count(kind: str, n: int, bound: int, what: str, flag: str) -> None:
    counts: dict[str, int] | None = getattr(_archive, "counts", None)
    if counts is None:
        # A document read outside any archive (one from containerd, say) is
        # bounded on its own: kept, its count would grow for the life of the
        # thread and in the end refuse every document.
        counts = {}
    counts[kind] = total = counts.get(kind, 0) + n
    if total > bound:
        raise ArchiveError(
            f"{what}: the archive lists more than {bound} {kind} entries in all, "
            f"counting each time a document is reached (limit {flag})"
        )


def human(n: int) -> str:
    """``2 GiB``, ``128 MiB``, ``4096 bytes``: sizes in error messages."""
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"
