"""containerd and CRI over one gRPC channel on containerd's socket.

Every call goes through :meth:`Containerd._call`, which adds the namespace and
lease metadata and turns :class:`grpc.RpcError` into the agent's own errors.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import empty_pb2, field_mask_pb2

from agent._proto.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from agent._proto.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from agent._proto.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from agent._proto.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from agent._proto.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from agent._proto.containerd.services.version.v1 import version_pb2_grpc
from agent._proto.containerd.types import descriptor_pb2, mount_pb2
from agent._proto.cri.runtime.v1 import api_pb2, api_pb2_grpc
from agent.errors import (
    AlreadyExists,
    Cancelled,
    ContainerdError,
    ContainerdUnavailable,
    NotFound,
)

K3S_SOCKET = "/run/k3s/containerd/containerd.sock"
CONTAINERD_SOCKET = "/run/containerd/containerd.sock"

# containerd 1.6/1.7 refuse messages over 16 MiB.
MAX_MESSAGE = 16 << 20
# Requests in flight on a content write before we wait for containerd.
WRITE_WINDOW = 4
LEASE_EXPIRE_LABEL = "containerd.io/gc.expire"
LEASE_PREFIX = "image-agent-"
# Read-modify-write rounds before giving up on an image record that keeps changing.
_UPDATE_ATTEMPTS = 5

_UNAVAILABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def default_address() -> str:
    """The k3s socket when it exists, else containerd's own."""
    return K3S_SOCKET if os.path.exists(K3S_SOCKET) else CONTAINERD_SOCKET


