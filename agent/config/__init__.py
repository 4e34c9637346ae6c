"""Configuration as frozen dataclasses.

Every field has a default, a unit where it has one, a ``--flag`` and an
environment variable. Precedence: flag, then environment, then default.

- :mod:`agent.config.fields`: how a setting is declared and resolved, and
  the duration and size syntaxes;
- :mod:`agent.config.node`: the node's settings (containerd, daemon, pulls,
  archive bounds, import, logs);
- :mod:`agent.config.cluster`: the cluster's settings (the node side and
  ``cluster serve``).

Callers use ``from agent import config`` and ``config.DaemonConfig``; the
names below are the package's interface.
"""

from agent.config.cluster import ClusterAgentConfig, ClusterServeConfig
from agent.config.fields import add_arguments, parse_duration, parse_size, resolve, setting
from agent.config.node import (
    ArchiveConfig,
    ContainerdConfig,
    DaemonConfig,
    ImportConfig,
    LogConfig,
    PullConfig,
)

__all__ = [
    "ArchiveConfig",
    "ClusterAgentConfig",
    "ClusterServeConfig",
    "ContainerdConfig",
    "DaemonConfig",
    "ImportConfig",
    "LogConfig",
    "PullConfig",
    "add_arguments",
    "parse_duration",
    "parse_size",
    "resolve",
    "setting",
]
