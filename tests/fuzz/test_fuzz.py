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
# Seconds one input may take. The slowest seed takes about 20 ms uninstrumented;
# the bound is for inputs that hang or take hours, so it is generous enough for a
# loaded 2-core CI machine (a slow machine must not look like a finding).
INPUT_TIMEOUT = 30
TARGETS = ["archive", "layout", "bundle-manifest", "pull-list", "reference", "cluster-report"]


def _run(target: str, artifacts: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", target, str(SECONDS),
         "--timeout", str(INPUT_TIMEOUT), "--rss-mb", "768", "--artifacts", str(artifacts)],
        cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 90,
        env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False,
    )  # fmt: skip


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target(target: str, tmp_path: Path) -> None:
    """The target runs its time without a crash, uncaught exception, slow input or memory blow-up."""
    result = _run(target, tmp_path)
    tail = "\n".join(result.stderr.splitlines()[-40:])
    assert result.returncode == 0, f"{target}: {tail}"
    runs = re.search(r"stat::number_of_executed_units: (\d+)", result.stderr)
    # Past the seeds: new inputs ran (how many depends on the machine's load, so no
    # fixed count).
    seeds = len(list((ROOT / "tests" / "fuzz" / "corpus" / target).iterdir()))
    assert runs and int(runs.group(1)) > seeds, tail
