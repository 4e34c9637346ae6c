"""The puller's interleavings with a list change, against a CRI double (no containerd).

The double is type-checked against :class:`agent.pull.engine.PullClient`,
the protocol the real :class:`agent.containerd.Containerd` satisfies. Each
test holds a pull inside ``cri_pull`` until the list has changed, so the
interleaving is the one named, every time; nothing sleeps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from agent.containerd.cri import CriImage
from agent.errors import ContainerdError
from agent.image.labels import PINNED_LABEL
from agent.image.lists import Entry
from agent.pull.engine import PullClient, Puller, PullState

REF = "registry.example:5000/team/app:1"
WAIT_S = 10.0


class HeldCri:
    """A CRI whose pull waits for the test's go-ahead, then succeeds or fails as told."""

    def __init__(self, outcome: BaseException | None = None) -> None:
        self.outcome = outcome
        self.entered = threading.Event()
        self.release = threading.Event()
        self.pinned: dict[str, bool] = {}
        self.pulled: list[str] = []

    def cri_image_status(self, ref: str) -> CriImage | None:
        return None

    def cri_pull(
        self,
        ref: str,
        *,
        username: str = "",
        password: str = "",
        server: str = "",
        identity_token: str = "",
        timeout: float | None = None,
    ) -> str:
        self.entered.set()
        assert self.release.wait(WAIT_S), "the test never released the pull"
        if self.outcome is not None:
            raise self.outcome
        self.pulled.append(ref)
        return "sha256:" + "1" * 64

    def label_image(self, name: str, labels: dict[str, str]) -> None:
        if labels.get(PINNED_LABEL) == "pinned":
            self.pinned[name] = True

    def unlabel_image(self, name: str, *keys: str) -> None:
        if PINNED_LABEL in keys:
            self.pinned[name] = False


