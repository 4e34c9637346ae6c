"""Pre-pull through the CRI from a real registry, by the daemon and by `image-agent pull`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from agent.containerd import Containerd
from agent.image.platforms import Platform
from agent.importer import PINNED_LABEL
from agent.testing import samples
from agent.testing.processes import DaemonProcess, Registry, wait_for
from tests.conftest import RunCli, StartDaemon, StartRegistry
from tests.helpers import assert_pinned, cri_by_tag


def oci(tmp_path: Path, name: str, node: Platform, payload: bytes = b"") -> Path:
    path = tmp_path / f"{name.replace('/', '_').replace(':', '_')}.tar"
    path.write_bytes(
        samples.oci_archive([samples.simple_image(name, {"f": payload or name.encode()}, node)])
    )
    return path


def push(reg: Registry, tmp_path: Path, node: Platform, name: str, payload: bytes = b"") -> str:
    reg.push(oci(tmp_path, name, node, payload), name)
    return f"{reg.host}/{name}"


def pulls(d: DaemonProcess) -> dict[str, dict[str, Any]]:
    return {p["image"]: p for p in d.status()["pulls"]}


def test_pull_list_with_invalid_lines(
    daemon: StartDaemon, registry: StartRegistry, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """Valid lines of a .txt list are pulled and pinned; invalid ones are reported with file and line."""
    reg = registry()
    a = push(reg, tmp_path, node, "team/a:1")
    b = push(reg, tmp_path, node, "team/b:2")
    d = daemon()
    d.start()
    lst = d.images / "workspace.txt"
    lst.write_text(f"# warm these\n{a}\nNOT A REF\n\n{b}\n")
    wait_for(
        lambda: all(pulls(d).get(r, {}).get("state") == "pulled" for r in (a, b)), 60, "both pulled"
    )
    assert {a, b} <= set(cri_by_tag(client))
    assert_pinned(client, a)
    invalid = [p for p in d.status()["pulls"] if p["state"] == "invalid"]
    assert [(p["image"], p["source"]) for p in invalid] == [("NOT A REF", f"{lst}:3")]
    assert pulls(d)[a]["source"] == f"{lst}:2"


def test_registry_down_then_back(
    daemon: StartDaemon, registry: StartRegistry, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """Pulls against a stopped registry back off (no hot loop) and succeed once it is back."""
    reg = registry()
    ref = push(reg, tmp_path, node, "flaky/img:1")
    reg.stop()
    d = daemon()
    d.start()
    (d.images / "list.txt").write_text(ref + "\n")
    first = wait_for(
        lambda: (p := pulls(d).get(ref)) and p["state"] == "retrying" and p, 60, "retrying"
    )
    assert first
    assert first["last_error"] and first["next_retry_at"] is not None
    failed = d.named("pull.failed")
    assert failed and failed[0]["image"] == ref and failed[0]["retry_in_s"] >= 1.5
    wait_for(lambda: pulls(d)[ref]["attempts"] >= 2, 90, "a second attempt")
    # Backoff, not a hot loop: a handful of attempts in the first ~6 s.
    assert pulls(d)[ref]["attempts"] <= 4
    reg.start()
    wait_for(lambda: pulls(d)[ref]["state"] == "pulled", 60, "pulled after the registry is back")
    assert ref in cri_by_tag(client)


def test_auth_file_and_wrong_credentials(
    registry: StartRegistry, cli: RunCli, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """--auth-file credentials pull from an htpasswd registry; wrong ones fail as unauthorized."""
    reg = registry("agent", "s3cret-pw")
    ref = push(reg, tmp_path, node, "private/app:1")
    good = tmp_path / "good.json"
    good.write_text(
        json.dumps({"auths": {reg.host: {"auth": "YWdlbnQ6czNjcmV0LXB3"}}})
    )  # agent:s3cret-pw
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"auths": {reg.host: {"username": "agent", "password": "nope"}}}))

    denied = cli("pull", "--auth-file", str(bad), ref)
    assert denied.code == 1
    assert "unauthorized" in denied.err
    assert "nope" not in denied.err + denied.out
    anonymous = cli("pull", ref)
    assert anonymous.code == 1 and "unauthorized" in anonymous.err

    ok = cli("pull", "--auth-file", str(good), ref)
    assert ok.code == 0, ok.err
    assert ok.out.startswith(f"pulled {ref} sha256:")
    assert ref in cri_by_tag(client)
    assert_pinned(client, ref)
    again = cli("pull", "--auth-file", str(good), ref)
    assert again.out.startswith(f"present {ref}")


def test_auth_failure_in_daemon_is_failed_unauthorized(
    daemon: StartDaemon, registry: StartRegistry, node: Platform, tmp_path: Path
) -> None:
    """In the daemon, wrong credentials give state failed with reason unauthorized and a long backoff."""
    reg = registry("agent", "s3cret-pw")
    ref = push(reg, tmp_path, node, "private/x:1")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"auths": {reg.host: {"username": "agent", "password": "wrong"}}}))
    d = daemon("--auth-file", str(bad))
    d.start()
    (d.images / "l.txt").write_text(ref + "\n")
    rec = wait_for(lambda: (p := pulls(d).get(ref)) and p["state"] == "failed" and p, 60, "failed")
    assert rec
    assert rec["last_error"].startswith("unauthorized")
    assert rec["next_retry_at"] - time.time() > 300
    assert "wrong" not in d.log_path.read_text()


def test_moved_tag_is_pulled_again_after_refresh(
    daemon: StartDaemon, registry: StartRegistry, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """A tag moved in the registry is followed after the refresh interval."""
    reg = registry()
    ref = push(reg, tmp_path, node, "moving/img:stable", b"v1")
    d = daemon("--refresh-interval", "1s")
    d.start()
    (d.images / "l.txt").write_text(ref + "\n")
    # With a 1 s refresh, "pulled" soon turns into "present" (the same id found again).
    wait_for(lambda: pulls(d).get(ref, {}).get("state") in ("pulled", "present"), 60, "first pull")
    first_id = cri_by_tag(client)[ref]
    push(reg, tmp_path, node, "moving/img:stable", b"v2")

    def moved_and_pinned() -> bool:
        # The CRI rewrites the record's labels when it re-pulls a tag; the daemon pins it again
        # right after the pull returns, so wait for both rather than racing the second step.
        record = client.get_image(ref)
        now = cri_by_tag(client).get(ref)
        return (
            now not in (None, first_id)
            and record is not None
            and record.labels.get(PINNED_LABEL) == "pinned"
            and pulls(d)[ref]["image_id"] == now
        )

    wait_for(moved_and_pinned, 60, "the moved tag, pinned and in status")


def test_removed_from_list_is_unpinned_not_deleted(
    daemon: StartDaemon, registry: StartRegistry, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """An image that leaves every list is unpinned (kubelet GC may take it) but not deleted."""
    reg = registry()
    keep = push(reg, tmp_path, node, "l/keep:1")
    drop = push(reg, tmp_path, node, "l/drop:1")
    d = daemon()
    d.start()
    lst = d.images / "l.txt"
    lst.write_text(f"{keep}\n{drop}\n")
    wait_for(
        lambda: all(pulls(d).get(r, {}).get("state") == "pulled" for r in (keep, drop)),
        60,
        "pulled",
    )
    lst.write_text(f"{keep}\n")

    def dropped() -> bool:
        record = client.get_image(drop)
        return record is not None and PINNED_LABEL not in record.labels and drop not in pulls(d)

    wait_for(dropped, 60, "unpinned and gone from status")
    assert drop in cri_by_tag(client)
    assert_pinned(client, keep)


def test_thirty_images_with_concurrency(
    daemon: StartDaemon, registry: StartRegistry, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """30 listed images are all pulled and pinned, at most --pull-concurrency at a time, more than one at once."""
    reg = registry()
    refs_ = [push(reg, tmp_path, node, f"many/img{i}:1", os.urandom(256 << 10)) for i in range(30)]
    lst = tmp_path / "extra-list.txt"
    lst.write_text("\n".join(refs_) + "\n")
    d = daemon("--pull-list", str(lst), "--pull-concurrency", "3")
    d.start()
    wait_for(
        lambda: sum(p["state"] == "pulled" for p in d.status()["pulls"]) == 30, 120, "30 pulled"
    )
    assert set(refs_) <= set(cri_by_tag(client))
    for r in refs_:
        assert_pinned(client, r)
    in_flight = peak = 0
    for e in d.events():
        if e["event"] == "pull.started":
            in_flight += 1
            peak = max(peak, in_flight)
        elif e["event"] in ("pull.done", "pull.failed"):
            in_flight -= 1
    assert 1 < peak <= 3


def test_archive_images_stay_pinned_when_list_drops_them(
    daemon: StartDaemon, registry: StartRegistry, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """An image both imported from an archive and listed stays pinned when the list drops it."""
    reg = registry()
    ref = push(reg, tmp_path, node, "both/img:1")
    d = daemon()
    d.start()
    archive = samples.oci_archive([samples.simple_image(ref, {"f": b"both/img:1"}, node)])
    (d.images / ".a.tmp").write_bytes(archive)
    (d.images / ".a.tmp").rename(d.images / "a.tar")
    d.wait_state(d.images / "a.tar", "imported")
    lst = d.images / "l.txt"
    lst.write_text(ref + "\n")
    wait_for(lambda: pulls(d).get(ref, {}).get("state") in ("present", "pulled"), 60, "listed")
    lst.write_text("")
    wait_for(lambda: ref not in pulls(d), 90, "dropped from the list")
    assert_pinned(client, ref)


def test_pull_list_flag_file_change_is_picked_up(
    daemon: StartDaemon, registry: StartRegistry, client: Containerd, node: Platform, tmp_path: Path
) -> None:
    """A --pull-list file outside the images directory is re-read when it changes, without a restart."""
    reg = registry()
    first = push(reg, tmp_path, node, "flag/one:1")
    second = push(reg, tmp_path, node, "flag/two:1")
    lists_dir = tmp_path / "lists"
    lists_dir.mkdir()
    lst = lists_dir / "warm.txt"
    lst.write_text(first + "\n")
    d = daemon("--pull-list", str(lst))
    d.start()
    wait_for(lambda: pulls(d).get(first, {}).get("state") == "pulled", 60, "the first image")
    lst.write_text(f"{first}\n{second}\n")
    wait_for(lambda: pulls(d).get(second, {}).get("state") == "pulled", 60, "the added image")
    assert second in cri_by_tag(client)
