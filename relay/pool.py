"""Tunnel address pool: which client holds which address. Pure.

The relay keeps the first usable address of its pool for itself (the
clients' next hop inside the tunnel); clients get /32s from the rest, lowest
free first. Admitting the same key twice returns the same address, so a
client that reconnects keeps its address and its open connections.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from meshvpn.errors import LocalError
from meshvpn.identity import PublicKey


class PoolExhaustedError(LocalError):
    pass


@dataclass
class AddressPool:
    network: ipaddress.IPv4Network
    leases: dict[PublicKey, ipaddress.IPv4Address] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.network.subnet_of(ipaddress.IPv4Network("100.64.0.0/10")):
            raise ValueError(f"tunnel pool {self.network} must lie inside 100.64.0.0/10")
        if self.network.num_addresses < 4:
            raise ValueError(f"tunnel pool {self.network} is too small (need at least a /30)")

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 1

    @property
    def free(self) -> int:
        """Addresses left to lease (all hosts but the gateway, minus the leased)."""
        return self.network.num_addresses - 3 - len(self.leases)

    def lease(self, key: PublicKey) -> ipaddress.IPv4Address:
        if key in self.leases:
            return self.leases[key]
        taken = set(self.leases.values())
        for addr in self.network.hosts():
            if addr != self.gateway and addr not in taken:
                self.leases[key] = addr
                return addr
        raise PoolExhaustedError(f"tunnel pool {self.network} is full")

    def release(self, key: PublicKey) -> None:
        self.leases.pop(key, None)
