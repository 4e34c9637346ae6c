"""The OpenAPI 3.1 description of the cluster API, generated from :mod:`agent.cluster.schema`.

Served at ``/v1/openapi.json``; ``agent/cluster/openapi.json`` is the same
document kept in the repository (a test checks they agree; regenerate with
``python -m agent.cluster.openapi > agent/cluster/openapi.json``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from agent import __version__
from agent.cluster import schema

REF = "#/components/schemas/{model}"


def _schemas() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Any]] = [
        (schema.NodeReport, "validation"),
        (schema.ImageList, "serialization"),
        (schema.Listing, "serialization"),
        (schema.StatusView, "serialization"),
        (schema.Problem, "serialization"),
    ]
    _, top = models_json_schema(models, ref_template=REF)
    return dict(top.get("$defs", {}))


def _json(model: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(model=model)}}},
    }


def _problem(description: str) -> dict[str, Any]:
    return _json("Problem", description)


def _bad_request(description: str) -> dict[str, Any]:
    """400: our own answers are JSON; the HTTP parser's (a request line too long) plain text."""
    doc = _json("Problem", description)
    doc["content"]["text/plain"] = {"schema": {"type": "string"}}
    return doc


NODE = {
    "type": "string",
    "maxLength": schema.NODE_NAME_MAX,
    "pattern": schema.NODE_NAME_PATTERN,
}
AUTH = {"401": _problem("a bearer token is required (--auth-reads) and none valid was sent")}


def _text(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


def _images() -> dict[str, Any]:
    """GET /v1/images: the list for one node, long-polled with If-None-Match."""
    parameters = [
        {"name": "node", "in": "query", "schema": NODE},
        {
            "name": "labels",
            "in": "query",
            "description": "the node's labels, k=v[,k=v]",
            "schema": {"type": "string", "maxLength": 2000},
        },
        {
            "name": "wait",
            "in": "query",
            "description": "hold up to this long (at most 60s) for a change",
            "schema": {"type": "string", "pattern": "^[0-9]{1,2}s$"},
        },
        {
            "name": "If-None-Match",
            "in": "header",
            "description": "the ETag held; compared weakly",
            "schema": {"type": "string", "maxLength": 200},
        },
    ]
    listed = {
        "description": "the list: one image a line, or JSON",
        "headers": {"ETag": {"schema": {"type": "string"}}},
        "content": {
            "text/plain": {"schema": {"type": "string"}},
            "application/json": {"schema": {"$ref": REF.format(model="ImageList")}},
        },
    }
    return {
        "operationId": "getImages",
        "summary": "The images one node should hold (long poll with If-None-Match)",
        "parameters": parameters,
        "responses": {
            "200": listed,
            "304": {"description": "the list has not changed"},
            "400": _bad_request("a malformed parameter"),
            **AUTH,
        },
    }


def _put_status() -> dict[str, Any]:
    """PUT /v1/nodes/{name}/status: a node's report."""
    return {
        "operationId": "putNodeStatus",
        "summary": "A node's report (its own node token, or the shared token)",
        "security": [{"bearer": []}, {}],
        "parameters": [{"name": "name", "in": "path", "required": True, "schema": NODE}],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": REF.format(model="NodeReport")}}},
        },
        "responses": {
            "204": {"description": "stored"},
            "400": _bad_request("the report or the name is invalid; names the field"),
            "401": _problem("no valid bearer token"),
            "403": _problem("the token may not write this node's report"),
            "408": _problem("the body did not arrive in time"),
            "413": _problem("the report is too large"),
        },
    }


def _status() -> dict[str, Any]:
    return {
        "operationId": "getStatus",
        "summary": "node x image view with a summary",
        "responses": {
            "200": _json("StatusView", "the view"),
            "503": _problem("the view is not built yet"),
            **AUTH,
        },
    }


def _listing() -> dict[str, Any]:
    return {
        "operationId": "getList",
        "summary": "the assembled list with provenance, the report and sources",
        "responses": {"200": _json("Listing", "the list"), **AUTH},
    }


def _self() -> dict[str, Any]:
    return {
        "operationId": "getOpenAPI",
        "summary": "this document",
        "responses": {
            "200": {
                "description": "OpenAPI 3.1",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
    }


def _healthz() -> dict[str, Any]:
    return {
        "operationId": "healthz",
        "summary": "ok, or 503 naming a background task that ended",
        "responses": {"200": _text("ok"), "503": _text("a task ended")},
    }


def _metrics() -> dict[str, Any]:
    return {
        "operationId": "metrics",
        "summary": "Prometheus metrics",
        "responses": {"200": _text("text exposition format")},
    }


def document() -> dict[str, Any]:
    """The whole description; key order is kept, as the server serves it unsorted."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "image-agent cluster API",
            "version": __version__,
            "description": "One image list for every node, and every node's report.",
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/images": {"get": _images()},
            "/v1/nodes/{name}/status": {"put": _put_status()},
            "/v1/status": {"get": _status()},
            "/v1/list": {"get": _listing()},
            "/v1/openapi.json": {"get": _self()},
            "/healthz": {"get": _healthz()},
            "/metrics": {"get": _metrics()},
        },
    }


def main() -> int:
    sys.stdout.write(json.dumps(document(), indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
