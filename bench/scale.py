"""Control-plane scale: a new client choosing among 1,000 and 10,000 relays.

Lab: the broker (``meshvpn broker``: mosquitto with meshvpn's limits, TLS
1.3, client certificates and ACLs) in its namespace; in relay1's namespace a
crowd of N simulated relays (``meshvpn.lab.crowd``): each with its own keys
and broker certificate publishes one real signed Announcement, retained,
over its own TLS connection (16 at a time), and answers authenticated RTT
probes on its own UDP port with the real ``ProbeResponder``; clients in
client1's namespace, enrolled like any node.

Measured, alternating, per size:

- discovery: the real client path (``ClientAgent.prepare``: connect to the
  broker, subscribe, sync-topic gather into the ``Directory``, candidates,
  probes, choice), stopped where it would send the session request. One fresh
  process per run; the figures are taken inside it, from just before the
  agent starts to the relay picked, so Python's start-up is not in them
  (``bench/connect.py`` has that). Also its CPU seconds and how much its RSS
  grew (what the directory costs in memory).
- baseline, bare gather: a plain aiomqtt subscriber that receives the same
  retained messages and the same sync echo and does nothing with them: the
  floor set by the broker and the MQTT library.
- the broker's intake: relays announcing per second (TLS connect, publish
  retained at QoS 1, acknowledged, disconnect; certificates issued before
  the clock starts), and its delivery to one new subscriber per second.

    python bench/scale.py [--sizes 1000,10000] [--runs N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt
from common import MB, Benchmark, Goal, ratio, summary, write_report

from meshvpn.client import ClientAgent, ClientOptions
from meshvpn.directory import ANNOUNCE_PREFIX, sync_topic
from meshvpn.identity import load_identity
from meshvpn.lab import Lab, crowd
from meshvpn.lab.netns import exec_argv
from meshvpn.lab.nodes import broker_address, enroll, node_state_dir, start_broker
from meshvpn.mqtt import BrokerAddress, load_credentials

BENCHMARK = Benchmark(
    name="scale",
    title="Control plane: a new client choosing among N announced relays",
    order=40,
    needs_root=True,
    profiles=True,
    goals=(
        Goal("choose among 10,000 relays, s", "n10000.discovery_pick", "<=", 1.0, in_quick=False),
    ),
)

NEAR = "u33d"  # the client's --near; 1 % of the relays share it


# ---- the simulated relays (in relay1's namespace) ---------------------------


async def simulate(args: argparse.Namespace) -> None:
    """Commands on stdin (``grow N``, ``quit``); one JSON line on stdout per command."""
    rng = random.Random(args.seed)  # noqa: S311 - a reproducible population
    population = crowd.Population(args.host, near=NEAR)
    broker = BrokerAddress.parse(args.broker)
    loop = asyncio.get_running_loop()
    relays: list[crowd.SimRelay] = []
    transports: list[asyncio.BaseTransport] = []
    try:
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
            if not line or line[0] == "quit":
                return
            t0 = time.perf_counter()
            new = crowd.make_relays(population, len(relays), int(line[1]) - len(relays), rng)
            certs = crowd.certificates(new, args.ca_dir)
            made_s = time.perf_counter() - t0
            transports += await crowd.answer_probes(new, args.host)
            publish_s = await crowd.announce(new, certs, broker, args.ca_dir)
            relays += new
            out = {"relays": len(relays), "published": len(new), "made_s": round(made_s, 3)}
            out |= {"publish_s": round(publish_s, 3), "per_s": round(len(new) / publish_s)}
            print(json.dumps(out), flush=True)
    finally:
        for t in transports:
            t.close()


# ---- the measured clients (in client1's namespace) ---------------------------


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class _Picked(Exception):  # noqa: N818 - a signal, not an error
    def __init__(self, entry: Any) -> None:  # noqa: ANN401
        super().__init__("picked")
        self.entry = entry


async def discover(args: argparse.Namespace) -> dict[str, Any]:
    """The client's own discovery, timed; stops before the session request."""

    marks: dict[str, float] = {}

    class TimedClient(ClientAgent):
        async def _gather(self) -> None:
            marks["connected"] = time.perf_counter()
            await super()._gather()
            marks["gathered"] = time.perf_counter()

        async def _negotiate(self, entry: Any) -> Any:  # noqa: ANN401
            marks["picked"] = time.perf_counter()
            raise _Picked(entry)

    opts = ClientOptions(
        state_dir=args.state_dir,
        ifname="unused0",
        broker=BrokerAddress.parse(args.broker),
        near=NEAR,
        lockdown=False,
    )
    agent = TimedClient(opts)
    rss0, cpu0 = rss_bytes(), time.process_time()
    marks["start"] = time.perf_counter()
    picked = None
    try:
        await agent._run_built()  # noqa: SLF001 - the agent's own flow, without the lock
    except* _Picked as group:
        exc = group.exceptions[0]
        assert isinstance(exc, _Picked)
        picked = exc.entry
    cpu = time.process_time() - cpu0
    rss = rss_bytes()
    if picked is None:
        raise SystemExit("discovery ended without picking a relay")
    return {
        "connect_s": marks["connected"] - marks["start"],
        "gather_s": marks["gathered"] - marks["connected"],
        "choose_s": marks["picked"] - marks["gathered"],
        "pick_s": marks["picked"] - marks["start"],
        "cpu_s": cpu,
        "rss_growth_bytes": rss - rss0,
        "rss_bytes": rss,
        "directory": len(agent.directory),  # all it holds, checked or not yet
        "rejected": dict(agent.directory.rejected),
        "picked_geohash": picked.announcement.geohash,
    }