def translate(err: grpc.RpcError, what: str, address: str) -> ContainerdError:
    """The agent error for a failed gRPC call (the one place codes are interpreted)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else "") or code.name.lower()
    if code in _UNAVAILABLE:
        return ContainerdUnavailable(
            f"containerd at {address} is not reachable ({what}: {details})", code=code.name
        )
    if code is grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what}: {details}", code=code.name)
    if code is grpc.StatusCode.ALREADY_EXISTS:
        return AlreadyExists(f"{what}: {details}", code=code.name)
    if code is grpc.StatusCode.CANCELLED:
        return ContainerdUnavailable(f"{what}: cancelled", code=code.name)
    return ContainerdError(f"{what}: {details}", code=code.name)


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    labels: dict[str, str]


@dataclass(frozen=True)
class ImageRecord:
    name: str
    target: descriptor_pb2.Descriptor
    labels: dict[str, str]


@dataclass(frozen=True)
class CriImage:
    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int
    pinned: bool


class Containerd:
    """A client for one containerd socket and namespace."""

    def __init__(self, address: str, namespace: str = "k8s.io", *, timeout: float = 30.0) -> None:
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        target = address if "://" in address else f"unix://{address}"
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        self._content = content_pb2_grpc.ContentStub(self._channel)
        self._images = images_pb2_grpc.ImagesStub(self._channel)
        self._leases = leases_pb2_grpc.LeasesStub(self._channel)
        self._snapshots = snapshots_pb2_grpc.SnapshotsStub(self._channel)
        self._diff = diff_pb2_grpc.DiffStub(self._channel)
        self._version = version_pb2_grpc.VersionStub(self._channel)
        self._cri = api_pb2_grpc.ImageServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Containerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------

    def _metadata(self, lease: str | None, namespaced: bool = True) -> list[tuple[str, str]]:
        md = [("containerd-namespace", self.namespace)] if namespaced else []
        if lease:
            md.append(("containerd-lease", lease))
        return md

    def _call(
        self,
        method: Callable[..., Any],
        request: Any,
        what: str,
        *,
        lease: str | None = None,
        timeout: float | None = -1.0,
        namespaced: bool = True,
    ) -> Any:
        try:
            return method(
                request,
                metadata=self._metadata(lease, namespaced),
                timeout=self.timeout if timeout == -1.0 else timeout,
            )
        except grpc.RpcError as err:
            raise translate(err, what, self.address) from None

    # -- version ----------------------------------------------------------

    def version(self) -> str:
        resp = self._call(self._version.Version, empty_pb2.Empty(), "version", timeout=5.0)
        return str(resp.version)

    # -- leases -----------------------------------------------------------

    def create_lease(
        self, expire_after_s: float = 3600.0, labels: dict[str, str] | None = None
    ) -> str:
        """A lease that holds new content and snapshots; expires by itself as a safety net."""
        lease_id = f"{LEASE_PREFIX}{uuid.uuid4().hex[:16]}"
        expire = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=expire_after_s)
        labels = {**(labels or {}), LEASE_EXPIRE_LABEL: expire.strftime("%Y-%m-%dT%H:%M:%SZ")}
        self._call(
            self._leases.Create,
            leases_pb2.CreateRequest(id=lease_id, labels=labels),
            "create lease",
        )
        return lease_id

    def delete_lease(self, lease_id: str) -> None:
        """Release a lease and let containerd collect what nothing else references.

        Synchronous: when this returns, content that only the lease held is gone.
        """
        with contextlib.suppress(NotFound):
            self._call(
                self._leases.Delete,
                leases_pb2.DeleteRequest(id=lease_id, sync=True),
                "delete lease",
                timeout=None,
            )

    def leases(self) -> list[str]:
        return list(self.lease_labels())

    def lease_labels(self) -> dict[str, dict[str, str]]:
        """Every lease in the namespace with its labels."""
        resp = self._call(self._leases.List, leases_pb2.ListRequest(), "list leases")
        return {lease.id: dict(lease.labels) for lease in resp.leases}

    # -- content ----------------------------------------------------------

    def blob_info(self, digest: str) -> Blob | None:
        try:
            resp = self._call(
                self._content.Info, content_pb2.InfoRequest(digest=digest), f"content {digest}"
            )
        except NotFound:
            return None
        return Blob(resp.info.digest, resp.info.size, dict(resp.info.labels))

    def label_blob(self, digest: str, labels: dict[str, str]) -> None:
        """Set (only) ``labels`` on a blob, leaving its other labels alone."""
        if not labels:
            return
        info = content_pb2.Info(digest=digest, labels=labels)
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        self._call(
            self._content.Update,
            content_pb2.UpdateRequest(info=info, update_mask=mask),
            f"label content {digest}",
        )

    def read_blob(self, digest: str, limit: int) -> bytes:
        """The whole blob, which must not be larger than ``limit`` bytes."""
        info = self.blob_info(digest)
        if info is None:
            raise NotFound(f"content {digest} not found", code="NOT_FOUND")
        if info.size > limit:
            raise ContainerdError(f"content {digest} is larger than {limit} bytes")
        parts = []
        try:
            for resp in self._content.Read(
                content_pb2.ReadContentRequest(digest=digest),
                metadata=self._metadata(None),
                timeout=self.timeout,
            ):
                parts.append(resp.data)
        except grpc.RpcError as err:
            raise translate(err, f"read content {digest}", self.address) from None
        return b"".join(parts)

    def write_blob(
        self,
        chunks: Iterable[bytes],
        *,
        lease: str,
        total: int,
        expected: str = "",
        labels: dict[str, str] | None = None,
    ) -> str:
        """Stream a blob into the content store and return its digest.

        Up to :data:`WRITE_WINDOW` chunks are in flight, so reading the archive
        overlaps containerd's writing. containerd checks ``total`` and, when
        given, ``expected`` at commit: a mismatch raises ContainerdError with
        code FAILED_PRECONDITION and nothing is stored. A blob that exists
        already is success.
        """
        ref = f"{LEASE_PREFIX}{uuid.uuid4().hex}"
        requests: queue.SimpleQueue[content_pb2.WriteContentRequest | None] = queue.SimpleQueue()

        def pump() -> Iterator[content_pb2.WriteContentRequest]:
            while (item := requests.get()) is not None:
                yield item

        what = f"write content {expected or ref}"
        responses = self._content.Write(pump(), metadata=self._metadata(lease))
        in_flight = 0
        offset = 0
        try:
            requests.put(
                content_pb2.WriteContentRequest(
                    action=content_pb2.STAT, ref=ref, total=total, expected=expected
                )
            )
            next(responses)
            for chunk in chunks:
                requests.put(
                    content_pb2.WriteContentRequest(
                        action=content_pb2.WRITE, offset=offset, data=chunk
                    )
                )
                offset += len(chunk)
                in_flight += 1
                if in_flight > WRITE_WINDOW:
                    next(responses)
                    in_flight -= 1
            requests.put(
                content_pb2.WriteContentRequest(
                    action=content_pb2.COMMIT,
                    offset=offset,
                    total=total,
                    expected=expected,
                    labels=labels or {},
                )
            )
            last = None
            for _ in range(in_flight + 1):
                last = next(responses)
            requests.put(None)
            assert last is not None
            return str(last.digest)
        except grpc.RpcError as err:
            error = translate(err, what, self.address)
            if isinstance(error, AlreadyExists) and expected:
                return expected
            raise error from None
        except BaseException:
            responses.cancel()
            raise
        finally:
            requests.put(None)

    # -- snapshots and diff -------------------------------------------------

    def snapshot_exists(self, snapshotter: str, key: str) -> bool:
        try:
            self._call(
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
        resp = self._call(
            self._snapshots.Prepare,
            snapshots_pb2.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent),
            f"prepare snapshot {key}",
            lease=lease,
        )
        return list(resp.mounts)

    def commit(self, snapshotter: str, name: str, key: str, *, lease: str) -> None:
        self._call(
            self._snapshots.Commit,
            snapshots_pb2.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key),
            f"commit snapshot {name}",
            lease=lease,
        )

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        with contextlib.suppress(NotFound):
            self._call(
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
        future = self._diff.Apply.future(request, metadata=self._metadata(lease))
        try:
            while True:
                try:
                    return str(future.result(timeout=0.2).applied.digest)
                except grpc.FutureTimeoutError:
                    if stop is not None and stop.is_set():
                        future.cancel()
                        raise Cancelled(f"{what}: cancelled") from None
        except grpc.RpcError as err:
            raise translate(err, what, self.address) from None

    # -- images -------------------------------------------------------------

    def get_image(self, name: str) -> ImageRecord | None:
        try:
            resp = self._call(
                self._images.Get, images_pb2.GetImageRequest(name=name), f"image {name}"
            )
        except NotFound:
            return None
        img = resp.image
        return ImageRecord(img.name, img.target, dict(img.labels))

    def list_images(self, *filters: str) -> list[ImageRecord]:
        resp = self._call(
            self._images.List, images_pb2.ListImagesRequest(filters=list(filters)), "list images"
        )
        return [ImageRecord(i.name, i.target, dict(i.labels)) for i in resp.images]

    def put_image(
        self, name: str, media_type: str, digest: str, size: int, labels: dict[str, str]
    ) -> str:
        """Create the image record, or move/relabel an existing one.

        Returns ``created``, ``updated`` or ``unchanged``. Labels other than
        ``labels`` (another tool's) are left as they are.
        """
        target = descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=size)
        for _ in range(_UPDATE_ATTEMPTS):
            existing = self.get_image(name)
            if existing is None:
                try:
                    self._call(
                        self._images.Create,
                        images_pb2.CreateImageRequest(
                            image=images_pb2.Image(name=name, target=target, labels=labels)
                        ),
                        f"create {name}",
                    )
                except AlreadyExists:
                    continue  # created in between: read it again
                return "created"
            if existing.target.digest == target.digest and all(
                existing.labels.get(k) == v for k, v in labels.items()
            ):
                return "unchanged"
            merged = {**existing.labels, **labels}
            paths = ["target", *(f"labels.{k}" for k in labels)]
            try:
                self._update_image(
                    images_pb2.Image(name=name, target=target, labels=merged), paths, name
                )
            except NotFound:
                continue  # deleted in between: create it
            return "updated"
        raise ContainerdError(f"update {name}: the record kept changing; try again")

    def label_image(self, name: str, labels: dict[str, str]) -> None:
        """Set ``labels`` on an existing image record, keeping its other labels.

        Raises NotFound when there is no such record.
        """
        self._relabel(name, set=labels, remove=())

    def unlabel_image(self, name: str, *keys: str) -> None:
        """Remove labels from an image record, if it exists."""
        with contextlib.suppress(NotFound):
            self._relabel(name, set={}, remove=keys)

    def _relabel(self, name: str, *, set: dict[str, str], remove: Iterable[str]) -> None:
        """Read the record, change only the named labels, write the whole record back.

        containerd 1.7 and 2.x convert the request's whole ``Image`` before
        looking at the field mask, and crash on one without a target, so a
        label change always carries the record as read. The mask names only
        the labels changed, so a concurrent move of the tag or another
        tool's labels are not overwritten; a record deleted in between is
        NotFound.
        """
        remove = tuple(remove)
        existing = self.get_image(name)
        if existing is None:
            raise NotFound(f"image {name} not found", code="NOT_FOUND")
        labels = {k: v for k, v in existing.labels.items() if k not in remove}
        labels.update(set)
        paths = [f"labels.{k}" for k in (*set, *remove)]
        if not paths:
            return
        image = images_pb2.Image(name=name, target=existing.target, labels=labels)
        self._update_image(image, paths, name)

    def _update_image(self, image: images_pb2.Image, paths: list[str], name: str) -> None:
        if not image.HasField("target") or not image.target.digest:
            # Never send containerd a partial record (see _relabel).
            raise ContainerdError(f"update {name}: refusing to send an image without a target")
        self._call(
            self._images.Update,
            images_pb2.UpdateImageRequest(
                image=image, update_mask=field_mask_pb2.FieldMask(paths=paths)
            ),
            f"update {name}",
        )

    def delete_image(self, name: str) -> None:
        with contextlib.suppress(NotFound):
            self._call(
                self._images.Delete, images_pb2.DeleteImageRequest(name=name), f"delete {name}"
            )

    # -- CRI ------------------------------------------------------------------

    def cri_images(self) -> list[CriImage]:
        resp = self._call(
            self._cri.ListImages, api_pb2.ListImagesRequest(), "CRI ListImages", namespaced=False
        )
        return [
            CriImage(i.id, tuple(i.repo_tags), tuple(i.repo_digests), int(i.size), bool(i.pinned))
            for i in resp.images
        ]

    def cri_image_status(self, ref: str) -> CriImage | None:
        resp = self._call(
            self._cri.ImageStatus,
            api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref)),
            f"CRI ImageStatus {ref}",
            namespaced=False,
        )
        if not resp.HasField("image"):
            return None
        i = resp.image
        return CriImage(i.id, tuple(i.repo_tags), tuple(i.repo_digests), int(i.size), i.pinned)

    def cri_wait(self, expect: dict[str, str], timeout: float) -> list[str]:
        """Wait until the CRI lists each name at its manifest digest; the names it still doesn't.

        containerd's CRI keeps its own image cache, fed by image events, so a
        record just written can take a moment to reach ``crictl images`` and
        the kubelet. Nothing to wait for where the CRI is not served.
        """
        deadline = time.monotonic() + timeout
        pending = dict(expect)
        pause = 0.01
        while pending:
            for name, digest in list(pending.items()):
                try:
                    image = self.cri_image_status(name)
                except ContainerdError as err:
                    return [] if err.code == "UNIMPLEMENTED" else sorted(pending)
                if image is not None and any(d.endswith("@" + digest) for d in image.repo_digests):
                    del pending[name]
            if pending and time.monotonic() < deadline:
                time.sleep(pause)  # polling the CRI: it has no way to tell us
                pause = min(pause * 2, 0.5)
            else:
                break
        return sorted(pending)

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
        """Pull through the CRI (so registry mirrors and hosts.toml apply); returns the image id.

        Credentials are chosen per registry by the caller. ``server`` stays empty
        unless set: the CRI compares it, as a URL, with the host it contacts
        (``registry-1.docker.io`` for docker.io), and drops the credentials on
        a mismatch.
        """
        auth = None
        if username or password or identity_token:
            auth = api_pb2.AuthConfig(
                username=username,
                password=password,
                server_address=server,
                identity_token=identity_token,
            )
        resp = self._call(
            self._cri.PullImage,
            api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref), auth=auth),
            f"pull {ref}",
            timeout=timeout,
            namespaced=False,
        )
        return str(resp.image_ref)


__all__ = ["Blob", "Cancelled", "Containerd", "CriImage", "ImageRecord", "default_address"]
