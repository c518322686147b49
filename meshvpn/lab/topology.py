"""The lab's topology, as data.

Theory of operation: ``plan_lab`` turns (prefix, relays, clients, latencies)
into a frozen ``LabPlan`` and does no I/O. ``meshvpn.lab.lab`` applies the plan with
``ip``/``nft``; tests and the rest of meshvpn read addresses from it.

The addresses are fixed (other parts of meshvpn rely on them)::

    internet   203.0.113.80/32 on lo (web server, port 80), forwards, no default route;
               203.0.113.(100+i)/32 on lo: relay{i}'s public address, if it has a latency
      bk    ── 203.0.113.1/30 ↔ .2/30 wan0 ── broker (MQTT/TLS on 8883; the lab does not start it)
      r{i}  ── 198.51.100.(4(i-1)+1)/30 ↔ .(4(i-1)+2)/30 wan0 ── relay{i}
      c{j}  ── 192.0.2.(4(j-1)+1)/30    ↔ .(4(j-1)+2)/30 wan0 ── client{j}
    relay{i}   lan0 100.80.{i}.1/24 ↔ eth0 100.80.{i}.10/24 in lan{i};
               forwards and masquerades its LAN out of wan0 (nft table ``lab_home``)

A relay with a latency is reached at its public address, through a UDP
forwarder in the internet namespace (``meshvpn.lab.delay``) that adds half the
latency each way; its WAN address stays reachable directly, without delay.

Namespaces are ``{prefix}-{node}``. A prefix owns every namespace whose name
starts with ``{prefix}-`` followed by a node name; prefixes cannot contain ``-``,
so two prefixes never claim the same namespace.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import TypeVar

from meshvpn.errors import LocalError

MAX_RELAYS = 62
MAX_CLIENTS = 62
PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,9}")
NODE_RE = re.compile(r"internet|broker|(?:relay|lan|client)[1-9][0-9]*")
IFNAMSIZ = 15  # usable bytes of a Linux interface name

WEB_ADDR = IPv4Address("203.0.113.80")
WEB_PORT = 80
BROKER_NET = IPv4Network("203.0.113.0/30")  # .1 internet side, .2 the broker
BROKER_PORT = 8883  # MQTT over TLS
BROKER_UPSTREAM_IFACE = "bk"
PUBLIC_BASE = IPv4Address("203.0.113.100")  # relay{i}'s public address is PUBLIC_BASE + i
DELAY_PORTS = (51820, 51821)  # what a relay's forwarder forwards: WireGuard, the agent's probe
MAX_LATENCY_MS = 10_000.0
RELAY_WAN_NET = IPv4Network("198.51.100.0/24")
CLIENT_UPLINK_NET = IPv4Network("192.0.2.0/24")
WEB_NET = IPv4Network("203.0.113.0/24")
LAN_NET = IPv4Network("100.64.0.0/10")  # shared address space; LANs are 100.80.{i}.0/24
# Everything a lab namespace may have a route to (besides loopback).
LAB_RANGES = (CLIENT_UPLINK_NET, RELAY_WAN_NET, WEB_NET, LAN_NET)

WAN_IFACE = "wan0"
LAN_IFACE = "lan0"
LAN_HOST_IFACE = "eth0"
LOOPBACK = "lo"
NAT_TABLE = "lab_home"


class Role(enum.Enum):
    INTERNET = "internet"
    BROKER = "broker"
    RELAY = "relay"
    LAN = "lan"
    CLIENT = "client"


@dataclass(frozen=True)
class IfaceAddr:
    iface: str
    addr: IPv4Interface


@dataclass(frozen=True)
class NodePlan:
    """What every namespace needs, whatever its role."""

    name: str
    netns: str
    role: Role
    addrs: tuple[IfaceAddr, ...]
    gateway: IPv4Address | None
    forwarding: bool

    @property
    def ifaces(self) -> tuple[str, ...]:
        """The node's veth ends (loopback excluded), in plan order."""
        seen: dict[str, None] = {}
        for a in self.addrs:
            if a.iface != LOOPBACK:
                seen[a.iface] = None
        return tuple(seen)


@dataclass(frozen=True)
class VethPlan:
    a_node: str
    a_iface: str
    b_node: str
    b_iface: str


@dataclass(frozen=True)
class InternetPlan:
    name: str
    netns: str
    web: IPv4Interface

    @property
    def web_addr(self) -> IPv4Address:
        return self.web.ip


@dataclass(frozen=True)
class BrokerPlan:
    """Where the control plane's MQTT broker runs; started by whoever uses the lab."""

    name: str
    netns: str
    upstream_iface: str  # bk on the internet side
    upstream: IPv4Interface
    wan_iface: str
    wan: IPv4Interface
    port: int

    @property
    def addr(self) -> IPv4Address:
        return self.wan.ip

    @property
    def gateway(self) -> IPv4Address:
        return self.upstream.ip


