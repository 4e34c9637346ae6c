"""Reference parsing and normalization (pure)."""

from __future__ import annotations

import pytest

from agent.image import refs


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
    """A short name prints as users wrote it and gains a digest in canonical form."""
    ref = refs.parse("alpine:3")
    assert ref.familiar == "alpine:3"
    assert (
        str(ref.with_digest("sha256:" + "c" * 64)) == "docker.io/library/alpine@sha256:" + "c" * 64
    )


F64 = "f" * 64
F128 = "f" * 128

# The cases of distribution's reference_test.go (TestReferenceParse), as this
# project reads them: the input, and the normalized reference we expect, or
# None where the reference is refused. Names without a registry go to
# docker.io as ParseNormalizedNamed does, so a few names valid for the
# un-normalized Parse become too long once docker.io/ is in front.
DISTRIBUTION_CASES: list[tuple[str, str | None]] = [
    ("test_com", "docker.io/library/test_com:latest"),
    ("test.com:tag", "docker.io/library/test.com:tag"),
    ("test.com:5000", "docker.io/library/test.com:5000"),
    ("test.com/repo:tag", "test.com/repo:tag"),
    ("test:5000/repo", "test:5000/repo:latest"),
    ("test:5000/repo:tag", "test:5000/repo:tag"),
    (f"test:5000/repo@sha256:{F64}", f"test:5000/repo@sha256:{F64}"),
    (f"test:5000/repo:tag@sha256:{F64}", f"test:5000/repo:tag@sha256:{F64}"),
    ("", None),
    (":justtag", None),
    (f"@sha256:{F64}", None),
    ("repo@sha256:" + "f" * 34, None),
    (f"validname@invaliddigest:{F64}", None),
    ("Uppercase:tag", None),
    ("test:5000/Uppercase/lowercase:tag", None),
    ("lowercase:Uppercase", "docker.io/library/lowercase:Uppercase"),
    ("a/" * 128 + "a:tag", None),
    # 255 characters without a registry: 265 with docker.io/ in front.
    ("a/" * 127 + "a:tag-puts-this-over-max", None),
    ("aa/asdf$$^/aa", None),
    ("sub-dom1.foo.com/bar/baz/quux", "sub-dom1.foo.com/bar/baz/quux:latest"),
    ("sub-dom1.foo.com/bar/baz/quux:some-long-tag", "sub-dom1.foo.com/bar/baz/quux:some-long-tag"),
    (
        "b.gcr.io/test.example.com/my-app:test.example.com",
        "b.gcr.io/test.example.com/my-app:test.example.com",
    ),
    ("xn--n3h.com/myimage:xn--n3h.com", "xn--n3h.com/myimage:xn--n3h.com"),
    (
        f"xn--7o8h.com/myimage:xn--7o8h.com@sha512:{F128}",
        f"xn--7o8h.com/myimage:xn--7o8h.com@sha512:{F128}",
    ),
    ("foo_bar.com:8080", "docker.io/library/foo_bar.com:8080"),
    ("foo/foo_bar.com:8080", "docker.io/foo/foo_bar.com:8080"),
    ("192.168.1.1", "docker.io/library/192.168.1.1:latest"),
    ("192.168.1.1:tag", "docker.io/library/192.168.1.1:tag"),
    ("192.168.1.1:5000", "docker.io/library/192.168.1.1:5000"),
    ("192.168.1.1/repo", "192.168.1.1/repo:latest"),
    ("192.168.1.1:5000/repo", "192.168.1.1:5000/repo:latest"),
    ("192.168.1.1:5000/repo:5050", "192.168.1.1:5000/repo:5050"),
    ("[2001:db8::1]", None),
    ("[2001:db8::1]:5000", None),
    ("[2001:db8::1]:tag", None),
    ("[2001:db8::1]/repo", "[2001:db8::1]/repo:latest"),
    ("[2001:db8:1:2:3:4:5:6]/repo:tag", "[2001:db8:1:2:3:4:5:6]/repo:tag"),
    ("[2001:db8::1]:5000/repo", "[2001:db8::1]:5000/repo:latest"),
    ("[2001:db8::1]:5000/repo:tag", "[2001:db8::1]:5000/repo:tag"),
    (f"[2001:db8::1]:5000/repo@sha256:{F64}", f"[2001:db8::1]:5000/repo@sha256:{F64}"),
    (f"[2001:db8::1]:5000/repo:tag@sha256:{F64}", f"[2001:db8::1]:5000/repo:tag@sha256:{F64}"),
    ("[2001:db8::]:5000/repo", "[2001:db8::]:5000/repo:latest"),
    ("[::1]:5000/repo", "[::1]:5000/repo:latest"),
    ("[fe80::1%eth0]:5000/repo", None),
    ("[fe80::1%@invalidzone]:5000/repo", None),
    # TestDomainAndPath and TestSerialization.
    ("test-com:8080/foo", "test-com:8080/foo:latest"),
    ("xn--n3h.com:18080/foo", "xn--n3h.com:18080/foo:latest"),
    ("example.com:8000/named:tagged", "example.com:8000/named:tagged"),
]


@pytest.mark.parametrize(("text", "expected"), DISTRIBUTION_CASES)
def test_distribution_cases(text: str, expected: str | None) -> None:
    """The reference grammar agrees with distribution's own test cases (normalized as the kubelet does)."""
    if expected is None:
        with pytest.raises(refs.InvalidReference):
            refs.parse(text)
    else:
        assert refs.normalize(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "alpine:t\u00e9st",  # a non-ASCII letter in the tag (\w would take it)
        "alpine:\u0663",  # an Arabic-Indic digit
        "caf\u00e9/app",
        f"alpine@sha256:{'a' * 64}\n",  # '$' matched before a final newline
        "alpine:latest\n",
        " alpine",
        f"alpine@sha256:{'a' * 63}\u0661",
    ],
)
def test_non_ascii_and_trailing_newline_refused(text: str) -> None:
    """References are ASCII-only and matched whole: no Unicode letters or digits, no trailing newline."""
    with pytest.raises(refs.InvalidReference):
        refs.parse(text)


def test_is_digest_is_anchored() -> None:
    """A blob digest with anything after the hex (a newline too) is not a digest."""
    good = "sha256:" + "a" * 64
    assert refs.is_digest(good)
    assert not refs.is_digest(good + "\n")
    assert not refs.is_digest(good + "a")
    assert not refs.is_digest("sha256:" + "\u0661" * 64)
