"""The kill switch in the lab: what leaves client1's uplink, while it connects,
while its relay is dead, and after the client agent itself was killed.

Every frame on client1's wan0 is captured and each IP packet sorted by flow:
WireGuard to (or from) the chosen relay's endpoint, TCP with the broker, UDP
probes to the relays' probe ports, DHCP. Anything else is a leak. A sender in
client1 keeps trying plain UDP to 203.0.113.80:53 and TCP SYNs to :80 (and the
same over IPv6 once the uplink has an IPv6 route) throughout, so a hole would
show. Positive controls: the captures see the broker, the probes and WireGuard,
and once ``meshvpn disconnect`` lifts the block the same uplink reaches the
web server directly.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshvpn.lab import Lab
from meshvpn.lab.nodes import (
    RELAY_PORT,
    discover_and_connect,
    fetch,
    meshvpn,
    meshvpn_argv,
    node_state_dir,
    node_status,
    relay_endpoint,
    start_broker,
    start_relay,
)

pytestmark = pytest.mark.e2e

LATENCY = [30.0, 5.0]  # relay2 is the nearer: chosen
PROBE_PORT = RELAY_PORT + 1  # relays announce listen port + 1
WEB6 = "2001:db8:ffff::80"  # nobody is there: the wire is the oracle
UPLINK6 = ("2001:db8:c1::2/64", "2001:db8:c1::1")
BLOCKED = (
    "blocked: the last session ended without disconnect;"
    " run `meshvpn disconnect` to restore the network"
)

# Until the stop file exists: plain UDP to port 53 and a TCP SYN to port 80 of
# each target, every few ms, counting what the kernel said. Writes a ready file first.
SENDER = r"""
import errno, json, os, socket, sys, time
stop, ready, report = sys.argv[1:4]
targets = sys.argv[4:]
counts = {}
def note(key):
    counts[key] = counts.get(key, 0) + 1
open(ready, "w").close()
while not os.path.exists(stop):
    for host in targets:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.sendto(b"outside the tunnel?", (host, 53))
                note(f"udp {host} sent")
            except OSError as e:
                note(f"udp {host} {errno.errorcode.get(e.errno, e.errno)}")
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setblocking(False)
            try:
                s.connect((host, 80))
            except BlockingIOError:
                note(f"tcp {host} syn")
            except OSError as e:
                note(f"tcp {host} {errno.errorcode.get(e.errno, e.errno)}")
    time.sleep(0.002)
with open(report, "w") as f:
    json.dump(counts, f)
"""


@pytest.fixture
def lab_state_root() -> Path:
    return Path("/run/meshvpn/k")  # short: control sockets live below it


@dataclass(frozen=True)
class Flows:
    """What may leave client1's uplink; (address, port) as scapy shows them."""

    mac: str  # client1's wan0: the frames it sends
    client: str
    relays: frozenset[tuple[str, int]]  # WireGuard endpoints
    broker: tuple[str, int] | None = None
    probes: frozenset[tuple[str, int]] = frozenset()


def classify(pkt: Any, flows: Flows) -> str:
    """What a packet leaving the uplink is: wireguard, probe, broker, dhcp, or leak."""
    from scapy.layers.inet import IP, TCP, UDP  # noqa: PLC0415

    if IP not in pkt:
        return "leak"  # IPv6: the tunnel carries it; the uplink must not
    if UDP in pkt and (pkt[UDP].sport, pkt[UDP].dport) == (68, 67):
        return "dhcp"
    if pkt[IP].src != flows.client:
        return "leak"
    to = (pkt[IP].dst, pkt[UDP].dport if UDP in pkt else pkt[TCP].dport if TCP in pkt else None)
    if UDP in pkt and to in flows.relays:
        return "wireguard"
    if UDP in pkt and to in flows.probes:
        return "probe"
    if TCP in pkt and to == flows.broker:
        return "broker"
    return "leak"


def sort_out(packets: list[Any], flows: Flows) -> dict[str, list[Any]]:
    """The IP packets client1 sent out of its uplink, by kind (what came in is not judged)."""
    from scapy.layers.inet import IP  # noqa: PLC0415
    from scapy.layers.inet6 import IPv6  # noqa: PLC0415
    from scapy.layers.l2 import Ether  # noqa: PLC0415

    kinds: dict[str, list[Any]] = {}
    for pkt in packets:
        if Ether in pkt and pkt[Ether].src == flows.mac and (IP in pkt or IPv6 in pkt):
            kinds.setdefault(classify(pkt, flows), []).append(pkt)
    return kinds


def assert_no_leak(kinds: dict[str, list[Any]], phase: str) -> None:
    leaks = [p.summary() for p in kinds.get("leak", [])]
    assert not leaks, f"{phase}: {len(leaks)} packet(s) left outside the tunnel: {leaks[:10]}"


