"""Reference parsing and normalization (pure)."""

from __future__ import annotations

import pytest

from agent import refs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", "docker.io/library/alpine:latest"),
        ("alpine:3.19", "docker.io/library/alpine:3.19"),
        ("library/alpine", "docker.io/library/alpine:latest"),
        ("index.docker.io/library/alpine:1", "docker.io/library/alpine:1"),
        ("quay.io/che/udi:latest", "quay.io/che/udi:latest"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/a/b/c:v1.2_3", "localhost:5000/a/b/c:v1.2_3"),
        ("127.0.0.1:5000/x@sha256:" + "a" * 64, "127.0.0.1:5000/x@sha256:" + "a" * 64),
        ("reg.io/x:t@sha256:" + "b" * 64, "reg.io/x:t@sha256:" + "b" * 64),
        ("[::1]:5000/img:1", "[::1]:5000/img:1"),
    ],
)
def test_normalize(text: str, expected: str) -> None:
    """Short names are expanded as the kubelet and containerd do."""
    assert refs.normalize(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("Alpine", "lower case"),
        ("alpine:" + "t" * 129, "invalid tag"),
        ("alpine:-bad", "invalid tag"),
        ("alpine@sha256:1234", "invalid digest"),
        ("alpine@sha256:" + "A" * 64, "64 lower-case hex"),
        ("a b", "white space"),
        ("reg.io//x", "invalid repository"),
        ("-reg.io/x", "invalid"),
    ],
)
def test_invalid(text: str, why: str) -> None:
    """Invalid references are refused with a reason."""
    with pytest.raises(refs.InvalidReference, match=why):
        refs.parse(text)


def test_familiar_and_digest_form() -> None:
    ref = refs.parse("alpine:3")
    assert ref.familiar == "alpine:3"
    assert (
        str(ref.with_digest("sha256:" + "c" * 64)) == "docker.io/library/alpine@sha256:" + "c" * 64
    )
