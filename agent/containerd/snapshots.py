"""containerd's Snapshots and Diff services: unpacking layers into a snapshotter."""

from __future__ import annotations

import contextlib
import threading
from typing import Protocol

import grpc

from agent._proto.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from agent._proto.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from agent._proto.containerd.types import descriptor_pb2, mount_pb2
from agent.containerd.rpc import Rpc
from agent.errors import Cancelled, NotFound

# How often a running Apply looks at its stop event.
STOP_POLL_S = 0.2


class SnapshotStore(Protocol):
    """Snapshots and the diff applier: what unpacking a layer needs."""

    def snapshot_exists(self, snapshotter: str, key: str) -> bool: ...

    def prepare(
        self, snapshotter: str, key: str, parent: str, *, lease: str
    ) -> list[mount_pb2.Mount]: ...

    def commit(self, snapshotter: str, name: str, key: str, *, lease: str) -> None: ...

    def remove_snapshot(self, snapshotter: str, key: str) -> None: ...

    def apply(
        self,
        media_type: str,
        digest: str,
        size: int,
        mounts: list[mount_pb2.Mount],
        *,
        lease: str,
        stop: threading.Event | None = None,
    ) -> str: ...


class SnapshotService:
    def __init__(self, rpc: Rpc) -> None:
        self._rpc = rpc
        self._snapshots = snapshots_pb2_grpc.SnapshotsStub(rpc.channel)
        self._diff = diff_pb2_grpc.DiffStub(rpc.channel)

    def snapshot_exists(self, snapshotter: str, key: str) -> bool:
        try:
            self._rpc.call(
                self._snapshots.Stat,
                snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key),
                f"stat snapshot {key}",
            )
        except NotFound:
            return False
        return True

    def prepare(
        self, snapshotter: str, key: str, parent: str, *, lease: str
    ) -> list[mount_pb2.Mount]:
        resp = self._rpc.call(
            self._snapshots.Prepare,
            snapshots_pb2.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent),
            f"prepare snapshot {key}",
            lease=lease,
        )
        return list(resp.mounts)

    def commit(self, snapshotter: str, name: str, key: str, *, lease: str) -> None:
        self._rpc.call(
            self._snapshots.Commit,
            snapshots_pb2.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key),
            f"commit snapshot {name}",
            lease=lease,
        )

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        with contextlib.suppress(NotFound):
            self._rpc.call(
                self._snapshots.Remove,
                snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key),
                f"remove snapshot {key}",
            )

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
        """Unpack a layer blob onto ``mounts``; returns the digest of the uncompressed tar.

        No deadline (a layer can take minutes), but ``stop`` cancels the call.
        """
        what = f"apply layer {digest}"
        request = diff_pb2.ApplyRequest(
            diff=descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=size),
            mounts=mounts,
        )
        future = self._diff.Apply.future(request, metadata=self._rpc.metadata(lease))
        try:
            while True:
                try:
                    return str(future.result(timeout=STOP_POLL_S).applied.digest)
                except grpc.FutureTimeoutError:
                    if stop is not None and stop.is_set():
                        future.cancel()
                        raise Cancelled(f"{what}: cancelled") from None
        except grpc.RpcError as err:
            raise self._rpc.error(err, what) from None
