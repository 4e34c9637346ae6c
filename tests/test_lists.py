"""Pull-list parsing (pure): the formats admins already have."""

from __future__ import annotations

from agent.image import lists


def test_plain_list_with_comments_and_invalid_lines() -> None:
    """k3s-style lists: invalid lines are reported with file and line; valid ones still count."""
    text = (
        "# workspace images\n\nalpine:3.19\nquay.io/che/udi:latest  # the UDI\nNot Valid!\n"
        "x:" + "t" * 129 + "\n"
    )
    entries, problems = lists.parse(text, "images/ws.txt")
    assert [e.ref for e in entries] == ["docker.io/library/alpine:3.19", "quay.io/che/udi:latest"]
    assert [e.where for e in entries] == ["images/ws.txt:3", "images/ws.txt:4"]
    assert [(p.line, p.source) for p in problems] == [(5, "images/ws.txt"), (6, "images/ws.txt")]
    assert "invalid tag" in problems[1].reason


def test_image_puller_images_string() -> None:
    """IMAGES=name=image;name2=image2; on one line or several, with or without the prefix."""
    text = (
        'IMAGES="java11=quay.io/eclipse/che-java11-maven:next;theia=quay.io/eclipse/che-theia:next;"\n'
        "node=node:18;\nbroken;\n"
    )
    entries, problems = lists.parse(text, "cm")
    assert [(e.name, e.ref) for e in entries] == [
        ("java11", "quay.io/eclipse/che-java11-maven:next"),
        ("theia", "quay.io/eclipse/che-theia:next"),
        ("node", "docker.io/library/node:18"),
    ]
    assert len(problems) == 1 and problems[0].line == 3 and "name=image" in problems[0].reason


def test_related_image_variables() -> None:
    """Che operator RELATED_IMAGE_* variables (plain or exported, quoted) are read as named entries."""
    text = (
        "RELATED_IMAGE_editor_definition_che_code=quay.io/che-incubator/che-code:7.80\n"
        "export RELATED_IMAGE_sample_devfile_go='quay.io/devfile/universal-developer-image@sha256:"
        + "a" * 64
        + "'\n"
    )
    entries, problems = lists.parse(text, "operator.env")
    assert problems == []
    assert entries[0].name == "editor_definition_che_code"
    assert entries[1].ref.endswith("@sha256:" + "a" * 64)


def test_union_keeps_every_source() -> None:
    """The union of lists keys on the normalized reference and keeps every file:line that wants it."""
    a, _ = lists.parse("alpine\n", "a.txt")
    b, _ = lists.parse("docker.io/library/alpine:latest\nbusybox\n", "b.txt")
    u = lists.union(a, b)
    assert list(u) == ["docker.io/library/alpine:latest", "docker.io/library/busybox:latest"]
    assert [e.where for e in u["docker.io/library/alpine:latest"]] == ["a.txt:1", "b.txt:1"]


def test_oversized_list_and_lines_bounded() -> None:
    """A list over the size limit is one problem, not a long parse; an over-long line is one problem and the rest still count."""
    import time

    start = time.monotonic()
    entries, problems = lists.parse("a" * (lists.MAX_LIST_BYTES + 1), "huge.txt")
    assert entries == [] and len(problems) == 1 and "larger than" in problems[0].reason
    text = "alpine\n" + "x" * (lists.MAX_LINE + 1) + "\nbusybox\n"
    entries, problems = lists.parse(text, "l.txt")
    assert [e.ref for e in entries] == [
        "docker.io/library/alpine:latest",
        "docker.io/library/busybox:latest",
    ]
    assert [p.line for p in problems] == [2]
    assert time.monotonic() - start < 20  # linear, not quadratic: a generous margin


def test_non_ascii_reference_in_list_is_a_problem() -> None:
    """A tag with a non-ASCII letter is reported with its line, not accepted."""
    entries, problems = lists.parse("alpine:t\u00e9st\nbusybox\n", "l.txt")
    assert [e.ref for e in entries] == ["docker.io/library/busybox:latest"]
    assert [p.line for p in problems] == [1]


def test_images_line_is_bounded_per_item() -> None:
    """An Image Puller IMAGES line of 40 digest references (about 4.8 KB) is read whole: the
    length bound applies to each name=image item, and an over-long item is one problem."""
    items = [f"img{i}=quay.io/eclipse/che-image-{i}@sha256:{i:064x}" for i in range(40)]
    line = "IMAGES=" + ";".join(items) + ";"
    assert len(line) > lists.MAX_LINE
    entries, problems = lists.parse(line + "\n", "cm")
    assert problems == [] and len(entries) == 40
    assert entries[39].name == "img39" and entries[39].ref.endswith(f"@sha256:{39:064x}")
    long_item = "big=x:" + "t" * lists.MAX_LINE
    entries, problems = lists.parse(f"a=alpine;{long_item};b=busybox;\n", "cm")
    assert [e.name for e in entries] == ["a", "b"]
    assert [p.reason for p in problems] == [f"item over {lists.MAX_LINE} bytes"]
    huge = "a=alpine;" * (lists.MAX_IMAGES_LINE // 9 + 1)
    entries, problems = lists.parse(huge + "\nbusybox\n", "cm")
    assert [e.ref for e in entries] == ["docker.io/library/busybox:latest"]
    assert [p.line for p in problems] == [1] and "line over" in problems[0].reason
