"""The exit: what clients may reach through this relay, as one nftables table.

Theory of operation
-------------------
A relay owner lets strangers' traffic out to the internet, never into their
own network. ``ExitPolicy`` is the owner's part (``--allow``, ``--deny``,
``--block-port``, ``--dns``), validated once; ``exit_ruleset`` renders it,
together with what the agent found on the host (``discover_host_networks``:
the router's own addresses and its LAN subnets), into the text of one table,
``inet meshvpn``. The table is replaced atomically (``nft -f`` of
delete-and-define), so a reload never leaves a half ruleset and teardown is
one ``delete table``. Everything here but ``discover_host_networks`` is pure.

Where a client's packet may go, first match wins:

1. A source outside the pool is spoofed (WireGuard's allowed IPs already
   stop it; this is the second lock). The pool is IPv4, so is every client.
2. To another client: dropped.
3. To the router itself (the input hook): dropped, except ``client_services``
   on the tunnel gateway address and ICMP echo to it, and replies to what
   the router itself opened.
4. Forwarded, to the router's own addresses or a LAN subnet: dropped, always.
   ``--allow`` cannot open these.
5. To a ``--deny`` network: dropped (deny wins over allow).
6. To a protected range (``DEFAULT_PROTECTED``: private, shared, reserved,
   documentation ranges...): dropped, unless ``--allow`` covers it. Martians
   (loopback, link-local, multicast, "this network", broadcast) are never
   openable: 169.254.169.254 stays out of reach whatever the owner types.
7. To a blocked port (default tcp/25, everywhere): dropped.
8. Everything else: forwarded, TCP MSS clamped to the route's MTU (the tunnel
   MTU is smaller than the uplink's and ICMP is often filtered on the way),
   and masqueraded to whatever uplink the route picks.

With ``--dns``, clients' DNS (udp and tcp 53, to any address) is rewritten to
that resolver before routing, so it never lands on the owner's LAN resolver
by accident; the rewritten packet then meets the rules above like any other.

A mesh relay also counts the bytes of every forwarded mesh flow in the
dynamic set ``mesh_flows`` (``ip6 saddr . ip6 daddr``, one counter each):
what it vouches for on a multi-hop path (``relay.paths``). The set starts
empty whenever the table is replaced (restart, reload).

Every drop has a named counter (``nft list counters table inet meshvpn``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from meshvpn.errors import LocalError

TABLE: Final = "inet meshvpn"
FLOWS_SET: Final = "mesh_flows"  # relay.paths reads it
MAX_FLOWS: Final = 65_536

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

PROTOCOLS: Final = ("tcp", "udp")
DNS_PORT: Final = 53
DEFAULT_BLOCKED_PORTS: Final = (("tcp", 25),)  # SMTP: spam lands on the owner's address

# Named counters, one per reason a client's packet is dropped.
COUNTERS: Final = {
    "spoofed": "client source outside the pool",
    "client_to_client": "client to client",
    "to_router": "client to the router itself",
    "to_lan": "client to the owner's LAN",
    "denied": "client to a --deny network",
    "protected": "client to a protected range",
    "blocked_port": "client to a blocked port",
}

_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


@dataclass(frozen=True)
class ProtectedRange:
    network: Network
    name: str
    allowable: bool  # whether --allow may open (part of) it; never for martians


def _ranges(allowable: bool, *pairs: tuple[str, str]) -> tuple[ProtectedRange, ...]:
    return tuple(ProtectedRange(ipaddress.ip_network(n), name, allowable) for n, name in pairs)


# Nothing a stranger should reach through a home router. Martians first: the
# kernel would not route most of them anyway, and no --allow opens them.
DEFAULT_PROTECTED: Final = _ranges(
    False,  # noqa: FBT003 - positional for a readable table
    ("0.0.0.0/8", "this network"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
) + _ranges(
    True,  # noqa: FBT003
    ("10.0.0.0/8", "RFC 1918"),
    ("172.16.0.0/12", "RFC 1918"),
    ("192.168.0.0/16", "RFC 1918"),
    ("100.64.0.0/10", "shared address space (CGNAT)"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("192.88.99.0/24", "reserved (6to4 relay anycast)"),
    ("198.18.0.0/15", "benchmarking"),
    ("240.0.0.0/4", "reserved"),
    ("fc00::/7", "unique local (ULA)"),
    ("fec0::/10", "site-local (deprecated)"),
    ("100::/64", "discard-only"),
    ("2001:2::/48", "benchmarking"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
)


def _sorted_unique(nets: Iterable[Network]) -> tuple[Network, ...]:
    return tuple(sorted(set(nets), key=lambda n: (n.version, int(n.network_address), n.prefixlen)))


def _collapse(nets: Iterable[Network]) -> tuple[Network, ...]:
    """Non-overlapping, merged, sorted: what an nftables interval set accepts."""
    nets = list(nets)
    v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
    return (*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6))


def _subtract(nets: Iterable[Network], holes: Iterable[Network]) -> tuple[Network, ...]:
    """``nets`` without the addresses in ``holes``, as networks."""
    out = list(nets)
    for hole in holes:
        rest: list[Network] = []
        for net in out:
            if net.version != hole.version or not net.overlaps(hole):
                rest.append(net)
            elif not _within(net, hole):
                rest.extend(_exclude(net, hole))
        out = rest
    return _collapse(out)


def _exclude(net: Network, hole: Network) -> list[Network]:
    if isinstance(net, ipaddress.IPv4Network) and isinstance(hole, ipaddress.IPv4Network):
        return list(net.address_exclude(hole))
    if isinstance(net, ipaddress.IPv6Network) and isinstance(hole, ipaddress.IPv6Network):
        return list(net.address_exclude(hole))
    return [net]


def _within(net: Network, outer: Network) -> bool:
    if isinstance(net, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return net.subnet_of(outer)
    if isinstance(net, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return net.subnet_of(outer)
    return False


def _where(net: Network, ranges: Iterable[ProtectedRange]) -> ProtectedRange | None:
    return next((r for r in ranges if r.network.overlaps(net)), None)


@dataclass(frozen=True)
class ExitPolicy:
    """The owner's exit policy. Immutable; validated (and normalised) at construction.

    ``allow`` opens holes in the allowable ``protected`` ranges, never in martians,
    the router's own addresses or its LAN subnets; ``deny`` always wins.
    """

    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    blocked_ports: tuple[tuple[str, int], ...] = DEFAULT_BLOCKED_PORTS
    dns: ipaddress.IPv4Address | None = None
    protected: tuple[ProtectedRange, ...] = DEFAULT_PROTECTED

    def __post_init__(self) -> None:
        for flag, nets in (("--allow", self.allow), ("--deny", self.deny)):
            for net in nets:
                if not isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network):
                    raise LocalError(f"bad {flag} {net!r}: not a network")
        if not all(isinstance(r, ProtectedRange) for r in self.protected):
            raise LocalError("protected ranges must be ProtectedRange values")
        martians = [r for r in self.protected if not r.allowable]
        for net in self.allow:
            if any(_within(net, r.network) for r in martians):
                name = (_where(net, martians) or martians[0]).name
                raise LocalError(
                    f"bad --allow {net}: {name} addresses are never forwarded",
                    "allow opens private, shared, reserved or documentation ranges only",
                )
            if _where(net, self.protected) is None:
                raise LocalError(
                    f"--allow {net} opens nothing: it is not in a protected range",
                    "public addresses are reachable already; use --deny to close some",
                )
        ports = set()
        for entry in self.blocked_ports:
            if (
                not isinstance(entry, tuple)
                or len(entry) != 2
                or entry[0] not in PROTOCOLS
                or isinstance(entry[1], bool)
                or not isinstance(entry[1], int)
                or not 1 <= entry[1] <= 65535
            ):
                raise LocalError(f"bad --block-port {entry!r}", "give PROTO/PORT, e.g. tcp/25")
            ports.add(entry)
        if self.dns is not None:
            if not isinstance(self.dns, ipaddress.IPv4Address):
                raise LocalError(
                    f"bad --dns {self.dns!r}: not an IPv4 address",
                    "the relay gives clients IPv4 only; give an IPv4 resolver",
                )
            for proto in PROTOCOLS:
                if (proto, DNS_PORT) in ports:
                    raise LocalError(
                        f"--dns {self.dns} with --block-port {proto}/{DNS_PORT}: DNS cannot pass",
                        "drop one of the two",
                    )
            dns_net = ipaddress.ip_network(self.dns)
            if any(_within(dns_net, n) for n in self.deny):
                raise LocalError(f"--dns {self.dns} is in a --deny network", "drop one of the two")
            if any(_within(dns_net, n) for n in self.closed):
                where = _where(dns_net, self.protected)
                raise LocalError(
                    f"--dns {self.dns} is in a protected range"
                    f" ({where.name if where else 'protected'})",
                    "give a public resolver (or --allow its range if you mean it)",
                )
        object.__setattr__(self, "allow", _sorted_unique(self.allow))
        object.__setattr__(self, "deny", _sorted_unique(self.deny))
        object.__setattr__(self, "blocked_ports", tuple(sorted(ports)))

    @property
    def closed(self) -> tuple[Network, ...]:
        """The protected ranges left closed: martians, plus allowable ranges minus ``allow``."""
        martians = [r.network for r in self.protected if not r.allowable]
        allowable = [r.network for r in self.protected if r.allowable]
        return _collapse([*martians, *_subtract(allowable, self.allow)])

    @classmethod
    def from_flags(
        cls,
        *,
        allow: Sequence[str] = (),
        deny: Sequence[str] = (),
        block_ports: Sequence[str] | None = None,
        dns: str | None = None,
    ) -> ExitPolicy:
        """From the CLI's strings. ``block_ports`` None keeps the default; "none" clears."""
        blocked: list[tuple[str, int]] = list(DEFAULT_BLOCKED_PORTS)
        for text in block_ports or ():
            if text.strip().lower() == "none":
                blocked.clear()
            else:
                blocked.append(parse_port(text))
        return cls(
            allow=tuple(parse_network(t, "--allow") for t in allow),
            deny=tuple(parse_network(t, "--deny") for t in deny),
            blocked_ports=tuple(blocked),
            dns=None if dns is None else _parse_dns(dns),
        )


