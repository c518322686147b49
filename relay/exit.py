"""The exit's nftables table, as text. Pure.

One table, ``inet meshvpn``, owned by the agent and replaced atomically
(``nft -f`` of delete-and-define), so a reload never leaves a half ruleset and
teardown is one ``delete table``. Chains:

- forward: clients may only send from their pool (anti-spoofing), never to
  each other, and TCP MSS is clamped to the path MTU because the tunnel MTU
  is smaller than the uplink's and ICMP is often filtered on the way.
- postrouting: masquerade the pool to whatever uplink the route picks.
"""

from __future__ import annotations

import ipaddress

TABLE = "inet meshvpn"


def exit_ruleset(wg_ifname: str, pool: ipaddress.IPv4Network) -> str:
    return f"""\
table {TABLE}
delete table {TABLE}
table {TABLE} {{
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{wg_ifname}" ip saddr != {pool} counter drop comment "spoofed client source"
        iifname "{wg_ifname}" oifname "{wg_ifname}" counter drop comment "client to client"
        iifname "{wg_ifname}" tcp flags syn / syn,rst tcp option maxseg size set rt mtu
        oifname "{wg_ifname}" tcp flags syn / syn,rst tcp option maxseg size set rt mtu
        iifname "{wg_ifname}" counter accept
        oifname "{wg_ifname}" ct state established,related counter accept
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {pool} oifname != "{wg_ifname}" counter masquerade
    }}
}}
"""
