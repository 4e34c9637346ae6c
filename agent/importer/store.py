"""The parts of containerd an import uses, as protocols.

:class:`agent.containerd.Containerd` satisfies all of them; ``verify``'s
in-memory store satisfies :class:`ImportTarget`, which is all an import
that neither unpacks nor waits for the CRI needs.
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

from agent.containerd.content import ContentStore
from agent.containerd.images import ImageRecord, Put


class ImportTarget(ContentStore, Protocol):
    """Content, leases and image records: enough to import without unpacking."""

    def create_lease(
        self, expire_after_s: float = 3600.0, labels: dict[str, str] | None = None
    ) -> str: ...

    def delete_lease(self, lease_id: str, *, sync: bool = True) -> None: ...

    def get_image(self, name: str) -> ImageRecord | None: ...

    def put_image(
        self, name: str, media_type: str, digest: str, size: int, labels: dict[str, str]
    ) -> Put: ...

    def delete_image(self, name: str) -> None: ...


@runtime_checkable
class CriView(Protocol):
    """A store whose images the CRI serves (containerd with its CRI plugin)."""

    @property
    def namespace(self) -> str: ...

    def cri_wait(
        self, expect: dict[str, str], timeout: float, *, stop: threading.Event | None = None
    ) -> list[str]: ...
