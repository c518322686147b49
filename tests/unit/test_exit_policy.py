"""The exit policy: validation, the table it renders, and nftables accepting it.

The rendered sets are parsed back out of the ruleset text and checked against
a naive model of the policy (relay/exit.py's module comment, written out as
plain membership tests), for fixed cases and for hypothesis-drawn policies.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshvpn.errors import LocalError
from relay.exit import (
    COUNTERS,
    DEFAULT_PROTECTED,
    ExitPolicy,
    Network,
    default_route_ifnames,
    exit_ruleset,
    host_networks,
)

IP = ipaddress.ip_address
NET = ipaddress.ip_network
POOL = ipaddress.IPv4Network("100.64.0.0/24")
WG = "mvr1"
# The lab's relay1, as the agent finds it.
LAN = (NET("100.80.1.0/24"),)
ROUTER = (IP("198.51.100.2"), IP("100.80.1.1"))
LAB_ALLOW = ExitPolicy.from_flags(allow=["203.0.113.0/24"])


def render(policy: ExitPolicy = ExitPolicy(), **kw: object) -> str:  # noqa: B008
    args: dict[str, object] = {"lan_networks": LAN, "router_addresses": ROUTER} | kw
    return exit_ruleset(WG, POOL, policy, **args)  # type: ignore[arg-type]


_SET_RE = re.compile(r"set (\w+) \{ type \w+;(?: flags interval;)?(?: elements = \{ (.*?) \};)? \}")


def sets_of(text: str) -> dict[str, list[str]]:
    return {m[1]: m[2].split(", ") if m[2] else [] for m in _SET_RE.finditer(text)}


def dropped(text: str, address: str) -> set[str]:
    """Which destination sets of the rendered table hold ``address``."""
    addr = IP(address)
    found = set()
    for name, elements in sets_of(text).items():
        if name.startswith("blocked_"):
            continue
        if any(addr in NET(e) for e in elements if NET(e).version == addr.version):
            found.add(name[:-1])
    return found


def naive_blocked(
    policy: ExitPolicy, lan: tuple[Network, ...], router: tuple[object, ...], address: str
) -> bool:
    addr = IP(address)
    if addr in router or any(addr in n for n in lan) or any(addr in n for n in policy.deny):
        return True
    for r in policy.protected:
        if addr in r.network and (not r.allowable or not any(addr in a for a in policy.allow)):
            return True
    return False


# ---- defaults


# One address in every class the exit must keep clients away from by default.
DEFAULT_CLOSED = {
    "100.80.1.10": "lan",  # the relay's LAN (lan1's host)
    "100.80.1.1": "router",
    "198.51.100.2": "router",  # the router's WAN address
    "10.1.2.3": "protected",
    "172.16.0.1": "protected",
    "172.31.255.254": "protected",
    "192.168.1.1": "protected",
    "100.100.0.1": "protected",  # CGNAT
    "169.254.169.254": "protected",  # link-local, cloud metadata
    "127.0.0.1": "protected",
    "224.0.0.1": "protected",
    "239.255.255.250": "protected",  # SSDP
    "0.1.2.3": "protected",
    "255.255.255.255": "protected",
    "240.0.0.1": "protected",
    "192.0.0.8": "protected",
    "192.0.2.7": "protected",
    "198.51.100.77": "protected",
    "203.0.113.80": "protected",
    "198.18.0.1": "protected",
    "192.88.99.1": "protected",
    "fd00::1": "protected",
    "fc12::1": "protected",
    "fe80::1": "protected",
    "ff02::1": "protected",
    "::1": "protected",
    "::": "protected",
    "2001:db8::1": "protected",
    "3fff::1": "protected",
    "::ffff:192.168.1.1": "protected",
}
PUBLIC = ["1.1.1.1", "8.8.8.8", "93.184.216.34", "100.128.0.1", "172.32.0.1", "2606:4700::1111"]


@pytest.mark.parametrize(("address", "why"), sorted(DEFAULT_CLOSED.items()))
def test_default_policy_closes_every_protected_class(address: str, why: str) -> None:
    text = render()
    assert why in dropped(text, address)
    assert naive_blocked(ExitPolicy(), LAN, ROUTER, address)


@pytest.mark.parametrize("address", PUBLIC)
def test_default_policy_leaves_the_internet_open(address: str) -> None:
    assert dropped(render(), address) == set()


def test_every_default_range_is_rendered() -> None:
    sets = sets_of(render())
    for r in DEFAULT_PROTECTED:
        family = f"protected{r.network.version}"
        rendered = [NET(e) for e in sets[family]]
        assert any(r.network.subnet_of(e) for e in rendered), r  # type: ignore[arg-type]


def test_smtp_is_blocked_by_default_and_everywhere() -> None:
    text = render(LAB_ALLOW)
    assert sets_of(text)["blocked_tcp"] == ["25"]
    assert sets_of(text)["blocked_udp"] == []
    # the port rule comes after the destination rules, with nothing but drops before it:
    # it applies to allowed destinations too
    forward = text[text.index("chain forward") :]
    assert 'iifname "mvr1" tcp dport @blocked_tcp counter name blocked_port drop' in forward


# ---- structure of the table


def test_table_is_replaced_atomically_and_keeps_the_basics() -> None:
    text = render()
    assert text.startswith("table inet meshvpn\ndelete table inet meshvpn\ntable inet meshvpn {")
    assert 'iifname "mvr1" ip saddr != 100.64.0.0/24 counter name spoofed drop' in text
    assert 'iifname "mvr1" oifname "mvr1" counter name client_to_client drop' in text
    assert text.count("tcp option maxseg size set rt mtu") == 2
    assert 'ip saddr 100.64.0.0/24 oifname != "mvr1" counter masquerade' in text
    assert "dnat" not in text


def test_every_drop_has_a_declared_named_counter() -> None:
    text = render(ExitPolicy.from_flags(dns="1.1.1.1"), client_services=(("udp", 51822),))
    declared = set(re.findall(r"^    counter (\w+) \{", text, re.MULTILINE))
    assert declared == {*COUNTERS, "dns_redirected"}
    drops = [
        line for line in text.splitlines() if line.rstrip().endswith("drop") or " drop " in line
    ]
    assert len(drops) >= 15
    for line in drops:
        name = re.search(r"counter name (\w+) drop", line)
        assert name is not None, line
        assert name[1] in declared


def _chain(text: str, name: str) -> list[str]:
    body = text[text.index(f"chain {name} {{") :]
    return [line.strip() for line in body[: body.index("\n    }")].splitlines()[2:]]


def test_router_itself_is_closed_but_for_echo_and_client_services() -> None:
    text = render(client_services=(("udp", 51822), ("tcp", 7000)))
    assert _chain(text, "input") == [
        (
            'iifname "mvr1" ip saddr != 100.64.0.0/24 counter name spoofed drop'
            ' comment "client source outside the pool"'
        ),
        'iifname "mvr1" ct state established,related accept',
        'iifname "mvr1" ip daddr 100.64.0.1 icmp type echo-request accept',
        'iifname "mvr1" ip daddr 100.64.0.1 udp dport 51822 accept',
        'iifname "mvr1" ip daddr 100.64.0.1 tcp dport 7000 accept',
        'iifname "mvr1" counter name to_router drop comment "client to the router itself"',
    ]
    no_services = _chain(render(), "input")
    assert not any("dport" in line for line in no_services)


def test_dns_is_rewritten_before_routing() -> None:
    text = render(ExitPolicy.from_flags(allow=["203.0.113.0/24"], dns="203.0.113.80"))
    pre = _chain(text, "prerouting")
    assert [line.split(" comment")[0] for line in pre] == [
        f'iifname "mvr1" ip saddr 100.64.0.0/24 {proto} dport 53 counter name dns_redirected'
        " dnat ip to 203.0.113.80"
        for proto in ("tcp", "udp")
    ]
    assert "priority dstnat" in text


def test_forward_order_spoof_then_destinations_then_accept() -> None:
    rules = _chain(render(LAB_ALLOW), "forward")
    names = [m[1] for line in rules if (m := re.search(r"counter name (\w+)", line))]
    assert names == [
        "spoofed", "spoofed", "client_to_client",
        "to_router", "to_router", "to_lan", "to_lan", "denied", "denied",
        "protected", "protected", "blocked_port", "blocked_port",
    ]  # fmt: skip
    assert rules[-2:] == [
        'iifname "mvr1" counter accept',
        'oifname "mvr1" ct state established,related counter accept',
    ]


# ---- allow and deny


def test_allow_opens_a_protected_range_but_never_router_or_lan() -> None:
    policy = ExitPolicy.from_flags(allow=["100.64.0.0/10", "198.51.100.0/24", "203.0.113.0/24"])
    text = render(policy)
    assert dropped(text, "203.0.113.80") == set()
    assert dropped(text, "198.51.100.6") == set()
    assert dropped(text, "100.100.0.1") == set()
    assert dropped(text, "100.80.1.10") == {"lan"}
    assert dropped(text, "100.80.1.1") == {"router", "lan"}
    assert dropped(text, "198.51.100.2") == {"router"}


def test_allow_may_open_part_of_a_range() -> None:
    text = render(ExitPolicy.from_flags(allow=["10.1.0.0/16", "fd00:1::/32"]))
    assert dropped(text, "10.1.2.3") == set()
    assert dropped(text, "fd00:1::1") == set()
    for address in ("10.0.255.255", "10.2.0.0", "fd00:2::1"):
        assert dropped(text, address) == {"protected"}, address


def test_allow_never_opens_martians() -> None:
    text = render(ExitPolicy.from_flags(allow=["0.0.0.0/0", "::/0"]))
    for address in ("169.254.169.254", "127.0.0.1", "224.0.0.1", "255.255.255.255", "0.0.0.1"):
        assert "protected" in dropped(text, address), address
    for address in ("fe80::1", "ff02::1", "::1"):
        assert "protected" in dropped(text, address), address
    for address in ("10.0.0.1", "192.168.1.1", "240.0.0.1", "fd00::1"):
        assert dropped(text, address) == set(), address


def test_deny_wins_over_allow() -> None:
    policy = ExitPolicy.from_flags(allow=["10.0.0.0/8"], deny=["10.1.0.0/16", "2a00:1450::/32"])
    text = render(policy)
    assert dropped(text, "10.2.0.1") == set()
    assert dropped(text, "10.1.0.1") == {"deny"}
    assert dropped(text, "2a00:1450::1") == {"deny"}
    assert dropped(text, "8.8.8.8") == set()


def test_policy_is_frozen_and_normalised() -> None:
    a = ExitPolicy.from_flags(allow=["10.0.0.0/8", "10.0.0.0/8", "192.168.0.0/16"])
    b = ExitPolicy.from_flags(allow=["192.168.0.0/16", "10.0.0.0/8"])
    assert a == b
    assert a.allow == (NET("10.0.0.0/8"), NET("192.168.0.0/16"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.dns = None  # type: ignore[misc]


# ---- validation: one line, what and what to do


@pytest.mark.parametrize(
    ("flags", "what", "hint"),
    [
        ({"allow": ["10.0.0.1/8"]}, "bad --allow '10.0.0.1/8': host bits set", "10.0.0.0/8"),
        ({"deny": ["nonsense"]}, "bad --deny 'nonsense'", "10.0.0.0/8"),
        ({"allow": ["169.254.0.0/16"]}, "link-local addresses are never forwarded", "private"),
        ({"allow": ["127.0.0.1"]}, "loopback addresses are never forwarded", "private"),
        ({"allow": ["ff02::/16"]}, "multicast addresses are never forwarded", "private"),
        ({"allow": ["8.8.8.0/24"]}, "opens nothing", "--deny"),
        ({"block_ports": ["tcp"]}, "bad --block-port 'tcp'", "tcp/25"),
        ({"block_ports": ["sctp/25"]}, "bad --block-port 'sctp/25'", "tcp/25"),
        ({"block_ports": ["udp/0"]}, "bad --block-port 'udp/0'", "tcp/25"),
        ({"block_ports": ["udp/65536"]}, "bad --block-port 'udp/65536'", "tcp/25"),
        ({"dns": "resolver"}, "bad --dns 'resolver'", "IPv4"),
        ({"dns": "2606:4700::1111"}, "not an IPv4 address", "IPv4 only"),
        ({"dns": "192.168.1.1"}, "protected range (RFC 1918)", "public resolver"),
        ({"dns": "169.254.1.1", "allow": ["10.0.0.0/8"]}, "protected range", "public"),
        ({"dns": "1.1.1.1", "deny": ["1.1.1.0/24"]}, "in a --deny network", "one of the two"),
        ({"dns": "1.1.1.1", "block_ports": ["udp/53"]}, "DNS cannot pass", "one of the two"),
    ],
)
def test_bad_flags_are_one_line_errors(flags: dict[str, object], what: str, hint: str) -> None:
    with pytest.raises(LocalError) as info:
        ExitPolicy.from_flags(**flags)  # type: ignore[arg-type]
    line = info.value.one_line()
    assert "\n" not in line
    assert what in info.value.what, line
    assert hint in info.value.hint, line


def test_block_port_flags() -> None:
    assert ExitPolicy.from_flags().blocked_ports == (("tcp", 25),)
    assert ExitPolicy.from_flags(block_ports=["udp/5060"]).blocked_ports == (
        ("tcp", 25),
        ("udp", 5060),
    )
    assert ExitPolicy.from_flags(block_ports=["none"]).blocked_ports == ()
    assert ExitPolicy.from_flags(block_ports=["udp/1", "None", "TCP/465"]).blocked_ports == (
        ("tcp", 465),
    )
    text = render(ExitPolicy.from_flags(block_ports=["none"]))
    assert sets_of(text)["blocked_tcp"] == []


def test_dns_may_be_an_allowed_range_but_never_the_router_or_its_lan() -> None:
    policy = ExitPolicy.from_flags(allow=["100.64.0.0/10"], dns="100.80.1.53")
    assert policy.dns == IP("100.80.1.53")
    with pytest.raises(LocalError, match="this router or on its LAN"):
        render(policy)
    ok = render(policy, lan_networks=(), router_addresses=())
    assert "dnat ip to 100.80.1.53" in ok


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"client_services": (("icmp", 1),)}, "bad client service"),
        ({"client_services": (("udp", 0),)}, "bad client service"),
    ],
)
def test_ruleset_rejects_bad_services(kw: dict[str, object], message: str) -> None:
    with pytest.raises(LocalError, match=message):
        render(ExitPolicy(), **kw)


@pytest.mark.parametrize("ifname", ['wg0" accept', "", "a" * 16, "wg 0"])
def test_ruleset_rejects_interface_names_that_are_not_names(ifname: str) -> None:
    with pytest.raises(LocalError, match="bad interface name"):
        exit_ruleset(ifname, POOL, ExitPolicy(), lan_networks=(), router_addresses=())


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(LocalError, match="bad --block-port"):
        ExitPolicy(blocked_ports=(("tcp", 70000),))
    with pytest.raises(LocalError, match="not a network"):
        ExitPolicy(deny=("10.0.0.0/8",))  # type: ignore[arg-type]
    with pytest.raises(LocalError, match="not an IPv4 address"):
        ExitPolicy(dns=IP("::1"))  # type: ignore[arg-type]


# ---- what the agent finds on the host


def _link(
    ifname: str, *addrs: tuple[str, int], link_type: str = "ether", **extra: str
) -> dict[str, Any]:
    infos = []
    for local, prefix in addrs:
        family = "inet6" if ":" in local else "inet"
        infos.append({"family": family, "local": local, "prefixlen": prefix, "scope": "global"})
        infos[-1].update(extra)
    return {"ifname": ifname, "link_type": link_type, "addr_info": infos}


def test_host_networks_of_the_lab_relay() -> None:
    addresses = [
        _link("lo", ("127.0.0.1", 8), ("::1", 128), link_type="loopback"),
        _link("wan0", ("198.51.100.2", 30)),
        _link("lan0", ("100.80.1.1", 24), ("fd00:80::1", 64)),
        _link("mvr1", ("100.64.0.1", 24), link_type="none"),
    ]
    found = host_networks(addresses, {"wan0"}, "mvr1")
    assert found.router_addresses == (IP("100.80.1.1"), IP("198.51.100.2"), IP("fd00:80::1"))
    # the WAN's /30 lies in a documentation range: not public, so LAN too
    assert found.lan_networks == (NET("100.80.1.0/24"), NET("198.51.100.0/30"), NET("fd00:80::/64"))


def test_a_public_uplink_subnet_is_not_lan_but_its_address_is_the_routers() -> None:
    addresses = [
        _link("eth0", ("81.2.69.160", 24), ("2a02:8010::2", 64)),
        _link("br-lan", ("192.168.1.1", 24)),
    ]
    found = host_networks(addresses, {"eth0"}, "wg0")
    assert found.lan_networks == (NET("192.168.1.0/24"),)
    assert IP("81.2.69.160") in found.router_addresses
    assert IP("2a02:8010::2") in found.router_addresses


def test_a_single_armed_relay_keeps_its_home_lan_out_even_with_allow() -> None:
    # a Pi on the home LAN: the default route's interface *is* the LAN
    found = host_networks([_link("eth0", ("192.168.1.50", 24))], {"eth0"}, "wg0")
    assert found.lan_networks == (NET("192.168.1.0/24"),)
    text = exit_ruleset(
        "wg0",
        POOL,
        ExitPolicy.from_flags(allow=["192.168.0.0/16"]),
        lan_networks=found.lan_networks,
        router_addresses=found.router_addresses,
    )
    assert dropped(text, "192.168.1.1") == {"lan"}
    assert dropped(text, "192.168.2.1") == set()


def test_point_to_point_subnet_is_the_peers() -> None:
    found = host_networks([_link("ppp0", ("10.8.0.1", 32), address="10.8.0.2")], set(), "wg0")
    assert found.lan_networks == (NET("10.8.0.2/32"),)
    assert found.router_addresses == (IP("10.8.0.1"),)


def test_default_route_interfaces_include_multipath() -> None:
    routes: list[dict[str, Any]] = [
        {"dst": "default", "gateway": "10.9.0.254", "dev": "wan0"},
        {"dst": "default", "nexthops": [{"dev": "wan1"}, {"dev": "wan2"}]},
    ]
    assert default_route_ifnames(routes) == {"wan0", "wan1", "wan2"}
    assert default_route_ifnames([]) == set()


# ---- properties against the naive model


def _network(version: int) -> st.SearchStrategy[Network]:
    bits = 32 if version == 4 else 128
    return st.builds(
        lambda a, p: ipaddress.ip_network((a, p), strict=False),
        st.integers(0, 2**bits - 1).map(
            ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        ),
        st.integers(0, bits),
    )


def _inside(net: Network) -> st.SearchStrategy[Network]:
    return st.integers(net.prefixlen, net.max_prefixlen).flatmap(
        lambda p: st.integers(0, max(0, 2 ** (p - net.prefixlen) - 1)).map(
            lambda i: ipaddress.ip_network(
                (int(net.network_address) + i * 2 ** (net.max_prefixlen - p), p)
            )
        )
    )


near_protected = st.sampled_from([r.network for r in DEFAULT_PROTECTED]).flatmap(_inside)
networks = st.one_of(near_protected, _network(4), _network(6))


def _valid_allows(candidates: list[Network]) -> tuple[Network, ...]:
    keep = []
    for net in candidates:
        try:
            ExitPolicy(allow=(net,))
        except LocalError:
            continue
        keep.append(net)
    return tuple(keep)


policies = st.builds(
    lambda allow, deny, ports: ExitPolicy(
        allow=_valid_allows(allow), deny=tuple(deny), blocked_ports=ports
    ),
    st.lists(networks, max_size=6),
    st.lists(networks, max_size=4),
    st.lists(st.tuples(st.sampled_from(["tcp", "udp"]), st.integers(1, 65535)), max_size=4).map(
        tuple
    ),
)
lans = st.lists(networks, max_size=3).map(tuple)
routers = st.lists(networks.map(lambda n: n.network_address), max_size=4).map(tuple)


def _probe_addresses(nets: list[Network]) -> st.SearchStrategy[str]:
    edges = [str(a) for n in nets for a in (n.network_address, n[-1])]
    return st.one_of(
        st.sampled_from(edges) if edges else st.nothing(),
        st.integers(0, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i))),
        st.integers(0, 2**128 - 1).map(lambda i: str(ipaddress.IPv6Address(i))),
        near_protected.map(lambda n: str(n.network_address)),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policies, lan=lans, router=routers, data=st.data())
def test_rendered_sets_match_the_naive_model(
    policy: ExitPolicy, lan: tuple[Network, ...], router: tuple[object, ...], data: st.DataObject
) -> None:
    text = exit_ruleset(WG, POOL, policy, lan_networks=lan, router_addresses=router)  # type: ignore[arg-type]
    interesting = [*policy.allow, *policy.deny, *lan, *(NET(a) for a in router)]  # type: ignore[arg-type]
    for _ in range(20):
        address = data.draw(_probe_addresses(interesting))
        assert bool(dropped(text, address)) == naive_blocked(policy, lan, router, address), address


@settings(max_examples=150, deadline=None)
@given(allow=st.lists(networks, max_size=8), lan=lans, router=routers)
def test_allow_never_opens_the_router_or_its_lan(
    allow: list[Network], lan: tuple[Network, ...], router: tuple[object, ...]
) -> None:
    policy = ExitPolicy(allow=_valid_allows(allow))
    text = exit_ruleset(WG, POOL, policy, lan_networks=lan, router_addresses=router)  # type: ignore[arg-type]
    for address in router:
        assert "router" in dropped(text, str(address))
    for net in lan:
        for address in (net.network_address, net[-1], net[net.num_addresses // 2]):
            assert "lan" in dropped(text, str(address))


# ---- nftables itself accepts what we render (in a namespace of its own)

_NFT_UNAVAILABLE = (
    "needs root" if os.geteuid() != 0 else
    "needs nft and unshare" if not (shutil.which("nft") and shutil.which("unshare")) else
    None
)  # fmt: skip
needs_nft = pytest.mark.skipif(_NFT_UNAVAILABLE is not None, reason=str(_NFT_UNAVAILABLE))


def nft_check(text: str) -> None:
    # `unshare --net`: an anonymous namespace that vanishes with the process, so
    # the check touches nothing on this machine and leaves nothing behind.
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
    "policy",
    [
        ExitPolicy(),
        LAB_ALLOW,
        ExitPolicy.from_flags(
            allow=["203.0.113.0/24", "fd00::/8", "0.0.0.0/0"],
            deny=["8.8.8.0/24", "2001:4860::/32", "203.0.113.7"],
            block_ports=["none", "udp/5060", "tcp/465"],
            dns="203.0.113.80",
        ),
    ],
)
def test_nft_accepts_the_ruleset(policy: ExitPolicy) -> None:
    nft_check(render(policy, client_services=(("udp", 51822),)))
    nft_check(render(policy, lan_networks=(), router_addresses=()))


@needs_nft
@settings(max_examples=15, deadline=None)
@given(policy=policies, lan=lans, router=routers)
def test_nft_accepts_any_valid_policy(
    policy: ExitPolicy, lan: tuple[Network, ...], router: tuple[object, ...]
) -> None:
    nft_check(exit_ruleset(WG, POOL, policy, lan_networks=lan, router_addresses=router))  # type: ignore[arg-type]


# ---- the command line


def meshvpn(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshvpn", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--allow", "10.0.0.1/8"], "did you mean 10.0.0.0/8?"),
        (["--block-port", "tcp/ssh"], "bad --block-port 'tcp/ssh'"),
        (["--dns", "192.168.1.1"], "--dns 192.168.1.1 is in a protected range"),
        (["--allow", "169.254.169.254"], "link-local addresses are never forwarded"),
    ],
)
def test_relay_flags_fail_in_one_line(tmp_path: Path, flags: list[str], expected: str) -> None:
    proc = meshvpn("relay", "--state-dir", str(tmp_path / "s"), *flags)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    assert expected in lines[0]
    assert not (tmp_path / "s").exists(), "validation must come before anything is made"


def test_relay_help_shows_the_policy_flags() -> None:
    proc = meshvpn("relay", "--help")
    assert proc.returncode == 0
    for flag in ("--allow CIDR", "--deny CIDR", "--block-port PROTO/PORT", "--dns ADDR"):
        assert flag in proc.stdout
