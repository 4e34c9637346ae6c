"""Pre-pull pure pieces: credentials, error classification, backoff, durations."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from agent.config import parse_duration
from agent.errors import ContainerdError, ContainerdUnavailable, UsageError
from agent.pull import auth
from agent.pull.engine import classify, is_digest_ref, retry_delay


def test_auth_file_matching_and_secrets_hidden(tmp_path: Path) -> None:
    """docker config.json auths match per registry host; secrets never appear in repr."""
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {
                        "auth": "dXNlcjpodWItc2VjcmV0"
                    },  # user:hub-secret
                    "registry.internal:5000": {"username": "ci", "password": "pw"},
                }
            }
        )
    )
    creds = auth.load(path)
    hub = auth.for_ref(creds, "alpine:3")
    assert hub is not None and (hub.username, hub.password) == ("user", "hub-secret")
    internal = auth.for_ref(creds, "registry.internal:5000/team/app:1")
    assert internal is not None and internal.password == "pw"
    assert auth.for_ref(creds, "quay.io/x/y:1") is None
    assert "hub-secret" not in repr(hub) and "pw" not in repr(internal)


@pytest.mark.parametrize(
    ("doc", "why"),
    [("{", "not valid JSON"), ("{}", "auths"), ('{"auths": {"r": {"auth": "%%%"}}}', "base64")],
)
def test_bad_auth_file(tmp_path: Path, doc: str, why: str) -> None:
    """An unusable --auth-file is a usage error that says what is wrong with it."""
    path = tmp_path / "c.json"
    path.write_text(doc)
    with pytest.raises(UsageError, match=why):
        auth.load(path)


@pytest.mark.parametrize(
    ("err", "permanent", "prefix"),
    [
        (
            ContainerdError(
                'pull x: failed to resolve reference "x": x: not found', code="NOT_FOUND"
            ),
            True,
            "not found",
        ),
        (
            ContainerdError("pull x: unexpected status code 401 Unauthorized", code="UNKNOWN"),
            True,
            "unauthorized",
        ),
        (ContainerdError("pull x: pull access denied", code="UNKNOWN"), True, "unauthorized"),
        (
            ContainerdError("pull x: 403 Forbidden", code="UNKNOWN"),
            True,
            "unauthorized",
        ),
        (
            # A registry on a port with "401" in it is not an authorization failure.
            ContainerdError(
                "pull 127.0.0.1:40153/a:1: dial tcp 127.0.0.1:40153: connect: connection refused",
                code="UNKNOWN",
            ),
            False,
            "pull 127.0.0.1:40153",
        ),
        (
            ContainerdError(
                "pull x: dial tcp 127.0.0.1:5000: connect: connection refused", code="UNKNOWN"
            ),
            False,
            "pull x",
        ),
        (ContainerdError("pull x: 503 Service Unavailable", code="UNKNOWN"), False, "pull x"),
        (
            ContainerdUnavailable(
                "containerd at /s is not reachable (pull x: deadline)", code="DEADLINE_EXCEEDED"
            ),
            False,
            "timeout",
        ),
        (
            ContainerdUnavailable(
                "containerd at /s is not reachable (CRI ImageStatus x: refused)", code="UNAVAILABLE"
            ),
            False,
            "containerd unavailable",
        ),
    ],
)
def test_classify(err: ContainerdError, permanent: bool, prefix: str) -> None:
    """Not found / unauthorized are permanent (long backoff); connection errors and 5xx are transient."""
    failure = classify(err)
    assert failure.permanent is permanent
    assert failure.reason.startswith(prefix)


def test_retry_delay_is_capped_exponential_with_jitter() -> None:
    """Retries back off exponentially with jitter, capped; permanent failures wait much longer."""
    rng = random.Random(1)  # noqa: S311 - seeded for repeatable jitter, not for secrets
    transient = [retry_delay(n, False, rng) for n in range(1, 12)]
    assert 1.6 <= transient[0] <= 2.4 and 3.2 <= transient[1] <= 4.8
    assert max(transient) <= 300 * 1.2
    assert retry_delay(1, True, rng) >= 480


def test_durations_and_digest_refs() -> None:
    """Durations take units; digest references are told apart from tags (pulled once, not refreshed)."""
    assert parse_duration("30m") == 1800 and parse_duration("1h") == 3600
    assert is_digest_ref("alpine@sha256:" + "a" * 64) and not is_digest_ref("alpine:3")
