"""Cluster component pure parts: sources, assembly, the consistency report, the manifests."""

from __future__ import annotations

import copy
import json

import kubernetes_validate
import pytest
import yaml

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