class Changes:
    """Counts on_change calls; waits for the next one with a deadline."""

    def __init__(self) -> None:
        self.count = 0
        self._cond = threading.Condition()

    def __call__(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def wait_until(self, what: str, done: Callable[[], bool]) -> None:
        """Wait for an on_change call after which ``done()`` holds.

        Checked at each call, so passing proves on_change ran after the
        outcome (how many calls came before it is the engine's business).
        """
        with self._cond:
            assert self._cond.wait_for(done, WAIT_S), f"no on_change after {what}"


@pytest.fixture
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with capture_logs() as captured:
        yield captured


def _puller(cri: PullClient, changes: Changes) -> Puller:
    return Puller(cri, credentials={}, concurrency=2, log=structlog.get_logger(), on_change=changes)


def _logged(logs: list[MutableMapping[str, Any]], event: str) -> bool:
    return any(e["event"] == event for e in logs)


def _entry() -> Entry:
    return Entry(REF, "list.txt", 1)


def test_pull_that_succeeds_after_the_list_dropped_it_does_not_pin(
    logs: list[MutableMapping[str, Any]],
) -> None:
    """A pull finishing after set_source unpinned the image leaves it unpinned."""
    cri = HeldCri()
    changes = Changes()
    puller = _puller(cri, changes)
    puller.start()
    try:
        puller.set_source("list.txt", [_entry()], [])  # on_change 1
        assert cri.entered.wait(WAIT_S)
        puller.set_source("list.txt", [], [])  # unpins; on_change 2
        assert cri.pinned.get(REF) is False
        cri.release.set()
        changes.wait_until("the dropped pull", lambda: _logged(logs, "pull.dropped"))
    finally:
        puller.stop()
    assert cri.pulled == [REF]
    assert cri.pinned[REF] is False
    assert puller.snapshot() == []
    assert any(e["event"] == "pull.dropped" for e in logs)


def test_pull_that_fails_after_the_list_dropped_it_is_logged(
    logs: list[MutableMapping[str, Any]],
) -> None:
    """A pull failing after the list dropped the image is logged and calls on_change."""
    cri = HeldCri(ContainerdError("pull x: registry unreachable", code="UNKNOWN"))
    changes = Changes()
    puller = _puller(cri, changes)
    puller.start()
    try:
        puller.set_source("list.txt", [_entry()], [])
        assert cri.entered.wait(WAIT_S)
        puller.set_source("list.txt", [], [])
        cri.release.set()
        changes.wait_until("the failed pull", lambda: _logged(logs, "pull.failed"))
    finally:
        puller.stop()
    failed = [e for e in logs if e["event"] == "pull.failed"]
    assert len(failed) == 1 and failed[0]["image"] == REF and failed[0]["dropped"] is True
    assert not any(e["event"] == "pull.crashed" for e in logs)
    assert REF not in cri.pinned or cri.pinned[REF] is False


def test_pull_that_fails_while_wanted_retries_later(logs: list[MutableMapping[str, Any]]) -> None:
    """A failing pull of a wanted image is RETRYING with a delay, logged once, on_change called."""
    cri = HeldCri(ContainerdError("pull x: registry unreachable", code="UNKNOWN"))
    cri.release.set()
    changes = Changes()
    puller = _puller(cri, changes)
    puller.start()
    try:
        puller.set_source("list.txt", [_entry()], [])
        changes.wait_until("the failed pull", lambda: _logged(logs, "pull.failed"))
    finally:
        puller.stop()
    (row,) = puller.snapshot()
    assert row["state"] == str(PullState.RETRYING) and row["next_retry_at"] is not None
    failed = [e for e in logs if e["event"] == "pull.failed"]
    assert len(failed) == 1 and failed[0]["retry_in_s"] > 0


def test_unexpected_exception_is_logged_not_lost(logs: list[MutableMapping[str, Any]]) -> None:
    """A bug inside a pull (not an AgentError) is logged with its traceback and calls on_change."""
    cri = HeldCri(RuntimeError("boom"))
    cri.release.set()
    changes = Changes()
    puller = _puller(cri, changes)
    puller.start()
    try:
        puller.set_source("list.txt", [_entry()], [])
        changes.wait_until("the crashed pull", lambda: _logged(logs, "pull.crashed"))
    finally:
        puller.stop()
    crashed = [e for e in logs if e["event"] == "pull.crashed"]
    assert len(crashed) == 1 and "boom" in crashed[0]["error"]
    (row,) = puller.snapshot()
    assert row["state"] == str(PullState.RETRYING)


def test_pull_that_succeeds_while_wanted_pins() -> None:
    """The ordinary case: a wanted image is pulled and pinned."""
    cri = HeldCri()
    cri.release.set()
    changes = Changes()
    puller = _puller(cri, changes)
    puller.start()
    try:
        puller.set_source("list.txt", [_entry()], [])
        changes.wait_until("the pin", lambda: cri.pinned == {REF: True})
    finally:
        puller.stop()
    assert cri.pinned == {REF: True}
    (row,) = puller.snapshot()
    assert row["state"] == str(PullState.PULLED)


class HeldPin(HeldCri):
    """A CRI whose pull succeeds at once but whose pin (label_image) waits for the test."""

    def __init__(self) -> None:
        super().__init__()
        self.release.set()
        self.pin_entered = threading.Event()
        self.pin_release = threading.Event()
        self.settled = threading.Condition()

    def label_image(self, name: str, labels: dict[str, str]) -> None:
        if not self.pin_entered.is_set():
            self.pin_entered.set()
            assert self.pin_release.wait(WAIT_S), "the test never released the pin"
        with self.settled:
            super().label_image(name, labels)
            self.settled.notify_all()

    def unlabel_image(self, name: str, *keys: str) -> None:
        with self.settled:
            super().unlabel_image(name, *keys)
            self.settled.notify_all()


def test_list_drop_while_a_pin_is_in_flight_ends_unpinned(
    logs: list[MutableMapping[str, Any]],
) -> None:
    """A list dropping an image while its pin is in flight neither waits for it nor loses.

    set_source runs on the daemon's loop: it must return while containerd
    still holds the pin call, and the image must end unpinned once the pin
    lands.
    """
    cri = HeldPin()
    changes = Changes()
    puller = _puller(cri, changes)
    puller.start()
    try:
        puller.set_source("list.txt", [_entry()], [])
        assert cri.pin_entered.wait(WAIT_S)
        dropped = threading.Thread(target=puller.set_source, args=("list.txt", [], []))
        dropped.start()
        dropped.join(WAIT_S / 2)
        returned = not dropped.is_alive()
        cri.pin_release.set()
        dropped.join(WAIT_S)
        assert returned, "set_source waited for a pin call in flight"
        # The worker's own on_change comes after its pin landed and it saw
        # the drop (logged) and unpinned again.
        changes.wait_until(
            "the pin's second look",
            lambda: _logged(logs, "pull.dropped") and cri.pinned.get(REF) is False,
        )
    finally:
        cri.pin_release.set()
        puller.stop()
    assert cri.pinned[REF] is False
    assert puller.snapshot() == []


_SLOW_PULL_SCRIPT = """
import sys, threading
import structlog
from agent.containerd.cri import CriImage
from agent.image.lists import Entry
from agent.pull.engine import PullClient, Puller

entered = threading.Event()


class SlowCri:
    def cri_image_status(self, ref: str) -> CriImage | None:
        return None

    def cri_pull(self, ref: str, *, username: str = "", password: str = "", server: str = "",
                 identity_token: str = "", timeout: float | None = None) -> str:
        entered.set()
        threading.Event().wait(timeout)  # a registry that never answers, until the deadline
        return "sha256:" + "1" * 64

    def label_image(self, name: str, labels: dict[str, str]) -> None:
        pass

    def unlabel_image(self, name: str, *keys: str) -> None:
        pass


client: PullClient = SlowCri()
puller = Puller(client, credentials={}, timeout_s=120, log=structlog.get_logger())
puller.start()
puller.set_source("list.txt", [Entry("registry.example/app:1", "list.txt", 1)], [])
assert entered.wait(10), "the pull never started"
puller.stop()
print("stopped", flush=True)
sys.exit(0)
"""


def test_process_exits_promptly_after_stop_with_a_pull_under_way(tmp_path: Path) -> None:
    """Stopping the puller while a pull waits on a silent registry lets the process exit at once.

    Interpreter exit used to join the pool's worker, i.e. wait for the
    pull's deadline (30 minutes by default).
    """
    script = tmp_path / "slow_pull.py"
    script.write_text(_SLOW_PULL_SCRIPT)
    root = Path(__file__).resolve().parent.parent
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit after the puller stopped")
    assert done.returncode == 0, done.stderr
    assert "stopped" in done.stdout
    assert time.monotonic() - started < 30
