"""containerd's Images service: image records (name -> target descriptor, labels)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf import field_mask_pb2

from agent._proto.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from agent._proto.containerd.types import descriptor_pb2
from agent.containerd.rpc import Rpc
from agent.errors import AlreadyExists, ContainerdError, NotFound

# Read-modify-write rounds before giving up on an image record that keeps changing.
UPDATE_ATTEMPTS = 5


@dataclass(frozen=True)
class ImageRecord:
    name: str
    target: descriptor_pb2.Descriptor
    labels: dict[str, str]


@dataclass(frozen=True)
class Put:
    """What :meth:`ImageService.put_image` did, and the record it found in the name's place.

    ``action`` is ``created``, ``updated`` or ``unchanged``; ``previous`` is
    None exactly when it created the record. It is the record as read just
    before the write that took effect, so a record another tool created or
    moved in between is what is reported, not what the caller saw earlier.
    """

    action: str
    previous: ImageRecord | None


class ImageService:
    def __init__(self, rpc: Rpc) -> None:
        self._rpc = rpc
        self._stub = images_pb2_grpc.ImagesStub(rpc.channel)

    def get_image(self, name: str) -> ImageRecord | None:
        try:
            resp = self._rpc.call(
                self._stub.Get, images_pb2.GetImageRequest(name=name), f"image {name}"
            )
        except NotFound:
            return None
        img = resp.image
        return ImageRecord(img.name, img.target, dict(img.labels))

    def list_images(self, *filters: str) -> list[ImageRecord]:
        resp = self._rpc.call(
            self._stub.List, images_pb2.ListImagesRequest(filters=list(filters)), "list images"
        )
        return [ImageRecord(i.name, i.target, dict(i.labels)) for i in resp.images]

    def put_image(
        self, name: str, media_type: str, digest: str, size: int, labels: dict[str, str]
    ) -> Put:
        """Create the image record, or move/relabel an existing one.

        Returns what was done and what was there (see :class:`Put`). Labels
        other than ``labels`` (another tool's) are left as they are.
        """
        target = descriptor_pb2.Descriptor(media_type=media_type, digest=digest, size=size)
        for _ in range(UPDATE_ATTEMPTS):
            existing = self.get_image(name)
            if existing is None:
                try:
                    self._rpc.call(
                        self._stub.Create,
                        images_pb2.CreateImageRequest(
                            image=images_pb2.Image(name=name, target=target, labels=labels)
                        ),
                        f"create {name}",
                    )
                except AlreadyExists:
                    continue  # created in between: read it again
                return Put("created", None)
            if existing.target.digest == target.digest and all(
                existing.labels.get(k) == v for k, v in labels.items()
            ):
                return Put("unchanged", existing)
            merged = {**existing.labels, **labels}
            paths = ["target", *(f"labels.{k}" for k in labels)]
            try:
                self._update_image(
                    images_pb2.Image(name=name, target=target, labels=merged), paths, name
                )
            except NotFound:
                continue  # deleted in between: create it
            return Put("updated", existing)
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
        self._rpc.call(
            self._stub.Update,
            images_pb2.UpdateImageRequest(
                image=image, update_mask=field_mask_pb2.FieldMask(paths=paths)
            ),
            f"update {name}",
        )

    def delete_image(self, name: str) -> None:
        with contextlib.suppress(NotFound):
            self._rpc.call(
                self._stub.Delete, images_pb2.DeleteImageRequest(name=name), f"delete {name}"
            )
