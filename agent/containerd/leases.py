"""containerd's Leases service: what holds new content and snapshots until records exist."""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid

from agent._proto.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from agent.containerd.rpc import Rpc
from agent.errors import NotFound
from agent.image.labels import GC_EXPIRE, LEASE_PREFIX


class LeaseService:
    def __init__(self, rpc: Rpc) -> None:
        self._rpc = rpc
        self._stub = leases_pb2_grpc.LeasesStub(rpc.channel)

    def create_lease(
        self, expire_after_s: float = 3600.0, labels: dict[str, str] | None = None
    ) -> str:
        """A lease that holds new content and snapshots; expires by itself as a safety net."""
        lease_id = f"{LEASE_PREFIX}{uuid.uuid4().hex[:16]}"
        expire = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expire_after_s)
        labels = {**(labels or {}), GC_EXPIRE: expire.strftime("%Y-%m-%dT%H:%M:%SZ")}
        self._rpc.call(
            self._stub.Create,
            leases_pb2.CreateRequest(id=lease_id, labels=labels),
            "create lease",
        )
        return lease_id

    def delete_lease(self, lease_id: str, *, sync: bool = True) -> None:
        """Release a lease and let containerd collect what nothing else references.

        With ``sync`` (the default) this waits, up to the client's deadline,
        until content that only the lease held is gone; without, containerd
        collects it in the background. The wait is never unbounded: a wedged
        containerd gives ContainerdUnavailable at the deadline, and the lease
        itself is removed before containerd starts collecting.
        """
        with contextlib.suppress(NotFound):
            self._rpc.call(
                self._stub.Delete,
                leases_pb2.DeleteRequest(id=lease_id, sync=sync),
                "delete lease",
            )

    def leases(self) -> list[str]:
        return list(self.lease_labels())

    def lease_labels(self) -> dict[str, dict[str, str]]:
        """Every lease in the namespace with its labels."""
        resp = self._rpc.call(self._stub.List, leases_pb2.ListRequest(), "list leases")
        return {lease.id: dict(lease.labels) for lease in resp.leases}