@dataclass(frozen=True)
class RelayPlan:
    index: int
    name: str
    netns: str
    upstream_iface: str  # its link's name on the internet side: r{i}
    upstream: IPv4Interface  # internet side of the WAN /30
    wan_iface: str
    wan: IPv4Interface
    lan_iface: str
    lan: IPv4Interface
    # With a latency: an address on the internet's lo, forwarded to ``wan`` with
    # latency_ms / 2 added each way. Both None without one.
    public: IPv4Interface | None = None
    latency_ms: float | None = None

    @property
    def wan_addr(self) -> IPv4Address:
        return self.wan.ip

    @property
    def public_addr(self) -> IPv4Address | None:
        return None if self.public is None else self.public.ip

    @property
    def gateway(self) -> IPv4Address:
        return self.upstream.ip

    @property
    def lan_addr(self) -> IPv4Address:
        return self.lan.ip

    @property
    def lan_net(self) -> IPv4Network:
        return self.lan.network


@dataclass(frozen=True)
class LanPlan:
    """The one host behind relay{index}."""

    index: int
    name: str
    netns: str
    iface: str
    host: IPv4Interface
    gateway: IPv4Address

    @property
    def addr(self) -> IPv4Address:
        return self.host.ip


@dataclass(frozen=True)
class ClientPlan:
    index: int
    name: str
    netns: str
    upstream_iface: str  # c{j} on the internet side
    upstream: IPv4Interface
    wan_iface: str
    uplink: IPv4Interface

    @property
    def uplink_addr(self) -> IPv4Address:
        return self.uplink.ip

    @property
    def gateway(self) -> IPv4Address:
        return self.upstream.ip


@dataclass(frozen=True)
class LabPlan:
    prefix: str
    internet: InternetPlan
    broker: BrokerPlan
    relays: tuple[RelayPlan, ...]
    lans: tuple[LanPlan, ...]
    clients: tuple[ClientPlan, ...]
    nodes: tuple[NodePlan, ...]
    veths: tuple[VethPlan, ...]

    @property
    def web_addr(self) -> IPv4Address:
        return self.internet.web_addr

    @property
    def web_port(self) -> int:
        return WEB_PORT

    @property
    def web_url(self) -> str:
        return f"http://{self.web_addr}"

    def relay(self, i: int) -> RelayPlan:
        return _pick(self.relays, i, "relay")

    def lan(self, i: int) -> LanPlan:
        return _pick(self.lans, i, "lan")

    def client(self, j: int) -> ClientPlan:
        return _pick(self.clients, j, "client")

    def node(self, name: str) -> NodePlan:
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes)
        raise LocalError(f"lab {self.prefix} has no node {name!r}", f"known nodes: {known}")

    def netns(self, name: str) -> str:
        return self.node(name).netns


_T = TypeVar("_T", RelayPlan, LanPlan, ClientPlan)


def _pick(items: tuple[_T, ...], i: int, kind: str) -> _T:
    if not 1 <= i <= len(items):
        raise LocalError(f"no {kind}{i} in this lab", f"it has {kind}1..{kind}{len(items)}")
    return items[i - 1]


def validate_prefix(prefix: str) -> str:
    if not PREFIX_RE.fullmatch(prefix):
        raise LocalError(
            f"bad lab prefix {prefix!r}",
            "use 1-10 lowercase letters or digits, starting with a letter",
        )
    return prefix


def netns_name(prefix: str, node: str) -> str:
    return f"{prefix}-{node}"


def owns_netns(prefix: str, netns: str) -> bool:
    """Whether ``netns`` is a name a lab with ``prefix`` would make."""
    head, sep, node = netns.partition("-")
    return head == prefix and sep == "-" and NODE_RE.fullmatch(node) is not None


def _slash30(net: IPv4Network, n: int) -> tuple[IPv4Interface, IPv4Interface]:
    """Both ends of /30 subnet number ``n`` of ``net``: (router side .1, host side .2)."""
    base = int(net.network_address) + 4 * n
    return IPv4Interface((base + 1, 30)), IPv4Interface((base + 2, 30))


def validate_latencies(
    relays: int, latency_ms: Sequence[float | None] | None
) -> tuple[float | None, ...]:
    """One latency (ms, or None for none) per relay."""
    if latency_ms is None:
        return (None,) * relays
    if isinstance(latency_ms, str | bytes) or len(latency_ms) != relays:
        raise LocalError(
            f"latency_ms needs one entry per relay ({relays}), got {latency_ms!r}",
            "e.g. latency_ms=[60, 5] for two relays",
        )
    out: list[float | None] = []
    for ms in latency_ms:
        if ms is None:
            out.append(None)
            continue
        if isinstance(ms, bool) or not isinstance(ms, int | float) or not math.isfinite(ms):
            raise LocalError(f"latency {ms!r} is not a number of milliseconds")
        if not 0 <= ms <= MAX_LATENCY_MS:
            raise LocalError(f"latency {ms} ms is outside 0..{MAX_LATENCY_MS:g} ms")
        out.append(float(ms))
    return tuple(out)


