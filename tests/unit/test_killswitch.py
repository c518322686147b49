"""The kill switch: the table it renders, nftables accepting it, and what it lets out.

The last part applies the table for real in an anonymous network namespace
(``unshare --net``: it vanishes with the process and touches nothing on this
machine) and sends packets through it: a drop counter going up is the oracle.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshvpn.cli import _connect_options, build_parser
from meshvpn.errors import LocalError
from meshvpn.killswitch import (
    COUNTERS,
    LAN_MULTICAST,
    TABLE,
    Allowed,
    Service,
    killswitch_ruleset,
    killswitch_sets,
    parse_counters,
    private_subnets,
)
from relay.exit import TABLE as EXIT_TABLE

IP = ipaddress.ip_address
NET = ipaddress.ip_network
TUN = "mvc1"
MARK = 51820
RELAY: Service = (IP("198.51.100.2"), 51820)
BROKER: Service = (IP("203.0.113.2"), 1883)
PROBE: Service = (IP("198.51.100.2"), 51821)
DISCOVERY = Allowed(
    relays=frozenset({RELAY, (IP("2001:db8::2"), 51820)}),
    broker=frozenset({BROKER}),
    probes=frozenset({PROBE, (IP("203.0.113.103"), 51821)}),
)


def chain(text: str, name: str) -> list[str]:
    body = text.split(f"    chain {name} {{\n", 1)[1].split("\n    }", 1)[0]
    return [line.strip() for line in body.splitlines()]


_SET_RE = re.compile(
    r"set (\w+) \{ type [\w .]+;(?: flags interval;)?(?: elements = \{ (.*?) \};)? \}"
)


def sets_of(text: str) -> dict[str, list[str]]:
    return {m[1]: m[2].split(", ") if m[2] else [] for m in _SET_RE.finditer(text)}


def services_in(elements: list[str]) -> set[Service]:
    out: set[Service] = set()
    for element in elements:
        addr, port = element.split(" . ")
        out.add((IP(addr), int(port)))
    return out


# ---- the table


def test_its_own_table_replaced_atomically() -> None:
    text = killswitch_ruleset(TUN, MARK)
    # not the relay's exit table: a relay and a client on one host do not clash
    assert {TABLE, EXIT_TABLE} == {"inet meshvpn_lockdown", "inet meshvpn"}
    # nft -f applies all of it or nothing: a dead agent's table is replaced, never
    # deleted first, and a missing one is created (the empty `table` line).
    assert text.startswith(f"table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{\n")


def test_every_hook_drops_by_default_and_counts_it() -> None:
    text = killswitch_ruleset(TUN, MARK, DISCOVERY, lan=[NET("192.168.1.0/24")])
    for name, hook in (("output", "output"), ("forward", "forward"), ("input", "input")):
        rules = chain(text, name)
        assert rules[0] == f"type filter hook {hook} priority filter; policy drop;"
        assert "drop" in rules[-1]
        assert "counter name" in rules[-1]  # whatever falls through is counted, then dropped
    used = set()
    for line in text.splitlines():
        if re.search(r"\bdrop\b", line) and "policy drop" not in line:
            found = re.search(r"counter name (\w+) drop", line)
            assert found, f"an uncounted drop: {line}"
            used.add(found[1])
    assert used == set(COUNTERS)
    for name, comment in COUNTERS.items():
        assert f'counter {name} {{ comment "{comment}"; }}' in text


def test_output_lets_out_only_the_tunnel_and_what_connecting_needs() -> None:
    out = chain(killswitch_ruleset(TUN, MARK, DISCOVERY), "output")
    accepts = [r.split(" comment ")[0] for r in out if " accept" in r]
    assert accepts == [
        'oifname "lo" accept',
        f'oifname "{TUN}" accept',
        f"meta mark {MARK} ip daddr . udp dport @relays4 accept",
        f"meta mark {MARK} ip6 daddr . udp dport @relays6 accept",
        "ip daddr . tcp dport @broker4 accept",
        "ip6 daddr . tcp dport @broker6 accept",
        "ip daddr . udp dport @probes4 accept",
        "ip6 daddr . udp dport @probes6 accept",
        "meta nfproto ipv4 udp sport 68 udp dport 67 accept",
        "ip daddr @lan4 accept",
        "ip6 daddr @lan6 accept",
    ]
    # No "established" on the way out: a connection opened before the lockdown
    # must not go on leaking past it.
    assert not any("ct state" in r for r in out)
    # What is not IPv4 (IPv6) has its own counter, so a leak attempt shows by family.
    assert out[-2].startswith("meta nfproto ipv4 counter name out4 drop")
    assert out[-1].startswith("counter name out6 drop")


def test_forward_and_input() -> None:
    text = killswitch_ruleset(TUN, MARK, DISCOVERY)
    forward = [r.split(" comment ")[0] for r in chain(text, "forward")[1:]]
    assert forward[:2] == [
        f'oifname "{TUN}" accept',
        f'iifname "{TUN}" ct state established,related accept',
    ]
    inp = [r.split(" comment ")[0] for r in chain(text, "input")[1:]]
    assert inp[:6] == [
        'iifname "lo" accept',
        "ct state established,related accept",
        f'iifname "{TUN}" accept',  # the relay's statements arrive unasked
        "ip saddr . udp sport @relays4 accept",
        "ip6 saddr . udp sport @relays6 accept",
        "meta nfproto ipv4 udp sport 67 udp dport 68 accept",
    ]


def test_sets_hold_the_allowed_services_by_family() -> None:
    sets = sets_of(killswitch_ruleset(TUN, MARK, DISCOVERY))
    for name in ("relays", "broker", "probes"):
        want = getattr(DISCOVERY, name)
        assert services_in(sets[f"{name}4"]) == {s for s in want if s[0].version == 4}
        assert services_in(sets[f"{name}6"]) == {s for s in want if s[0].version == 6}
    assert sets["lan4"] == sets["lan6"] == []  # no --allow-lan: the LAN is closed too


def test_allow_lan_opens_the_subnets_and_lan_multicast() -> None:
    lan = [NET("192.168.1.0/24"), NET("192.168.1.128/25"), NET("fe80::/64")]
    sets = sets_of(killswitch_ruleset(TUN, MARK, lan=lan))
    lan4 = [NET(e) for e in sets["lan4"]]
    lan6 = [NET(e) for e in sets["lan6"]]
    assert NET("192.168.1.0/24") in lan4
    assert NET("192.168.1.128/25") not in lan4  # collapsed: interval sets refuse overlaps
    assert NET("fe80::/64") in lan6
    for net in LAN_MULTICAST:
        assert net in lan4 + lan6


def test_bad_input_is_refused() -> None:
    with pytest.raises(LocalError, match="interface"):
        killswitch_ruleset('x" accept', MARK)
    for mark in (0, -1, 2**32, True):
        with pytest.raises(LocalError, match="fwmark"):
            killswitch_ruleset(TUN, mark)
    with pytest.raises(LocalError, match="LAN"):
        killswitch_ruleset(TUN, MARK, lan=["192.168.1.0/24"])  # type: ignore[list-item]
    for bad in [(IP("192.0.2.1"), 0), (IP("192.0.2.1"), 65536), ("192.0.2.1", 1), (IP("::1"),)]:
        with pytest.raises(LocalError, match="relays"):
            Allowed(relays=frozenset({bad}))  # type: ignore[arg-type]


def test_sets_change_in_one_transaction() -> None:
    text = killswitch_sets(Allowed(relays=frozenset({RELAY})))
    lines = text.splitlines()
    for name in ("relays4", "relays6", "broker4", "broker6", "probes4", "probes6"):
        assert f"flush set {TABLE} {name}" in lines
    assert f"add element {TABLE} relays4 {{ 198.51.100.2 . 51820 }}" in lines
    assert not any(line.startswith("add element") and "broker" in line for line in lines)
    # each set is flushed before it is filled
    assert lines.index(f"flush set {TABLE} relays4") < lines.index(
        f"add element {TABLE} relays4 {{ 198.51.100.2 . 51820 }}"
    )


def test_private_subnets_of_the_host() -> None:
    addresses: list[dict[str, Any]] = [
        {"ifname": "lo", "link_type": "loopback", "addr_info": [
            {"family": "inet", "local": "127.0.0.1", "prefixlen": 8}]},
        {"ifname": "eth0", "addr_info": [
            {"family": "inet", "local": "192.168.1.20", "prefixlen": 24},
            {"family": "inet", "local": "198.51.100.7", "prefixlen": 24},  # public
            {"family": "inet", "local": "100.72.0.9", "prefixlen": 10},  # CGNAT: the ISP's
            {"family": "inet6", "local": "fe80::1", "prefixlen": 64},
            {"family": "inet6", "local": "2001:db8::1", "prefixlen": 64},
        ]},
        {"ifname": "wlan0", "addr_info": [
            {"family": "inet", "local": "10.1.2.3", "prefixlen": 16},
            {"family": "inet6", "local": "fd00:1::5", "prefixlen": 64},
        ]},
        {"ifname": TUN, "addr_info": [{"family": "inet", "local": "10.64.0.2", "prefixlen": 8}]},
        {"ifname": "ppp0", "addr_info": [
            {"family": "inet", "local": "172.16.0.1", "address": "172.16.9.9", "prefixlen": 32}]},
    ]  # fmt: skip
    assert set(private_subnets(addresses, TUN)) == {
        NET("192.168.1.0/24"),
        NET("10.1.0.0/16"),
        NET("172.16.9.9/32"),  # point to point: the peer's
        NET("fe80::/64"),
        NET("fd00:1::/64"),
    }


def test_parse_counters() -> None:
    text = json.dumps(
        {
            "nftables": [
                {"metainfo": {"version": "1.0.6"}},
                {"counter": {"family": "inet", "name": "out4", "table": "meshvpn_lockdown",
                             "packets": 7, "bytes": 420}},
                {"counter": {"family": "inet", "name": "inbound", "packets": 1, "bytes": 60}},
                {"counter": {"family": "inet", "name": "someone_elses", "packets": 9}},
            ]
        }
    )  # fmt: skip
    assert parse_counters(text) == {"out4": 7, "inbound": 1}
    assert parse_counters("") == parse_counters("[]") == {}


def test_connect_flags() -> None:
    def opts(*flags: str) -> Any:
        args = build_parser().parse_args(["connect", "--broker", "203.0.113.2:1883", *flags])
        return _connect_options(args)

    assert opts().lockdown is True
    assert opts().allow_lan is False
    assert opts().kept_on_restart() == {TABLE}  # a crashed agent's block is taken over
    assert opts("--no-lockdown").lockdown is False
    assert opts("--no-lockdown").kept_on_restart() == frozenset()
    assert opts("--lockdown", "--allow-lan").allow_lan is True


addresses = st.one_of(
    st.ip_addresses(v=4).map(lambda a: IP(str(a))),
    st.ip_addresses(v=6).map(lambda a: IP(str(a))),
)
services = st.frozensets(st.tuples(addresses, st.integers(1, 65535)), max_size=6)
alloweds = st.builds(Allowed, relays=services, broker=services, probes=services)


@settings(max_examples=100, deadline=None)
@given(allowed=alloweds)
def test_sets_round_trip(allowed: Allowed) -> None:
    for text in (killswitch_ruleset(TUN, MARK, allowed), killswitch_sets(allowed)):
        if text.startswith("flush"):
            found: dict[str, list[str]] = {}
            for m in re.finditer(r"add element \S+ \S+ (\w+) \{ (.*) \}", text):
                found[m[1]] = m[2].split(", ")
        else:
            found = sets_of(text)
        for name in ("relays", "broker", "probes"):
            got = services_in(found.get(f"{name}4", [])) | services_in(found.get(f"{name}6", []))
            assert got == getattr(allowed, name)


# ---- nftables itself accepts it, and it does what it says (in a namespace of its own)

_NFT_UNAVAILABLE = (
    "needs root" if os.geteuid() != 0 else
    "needs nft, ip and unshare" if not all(map(shutil.which, ("nft", "ip", "unshare"))) else
    None
)  # fmt: skip
needs_nft = pytest.mark.skipif(_NFT_UNAVAILABLE is not None, reason=str(_NFT_UNAVAILABLE))


def nft_check(text: str) -> None:
    proc = subprocess.run(
        ["unshare", "--net", "nft", "-c", "-f", "-"],
        input=text.encode(),
        capture_output=True,
        check=False,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr.decode() + text


@needs_nft
@pytest.mark.parametrize(
    ("allowed", "lan"),
    [
        (Allowed(), ()),
        (DISCOVERY, ()),
        (DISCOVERY, (NET("192.168.1.0/24"), NET("10.0.0.0/8"), NET("fe80::/64"))),
    ],
)
def test_nft_accepts_the_ruleset_and_set_changes(allowed: Allowed, lan: tuple[Any, ...]) -> None:
    table = killswitch_ruleset(TUN, MARK, allowed, lan=lan)
    nft_check(table)
    # taking over a table of the same name, then narrowing and widening its sets
    nft_check(table + table + killswitch_sets(Allowed()) + killswitch_sets(allowed))


@needs_nft
@settings(max_examples=10, deadline=None)
@given(allowed=alloweds)
def test_nft_accepts_any_allowed(allowed: Allowed) -> None:
    nft_check(killswitch_ruleset(TUN, MARK, allowed) + killswitch_sets(allowed))


# Runs as root inside `unshare --net`: a fake uplink (a veth with a default route
# and a LAN), a fake tunnel (a veth with 203.0.113.0/24 routed into it), the
# table, then each packet in turn. A datagram is "dropped" when sendto says EPERM
# (the output hook refused it); a TCP SYN when its family's drop counter rose.
# IPv6 is kept quiet (no link-local addresses, no router solicitations), since
# the kernel's own IPv6 chatter meets the same counter.
PROBE_SCRIPT = r"""
import json, socket, subprocess, sys
from meshvpn.killswitch import parse_counters

