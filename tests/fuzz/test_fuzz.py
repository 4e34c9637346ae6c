"""Coverage-guided fuzzing in the suite: every target runs a bounded time in its own process.

A crash, an uncaught exception, an input over the per-input timeout or the
process over its memory limit makes libFuzzer exit non-zero, and the test
fails with the input saved. ``scripts/fuzz TARGET SECONDS`` runs longer.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

# Seconds per target in the suite: six targets stay under two minutes.
SECONDS = int(os.environ.get("IMAGE_AGENT_FUZZ_SECONDS", "10"))
TARGETS = ["archive", "layout", "bundle-manifest", "pull-list", "reference", "cluster-report"]


def _run(target: str, artifacts: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", target, str(SECONDS),
         "--timeout", "5", "--rss-mb", "768", "--artifacts", str(artifacts)],
        cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 90,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target(target: str, tmp_path: Path) -> None:
    """The target runs its time without a crash, uncaught exception, slow input or memory blow-up."""
    result = _run(target, tmp_path)
    tail = "\n".join(result.stderr.splitlines()[-40:])
    assert result.returncode == 0, f"{target}: {tail}"
    runs = re.search(r"stat::number_of_executed_units: (\d+)", result.stderr)
    assert runs and int(runs.group(1)) > 100, tail
