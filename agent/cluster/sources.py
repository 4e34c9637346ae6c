"""Image sources admins already use, parsed into list entries (pure functions over text).

- Image Puller ``IMAGES`` strings (``name=image;...``);
- ``KubernetesImagePuller`` custom resources (``spec.images``, same format);
- plain lists (``external_images.txt``);
- Che dashboard documents: editors (a JSON array of devfiles) and air-gap
  samples (a JSON array whose entries' ``url`` is a devfile);
- operator env files (``RELATED_IMAGE_<name>=<image>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from agent import boundedjson
from agent.image import lists
from agent.image.lists import Entry, Problem

EDITORS_PATH = "/dashboard/api/editors"
SAMPLES_PATH = "/dashboard/api/airgap-sample"
MAX_DOCUMENT_BYTES = 8 << 20


class SourceError(Exception):
    """A source could not be read or parsed; its last good contribution stays."""


@dataclass(frozen=True)
class Parsed:
    entries: list[Entry]
    problems: list[Problem]


def images_string(text: str, source: str) -> Parsed:
    return Parsed(*lists.parse(text, source))


def plain_list(text: str, source: str) -> Parsed:
    return Parsed(*lists.parse(text, source))


def env_file(text: str, source: str) -> Parsed:
    return Parsed(*lists.parse(text, source))


def custom_resource(text: str, source: str) -> Parsed:
    """``spec.images`` of a KubernetesImagePuller resource (one or more YAML documents)."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise SourceError(f"{source}: not valid YAML ({err})") from None
    entries: list[Entry] = []
    problems: list[Problem] = []
    found = False
    for doc in docs:
        if not isinstance(doc, dict) or doc.get("kind") != "KubernetesImagePuller":
            continue
        spec = doc.get("spec") or {}
        if not isinstance(spec, dict):
            raise SourceError(f"{source}: spec is not an object")
        images = spec.get("images", "")
        if not isinstance(images, str):
            raise SourceError(f"{source}: spec.images is not a string")
        found = True
        e, p = lists.parse(images, source)
        entries += e
        problems += p
    if not found:
        raise SourceError(f"{source}: no KubernetesImagePuller resource")
    return Parsed(entries, problems)


def devfile_images(doc: Any) -> list[str]:
    """``components[].container.image`` of a devfile."""
    out = []
    for component in (doc or {}).get("components") or [] if isinstance(doc, dict) else []:
        container = component.get("container") if isinstance(component, dict) else None
        image = container.get("image") if isinstance(container, dict) else None
        if isinstance(image, str) and image.strip():
            out.append(image.strip())
    return out


def _json_array(text: str, source: str, what: str) -> list[Any]:
    try:
        doc = boundedjson.loads(text, what=source, max_bytes=MAX_DOCUMENT_BYTES)
    except boundedjson.JSONLimitError as err:
        raise SourceError(str(err)) from None
    if not isinstance(doc, list):
        raise SourceError(f"{source}: expected a JSON array of {what}")
    return doc


def che_editors(text: str, source: str) -> Parsed:
    """The dashboard's editors: a JSON array of devfiles. Entries are named ``editor:<id>``."""
    doc = _json_array(text, source, "devfiles")
    entries, problems = [], []
    for i, devfile in enumerate(doc):
        meta = devfile.get("metadata") if isinstance(devfile, dict) else None
        name = (meta or {}).get("name", f"editor-{i}") if isinstance(meta, dict) else f"editor-{i}"
        for image in devfile_images(devfile):
            e, p = lists.parse(image, source)
            entries += [Entry(x.ref, source, i + 1, f"editor:{name}") for x in e]
            problems += [Problem(source, i + 1, x.text, x.reason) for x in p]
    return Parsed(entries, problems)


def che_sample_urls(text: str, source: str) -> list[tuple[str, str]]:
    """(name, devfile url) of every air-gap sample."""
    doc = _json_array(text, source, "samples")
    out = []
    for i, sample in enumerate(doc):
        if isinstance(sample, dict) and isinstance(sample.get("url"), str):
            out.append((str(sample.get("displayName") or sample.get("id") or i), sample["url"]))
    return out


def che_sample_devfile(text: str, source: str, name: str) -> Parsed:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SourceError(f"{source}: not valid YAML ({err})") from None
    entries, problems = [], []
    for image in devfile_images(doc):
        e, p = lists.parse(image, source)
        entries += [Entry(x.ref, source, 1, f"sample:{name}") for x in e]
        problems += p
    return Parsed(entries, problems)