@contextmanager
def sending(lab: Lab, *targets: str) -> Iterator[dict[str, int]]:
    """Run SENDER in client1 for the block; yields its counts, filled at the end."""
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    stop, ready, report = (lab.state_dir / f"sender-{tag}.{n}" for n in ("stop", "ready", "json"))
    argv = [sys.executable, "-c", SENDER, str(stop), str(ready), str(report), *targets]
    lab.spawn("client1", argv)
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert time.monotonic() < deadline, "the sender did not start"
        time.sleep(0.02)
    counts: dict[str, int] = {}
    try:
        yield counts
    finally:
        stop.touch()
        deadline = time.monotonic() + 20
        while not report.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    counts.update(json.loads(report.read_text()))


def status_of(lab: Lab, *flags: str) -> tuple[int, str]:
    argv = meshvpn_argv("status", *flags, "--state-dir", str(node_state_dir(lab, "client1")))
    proc = lab.exec("client1", argv, check=False)
    return proc.returncode, proc.stdout.decode()


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return
        if stat[stat.rindex(")") + 2] == "Z":
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} still alive")


def kill_client(lab: Lab) -> None:
    status = node_status(lab, "client1")
    assert status is not None
    os.kill(int(status["pid"]), signal.SIGKILL)
    wait_gone(int(status["pid"]))


def mesh(make_lab: Any) -> tuple[Lab, Flows]:
    lab = make_lab(2, 1, latency_ms=LATENCY)
    start_broker(lab)
    for i in (1, 2):
        start_relay(lab, i, broker=True)
    endpoints = [relay_endpoint(lab, i).rsplit(":", 1)[0] for i in (1, 2)]
    link = json.loads(lab.exec("client1", ["ip", "-j", "link", "show", "wan0"]).stdout)
    flows = Flows(
        mac=link[0]["address"],
        client=str(lab.plan.clients[0].uplink_addr),
        relays=frozenset((host, RELAY_PORT) for host in endpoints),
        broker=(str(lab.plan.broker.addr), lab.plan.broker.port),
        probes=frozenset((host, PROBE_PORT) for host in endpoints),
    )
    return lab, flows


def lockdown_sets(lab: Lab) -> dict[str, set[tuple[str, int]]]:
    """The (address, port) sets of client1's lockdown table, as the kernel has them."""
    argv = ["nft", "-j", "list", "table", "inet", "meshvpn_lockdown"]
    data = json.loads(lab.exec("client1", argv).stdout)
    return {
        item["set"]["name"]: {tuple(e["concat"]) for e in item["set"].get("elem", [])}
        for item in data["nftables"]
        if "set" in item and not item["set"]["name"].startswith("lan")
    }


def chosen_relay(lab: Lab) -> int:
    client = node_status(lab, "client1")
    assert client is not None
    for i in (1, 2):
        relay = node_status(lab, f"relay{i}")
        if relay is not None and relay["node_id"] == client["relay"]["node_id"]:
            return i
    raise AssertionError("client1's relay is not in the lab")


def connect_phase(lab: Lab, flows: Flows) -> Flows:
    """(1) connect, then use the tunnel; return the flows of the connected client."""
    from scapy.layers.inet import IP, UDP  # noqa: PLC0415

    web = str(lab.plan.internet.web_addr)
    # while connecting, the broker and the probes go out before the tunnel exists
    with lab.capture("client1", "wan0") as packets:
        assert "connected" in discover_and_connect(lab, 1)
    kinds = sort_out(packets, flows)
    assert_no_leak(kinds, "connect")
    assert kinds.get("broker"), "the capture saw no broker connection"
    probed = {(p[IP].dst, p[UDP].dport) for p in kinds.get("probe", [])}
    assert probed == flows.probes, "both relays are probed"
    assert kinds.get("wireguard"), "the capture saw no WireGuard"
    index = chosen_relay(lab)
    status = node_status(lab, "client1")
    assert status is not None
    assert status["lockdown"] is True

    # connected: the broker is reached through the tunnel now; only WireGuard leaves
    endpoint = relay_endpoint(lab, index).rsplit(":", 1)[0]
    connected = Flows(flows.mac, flows.client, frozenset({(endpoint, RELAY_PORT)}))
    empty: set[tuple[str, int]] = set()
    assert lockdown_sets(lab) == {
        "relays4": {(endpoint, RELAY_PORT)},  # only the chosen relay's WireGuard
        "relays6": empty,
        "broker4": empty,  # through the tunnel now
        "broker6": empty,
        "probes4": empty,
        "probes6": empty,
    }
    with lab.capture("client1", "wan0") as packets, sending(lab, web, WEB6) as sent:
        assert fetch(lab, "client1", "/ip").decode() == str(lab.plan.relay(index).wan_addr)
        time.sleep(1)
    kinds = sort_out(packets, connected)
    assert_no_leak(kinds, "connected")
    assert len(kinds.get("wireguard", [])) > 20
    assert sent.get(f"udp {web} sent", 0) > 50, sent  # into the tunnel
    return connected


