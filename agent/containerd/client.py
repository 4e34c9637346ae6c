"""containerd and its CRI over one gRPC channel on containerd's socket.

:class:`Containerd` is a thin facade over one client per service (content,
images, leases, snapshots and diff, CRI), which share one
:class:`~agent.containerd.rpc.Rpc`: the channel, the namespace, the default
deadline, and the one place gRPC errors become the agent's own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Self

from google.protobuf import empty_pb2

from agent._proto.containerd.services.version.v1 import version_pb2_grpc
from agent._proto.containerd.types import mount_pb2
from agent.containerd.content import Blob, ContentService, ContentStore
from agent.containerd.cri import CriImage, CriService
from agent.containerd.images import ImageRecord, ImageService, Put
from agent.containerd.leases import LeaseService
from agent.containerd.rpc import MAX_MESSAGE, Rpc, translate
from agent.containerd.snapshots import SnapshotService
from agent.errors import Cancelled
from agent.image.labels import LEASE_PREFIX

K3S_SOCKET = "/run/k3s/containerd/containerd.sock"
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"


def default_address() -> str:
    """The k3s socket when it exists, else containerd's own.

    A socket we may not look at (a non-root user, a 0700 directory) counts
    as absent: the caller then gets containerd's own address and, if that
    fails too, a one-line error from the connection, not a traceback.
    """
    try:
        present = Path(K3S_SOCKET).exists()
    except OSError:
        present = False
    return K3S_SOCKET if present else CONTAINERD_SOCKET


class Containerd:
    """A client for one containerd socket and namespace."""

    def __init__(self, address: str, namespace: str = "k8s.io", *, timeout: float = 30.0) -> None:
        self._rpc = Rpc(address, namespace, timeout)
        self._content = ContentService(self._rpc)
        self._images = ImageService(self._rpc)
        self._leases = LeaseService(self._rpc)
        self._snapshots = SnapshotService(self._rpc)
        self._cri = CriService(self._rpc)
        self._version = version_pb2_grpc.VersionStub(self._rpc.channel)

    @property
    def address(self) -> str:
        return self._rpc.address

    @property
    def namespace(self) -> str:
        return self._rpc.namespace

    @property
    def timeout(self) -> float:
        return self._rpc.timeout

    def close(self) -> None:
        self._rpc.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def version(self) -> str:
        resp = self._rpc.call(self._version.Version, empty_pb2.Empty(), "version", timeout=5.0)
        return str(resp.version)

    # -- leases -----------------------------------------------------------

    def create_lease(
        self, expire_after_s: float = 3600.0, labels: dict[str, str] | None = None
    ) -> str:
        return self._leases.create_lease(expire_after_s, labels)

    def delete_lease(self, lease_id: str, *, sync: bool = True) -> None:
        self._leases.delete_lease(lease_id, sync=sync)

    def leases(self) -> list[str]:
        return self._leases.leases()

    def lease_labels(self) -> dict[str, dict[str, str]]:
        return self._leases.lease_labels()

    # -- content ----------------------------------------------------------

    def blob_info(self, digest: str) -> Blob | None:
        return self._content.blob_info(digest)

    def label_blob(self, digest: str, labels: dict[str, str]) -> None:
        self._content.label_blob(digest, labels)

    def read_blob(self, digest: str, limit: int) -> bytes:
        return self._content.read_blob(digest, limit)

    def write_blob(
        self,
        chunks: Iterable[bytes],
        *,
        lease: str,
        total: int,
        expected: str = "",
        labels: dict[str, str] | None = None,
    ) -> str:
        return self._content.write_blob(
            chunks, lease=lease, total=total, expected=expected, labels=labels
        )

    # -- snapshots and diff -------------------------------------------------

    def snapshot_exists(self, snapshotter: str, key: str) -> bool:
        return self._snapshots.snapshot_exists(snapshotter, key)

    def prepare(
        self, snapshotter: str, key: str, parent: str, *, lease: str
    ) -> list[mount_pb2.Mount]:
        return self._snapshots.prepare(snapshotter, key, parent, lease=lease)

    def commit(self, snapshotter: str, name: str, key: str, *, lease: str) -> None:
        self._snapshots.commit(snapshotter, name, key, lease=lease)

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        self._snapshots.remove_snapshot(snapshotter, key)

    def apply(
        self,
        media_type: str,
        digest: str,
        size: int,
        mounts: list[mount_pb2.Mount],
        *,
        lease: str,
        stop: threading.Event | None = None,
    ) -> str:
        return self._snapshots.apply(media_type, digest, size, mounts, lease=lease, stop=stop)

    # -- images -------------------------------------------------------------

    def get_image(self, name: str) -> ImageRecord | None:
        return self._images.get_image(name)

    def list_images(self, *filters: str) -> list[ImageRecord]:
        return self._images.list_images(*filters)

    def put_image(
        self, name: str, media_type: str, digest: str, size: int, labels: dict[str, str]
    ) -> Put:
        return self._images.put_image(name, media_type, digest, size, labels)

    def label_image(self, name: str, labels: dict[str, str]) -> None:
        self._images.label_image(name, labels)

    def unlabel_image(self, name: str, *keys: str) -> None:
        self._images.unlabel_image(name, *keys)

    def delete_image(self, name: str) -> None:
        self._images.delete_image(name)

    # -- CRI ------------------------------------------------------------------

    def cri_images(self) -> list[CriImage]:
        return self._cri.cri_images()

    def cri_image_status(self, ref: str) -> CriImage | None:
        return self._cri.cri_image_status(ref)

    def cri_wait(
        self, expect: dict[str, str], timeout: float, *, stop: threading.Event | None = None
    ) -> list[str]:
        return self._cri.cri_wait(expect, timeout, stop=stop)

    def cri_pull(
        self,
        ref: str,
        *,
        username: str = "",
        password: str = "",
        server: str = "",
        identity_token: str = "",
        timeout: float | None = None,
    ) -> str:
        return self._cri.cri_pull(
            ref,
            username=username,
            password=password,
            server=server,
            identity_token=identity_token,
            timeout=timeout,
        )


__all__ = [
    "LEASE_PREFIX",
    "MAX_MESSAGE",
    "Blob",
    "Cancelled",
    "Containerd",
    "ContentStore",
    "CriImage",
    "ImageRecord",
    "Put",
    "default_address",
    "translate",
]
