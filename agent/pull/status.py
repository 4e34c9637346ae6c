"""The puller's pure pieces: states, the status row, failure classes and backoff."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from agent.errors import AgentError, ContainerdError, ContainerdUnavailable
from agent.image import refs


class PullState(StrEnum):
    PRESENT = "present"
    PULLING = "pulling"
    PULLED = "pulled"
    RETRYING = "retrying"
    FAILED = "failed"
    INVALID = "invalid"


@dataclass
class PullStatus:
    image: str
    sources: list[str]
    state: PullState = PullState.PULLING
    attempts: int = 0
    last_error: str = ""
    next_retry_at: float | None = None  # wall clock, for people
    duration_s: float | None = None
    image_id: str = ""
    due: float = 0.0  # monotonic
    busy: bool = False
    failures: int = field(default=0, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "state": str(self.state),
            "source": ", ".join(self.sources),
            "attempts": self.attempts,
            "last_error": self.last_error,
            "next_retry_at": self.next_retry_at,
            "duration_s": self.duration_s,
            "image_id": self.image_id,
        }


@dataclass(frozen=True)
class Failure:
    permanent: bool
    reason: str


def classify(err: AgentError) -> Failure:
    """Permanent (not found, unauthorized, invalid) or transient, with a short reason."""
    text = str(err)
    lowered = text.lower()
    code = err.code if isinstance(err, ContainerdError) else ""
    if isinstance(err, ContainerdUnavailable) and "pull" not in lowered:
        return Failure(False, f"containerd unavailable: {text}")
    if code == "NOT_FOUND" or ": not found" in lowered or "manifest unknown" in lowered:
        return Failure(True, f"not found: {text}")
    # Words, not bare status numbers: "401" also turns up in ports and digests.
    if any(
        s in lowered
        for s in ("unauthorized", "authorization failed", "forbidden", "pull access denied")
    ):
        return Failure(True, f"unauthorized: {text}")
    if code == "INVALID_ARGUMENT" or "invalid reference" in lowered:
        return Failure(True, f"invalid: {text}")
    if code == "DEADLINE_EXCEEDED":
        return Failure(False, f"timeout: {text}")
    return Failure(False, text)


def retry_delay(failures: int, permanent: bool, rng: random.Random) -> float:
    """Capped exponential backoff with jitter (seconds).

    Transient: 2 s doubling to 5 min. Permanent: 10 min doubling to 6 h.
    """
    base, cap = (600.0, 6 * 3600.0) if permanent else (2.0, 300.0)
    delay = min(cap, base * 2.0 ** max(0, failures - 1))
    return delay * rng.uniform(0.8, 1.2)


def is_digest_ref(ref: str) -> bool:
    try:
        return refs.parse(ref).digest is not None
    except refs.InvalidReference:
        return False