def plan_lab(
    prefix: str,
    relays: int,
    clients: int,
    latency_ms: Sequence[float | None] | None = None,
) -> LabPlan:
    """The lab's plan. ``latency_ms[i-1]`` is relay{i}'s added round trip (see module doc)."""
    validate_prefix(prefix)
    if not 1 <= relays <= MAX_RELAYS:
        raise LocalError(f"a lab has 1..{MAX_RELAYS} relays, not {relays}")
    if not 0 <= clients <= MAX_CLIENTS:
        raise LocalError(f"a lab has 0..{MAX_CLIENTS} clients, not {clients}")
    latencies = validate_latencies(relays, latency_ms)

    internet = InternetPlan("internet", netns_name(prefix, "internet"), IPv4Interface(WEB_ADDR))
    broker_up, broker_wan = _slash30(BROKER_NET, 0)
    broker = BrokerPlan(
        name="broker",
        netns=netns_name(prefix, "broker"),
        upstream_iface=BROKER_UPSTREAM_IFACE,
        upstream=broker_up,
        wan_iface=WAN_IFACE,
        wan=broker_wan,
        port=BROKER_PORT,
    )
    relay_plans: list[RelayPlan] = []
    lan_plans: list[LanPlan] = []
    client_plans: list[ClientPlan] = []
    for i, latency in enumerate(latencies, start=1):
        upstream, wan = _slash30(RELAY_WAN_NET, i - 1)
        lan = IPv4Interface(f"100.80.{i}.1/24")
        public = None if latency is None else IPv4Interface(PUBLIC_BASE + i)
        relay_plans.append(
            RelayPlan(
                index=i,
                name=f"relay{i}",
                netns=netns_name(prefix, f"relay{i}"),
                upstream_iface=f"r{i}",
                upstream=upstream,
                wan_iface=WAN_IFACE,
                wan=wan,
                lan_iface=LAN_IFACE,
                lan=lan,
                public=public,
                latency_ms=latency,
            )
        )
        lan_plans.append(
            LanPlan(
                index=i,
                name=f"lan{i}",
                netns=netns_name(prefix, f"lan{i}"),
                iface=LAN_HOST_IFACE,
                host=IPv4Interface(f"100.80.{i}.10/24"),
                gateway=lan.ip,
            )
        )
    for j in range(1, clients + 1):
        upstream, uplink = _slash30(CLIENT_UPLINK_NET, j - 1)
        client_plans.append(
            ClientPlan(
                index=j,
                name=f"client{j}",
                netns=netns_name(prefix, f"client{j}"),
                upstream_iface=f"c{j}",
                upstream=upstream,
                wan_iface=WAN_IFACE,
                uplink=uplink,
            )
        )

    nodes = [
        NodePlan(
            name=internet.name,
            netns=internet.netns,
            role=Role.INTERNET,
            addrs=(
                IfaceAddr(LOOPBACK, internet.web),
                *(IfaceAddr(LOOPBACK, r.public) for r in relay_plans if r.public is not None),
                IfaceAddr(broker.upstream_iface, broker.upstream),
                *(IfaceAddr(r.upstream_iface, r.upstream) for r in relay_plans),
                *(IfaceAddr(c.upstream_iface, c.upstream) for c in client_plans),
            ),
            gateway=None,  # no default route: this is what seals the lab
            forwarding=True,
        ),
        NodePlan(
            name=broker.name,
            netns=broker.netns,
            role=Role.BROKER,
            addrs=(IfaceAddr(broker.wan_iface, broker.wan),),
            gateway=broker.gateway,
            forwarding=False,
        ),
    ]
    veths = [VethPlan(internet.name, broker.upstream_iface, broker.name, broker.wan_iface)]
    for r, h in zip(relay_plans, lan_plans, strict=True):
        nodes.append(
            NodePlan(
                name=r.name,
                netns=r.netns,
                role=Role.RELAY,
                addrs=(IfaceAddr(r.wan_iface, r.wan), IfaceAddr(r.lan_iface, r.lan)),
                gateway=r.gateway,
                forwarding=True,
            )
        )
        nodes.append(
            NodePlan(
                name=h.name,
                netns=h.netns,
                role=Role.LAN,
                addrs=(IfaceAddr(h.iface, h.host),),
                gateway=h.gateway,
                forwarding=False,
            )
        )
        veths.append(VethPlan(internet.name, r.upstream_iface, r.name, r.wan_iface))
        veths.append(VethPlan(r.name, r.lan_iface, h.name, h.iface))
    for c in client_plans:
        nodes.append(
            NodePlan(
                name=c.name,
                netns=c.netns,
                role=Role.CLIENT,
                addrs=(IfaceAddr(c.wan_iface, c.uplink),),
                gateway=c.gateway,
                forwarding=False,
            )
        )
        veths.append(VethPlan(internet.name, c.upstream_iface, c.name, c.wan_iface))

    return LabPlan(
        prefix=prefix,
        internet=internet,
        broker=broker,
        relays=tuple(relay_plans),
        lans=tuple(lan_plans),
        clients=tuple(client_plans),
        nodes=tuple(nodes),
        veths=tuple(veths),
    )
