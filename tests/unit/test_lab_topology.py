"""plan_lab: fixed addresses from the spec, and properties over every lab size and latency."""

from __future__ import annotations

import itertools
import math
import re
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshvpn.errors import LocalError
from meshvpn.lab import LabPlan, plan_lab
from meshvpn.lab.topology import (
    IFNAMSIZ,
    LAB_RANGES,
    MAX_CLIENTS,
    MAX_LATENCY_MS,
    MAX_RELAYS,
    WEB_NET,
    Role,
    owns_netns,
)

prefixes = st.from_regex(r"[a-z][a-z0-9]{0,9}", fullmatch=True)
relay_counts = st.integers(min_value=1, max_value=MAX_RELAYS)
client_counts = st.integers(min_value=0, max_value=MAX_CLIENTS)
IFNAME_RE = re.compile(r"[a-z][a-z0-9]*")
latency = st.none() | st.floats(min_value=0, max_value=MAX_LATENCY_MS)


@st.composite
def lab_args(draw: st.DrawFn) -> tuple[str, int, int, list[float | None] | None]:
    relays = draw(relay_counts)
    latencies = draw(st.none() | st.lists(latency, min_size=relays, max_size=relays))
    return draw(prefixes), relays, draw(client_counts), latencies


def _in_lab(addr: IPv4Address) -> bool:
    return any(addr in net for net in LAB_RANGES)


# -- the spec's fixed addresses -------------------------------------------------


def test_small_lab_matches_the_spec() -> None:
    plan = plan_lab("mvlab", 2, 1)
    assert plan.web_addr == IPv4Address("203.0.113.80")
    assert plan.web_url == "http://203.0.113.80"
    assert plan.web_port == 80

    r1, r2 = plan.relay(1), plan.relay(2)
    assert (r1.netns, r1.upstream_iface, r1.wan_iface) == ("mvlab-relay1", "r1", "wan0")
    assert r1.upstream == IPv4Interface("198.51.100.1/30")
    assert r1.wan == IPv4Interface("198.51.100.2/30")
    assert r1.gateway == IPv4Address("198.51.100.1")
    assert r2.wan_addr == IPv4Address("198.51.100.6")
    assert r2.gateway == IPv4Address("198.51.100.5")
    assert r1.lan == IPv4Interface("100.80.1.1/24")
    assert r2.lan_net == IPv4Network("100.80.2.0/24")

    h1 = plan.lan(1)
    assert (h1.netns, h1.iface) == ("mvlab-lan1", "eth0")
    assert h1.addr == IPv4Address("100.80.1.10")
    assert h1.gateway == IPv4Address("100.80.1.1")

    c1 = plan.client(1)
    assert (c1.netns, c1.upstream_iface, c1.wan_iface) == ("mvlab-client1", "c1", "wan0")
    assert c1.uplink_addr == IPv4Address("192.0.2.2")
    assert c1.gateway == IPv4Address("192.0.2.1")

    b = plan.broker
    assert (b.name, b.netns) == ("broker", "mvlab-broker")
    assert (b.upstream_iface, b.wan_iface) == ("bk", "wan0")
    assert (b.addr, b.port) == (IPv4Address("203.0.113.2"), 8883)
    assert b.upstream == IPv4Interface("203.0.113.1/30")
    assert plan.node("broker").gateway == IPv4Address("203.0.113.1")
    assert plan.node("broker").role is Role.BROKER

    assert (r1.public_addr, r1.latency_ms) == (None, None)

    internet = plan.node("internet")
    assert internet.gateway is None
    assert internet.forwarding
    assert internet.ifaces == ("bk", "r1", "r2", "c1")
    names = [n.name for n in plan.nodes]
    assert names == ["internet", "broker", "relay1", "lan1", "relay2", "lan2", "client1"]


