"""Mesh scale in the lab: the largest real mesh this machine runs, and how fast its
routes converge after a relay dies.

``bench/routing.py`` measures the routing protocol in virtual time; this is the
real thing beside it, on the same topology (``routing.random_mesh``: each relay
linked to its 3 nearest of random points, joined up; relay ``i+1`` here is
node ``i`` there, and the same seed picks the same relays to die). Every relay
is a real agent (``meshvpn relay --mesh`` with its links pinned), with a
wireguard-go per mesh link and one for its access interface, announcing
through the lab's mosquitto. The links carry no added delay.

Figures (routes read from the kernel: meshvpn's table 51830 in every relay's
namespace, all relays at once, every ``POLL_S``; a sweep's duration bounds the
resolution and is reported):

- ``converge_s``: from starting the first relay (then one every
  ``START_GAP_S``, without waiting for each) until every link is up and every
  relay's table forwards to every other relay's prefix (next hops walked hop
  by hop);
- after ``kill -9`` of a relay agent (its wireguard-go processes die with it,
  as in a power cut): ``rerouted_s``, until every pair of live relays that can
  still reach each other forwards around it, and ``dropped_s``, until no live
  relay holds a route to its prefix or through a link to it. The relay then
  restarts; ``rejoin_s``: until its links are up again, every table routes to
  it and it to all;
- the idle mesh's cost, from /proc over ``--idle`` seconds once it has
  converged: CPU (% of one core) and RSS of the agents, of their wireguard-go
  processes and of mosquitto, the process count, and the machine's idle CPU.

``--relays`` lists sizes to try, largest first: a mesh that has not converged
within ``LIMIT_S`` is reported (``larger_tried``: link ends up, link flaps,
neighbours found silent, what it cost meanwhile) and the next size tried;
``relays`` is the size that converged and was measured.

The default tries 30 relays (the goal; it converged in 30-45 s on this 2-core
machine while other benchmarks ran) with 20 as the fallback, and kills
``--deaths`` 2 relays: about 2 minutes when 30 converges, under 3 when it
does not (``make bench`` must stay under 20 minutes). A 30-relay lab takes the
whole machine: 150 wireguard-go and 30 agents at idle, ~2.5 % of a core each
agent and ~0.3 % each wireguard-go, so timings here are noisier than at 8.

    python bench/meshscale.py [--relays N,N...] [--deaths N] [--seed S] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    CLK_TCK,
    MB,
    Benchmark,
    Goal,
    ProcSample,
    children,
    proc_sample,
    summary,
    write_report,
)
from routing import random_mesh

from meshvpn.identity import load_identity, mesh_prefix_of
from meshvpn.lab import Lab
from meshvpn.lab.nodes import (
    LAB_INTERNET,
    RELAY_PORT,
    broker_address,
    enroll,
    meshvpn_argv,
    node_ifname,
    node_state_dir,
    relay_endpoint,
    start_broker,
)

BENCHMARK = Benchmark(
    name="meshscale",
    title="Mesh scale in the lab: real relays, route convergence after one dies",
    order=75,
    needs_root=True,
    goals=(
        Goal("relays in the largest lab mesh", "relays", ">=", 30, in_quick=False),
        Goal("routes around a dead relay everywhere, ms", "rerouted_ms", "<=", 5000),
    ),
)

MESH_TABLE = "51830"  # relay.mesh.MESH_TABLE
POLL_S = 0.05
LIMIT_S = 90.0
START_GAP_S = 0.5  # between relay starts: a herd of Python start-ups helps nobody


@dataclass(frozen=True)
class Relay:
    index: int
    address: ipaddress.IPv6Address  # its mesh address
    prefix: ipaddress.IPv6Network  # the /64 it originates


Table = dict[ipaddress.IPv6Network, str]  # destination -> device


def read_tables(lab: Lab, indices: list[int]) -> dict[int, Table]:
    """Table 51830 of every given relay, read with ``ip -n`` in parallel."""
    procs = {
        i: subprocess.Popen(
            ["ip", "-n", lab.netns(f"relay{i}"), "-6", "-j", "route", "show", "table", MESH_TABLE],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        for i in indices
    }
    tables: dict[int, Table] = {}
    for i, proc in procs.items():
        out, _ = proc.communicate(timeout=30)
        try:
            routes = json.loads(out)
        except ValueError:  # no table yet: `ip` prints "[" and an error
            routes = []
        tables[i] = {
            ipaddress.IPv6Network(r["dst"] if "/" in r["dst"] else f"{r['dst']}/128"): r["dev"]
            for r in routes
            if r.get("dst", "default") != "default" and "dev" in r
        }
    return tables


class Mesh:
    """The relays' tables, judged against the topology."""

    def __init__(self, relays: Mapping[int, Relay], links: list[tuple[int, int]]) -> None:
        self.relays, self.links = dict(relays), links
        self.by_address = {r.address: i for i, r in relays.items()}

    def neighbours_by_dev(self, table: Table) -> dict[str, int]:
        """Which relay each link device leads to (the /128 route to its address)."""
        found = {}
        for dst, dev in table.items():
            if dst.prefixlen == 128 and dst.network_address in self.by_address:
                found[dev] = self.by_address[dst.network_address]
        return found

    def reachable(self, live: set[int]) -> dict[int, set[int]]:
        """For each live relay, the live relays the live links still join it to."""
        out: dict[int, set[int]] = {}
        for start in live:
            seen, todo = {start}, [start]
            while todo:
                at = todo.pop()
                for a, b in self.links:
                    other = b if a == at else a if b == at else None
                    if other is not None and other in live and other not in seen:
                        seen.add(other)
                        todo.append(other)
            out[start] = seen - {start}
        return out

    def forwards(self, tables: dict[int, Table], src: int, dst: int, avoid: int | None) -> bool:
        """Does the walk of next hops from ``src`` reach ``dst``'s prefix (not via ``avoid``)?"""
        at, prefix = src, self.relays[dst].prefix
        for _ in range(len(self.relays)):
            if at == dst:
                return True
            table = tables.get(at)
            if table is None or prefix not in table:
                return False
            nxt = self.neighbours_by_dev(table).get(table[prefix])
            if nxt is None or nxt == avoid:
                return False
            at = nxt
        return False

    def all_forward(self, tables: dict[int, Table], live: set[int], dead: int | None) -> bool:
        reach = self.reachable(live)
        return all(self.forwards(tables, a, b, dead) for a in live for b in reach[a])

    def routed_around(self, live: set[int], dead: int | None) -> Callable[[dict[int, Table]], bool]:
        return lambda tables: self.all_forward(tables, live, dead)

    def complete(self, live: set[int]) -> Callable[[dict[int, Table]], bool]:
        """Every link up (each relay routes to each partner over a link of its own)
        and every relay forwarding to every other."""

        def done(tables: dict[int, Table]) -> bool:
            for i in live:
                partners = {b for a, b in self.links if a == i} | {
                    a for a, b in self.links if b == i
                }
                if set(self.neighbours_by_dev(tables[i]).values()) != partners & live:
                    return False
            return self.all_forward(tables, live, None)

        return done

    def forgot(self, live: set[int], dead: int) -> Callable[[dict[int, Table]], bool]:
        return lambda tables: not any(self.mentions(tables[i], dead) for i in live)

    def stale(self, tables: dict[int, Table], live: list[int], dead: int) -> list[str]:
        """The routes that still lead to or through ``dead``, as 'relayN: dst dev'."""
        gone, out = self.relays[dead], []
        for i in live:
            links_to_dead = {d for d, n in self.neighbours_by_dev(tables[i]).items() if n == dead}
            out += [
                f"relay{i}: {dst} {dev}"
                for dst, dev in tables[i].items()
                if dst.subnet_of(gone.prefix) or dev in links_to_dead
            ]
        return [f"relay{dead} died", *out[:20]]

    def mentions(self, table: Table, dead: int) -> bool:
        """A route to the dead relay's prefix or address, or through a link to it."""
        gone = self.relays[dead]
        links_to_dead = {dev for dev, n in self.neighbours_by_dev(table).items() if n == dead}
        return any(dst.subnet_of(gone.prefix) or dev in links_to_dead for dst, dev in table.items())


