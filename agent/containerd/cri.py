"""The CRI image service that containerd serves on the same socket (not namespaced)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from agent._proto.cri.runtime.v1 import api_pb2, api_pb2_grpc
from agent.containerd.rpc import Rpc
from agent.errors import Cancelled, ContainerdError

# Polling the CRI's cache: first pause, and the longest.
_WAIT_FIRST_S = 0.01
_WAIT_MAX_S = 0.5


@dataclass(frozen=True)
class CriImage:
    id: str
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int
    pinned: bool


def _image(i: api_pb2.Image) -> CriImage:
    return CriImage(i.id, tuple(i.repo_tags), tuple(i.repo_digests), int(i.size), bool(i.pinned))


class CriService:
    def __init__(self, rpc: Rpc) -> None:
        self._rpc = rpc
        self._stub = api_pb2_grpc.ImageServiceStub(rpc.channel)

    def cri_images(self) -> list[CriImage]:
        resp = self._rpc.call(
            self._stub.ListImages, api_pb2.ListImagesRequest(), "CRI ListImages", namespaced=False
        )
        return [_image(i) for i in resp.images]

    def cri_image_status(self, ref: str) -> CriImage | None:
        resp = self._rpc.call(
            self._stub.ImageStatus,
            api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref)),
            f"CRI ImageStatus {ref}",
            namespaced=False,
        )
        return _image(resp.image) if resp.HasField("image") else None

    def cri_wait(
        self, expect: dict[str, str], timeout: float, *, stop: threading.Event | None = None
    ) -> list[str]:
        """Wait until the CRI lists each name at its manifest digest; the names it still doesn't.

        containerd's CRI keeps its own image cache, fed by image events, so a
        record just written can take a moment to reach ``crictl images`` and
        the kubelet. Nothing to wait for where the CRI is not served. ``stop``
        ends the wait at once with Cancelled.
        """
        stop = stop or threading.Event()
        deadline = time.monotonic() + timeout
        pending = dict(expect)
        pause = _WAIT_FIRST_S
        while pending:
            if stop.is_set():
                raise Cancelled("cancelled while waiting for the CRI")
            # One ListImages a round for every name, not one ImageStatus each:
            # a bundle of many images pays one round trip, not one per image.
            try:
                listed = self.cri_images()
            except ContainerdError as err:
                return [] if err.code == "UNIMPLEMENTED" else sorted(pending)
            for image in listed:
                for tag in image.repo_tags:
                    digest = pending.get(tag)
                    if digest and any(d.endswith("@" + digest) for d in image.repo_digests):
                        del pending[tag]
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                break
            # The CRI has no way to tell us; the pause doubles as the stop check.
            if stop.wait(min(pause, left)):
                raise Cancelled("cancelled while waiting for the CRI")
            pause = min(pause * 2, _WAIT_MAX_S)
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
        resp = self._rpc.call(
            self._stub.PullImage,
            api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref), auth=auth),
            f"pull {ref}",
            timeout=timeout,
            namespaced=False,
        )
        return str(resp.image_ref)
