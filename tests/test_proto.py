"""The committed stubs in agent/_proto are exactly what scripts/gen-proto makes from proto/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def _diff(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    out = [f"only in {a}: {n}" for n in cmp.left_only] + [
        f"only in {b}: {n}" for n in cmp.right_only
    ]
    out += [f"differs: {a / n}" for n in cmp.diff_files]
    for sub in cmp.common_dirs:
        out += _diff(a / sub, b / sub)
    return out


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    """Editing a .proto without regenerating (or editing generated code) fails CI."""
    out = tmp_path / "_proto"
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-proto"), str(out)],
        check=True,
        capture_output=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    assert _diff(ROOT / "agent" / "_proto", out) == []
