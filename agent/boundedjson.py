"""JSON from untrusted sources, parsed within size and nesting limits.

The standard parser recurses once per nesting level, so a document of
100,000 ``[`` raises RecursionError (not ValueError) deep inside it. Every
document the agent reads from an archive, a list, a registry or a client goes
through :func:`loads`, which checks the size and the nesting depth before
parsing, and turns every failure into one :class:`JSONLimitError` line.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

# Nesting deeper than this is refused before parsing. Image documents nest
# about 5 deep; Che devfiles and node reports less than 20.
MAX_DEPTH = 64

# A JSON string (with escapes). The possessive body and the end-of-data
# alternative make an unterminated string match to the end instead of failing
# and being tried again at every later quote (which took quadratic time).
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*+(?:"|\\?\Z)', re.DOTALL)
# Every byte but the four brackets, deleted before counting.
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
# Opening brackets count +1, closing ones -1 (255 read as a signed byte).
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


class JSONLimitError(ValueError):
    """The document is not JSON, or exceeds a limit. ``str()`` is one line."""


def depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in ``data`` (0 for a scalar).

    Linear time, in C loops: strings are cut out (brackets inside them do not
    count), the brackets that remain become +1 / -1 steps, and the running sum
    peaks at the depth.
    """
    steps = _STRING.sub(b"", data).translate(_STEPS, _NOT_BRACKETS)
    if not steps:
        return 0
    return max(itertools.accumulate(memoryview(steps).cast("b"), initial=0))


def loads(data: bytes | str, *, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``data``; raise JSONLimitError naming ``what`` when it is too big, deep or invalid."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise JSONLimitError(f"{what} is larger than {max_bytes} bytes")
    if depth(raw) > max_depth:
        raise JSONLimitError(f"{what} nests deeper than {max_depth} levels")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "not valid JSON"
        raise JSONLimitError(f"{what} is not valid JSON ({reason})") from None