def relay_outage_phase(lab: Lab, connected: Flows) -> float:
    """(2) the relay dies (kill -9) and comes back; return how long it was away."""
    web = str(lab.plan.internet.web_addr)
    index = chosen_relay(lab)
    relay = node_status(lab, f"relay{index}")
    assert relay is not None
    with lab.capture("client1", "wan0") as packets, sending(lab, web, WEB6) as sent:
        killed = time.monotonic()
        os.kill(int(relay["pid"]), signal.SIGKILL)
        start_relay(lab, index, broker=True)
        outage = time.monotonic() - killed
    kinds = sort_out(packets, connected)
    assert_no_leak(kinds, f"relay outage ({outage:.1f} s)")
    assert kinds.get("wireguard"), "the client stopped sending to its relay"
    assert sum(n for k, n in sent.items() if k.startswith(f"udp {web}")) > 50, sent
    return outage


def client_killed_phase(lab: Lab, connected: Flows) -> None:
    """(3) the client agent dies (kill -9): the block stays. The uplink gets an
    IPv6 address and default route too, so IPv6 has a way out if it is let."""
    web = str(lab.plan.internet.web_addr)
    kill_client(lab)
    with lab.capture("client1", "wan0") as packets, sending(lab, web, WEB6) as sent:
        lab.exec("client1", ["sysctl", "-qw", "net.ipv6.conf.wan0.disable_ipv6=0"])
        lab.exec("client1", ["ip", "-6", "addr", "add", UPLINK6[0], "dev", "wan0", "nodad"])
        lab.exec("client1", ["ip", "-6", "route", "add", "default", "via", UPLINK6[1]])
        time.sleep(2)
    kinds = sort_out(packets, connected)
    assert_no_leak(kinds, "after the client agent was killed")
    for host in (web, WEB6):
        assert sent.get(f"udp {host} EPERM", 0) > 50, sent  # refused at the host
        assert not sent.get(f"udp {host} sent"), sent


def test_nothing_leaves_outside_the_tunnel(make_lab: Any) -> None:
    lab, flows = mesh(make_lab)
    connected = connect_phase(lab, flows)
    assert chosen_relay(lab) == 2  # the nearer
    relay_outage_phase(lab, connected)
    # the same session goes on once the relay is back
    assert fetch(lab, "client1", "/ip").decode() == str(lab.plan.relay(2).wan_addr)
    client_killed_phase(lab, connected)

    # status says so; disconnect lifts the block and the uplink reaches the web directly
    code, out = status_of(lab, "--json")
    assert code == 1
    assert json.loads(out) == {"running": False, "leftovers": True, "lockdown": True}
    code, out = status_of(lab)
    assert BLOCKED in out
    out = meshvpn(lab, "client1", "disconnect")
    assert "lockdown is lifted" in out
    assert "meshvpn_lockdown" not in lab.exec("client1", ["nft", "list", "ruleset"]).stdout.decode()
    assert fetch(lab, "client1", "/ip").decode() == flows.client
    _, out = status_of(lab, "--json")
    assert json.loads(out) == {"running": False, "leftovers": False, "lockdown": False}


def test_the_next_connect_takes_the_block_over_without_a_gap(make_lab: Any) -> None:
    lab, flows = mesh(make_lab)
    web = str(lab.plan.internet.web_addr)
    discover_and_connect(lab, 1)
    kill_client(lab)
    # The new agent removes the dead one's rules and interface, and replaces its
    # table; were the table deleted first, the sender's packets would go out
    # the uplink by the main table's default route in between.
    with lab.capture("client1", "wan0") as packets, sending(lab, web) as sent:
        assert "connected" in discover_and_connect(lab, 1)
        time.sleep(0.5)
    kinds = sort_out(packets, flows)
    assert_no_leak(kinds, "reconnecting after kill -9")
    assert sent.get(f"udp {web} EPERM", 0) > 20, sent  # the block held while nothing ran
    log = (node_state_dir(lab, "client1") / "agent.log").read_text()
    assert "took over from a previous run: nftables table inet meshvpn_lockdown" in log
    assert fetch(lab, "client1", "/ip").decode() == str(lab.plan.relay(chosen_relay(lab)).wan_addr)


def test_no_lockdown_is_the_old_behaviour(make_lab: Any) -> None:
    lab, flows = mesh(make_lab)
    discover_and_connect(lab, 1, "--no-lockdown")
    status = node_status(lab, "client1")
    assert status is not None
    assert status["lockdown"] is False
    assert "meshvpn_lockdown" not in lab.exec("client1", ["nft", "list", "ruleset"]).stdout.decode()
    kill_client(lab)
    _, out = status_of(lab, "--json")
    assert json.loads(out) == {"running": False, "leftovers": True, "lockdown": False}
    # without the block, the dead agent's host lets traffic out of the uplink: what
    # the lockdown is for (and the positive control for the captures above)
    assert fetch(lab, "client1", "/ip").decode() == flows.client