def wait_until(
    lab: Lab, live: list[int], done: Callable[[dict[int, Table]], bool], t0: float
) -> tuple[float, float]:
    """Poll the live relays' tables until ``done(tables)``; (seconds since ``t0``, an
    upper bound by at most a sweep and ``POLL_S``; the slowest sweep's seconds)."""
    sweeps: list[float] = []
    while True:
        began = time.monotonic()
        tables = read_tables(lab, live)
        sweeps.append(time.monotonic() - began)
        if done(tables):
            # true by the end of this sweep, not yet at the start of the one before
            return time.monotonic() - t0, max(sweeps)
        if time.monotonic() - t0 > LIMIT_S:
            raise NotConvergedError(tables)
        time.sleep(POLL_S)


class NotConvergedError(Exception):
    """The tables never got there within ``LIMIT_S``; the last ones read."""

    def __init__(self, tables: dict[int, Table]) -> None:
        super().__init__(f"the mesh did not converge within {LIMIT_S:g} s")
        self.tables = tables


def machine_idle() -> tuple[float, float]:
    """(idle jiffies, all jiffies) of the whole machine, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields)


def samples(pids: list[int]) -> dict[int, ProcSample]:
    found = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            found[pid] = proc_sample(pid)
    return found


def waited_s(pids: list[int]) -> float:
    """CPU seconds of these processes' exited and waited-for children (cutime + cstime)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[13]) + int(fields[14])) / CLK_TCK
    return total