def test_latency_gives_relays_public_addresses() -> None:
    plan = plan_lab("mvlab", 3, 1, [60, None, 0])
    r1, r2, r3 = plan.relays
    assert (r1.public_addr, r1.latency_ms) == (IPv4Address("203.0.113.101"), 60.0)
    assert (r2.public_addr, r2.latency_ms) == (None, None)
    assert (r3.public_addr, r3.latency_ms) == (IPv4Address("203.0.113.103"), 0.0)
    on_lo = [a.addr for a in plan.node("internet").addrs if a.iface == "lo"]
    assert on_lo == [
        IPv4Interface(x) for x in ("203.0.113.80/32", "203.0.113.101/32", "203.0.113.103/32")
    ]
    last = plan_lab("mvlab", 62, 0, [1.0] * 62).relay(62)
    assert last.public_addr == IPv4Address("203.0.113.162")


@pytest.mark.parametrize(
    "latencies",
    [[], [1.0], [1.0, 2.0, 3.0], [-1.0, 0], [0, math.inf], [math.nan, 0], [MAX_LATENCY_MS + 1, 0],
     [True, 0], ["5", 0], "55"],
)  # fmt: skip
def test_rejects_bad_latencies(latencies: list[float]) -> None:
    with pytest.raises(LocalError):
        plan_lab("mvlab", 2, 0, latencies)


def test_largest_lab_fits_its_ranges() -> None:
    plan = plan_lab("z", MAX_RELAYS, MAX_CLIENTS)
    assert plan.relay(62).wan == IPv4Interface("198.51.100.246/30")
    assert plan.client(62).uplink == IPv4Interface("192.0.2.246/30")
    assert plan.lan(62).addr == IPv4Address("100.80.62.10")


@pytest.mark.parametrize(
    ("prefix", "relays", "clients"),
    [
        ("", 1, 0),
        ("1lab", 1, 0),
        ("Lab", 1, 0),
        ("my-lab", 1, 0),
        ("abcdefghijk", 1, 0),
        ("lab", 0, 0),
        ("lab", MAX_RELAYS + 1, 0),
        ("lab", 1, -1),
        ("lab", 1, MAX_CLIENTS + 1),
    ],
)
def test_rejects_bad_arguments(prefix: str, relays: int, clients: int) -> None:
    with pytest.raises(LocalError):
        plan_lab(prefix, relays, clients)


def test_lookups_outside_the_lab_are_local_errors() -> None:
    plan = plan_lab("mvlab", 2, 1)
    for bad in (lambda: plan.relay(0), lambda: plan.relay(3), lambda: plan.client(2)):
        with pytest.raises(LocalError):
            bad()
    with pytest.raises(LocalError, match="no node 'relay3'"):
        plan.netns("relay3")


def test_plan_is_frozen() -> None:
    plan = plan_lab("mvlab", 1, 0)
    with pytest.raises(AttributeError):
        plan.prefix = "other"  # type: ignore[misc]


def test_prefixes_do_not_claim_each_others_namespaces() -> None:
    assert owns_netns("t1", "t1-relay1")
    assert owns_netns("t1", "t1-internet")
    assert not owns_netns("t1", "t12-relay1")
    assert not owns_netns("t12", "t1-relay1")
    assert not owns_netns("t1", "t1-relay")
    assert not owns_netns("t1", "t1-relay0")
    assert not owns_netns("t1", "t1-somethingelse")
    assert not owns_netns("t1", "t1")
    assert owns_netns("t1", "t1-broker")
    assert not owns_netns("t1", "t1-broker1")


# -- properties over every size ---------------------------------------------------


def _all_addrs(plan: LabPlan) -> list[IPv4Interface]:
    return [a.addr for n in plan.nodes for a in n.addrs]


