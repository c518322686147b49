"""The exit policy in the lab: a client's packets never reach the relay owner's network.

client1 connects to relay1 by hand, then sends plain UDP datagrams, TCP SYNs
and ICMP echoes through its tunnel at the owner's LAN host, the router's own
addresses, private and other protected ranges, and SMTP on the internet.
What arrives is checked where it would arrive: captures on lan1's eth0, on
relay1's uplink (wan0) and in the internet namespace, and a listener on every
address of relay1 itself. Positive controls show each of those vantage points
would have seen a packet, and that the tunnel still carries allowed traffic.
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
from meshvpn.lab.nodes import RELAY_PORT, connect_client, fetch, start_relay

pytestmark = pytest.mark.e2e

LISTEN_PORT = 5300
MARK = b"meshvpn-exit-probe"
ALLOW_LAB_INTERNET = ("--allow", "203.0.113.0/24")

# Records every UDP datagram and TCP connection that reaches it, with the
# destination address the packet carried; echoes UDP back if asked to.
LISTENER = r"""
import json, select, socket, sys
bind, port, out, echo = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "echo"
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
PKTINFO = 8  # IP_PKTINFO on Linux; the socket module does not export it
u.setsockopt(socket.IPPROTO_IP, PKTINFO, 1)
u.bind((bind, port))
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((bind, port))
t.listen(64)
with open(out, "a") as f:
    f.write(json.dumps(["ready"]) + "\n")
    f.flush()
    while True:
        for s in select.select([u, t], [], [])[0]:
            if s is u:
                data, anc, _, src = u.recvmsg(4096, 256)
                dst = next((socket.inet_ntoa(b[8:12]) for _, k, b in anc if k == PKTINFO), "?")
                if echo:
                    u.sendto(data, src)
                f.write(json.dumps(["udp", src[0], dst, port]) + "\n")
            else:
                c, src = t.accept()
                f.write(json.dumps(["tcp", src[0], c.getsockname()[0], port]) + "\n")
                c.close()
            f.flush()
"""

# Sends each probe through the kernel (so the client's policy routing puts it in
# the tunnel), then reports what answered: UDP replies (with their source), TCP
# handshakes that completed, ICMP echo replies.
PROBER = r"""
import json, os, select, socket, struct, sys, time
probes, mark, wait = json.loads(sys.argv[1]), sys.argv[2].encode(), float(sys.argv[3])
def checksum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
udp, tcp, icmp = [], [], socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
answers = []
for proto, host, port in probes:
    if proto == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 8)
        s.setblocking(False)
        for _ in range(3):
            s.sendto(mark, (host, port))
        udp.append((s, host, port))
    elif proto == "tcp":
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex((host, port))
        tcp.append((s, host, port))
    else:
        ident = os.getpid() & 0xFFFF
        body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + mark
        body = body[:2] + struct.pack("!H", checksum(body + b"\0" * (len(body) % 2))) + body[4:]
        icmp.sendto(body, (host, 0))
deadline = time.monotonic() + wait
while time.monotonic() < deadline:
    socks = [s for s, _, _ in udp] + [icmp]
    for s in select.select(socks, [], [], max(0.0, deadline - time.monotonic()))[0]:
        if s is icmp:
            pkt, src = icmp.recvfrom(4096)
            if pkt[(pkt[0] & 0x0F) * 4] == 0:
                answers.append(["icmp", src[0], 0])
        else:
            data, src = s.recvfrom(4096)
            answers.append(["udp", src[0], src[1]])
for s, host, port in tcp:
    # a connect still in progress is not writable; a finished one has SO_ERROR 0
    if select.select([], [s], [], 0)[1] and s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
        answers.append(["tcp", host, port])
