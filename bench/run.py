"""Run every benchmark and write bench/results/latest.json and latest.md.

    python bench/run.py            # full runs (as root: the lab is used)
    python bench/run.py --quick    # each once, for a smoke test (the test suite calls this)

Each benchmark compares against a baseline measured alongside in the same run;
see the module docstrings. Benchmarks never decide a test's pass or fail.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
BENCHES = ["connect", "receipts", "routing", "ingest"]


def run(name: str, quick: bool, out_dir: Path) -> dict[str, object]:
    out = out_dir / f"{name}.json"
    argv = [sys.executable, str(HERE / f"{name}.py"), "--out", str(out)]
    if quick:
        argv.append("--quick")
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=1200)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0], "seconds": round(time.monotonic() - started, 1)}
    result: dict[str, object] = json.loads(out.read_text())
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def markdown(results: dict[str, dict[str, object]]) -> str:
    lines = [
        "| benchmark | figure | median | min | max | runs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for bench, figures in results.items():
        for figure, value in figures.items():
            if isinstance(value, dict) and any(k.startswith("median") for k in value):
                med = next(v for k, v in value.items() if k.startswith("median"))
                low = next((v for k, v in value.items() if k.startswith("min")), "")
                high = next((v for k, v in value.items() if k.startswith("max")), "")
                lines.append(
                    f"| {bench} | {figure} | {med} | {low} | {high} | {value.get('runs', '')} |"
                )
            elif figure.startswith("ratio"):
                lines.append(f"| {bench} | {figure} | {value} | | | |")
            elif figure == "error":
                lines.append(f"| {bench} | FAILED | {value} | | | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--only", nargs="*", choices=BENCHES, default=BENCHES)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = {name: run(name, args.quick, args.out_dir) for name in args.only}
    latest = args.out_dir / "latest.json"
    latest.write_text(json.dumps(results, indent=2) + "\n")
    (args.out_dir / "latest.md").write_text(markdown(results))
    print(markdown(results))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
