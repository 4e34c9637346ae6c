"""The only package that talks to containerd and its CRI plugin (gRPC)."""

from agent.containerd.client import Containerd, default_address
from agent.containerd.content import ContentStore

__all__ = ["Containerd", "ContentStore", "default_address"]
