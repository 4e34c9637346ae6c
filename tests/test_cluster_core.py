"""Cluster component pure parts: sources, assembly, the consistency report, the manifests."""

from __future__ import annotations

import copy
import json
from typing import Any

import kubernetes_validate
import pytest
import yaml
from structlog.typing import EventDict

from agent.cluster import assemble, sources
from agent.cluster.assemble import Contribution
from tests.conftest import ROOT


def test_custom_resource_images() -> None:
    """spec.images of a KubernetesImagePuller resource, in the Image Puller format."""
    text = """
apiVersion: che.eclipse.org/v1alpha1
kind: KubernetesImagePuller
metadata: {name: puller}
spec:
  images: "java=quay.io/eclipse/che-java11-maven:next;theia=quay.io/eclipse/che-theia:next;"
"""
    parsed = sources.custom_resource(text, "cr.yaml")
    assert [(e.name, e.ref) for e in parsed.entries] == [
        ("java", "quay.io/eclipse/che-java11-maven:next"),
        ("theia", "quay.io/eclipse/che-theia:next"),
    ]
    with pytest.raises(sources.SourceError, match="no KubernetesImagePuller"):
        sources.custom_resource("kind: ConfigMap\n", "x")


def test_che_editors_and_samples() -> None:
    """Images are taken from Che editor devfiles and sample devfiles, skipping components without one."""
    editors = json.dumps(
        [
            {
                "metadata": {"name": "che-code"},
                "components": [
                    {"name": "c", "container": {"image": "quay.io/che-incubator/che-code:7.80"}},
                    {"name": "v", "volume": {}},
                ],
            },
        ]
    )
    parsed = sources.che_editors(editors, "che/editors")
    assert [(e.name, e.ref) for e in parsed.entries] == [
        ("editor:che-code", "quay.io/che-incubator/che-code:7.80")
    ]
    urls = sources.che_sample_urls(json.dumps([{"displayName": "Go", "url": "/s/go.yaml"}]), "s")
    assert urls == [("Go", "/s/go.yaml")]
    sample = sources.che_sample_devfile(
        "components:\n- container:\n    image: golang:1.22\n", "go.yaml", "Go"
    )
    assert [e.ref for e in sample.entries] == ["docker.io/library/golang:1.22"]


def test_assembly_dedupes_sorts_rewrites_and_selects() -> None:
    """One sorted list with provenance; mirrors applied; node selectors respected."""
    a = Contribution("a", tuple(sources.plain_list("quay.io/x/b:1\nalpine:3\n", "a").entries))
    b = Contribution(
        "b",
        tuple(sources.plain_list("alpine:3\nnvidia/cuda:12\n", "b").entries),
        node_selector=(("gpu", "true"),),
    )
    rules = [assemble.parse_rewrite("quay.io=registry.internal:5000/quay")]
    out = assemble.assemble([a, b], rules)
    assert [i.image for i in out.items] == [
        "docker.io/library/alpine:3",
        "docker.io/nvidia/cuda:12",
        "registry.internal:5000/quay/x/b:1",
    ]
    assert out.items[0].sources == ["a:2", "b:1"]
    assert out.for_node({}) == ["docker.io/library/alpine:3", "registry.internal:5000/quay/x/b:1"]
    assert "docker.io/nvidia/cuda:12" in out.for_node({"gpu": "true"})
    assert assemble.etag(out.for_node({})) != assemble.etag(out.for_node({"gpu": "true"}))


def test_consistency_report() -> None:
    """Editors on the generic UDI, several tags of one repository and :latest are reported."""
    editors = sources.che_editors(
        json.dumps(
            [
                {
                    "metadata": {"name": "broken"},
                    "components": [
                        {
                            "container": {
                                "image": "quay.io/devfile/universal-developer-image:ubi8-latest"
                            }
                        }
                    ],
                }
            ]
        ),
        "ed",
    )
    plain = sources.plain_list("quay.io/devfile/universal-developer-image:ubi9\nbusybox\n", "l")
    out = assemble.assemble(
        [Contribution("ed", tuple(editors.entries)), Contribution("l", tuple(plain.entries))], []
    )
    text = "\n".join(out.report)
    assert "editor entry (editor:broken) points at the generic universal developer image" in text
    assert "quay.io/devfile/universal-developer-image: listed with several tags" in text
    assert "docker.io/library/busybox:latest: ':latest'" in text