print(json.dumps(answers))
"""


def spawn_listener(lab: Lab, node: str, bind: str, port: int, *, echo: bool = False) -> Path:
    out = lab.state_dir / f"listen-{node}-{port}.jsonl"
    argv = [sys.executable, "-c", LISTENER, bind, str(port), str(out), "echo" if echo else "-"]
    lab.spawn(node, argv, log=out.with_suffix(".log"))
    deadline = time.monotonic() + 10
    while not (out.exists() and out.read_text().startswith('["ready"]')):
        assert time.monotonic() < deadline, f"listener in {node} did not start"
        time.sleep(0.05)
    return out


def heard(out: Path) -> list[list[Any]]:
    return [rec for rec in map(json.loads, out.read_text().splitlines()) if rec != ["ready"]]


def probe(lab: Lab, node: str, probes: list[tuple[str, str, int]], wait: float = 1.5) -> list[Any]:
    argv = [sys.executable, "-c", PROBER, json.dumps(probes), MARK.decode(), str(wait)]
    answers: list[Any] = json.loads(lab.exec(node, argv, timeout=30).stdout)
    return answers


def counters(lab: Lab, node: str) -> dict[str, int]:
    out = lab.exec(node, ["nft", "-j", "list", "counters", "table", "inet", "meshvpn"]).stdout
    return {
        item["counter"]["name"]: item["counter"]["packets"]
        for item in json.loads(out)["nftables"]
        if "counter" in item
    }


def ip_packets(packets: list[Any]) -> list[Any]:
    from scapy.layers.inet import IP  # noqa: PLC0415

    return [p for p in packets if IP in p]


def is_tunnel(pkt: Any, client: str, relay: str) -> bool:
    from scapy.layers.inet import IP, UDP  # noqa: PLC0415

    return (
        UDP in pkt
        and {pkt[IP].src, pkt[IP].dst} == {client, relay}
        and RELAY_PORT in {pkt[UDP].sport, pkt[UDP].dport}
    )


@pytest.fixture
def lab_state_root() -> Path:
    # Short: agents' control sockets live below it, and AF_UNIX paths max out at 108 bytes.
    return Path("/run/meshvpn/t")


def test_clients_never_reach_the_owners_network(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(1, 1)
    relay, lan, client = lab.plan.relay(1), lab.plan.lan(1), lab.plan.client(1)
    start_relay(lab, 1, *ALLOW_LAB_INTERNET)
    status = connect_client(lab, 1, 1)
    gateway = "100.64.0.1"
    assert status["address"].startswith("100.64.0.")

    # what the agent found on the host, in the table
    table = lab.exec("relay1", ["nft", "list", "table", "inet", "meshvpn"]).stdout.decode()
    lan_set = table[table.index("set lan4") :].split("}")[0]
    router_set = table[table.index("set router4") :].split("}")[0]
    assert str(relay.lan_net) in lan_set
    assert str(relay.wan_addr) in router_set and str(relay.lan_addr) in router_set

    # listeners on every address of relay1 (gateway, LAN, WAN) and on lan1's host
    on_relay = spawn_listener(lab, "relay1", "0.0.0.0", LISTEN_PORT)  # noqa: S104
    on_lan = spawn_listener(lab, "lan1", "0.0.0.0", LISTEN_PORT)  # noqa: S104
    # positive control: from the LAN, all of them are reachable
    own = [str(relay.lan_addr), str(relay.wan_addr), gateway]
    assert probe(lab, "lan1", [(p, a, LISTEN_PORT) for a in own for p in ("udp", "tcp")])
    assert {(r[0], r[2]) for r in heard(on_relay)} == {(p, a) for a in own for p in ("udp", "tcp")}
    probe(lab, "relay1", [("udp", str(lan.addr), LISTEN_PORT)], wait=0.3)
    assert heard(on_lan)
    before_relay, before_lan = len(heard(on_relay)), len(heard(on_lan))
    before = counters(lab, "relay1")

    to_owner = [str(lan.addr), *own]
    protected = ["10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.1.1", "100.100.0.1"]
    probes: list[tuple[str, str, int]] = [
        *((p, a, LISTEN_PORT) for a in to_owner for p in ("udp", "tcp")),
        *(("icmp", a, 0) for a in (str(lan.addr), str(relay.lan_addr), str(relay.wan_addr))),
        ("tcp", gateway, 22),
        ("udp", gateway, RELAY_PORT + 1),
        *((p, a, 80) for a in protected for p in ("udp", "tcp")),
        ("udp", "224.0.0.1", LISTEN_PORT),
        ("tcp", str(lab.plan.web_addr), 25),
        ("icmp", gateway, 0),  # allowed: echo to the tunnel gateway
    ]
    wan, web_side = relay.wan_iface, relay.upstream_iface
    with (
        lab.capture("lan1", lan.iface) as at_lan,
        lab.capture("relay1", wan) as at_wan,
        lab.capture("internet", web_side, bpf="tcp port 25") as at_smtp,
    ):
        answers = probe(lab, "client1", probes)
        time.sleep(0.5)

    # the client heard nothing back but the gateway's echo
    assert answers == [["icmp", gateway, 0]]
    # and nothing arrived anywhere
    assert len(heard(on_relay)) == before_relay, heard(on_relay)[before_relay:]
    assert len(heard(on_lan)) == before_lan, heard(on_lan)[before_lan:]
    assert ip_packets(at_lan) == [], [p.summary() for p in at_lan]
    leaked = [
        p.summary()
        for p in ip_packets(at_wan)
        if not is_tunnel(p, str(client.uplink_addr), str(relay.wan_addr))
    ]
    assert leaked == []
    assert len(ip_packets(at_wan)) >= len(probes), "the capture on wan0 saw no tunnel traffic"
    assert ip_packets(at_smtp) == []

    after = counters(lab, "relay1")
    grew = {name: after[name] - before.get(name, 0) for name in after}
    assert grew["to_lan"] >= 3 * 1 + 1 + 1  # udp x3, a SYN, an echo
    assert grew["to_router"] >= 3 * 3 + 3 + 2  # udp and SYN to three addresses, echoes
    assert grew["protected"] >= len(protected) * (3 + 1)
    assert grew["blocked_port"] >= 1
    assert grew["spoofed"] == grew["client_to_client"] == 0

    # allowed traffic still flows, through the relay's NAT
    assert fetch(lab, "client1", "/ip").decode() == str(relay.wan_addr)


def test_dns_goes_to_the_chosen_resolver_never_the_lan(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(1, 1)
    relay, lan, web = lab.plan.relay(1), lab.plan.lan(1), str(lab.plan.web_addr)
    start_relay(lab, 1, *ALLOW_LAB_INTERNET, "--dns", web)
    connect_client(lab, 1, 1)
    resolver = spawn_listener(lab, "internet", web, 53, echo=True)
    on_relay = spawn_listener(lab, "relay1", "0.0.0.0", 53)  # noqa: S104
    on_lan = spawn_listener(lab, "lan1", "0.0.0.0", 53)  # noqa: S104

    asked = [str(relay.lan_addr), str(lan.addr), "100.64.0.1", "192.168.1.1"]
    with (
        lab.capture("lan1", lan.iface) as at_lan,
        lab.capture("internet", relay.upstream_iface, bpf="port 53") as at_internet,
    ):
        answers = probe(lab, "client1", [("udp", a, 53) for a in asked])
        time.sleep(0.3)

    from scapy.layers.inet import IP, UDP  # noqa: PLC0415
    from scapy.packet import Raw  # noqa: PLC0415

    # each question reached the resolver, masqueraded, whatever address it was sent to
    queries = [
        p for p in ip_packets(at_internet) if UDP in p and p[IP].dst == web and p[UDP].dport == 53
    ]
    assert len(queries) == 3 * len(asked)
    assert all(p[IP].src == str(relay.wan_addr) and p[Raw].load == MARK for p in queries)
    assert len(heard(resolver)) == 3 * len(asked)
    # the answers came back looking like they came from the address asked
    assert sorted({tuple(a) for a in answers}) == sorted(("udp", a, 53) for a in asked)
    # and nothing reached the relay's own resolver port or the LAN
    assert heard(on_relay) == []
    assert heard(on_lan) == []
    assert ip_packets(at_lan) == []
    assert counters(lab, "relay1")["dns_redirected"] >= len(asked)
    assert fetch(lab, "client1", "/ip").decode() == str(relay.wan_addr)


def test_relay_without_exit_forwards_nothing(make_lab: Callable[..., Lab]) -> None:
    """The lab's relays are home routers that forward already: --no-exit must still close."""
    lab = make_lab(1, 1)
    assert lab.exec("relay1", ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == b"1"
    start_relay(lab, 1, "--no-exit")
    connect_client(lab, 1, 1)
    with pytest.raises(Exception, match="failed"):
        fetch(lab, "client1", "/ip", timeout=3)
    assert counters(lab, "relay1")["no_exit"] >= 1