def footprint(agents: dict[int, int], broker: int, idle_s: float) -> dict[str, Any]:
    """What the idle mesh costs: CPU over ``idle_s`` and RSS, by kind of process."""
    groups = {
        "agents": list(agents.values()),
        "wireguard_go": [c for pid in agents.values() for c in children(pid, "wireguard-go")],
        "broker": [broker, *children(broker, "mosquitto")],
    }
    before = {g: samples(pids) for g, pids in groups.items()}
    waited = {g: waited_s(list(before[g])) for g in groups}
    idle0, all0 = machine_idle()
    t0 = time.monotonic()
    time.sleep(idle_s)
    wall = time.monotonic() - t0
    idle1, all1 = machine_idle()
    out: dict[str, Any] = {}
    for group, pids in groups.items():
        after = samples(pids)
        # a process that came or went meanwhile (a flapping link's) is left out
        both = [p for p in pids if p in after and p in before[group]]
        cpu = sum(after[p].cpu_s - before[group][p].cpu_s for p in both)
        out[group] = {
            "processes": len(both),
            "cpu_pct_of_a_core": round(100 * cpu / wall, 1),
            # what their exited children (ip, nft, wg runs) took meanwhile
            "children_cpu_pct_of_a_core": round(100 * (waited_s(both) - waited[group]) / wall, 1),
            "rss_total_mb": round(sum(after[p].rss_bytes for p in both) / MB, 1),
            "rss_each_mb": summary([after[p].rss_bytes / MB for p in both] or [0], "mb", 1),
        }
    out["machine_idle_pct"] = round(100 * (idle1 - idle0) / max(1.0, all1 - all0), 1)
    out["cpus"] = os.cpu_count()
    out["load_average"] = Path("/proc/loadavg").read_text().split()[:3]
    return out


