"""Links, addresses, routes and policy rules over netlink (pyroute2).

Async all the way: pyroute2's synchronous IPRoute runs an event loop of its
own and cannot be called from inside the agent's. Every removal tolerates
"already gone", because teardown must finish even on a half-built host.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from meshvpn.errors import LocalError

FIB_RULE_INVERT = 0x2
MAIN_TABLE = 254


@dataclass(frozen=True)
class RuleSpec:
    """One policy rule, enough to add it and to delete exactly it again."""

    family: int  # socket.AF_INET or AF_INET6
    priority: int
    table: int
    fwmark: int | None = None
    invert: bool = False
    suppress_prefixlen: int | None = None
    dst: str | None = None  # "fd00::/8": only packets to there

    def kwargs(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "family": self.family,
            "priority": self.priority,
            "table": self.table,
        }
        if self.fwmark is not None:
            args["fwmark"] = self.fwmark
        if self.invert:
            args["flags"] = FIB_RULE_INVERT
        if self.suppress_prefixlen is not None:
            args["suppress_prefixlen"] = self.suppress_prefixlen
        if self.dst is not None:
            net = ipaddress.ip_network(self.dst)
            args["dst"] = str(net.network_address)
            args["dst_len"] = net.prefixlen
        return args

    def to_json(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "priority": self.priority,
            "table": self.table,
            "fwmark": self.fwmark,
            "invert": self.invert,
            "suppress_prefixlen": self.suppress_prefixlen,
            "dst": self.dst,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RuleSpec:
        return cls(
            family=int(data["family"]),
            priority=int(data["priority"]),
            table=int(data["table"]),
            fwmark=data.get("fwmark"),
            invert=bool(data.get("invert")),
            suppress_prefixlen=data.get("suppress_prefixlen"),
            dst=data.get("dst"),
        )


def _gone(exc: NetlinkError) -> bool:
    return exc.code in {errno.ENOENT, errno.ENODEV, errno.ESRCH, errno.EADDRNOTAVAIL}


class Netlink:
    def __init__(self) -> None:
        self._ip = AsyncIPRoute()
        # ifname -> index for this object's life (one batch of changes): a mesh
        # relay replacing many routes looked the same link up for each of them
        self._indexes: dict[str, int] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._ip.close()

    async def index(self, ifname: str) -> int | None:
        found = await self._ip.link_lookup(ifname=ifname)
        return int(found[0]) if found else None

    async def _require(self, ifname: str) -> int:
        idx = self._indexes.get(ifname)
        if idx is None:
            idx = await self.index(ifname)
            if idx is None:
                raise LocalError(f"network interface {ifname} does not exist")
            self._indexes[ifname] = idx
        return idx

    async def link_exists(self, ifname: str) -> bool:
        return await self.index(ifname) is not None

    async def link_up(self, ifname: str, mtu: int | None = None) -> None:
        idx = await self._require(ifname)
        kwargs: dict[str, Any] = {"index": idx, "state": "up"}
        if mtu:
            kwargs["mtu"] = mtu
        await self._ip.link("set", **kwargs)

    async def link_delete(self, ifname: str) -> bool:
        self._indexes.pop(ifname, None)
        idx = await self.index(ifname)
        if idx is None:
            return False
        try:
            await self._ip.link("del", index=idx)
        except NetlinkError as exc:
            if not _gone(exc):
                raise
            return False
        return True

    async def link_add(self, ifname: str, kind: str) -> None:
        self._indexes.pop(ifname, None)
        await self._ip.link("add", ifname=ifname, kind=kind)

    async def address_add(
        self, ifname: str, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    ) -> None:
        idx = await self._require(ifname)
        try:
            await self._ip.addr(
                "add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise

    async def address_delete(
        self, ifname: str, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    ) -> bool:
        idx = await self.index(ifname)
        if idx is None:
            return False
        try:
            await self._ip.addr(
                "del", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen
            )
        except NetlinkError as exc:
            if _gone(exc):
                return False
            raise
        return True

    async def route_add(
        self,
        dst: ipaddress.IPv4Network | ipaddress.IPv6Network,
        ifname: str,
        table: int = MAIN_TABLE,
    ) -> None:
        idx = await self._require(ifname)
        family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
        try:
            await self._ip.route("add", dst=str(dst), oif=idx, table=table, family=family)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise

    async def route_replace(
        self,
        dst: ipaddress.IPv4Network | ipaddress.IPv6Network,
        ifname: str,
        table: int = MAIN_TABLE,
    ) -> None:
        """Point ``dst`` at ``ifname``, whatever it pointed at before."""
        idx = await self._require(ifname)
        family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
        try:
            await self._ip.route("replace", dst=str(dst), oif=idx, table=table, family=family)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise
            self._indexes.pop(ifname, None)
            raise LocalError(f"network interface {ifname} does not exist") from None

    async def route_delete(
        self, dst: ipaddress.IPv4Network | ipaddress.IPv6Network, table: int = MAIN_TABLE
    ) -> bool:
        family = socket.AF_INET if dst.version == 4 else socket.AF_INET6
        try:
            await self._ip.route("del", dst=str(dst), table=table, family=family)
        except NetlinkError as exc:
            if _gone(exc):
                return False
            raise
        return True

    async def rule_add(self, rule: RuleSpec) -> None:
        try:
            await self._ip.rule("add", **rule.kwargs())
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise

    async def rule_delete(self, rule: RuleSpec) -> bool:
        try:
            await self._ip.rule("del", **rule.kwargs())
        except NetlinkError as exc:
            if _gone(exc):
                return False
            raise
        return True

    async def rule_priorities(self, family: int) -> set[int]:
        found = set()
        async for msg in await self._ip.get_rules(family=family):
            prio = msg.get_attr("FRA_PRIORITY")
            found.add(int(prio) if prio is not None else 0)
        return found

    async def routes_in_table(self, table: int, family: int) -> list[str]:
        out = []
        async for msg in await self._ip.get_routes(family=family, table=table):
            if msg.get_attr("RTA_TABLE") != table:
                continue
            default = "0.0.0.0" if family == socket.AF_INET else "::"  # noqa: S104 - a route, not a bind
            dst = msg.get_attr("RTA_DST") or default
            out.append(f"{dst}/{msg['dst_len']}")
        return out
