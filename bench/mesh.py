"""The mesh in the lab: link setup, convergence after a relay dies, failover gaps.

One ring of relays with pinned links (so the client's entry and exit are three
hops apart), measured in the same run:
- ``mesh_setup_s``: from starting a new relay pinned to two ring members to
  every relay holding a route to it (negotiation, two WireGuard links, routing);
- ``reroute_s``: from kill -9 of the transit relay on the entry's path to the
  entry holding a route to the exit the other way round;
- ``transit_gap_s`` / ``entry_gap_s``: the longest stall of a running download
  when the transit relay, or the client's entry relay, is killed (goal: 5 s);
- ``connect_multihop_s`` vs ``connect_single_s``: `meshvpn connect --exit` to
  the first byte, against a single-hop connect on the same lab (the ratio).
Each figure is a median over the runs with min and max. Run as root:
`python bench/mesh.py [--runs N] [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from meshvpn.lab import Lab
from meshvpn.lab.nodes import (
    Download,
    broker_address,
    enroll,
    meshvpn,
    meshvpn_argv,
    node_id,
    node_ifname,
    node_status,
    start_broker,
    start_relay,
    wait_mesh_routes,
)

RELAYS = 7  # a ring of six, and one that joins later


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "median_s": round(statistics.median(samples), 3),
        "min_s": round(min(samples), 3),
        "max_s": round(max(samples), 3),
        "runs": len(samples),
    }


def _status(lab: Lab, node: str) -> dict[str, Any]:
    status = node_status(lab, node)
    if status is None:
        raise RuntimeError(f"{node} does not answer")
    return status


def _route_via(lab: Lab, at: int, to: int) -> str | None:
    prefix = _status(lab, f"relay{to}")["mesh"]["prefix"]
    route = _status(lab, f"relay{at}")["mesh"]["routes"].get(prefix)
    return None if route is None else str(route["via"])


def _neighbour_index(lab: Lab, at: int, via: str, ids: dict[int, str]) -> int:
    links = _status(lab, f"relay{at}")["mesh"]["links"]
    nid = next(link["node_id"] for link in links if link["interface"] == via)
    return next(i for i, n in ids.items() if n == nid)


def timed_connect(lab: Lab, *extra: str) -> float:
    node = "client1"
    argv = ["connect", "--state-dir", str(lab.state_dir / "nodes" / node)]
    argv += ["--interface", node_ifname(lab, node), "--broker", broker_address(lab), *extra]
    script = (
        "import subprocess, sys, time, urllib.request\n"
        "t0 = time.monotonic()\n"
        f"p = subprocess.run({meshvpn_argv(*argv)!r}, capture_output=True, text=True)\n"
        "if p.returncode: sys.exit('connect failed: ' + p.stderr.strip())\n"
        f"urllib.request.urlopen('http://{lab.plan.internet.web_addr}/ip', timeout=10).read(1)\n"
        "print(time.monotonic() - t0)\n"
    )
    return float(lab.exec(node, [sys.executable, "-c", script]).stdout)


def restart(lab: Lab, index: int, ids: dict[int, str], ring: list[tuple[int, int]]) -> None:
    partners = [b for a, b in ring if a == index] + [a for a, b in ring if b == index]
    pinned = [arg for j in partners for arg in ("--mesh-neighbour", ids[j])]
    start_relay(lab, index, "--mesh", *pinned, broker=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one run each (smoke test)")
    parser.add_argument("--out", type=Path, help="write the JSON result here too")
    args = parser.parse_args()
    runs = 1 if args.quick else args.runs
    size = 20_000_000 if args.quick else 60_000_000
    ring = [(1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 1)]
    samples: dict[str, list[float]] = {
        k: []
        for k in (
            "mesh_setup_s",
            "reroute_s",
            "transit_gap_s",
            "entry_gap_s",
            "connect_single_s",
            "connect_multihop_s",
        )
    }
    with Lab(f"bm{int(time.time()) % 10000}") as lab:
        lab.up(RELAYS, 1)
        start_broker(lab)
        enroll(lab, "client1")  # keys, and a certificate for the TLS-only broker
        started = start_mesh_ring(lab, ring)
        ids = {i: s["node_id"] for i, s in started.items()}
        ids[7] = node_id(lab, "relay7")
        # link setup: relay7 joins between relay1 and relay4
        t0 = time.monotonic()
        start_relay(lab, 7, "--mesh", "--mesh-neighbour", ids[1], "--mesh-neighbour", ids[4],
                    broker=True)  # fmt: skip
        wait_mesh_routes(lab, 60)
        samples["mesh_setup_s"].append(time.monotonic() - t0)
        os.kill(_status(lab, "relay7")["pid"], signal.SIGKILL)
        # relay7 was a shortcut between relay1 and relay4: let its death settle
        # (announcement gone, routes around it) before timing connects
        time.sleep(15)
        for _ in range(runs):
            samples["connect_single_s"].append(timed_connect(lab))
            meshvpn(lab, "client1", "disconnect")
            samples["connect_multihop_s"].append(
                timed_connect(lab, "--entry", ids[1], "--exit", ids[4])
            )
            # a transit relay dies under a download
            via = _route_via(lab, 1, 4)
            assert via is not None
            transit = _neighbour_index(lab, 1, via, ids)
            download = Download(lab, "client1", size)
            time.sleep(1.0)
            killed_at = time.monotonic()
            os.kill(_status(lab, f"relay{transit}")["pid"], signal.SIGKILL)
            while _route_via(lab, 1, 4) in (via, None):
                time.sleep(0.05)
            samples["reroute_s"].append(time.monotonic() - killed_at)
            samples["transit_gap_s"].append(download.result()["max_gap_s"])
            # the entry dies under a download
            download = Download(lab, "client1", size)
            time.sleep(1.0)
            os.kill(_status(lab, "relay1")["pid"], signal.SIGKILL)
            samples["entry_gap_s"].append(download.result()["max_gap_s"])
            meshvpn(lab, "client1", "disconnect")
            for index in (transit, 1):
                restart(lab, index, ids, ring)
            wait_ring(lab)
    report: dict[str, Any] = {name: summary(s) for name, s in samples.items() if s}
    report["ratio_connect_multihop_to_single"] = round(
        report["connect_multihop_s"]["median_s"] / report["connect_single_s"]["median_s"], 2
    )
    report["goal_failover_s"] = 5.0
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def start_mesh_ring(lab: Lab, ring: list[tuple[int, int]]) -> dict[int, dict[str, Any]]:
    """The ring without relay7 (it joins later)."""
    ids = {i: node_id(lab, f"relay{i}") for i in range(1, 7)}
    started = {}
    for i in ids:
        partners = [b for a, b in ring if a == i] + [a for a, b in ring if b == i]
        pinned = [arg for j in partners for arg in ("--mesh-neighbour", ids[j])]
        started[i] = start_relay(lab, i, "--mesh", *pinned, broker=True)
    wait_ring(lab)
    return started


def wait_ring(lab: Lab, timeout: float = 60) -> None:
    """Until relays 1-6 each have a route to the five others."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(len(_status(lab, f"relay{i}")["mesh"]["routes"]) >= 5 for i in range(1, 7)):
            return
        time.sleep(0.2)
    raise RuntimeError("the ring did not converge")


if __name__ == "__main__":
    sys.exit(main())
