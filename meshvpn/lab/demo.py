"""``meshvpn demo``: the whole network on this machine, earning as you watch.

What it builds, in a lab of namespaces (meshvpn.lab): an MQTT broker, the
accounting service with short epochs (60 s), five relays whose mesh links
are pinned to a ring (relay1 - relay2 - ... - relay5 - relay1), and two
clients with deposited credit that download continuously (about 1 MB/s each):

- client1 connects through relay1 (single hop: relay1 is entry and exit);
- client2 goes multi-hop (``--hops 2``): it enters the mesh at one relay and
  leaves at another, and moves to the next pair every phase (a third of the
  run, at most 30 s), so within two phases every relay has carried paid
  traffic, and a relay in between forwards the ciphertext as transit.

Interactive (no ``--duration``): relay1's dashboard opens in this terminal;
Ctrl-C closes it and tears everything down. Headless (``--duration S``):
runs that long, stops the downloads, waits until every receipt is delivered
and booked, prints a summary (``--json``: as JSON; progress goes to stderr),
tears down, and checks that nothing is left: no namespace of the prefix, no
process the demo started, no state directory. Exit 0 only if every relay has
receipts and earnings and nothing is left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from meshvpn.errors import LocalError
from meshvpn.lab import netns
from meshvpn.lab.lab import Lab
from meshvpn.lab.nodes import (
    LAB_CREDIT,
    deposit,
    discover_and_connect,
    meshvpn,
    meshvpn_argv,
    node_id,
    node_state_dir,
    start_accounting,
    start_broker,
    start_mesh,
    wait_mesh_routes,
)
from meshvpn.lab.topology import owns_netns
from meshvpn.views import read_earnings, read_status

RELAYS: Final = 5
RING: Final = [(1, 2), (2, 3), (3, 4), (4, 5), (5, 1)]
CLIENT1_RELAY: Final = 1
# client2's (entry, exit) per phase: two hops apart on the ring, so a third relay
# forwards in between; the first two phases cover all five relays.
PHASES: Final = [(2, 4), (3, 5), (4, 1), (5, 2), (1, 3)]
MAX_PHASE_S: Final = 30.0
MIN_PHASE_S: Final = 8.0
STREAM_RATE: Final = 1_000_000  # bytes/s per client: enough to earn, little CPU
SETTLE_TIMEOUT_S: Final = 45.0

STREAM = """\
import sys, time, urllib.request
url, rate = sys.argv[1], int(sys.argv[2])
while True:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            start, got = time.monotonic(), 0
            while chunk := r.read(16384):
                got += len(chunk)
                ahead = got / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
    except Exception:
        time.sleep(0.5)
