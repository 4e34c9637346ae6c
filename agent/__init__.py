"""image-agent: streams image archives into containerd and keeps images warm on every node."""

__version__ = "0.1.0"