def spawn_relay(lab: Lab, index: int, links: list[tuple[int, int]], ids: dict[int, str]) -> int:
    """Start relay ``index`` (links pinned to its partners in ``links``) as
    ``start_relay`` does, without waiting for it: at this scale a ``meshvpn status``
    (a Python start-up per call) is what times out first. Returns the agent's pid."""
    node = f"relay{index}"
    partners = [b for a, b in links if a == index] + [a for a, b in links if b == index]
    pinned = [arg for j in partners for arg in ("--mesh-neighbour", ids[j])]
    sd = node_state_dir(lab, node)
    argv = meshvpn_argv(
        "relay", "--state-dir", str(sd), "--interface", node_ifname(lab, node),
        "--listen-port", str(RELAY_PORT), "--allow", LAB_INTERNET, "--mesh", *pinned,
        "--broker", broker_address(lab), "--endpoint", relay_endpoint(lab, index),
    )  # fmt: skip
    return lab.spawn(node, argv, log=sd / "agent.log")


def identify(lab: Lab, index: int) -> tuple[str, Relay]:
    """Keys and a broker certificate for relay ``index``; its node id and mesh addresses."""
    identity = load_identity(enroll(lab, f"relay{index}"))
    address = identity.mesh_address
    return identity.node_id, Relay(index, address, mesh_prefix_of(address))


INOTIFY_LIMIT = Path("/proc/sys/fs/inotify/max_user_instances")


@contextlib.contextmanager
def inotify_room(processes: int) -> Iterator[None]:
    """Every wireguard-go watches its UAPI socket with an inotify instance of its own,
    and Linux allows a user 128 by default: fewer than a 30-relay mesh runs (a relay
    runs one per link and one for its access interface). Raised for the run if
    needed, and put back after."""
    old = int(INOTIFY_LIMIT.read_text())
    want = processes + 128  # and room for everyone else's
    if old >= want:
        yield
        return
    print(f"raising {INOTIFY_LIMIT} from {old} to {want} for the run", file=sys.stderr)
    INOTIFY_LIMIT.write_text(f"{want}\n")
    try:
        yield
    finally:
        INOTIFY_LIMIT.write_text(f"{old}\n")


def measure(n: int, deaths: int, seed: int, idle_s: float) -> dict[str, Any]:
    _, topology = random_mesh(n, seed)
    links = [(a + 1, b + 1) for a, b in topology]
    victims = random.Random(seed + 1)  # noqa: S311 - as bench/routing.py picks them
    everyone = list(range(1, n + 1))
    rerouted, dropped, rejoin, sweep = [], [], [], []
    stale: list[list[str]] = []
    with inotify_room(n * 8), Lab(f"bs{os.getpid() % 100_000:05d}") as lab:
        lab.up(n, 0)
        broker = start_broker(lab)
        ids: dict[int, str] = {}
        relays: dict[int, Relay] = {}
        for i in everyone:
            ids[i], relays[i] = identify(lab, i)
        t0 = time.monotonic()
        pids: dict[int, int] = {}
        for i in everyone:
            pids[i] = spawn_relay(lab, i, links, ids)
            time.sleep(START_GAP_S)
        start_s = time.monotonic() - t0
        mesh = Mesh(relays, links)
        try:
            converge_s, s = wait_until(
                lab, everyone, mesh.complete(set(everyone)), time.monotonic()
            )
        except NotConvergedError as e:
            return not_converged(lab, n, mesh, e.tables, pids, broker, idle_s)
        sweep.append(s)
        cost = footprint(pids, broker, idle_s)
        for _ in range(deaths):
            victim = victims.randrange(n) + 1
            live = [i for i in everyone if i != victim]
            os.kill(pids[victim], signal.SIGKILL)  # started by this lab: ours
            killed = time.monotonic()
            took, s = wait_until(lab, live, mesh.routed_around(set(live), victim), killed)
            rerouted.append(took)
            sweep.append(s)
            try:
                took, s = wait_until(lab, live, mesh.forgot(set(live), victim), killed)
                dropped.append(took)
                sweep.append(s)
            except NotConvergedError as e:
                # routes to or through the dead relay that outlived LIMIT_S, and where
                stale.append(mesh.stale(e.tables, live, victim))
            back = time.monotonic()
            pids[victim] = spawn_relay(lab, victim, links, ids)
            took, s = wait_until(lab, everyone, mesh.complete(set(everyone)), back)
            rejoin.append(took)
            sweep.append(s)
        flaps, crashed = link_flaps(lab, n), agent_crashes(lab, n)
        silent = neighbours_silent(lab, n)
    degree = [sum(i in link for link in links) for i in everyone]
    return {
        "relays": n,
        "converged": True,
        "link_flaps": flaps,
        "neighbours_silent": silent,
        "agents_crashed": crashed,
        "links": len(links),
        "link_degree": summary(degree, "links", 1),
        "converge_s": round(start_s + converge_s, 1),
        "rerouted_ms": summary([1000 * x for x in rerouted], "ms", 0),
        "dropped_ms": summary([1000 * x for x in dropped] or [1000 * LIMIT_S], "ms", 0),
        "deaths_never_dropped": stale,
        "rejoin_ms": summary([1000 * x for x in rejoin], "ms", 0),
        "slowest_sweep_s": round(max(sweep), 3),
        "idle_mesh": cost,
    }