async def bare(args: argparse.Namespace) -> dict[str, Any]:
    """The same retained messages to a subscriber that does nothing with them."""

    broker = BrokerAddress.parse(args.broker)
    identity = load_identity(args.state_dir)
    tls = load_credentials(args.state_dir, identity).context(broker.host)
    sync = sync_topic(identity.node_id, os.urandom(8))  # the ACL: our own sync topics only
    count = 0
    start = time.perf_counter()
    # An unbounded queue: this is the floor, it must not drop what it measures.
    client = aiomqtt.Client(broker.host, broker.port, tls_context=tls, timeout=30)
    async with client:
        connected = time.perf_counter()
        await client.subscribe(sync, qos=0)
        await client.subscribe(ANNOUNCE_PREFIX + "+", qos=0)
        await client.publish(sync, b"sync", qos=0)
        async for message in client.messages:
            if str(message.topic) == sync:
                break
            count += 1
    done = time.perf_counter()
    return {"connect_s": connected - start, "gather_s": done - connected, "received": count}


# ---- the orchestrator (root) --------------------------------------------------


def run_client(lab: Any, mode: str, broker: str, *extra: str) -> dict[str, Any]:  # noqa: ANN401
    sd = str(enroll(lab, "scaleclient"))  # keys and a broker certificate, once
    argv = [sys.executable, str(Path(__file__).resolve()), mode, "--broker", broker]
    argv += ["--state-dir", sd, *extra]
    proc = lab.exec("client1", argv, check=False, timeout=120)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"{mode} failed: {err[-1] if err else proc.returncode}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def top_of_profile(path: Path, lines: int = 12) -> list[str]:
    """The functions that took the most time of their own, as 'seconds  calls  function'."""

    stats: Any = pstats.Stats(str(path)).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:lines]
    return [
        f"{tt:7.3f} s own {ct:7.3f} s cum {nc:7d} calls  {Path(f).name}:{ln}({fn})"
        for (f, ln, fn), (_, nc, tt, ct, _) in rows
    ]


