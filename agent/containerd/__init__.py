"""The only package that talks to containerd and its CRI plugin (gRPC)."""

from agent.containerd.client import Containerd, default_address

__all__ = ["Containerd", "default_address"]