DEFAULT_EXIT_POLICY: Final = ExitPolicy()


def parse_network(text: str, flag: str) -> Network:
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError as exc:
        try:
            meant = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise LocalError(
                f"bad {flag} {text!r}: {exc}", "give a network like 10.0.0.0/8 or an address"
            ) from None
        raise LocalError(f"bad {flag} {text!r}: host bits set", f"did you mean {meant}?") from None


def parse_port(text: str) -> tuple[str, int]:
    proto, _, port = text.strip().lower().partition("/")
    if proto not in PROTOCOLS or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise LocalError(f"bad --block-port {text!r}", "give PROTO/PORT, e.g. tcp/25, or none")
    return proto, int(port)


def _parse_dns(text: str) -> ipaddress.IPv4Address:
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        raise LocalError(f"bad --dns {text!r}", "give a resolver's IPv4 address") from None
    if not isinstance(address, ipaddress.IPv4Address):
        raise LocalError(
            f"bad --dns {text!r}: not an IPv4 address",
            "the relay gives clients IPv4 only; give an IPv4 resolver",
        )
    return address


# ---- the host: the router's own addresses and its LAN


@dataclass(frozen=True)
class HostNetworks:
    lan_networks: tuple[Network, ...]
    router_addresses: tuple[Address, ...]


