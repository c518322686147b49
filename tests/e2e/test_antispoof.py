"""Anti-spoofing in the lab: a client sends only from its granted tunnel address.

client1 and client2 are connected to relay1. From inside client1, scapy-built
IPv4 and IPv6 packets with forged source addresses go straight onto client1's
WireGuard interface (an AF_PACKET socket: past the client's own firewall and
routing, as a rogue client would), UDP to the lab's web server with a marker
in the payload. None may arrive: a capture where relay1 meets the internet
(and one on the owner's LAN) must see no marker, while the same packet from
the client's real address, sent the same way, does arrive (the control that
the path works). WireGuard drops the forgeries, and the relay counts them in
``status --json`` (``dropped.spoofed_in_tunnel``).

The exit table's own lock (``spoofed``: a source outside the pool) stands
behind WireGuard's: with client1's allowed IPs widened by hand at the relay
(a misconfiguration), the forgery outside the pool passes WireGuard and is
dropped and counted by nftables instead.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshvpn.lab import Lab
from meshvpn.lab.nodes import connect_client, fetch, node_ifname, node_status, start_relay

pytestmark = pytest.mark.e2e

MARK = b"meshvpn-spoof-probe"
DPORT = 5309

# scapy builds each packet (checksums included); a packet socket on the tunnel
# interface hands it to wireguard-go as if the kernel had routed it there.
INJECT = r"""
import json, socket, sys
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw
iface, dst, port, mark = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
plan = json.loads(sys.argv[5])
sent = 0
for src, copies in plan:
    if ":" in src:
        pkt, proto = IPv6(src=src, dst="2001:db8::80") / UDP(sport=40000, dport=port), 0x86DD
    else:
        pkt, proto = IP(src=src, dst=dst) / UDP(sport=40000, dport=port), 0x0800
    raw = bytes(pkt / Raw((mark + "|" + src).encode()))
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(proto))
    for _ in range(copies):
        s.sendto(raw, (iface, proto))
        sent += 1
    s.close()
print(sent)
"""


def inject(lab: Lab, node: str, plan: list[tuple[str, int]]) -> int:
    argv = [
        sys.executable,
        "-c",
        INJECT,
        node_ifname(lab, node),
        str(lab.plan.web_addr),
        str(DPORT),
        MARK.decode(),
        json.dumps(plan),
    ]
    return int(lab.exec(node, argv, timeout=60).stdout)


def marked(packets: list[Any]) -> list[str]:
    """The forged (or real) source each captured marker packet was sent with."""
    from scapy.packet import Raw  # noqa: PLC0415

    loads = [bytes(p[Raw].load) for p in packets if Raw in p]
    return [load.split(b"|", 1)[1].decode() for load in loads if load.startswith(MARK)]


def dropped(lab: Lab, node: str) -> dict[str, Any]:
    status = node_status(lab, node)
    assert status is not None
    result: dict[str, Any] = status["dropped"]
    return result


@pytest.fixture
def lab_state_root() -> Path:
    return Path("/run/meshvpn/t")  # short: AF_UNIX paths max out at 108 bytes


def test_a_client_cannot_send_from_another_address(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(1, 2)
    relay, lan = lab.plan.relay(1), lab.plan.lan(1)
    start_relay(lab, 1)
    me = connect_client(lab, 1, 1)["address"].split("/")[0]
    other = connect_client(lab, 2, 1)["address"].split("/")[0]
    assert me != other
    before = dropped(lab, "relay1")
    assert before["spoofed_in_tunnel"] is not None  # the relay counts them

    copies = 5
    forged = [
        other,  # another client's address, inside the pool
        "100.64.0.1",  # the relay's own tunnel address
        "100.64.0.250",  # a free address of the pool
        "10.1.2.3",
        str(lan.addr),  # the owner's LAN host
        str(relay.wan_addr),  # the router itself
        str(lab.plan.web_addr),  # the target, to itself
        "203.0.113.77",
        "fd00::1",  # IPv6: the relay gives none
    ]
    with (
        lab.capture("internet", relay.upstream_iface, bpf=f"udp port {DPORT}") as at_internet,
        lab.capture("lan1", lan.iface) as at_lan,
    ):
        sent = inject(lab, "client1", [(src, copies) for src in forged] + [(me, copies)])
        time.sleep(1.0)
    assert sent == copies * (len(forged) + 1)

    # the control arrived (masqueraded to the relay's address); no forgery did
    arrived = marked(at_internet)
    assert arrived.count(me) >= copies - 1, arrived
    assert set(arrived) == {me}, arrived
    assert marked(at_lan) == []

    after = dropped(lab, "relay1")
    assert after["spoofed_in_tunnel"] - before["spoofed_in_tunnel"] >= copies * len(forged)
    # client2 was not disturbed by someone forging its address
    assert fetch(lab, "client2", "/ip").decode() == str(relay.wan_addr)

    # the second lock: WireGuard misconfigured to let 10.0.0.0/8 in from client1
    client1_key = json.loads(
        lab.exec("client1", [sys.executable, "-m", "meshvpn", "id", "--json", "--state-dir",
                             str(lab.state_dir / "nodes" / "client1")]).stdout
    )["wireguard_public_key"]  # fmt: skip
    wg = node_ifname(lab, "relay1")
    lab.exec("relay1", ["wg", "set", wg, "peer", client1_key, "allowed-ips", f"{me}/32,10.0.0.0/8"])
    nft_before = after["exit_table"]["spoofed"]
    with lab.capture("internet", relay.upstream_iface, bpf=f"udp port {DPORT}") as at_internet:
        inject(lab, "client1", [("10.1.2.3", copies)])
        time.sleep(0.5)
    assert marked(at_internet) == []
    assert dropped(lab, "relay1")["exit_table"]["spoofed"] - nft_before >= copies
