"""The client's kill switch (``meshvpn connect --lockdown``, the default).

Theory of operation
-------------------
While a client session lives, and after it died without ``meshvpn
disconnect``, one nftables table, ``inet meshvpn_lockdown`` (the relay's
exit is ``inet meshvpn``), lets nothing leave the host except through the
tunnel. Its base chains have policy drop, so no other table can accept a
packet around it: a drop in any base chain is final.

What may leave (output hook), first match wins:

1. loopback;
2. whatever is routed into the tunnel interface;
3. WireGuard's own UDP: carrying the tunnel's fwmark *and* addressed to a
   relay endpoint in ``@relays4``/``@relays6``;
4. while connecting only: TCP to the broker (``@broker4/6``) and UDP probes
   to the candidate relays' probe ports (``@probes4/6``), which go out before
   the tunnel exists;
5. DHCP (udp 68 -> 67, IPv4);
6. with ``--allow-lan``: the host's directly connected private subnets, and
   link-local multicast and broadcast (``@lan4/6``).

Everything else, IPv6 included, is dropped and counted. Forwarded packets may
only go into the tunnel (and its replies come back), or LAN to LAN with
``--allow-lan``. Input takes loopback, replies to what was let out
(established/related), the tunnel, WireGuard from the relays' endpoints, DHCP
replies and, with ``--allow-lan``, the LAN.

Life of the table (``ClientAgent.prepare``/``build``): it goes up first, before
the broker connection or any probe, with the broker in its set; the agent
fills the probe set once it knows the candidates; puts the chosen relay's
endpoint in ``@relays`` and empties the probe set; and once every route points
into the tunnel, empties the broker set too, so only WireGuard leaves. The
sets change in one ``nft -f`` transaction each (flush and add), so nothing is
open in between and the drop counters go on.

The table is in the footprint, recorded before it is created: a clean stop
lifts it. After a ``kill -9`` it stays, and the host stays blocked until
``meshvpn disconnect`` or the next ``connect``, which takes the table over in
place (``ClientOptions.kept_on_restart``): the new ruleset replaces the old one
atomically (``nft -f`` of delete-and-define), it is never deleted first.

Everything above the "host" section is pure.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from meshvpn.errors import LocalError
from meshvpn.footprint import Footprint, nft_apply, nft_delete_table, nft_table_exists

TABLE: Final = "inet meshvpn_lockdown"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Service = tuple[Address, int]  # an address and a port

# Named counters, one per hook's final drop.
COUNTERS: Final = {
    "out4": "IPv4 leaving the host outside the tunnel",
    "out6": "IPv6 leaving the host outside the tunnel",
    "forwarded": "forwarded outside the tunnel",
    "inbound": "unsolicited input",
}

# What --allow-lan may open, if the host is directly connected to it.
PRIVATE_RANGES: Final = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "fc00::/7",
        "fe80::/10",
    )
)
# With --allow-lan, also what finds things on the LAN: the local network
# control block (mDNS...), SSDP, broadcast, IPv6 link-local multicast (NDP too).
LAN_MULTICAST: Final = tuple(
    ipaddress.ip_network(n)
    for n in ("224.0.0.0/24", "239.255.255.250/32", "255.255.255.255/32", "ff02::/16")
)

DHCP_CLIENT_PORT: Final = 68
DHCP_SERVER_PORT: Final = 67

_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def _services(items: Iterable[Service], what: str) -> frozenset[Service]:
    out: set[Service] = set()
    for item in items:
        if (
            not isinstance(item, tuple)
            or len(item) != 2
            or not isinstance(item[0], ipaddress.IPv4Address | ipaddress.IPv6Address)
            or isinstance(item[1], bool)
            or not isinstance(item[1], int)
            or not 0 < item[1] < 65536
        ):
            raise LocalError(f"bad {what} for the lockdown: {item!r}")
        out.add((item[0], item[1]))
    return frozenset(out)


@dataclass(frozen=True)
class Allowed:
    """What may leave outside the tunnel, besides loopback, DHCP and (--allow-lan) the LAN.

    Immutable and validated; the agent makes a new one at each step."""

    relays: frozenset[Service] = field(default_factory=frozenset)  # WireGuard, marked UDP
    broker: frozenset[Service] = field(default_factory=frozenset)  # TCP, while connecting
    probes: frozenset[Service] = field(default_factory=frozenset)  # UDP, while connecting

    def __post_init__(self) -> None:
        for name in ("relays", "broker", "probes"):
            object.__setattr__(self, name, _services(getattr(self, name), name))


def _sorted(items: Iterable[Service]) -> list[Service]:
    return sorted(items, key=lambda s: (s[0].version, int(s[0]), s[1]))


def _collapse(nets: Iterable[Network]) -> tuple[Network, ...]:
    nets = list(nets)
    v4 = [n for n in nets if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in nets if isinstance(n, ipaddress.IPv6Network)]
    return (*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6))


def _elements(items: Iterable[object]) -> str:
    return ", ".join(str(i) for i in items)


def _set_contents(allowed: Allowed) -> dict[str, str]:
    """Set name -> its elements as nft text, for the sets the agent fills."""
    out: dict[str, str] = {}
    for name in ("relays", "broker", "probes"):
        services = _sorted(getattr(allowed, name))
        for version in (4, 6):
            out[f"{name}{version}"] = _elements(
                f"{addr} . {port}" for addr, port in services if addr.version == version
            )
    return out


def killswitch_ruleset(
    tunnel: str,
    fwmark: int,
    allowed: Allowed | None = None,
    *,
    lan: Iterable[Network] = (),
    access: str | None = None,
) -> str:
    """The whole table, as ``nft -f`` input that replaces any table of that name atomically.

    ``tunnel`` is the WireGuard interface, ``fwmark`` the mark WireGuard puts on
    its own UDP, ``lan`` the connected private subnets ``--allow-lan`` opens
    (``LAN_MULTICAST`` is added to them; empty: the LAN stays closed too).
    ``access`` is a multi-hop client's access link, as open as the tunnel."""
    if not _IFNAME_RE.fullmatch(tunnel):
        raise LocalError(f"bad interface name {tunnel!r}")
    if access is not None and not _IFNAME_RE.fullmatch(access):
        raise LocalError(f"bad interface name {access!r}")
    if isinstance(fwmark, bool) or not 0 < fwmark < 2**32:
        raise LocalError(
            f"the lockdown needs WireGuard's packets marked; bad fwmark {fwmark!r}",
            "use a fwmark from 1 to 2^32-1",
        )
    lan = tuple(lan)
    for net in lan:
        if not isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network):
            raise LocalError(f"bad LAN network for the lockdown: {net!r}")
    lan_nets = _collapse([*lan, *LAN_MULTICAST]) if lan else ()
    contents = _set_contents(allowed or Allowed())

    declarations = "".join(
        f'    counter {name} {{ comment "{text}"; }}\n' for name, text in COUNTERS.items()
    )
    for name, elements in contents.items():
        kind = "ipv4_addr" if name.endswith("4") else "ipv6_addr"
        body = f" elements = {{ {elements} }};" if elements else ""
        declarations += f"    set {name} {{ type {kind} . inet_service;{body} }}\n"
    for version in (4, 6):
        elements = _elements(n for n in lan_nets if n.version == version)
        body = f" elements = {{ {elements} }};" if elements else ""
        declarations += (
            f"    set lan{version} {{ type ipv{version}_addr; flags interval;{body} }}\n"
        )

    # Multi-hop: the end-to-end tunnel rides inside the access link to the entry.
    tun = f'{{ "{tunnel}", "{access}" }}' if access else f'"{tunnel}"'
    dhcp = f"meta nfproto ipv4 udp sport {DHCP_CLIENT_PORT} udp dport {DHCP_SERVER_PORT}"
    return f"""\
table {TABLE}
delete table {TABLE}
table {TABLE} {{
{declarations}\
    chain output {{
        type filter hook output priority filter; policy drop;
        oifname "lo" accept
        oifname {tun} accept
        meta mark {fwmark} ip daddr . udp dport @relays4 accept comment "WireGuard to the relay"
        meta mark {fwmark} ip6 daddr . udp dport @relays6 accept comment "WireGuard to the relay"
        ip daddr . tcp dport @broker4 accept comment "the broker, while connecting"
        ip6 daddr . tcp dport @broker6 accept comment "the broker, while connecting"
        ip daddr . udp dport @probes4 accept comment "probes, while connecting"
        ip6 daddr . udp dport @probes6 accept comment "probes, while connecting"
        {dhcp} accept comment "DHCP"
        ip daddr @lan4 accept comment "--allow-lan"
        ip6 daddr @lan6 accept comment "--allow-lan"
        meta nfproto ipv4 counter name out4 drop comment "{COUNTERS["out4"]}"
        counter name out6 drop comment "{COUNTERS["out6"]}"
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        oifname {tun} accept
        iifname {tun} ct state established,related accept
        ip saddr @lan4 ip daddr @lan4 accept comment "--allow-lan"
        ip6 saddr @lan6 ip6 daddr @lan6 accept comment "--allow-lan"
        counter name forwarded drop comment "{COUNTERS["forwarded"]}"
    }}
    chain input {{
        type filter hook input priority filter; policy drop;
        iifname "lo" accept
        ct state established,related accept
        iifname {tun} accept
        ip saddr . udp sport @relays4 accept comment "WireGuard from the relay"
        ip6 saddr . udp sport @relays6 accept comment "WireGuard from the relay"
        meta nfproto ipv4 udp sport {DHCP_SERVER_PORT} udp dport {DHCP_CLIENT_PORT} accept
        ip saddr @lan4 accept comment "--allow-lan"
        ip6 saddr @lan6 accept comment "--allow-lan"
        counter name inbound drop comment "{COUNTERS["inbound"]}"
    }}
}}
"""


