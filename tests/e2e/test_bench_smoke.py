"""The benchmark harness must keep working: run it once in its quick mode.

Only that it runs and reports is checked here, never how fast anything is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BENCH = Path(__file__).parent.parent.parent / "bench" / "run.py"


def test_bench_quick_runs_and_reports(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "latest.json").read_text())
    assert set(results) == {"connect", "receipts", "routing", "ingest"}
    assert results["connect"]["discovery_warm"]["runs"] == 1
    assert results["receipts"]["receipt_sign"]["median_per_s"] > 0
    assert results["routing"]["mesh30_flowing_after_death"]["runs"] == 1
    assert results["ingest"]["sqlite_ingest"]["median_per_s"] > 0
    assert results["ingest"]["postgresql_book"]["median_per_s"] > 0  # ./run starts PostgreSQL
    assert "| connect |" in (tmp_path / "latest.md").read_text()
