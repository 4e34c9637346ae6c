"""The gRPC channel to containerd's socket, and the one place its errors are translated."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

import grpc

from agent.errors import (
    AlreadyExists,
    ContainerdError,
    ContainerdUnavailable,
    NotFound,
    OutOfSpace,
)

# containerd 1.6/1.7 refuse messages over 16 MiB.
MAX_MESSAGE = 16 << 20
# gRPC's default reconnect backoff grows to 120 s, so a containerd that comes
# back after an outage would be noticed up to two minutes late. A local
# socket is cheap to knock on: retry every 0.5 s, backing off to 2 s.
RECONNECT_INITIAL_MS = 500
RECONNECT_MIN_MS = 500
RECONNECT_MAX_MS = 2000

_UNAVAILABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# containerd reports a full disk as a wrapped Go error with no status code of
# its own (it arrives as UNKNOWN, or INTERNAL from some services), so the
# only thing to go on is the errno's text, which Go spells as strerror does
# (lower-cased). This is the one place an error's text is looked at: there
# is nothing else to tell a full disk by. Matched against the C library's own
# text for ENOSPC, and only for these codes. RESOURCE_EXHAUSTED is among them
# but is not enough by itself: gRPC also uses it for a message over the size
# limit, which is no disk problem and not worth retrying.
_NO_CODE = frozenset(
    {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
_ENOSPC_TEXT = os.strerror(errno.ENOSPC).lower()


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_MS),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_MIN_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
    ]


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
    if code in _NO_CODE and _ENOSPC_TEXT in details.lower():
        return OutOfSpace(f"{what}: containerd is out of disk space ({details})", code=code.name)
    return ContainerdError(f"{what}: {details}", code=code.name)


class Rpc:
    """One channel, namespace and default deadline; every unary call goes through :meth:`call`."""

    def __init__(self, address: str, namespace: str, timeout: float) -> None:
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        target = address if "://" in address else f"unix://{address}"
        self.channel = grpc.insecure_channel(target, options=channel_options())

    def close(self) -> None:
        self.channel.close()

    def metadata(self, lease: str | None, namespaced: bool = True) -> list[tuple[str, str]]:
        md = [("containerd-namespace", self.namespace)] if namespaced else []
        if lease:
            md.append(("containerd-lease", lease))
        return md

    def call(
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
                metadata=self.metadata(lease, namespaced),
                timeout=self.timeout if timeout == -1.0 else timeout,
            )
        except grpc.RpcError as err:
            raise translate(err, what, self.address) from None

    def error(self, err: grpc.RpcError, what: str) -> ContainerdError:
        return translate(err, what, self.address)