def killswitch_sets(allowed: Allowed) -> str:
    """``nft -f`` input that sets the agent-filled sets to ``allowed``, in one transaction."""
    lines = []
    for name, elements in _set_contents(allowed).items():
        lines.append(f"flush set {TABLE} {name}")
        if elements:
            lines.append(f"add element {TABLE} {name} {{ {elements} }}")
    return "\n".join(lines) + "\n"


def private_subnets(addresses: list[dict[str, Any]], tunnel: str) -> tuple[Network, ...]:
    """From ``ip -j addr`` output: the connected subnets inside ``PRIVATE_RANGES``,
    on every interface but loopback and the tunnel."""
    found: list[Network] = []
    for link in addresses:
        if link.get("ifname") in {tunnel, "lo"} or link.get("link_type") == "loopback":
            continue
        for info in link.get("addr_info", []):
            if info.get("family") not in {"inet", "inet6"} or "local" not in info:
                continue
            local = ipaddress.ip_address(info["local"])
            subnet = ipaddress.ip_network(
                f"{info.get('address', local)}/{info.get('prefixlen', local.max_prefixlen)}",
                strict=False,
            )
            if any(
                subnet.version == p.version and subnet.subnet_of(p)  # type: ignore[arg-type]
                for p in PRIVATE_RANGES
            ):
                found.append(subnet)
    return _collapse(found)