"""


class Demo:
    def __init__(self, lab: Lab, epoch_s: float, say: Callable[[str], None]) -> None:
        self.lab = lab
        self.epoch_s = epoch_s
        self.say = say
        self.ids: dict[int, str] = {}
        self.phase = 0
        self.streams: dict[str, int] = {}
        self.pids: list[int] = []

    # ---- building it

    def build(self) -> None:
        lab, say = self.lab, self.say
        say(
            f"building the lab: a broker, accounting (epochs of {self.epoch_s:g} s), {RELAYS}"
            " relays in a mesh ring, two clients ..."
        )
        lab.up(RELAYS, 2)
        self.pids.append(start_broker(lab))
        key, pid = start_accounting(lab, self.epoch_s)
        self.pids.append(pid)
        self.ids = {i: node_id(lab, f"relay{i}") for i in range(1, RELAYS + 1)}
        started = start_mesh(lab, RING, "--accounting-key", key)
        self.pids += [s["pid"] for s in started.values()]
        wait_mesh_routes(lab, timeout=60)
        say("mesh up: every relay routes to every other; depositing credit for the clients ...")
        for j in (1, 2):
            deposit(lab, f"client{j}", LAB_CREDIT)
        self._wait_for_credit([node_id(lab, f"client{j}") for j in (1, 2)])
        discover_and_connect(lab, 1, "--entry", self.ids[CLIENT1_RELAY])
        self._connect_client2()
        for j in (1, 2):
            self._start_stream(f"client{j}")
        say(
            f"client1 downloads through relay{CLIENT1_RELAY}; client2 through"
            f" {self.describe_phase()}, moving every phase"
        )

    def _wait_for_credit(self, clients: list[str], timeout: float = 30.0) -> None:
        """Until every relay holds a credit notice for every client (it refuses them before)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [_status(self.lab, f"relay{i}") or {} for i in range(1, RELAYS + 1)]
            if all(set(clients) <= set(s.get("credit_clients") or []) for s in states):
                return
            time.sleep(0.2)
        raise LocalError(f"the relays heard no credit notice for the clients within {timeout:g} s")

    def describe_phase(self) -> str:
        entry, exit_ = PHASES[self.phase % len(PHASES)]
        return f"relay{entry} -> relay{exit_} (multi-hop)"

    def _connect_client2(self) -> None:
        entry, exit_ = PHASES[self.phase % len(PHASES)]
        discover_and_connect(
            self.lab, 2, "--hops", "2", "--entry", self.ids[entry], "--exit", self.ids[exit_]
        )

    def _start_stream(self, node: str) -> None:
        pid = start_stream(self.lab, node)
        self.streams[node] = pid
        self.pids.append(pid)

    def stop_streams(self) -> None:
        for pid in self.streams.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # the lab spawned it for us: ours to stop
        self.streams.clear()

    def next_phase(self) -> None:
        """client2 moves to the next pair of relays."""
        self.phase += 1
        meshvpn(self.lab, "client2", "disconnect")
        self._connect_client2()
        self.say(f"client2 moved: now {self.describe_phase()}")

    # ---- the end

    def settle(self) -> None:
        """Until every receipt is delivered and every relay's report shows earnings."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            rows = self.relays()
            if all(
                r["receipts_pending"] == 0 and r["earnings"]["total"] > 0 for r in rows.values()
            ):
                return
            time.sleep(1.0)
        self.say("not every relay's receipts were booked in time; the summary says which")

    def relays(self) -> dict[str, dict[str, Any]]:
        out = {}
        for i in range(1, RELAYS + 1):
            node = f"relay{i}"
            status = _status(self.lab, node) or {}
            receipts = status.get("receipts") or {}
            counters = status.get("counters") or {}
            report = _earnings(self.lab, node)
            pending = (report or {}).get("pending") or {}
            closed = sum(int(e["net"]) for e in (report or {}).get("epochs") or [])
            out[node] = {
                "node_id": self.ids[i],
                "sessions": int(counters.get("requests:granted", 0)),
                "bytes_relayed": int((status.get("sharing") or {}).get("used_bytes", 0)),
                "mesh_bytes": sum(
                    int(link.get("rx_bytes") or 0) + int(link.get("tx_bytes") or 0)
                    for link in (status.get("mesh") or {}).get("links") or []
                ),
                "receipts": int(receipts.get("receipts", 0)),
                "receipts_delivered": int(receipts.get("delivered", 0)),
                "receipts_pending": int(receipts.get("pending_delivery", 0)),
                "earnings": {
                    "pending": int(pending.get("net", 0)),
                    "closed": closed,
                    "claimable": int(((report or {}).get("claim") or {}).get("cumulative", 0)),
                    "total": int((report or {}).get("balance", 0)),
                    "epoch": pending.get("epoch"),
                },
            }
        return out

    def clients(self) -> dict[str, dict[str, Any]]:
        out = {}
        for j in (1, 2):
            status = _status(self.lab, f"client{j}") or {}
            session = status.get("session") or {}
            path = status.get("path")
            out[f"client{j}"] = {
                "bytes_used": session.get("bytes_used"),
                "cost": (path or {}).get("cost", session.get("cost")),
                "credit": (status.get("credit") or {}).get("credit"),
                "path": [path["entry"], path["exit"]]
                if path
                else [(status.get("relay") or {}).get("node_id")],
            }
        return out

    def agent_pids(self) -> list[int]:
        nodes = [f"relay{i}" for i in range(1, RELAYS + 1)] + ["client1", "client2"]
        return [int(s["pid"]) for n in nodes if (s := _status(self.lab, n)) is not None]


def start_stream(lab: Lab, node: str, rate: int = STREAM_RATE) -> int:
    """A download that never ends (``rate`` bytes/s, retried when the tunnel moves)."""
    url = f"http://{lab.plan.internet.web_addr}/bytes/1000000000"
    argv = [sys.executable, "-c", STREAM, url, str(rate)]
    return lab.spawn(node, argv, log=node_state_dir(lab, node) / "stream.log")


def _status(lab: Lab, node: str) -> dict[str, Any] | None:
    """What `meshvpn status --json` prints for the node (the socket needs no netns)."""
    try:
        return read_status(node_state_dir(lab, node))
    except LocalError:
        return None


def _earnings(lab: Lab, node: str) -> dict[str, Any] | None:
    """What `meshvpn earnings --json` prints for the relay."""
    try:
        return read_earnings(node_state_dir(lab, node))[0]
    except LocalError:
        return None


def leftovers(lab: Lab, pids: list[int]) -> dict[str, Any]:
    """What the demo left behind: namespaces, processes, the lab's state dir."""
    alive = []
    for pid in sorted(set(pids)):
        try:
            stat = open(f"/proc/{pid}/stat").read()  # noqa: PTH123, SIM115 - one read
        except FileNotFoundError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            alive.append(pid)
    return {
        "namespaces": [n for n in netns.list_netns() if owns_netns(lab.prefix, n)],
        "processes": alive,
        "state_dir": lab.state_dir.exists(),
    }


