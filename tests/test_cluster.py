"""The cluster component over real HTTP on loopback, with agents as separate processes."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent.containerd import Containerd
from agent.image.platforms import Platform
from agent.testing import samples
from agent.testing.processes import DaemonProcess, wait_for
from agent.testing.sandbox import PrivateContainerd
from tests.conftest import ROOT, ServeFiles, StartCluster, StartDaemon, StartRegistry


def test_sources_assembled_with_provenance_and_report(
    cluster: StartCluster, fixtures: ServeFiles, tmp_path: Path
) -> None:
    """Che editors and samples, a CR, an env file and an IMAGES string become one reported list."""
    che = fixtures(
        {
            "/dashboard/api/editors": json.dumps(
                [
                    {
                        "metadata": {"name": "che-code"},
                        "components": [
                            {"container": {"image": "quay.io/che-incubator/che-code:7.80"}}
                        ],
                    },
                    {
                        "metadata": {"name": "broken-editor"},
                        "components": [
                            {
                                "container": {
                                    "image": "quay.io/devfile/universal-developer-image:ubi8-latest"
                                }
                            }
                        ],
                    },
                ]
            ).encode(),
            "/dashboard/api/airgap-sample": json.dumps(
                [{"displayName": "Go", "url": "/samples/go.yaml"}]
            ).encode(),
            "/samples/go.yaml": b"schemaVersion: 2.2.0\ncomponents:\n- name: tools\n  container:\n    image: quay.io/devfile/golang:1.22\n",
        }
    )
    cr = tmp_path / "cr.yaml"
    cr.write_text(
        "apiVersion: che.eclipse.org/v1alpha1\nkind: KubernetesImagePuller\nmetadata: {name: p}\n"
        "spec:\n  images: 'node=node:18;'\n"
    )
    env = tmp_path / "operator.env"
    env.write_text("RELATED_IMAGE_editor_definition_code=quay.io/che-incubator/che-code:7.80\n")
    c = cluster(
        "--source-che",
        che.url,
        "--source-cr",
        str(cr),
        "--source-env",
        str(env),
        "--source-images",
        "bad=NOT VALID;ok=busybox:1.36;",
        "--rewrite",
        "quay.io=mirror.internal:5000/quay",
    )
    doc = c.listing()
    images = {i["image"]: i for i in doc["images"]}
    assert set(images) == {
        "mirror.internal:5000/quay/che-incubator/che-code:7.80",
        "mirror.internal:5000/quay/devfile/universal-developer-image:ubi8-latest",
        "mirror.internal:5000/quay/devfile/golang:1.22",
        "docker.io/library/node:18",
        "docker.io/library/busybox:1.36",
    }
    code = images["mirror.internal:5000/quay/che-incubator/che-code:7.80"]
    assert len(code["sources"]) == 2  # the Che dashboard and the operator env file
    assert any("universal developer image" in line for line in doc["report"])
    assert any("NOT VALID" in line for line in doc["invalid"])
    text = subprocess.run(
        [sys.executable, "-m", "agent", "cluster", "images", "--cluster-url", c.url],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    ).stdout
    assert "warning:" in text and "invalid:" in text


def test_etag_304_and_long_poll(cluster: StartCluster, tmp_path: Path) -> None:
    """A node's list has a strong ETag; 304 while it holds; a long poll returns as soon as it changes."""
    lst = tmp_path / "list.txt"
    lst.write_text("alpine:3.19\n")
    c = cluster("--source-list", str(lst))
    status, headers, body = c.get("/v1/images?node=n1")
    assert status == 200 and body == b"docker.io/library/alpine:3.19\n"
    tag = headers["ETag"]
    assert tag.startswith('"') and not tag.startswith("W/")
    assert c.get("/v1/images?node=n1", {"If-None-Match": tag})[0] == 304
    responses: list[tuple[int, dict[str, str], bytes]] = []
    seconds: list[float] = []

    def poll() -> None:
        start = time.monotonic()
        responses.append(c.get("/v1/images?node=n1&wait=20s", {"If-None-Match": tag}, timeout=30))
        seconds.append(time.monotonic() - start)

    t = threading.Thread(target=poll)
    t.start()
    lst.write_text("alpine:3.19\nbusybox:1.36\n")
    t.join(30)
    (status, headers, body), (waited,) = responses[0], seconds
    assert status == 200 and b"busybox" in body and headers["ETag"] != tag
    assert waited < 15  # returned on the change, not at the end of the wait
    as_json = json.loads(c.get("/v1/images?node=n1", {"Accept": "application/json"})[2])
    assert as_json["images"] == ["docker.io/library/alpine:3.19", "docker.io/library/busybox:1.36"]


