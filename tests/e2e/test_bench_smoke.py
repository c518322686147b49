"""The benchmark harness must keep working: run it once in its quick mode.

Only that every benchmark runs and reports is checked here, never how fast
anything is: goals may be missed, benchmarks may not break.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BENCH = Path(__file__).parent.parent.parent / "bench"


def registered() -> list[str]:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--list"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return [line.split()[0] for line in proc.stdout.splitlines() if not line.startswith(" ")]


def test_every_bench_script_is_registered() -> None:
    scripts = {p.stem for p in BENCH.glob("*.py")} - {"run", "common"}
    assert set(registered()) == scripts
    assert {
        "connect",
        "receipts",
        "throughput",
        "multihop",
        "scale",
        "routing",
        "ingest",
    } <= scripts
    assert {"meshscale", "mesh"} <= scripts


def test_bench_quick_runs_and_reports(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--quick", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "latest.json").read_text())
    assert set(results) == {*registered(), "_run"}
    assert not [name for name, r in results.items() if "error" in r]
    assert results["connect"]["discovery_warm"]["runs"] == 1
    assert results["receipts"]["receipt_sign"]["median_per_s"] > 0
    # each arm moved traffic, and the agents were sampled while it did
    assert results["throughput"]["plain_tcp_up"]["median_mbit_s"] > 0
    assert results["throughput"]["meshvpn_tcp_up"]["median_mbit_s"] > 0
    assert results["throughput"]["meshvpn"]["relay_agent"]["rss_peak"]["median_mb"] > 0
    # the 3-hop path and the chain of plain tunnels both carried traffic
    assert results["multihop"]["plain_tcp_up"]["median_mbit_s"] > 0
    assert results["multihop"]["meshvpn_tcp_up"]["median_mbit_s"] > 0
    assert results["multihop"]["meshvpn"]["transit_agent"]["rss_peak"]["median_mb"] > 0
    assert results["scale"]["n1000"]["directory_size"] == 1000
    assert results["routing"]["mesh30_flowing_after_death"]["runs"] == 1
    assert results["meshscale"]["relays"] == 5
    assert results["meshscale"]["rerouted_ms"]["runs"] == 1
    assert results["meshscale"]["idle_mesh"]["wireguard_go"]["processes"] > 5
    assert results["ingest"]["sqlite_ingest"]["median_per_s"] > 0
    assert results["ingest"]["postgresql_book"]["median_per_s"] > 0  # ./run starts PostgreSQL
    goals = [g for r in results.values() if isinstance(r, dict) for g in r.get("goals", [])]
    assert goals
    # every goal names a figure the benchmark writes; only the metered session's
    # overhead may go unmeasured (a session cut off within its first second)
    unjudged = [g["goal"] for g in goals if g["met"] is None]
    assert all("(metered)" in g for g in unjudged), unjudged
    table = (tmp_path / "latest.md").read_text()
    assert "| connect |" in table
    assert "| goal | measured | limit | met |" in table
