"""Mesh routing: convergence in virtual time, and CPU per routing update.

Random meshes of 30 and 100 relays (points in a square, each linked to its 3
nearest, one-way delay 1 ms + up to 40 ms by distance, joined up if split) run
``meshvpn.routing.Router`` with its default parameters in the in-memory
simulator (``meshvpn.routing_sim``), in virtual time: the figures are protocol
times, not this machine's speed.

- ``converge``: from every router starting at once until the last route change
  (all tables then equal shortest paths; checked).
- ``flowing_after_death``: a random relay dies silently (kill -9 or power cut);
  time until every pair of live relays that can still reach each other has a
  working forwarding path again (the issue's goal: within 5 s).
- ``settled_after_death``: until the last route change after the death, with
  the tables equal to shortest paths on what is left and the dead relay's
  prefix gone everywhere (checked). The relay then restarts with no state;
  ``rejoin`` is the time until it routes to every relay and all to it.
- ``router_us_per_update``: time inside ``Router`` calls (receiving, deciding,
  sending) per routing update received, against a baseline measured in the
  same run: encoding and decoding a full packet of updates, per update, which
  any implementation of this wire format pays for each update sent and heard.
- ``steady_bytes_per_s_per_link``: routing traffic on a link of a settled mesh,
  each way (Hellos, IHUs and the periodic full updates).

    python bench/routing.py [--deaths N] [--quick]    # --quick: 30 relays, one death
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

from meshvpn.routing import MAX_PACKET, Update, decode_packet, pack
from meshvpn.routing_sim import (
    Simulation,
    delivers,
    node_address,
    node_prefix,
    routing_errors,
)

QUIET_MS = 20_000
LIMIT_MS = 600_000
STEP_MS = 50


def random_mesh(n: int, seed: int) -> tuple[list[tuple[float, float]], list[tuple[int, int]]]:
    """Points in a unit square, each linked to its 3 nearest, components joined up
    through their closest pair: (points, links as sorted pairs). ``bench/meshscale.py``
    starts the same mesh in the lab."""
    rng = random.Random(seed)  # noqa: S311 - a benchmark topology
    points = [(rng.random(), rng.random()) for _ in range(n)]
    edges: set[frozenset[int]] = set()
    for i in range(n):
        nearest = sorted(
            (j for j in range(n) if j != i), key=lambda j: math.dist(points[i], points[j])
        )
        edges.update(frozenset((i, j)) for j in nearest[:3])
    # join components through their closest pair
    while True:
        comp = component(0, edges, set(range(n)))
        if len(comp) == n:
            break
        a, b = min(
            ((i, j) for i in comp for j in range(n) if j not in comp),
            key=lambda p: math.dist(points[p[0]], points[p[1]]),
        )
        edges.add(frozenset((a, b)))
    return points, [(a, b) for a, b in sorted(tuple(sorted(e)) for e in edges)]


def build(n: int, seed: int) -> Simulation:
    points, links = random_mesh(n, seed)
    sim = Simulation(seed=seed)
    sim.measure_cpu = True
    for i in range(n):
        sim.add_node(i)

    def delay(i: int, j: int) -> int:
        return 1 + round(40 * math.dist(points[i], points[j]))

    for a, b in links:
        sim.connect(a, b, delay(a, b))
    return sim


def component(start: int, edges: set[frozenset[int]], alive: set[int]) -> set[int]:
    seen, todo = {start}, [start]
    while todo:
        node = todo.pop()
        for e in edges:
            if node in e:
                (other,) = e - {node}
                if other in alive and other not in seen:
                    seen.add(other)
                    todo.append(other)
    return seen


def all_flowing(sim: Simulation) -> bool:
    costs = sim.costs()
    fwd = sim.forwarding()
    graph = {i: set(costs[i]) for i in sim.routers}
    for src in sim.routers:
        reach, todo = {src}, [src]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in reach:
                    reach.add(nxt)
                    todo.append(nxt)
        for dst in reach - {src}:
            if not delivers(sim, src, dst, fwd):
                return False
    return True


def updates_received(sim: Simulation) -> int:
    return sum(r.counters["updates_received"] for r in sim.routers.values())


def measure(n: int, deaths: int, seed: int) -> dict[str, object]:
    sim = build(n, seed)
    rng = random.Random(seed + 1)  # noqa: S311 - which relay dies
    start = sim.now_ms
    if not sim.run_until_quiet(QUIET_MS, LIMIT_MS):
        raise SystemExit(f"{n} nodes never settled")
    if routing_errors(sim):
        raise SystemExit(f"{n} nodes: wrong routes after start: {routing_errors(sim)[:3]}")
    converge = sim.last_change_ms - start
    sent, since = sim.bytes_sent, sim.now_ms
    sim.run_for(QUIET_MS)
    steady = (sim.bytes_sent - sent) / ((sim.now_ms - since) / 1000) / (2 * len(sim.links))
    cpu_ns, updates = sim.router_cpu_ns, updates_received(sim)
    flowing, settled, rejoin = [], [], []
    for _ in range(deaths):
        victim = rng.randrange(n)
        sim.kill(victim)
        died = sim.now_ms
        while not all_flowing(sim) and sim.now_ms - died < LIMIT_MS:
            sim.run_for(STEP_MS)
        flowing.append(sim.now_ms - died)
        if not sim.run_until_quiet(QUIET_MS, LIMIT_MS) or routing_errors(sim):
            raise SystemExit(f"{n} nodes: not converged after a death: {routing_errors(sim)[:3]}")
        settled.append(sim.last_change_ms - died)
        back = sim.now_ms
        before_cpu, before_updates = sim.router_cpu_ns, updates_received(sim)
        sim.restart(victim)
        while sim.now_ms - back < LIMIT_MS and not all(
            node_prefix(victim) in r.table() and node_prefix(i) in sim.routers[victim].table()
            for i, r in sim.routers.items()
            if i != victim
        ):
            sim.run_for(STEP_MS)
        rejoin.append(sim.now_ms - back)
        if not sim.run_until_quiet(QUIET_MS, LIMIT_MS) or routing_errors(sim):
            raise SystemExit(f"{n} nodes: not converged after a restart: {routing_errors(sim)[:3]}")
        cpu_ns += sim.router_cpu_ns - before_cpu
        updates += updates_received(sim) - before_updates
    links = len(sim.links)
    return {
        "nodes": n,
        "links": links,
        "converge_ms": converge,
        "steady_bytes_per_s_per_link": round(steady),
        "flowing_after_death_ms": summary(flowing),
        "settled_after_death_ms": summary(settled),
        "rejoin_ms": summary(rejoin),
        "router_us_per_update": round(cpu_ns / 1000 / max(1, updates), 2),
    }


def summary(values: list[int]) -> dict[str, object]:
    return {
        "median_ms": statistics.median(values),
        "min_ms": min(values),
        "max_ms": max(values),
        "runs": len(values),
    }


def codec_baseline_us(seconds: float) -> float:
    """Per update: encode and decode a full packet of updates."""
    updates = [Update(node_prefix(i), node_address(i), i, 100 + i, 400) for i in range(200)]
    packet = pack(updates)[0]
    body = decode_packet(packet)
    assert len(packet) <= MAX_PACKET
    n, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(20):
            decode_packet(pack(body)[0])
        n += 20
    return elapsed / (n * len(body)) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deaths", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    deaths = 1 if args.quick else args.deaths
    baseline = codec_baseline_us(0.1 if args.quick else 1.0)
    report: dict[str, object] = {"baseline_codec_us_per_update": round(baseline, 2)}
    for n in (30,) if args.quick else (30, 100):
        result = measure(n, deaths, args.seed)
        report[f"mesh{n}"] = result
        report[f"mesh{n}_flowing_after_death"] = result["flowing_after_death_ms"]
        report[f"mesh{n}_settled_after_death"] = result["settled_after_death_ms"]
        us = result["router_us_per_update"]
        assert isinstance(us, float)
        report[f"ratio_mesh{n}_router_to_codec_per_update"] = round(us / baseline, 2)
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