def host_networks(
    addresses: list[dict[str, Any]],
    default_route_ifnames: Collection[str],
    wg_ifname: str,
    protected: Iterable[ProtectedRange] = DEFAULT_PROTECTED,
) -> HostNetworks:
    """From ``ip -j addr`` output: every address but the tunnel's and loopback's is
    the router's; every connected subnet on the other interfaces is LAN.

    On the default route's interface too, a connected subnet inside a protected
    range is LAN: a relay behind another home router (double NAT, or a Pi on the
    home LAN) has its home network there, and ``--allow 192.168.0.0/16`` must not
    open it. A public uplink subnet is the ISP's, and stays as the policy says.
    """
    protected_nets = [r.network for r in protected]
    router: set[Address] = set()
    lan: set[Network] = set()
    for link in addresses:
        ifname = str(link.get("ifname", ""))
        if ifname in {wg_ifname, "lo"} or link.get("link_type") == "loopback":
            continue
        for info in link.get("addr_info", []):
            if info.get("family") not in {"inet", "inet6"} or "local" not in info:
                continue
            local = ipaddress.ip_address(info["local"])
            router.add(local)
            prefix = info.get("prefixlen", local.max_prefixlen)
            # a point-to-point address's subnet is the peer's
            base = info.get("address", info["local"])
            subnet = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
            if ifname not in default_route_ifnames or any(
                _within(subnet, p) for p in protected_nets
            ):
                lan.add(subnet)
    return HostNetworks(
        lan_networks=_collapse(lan),
        router_addresses=tuple(sorted(router, key=lambda a: (a.version, int(a)))),
    )


