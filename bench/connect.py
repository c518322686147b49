"""Connect time: `meshvpn connect` to the first byte through the tunnel.

Side by side in one run, on the same lab:
- by hand: `connect --relay/--relay-key/--address` (no discovery), the baseline;
- discovery: `connect --broker` (directory, probes, Noise negotiation), cold
  (the first connect of a fresh client) and warm (reconnects).
Each figure is the median over the runs with min and max; the ratio is
discovery over by-hand. Run as root: `python bench/connect.py [--runs N] [--quick]`.

Each scenario builds its own lab and returns its figures; ``SCENARIOS`` lists
them. Multi-hop (a 3-relay path, once the relay mesh exists) goes in as one
more scenario with its own goal in ``BENCHMARK``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import Benchmark, Goal

from meshvpn.lab import Lab
from meshvpn.lab.nodes import (
    broker_address,
    enroll,
    meshvpn,
    meshvpn_argv,
    node_ifname,
    node_state_dir,
    relay_endpoint,
    start_broker,
    start_relay,
)

BENCHMARK = Benchmark(
    name="connect",
    title="Connect time: `meshvpn connect` to the first byte through the tunnel",
    order=20,
    needs_root=True,
    goals=(
        Goal("single hop, discovery, warm, s", "discovery_warm", "<=", 1.0),
        Goal("single hop, discovery, cold, s", "discovery_cold", "<=", 1.0),
    ),
)


def timed_connect(lab: Lab, client: int, how: str) -> float:
    """Seconds from running `meshvpn connect` to the first byte of a GET through the tunnel.

    Timed inside the client's namespace by one process, so the figure holds the
    command's own start-up but none of the lab's.
    """
    node = f"client{client}"
    enroll(lab, node)  # keys, and a certificate for the TLS-only broker
    sd = str(node_state_dir(lab, node))
    argv = ["connect", "--state-dir", sd, "--interface", node_ifname(lab, node)]
    if how == "hand":
        key = json.loads(meshvpn(lab, node, "id", "--json"))["wireguard_public_key"]
        grant = json.loads(meshvpn(lab, "relay2", "admit", key, "--json"))
        argv += ["--relay", relay_endpoint(lab, 2), "--relay-key", grant["relay_key"]]
        argv += ["--address", grant["address"]]
    else:
        argv += ["--broker", broker_address(lab)]
    script = (
        "import subprocess, sys, time, urllib.request\n"
        "t0 = time.monotonic()\n"
        f"subprocess.run({meshvpn_argv(*argv)!r}, check=True, capture_output=True)\n"
        f"urllib.request.urlopen('http://{lab.plan.internet.web_addr}/ip', timeout=10).read(1)\n"
        "print(time.monotonic() - t0)\n"
    )
    return float(lab.exec(node, [sys.executable, "-c", script]).stdout)


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "median_s": round(statistics.median(samples), 4),
        "min_s": round(min(samples), 4),
        "max_s": round(max(samples), 4),
        "runs": len(samples),
    }


def single_hop(runs: int) -> dict[str, Any]:
    """By hand vs. discovery, through one relay of three at 30/5/15 ms."""
    results: dict[str, list[float]] = {"hand": [], "discovery_cold": [], "discovery_warm": []}
    with Lab(f"bc{os.getpid() % 100_000:05d}") as lab:
        lab.up(3, 2, latency_ms=[30.0, 5.0, 15.0])
        start_broker(lab)
        for i in (1, 2, 3):
            start_relay(lab, i, broker=True)
        for _ in range(runs):
            results["hand"].append(timed_connect(lab, 1, "hand"))
            meshvpn(lab, "client1", "disconnect")
        results["discovery_cold"].append(timed_connect(lab, 2, "broker"))
        meshvpn(lab, "client2", "disconnect")
        for _ in range(runs):
            results["discovery_warm"].append(timed_connect(lab, 2, "broker"))
            meshvpn(lab, "client2", "disconnect")
    report: dict[str, Any] = {name: summary(s) for name, s in results.items()}
    report["ratio_discovery_warm_to_hand"] = round(
        report["discovery_warm"]["median_s"] / report["hand"]["median_s"], 2
    )
    return report


SCENARIOS: list[Callable[[int], dict[str, Any]]] = [single_hop]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one run each (smoke test)")
    parser.add_argument("--out", type=Path, help="write the JSON result here too")
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs
    report: dict[str, Any] = {}
    for scenario in SCENARIOS:
        report |= scenario(runs)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
