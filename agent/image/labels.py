"""Label and annotation names the agent reads and writes on containerd objects.

One place for every name, so that the importer, the puller, the daemon and
the tests agree on them.
"""

from __future__ import annotations

from agent.image import refs

# The CRI (1.29+ kubelets) keeps images with this label out of image GC.
PINNED_LABEL = "io.cri-containerd.pinned"
PINNED_VALUE = "pinned"
# The CRI marks the image records it manages (and lists) with this label.
MANAGED_LABEL = "io.cri-containerd.image"
MANAGED_VALUE = "managed"

# Garbage-collection references from one object to another.
GC_CONTENT = "containerd.io/gc.ref.content"
GC_SNAPSHOT = "containerd.io/gc.ref.snapshot"
# A lease with this label (RFC 3339 time) is collected by containerd after it.
GC_EXPIRE = "containerd.io/gc.expire"

# On a layer blob: the digest of its uncompressed tar (the diff ID).
UNCOMPRESSED_LABEL = "containerd.io/uncompressed"

# On content pulled from (or, for imports, named after) a registry:
# ``containerd.io/distribution.source.<host>=<repository>[,<repository>...]``.
DISTRIBUTION_SOURCE_PREFIX = "containerd.io/distribution.source."

# containerd refuses a label whose key and value together are longer (bytes).
LABEL_MAX = 4096

# Leases and content-write refs the agent creates start with this.
LEASE_PREFIX = "image-agent-"


def distribution_source(name: str) -> tuple[str, str] | None:
    """The (label key, repository) a registry pull of ``name`` would record, if any.

    The key names the registry's host without its port, as containerd's
    pull does: ``registry.example:5000/team/app:1`` gives
    (``containerd.io/distribution.source.registry.example``, ``team/app``).
    """
    try:
        ref = refs.parse(name)
    except refs.InvalidReference:
        return None
    return DISTRIBUTION_SOURCE_PREFIX + _hostname(ref.domain), ref.path


def _hostname(domain: str) -> str:
    """``domain`` without its port (and without the brackets of an IPv6 address)."""
    if domain.startswith("["):
        return domain[1 : domain.find("]")]
    host, colon, port = domain.rpartition(":")
    return host if colon and port.isdigit() else domain


def merge_sources(existing: str, *repositories: str, key: str = "") -> str:
    """``existing`` (a comma-separated list) with ``repositories`` added, sorted, no duplicates.

    containerd refuses a label whose key and value together exceed
    :data:`LABEL_MAX` bytes, and a base layer shared by many repositories
    would get there. The value is kept within that limit (for the label
    ``key``): ``repositories`` first, then as many of ``existing`` as still
    fit, in sorted order; the rest are left out. The label only helps a
    mirror find the content, so a shorter list is better than a failed import.
    """
    new = sorted({r for r in repositories if r})
    old = sorted({r for r in existing.split(",") if r} - set(new))
    budget = LABEL_MAX - len(key.encode())
    kept: list[str] = []
    used = -1  # no comma before the first
    for repo in (*new, *old):
        cost = len(repo.encode()) + 1
        if used + cost <= budget:
            kept.append(repo)
            used += cost
    return ",".join(sorted(kept))
