"""What an import is asked to do, what it reports, and what it plans on the way."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.archive.layout import Descriptor, ImageConfig, Manifest
from agent.image.platforms import Platform

CRI_NAMESPACE = "k8s.io"  # the namespace the CRI, and so the kubelet, reads
# The contents list written into bundles by ``image-agent bundle``.
BUNDLE_CONTENTS = "image-agent-bundle.json"


def cores() -> int:
    """The cores this process may run on: the default count of layers unpacked at once."""
    return len(os.sched_getaffinity(0)) or 1


@dataclass(frozen=True)
class ImportOptions:
    snapshotter: str = "overlayfs"
    unpack: bool = True
    # None imports every platform present.
    platforms: tuple[Platform, ...] | None = None
    pin: bool = True
    # Repository for OCI entries named only by a bare tag (ctr's --base-name).
    base_name: str = ""
    # Seconds to wait for the CRI to list what was imported (0: don't wait).
    cri_wait_s: float = 10.0
    # Layers applied at once (independent chains in parallel); 1 unpacks
    # image after image, bottom layer first.
    unpack_concurrency: int = field(default_factory=cores)


@dataclass(frozen=True)
class Progress:
    file: str
    done: int
    total: int
    elapsed_s: float


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class ImportedImage:
    name: str
    digest: str
    config: str
    platforms: tuple[str, ...]
    unpacked: bool
    action: str


@dataclass
class ImportResult:
    file: str
    images: list[ImportedImage] = field(default_factory=list)
    unnamed: list[str] = field(default_factory=list)
    absent_platforms: list[str] = field(default_factory=list)
    # Imported for this node, yet not listed by the CRI within ImportOptions.cri_wait_s.
    not_in_cri: list[str] = field(default_factory=list)
    bytes_read: int = 0
    blobs_written: int = 0
    blobs_present: int = 0
    duration_s: float = 0.0


@dataclass(frozen=True)
class Selected:
    """One platform image of an archive entry, ready to label and unpack."""

    manifest: Descriptor
    doc: Manifest
    config: ImageConfig


@dataclass
class ImagePlan:
    """One archive entry (a name, or no name) with what it resolved to."""

    names: list[str]
    target: Descriptor
    selected: list[Selected]
    # (blob digest, labels) to set before the record exists: the GC references
    # from indexes and manifests, and each layer's uncompressed digest.
    labels: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def contents(self) -> list[str]:
        """Every blob the image's record keeps: indexes, manifests, configs, layers."""
        digests = [self.target.digest, *(d for d, _ in self.labels)]
        for sel in self.selected:
            digests.append(sel.manifest.digest)
            digests.append(sel.doc.config.digest)
            digests.extend(layer.digest for layer in sel.doc.layers)
        return list(dict.fromkeys(d for d in digests if d))


@dataclass
class Resolution:
    """What the archive's documents resolve to, before anything is labelled or recorded."""

    images: list[ImagePlan]
    unnamed: list[str] = field(default_factory=list)
    absent_platforms: list[str] = field(default_factory=list)
    # Manifests made for docker archives (which carry none): digest -> bytes,
    # to be written to the content store before they are labelled.
    synthesized: dict[str, bytes] = field(default_factory=dict)
