"""What every benchmark shares: the registry, statistics, goals and /proc readings.

Registry
--------
Each benchmark is a script ``bench/<name>.py`` that runs on its own
(``python bench/<name>.py [--quick] [--out FILE]``), writes one JSON object
and defines, at module level::

    BENCHMARK = Benchmark(name="<name>", title="...", order=50, goals=(...))

``bench/run.py`` finds every such script (importing it is cheap: the work is
under ``if __name__ == "__main__"``), runs them in ``order`` in subprocesses,
and checks their ``goals`` against what they wrote. A new benchmark needs
nothing else: drop the file in ``bench/`` and it is part of ``make bench``.

Figures
-------
A figure is ``summary(samples, unit)``: median, min, max and the number of
runs, under keys ending in the unit (``median_s``, ``min_mbit_s``, ...). A
ratio against the baseline measured in the same run is a plain number under a
key starting with ``ratio_``. Goals name the key path of the figure they judge.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Goal:
    """``path`` (dot-separated keys into the benchmark's JSON) ``op`` ``limit``."""

    what: str
    path: str
    op: Literal["<=", ">="]
    limit: float
    in_quick: bool = True  # False: --quick does not measure it (too slow for a smoke run)

    def judge(self, result: dict[str, Any]) -> tuple[float | None, bool | None]:
        """(measured value, met?); (None, None) when the figure is missing."""
        value: Any = result
        for key in self.path.split("."):
            if not isinstance(value, dict) or key not in value:
                return None, None
            value = value[key]
        if isinstance(value, dict):
            value = next((v for k, v in value.items() if k.startswith("median")), None)
        if not isinstance(value, int | float):
            return None, None
        return value, value <= self.limit if self.op == "<=" else value >= self.limit


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    order: int  # run order in bench/run.py: cheap and pure first, big labs last
    goals: tuple[Goal, ...] = field(default=())
    needs_root: bool = False
    profiles: bool = False  # takes --profile: adds where the time goes to its JSON


def summary(samples: Sequence[float], unit: str, digits: int = 4) -> dict[str, float]:
    return {
        f"median_{unit}": round(statistics.median(samples), digits),
        f"min_{unit}": round(min(samples), digits),
        f"max_{unit}": round(max(samples), digits),
        "runs": len(samples),
    }


def median_of(figure: dict[str, Any]) -> float:
    return float(next(v for k, v in figure.items() if k.startswith("median")))


def ratio(a: dict[str, Any], b: dict[str, Any], digits: int = 3) -> float:
    """Median of ``a`` over median of ``b``."""
    return round(median_of(a) / median_of(b), digits)


def write_report(report: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.write_text(text + "\n")


# ---- /proc: CPU time and memory of one process (threads included, children not)


@dataclass(frozen=True)
class ProcSample:
    cpu_s: float  # utime + stime of the process (all its threads)
    rss_bytes: int
    peak_rss_bytes: int  # VmHWM


def proc_sample(pid: int) -> ProcSample:
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    rss = hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    return ProcSample((utime + stime) / CLK_TCK, rss, hwm)


def children(pid: int, comm: str) -> list[int]:
    """``pid``'s children named ``comm`` (wireguard-go, say, not short-lived ``ip`` runs)."""
    found = []
    with contextlib.suppress(OSError):  # gone already: no children
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == comm:
                        found.append(int(child))
    return found


def cpu_s(pids: list[int]) -> float:
    """CPU seconds of these processes so far; a process already gone counts 0."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += proc_sample(pid).cpu_s
    return total


MB = 1_000_000
GB = 1_000_000_000
