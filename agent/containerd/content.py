"""containerd's content store: blobs by digest, their labels, and streaming writes."""

from __future__ import annotations

import hashlib
import queue
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import grpc
from google.protobuf import field_mask_pb2

from agent._proto.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from agent.containerd.rpc import Rpc
from agent.errors import AlreadyExists, ContainerdError, NotFound
from agent.image.labels import LEASE_PREFIX

# Requests in flight on a content write before we wait for containerd.
WRITE_WINDOW = 4


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    labels: dict[str, str]


class ContentStore(Protocol):
    """What the importer needs of a content store (containerd's, or verify's in memory)."""

    def blob_info(self, digest: str) -> Blob | None:
        """The blob's size and labels, or None when it is absent."""
        ...

    def write_blob(
        self,
        chunks: Iterable[bytes],
        *,
        lease: str,
        total: int,
        expected: str = "",
        labels: dict[str, str] | None = None,
    ) -> str:
        """Store a blob and return its digest; FAILED_PRECONDITION when it does not match."""
        ...

    def read_blob(self, digest: str, limit: int) -> bytes:
        """The whole blob (at most ``limit`` bytes); NotFound when absent."""
        ...

    def label_blob(self, digest: str, labels: dict[str, str]) -> None:
        """Set ``labels`` on a blob, leaving its other labels alone."""
        ...


class _Hashed:
    """Chunks passed through as they are, hashed on the way; ``done`` once all were read."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self._hash = hashlib.sha256()
        self.done = False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self._hash.update(chunk)
            yield chunk
        self.done = True

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


class ContentService:
    """containerd's Content service in one namespace."""

    def __init__(self, rpc: Rpc) -> None:
        self._rpc = rpc
        self._stub = content_pb2_grpc.ContentStub(rpc.channel)

    def blob_info(self, digest: str) -> Blob | None:
        try:
            resp = self._rpc.call(
                self._stub.Info, content_pb2.InfoRequest(digest=digest), f"content {digest}"
            )
        except NotFound:
            return None
        return Blob(resp.info.digest, resp.info.size, dict(resp.info.labels))

    def label_blob(self, digest: str, labels: dict[str, str]) -> None:
        """Set (only) ``labels`` on a blob, leaving its other labels alone.

        The mask names each label, so no release replaces the whole label set.
        """
        if not labels:
            return
        info = content_pb2.Info(digest=digest, labels=labels)
        mask = field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels])
        self._rpc.call(
            self._stub.Update,
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
        try:
            parts = [
                resp.data
                for resp in self._stub.Read(
                    content_pb2.ReadContentRequest(digest=digest),
                    metadata=self._rpc.metadata(None),
                    timeout=self._rpc.timeout,
                )
            ]
        except grpc.RpcError as err:
            raise self._rpc.error(err, f"read content {digest}") from None
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
        # Without ``expected``, containerd's ALREADY_EXISTS at commit does not
        # say which blob exists: hash what is sent, to answer with its digest.
        hashed = None if expected else _Hashed(chunks)
        requests: queue.SimpleQueue[content_pb2.WriteContentRequest | None] = queue.SimpleQueue()

        def pump() -> Iterator[content_pb2.WriteContentRequest]:
            while (item := requests.get()) is not None:
                yield item

        responses = self._stub.Write(pump(), metadata=self._rpc.metadata(lease))
        try:
            requests.put(
                content_pb2.WriteContentRequest(
                    action=content_pb2.STAT, ref=ref, total=total, expected=expected
                )
            )
            next(responses)
            in_flight, offset = self._send(hashed or chunks, requests, responses)
            commit = content_pb2.WriteContentRequest(
                action=content_pb2.COMMIT,
                offset=offset,
                total=total,
                expected=expected,
                labels=labels or {},
            )
            return self._commit(commit, in_flight, requests, responses)
        except grpc.RpcError as err:
            error = self._rpc.error(err, f"write content {expected or ref}")
            if isinstance(error, AlreadyExists):
                if expected:
                    return expected
                if hashed is not None and hashed.done:
                    return hashed.digest()
            raise error from None
        except BaseException:
            responses.cancel()
            raise
        finally:
            requests.put(None)

    @staticmethod
    def _commit(
        commit: content_pb2.WriteContentRequest,
        in_flight: int,
        requests: queue.SimpleQueue[content_pb2.WriteContentRequest | None],
        responses: Iterator[content_pb2.WriteContentResponse],
    ) -> str:
        """Send the COMMIT; after the answers still in flight, its answer names the digest."""
        requests.put(commit)
        for _ in range(in_flight):
            next(responses)
        last = next(responses)
        requests.put(None)
        return str(last.digest)

    @staticmethod
    def _send(
        chunks: Iterable[bytes],
        requests: queue.SimpleQueue[content_pb2.WriteContentRequest | None],
        responses: Iterator[content_pb2.WriteContentResponse],
    ) -> tuple[int, int]:
        """Queue WRITE requests, keeping at most WRITE_WINDOW unanswered; (in flight, offset)."""
        in_flight = 0
        offset = 0
        for chunk in chunks:
            requests.put(
                content_pb2.WriteContentRequest(action=content_pb2.WRITE, offset=offset, data=chunk)
            )
            offset += len(chunk)
            in_flight += 1
            if in_flight > WRITE_WINDOW:
                next(responses)
                in_flight -= 1
        return in_flight, offset