def test_broken_source_keeps_last_list(cluster: StartCluster, fixtures: ServeFiles) -> None:
    """A source URL that starts failing keeps its last good images; the failure is reported."""
    src = fixtures({"/external_images.txt": b"quay.io/a/b:1\n"})
    c = cluster("--source-list", src.url + "/external_images.txt", "--source-interval", "1")
    assert c.get("/v1/images")[2] == b"quay.io/a/b:1\n"
    src.failing.add("/external_images.txt")
    wait_for(
        lambda: not c.listing()["sources"][f"list:{src.url}/external_images.txt"]["ok"],
        90,
        "the failure to be reported",
    )
    assert c.get("/v1/images")[2] == b"quay.io/a/b:1\n"
    metrics = c.get("/metrics")[2].decode()
    assert 'image_agent_cluster_source_ok{source="list:' in metrics and "} 0.0" in metrics


def test_auth_and_bad_bodies(cluster: StartCluster, tmp_path: Path) -> None:
    """Writes need the bearer token; malformed or oversized reports get 400/413 and change nothing."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    c = cluster("--source-images", "alpine:3.19", "--token-file", str(token), "--auth-reads")
    good = json.dumps(
        {"pulls": [{"image": "docker.io/library/alpine:3.19", "state": "pulled"}]}
    ).encode()
    assert c.put("/v1/nodes/n1/status", good) == 401
    assert c.put("/v1/nodes/n1/status", good, token="wrong") == 401
    assert c.get("/v1/images")[0] == 401
    assert c.put("/v1/nodes/n1/status", b"{not json", token="s3cret") == 400
    assert c.put("/v1/nodes/n1/status", b'{"pulls": "x"}', token="s3cret") == 400
    assert c.put("/v1/nodes/n1/status", b"[" + b" " * (5 << 20) + b"]", token="s3cret") == 413
    view = json.loads(c.get("/v1/status", {"Authorization": "Bearer s3cret"})[2])
    assert view["nodes"] == {}
    assert c.put("/v1/nodes/n1/status", good, token="s3cret") == 204

    def complete() -> int:
        view = json.loads(c.get("/v1/status", {"Authorization": "Bearer s3cret"})[2])
        return int(view["summary"]["complete"])

    wait_for(lambda: complete() == 1, 10, "the view to show the report")


def test_agents_converge_and_show_in_cluster_status(
    cluster: StartCluster,
    daemon: StartDaemon,
    registry: StartRegistry,
    node: Platform,
    tmp_path: Path,
) -> None:
    """Two agents (separate processes) follow the list, pull it, and the cluster view shows both complete."""
    reg = registry()
    image = samples.simple_image("fleet/app:1", {"f": os.urandom(100_000)}, node, "gzip")
    src = tmp_path / "src.tar"
    src.write_bytes(samples.oci_archive([image]))
    reg.push(src, "fleet/app:1")
    ref = f"{reg.host}/fleet/app:1"
    lst = tmp_path / "fleet.txt"
    lst.write_text(ref + "\n")
    token = tmp_path / "token"
    token.write_text("fleet-token")
    c = cluster("--source-list", str(lst), "--token-file", str(token))
    agents = [
        daemon(
            "--cluster-url",
            c.url,
            "--cluster-token-file",
            str(token),
            "--node-name",
            name,
            "--report-interval",
            "2",
        )
        for name in ("n1", "n2")
    ]
    for a in agents:
        a.start()

    def view() -> dict[str, Any]:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent",
                "cluster",
                "status",
                "-o",
                "json",
                "--cluster-url",
                c.url,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=False,
        )
        status: dict[str, Any] = json.loads(out.stdout)
        return status

    wait_for(lambda: view()["summary"]["complete"] == 2, 90, "both nodes complete")
    assert sorted(view()["images"][ref]["present"]) == ["n1", "n2"]
    table = subprocess.run(
        [sys.executable, "-m", "agent", "cluster", "status", "--cluster-url", c.url],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    ).stdout
    assert "2/2 nodes complete" in table
    for a in agents:
        cached = json.loads((a.state / "cluster-list.json").read_text())
        assert cached["images"] == [ref]


def test_tls(cluster: StartCluster, tmp_path: Path) -> None:
    """With --tls-cert/--tls-key the API is served over HTTPS only."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    c = cluster(
        "--source-images",
        "alpine:3.19",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        scheme="https",
        cafile=str(cert),
    )
    assert c.get("/v1/images")[2] == b"docker.io/library/alpine:3.19\n"
    # Refused, reset or answered with an error status: never served in the clear.
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{c.port}/v1/images", timeout=5)


def test_agent_works_from_cached_list_while_cluster_is_down(
    cluster: StartCluster,
    daemon: StartDaemon,
    registry: StartRegistry,
    ctd: PrivateContainerd,
    client: Containerd,
    node: Platform,
    tmp_path: Path,
) -> None:
    """An agent restarted while the cluster is unreachable pulls from the list it kept."""
    from tests.conftest import ctr
    from tests.helpers import cri_by_tag

    reg = registry()
    image = samples.simple_image("cached/app:1", {"f": b"cached"}, node, "gzip")
    src = tmp_path / "src.tar"
    src.write_bytes(samples.oci_archive([image]))
    reg.push(src, "cached/app:1")
    ref = f"{reg.host}/cached/app:1"
    lst = tmp_path / "l.txt"
    lst.write_text(ref + "\n")
    c = cluster("--source-list", str(lst))
    a = daemon("--cluster-url", c.url, "--node-name", "n1")
    a.start()
    wait_for(lambda: ref in cri_by_tag(client), 60, "the pull")
    assert a.stop() == 0
    c.close()
    for rec in client.list_images():
        if rec.name.startswith(f"{reg.host}/cached/app"):
            ctr(ctd, "k8s.io", "images", "rm", rec.name)
    # The CRI's image cache follows removals by events: let it forget before looking again.
    wait_for(lambda: ref not in cri_by_tag(client), 90, "the CRI to drop the image")
    a.start()
    wait_for(
        lambda: ref in cri_by_tag(client) and a.named("cluster.unreachable"),
        60,
        "the pull from the cached list",
    )


