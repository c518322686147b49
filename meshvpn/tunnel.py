"""The client's full tunnel, as wg-quick builds it on Linux. Pure.

WireGuard marks its own UDP with ``fwmark``. Two policy rules then send
everything else into the tunnel without touching the main table:

1. ``lookup main suppress_prefixlength 0``: use main's specific routes (the
   LAN, the uplink's subnet) but ignore its default route;
2. ``not fwmark M lookup T``: everything unmarked goes to table T, whose
   only route is the default route into the tunnel.

The tunnel's own packets carry the mark, skip rule 2 and leave by main's
default route as before. Removing the two rules restores the host exactly.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Final

from meshvpn.netconf import MAIN_TABLE, RuleSpec

DEFAULT_FWMARK: Final = 51820
SUPPRESS_PRIORITY: Final = 32760
TUNNEL_PRIORITY: Final = 32761


@dataclass(frozen=True)
class FullTunnelPlan:
    ifname: str
    table: int
    rules: tuple[RuleSpec, ...]
    routes: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


def full_tunnel(ifname: str, fwmark: int = DEFAULT_FWMARK, *, ipv6: bool) -> FullTunnelPlan:
    families = [(socket.AF_INET, ipaddress.ip_network("0.0.0.0/0"))]
    if ipv6:
        families.append((socket.AF_INET6, ipaddress.ip_network("::/0")))
    rules: list[RuleSpec] = []
    for family, _ in families:
        rules.append(RuleSpec(family, SUPPRESS_PRIORITY, MAIN_TABLE, suppress_prefixlen=0))
        rules.append(RuleSpec(family, TUNNEL_PRIORITY, fwmark, fwmark=fwmark, invert=True))
    return FullTunnelPlan(ifname, fwmark, tuple(rules), tuple(net for _, net in families))
