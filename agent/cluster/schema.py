"""The cluster wire schema: the documents ``cluster serve`` and the agents exchange.

Both sides import these models and validate at the edge: the server every
report it receives, the agent every list it receives. Errors become one line
naming the field that is wrong (:func:`first_error`). The OpenAPI document
(:mod:`agent.cluster.openapi`) is generated from the same models.

Nesting is bounded by pydantic-core's parser for reports (the hot path) and
by :mod:`agent.boundedjson` for lists. Limits are part of the schema: a
report may carry up to ``MAX_PULLS`` pulls and ``MAX_ARCHIVES`` archives,
and its body up to ``MAX_REPORT_BYTES``
(10,000 pulls of 100-character names with 200-character errors take about
3.3 MB as JSON, so 4 MiB holds them).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from agent import boundedjson

MAX_REPORT_BYTES = 4 << 20
MAX_LIST_BYTES = 16 << 20
MAX_DEPTH = 16
MAX_PULLS = 10_000
MAX_ARCHIVES = 10_000
MAX_LABELS = 64
MAX_ERROR_CHARS = 1024

# Kubernetes node names are DNS-1123 subdomains: lower-case alphanumerics,
# '-' and '.', each dot-separated part starting and ending alphanumeric.
NODE_NAME_MAX = 253
NODE_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$"
_NODE_NAME = re.compile(NODE_NAME_PATTERN)


class SchemaError(ValueError):
    """A document does not follow the schema; ``str()`` names the field, in one line."""


def valid_node_name(name: str) -> bool:
    """A DNS-1123 subdomain of at most 253 characters."""
    return 0 < len(name) <= NODE_NAME_MAX and _NODE_NAME.fullmatch(name) is not None


def _none_as_empty(value: Any) -> Any:
    return "" if value is None else value


Text = Annotated[str, Field(max_length=4096)]
ErrorText = Annotated[str, BeforeValidator(_none_as_empty), Field(max_length=MAX_ERROR_CHARS)]
LabelKey = Annotated[str, Field(min_length=1, max_length=317)]
LabelValue = Annotated[str, Field(max_length=255)]
ImageName = Annotated[str, Field(min_length=1, max_length=1024)]
State = Annotated[str, Field(min_length=1, max_length=32)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class PullStatus(_Model):
    """One wanted image on a node: its pull state and the last error, if any."""

    image: ImageName
    state: State
    last_error: ErrorText = ""


class ArchiveStatus(_Model):
    """One archive the node imported (or failed to)."""

    path: Text
    state: State
    images: list[ImageName] = Field(default_factory=list, max_length=1000)
    error: ErrorText = ""


class NodeReport(_Model):
    """What a node sends to ``PUT /v1/nodes/{name}/status``."""

    node: str | None = Field(default=None, max_length=NODE_NAME_MAX)
    labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=MAX_LABELS)
    archives: list[ArchiveStatus] = Field(default_factory=list, max_length=MAX_ARCHIVES)
    pulls: list[PullStatus] = Field(default_factory=list, max_length=MAX_PULLS)
    sent_at: float | None = None


class ImageList(_Model):
    """``GET /v1/images`` as JSON: the images one node should hold."""

    images: list[ImageName]
    version: int = Field(ge=0)


class Problem(_Model):
    error: str


class ListItem(_Model):
    image: str
    sources: list[str]
    names: list[str]
    node_selectors: list[dict[str, str]]


class SourceStatus(_Model):
    ok: bool
    error: str
    checked_at: float
    images: int | None = None
    invalid: int | None = None


class Listing(_Model):
    """``GET /v1/list``: the assembled list with provenance, the report and every source's state."""

    version: int
    images: list[ListItem]
    report: list[str]
    invalid: list[str]
    sources: dict[str, SourceStatus]


class ImageRow(_Model):
    present: list[str]
    pulling: list[str]
    failed: dict[str, str]
    missing: list[str]
    stale: list[str]


class NodeRow(_Model):
    labels: dict[str, str]
    received_at: float
    archives: dict[str, int]


class Summary(_Model):
    nodes: int
    complete: int
    images: int
    version: int
    built_at: float


class StatusView(_Model):
    """``GET /v1/status``: node x image, with a summary."""

    summary: Summary
    images: dict[str, ImageRow]
    nodes: dict[str, NodeRow]


def first_error(err: ValidationError) -> str:
    """``pulls.3.state: Input should be a valid string`` (the first problem; the count if more)."""
    errors = err.errors(include_url=False, include_input=False)
    if not errors:
        return "invalid document"
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "document"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def parse_report(body: bytes) -> NodeReport:
    """A node report from the wire; SchemaError (one line, naming the field) otherwise."""
    if len(body) > MAX_REPORT_BYTES:
        raise SchemaError(f"report is larger than {MAX_REPORT_BYTES} bytes")
    # pydantic-core's JSON parser bounds nesting itself (an error, not a RecursionError),
    # and in one pass; a separate depth scan would cost more than the validation.
    try:
        return NodeReport.model_validate_json(body)
    except ValidationError as err:
        raise SchemaError(first_error(err)) from None


def parse_image_list(body: bytes) -> ImageList:
    """The JSON list from the wire; SchemaError (one line) otherwise."""
    if len(body) > MAX_LIST_BYTES:
        raise SchemaError(f"image list is larger than {MAX_LIST_BYTES} bytes")
    if boundedjson.depth(body) > MAX_DEPTH:
        raise SchemaError(f"image list nests deeper than {MAX_DEPTH} levels")
    try:
        return ImageList.model_validate_json(body)
    except ValidationError as err:
        raise SchemaError(first_error(err)) from None
