"""The mesh guard's ruleset: what it lets in, checked against a naive model, and
that nftables accepts it (in a throwaway namespace)."""

from __future__ import annotations

import ipaddress
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshvpn.errors import LocalError
from relay.exit import ExitPolicy, exit_ruleset
from relay.meshguard import (
    COUNTER,
    Network,
    allowed_sources,
    mesh_guard_chain,
    mesh_guard_table,
    mesh_guard_update,
)
from tests.unit.test_exit_policy import needs_nft, nft_check

IFNAMES = ["mvm1", "mvm2", "mv-n.3", "x"]

v6_prefixes = st.builds(
    lambda a, n: ipaddress.IPv6Network((a, n), strict=False),
    st.integers(0xFD00 << 112, (0xFD00 << 112) + (1 << 112) - 1),
    st.integers(8, 128),
)
v4_prefixes = st.builds(
    lambda a, n: ipaddress.IPv4Network((a, n), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(4, 32),
)
offers = st.lists(st.tuples(st.one_of(v6_prefixes, v4_prefixes), st.sampled_from(IFNAMES)))


def parse_elements(text: str) -> dict[str, list[Network]]:
    """Read the sets back out of the rendered text: link -> allowed prefixes."""
    links: dict[str, list[Network]] = {}
    names = re.search(r"set mesh_links \{[^}]*?(?:elements = \{ ([^}]*) \})?; \}", text)
    assert names is not None
    for name in re.findall(r'"([^"]+)"', names[1] or ""):
        links[name] = []
    for family in ("4", "6"):
        body = re.search(
            rf"set mesh_src{family} \{{[^}}]*?(?:elements = \{{ ([^}}]*) \}})?; \}}", text
        )
        assert body is not None
        for name, net in re.findall(r'"([^"]+)" \. ([0-9a-f.:/]+)', body[1] or ""):
            links[name].append(ipaddress.ip_network(net))
    return links


def guard_drops(text: str, iif: str, source: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """The chain's rules, evaluated the way nftables would, from the rendered sets."""
    links = parse_elements(text)
    if iif not in links:
        return False
    if source in ipaddress.IPv6Network("fe80::/10"):
        return False
    return not any(source in net for net in links[iif] if net.version == source.version)


def samples(
    net: Network, rng: random.Random
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    first, last = int(net.network_address), int(net.broadcast_address)
    ip = ipaddress.ip_address
    cls = type(net.network_address)
    return [
        cls(first),
        cls(last),
        cls(rng.randint(first, last)),
        ip(first - 1 if first else last + 1),
    ]


@settings(max_examples=200)
@given(offers, st.randoms(use_true_random=False))
def test_the_guard_lets_in_exactly_what_routing_offered(
    offered: list[tuple[Network, str]], rng: random.Random
) -> None:
    links = allowed_sources(offered)
    text = mesh_guard_table(links)
    for ifname in IFNAMES:
        mine = [net for net, name in offered if name == ifname]
        probes = [a for net, _ in offered for a in samples(net, rng)] + [
            ipaddress.ip_address(rng.getrandbits(128)),
            ipaddress.ip_address(rng.getrandbits(32)),
            ipaddress.ip_address("fe80::1"),
        ]
        for source in probes:
            model = ifname in links and not (
                source in ipaddress.IPv6Network("fe80::/10")
                or any(source in net for net in mine if net.version == source.version)
            )
            assert guard_drops(text, ifname, source) == model, (ifname, source)
    assert not guard_drops(text, "wan0", ipaddress.ip_address("2001:db8::1"))  # not a mesh link


def test_chain_order_and_counter() -> None:
    chain = mesh_guard_chain()
    rules = [line.strip() for line in chain.splitlines()[2:-1]]
    assert rules == [
        "iifname != @mesh_links accept",  # other interfaces: untouched
        "ip6 saddr fe80::/10 accept",
        "iifname . ip6 saddr @mesh_src6 accept",
        "iifname . ip saddr @mesh_src4 accept",
        f'counter name {COUNTER} drop comment "mesh link source routing does not allow"',
    ]
    assert "priority raw" in chain  # before conntrack: a forged flood makes no entries


def test_overlapping_offers_collapse_per_link() -> None:
    net = ipaddress.ip_network
    links = allowed_sources(
        [(net("fd01::/64"), "mvm1"), (net("fd01::5/128"), "mvm1"), (net("fd01::/64"), "mvm2")]
    )
    assert links == {"mvm1": (net("fd01::/64"),), "mvm2": (net("fd01::/64"),)}


def test_bad_interface_names_are_refused() -> None:
    for bad in ("", "a" * 16, 'x" accept', "a b"):
        with pytest.raises(LocalError):
            mesh_guard_update({bad: ()})


def test_update_replaces_only_the_guards_sets() -> None:
    text = mesh_guard_update({"mvm1": [ipaddress.ip_network("fd01::/64")]})
    assert text.splitlines() == [
        "flush set inet meshvpn_meshguard mesh_links",
        "flush set inet meshvpn_meshguard mesh_src4",
        "flush set inet meshvpn_meshguard mesh_src6",
        'add element inet meshvpn_meshguard mesh_links { "mvm1" }',
        'add element inet meshvpn_meshguard mesh_src6 { "mvm1" . fd01::/64 }',
    ]
    assert "table" not in mesh_guard_update({}).replace("flush set inet", "")


@needs_nft
def test_nft_accepts_the_guard_its_updates_and_the_relays_table_beside_it() -> None:
    links = allowed_sources(
        [
            (ipaddress.ip_network("fd01::/64"), "mvm1"),
            (ipaddress.ip_network("fd02::/48"), "mvm2"),
            (ipaddress.ip_network("198.51.100.0/30"), "mvm2"),
        ]
    )
    table = mesh_guard_table(links)
    nft_check(table)
    nft_check(table + mesh_guard_update({}))
    nft_check(table + mesh_guard_update({"mvm3": [ipaddress.ip_network("fd03::/64")]}))
    relay = exit_ruleset(
        "mvr1",
        ipaddress.IPv4Network("100.64.0.0/24"),
        ExitPolicy(),
        lan_networks=[],
        router_addresses=[],
    )
    nft_check(relay + mesh_guard_table(links))  # its own table: no name clashes
