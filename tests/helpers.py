"""Assertions shared by the tests: what a user would check after an import."""

from __future__ import annotations

import tarfile
from pathlib import Path

from agent.archive import layout
from agent.containerd import Containerd
from agent.containerd.client import LEASE_PREFIX
from agent.importer import GC_SNAPSHOT, PINNED_LABEL
from agent.testing.processes import DaemonProcess, Record


def cri_by_tag(client: Containerd) -> dict[str, str]:
    """repo tag -> image id (config digest), as ``crictl images`` shows them."""
    return {tag: img.id for img in client.cri_images() for tag in img.repo_tags}


def assert_no_leases(client: Containerd) -> None:
    left = [lease for lease in client.leases() if lease.startswith(LEASE_PREFIX)]
    assert left == [], f"leases left behind: {left}"


def assert_nothing_imported(client: Containerd) -> None:
    assert client.list_images() == []
    assert client.cri_images() == []
    assert_no_leases(client)


def assert_unpacked(client: Containerd, config_digest: str, snapshotter: str = "overlayfs") -> None:
    """The image's top snapshot exists and its config points at it (so GC keeps it)."""
    config = layout.parse_config(client.read_blob(config_digest, layout.MAX_JSON), "config")
    top = layout.chain_ids(config.diff_ids)[-1]
    assert client.snapshot_exists(snapshotter, top), f"snapshot {top} missing"
    info = client.blob_info(config_digest)
    assert info is not None
    assert info.labels.get(f"{GC_SNAPSHOT}.{snapshotter}") == top


def assert_pinned(client: Containerd, name: str) -> None:
    record = client.get_image(name)
    assert record is not None, f"no image record {name}"
    assert record.labels.get(PINNED_LABEL) == "pinned"


def record(d: DaemonProcess, path: Path) -> Record:
    """The daemon's record of ``path``; fails the test if it has none."""
    rec = d.record(path)
    assert rec is not None, f"the daemon has no record of {path}"
    return rec


def read_member(tar: tarfile.TarFile, member: str | tarfile.TarInfo) -> bytes:
    """The content of one regular file in ``tar``; fails the test on anything else."""
    f = tar.extractfile(member)
    assert f is not None, f"{member} is not a regular file"
    with f:
        return f.read()
