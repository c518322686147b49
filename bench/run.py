"""Run every benchmark; write bench/results/latest.json and latest.md.

    python bench/run.py                    # full runs (as root: most use the lab); `make bench`
    python bench/run.py --quick            # each once, for a smoke test (the test suite calls this)
    python bench/run.py --only scale       # some of them
    python bench/run.py --list             # what is registered, with its goals

A full run also profiles, where a benchmark can (``profiles=True``): one
extra run under cProfile, py-spy or perf(1), summarised into its JSON.

A benchmark is any ``bench/<name>.py`` (see ``bench/common.py``): it takes
``--quick`` and ``--out FILE``, writes one JSON object, and declares
``BENCHMARK = Benchmark(name, title, order, goals)`` at module level. This
file finds them, runs them in ``order``, one subprocess each, and judges
their goals; a script without ``BENCHMARK`` still runs (declared in
``DECLARED_HERE``, or last with no goals).
So a new benchmark is one new file and nothing else.

Each benchmark compares against a baseline measured alongside in the same
run; see the module docstrings. Benchmarks never decide a test's pass or
fail, and this exits non-zero only when a benchmark failed to run, never
because a goal was missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from common import Benchmark, Goal, median_of  # noqa: E402 - after the path it is found on

NOT_BENCHMARKS = {"run", "common"}
TIMEOUT_S = 1200

# Scripts written before the registry, declared here until they declare themselves.
DECLARED_HERE = {
    "ingest": Benchmark(
        "ingest",
        "Accounting ingest: receipts verified and booked per second, SQLite and PostgreSQL",
        order=50,
        needs_root=True,  # the end-to-end arm runs the service in the lab
        goals=(
            Goal(
                "SQLite ingest, the service's pipeline, receipts/s",
                "sqlite_ingest_pool",
                ">=",
                5000,
            ),
            Goal(
                "SQLite ingest end to end through mosquitto, receipts/s",
                "sqlite_service",
                ">=",
                5000,
            ),
        ),
    ),
    "routing": Benchmark(
        "routing",
        "Mesh routing, in virtual time: convergence after a relay dies, CPU per update",
        order=60,
        goals=(
            Goal(
                "30 relays: flowing again after one dies, ms",
                "mesh30_flowing_after_death",
                "<=",
                5000,
            ),
        ),
    ),
    "mesh": Benchmark(
        "mesh",
        "The relay mesh in the lab: multi-hop connect, reroute, failover gaps",
        order=70,
        needs_root=True,
        goals=(
            Goal("failover gap when a transit relay dies, s", "transit_gap_s", "<=", 5),
            Goal("failover gap when the entry relay dies, s", "entry_gap_s", "<=", 5),
        ),
    ),
}


def registry() -> dict[str, Benchmark]:
    """Every benchmark script in bench/, by name, in run order."""
    found: list[Benchmark] = []
    for path in sorted(HERE.glob("*.py")):
        if path.stem in NOT_BENCHMARKS or path.stem.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
        declared = getattr(module, "BENCHMARK", None)
        if isinstance(declared, Benchmark) and declared.name == path.stem:
            found.append(declared)
        else:
            found.append(DECLARED_HERE.get(path.stem, Benchmark(path.stem, path.stem, order=1000)))
    return {b.name: b for b in sorted(found, key=lambda b: (b.order, b.name))}


def run(bench: Benchmark, quick: bool, out_dir: Path) -> dict[str, Any]:
    out = out_dir / f"{bench.name}.json"
    argv = [sys.executable, str(HERE / f"{bench.name}.py"), "--out", str(out)]
    if quick:
        argv.append("--quick")
    elif bench.profiles:
        argv.append("--profile")  # a full run also says where the time goes
    started = time.monotonic()
    print(f"== {bench.name}: {bench.title}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {TIMEOUT_S} s", "seconds": TIMEOUT_S}
    seconds = round(time.monotonic() - started, 1)
    if proc.returncode != 0 or not out.exists():
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0], "seconds": seconds}
    result: dict[str, Any] = json.loads(out.read_text())
    result["seconds"] = seconds
    result["goals"] = judge(bench, result, quick)
    return result


def judge(bench: Benchmark, result: dict[str, Any], quick: bool) -> list[dict[str, Any]]:
    verdicts = []
    for goal in bench.goals:
        if quick and not goal.in_quick:
            continue
        value, met = goal.judge(result)
        verdicts.append(
            {"goal": goal.what, "measured": value, "limit": f"{goal.op} {goal.limit:g}", "met": met}
        )
    return verdicts


def rows(prefix: str, value: Any) -> list[tuple[str, str, str, str, str]]:  # noqa: ANN401
    """(figure, median, min, max, runs) for every figure in a result, nested ones too."""
    if isinstance(value, dict):
        if any(k.startswith("median") for k in value):
            low = next((v for k, v in value.items() if k.startswith("min")), "")
            high = next((v for k, v in value.items() if k.startswith("max")), "")
            unit = next(k for k in value if k.startswith("median")).removeprefix("median_")
            name = f"{prefix} ({unit})"
            return [
                (name, f"{median_of(value):g}", f"{low:g}", f"{high:g}", str(value.get("runs", "")))
            ]
        found = []
        for key, inner in value.items():
            if key not in {"goals", "seconds"}:
                found += rows(f"{prefix}.{key}" if prefix else key, inner)
        return found
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [(prefix, f"{value:g}", "", "", "")]
    return []


def markdown(results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    head = (
        f"Run {meta['started']} on {meta['cpus']} CPUs; load average {meta['load_before']}"
        f" before, {meta['load_after']} after; {meta['seconds']:g} s"
        f"{' (quick)' if meta['quick'] else ''}."
    )
    lines = [
        head,
        "",
        "| goal | measured | limit | met |",
        "| --- | --- | --- | --- |",
    ]
    for bench, result in results.items():
        for v in result.get("goals", []):
            met = {True: "yes", False: "**no**", None: "not measured"}[v["met"]]
            measured = "" if v["measured"] is None else f"{v['measured']:g}"
            lines.append(f"| {bench}: {v['goal']} | {measured} | {v['limit']} | {met} |")
    lines += ["", "| benchmark | figure | median | min | max | runs |"]
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for bench, result in results.items():
        if "error" in result:
            lines.append(f"| {bench} | FAILED | {result['error']} | | | |")
            continue
        lines += [f"| {bench} | {' | '.join(r)} |" for r in rows("", result)]
        lines.append(f"| {bench} | seconds to run | {result['seconds']:g} | | | |")
    return "\n".join(lines) + "\n"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    benches = registry()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--only", nargs="*", choices=list(benches), default=list(benches))
    parser.add_argument("--list", action="store_true", help="list the benchmarks and goals")
    args = parser.parse_args()
    if args.list:
        for b in benches.values():
            print(f"{b.name:<12} {b.title}")
            for g in b.goals:
                print(f"{'':<12}   goal: {g.what} {g.op} {g.limit:g}")
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started, t0, load_before = dt.datetime.now(dt.UTC), time.monotonic(), load()
    results = {name: run(benches[name], args.quick, args.out_dir) for name in args.only}
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": load(),
        "seconds": round(time.monotonic() - t0, 1),
        "quick": args.quick,
    }
    (args.out_dir / "latest.json").write_text(
        json.dumps({**results, "_run": meta}, indent=2) + "\n"
    )
    table = markdown(results, meta)
    (args.out_dir / "latest.md").write_text(table)
    print(table)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
