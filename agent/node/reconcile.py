"""Reconcile: compare the archive records with what containerd holds.

Run by the archives duty at start and when containerd comes back: archives
whose images went missing are imported again, lost pins are restored, and
leases an earlier daemon left behind (kill -9 mid-import) are released.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import structlog

from agent.errors import AgentError, ContainerdUnavailable
from agent.importer import PINNED_LABEL
from agent.node import files, plan
from agent.node.state import Record, State

OWNER_LABEL = "image-agent/owner"
OWNER = "daemon"


class Image(Protocol):
    @property
    def labels(self) -> Mapping[str, str]: ...


class Images(Protocol):
    """What reconciling needs of :class:`agent.containerd.Containerd`."""

    def get_image(self, name: str) -> Image | None: ...

    def label_image(self, name: str, labels: dict[str, str]) -> None: ...

    def lease_labels(self) -> dict[str, dict[str, str]]: ...

    def delete_lease(self, lease_id: str) -> None: ...


def release_leases(client: Images) -> list[str]:
    """Release every lease the daemon owns; the caller makes sure none is in use."""
    released = []
    for lease_id, labels in client.lease_labels().items():
        if labels.get(OWNER_LABEL) == OWNER:
            client.delete_lease(lease_id)
            released.append(lease_id)
    return released


def check(
    records: Mapping[str, Record],
    client: Images,
    pin: bool,
    log: structlog.typing.FilteringBoundLogger,
) -> list[Record]:
    """Imported archives that must be imported again (changed content, images gone).

    Re-pins images that lost their pin on the way. Raises ContainerdUnavailable
    if containerd cannot be asked.
    """
    out = []
    for path, rec in list(records.items()):
        if rec.state is not State.IMPORTED:
            continue
        try:
            changed = plan.content_changed(rec, files.fingerprint(Path(path)))
        except OSError:
            continue
        if changed.state is State.PENDING:
            out.append(changed)
            continue
        missing = []
        try:
            for name in rec.images:
                image = client.get_image(name)
                if image is None:
                    missing.append(name)
                elif pin and image.labels.get(PINNED_LABEL) != "pinned":
                    client.label_image(name, {PINNED_LABEL: "pinned"})
                    log.info("image.repinned", file=path, image=name)
        except ContainerdUnavailable:
            raise
        except AgentError as err:
            log.warning("reconcile.failed", file=path, error=str(err))
            continue
        if missing:
            log.info("image.missing", file=path, image=missing)
            out.append(replace(rec, state=State.PENDING, reason="images missing"))
    return out
