"""WireGuard device model and the reconcile plan, with no I/O.

We describe what a device *should* hold (``PeerSpec``s keyed by public key),
read what it *does* hold (``PeerState``, which adds counters), and compute the
smallest change between them (``plan_peers``). Backends only carry the plan
out. Counters and handshake times are observations, never part of equality,
so a reconcile never touches a healthy peer: its session and counters survive.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

    from meshvpn.identity import PublicKey

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Endpoint:
    host: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port out of range: {self.port}")

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """'192.0.2.1:51820' or '[fd00::1]:51820'."""
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"endpoint needs host:port, got {text!r}")
        return cls(ipaddress.ip_address(host.strip("[]")), int(port))

    def __str__(self) -> str:
        if self.host.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class PeerSpec:
    """What we want a peer to look like."""

    public_key: PublicKey
    allowed_ips: tuple[IPNetwork, ...] = ()
    endpoint: Endpoint | None = None
    keepalive: int = 0  # seconds; 0 is off

    def __post_init__(self) -> None:
        if not 0 <= self.keepalive < 65536:
            raise ValueError("keepalive must be 0..65535 seconds")
        object.__setattr__(self, "allowed_ips", tuple(sorted(set(self.allowed_ips), key=str)))


@dataclass(frozen=True)
class PeerState:
    """What a device reports for a peer."""

    spec: PeerSpec
    rx_bytes: int = field(default=0, compare=False)
    tx_bytes: int = field(default=0, compare=False)
    last_handshake: float | None = field(default=None, compare=False)  # unix seconds


@dataclass(frozen=True)
class DeviceState:
    public_key: PublicKey | None
    listen_port: int
    fwmark: int
    peers: Mapping[PublicKey, PeerState]


@dataclass(frozen=True)
class PeerPlan:
    add: tuple[PeerSpec, ...] = ()
    update: tuple[PeerSpec, ...] = ()
    remove: tuple[PublicKey, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.add or self.update or self.remove)


def _differs(want: PeerSpec, have: PeerSpec) -> bool:
    if want.allowed_ips != have.allowed_ips or want.keepalive != have.keepalive:
        return True
    # No wanted endpoint means "let WireGuard roam": a learned endpoint is fine.
    return want.endpoint is not None and want.endpoint != have.endpoint


def plan_peers(
    desired: Mapping[PublicKey, PeerSpec], actual: Mapping[PublicKey, PeerState]
) -> PeerPlan:
    add = tuple(spec for key, spec in sorted(desired.items()) if key not in actual)
    update = tuple(
        spec
        for key, spec in sorted(desired.items())
        if key in actual and _differs(spec, actual[key].spec)
    )
    remove = tuple(sorted(key for key in actual if key not in desired))
    return PeerPlan(add=add, update=update, remove=remove)