plan = json.load(sys.stdin)
def sh(*argv, stdin=None):
    subprocess.run(argv, check=True, input=stdin, capture_output=True)
sh("ip", "link", "set", "lo", "up")
sh("sysctl", "-q", "net.ipv6.conf.all.disable_ipv6=0")
for setting in ("addr_gen_mode=1", "accept_ra=0", "router_solicitations=0"):
    sh("sysctl", "-q", "net.ipv6.conf.default." + setting)
sh("ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1")
sh("ip", "link", "add", plan["tunnel"], "type", "veth", "peer", "name", "tun1")
for link in ("up0", "up1", plan["tunnel"], "tun1"):
    sh("ip", "link", "set", link, "up")
sh("ip", "addr", "add", "192.0.2.2/30", "dev", "up0")
sh("ip", "addr", "add", "192.168.7.2/24", "dev", "up0")
sh("ip", "route", "add", "default", "via", "192.0.2.1", "dev", "up0")
sh("ip", "-6", "addr", "add", "2001:db8:1::2/64", "dev", "up0", "nodad")
sh("ip", "-6", "route", "add", "default", "via", "2001:db8:1::1", "dev", "up0")
sh("ip", "addr", "add", "100.64.0.2/32", "dev", plan["tunnel"])
sh("ip", "route", "add", "203.0.113.0/24", "dev", plan["tunnel"])