def agent_crashes(lab: Lab, n: int) -> dict[str, int]:
    """Relay agents that died of an unhandled exception, by its last line."""
    found: dict[str, int] = {}
    for i in range(1, n + 1):
        log = (node_state_dir(lab, f"relay{i}") / "agent.log").read_text(errors="replace")
        if "Traceback" not in log:
            continue
        errors = [
            line.strip(" |")
            for line in log.splitlines()
            if re.match(r"^[\s|]*[A-Za-z.]*(Error|Exception)\b.*:", line)
        ]
        why = errors[-1][:160] if errors else "?"
        found[why] = found.get(why, 0) + 1
    return found


def log_count(lab: Lab, n: int, what: str) -> int:
    """Lines with ``what`` in every relay's log."""
    return sum(
        (node_state_dir(lab, f"relay{i}") / "agent.log").read_text(errors="replace").count(what)
        for i in range(1, n + 1)
    )


def link_flaps(lab: Lab, n: int) -> int:
    """Mesh links taken down (interface and wireguard-go removed), by every relay's log."""
    return log_count(lab, n, "link down:")


def neighbours_silent(lab: Lab, n: int) -> int:
    """Times routing found a neighbour silent (its routes went; the link stayed)."""
    return log_count(lab, n, "neighbour silent:")


def not_converged(  # noqa: PLR0917
    lab: Lab,
    n: int,
    mesh: Mesh,
    tables: dict[int, Table],
    pids: dict[int, int],
    broker: int,
    idle_s: float,
) -> dict[str, Any]:
    """What a mesh that did not converge looked like, and what it cost meanwhile."""
    ends = [(i, p) for a, b in mesh.links for i, p in ((a, b), (b, a))]
    up = sum(p in mesh.neighbours_by_dev(tables.get(i, {})).values() for i, p in ends)
    return {
        "relays": n,
        "converged": False,
        "links": len(mesh.links),
        "link_ends_up_at_the_end": f"{up} of {len(ends)}",
        "link_flaps": link_flaps(lab, n),
        "neighbours_silent": neighbours_silent(lab, n),
        "agents_crashed": agent_crashes(lab, n),
        "while_trying": footprint(pids, broker, idle_s),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--relays",
        default="30,20",
        help="mesh sizes to try, largest first, until one converges (default: %(default)s)",
    )
    parser.add_argument("--deaths", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle sampling")
    parser.add_argument("--quick", action="store_true", help="5 relays, one death")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.relays, args.deaths, args.idle = "5", 1, 2.0
    tried = []
    for n in (int(x) for x in args.relays.split(",")):
        result = measure(n, args.deaths, args.seed, args.idle)
        if result["converged"]:
            break
        tried.append(result)
    else:
        result = {"relays": 0}  # none converged: the goal has its figure, and fails
    write_report({**result, "larger_tried": tried}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