def default_route_ifnames(routes: list[dict[str, Any]]) -> set[str]:
    """Interfaces of ``ip -j route show default`` (multipath included)."""
    names: set[str] = set()
    for route in routes:
        for hop in [route, *route.get("nexthops", [])]:
            if "dev" in hop:
                names.add(str(hop["dev"]))
    return names


async def _ip_json(*args: str, missing_ok: bool = False) -> list[dict[str, Any]]:
    try:
        proc = await asyncio.create_subprocess_exec(
            "ip",
            "-j",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise LocalError("ip not found", "install iproute2: `apt-get install iproute2`") from None
    out, err = await proc.communicate()
    if proc.returncode != 0:
        if missing_ok:  # e.g. IPv6 compiled out
            return []
        line = err.decode(errors="replace").strip().splitlines()
        raise LocalError(f"`ip {' '.join(args)}` failed: {line[0] if line else proc.returncode}")
    data = json.loads(out or b"[]")
    return data if isinstance(data, list) else []


def parse_counters(nft_json: bytes | str) -> dict[str, int]:
    """Packets per named counter, from ``nft -j list counters table ...``."""
    try:
        data = json.loads(nft_json or b"{}")
    except ValueError:
        return {}
    out: dict[str, int] = {}
    items = data.get("nftables", []) if isinstance(data, dict) else []
    for item in items if isinstance(items, list) else []:
        counter = item.get("counter") if isinstance(item, dict) else None
        if isinstance(counter, dict) and isinstance(counter.get("packets"), int):
            out[str(counter.get("name", ""))] = counter["packets"]
    return out


async def _nft_list(*what: str) -> bytes | None:
    """``nft -j list WHAT``'s output, or None if nft or the object is not there."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "nft",
            "-j",
            "list",
            *what,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except FileNotFoundError:
        return None
    out, _ = await proc.communicate()
    return out if proc.returncode == 0 else None


async def read_counters(table: str = TABLE) -> dict[str, int]:
    """This table's named counters (packets), or {} if it is not there."""
    family, _, name = table.partition(" ")
    out = await _nft_list("counters", "table", family, name)
    return parse_counters(out) if out is not None else {}


async def read_flow_set(table: str = TABLE) -> str:
    """``nft -j list set`` of the mesh flow counters (JSON text), or "" if absent."""
    family, _, name = table.partition(" ")
    out = await _nft_list("set", family, name, FLOWS_SET)
    return out.decode(errors="replace") if out is not None else ""


async def discover_host_networks(wg_ifname: str) -> HostNetworks:
    """The router's addresses and LAN subnets, as they are now (see ``host_networks``)."""
    addresses = await _ip_json("addr", "show")
    routes = await _ip_json("-4", "route", "show", "default")
    routes += await _ip_json("-6", "route", "show", "default", missing_ok=True)
    return host_networks(addresses, default_route_ifnames(routes), wg_ifname)


# ---- the ruleset


@dataclass(frozen=True)
class DropSets:
    """Forwarded destinations dropped, by reason; each collapsed, both families."""

    router: tuple[Network, ...]
    lan: tuple[Network, ...]
    deny: tuple[Network, ...]
    protected: tuple[Network, ...]


def drop_sets(
    policy: ExitPolicy,
    *,
    lan_networks: Iterable[Network],
    router_addresses: Iterable[Address],
) -> DropSets:
    return DropSets(
        router=_collapse(ipaddress.ip_network(a) for a in router_addresses),
        lan=_collapse(lan_networks),
        deny=_collapse(policy.deny),
        protected=policy.closed,
    )


def _set(
    name: str,
    kind: str,
    elements: Iterable[object],
    *,
    interval: bool = True,
    merge: bool = False,
) -> str:
    flags = " flags interval;" if interval else ""
    if merge:
        flags += " auto-merge;"  # overlapping elements (a /128 inside a /64) are fine
    items = ", ".join(str(e) for e in elements)
    body = f" elements = {{ {items} }};" if items else ""
    return f"    set {name} {{ type {kind};{flags}{body} }}\n"


def _family(nets: Iterable[Network], version: int) -> list[Network]:
    return [n for n in nets if n.version == version]


@dataclass(frozen=True)
class MeshRules:
    """What a mesh relay adds to its table: links named ``{link_prefix}{slot}``
    carry only sources routing knows (``sources``, kept current with
    ``mesh_sources_update``) and transit between each other; its clients
    (``client_prefix``, on the access interface) may send UDP into the mesh,
    their end-to-end WireGuard sessions, and get it back."""

    link_prefix: str
    address: ipaddress.IPv6Address  # the relay's own mesh address
    client_prefix: ipaddress.IPv6Network
    mesh_range: ipaddress.IPv6Network
    sources: frozenset[ipaddress.IPv6Network]


def mesh_sources_update(sources: Iterable[ipaddress.IPv6Network]) -> str:
    """``nft -f`` input replacing the mesh source set in one transaction."""
    elements = ", ".join(str(n) for n in sorted(sources))
    body = f"add element {TABLE} mesh_sources {{ {elements} }}\n" if elements else ""
    return f"flush set {TABLE} mesh_sources\n{body}"


def exit_ruleset(
    wg_ifname: str,
    pool: ipaddress.IPv4Network,
    policy: ExitPolicy,
    *,
    lan_networks: Iterable[Network],
    router_addresses: Iterable[Address],
    client_services: tuple[tuple[str, int], ...] = (),
    forward: bool = True,
    mesh: MeshRules | None = None,
) -> str:
    """The whole table, as ``nft -f`` input. ``client_services`` (proto, port) stay
    open to clients on the tunnel gateway address. With ``forward`` off (a relay
    that is no exit) clients' traffic is not forwarded anywhere: a home router
    usually forwards already, and its LAN must stay closed all the same. With
    ``mesh``, see ``MeshRules``."""
    if not _IFNAME_RE.fullmatch(wg_ifname):
        raise LocalError(f"bad interface name {wg_ifname!r}")
    if mesh is not None and not _IFNAME_RE.fullmatch(mesh.link_prefix):
        raise LocalError(f"bad interface name {mesh.link_prefix!r}")
    for proto, port in client_services:
        if proto not in PROTOCOLS or isinstance(port, bool) or not 1 <= port <= 65535:
            raise LocalError(f"bad client service {proto}/{port}")
    sets = drop_sets(policy, lan_networks=lan_networks, router_addresses=router_addresses)
    if policy.dns is not None and (
        any(policy.dns in n for n in sets.router) or any(policy.dns in n for n in sets.lan)
    ):
        raise LocalError(
            f"--dns {policy.dns} is this router or on its LAN, which clients may not reach",
            "give a public resolver",
        )
    gateway = pool.network_address + 1  # relay.pool.AddressPool.gateway
    wg = f'iifname "{wg_ifname}"'

    counters = dict(COUNTERS)
    if not forward:
        counters["no_exit"] = "this relay is not an exit"
    if policy.dns is not None:
        counters["dns_redirected"] = "clients' DNS sent to --dns"
    mesh_input = mesh_forward = ""
    if mesh is not None:
        counters["mesh_spoofed"] = "mesh link source that routing does not know"
        links = f'iifname "{mesh.link_prefix}*"'
        spoofed = (
            f"        {links} ip6 saddr != @mesh_sources counter name mesh_spoofed drop"
            ' comment "mesh source that routing does not know"\n'
        )
        mesh_input = spoofed + (
            f"        {wg} ip6 saddr {mesh.client_prefix} ip6 daddr {mesh.address}"
            ' icmpv6 type echo-request accept comment "clients check their entry is alive"\n'
        )
        mesh_forward = (
            spoofed
            + f"        ip6 daddr {mesh.mesh_range} update @{FLOWS_SET} {{ ip6 saddr . ip6 daddr }}"
            ' comment "bytes per flow: what this relay countersigns on a path (relay.paths)"\n'
            + f'        {links} oifname "{mesh.link_prefix}*" accept comment "mesh transit"\n'
            + f'        {links} oifname "{wg_ifname}" ip6 daddr {mesh.client_prefix}'
            ' meta l4proto { udp, ipv6-icmp } accept comment "to our clients, from the mesh"\n'
            + f"        {wg} ip6 saddr {mesh.client_prefix} ip6 daddr {mesh.mesh_range}"
            f' oifname "{mesh.link_prefix}*" meta l4proto {{ udp, ipv6-icmp }} accept'
            ' comment "clients\' end-to-end sessions into the mesh: ciphertext only"\n'
        )
    declarations = "".join(
        f'    counter {name} {{ comment "{text}"; }}\n' for name, text in counters.items()
    )
    for name, nets in (
        ("router", sets.router),
        ("lan", sets.lan),
        ("deny", sets.deny),
        ("protected", sets.protected),
    ):
        declarations += _set(f"{name}4", "ipv4_addr", _family(nets, 4))
        declarations += _set(f"{name}6", "ipv6_addr", _family(nets, 6))
    for proto in PROTOCOLS:
        ports = [port for p, port in policy.blocked_ports if p == proto]
        declarations += _set(f"blocked_{proto}", "inet_service", ports, interval=False)
    if mesh is not None:
        declarations += _set("mesh_sources", "ipv6_addr", sorted(mesh.sources), merge=True)
        declarations += (
            f"    set {FLOWS_SET} {{ type ipv6_addr . ipv6_addr; size {MAX_FLOWS};"
            " flags dynamic; counter; }\n"
        )

    def drop(match: str, counter: str, comment: str | None = None) -> str:
        return (
            f"        {' '.join(filter(None, (wg, match)))} counter name {counter} drop"
            f' comment "{comment or COUNTERS[counter]}"\n'
        )

    services = "".join(
        f"        {wg} ip daddr {gateway} {proto} dport {port} accept\n"
        for proto, port in client_services
    )
    destinations = ""
    for name, counter in (
        ("router", "to_router"),
        ("lan", "to_lan"),
        ("deny", "denied"),
        ("protected", "protected"),
    ):
        destinations += drop(f"ip daddr @{name}4", counter)
        destinations += drop(f"ip6 daddr @{name}6", counter)
    for proto in PROTOCOLS:
        destinations += drop(f"{proto} dport @blocked_{proto}", "blocked_port")

    if forward:
        exit_rules = (
            f"        {wg} counter accept\n"
            f'        oifname "{wg_ifname}" ct state established,related counter accept\n'
        )
        masquerade = f'        ip saddr {pool} oifname != "{wg_ifname}" counter masquerade\n'
    else:
        exit_rules = drop("", "no_exit", counters["no_exit"])
        masquerade = ""

    prerouting = ""
    if policy.dns is not None:
        prerouting = (
            "    chain prerouting {\n"
            "        type nat hook prerouting priority dstnat; policy accept;\n"
            + "".join(
                f"        {wg} ip saddr {pool} {proto} dport {DNS_PORT} counter name dns_redirected"
                f' dnat ip to {policy.dns} comment "clients\' DNS to --dns"\n'
                for proto in PROTOCOLS
            )
            + "    }\n"
        )

    return f"""\
table {TABLE}
delete table {TABLE}
table {TABLE} {{
{declarations}{prerouting}    chain input {{
        type filter hook input priority filter; policy accept;
{mesh_input}{drop(f"ip saddr != {pool}", "spoofed")}\
        {wg} ct state established,related accept
        {wg} ip daddr {gateway} icmp type echo-request accept
{services}{drop("", "to_router")}\
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
{mesh_forward}{drop(f"ip saddr != {pool}", "spoofed")}\
{drop("meta nfproto ipv6", "spoofed", "IPv6 source: the pool is IPv4")}\
{drop(f'oifname "{wg_ifname}"', "client_to_client")}\
        {wg} tcp flags syn / syn,rst tcp option maxseg size set rt mtu
        oifname "{wg_ifname}" tcp flags syn / syn,rst tcp option maxseg size set rt mtu
{destinations}\
{exit_rules}\
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
{masquerade}\
    }}
}}
"""
