"""Label and annotation names the agent reads and writes on containerd objects.

One place for every name, so that the importer, the puller, the daemon and
the tests agree on them.
"""

from __future__ import annotations

from agent import refs

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


def merge_sources(existing: str, *repositories: str) -> str:
    """``existing`` (a comma-separated list) with ``repositories`` added, sorted, no duplicates."""
    repos = {r for r in existing.split(",") if r}
    repos.update(r for r in repositories if r)
    return ",".join(sorted(repos))