def test_deploy_manifests_validate() -> None:
    """deploy/ passes strict validation against the Kubernetes schemas; a broken copy does not."""
    docs = []
    for path in sorted((ROOT / "deploy").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "DaemonSet"} <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30", strict=True)
    broken = copy.deepcopy(next(d for d in docs if d["kind"] == "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30", strict=True)


def test_weak_etag_comparison() -> None:
    """If-None-Match matches by weak comparison, in lists, and with *; other tags do not match."""
    from agent.cluster.state import weak_match

    assert weak_match('"abc"', '"abc"')
    assert weak_match('W/"abc"', '"abc"')
    assert weak_match('"x", W/"abc"', '"abc"')
    assert weak_match("*", '"abc"')
    assert not weak_match('"abd"', '"abc"')
    assert not weak_match("", '"abc"')


def test_node_names() -> None:
    """Node names are DNS-1123 subdomains of at most 253 characters."""
    from agent.cluster.schema import valid_node_name

    for good in ("n1", "node-1.example.com", "a" * 63, ".".join(["a" * 63] * 3) + ".abc"):
        assert valid_node_name(good), good
    for bad in (
        "",
        "..",
        "/",
        "a/b",
        "\x00",
        "\n",
        "UPPER",
        "-a",
        "a-",
        "a" * 64,
        "a." * 127 + "ab",
    ):
        assert not valid_node_name(bad), bad


def test_node_tokens_allow_only_their_node() -> None:
    """A node token writes and reads for its node only; the shared token reads, and writes only without a node secret."""
    from agent.cluster.tokens import Credentials, bearer, node_token

    secret = b"0123456789abcdef-secret"
    creds = Credentials(shared="shared", node_secret=secret)
    t1 = node_token(secret, "n1")
    assert creds.may_write(t1, "n1") and not creds.may_write(t1, "n2")
    assert not creds.may_write("shared", "n1") and not creds.may_write(None, "n1")
    assert creds.may_read("shared") and creds.may_read(t1, "n1")
    assert not creds.may_read(t1) and not creds.may_read(t1, "n2")
    legacy = Credentials(shared="shared")
    assert legacy.may_write("shared", "any") and not legacy.may_write("other", "any")
    assert Credentials().may_write(None, "n1")  # nothing configured: open, as documented
    assert bearer("Bearer abc") == "abc"
    assert bearer("Bearer \xff\xfe") is None and bearer("Basic abc") is None and bearer("") is None


def test_redaction() -> None:
    """user:pass@ leaves URLs and error texts; other text is unchanged."""
    from agent.cluster.fetch import parse_source, redact, scrub

    url = "https://bot:s3cret@che.example.com/x"
    assert redact(url) == "https://***@che.example.com/x"
    assert redact("/etc/list.txt") == "/etc/list.txt"
    assert "s3cret" not in scrub(f"GET {url} failed for bot:s3cret", url)
    assert "s3cret" not in parse_source("list", url).id


def test_report_schema_names_the_field() -> None:
    """Reports are validated by the shared model; errors name the field; depth and size are bounded."""
    from agent.cluster import schema

    good = schema.parse_report(
        b'{"pulls": [{"image": "a", "state": "pulled", "last_error": null}]}'
    )
    assert good.pulls[0].last_error == ""
    for body, field in (
        (b'{"archives": 5}', "archives"),
        (b'{"pulls": [{"image": "a"}]}', "pulls.0.state"),
        (b'{"labels": {"a": 1}}', "labels.a"),
        (b"[]", "document"),
    ):
        with pytest.raises(schema.SchemaError, match=f"^{field}"):
            schema.parse_report(body)
    with pytest.raises(schema.SchemaError, match=r"^document: Invalid JSON"):
        schema.parse_report(b"[" * 100_000)
    with pytest.raises(schema.SchemaError, match="larger"):
        schema.parse_report(b" " * (schema.MAX_REPORT_BYTES + 1))


def test_agent_report_always_fits_the_schema() -> None:
    """What the agent sends is built through the model: long errors are clipped, not refused."""
    from agent.cluster import schema
    from agent.cluster.sync import build_report

    raw = {
        "pulls": [{"image": "docker.io/library/a:1", "state": "failed", "last_error": "e" * 5000}],
        "archives": [{"path": "/x.tar", "state": "imported", "images": ["a"], "error": None}],
    }
    report = build_report("n1", {"zone": "a"}, raw)
    again = schema.parse_report(report.model_dump_json().encode())
    assert len(again.pulls[0].last_error) == schema.MAX_ERROR_CHARS
    assert again.archives[0].error == ""


def test_rewrites_are_checked() -> None:
    """A --rewrite whose target is no valid mirror is refused at start; one that still yields a bad name is a problem, not a crash."""
    with pytest.raises(ValueError, match="not a valid mirror"):
        assemble.parse_rewrite("quay.io=reg/Quay")
    a = Contribution("a", tuple(sources.plain_list("quay.io/x/b:1\n", "a").entries))
    out = assemble.assemble([a], [("quay.io", "reg/Quay")])  # as if it came past the check
    assert out.items == [] and "is not valid" in out.problems[0]


def test_custom_resource_with_bad_spec() -> None:
    """spec: "x" is a SourceError (the source fails and keeps its last list), not an AttributeError."""
    text = "kind: KubernetesImagePuller\nspec: x\n"
    with pytest.raises(sources.SourceError, match="spec is not an object"):
        sources.custom_resource(text, "cr.yaml")


def test_ended_task_fails_healthz_and_is_logged_once() -> None:
    """A supervised background task that ends unexpectedly turns /healthz to 503 and logs once."""
    import asyncio

    import structlog
    from aiohttp.test_utils import TestClient, TestServer

    from agent.cluster.fetch import Sources
    from agent.cluster.http import Options
    from agent.cluster.server import Server
    from agent.cluster.state import State

    async def run() -> tuple[int, str, list[dict[str, Any]]]:
        events: list[dict[str, Any]] = []

        def keep(_logger: object, _method: str, event: EventDict) -> EventDict:
            events.append(dict(event))
            return event

        log = structlog.wrap_logger(structlog.ReturnLogger(), processors=[keep])
        server = Server(State(), Sources([], 60.0), Options(), log)

        async def broken() -> None:
            raise RuntimeError("boom")

        task = server.supervise("broken", broken())
        await asyncio.gather(task, return_exceptions=True)
        async with TestClient(TestServer(server.app())) as client:
            resp = await client.get("/healthz")
            return resp.status, await resp.text(), events

    status, text, events = asyncio.run(run())
    assert status == 503 and "broken" in text and "boom" in text
    assert [e["event"] for e in events] == ["task.died"]


def test_cluster_view_groups_and_marks_stale() -> None:
    """The view: present, failed (with reason), missing and stale nodes per image, and the summary."""
    from agent.cluster import schema
    from agent.cluster.state import State, cluster_view, render_view, summary_line

    state = State(order=["l"])
    state.contribute(Contribution("l", tuple(sources.plain_list("a:1\nb:1\n", "l").entries)))
    state.rebuild()

    def report(pulls: dict[str, tuple[str, str]]) -> schema.NodeReport:
        return schema.NodeReport(
            pulls=[schema.PullStatus(image=i, state=s, last_error=e) for i, (s, e) in pulls.items()]
        )

    a, b = "docker.io/library/a:1", "docker.io/library/b:1"
    state.record("n1", report({a: ("present", ""), b: ("present", "")}), now=1000)
    state.record("n2", report({a: ("failed", "unauthorized: no")}), now=1000)
    state.record("n3", report({}), now=0)
    view = cluster_view(state.snapshot(), now=1001, stale_after=900)
    assert view["summary"]["complete"] == 1 and view["summary"]["nodes"] == 3
    assert view["images"][a]["failed"] == {"n2": "unauthorized: no"}
    assert view["images"][b]["missing"] == ["n2"]
    assert view["images"][a]["stale"] == ["n3"]
    schema.StatusView.model_validate(view)
    assert json.loads(render_view(state.snapshot(), 1001, 900)) == {
        **view,
        "summary": {**view["summary"], "built_at": 1001},
    }
    assert summary_line(view).startswith("1/3 nodes complete")
    assert state.forget_older_than(500) == ["n3"]


def test_openapi_document_is_current() -> None:
    """agent/cluster/openapi.json is what the models generate (regenerate it when they change)."""
    from agent.cluster import openapi

    kept = json.loads((ROOT / "agent" / "cluster" / "openapi.json").read_text())
    assert kept == json.loads(json.dumps(openapi.document()))


def test_serve_config_from_environment() -> None:
    """ClusterServeConfig: flags win over IMAGE_AGENT_CLUSTER_* variables; lists in env are one a line."""
    import argparse

    from agent import config

    parser = argparse.ArgumentParser()
    config.add_arguments(parser, config.ClusterServeConfig)
    env = {
        "IMAGE_AGENT_CLUSTER_SOURCE_IMAGES": "a=alpine:3;node-selector=k=v,x=y\nb=busybox",
        "IMAGE_AGENT_CLUSTER_AUTH_READS": "true",
        "IMAGE_AGENT_CLUSTER_MAX_CONNECTIONS": "500",
        "IMAGE_AGENT_CLUSTER_FORGET_AFTER": "2h",
    }
    cfg = config.resolve(
        config.ClusterServeConfig, parser.parse_args(["--max-connections", "7"]), env
    )
    assert cfg.source_images == ("a=alpine:3;node-selector=k=v,x=y", "b=busybox")
    assert cfg.auth_reads is True and cfg.max_connections == 7 and cfg.forget_after_s == 7200
    bare = config.resolve(config.ClusterServeConfig, parser.parse_args(["--auth-reads"]), {})
    assert bare.auth_reads is True
