"""Image lists: pure parsing of the formats admins already have.

One function reads any mix of, line by line:

- one reference a line, ``#`` comments and blank lines (k3s ``.txt`` lists,
  Che's ``external_images.txt``);
- Kubernetes Image Puller ``IMAGES`` entries, ``name=image;name2=image2;``,
  on one line or several (an ``IMAGES=`` prefix is allowed);
- operator variables ``RELATED_IMAGE_<name>=<image>`` (``export`` and quotes
  allowed).

Every reference is validated; an invalid one is reported with its source
and line number and the valid ones still count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agent.image import refs

# A list larger than this is refused whole: 4 MiB is about 40,000 references,
# ten times the longest list seen (Che's merged external_images.txt).
MAX_LIST_BYTES = 4 << 20
# A reference, or one ``name=image`` item of an IMAGES line, longer than this
# cannot be valid (a name is at most 255 bytes, plus a tag and a digest).
MAX_LINE = 4096
# An IMAGES line holds every item on one line: 1 MiB is about 8,000 items of
# digest references, the longest at most 4096 bytes.
MAX_IMAGES_LINE = 1 << 20

_RELATED = re.compile(r"^(?:export\s+)?RELATED_IMAGE_([A-Za-z0-9_]+)\s*=\s*(.*)$")
_IMAGES_PREFIX = re.compile(r"^(?:export\s+)?IMAGES\s*=\s*")


@dataclass(frozen=True)
class Entry:
    """A wanted image and where it was asked for."""

    ref: str  # normalized
    source: str
    line: int
    name: str = ""  # the entry's own name (Image Puller / RELATED_IMAGE), if any

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class Problem:
    source: str
    line: int
    text: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1].strip()
    return text


def parse(text: str, source: str) -> tuple[list[Entry], list[Problem]]:
    """The entries and problems of one list document.

    A document over :data:`MAX_LIST_BYTES` gives one problem and no entries;
    time is linear in its size.
    """
    entries: list[Entry] = []
    problems: list[Problem] = []
    if len(text) > MAX_LIST_BYTES:
        reason = f"list is larger than {MAX_LIST_BYTES >> 20} MiB"
        return entries, [Problem(source, 0, "", reason)]

    def add(raw: str, lineno: int, name: str = "") -> None:
        candidate = _unquote(raw)
        try:
            entries.append(Entry(refs.normalize(candidate), source, lineno, name))
        except refs.InvalidReference as err:
            problems.append(Problem(source, lineno, candidate, str(err)))

    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if len(stripped) > MAX_IMAGES_LINE:
            reason = f"line over {MAX_IMAGES_LINE} bytes"
            problems.append(Problem(source, lineno, stripped[:80], reason))
            continue
        related = _RELATED.match(stripped)
        body = "" if related else _unquote(_IMAGES_PREFIX.sub("", stripped))
        if not ("=" in body or ";" in body) and len(stripped) > MAX_LINE:
            # One reference a line (or one variable): the bound is the line's.
            problems.append(Problem(source, lineno, stripped[:80], f"line over {MAX_LINE} bytes"))
            continue
        if related:
            add(related.group(2), lineno, related.group(1))
            continue
        if "=" in body or ";" in body:
            for raw_item in body.split(";"):
                item = raw_item.strip()
                if not item:
                    continue
                if len(item) > MAX_LINE:
                    reason = f"item over {MAX_LINE} bytes"
                    problems.append(Problem(source, lineno, item[:80], reason))
                    continue
                name, sep, image = item.partition("=")
                if not sep:
                    problems.append(Problem(source, lineno, item, "expected name=image"))
                    continue
                add(image, lineno, name.strip())
            continue
        add(stripped.split("#", 1)[0], lineno)
    return entries, problems


def union(*lists: list[Entry]) -> dict[str, list[Entry]]:
    """Every wanted reference with all the places that ask for it, sorted by reference."""
    out: dict[str, list[Entry]] = {}
    for entries in lists:
        for e in entries:
            out.setdefault(e.ref, []).append(e)
    return dict(sorted(out.items()))
