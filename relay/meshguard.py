"""Per-link source guard for mesh links: a stricter ``mesh_sources``. Pure.

Theory of operation
-------------------
A mesh link is one WireGuard interface per neighbour with allowed IPs
``0.0.0.0/0, ::/0``: the routing table picks the neighbour, so WireGuard checks
nothing about the inner source of what a neighbour sends. The relay's table
(relay/exit.py, ``MeshRules``) lets a mesh link carry only sources that routing
knows (``mesh_sources``), one set for all links: neighbour A may still send
from a prefix that lives behind neighbour B, e.g. B's own mesh address.

This guard is per link: for each mesh interface, the source prefixes that the
neighbour on it offers routes to (``allowed_sources`` from ``(prefix,
interface)`` pairs). A packet that comes in on a mesh link from any other
source is dropped and counted (``mesh_spoofed``), at the ``raw`` priority of
prerouting, so a flood of forgeries does not even make conntrack entries.
Link-local sources (``fe80::/10``) pass on every link: the routing protocol's
own hellos may use them, and the kernel never forwards them.

Offered, not only selected: a prefix is allowed on a link when the neighbour
there announced a (feasible) route to it, whether or not it is our best.
Strict reverse-path filtering against the selected route alone drops real
traffic whenever paths are asymmetric, which a distance-vector mesh makes
routine while it converges. Sets, not ``fib saddr . iif oif missing``: fib is
strict RPF against the selected route and sees meshvpn's table only through
an ip rule; a set holds exactly what routing allows per link, changes in one
transaction (``mesh_guard_update``) that keeps the counters, and tests as text.

It renders its own table (``mesh_guard_table``, ``inet meshvpn_meshguard`` by
default), so it can stand beside the relay's table without touching it; or
its declarations and chain can go into that table in place of the two
``mesh_sources`` rules. Not wired in yet: that needs the router's per-link
offers (meshvpn.routing keeps them per link, as ``Router._entries``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from typing import Final

from meshvpn.errors import LocalError

TABLE: Final = "inet meshvpn_meshguard"
COUNTER: Final = "mesh_spoofed"
LINK_LOCAL: Final = ipaddress.IPv6Network("fe80::/10")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MeshLinks = Mapping[str, Iterable[Network]]

_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def _check_ifname(name: str) -> str:
    if not _IFNAME_RE.fullmatch(name):
        raise LocalError(f"bad mesh interface name {name!r}")
    return name


def _collapsed(links: MeshLinks) -> dict[str, tuple[list[Network], list[Network]]]:
    """Per link (sorted by name): IPv4 and IPv6 prefixes, merged and non-overlapping
    (an nftables interval set refuses overlapping elements)."""
    out: dict[str, tuple[list[Network], list[Network]]] = {}
    for name in sorted(links):
        nets = list(links[name])
        v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
        v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
        out[_check_ifname(name)] = (
            list(ipaddress.collapse_addresses(v4)),
            list(ipaddress.collapse_addresses(v6)),
        )
    return out


def allowed_sources(offered: Iterable[tuple[Network, str]]) -> dict[str, tuple[Network, ...]]:
    """``{interface: prefixes}`` from the routes neighbours offer, as (prefix, interface)."""
    by_link: dict[str, list[Network]] = {}
    for prefix, ifname in offered:
        by_link.setdefault(ifname, []).append(prefix)
    return {name: (*v4, *v6) for name, (v4, v6) in _collapsed(by_link).items()}


def _elements(links: MeshLinks) -> tuple[list[str], list[str], list[str]]:
    names, src4, src6 = [], [], []
    for name, (v4, v6) in _collapsed(links).items():
        names.append(f'"{name}"')
        src4 += [f'"{name}" . {net}' for net in v4]
        src6 += [f'"{name}" . {net}' for net in v6]
    return names, src4, src6


def _set(name: str, kind: str, elements: list[str], *, interval: bool) -> str:
    flags = " flags interval;" if interval else ""
    body = f" elements = {{ {', '.join(elements)} }};" if elements else ""
    return f"    set {name} {{ type {kind};{flags}{body} }}\n"


def mesh_guard_declarations(links: MeshLinks) -> str:
    """The counter and sets, for inside the relay's table definition."""
    names, src4, src6 = _elements(links)
    return (
        f'    counter {COUNTER} {{ comment "mesh link source routing does not allow"; }}\n'
        + _set("mesh_links", "ifname", names, interval=False)
        + _set("mesh_src4", "ifname . ipv4_addr", src4, interval=True)
        + _set("mesh_src6", "ifname . ipv6_addr", src6, interval=True)
    )


def mesh_guard_chain() -> str:
    """The chain, for inside the relay's table definition. With no mesh links the
    first rule accepts everything: nothing else is checked."""
    return f"""\
    chain mesh_guard {{
        type filter hook prerouting priority raw; policy accept;
        iifname != @mesh_links accept
        ip6 saddr {LINK_LOCAL} accept
        iifname . ip6 saddr @mesh_src6 accept
        iifname . ip saddr @mesh_src4 accept
        counter name {COUNTER} drop comment "mesh link source routing does not allow"
    }}
"""


def mesh_guard_update(links: MeshLinks, table: str = TABLE) -> str:
    """``nft -f`` input replacing the links and their allowed sources in one
    transaction: the table's other sets, chains and counters stay as they are."""
    names, src4, src6 = _elements(links)
    lines = [f"flush set {table} {s}" for s in ("mesh_links", "mesh_src4", "mesh_src6")]
    for set_name, elements in (("mesh_links", names), ("mesh_src4", src4), ("mesh_src6", src6)):
        if elements:
            lines.append(f"add element {table} {set_name} {{ {', '.join(elements)} }}")
    return "\n".join(lines) + "\n"


def mesh_guard_table(links: MeshLinks, table: str = TABLE) -> str:
    """A table holding only the guard (tests; a node that runs no exit table)."""
    return (
        f"table {table}\ndelete table {table}\ntable {table} {{\n"
        + mesh_guard_declarations(links)
        + mesh_guard_chain()
        + "}\n"
    )
