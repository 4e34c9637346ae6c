"""The daemon's pure decisions, file facts, state store and systemd unit."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.image.platforms import Platform
from agent.node import files, plan
from agent.node.files import Kind, Stat
from agent.node.state import Record, State, Store
from tests.conftest import ROOT

AMD64 = (Platform("linux", "amd64"),)


def obs(
    path: str = "/d/a.tar",
    size: int = 10,
    mtime: int = 1,
    kind: Kind = Kind.ARCHIVE,
    named: Platform | None = None,
) -> plan.Observation:
    return plan.Observation(path, kind, Stat(size, mtime), named)


def test_new_archive_is_pending_and_unchanged_one_keeps_its_state() -> None:
    """A new file waits to be imported; a failed one is not retried until it changes."""
    rec = plan.observe(None, obs(), AMD64)
    assert rec is not None and rec.state is State.PENDING
    failed = Record("/d/a.tar", 10, 1, State.FAILED, error="corrupt")
    assert plan.observe(failed, obs(), AMD64) is failed
    changed = plan.observe(failed, obs(mtime=2), AMD64)
    assert changed is not None and changed.state is State.PENDING and changed.reason == "changed"


def test_gone_and_ignored_files_are_forgotten() -> None:
    """A file that disappeared or is not ours leaves no record."""
    assert (
        plan.observe(
            Record("/d/a.tar", 1, 1), plan.Observation("/d/a.tar", Kind.ARCHIVE, None), AMD64
        )
        is None
    )
    assert plan.observe(None, obs(kind=Kind.IGNORED), AMD64) is None


def test_interrupted_import_is_pending_again() -> None:
    """A record left 'importing' by a crash is imported again."""
    rec = plan.observe(Record("/d/a.tar", 10, 1, State.IMPORTING, attempts=1), obs(), AMD64)
    assert rec is not None and rec.state is State.PENDING and rec.reason == "interrupted"


def test_platform_named_archives() -> None:
    """An archive named for another platform is skipped with that reason; one for ours is imported."""
    skipped = plan.observe(None, obs(named=Platform("linux", "arm64")), AMD64)
    assert (
        skipped is not None and skipped.state is State.SKIPPED and "linux/arm64" in skipped.reason
    )
    matching = plan.observe(None, obs(named=Platform("linux", "amd64")), AMD64)
    assert matching is not None and matching.state is State.PENDING
    unfiltered = plan.observe(None, obs(named=Platform("linux", "arm64")), None)
    assert unfiltered is not None and unfiltered.state is State.PENDING


def test_same_size_replacement_detected_by_fingerprint() -> None:
    """An imported archive whose content fingerprint changed is imported again."""
    rec = Record("/d/a.tar", 10, 1, State.IMPORTED, fingerprint="sha256:old")
    assert plan.content_changed(rec, "sha256:old") is rec
    assert plan.content_changed(rec, "sha256:new").state is State.PENDING


def test_next_import_order_settle_and_backoff() -> None:
    """Oldest mtime first (then name); an older file still settling holds back newer ones."""
    recs = {
        "/d/b.tar": Record("/d/b.tar", 1, 100),
        "/d/a.tar": Record("/d/a.tar", 1, 100),
        "/d/new.tar": Record("/d/new.tar", 1, 300),
        "/d/done.tar": Record("/d/done.tar", 1, 1, State.IMPORTED),
    }
    assert plan.next_import(recs, {}, {}, now=10, settle=2).path == "/d/a.tar"
    settling = plan.next_import(recs, {"/d/a.tar": 9.0}, {}, now=10, settle=2)
    assert settling.path is None and settling.wake_at == 11.0
    waiting = plan.next_import(recs, {}, {"/d/a.tar": 50.0}, now=10, settle=2)
    assert waiting.path == "/d/b.tar"
    assert [plan.backoff(n) for n in (1, 2, 3, 10)] == [1.0, 2.0, 4.0, 60.0]


def test_pull_list_is_read_only_once_settled() -> None:
    """A list being rewritten (truncated, then written) is not read until it holds still."""
    wall = 1_000_000.0
    fresh = Stat(0, int((wall - 0.1) * 1e9))  # just truncated
    seen, due = plan.list_settled(None, fresh, 10.0, wall, 2.0)
    assert due == 12.0
    written = Stat(120, int((wall + 0.2) * 1e9))
    seen, due = plan.list_settled(seen, written, 10.3, wall + 0.3, 2.0)
    assert due == 12.3  # changed again: the clock starts over
    seen, due = plan.list_settled(seen, written, 12.3, wall + 2.3, 2.0)
    assert due is None
    # Already in place and old at start: read at once.
    assert plan.list_settled(None, Stat(5, 0), 10.0, wall, 2.0)[1] is None
    # A list that vanished must stay gone for the settle time.
    seen, due = plan.list_settled(None, None, 10.0, wall, 2.0)
    assert due == 12.0
    assert plan.list_settled(seen, None, 12.0, wall + 2, 2.0)[1] is None
    # An mtime in the future (a skewed clock) still settles by holding still.
    future = Stat(5, int((wall + 3600) * 1e9))
    seen, due = plan.list_settled(None, future, 10.0, wall, 2.0)
    assert due == 12.0
    assert plan.list_settled(seen, future, 12.0, wall + 2, 2.0)[1] is None


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("a.tar", Kind.ARCHIVE),
        ("a.TAR.ZST", Kind.ARCHIVE),
        ("b.tgz", Kind.ARCHIVE),
        ("c.tar.lz4", Kind.ARCHIVE),
        ("l.txt", Kind.PULL_LIST),
        (".a.tar", Kind.IGNORED),
        ("a.tar.part", Kind.IGNORED),
        (".hidden/a.tar", Kind.IGNORED),
        ("sub/a.tbz", Kind.ARCHIVE),
    ],
)
def test_classify(name: str, kind: Kind) -> None:
    """Files are classified by name: archives, pull lists, dotfiles and others ignored."""
    root = Path("/images")
    assert files.classify(root / name, root) is kind


@pytest.mark.parametrize(
    ("name", "platform"),
    [
        ("site-linux-arm64.tar.zst", Platform("linux", "arm64")),
        ("k3s-airgap-images-linux-amd64.tar", Platform("linux", "amd64")),
        ("x_linux_arm_v7.tar", Platform("linux", "arm", "v7")),
        ("images.tar.gz", None),
        ("linuxtools.tar", None),
    ],
)
def test_platform_in_name(name: str, platform: Platform | None) -> None:
    """The platform is read from archive names such as *-linux-arm64.tar.zst."""
    assert files.platform_in_name(name) == platform


def test_open_for_writing_sees_a_copy_in_progress(tmp_path: Path) -> None:
    """A file some process holds open for writing is reported as still being written."""
    path = tmp_path / "f.tar"
    path.write_bytes(b"x")
    assert not files.open_for_writing(path)
    with path.open("ab"):
        assert files.open_for_writing(path)
    with path.open("rb"):
        assert not files.open_for_writing(path)


def test_fingerprint_catches_same_size_change(tmp_path: Path) -> None:
    """The fingerprint differs for a same-size file whose last byte changed."""
    path = tmp_path / "f"
    path.write_bytes(b"a" * (3 << 20))
    first = files.fingerprint(path)
    path.write_bytes(b"a" * ((3 << 20) - 1) + b"b")  # same size, last byte differs
    assert files.fingerprint(path) != first


def test_store_round_trip_and_retry_requests(tmp_path: Path) -> None:
    """Records survive a save/load, no temp files are left, and retry requests are taken once."""
    store = Store(tmp_path)
    rec = Record("/d/a.tar", 5, 7, State.IMPORTED, images=["docker.io/library/a:1"], attempts=1)
    store.save({rec.path: rec})
    assert store.load() == {rec.path: rec}
    assert Store(tmp_path, readonly=True).load()[rec.path].state is State.IMPORTED
    store.request_retry("/d/a.tar")
    assert store.take_requests() == ["/d/a.tar"]
    assert store.take_requests() == []
    assert not [p for p in (tmp_path / "requests").iterdir() if p.name.startswith(".")]


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit (with ExecStart pointed at this checkout)."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (scripts/bootstrap installs systemd)")
    exe = Path(sys.executable).with_name("image-agent")
    unit = (ROOT / "systemd" / "image-agent.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "StateDirectory=image-agent" in unit
    assert "EnvironmentFile=-/etc/default/image-agent" in unit and "Restart=always" in unit
    path = tmp_path / "image-agent.service"
    path.write_text(unit.replace("/usr/bin/image-agent", str(exe)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_status_reads_a_read_only_state_directory(tmp_path: Path) -> None:
    """`status` on a read-only mount of the state directory (no -shm/-wal can be made) still reads it."""
    from agent.node.status import status_doc

    src = tmp_path / "state"
    store = Store(src)
    rec = Record("/d/a.tar", 5, 7, State.IMPORTED, images=["docker.io/library/a:1"])
    store.put([rec], [])
    store.save_daemon({"pid": 0, "heartbeat_at": 0.0})
    store.close()
    assert not (src / "state.db-shm").exists()  # the last close removed it
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        with pytest.raises(OSError, match="Read-only file system"):
            (ro / "probe").write_bytes(b"")  # really read-only, even for root
        reader = Store(ro, readonly=True)
        try:
            doc = status_doc(reader)
        finally:
            reader.close()
        assert [a["path"] for a in doc["archives"]] == [rec.path]
        assert doc["daemon"]["running"] is False
    finally:
        subprocess.run(["umount", "--lazy", str(ro)], check=True)
