"""How a setting is declared, and how flags, the environment and defaults become values.

Precedence: flag, then environment, then default. :func:`add_arguments` and
:func:`resolve` are the only code that knows this.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any, TypeVar

from agent.errors import UsageError


def setting(
    default: Any, *, flag: str, env: str, help: str, unit: str = "", lines: bool = False
) -> Any:
    """A config field: its default, command-line flag, environment variable and unit.

    ``lines``: a repeatable setting whose items may hold commas themselves; its
    variable is split at newlines only.
    """
    return dataclasses.field(
        default=default,
        metadata={"flag": flag, "env": env, "help": help, "unit": unit, "lines": lines},
    )


C = TypeVar("C")


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Add one option for each field of config class ``cls``."""
    group = parser.add_argument_group(cls.__name__.removesuffix("Config").lower() or "config")
    for f in dataclasses.fields(cls):
        meta = f.metadata
        unit = f" [{meta['unit']}]" if meta["unit"] else ""
        default = f.default if f.default not in ("", None, ()) else "none"
        # A bare boolean flag means true (``--auth-reads``), as does ``--auth-reads=true``.
        optional: dict[str, Any] = (
            {"nargs": "?", "const": "true"} if isinstance(f.default, bool) else {}
        )
        group.add_argument(
            meta["flag"],
            dest=f"{cls.__name__}.{f.name}",
            default=None,
            action="append" if isinstance(f.default, tuple) else "store",
            metavar=f.name.upper().removesuffix("_S"),
            help=f"{meta['help']}{unit} (env {meta['env']}; default {default})",
            **optional,
        )


def resolve(cls: type[C], args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> C:
    """Build ``cls`` from parsed flags, the environment and defaults."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind: type[Any] = type(f.default)
        raw = getattr(args, f"{cls.__name__}.{f.name}", None)
        if raw == "" and kind is str:
            values[f.name] = ""  # an explicit empty flag turns a setting off (--listen '')
            continue
        if raw is None:
            raw = env.get(f.metadata["env"])
        if raw is None or raw == "":
            continue
        try:
            values[f.name] = _convert(raw, kind, f.metadata["unit"], f.metadata.get("lines", False))
        except ValueError:
            where = f"{f.metadata['flag']} / {f.metadata['env']}"
            raise UsageError(f"{where}: {raw!r} is not a valid {kind.__name__}") from None
    return cls(**values)


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``1h``, ``1h30m``."""
    text = text.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r}")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def _convert(raw: Any, kind: type[Any], unit: str, lines: bool = False) -> Any:
    if kind is tuple:
        # Environment values: one item a line, or comma-separated on one line
        # (one a line only for ``lines`` settings, whose items hold commas).
        text = str(raw)
        split = "\n" if lines or "\n" in text else ","
        items = raw if isinstance(raw, list) else text.split(split)
        return tuple(i.strip() for i in items if i.strip())
    if kind is bool:
        if str(raw).lower() in ("1", "true", "yes", "on"):
            return True
        if str(raw).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if kind is float and unit == "s":
        return parse_duration(str(raw))
    if kind is int and unit == "bytes":
        return parse_size(str(raw))
    return kind(raw)


_SIZE_UNITS = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "ki": 1 << 10,
    "mi": 1 << 20,
    "gi": 1 << 30,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
}


def parse_size(text: str) -> int:
    """Bytes from ``268435456``, ``256Mi``, ``256MiB``, ``1Gi`` (Kubernetes quantities too)."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"invalid size {text!r}")
    return int(match.group(1)) * _SIZE_UNITS[unit]
