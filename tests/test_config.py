"""Settings: a flag wins over the environment, which wins over the default."""

from __future__ import annotations

import argparse

from agent import config
from agent.config import DaemonConfig


def _resolve(argv: list[str], env: dict[str, str]) -> DaemonConfig:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, DaemonConfig)
    return config.resolve(DaemonConfig, parser.parse_args(argv), env)


def test_empty_listen_flag_turns_the_endpoint_off() -> None:
    """`--listen ''` disables /healthz and /metrics instead of falling back to the default port."""
    assert _resolve(["--listen", ""], {}).listen == ""
    assert _resolve([], {}).listen == "127.0.0.1:9440"
    assert _resolve([], {"IMAGE_AGENT_LISTEN": "127.0.0.1:1"}).listen == "127.0.0.1:1"
    assert (
        _resolve(["--listen", "127.0.0.1:2"], {"IMAGE_AGENT_LISTEN": "x"}).listen == "127.0.0.1:2"
    )