def _list_events(agent: DaemonProcess) -> list[int]:
    return [int(e["images"]) for e in agent.named("cluster.list")]


def test_agent_never_takes_a_cut_list(
    cluster: StartCluster, daemon: StartDaemon, tmp_path: Path
) -> None:
    """A list whose body is cut before Content-Length is an error: not cached, not applied, asked again."""
    from agent.testing.proxy import Proxy

    images = [f"127.0.0.1:1/fleet/image-{i:03d}:1" for i in range(300)]
    lst = tmp_path / "fleet.txt"
    lst.write_text("\n".join(images) + "\n")
    c = cluster("--source-list", str(lst))
    proxy = Proxy(f"127.0.0.1:{c.port}", cut_after=6000)
    a = daemon(
        "--cluster-url", f"http://{proxy.host}", "--node-name", "n1", "--cluster-min-poll", "1"
    )
    a.start()
    wait_for(lambda: _list_events(a), 60, "the list")
    assert proxy.cuts == 1
    assert _list_events(a) == [300]  # the only list taken is the whole one
    assert any("cut short" in e["error"] for e in a.named("cluster.unreachable"))
    cached = json.loads((a.state / "cluster-list.json").read_text())
    assert len(cached["images"]) == 300


def test_agent_long_polls_through_a_proxy_that_weakens_etags(
    cluster: StartCluster, daemon: StartDaemon, tmp_path: Path
) -> None:
    """Behind a proxy that rewrites ETags to W/"...", the agent's conditional poll is still held, not answered at once."""
    from agent.testing.proxy import HttpProxy

    lst = tmp_path / "l.txt"
    lst.write_text("127.0.0.1:1/a/b:1\n")
    c = cluster("--source-list", str(lst))
    proxy = HttpProxy(c.url, weak_etags=True)
    try:
        a = daemon("--cluster-url", proxy.url, "--node-name", "n1", "--cluster-min-poll", "0.5")
        a.start()
        wait_for(lambda: _list_events(a), 60, "the list")
        wait_for(
            lambda: "image_agent_cluster_long_polls 1.0" in c.get("/metrics")[2].decode(),
            30,
            "the agent's W/ conditional poll to be held",
        )
        assert proxy.count("/v1/images") == 2  # one 200, one held; no hot loop
        assert _list_events(a) == [1]
    finally:
        proxy.close()


def test_agent_keeps_a_minimum_interval_whatever_the_server_does(
    cluster: StartCluster, daemon: StartDaemon, tmp_path: Path
) -> None:
    """When every poll is answered at once (conditions dropped on the way), polls are still --cluster-min-poll apart."""
    from agent.testing.proxy import HttpProxy

    lst = tmp_path / "l.txt"
    lst.write_text("127.0.0.1:1/a/b:1\n")
    c = cluster("--source-list", str(lst))
    proxy = HttpProxy(c.url, drop_conditions=True)
    try:
        a = daemon("--cluster-url", proxy.url, "--node-name", "n1", "--cluster-min-poll", "1.5")
        a.start()
        wait_for(lambda: proxy.count("/v1/images") >= 1, 60, "the first poll")
        first = time.monotonic()
        wait_for(lambda: proxy.count("/v1/images") >= 5, 60, "four more polls")
        elapsed = time.monotonic() - first
        assert elapsed >= 4 * 1.5 - 0.5, f"5 polls in {elapsed:.1f}s"
    finally:
        proxy.close()


def test_agent_sync_survives_a_failing_cache_write(
    cluster: StartCluster, daemon: StartDaemon, tmp_path: Path
) -> None:
    """A cache that cannot be written (here: a directory in its place) is logged once; the sync goes on and recovers."""
    lst = tmp_path / "l.txt"
    lst.write_text("127.0.0.1:1/a/b:1\n")
    c = cluster("--source-list", str(lst))
    a = daemon("--cluster-url", c.url, "--node-name", "n1", "--cluster-min-poll", "0.5")
    (a.state / "cluster-list.json" / "blocker").mkdir(parents=True)
    a.start()
    wait_for(lambda: a.named("cluster.sync_failed"), 60, "the failure to be logged")
    assert len(a.named("cluster.sync_failed")) == 1
    (a.state / "cluster-list.json" / "blocker").rmdir()
    (a.state / "cluster-list.json").rmdir()
    wait_for(lambda: a.named("cluster.recovered"), 90, "the sync to recover")
    assert _list_events(a) == [1]
    assert (a.state / "cluster-list.json").is_file()