def parse_counters(text: str) -> dict[str, int]:
    """Packets dropped per counter, from ``nft -j list counters table ...``."""
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    out: dict[str, int] = {}
    for item in data.get("nftables", []) if isinstance(data, dict) else []:
        counter = item.get("counter") if isinstance(item, dict) else None
        if isinstance(counter, dict) and counter.get("name") in COUNTERS:
            out[str(counter["name"])] = int(counter.get("packets", 0))
    return out


# ---- the host: thin async helpers around nft and the footprint


async def _run(*argv: str, stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise LocalError(f"{argv[0]} not found", "install nftables and iproute2") from None
    out, err = await proc.communicate(stdin)
    return proc.returncode or 0, out, err


async def discover_lan(tunnel: str) -> tuple[Network, ...]:
    """The host's directly connected private subnets, as they are now."""
    code, out, err = await _run("ip", "-j", "addr", "show")
    if code != 0:
        line = err.decode(errors="replace").strip().splitlines()
        raise LocalError(f"`ip -j addr show` failed: {line[0] if line else code}")
    data = json.loads(out or b"[]")
    return private_subnets(data if isinstance(data, list) else [], tunnel)


async def address_of(host: str, what: str) -> Address:
    """``host`` as one address, for the table: a name is resolved here, once.

    That lookup is the one packet that may precede the block (give an address to
    avoid it); under a lockdown a dead agent left, it may not get out at all."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        info = await asyncio.wait_for(loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM), 10)
    except (OSError, TimeoutError) as exc:
        raise LocalError(
            f"cannot resolve {what} {host!r} for the lockdown: {exc}",
            "give its address; if a previous session's lockdown blocks DNS,"
            " `meshvpn disconnect` lifts it",
        ) from None
    return ipaddress.ip_address(info[0][4][0])


async def apply_lockdown(footprint: Footprint, ruleset: str) -> None:
    """Put the table up (or replace it, atomically); listed in the footprint first."""
    footprint.will_create_nft_table(TABLE)
    await asyncio.to_thread(nft_apply, ruleset)


async def lock_down(
    footprint: Footprint,
    tunnel: str,
    fwmark: int,
    allowed: Allowed,
    allow_lan: bool,
    *,
    access: str | None = None,
) -> None:
    """The whole table, up or replacing a dead agent's, with ``allowed`` in its sets."""
    lan = await discover_lan(tunnel) if allow_lan else ()
    ruleset = killswitch_ruleset(tunnel, fwmark, allowed, lan=lan, access=access)
    await apply_lockdown(footprint, ruleset)


async def set_allowed(allowed: Allowed) -> None:
    """Change what the table lets out, in one transaction."""
    await asyncio.to_thread(nft_apply, killswitch_sets(allowed))


async def remove_lockdown(footprint: Footprint) -> bool:
    """Lift the block; the footprint forgets the table once it is gone."""
    removed = await asyncio.to_thread(nft_delete_table, TABLE)
    if TABLE in footprint.nft_tables and not await asyncio.to_thread(nft_table_exists, TABLE):
        footprint.nft_tables.remove(TABLE)
        footprint.save()
    return removed


def lockdown_left(footprint: Footprint) -> bool:
    """Whether a dead agent's lockdown still blocks this host."""
    return TABLE in footprint.nft_tables and nft_table_exists(TABLE)


async def dropped_counts() -> dict[str, int]:
    code, out, _ = await _run("nft", "-j", "list", "counters", "table", *TABLE.split())
    return parse_counters(out.decode(errors="replace")) if code == 0 else {}
