"""The error hierarchy of image-agent.

Everything that can go wrong is raised as an :class:`AgentError` whose message
is a complete, user-facing sentence. gRPC errors are translated in exactly one
place (:func:`agent.containerd.client.translate`); callers decide whether to
retry from :attr:`AgentError.retryable` and log once where they handle it.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base class. ``str(err)`` is the one line shown to the user."""

    retryable: bool = False


class ArchiveError(AgentError):
    """The archive is unusable: corrupt, truncated, unsafe or incomplete.

    Permanent: importing the same bytes again gives the same error.
    """

    def __init__(self, reason: str, *, file: str | None = None) -> None:
        self.reason = reason
        self.file = file
        super().__init__(f"{file}: {reason}" if file else reason)

    def for_file(self, file: str) -> ArchiveError:
        """The same error, naming ``file`` (if it does not name one yet)."""
        if self.file:
            return self
        return ArchiveError(self.reason, file=file)


class PlatformMismatch(ArchiveError):
    """The archive holds no image for the platforms asked for."""


class ContainerdError(AgentError):
    """containerd (or its CRI plugin) refused a request."""

    def __init__(self, message: str, *, code: str = "UNKNOWN") -> None:
        self.code = code
        super().__init__(message)


class ContainerdUnavailable(ContainerdError):
    """containerd cannot be reached or is restarting: try again later."""

    retryable = True


class OutOfSpace(ContainerdError):
    """containerd's disk is full: try again once space is freed."""

    retryable = True


class NotFound(ContainerdError):
    """The object asked for does not exist."""


class AlreadyExists(ContainerdError):
    """The object being created exists already."""


class Cancelled(AgentError):
    """Work was stopped on request (SIGTERM, Ctrl-C)."""

    retryable = True


class UsageError(AgentError):
    """The command line or configuration is wrong."""