def dropped(counter):
    out = subprocess.run(["nft", "-j", "list", "counters", "table", "inet", "meshvpn_lockdown"],
                         capture_output=True, check=True).stdout.decode()
    return parse_counters(out)[counter]

def send(proto, host, port, mark=0, sport=0):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    counter = "out6" if family == socket.AF_INET6 else "out4"
    before = dropped(counter)
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as s:
        if family == socket.AF_INET:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        if mark:
            s.setsockopt(socket.SOL_SOCKET, 36, mark)  # SO_MARK
        if sport:
            s.bind(("0.0.0.0", sport))
        s.setblocking(False)
        try:
            if proto == "udp":
                s.sendto(b"x", (host, port))
                return "passed"
            s.connect((host, port))
        except PermissionError:
            return "dropped"
        except BlockingIOError:
            pass
        return "dropped" if dropped(counter) > before else "passed"

results = []
for step in plan["steps"]:
    if "nft" in step:
        sh("nft", "-f", "-", stdin=step["nft"].encode())
    else:
        results.append([step["send"], send(*step["send"])])
print(json.dumps(results))
"""


def run_probe_script(steps: list[dict[str, Any]]) -> list[tuple[list[Any], str]]:
    proc = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", PROBE_SCRIPT],
        input=json.dumps({"tunnel": TUN, "steps": steps}).encode(),
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return [(send, verdict) for send, verdict in json.loads(proc.stdout)]


def sends(cases: list[tuple[list[Any], str]]) -> list[dict[str, Any]]:
    return [{"send": send} for send, _ in cases]


@needs_nft
def test_the_table_lets_out_only_what_it_says() -> None:
    broker = ("198.51.100.9", 1883)  # via the uplink's default route, as in real life
    allowed = Allowed(
        relays=frozenset({RELAY}),
        broker=frozenset({(IP(broker[0]), broker[1])}),
        probes=frozenset({PROBE}),
    )
    connecting = [
        (["udp", "198.51.100.2", 51820, MARK], "passed"),  # WireGuard, marked, to the relay
        (["udp", "198.51.100.2", 51820], "dropped"),  # unmarked: not WireGuard
        (["udp", "198.51.100.2", 51820, 7], "dropped"),  # another mark
        (["udp", "198.51.100.3", 51820, MARK], "dropped"),  # marked, but not to a relay
        (["udp", "198.51.100.2", 51821], "passed"),  # a probe
        (["udp", "198.51.100.2", 51822], "dropped"),
        (["tcp", *broker], "passed"),  # the broker
        (["tcp", broker[0], 80], "dropped"),
        (["udp", *broker], "dropped"),  # the broker is TCP
        (["udp", "203.0.113.80", 53], "passed"),  # routed into the tunnel
        (["tcp", "203.0.113.80", 80], "passed"),
        (["udp", "127.0.0.1", 9], "passed"),
        (["udp", "255.255.255.255", 67, 0, 68], "passed"),  # DHCP
        (["udp", "8.8.8.8", 53], "dropped"),
        (["tcp", "8.8.8.8", 443], "dropped"),
        (["udp", "192.168.7.9", 9], "dropped"),  # the LAN, without --allow-lan
        (["udp", "2001:db8:2::1", 53], "dropped"),  # IPv6 with a route out
        (["tcp", "2001:db8:2::1", 80], "dropped"),
    ]
    connected = [
        (["udp", "198.51.100.2", 51820, MARK], "passed"),
        (["udp", "198.51.100.2", 51821], "dropped"),  # probing is over
        (["tcp", *broker], "dropped"),  # the broker is reached through the tunnel now
        (["udp", "203.0.113.80", 53], "passed"),
    ]
    steps = [
        {"nft": killswitch_ruleset(TUN, MARK, allowed)},
        *sends(connecting),
        {"nft": killswitch_sets(Allowed(relays=frozenset({RELAY})))},
        *sends(connected),
    ]
    assert run_probe_script(steps) == connecting + connected


@needs_nft
def test_allow_lan_opens_the_lan_only() -> None:
    cases = [
        (["udp", "192.168.7.9", 9], "passed"),
        (["udp", "224.0.0.251", 5353], "passed"),  # mDNS
        (["udp", "10.1.2.3", 9], "dropped"),  # private, but not connected here
        (["udp", "8.8.8.8", 53], "dropped"),
    ]
    lan = [NET("192.168.7.0/24")]
    steps = [{"nft": killswitch_ruleset(TUN, MARK, lan=lan)}, *sends(cases)]
    assert run_probe_script(steps) == cases