def measure(sizes: list[int], runs: int, profile: bool) -> dict[str, Any]:

    report: dict[str, Any] = {}
    with Lab(f"bs{os.getpid() % 100_000:05d}") as lab:
        lab.up(1, 1)
        start_broker(lab)
        broker = broker_address(lab)
        host = str(lab.plan.relay(1).wan_addr)
        argv = [sys.executable, str(Path(__file__).resolve()), "simulate"]
        argv += ["--broker", broker, "--host", host]
        argv += ["--ca-dir", str(node_state_dir(lab, "broker"))]
        sim = subprocess.Popen(
            exec_argv(lab.netns("relay1"), argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
        try:
            assert sim.stdin is not None
            assert sim.stdout is not None
            for n in sizes:
                sim.stdin.write(f"grow {n}\n")
                sim.stdin.flush()
                line = sim.stdout.readline()
                if not line:
                    raise RuntimeError("the relay simulator died")
                published = json.loads(line)
                found: dict[str, list[dict[str, Any]]] = {"discovery": [], "bare": []}
                for i in range(runs):
                    # alternate which goes first: neither always gets the warmer machine
                    order = ("discovery", "bare") if i % 2 == 0 else ("bare", "discovery")
                    for mode in order:
                        argv_mode = "discover" if mode == "discovery" else "bare"
                        found[mode].append(run_client(lab, argv_mode, broker))
                report[f"n{n}"] = figures(n, published, found)
                if profile:
                    with tempfile.TemporaryDirectory() as tmp:
                        prof = Path(tmp) / "discover.prof"
                        run_client(lab, "discover", broker, "--profile", str(prof))
                        report[f"n{n}"]["profile_discovery"] = top_of_profile(prof)
            sim.stdin.write("quit\n")
            sim.stdin.flush()
            sim.wait(timeout=30)
        finally:
            if sim.poll() is None:
                sim.kill()
                sim.wait()
    return report


def figures(
    n: int, published: dict[str, Any], found: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    d, b = found["discovery"], found["bare"]
    out: dict[str, Any] = {
        "relays": n,
        "broker_intake_per_s": published["per_s"],
        "discovery_pick": summary([r["pick_s"] for r in d], "s"),
        "discovery_connect": summary([r["connect_s"] for r in d], "s"),
        "discovery_gather": summary([r["gather_s"] for r in d], "s"),
        "discovery_choose": summary([r["choose_s"] for r in d], "s"),
        "discovery_cpu": summary([r["cpu_s"] for r in d], "s"),
        "discovery_rss_growth": summary([r["rss_growth_bytes"] / MB for r in d], "mb", 1),
        "discovery_rss": summary([r["rss_bytes"] / MB for r in d], "mb", 1),
        "baseline_bare_gather": summary([r["gather_s"] for r in b], "s"),
        "broker_delivery": summary([n / r["gather_s"] for r in b], "per_s", 0),
        "directory_size": min(r["directory"] for r in d),
        "bare_received": min(r["received"] for r in b),
        "rejected": d[-1]["rejected"],
    }
    out["ratio_gather_to_bare"] = ratio(out["discovery_gather"], out["baseline_bare_gather"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode")
    p = sub.add_parser("simulate")
    p.add_argument("--broker", required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--ca-dir", type=Path, required=True, help="the broker's, with its CA")
    p.add_argument("--seed", type=int, default=9)
    for mode in ("discover", "bare"):
        p = sub.add_parser(mode)
        p.add_argument("--broker", required=True)
        p.add_argument("--state-dir", type=Path, required=True, help="an enrolled node's")
        p.add_argument("--profile", type=Path, help="cProfile the run into this file")
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1,000 relays, one run")
    parser.add_argument("--profile", action="store_true", help="add one profiled discovery")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.mode == "simulate":
        with crowd.more_files():
            asyncio.run(simulate(args))
        return 0
    if args.mode in ("discover", "bare"):
        job = discover(args) if args.mode == "discover" else bare(args)
        if args.profile is None:
            result = asyncio.run(job)
        else:
            with cProfile.Profile() as prof:
                result = asyncio.run(job)
            prof.dump_stats(args.profile)
        print(json.dumps(result))
        return 0
    sizes = [1000] if args.quick else [int(s) for s in args.sizes.split(",")]
    write_report(measure(sizes, 1 if args.quick else args.runs, args.profile), args.out)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