def _phase_s(duration: float | None) -> float:
    if duration is None:
        return MAX_PHASE_S
    return max(MIN_PHASE_S, min(MAX_PHASE_S, duration / 3))


def run(args: argparse.Namespace) -> int:
    headless = args.duration is not None
    if headless and args.duration <= 0:
        raise LocalError(f"bad --duration {args.duration:g}", "give seconds, e.g. 60")
    if args.epoch_seconds <= 0:
        raise LocalError(f"bad --epoch-seconds {args.epoch_seconds:g}", "give seconds, e.g. 60")
    if not headless and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise LocalError(
            "meshvpn demo opens a dashboard and needs a terminal",
            "run it in one, or headless: `meshvpn demo --duration 60 --json`",
        )

    t0 = time.monotonic()

    def say(line: str) -> None:
        stamp = f"[{time.monotonic() - t0:5.1f} s] "
        print(stamp + line, file=sys.stderr if args.json else sys.stdout, flush=True)

    lab = Lab(args.prefix)
    demo = Demo(lab, args.epoch_seconds, say)
    summary: dict[str, Any] = {}
    started = time.monotonic()
    try:
        demo.build()
        if headless:
            summary = _headless(demo, args.duration)
        else:
            _interactive(demo)
    except KeyboardInterrupt:
        say("interrupted")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the teardown
        with contextlib.suppress(Exception):
            demo.pids += demo.agent_pids()
        if args.keep:
            say(f"lab left up; `meshvpn lab down --prefix {args.prefix}` removes it")
        else:
            say("tearing down ...")
            lab.down()
    if args.keep:
        return 0
    left = leftovers(lab, demo.pids)
    clean = not any(left.values())
    say("nothing left behind" if clean else f"LEFT BEHIND: {left}")
    if not headless:
        return 0 if clean else 1
    summary["left_behind"] = left
    summary["pids"] = sorted(set(demo.pids))
    summary["duration_s"] = round(time.monotonic() - started, 1)
    relays = summary.get("relays") or {}
    summary["ok"] = (
        bool(relays)
        and clean
        and all(r["receipts"] > 0 and r["earnings"]["total"] > 0 for r in relays.values())
    )
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        _print_summary(summary)
    return 0 if summary["ok"] else 1


def _headless(demo: Demo, duration: float) -> dict[str, Any]:
    phase_s = _phase_s(duration)
    end = time.monotonic() + duration
    next_move = time.monotonic() + phase_s
    while (now := time.monotonic()) < end:
        if now >= next_move and end - now > MIN_PHASE_S / 2:
            demo.next_phase()
            next_move = time.monotonic() + phase_s
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
    demo.say("time is up: stopping the downloads, waiting for the last receipts to be booked")
    clients = demo.clients()
    demo.stop_streams()
    demo.settle()
    return {
        "epoch_s": demo.epoch_s,
        "phases": demo.phase + 1,
        "relays": demo.relays(),
        "clients": clients,
    }


def _interactive(demo: Demo) -> None:
    relay1 = node_state_dir(demo.lab, "relay1")
    demo.say(
        "opening relay1's dashboard (Ctrl-C ends the demo and tears it all down);"
        f" `meshvpn dashboard --state-dir {relay1}` opens it again elsewhere"
    )
    time.sleep(2)
    dashboard = subprocess.Popen(meshvpn_argv("dashboard", "--state-dir", str(relay1)))
    demo.say = lambda _line: None  # the dashboard owns the terminal now
    try:
        next_move = time.monotonic() + _phase_s(None)
        while dashboard.poll() is None:
            if time.monotonic() >= next_move:
                demo.next_phase()
                next_move = time.monotonic() + _phase_s(None)
            time.sleep(0.5)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            dashboard.wait(timeout=5)
        if dashboard.poll() is None:
            dashboard.terminate()
            dashboard.wait()


def _print_summary(summary: dict[str, Any]) -> None:
    print(f"{'relay':<8} {'sessions':>8} {'relayed':>14} {'receipts':>9} {'earned':>12}")
    for name, r in sorted(summary["relays"].items()):
        print(
            f"{name:<8} {r['sessions']:>8} {r['bytes_relayed']:>14,} {r['receipts']:>9}"
            f" {r['earnings']['total']:>12,}"
        )
    print("ok" if summary["ok"] else "NOT ok: a relay without receipts or earnings, or leftovers")
