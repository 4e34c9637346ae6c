"""Which containerd socket the CLI talks to when none is given."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from agent.containerd import client


def test_a_k3s_socket_that_cannot_be_looked_at_falls_back_to_containerds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stat error other than "not there" (EACCES for a non-root user, here ENAMETOOLONG) gives containerd's own address, not a traceback."""
    unreadable = tmp_path / ("x" * 300) / "containerd.sock"
    with pytest.raises(OSError, match=os.strerror(errno.ENAMETOOLONG)):
        unreadable.stat()
    monkeypatch.setattr(client, "K3S_SOCKET", str(unreadable))
    assert client.default_address() == client.CONTAINERD_SOCKET


def test_a_present_k3s_socket_is_preferred(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a k3s node the agent talks to k3s's containerd."""
    sock = tmp_path / "containerd.sock"
    sock.touch()
    monkeypatch.setattr(client, "K3S_SOCKET", str(sock))
    assert client.default_address() == str(sock)