@given(lab_args())
def test_addresses_unique_and_inside_lab_ranges(
    args: tuple[str, int, int, list[float | None] | None],
) -> None:
    plan = plan_lab(*args)
    addrs = _all_addrs(plan)
    assert len({a.ip for a in addrs}) == len(addrs)
    for a in addrs:
        assert _in_lab(a.ip)
        assert a.ip not in (a.network.network_address, a.network.broadcast_address) or (
            a.network.prefixlen == 32
        )
    for n in plan.nodes:
        if n.gateway is not None:
            assert _in_lab(n.gateway)
            # The gateway is on one of the node's own subnets, and not the node itself.
            assert any(n.gateway in a.addr.network and n.gateway != a.addr.ip for a in n.addrs)


@given(lab_args())
def test_subnets_do_not_overlap(args: tuple[str, int, int, list[float | None] | None]) -> None:
    plan = plan_lab(*args)
    # A veth pair shares one subnet; distinct pairs never overlap.
    subnets = []
    for v in plan.veths:
        a = next(x.addr for x in plan.node(v.a_node).addrs if x.iface == v.a_iface)
        b = next(x.addr for x in plan.node(v.b_node).addrs if x.iface == v.b_iface)
        assert a.network == b.network
        subnets.append(a.network)
    subnets.append(IPv4Network(f"{plan.web_addr}/32"))
    publics = [r.public for r in plan.relays if r.public is not None]
    subnets += [p.network for p in publics]
    for x, y in itertools.combinations(subnets, 2):
        assert not x.overlaps(y), (x, y)
    # Every address on the internet's loopback is one of those: the web server's or a public one.
    on_lo = {a.addr for a in plan.node("internet").addrs if a.iface == "lo"}
    assert on_lo == {plan.internet.web, *publics}
    assert all(p.network.subnet_of(WEB_NET) and p.network.prefixlen == 32 for p in publics)


@given(prefixes, relay_counts, client_counts)
def test_names_valid(prefix: str, relays: int, clients: int) -> None:
    plan = plan_lab(prefix, relays, clients)
    nodes = [n.name for n in plan.nodes]
    assert len(set(nodes)) == len(nodes) == 2 + 2 * relays + clients  # + internet, broker
    assert [n.netns for n in plan.nodes] == [f"{prefix}-{n}" for n in nodes]
    for n in plan.nodes:
        assert owns_netns(prefix, n.netns)
        names = [a.iface for a in n.addrs]
        for iface in names:
            assert len(iface) <= IFNAMSIZ
            assert IFNAME_RE.fullmatch(iface), iface
        assert len(set(n.ifaces)) == len(n.ifaces)
    # Every veth end is an interface of its node, used exactly once.
    ends = [(v.a_node, v.a_iface) for v in plan.veths] + [(v.b_node, v.b_iface) for v in plan.veths]
    assert len(set(ends)) == len(ends)
    assert sorted(ends) == sorted((n.name, i) for n in plan.nodes for i in n.ifaces)


@given(lab_args())
def test_roles_and_views_agree(args: tuple[str, int, int, list[float | None] | None]) -> None:
    _, relays, clients, latencies = args
    plan = plan_lab(*args)
    assert len(plan.relays) == len(plan.lans) == relays
    assert len(plan.clients) == clients
    for r in plan.relays:
        node = plan.node(r.name)
        assert node.role is Role.RELAY
        assert node.forwarding
        assert node.gateway == r.gateway
        assert plan.lan(r.index).gateway == r.lan_addr
        assert r.wan.network == r.upstream.network
        assert r.wan.network.prefixlen == 30
        wanted = None if latencies is None else latencies[r.index - 1]
        assert r.latency_ms == wanted
        assert (r.public_addr is None) == (wanted is None)
    for c in plan.clients:
        node = plan.node(c.name)
        assert node.role is Role.CLIENT
        assert not node.forwarding
        assert node.gateway == c.gateway
        assert c.uplink.network == c.upstream.network
    broker = plan.node("broker")
    assert broker.role is Role.BROKER
    assert not broker.forwarding
    assert broker.gateway == plan.broker.gateway
    assert plan.broker.wan.network == plan.broker.upstream.network
    # Only the internet has no default route: nothing leaves the lab.
    assert [n.name for n in plan.nodes if n.gateway is None] == ["internet"]
