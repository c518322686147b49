"""The relay mesh: WireGuard links to nearby relays, and routes over them.

Theory of operation
-------------------
Every node has a mesh address, an IPv6 ULA /128 derived from its identity
key, and originates that address's /64 (``mesh_prefix_of``): the relay's own
address and the addresses of the clients on its access interface
(``client_mesh_address``) all lie in it.

Links. A relay keeps one WireGuard interface per neighbour
(``{ifname}m{slot}``, listening on ``link_port_base + slot``), with the
neighbour as its only peer (allowed IPs ``::/0``: the interface is the
neighbour, the routing table decides what goes there). Which relays become
neighbours is decided by ``choose_neighbours`` (pure): the operator's fixed
list if there is one, else the ``k`` nearest by measured RTT among the
relays announced on the broker. A link is negotiated like a session: a
Noise-sealed, signed ``LinkRequest`` on the neighbour's session topic, a
``LinkGrant`` back, each naming the port of its own end. When both sides ask
at once, the request of the smaller node id wins (``crossed_request_wins``).
The routing protocol reacts to a silent neighbour within its hold time (its
routes go at once); the link itself, a wireguard-go and an interface, goes
only when the neighbour's announcement is gone (cleared by its last will, or
expired) while it is silent, or after ``LINK_GIVE_UP_S`` of silence. Tearing
the link down at the first silence made every scheduling hiccup of a loaded
host a link flap: both ends rebuilt interfaces, which loaded the host more.

Routes. ``meshvpn.routing.Router`` (pure, Babel-like) runs over the links on
UDP ``ROUTING_PORT``; on every change its table is reconciled into meshvpn's
own routing table ``MESH_TABLE``, looked up for ``MESH_RANGE`` only (one
policy rule), so the host's other routes are never touched. The prefixes
the router knows are also the only sources a mesh link may carry (nft set,
see ``relay.exit``; a prefix it lost leaves the set ``SOURCES_SHRINK_S``
later, so routing churn does not spawn ``nft`` at every change).

Multi-hop. A client reaches an exit several hops away by running its own
WireGuard session with the exit's mesh address *inside* its access link to
the entry: the entry and the transit relays forward only that ciphertext,
and the exit sees only the client's mesh source, never its underlay address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from meshvpn.agent import create_recorded, open_recorded
from meshvpn.clock import now_ms
from meshvpn.directory import Directory, Entry, reply_topic, session_topic
from meshvpn.errors import LocalError
from meshvpn.footprint import Footprint, write_sysctl
from meshvpn.handshake import PendingRequest, ReceivedRequest, open_request
from meshvpn.identity import (
    Identity,
    PublicKey,
    client_mesh_address,
    mesh_prefix_of,
    node_id_of,
)
from meshvpn.messages import (
    GRANTED,
    REFUSED_BAD,
    REFUSED_FULL,
    LinkGrant,
    LinkRequest,
    MessageError,
)
from meshvpn.mqtt import ControlLink
from meshvpn.netconf import Netlink, RuleSpec
from meshvpn.routing import (
    Neighbour,
    NeighbourLost,
    NeighbourState,
    Router,
    RoutesChanged,
    Send,
)
from meshvpn.wireguard.backend import BackendName, WireGuardDevice
from meshvpn.wireguard.model import Endpoint, PeerSpec

log = logging.getLogger("meshvpn.mesh")

MESH_RANGE: Final = ipaddress.IPv6Network("fd00::/8")
MESH_TABLE: Final = 51830
MESH_RULE_PRIORITY: Final = 5180  # before wg-quick style rules (they sit at 5190+)
ROUTING_PORT: Final = 6696  # Babel's port
LINK_MTU: Final = 1420
LINK_KEEPALIVE: Final = 5  # s; keeps NAT state and lets the link notice death
MAX_LINKS: Final = 16
LINK_TIMEOUT_S: Final = 5.0
SELECT_INTERVAL_S: Final = 5.0
LINK_GIVE_UP_S: Final = 30.0  # a link silent (or never answered) this long is removed
SOURCES_SHRINK_S: Final = 10.0  # a prefix routing lost stays an allowed source this long
RESELECT_INTERVAL_S: Final = 60.0
IPV6_FORWARDING: Final = "net.ipv6.conf.all.forwarding"

__all__ = [
    "MESH_RANGE",
    "Mesh",
    "MeshOptions",
    "choose_neighbours",
    "client_mesh_address",
    "crossed_request_wins",
    "mesh_prefix_of",
]


# ---- pure decisions -------------------------------------------------------------


def choose_neighbours(
    me: str,
    known: Iterable[str],
    rtt_ms: Mapping[str, float],
    *,
    k: int,
    fixed: frozenset[str] = frozenset(),
) -> frozenset[str]:
    """The relays this one wants links to.

    With a fixed list, exactly those of them that are announced; else the
    ``k`` nearest that answered a probe (ties by node id, so every relay
    breaks them the same way)."""
    known_set = frozenset(known) - {me}
    if fixed:
        return fixed & known_set
    answered = sorted((rtt, nid) for nid, rtt in rtt_ms.items() if nid in known_set)
    return frozenset(nid for _, nid in answered[:k])


def crossed_request_wins(mine: str, theirs: str) -> bool:
    """Both asked each other at once: is *their* request the one to answer?"""
    return theirs < mine


# ---- the adapter ----------------------------------------------------------------


@dataclass(frozen=True)
class MeshOptions:
    k: int = 3
    neighbours: frozenset[str] = frozenset()  # node ids; empty: the k nearest
    link_port_base: int = 51830
    max_links: int = MAX_LINKS


@dataclass
class _Link:
    node_id: str
    slot: int
    ifname: str
    port: int
    neighbour: PublicKey  # identity
    mesh_address: ipaddress.IPv6Address
    device: WireGuardDevice | None = None
    transport: asyncio.DatagramTransport | None = None
    up_since: float = field(default_factory=time.monotonic)
    silent_since: float | None = None  # when routing last found the neighbour silent


@dataclass
class _Pending:
    node_id: str
    slot: int
    pending: PendingRequest
    future: asyncio.Future[LinkGrant]


class _RoutingSocket(asyncio.DatagramProtocol):
    def __init__(self, mesh: Mesh, link: str) -> None:
        self.mesh = mesh
        self.link = link

    def datagram_received(self, data: bytes, _addr: tuple[str | Any, int]) -> None:
        self.mesh.on_routing_packet(self.link, data)


class Mesh:
    """Links and routes of one relay. Owned by the relay agent, which hands it
    the broker link, the directory's messages and the link requests."""

    def __init__(
        self,
        identity: Identity,
        opts: MeshOptions,
        *,
        ifname: str,
        backend: BackendName,
        state_dir: Path,
        footprint: Footprint,
        access_ifname: str,
        on_sources_changed: Callable[[frozenset[ipaddress.IPv6Network]], Awaitable[None]],
    ) -> None:
        self.identity = identity
        self.opts = opts
        self.ifname = ifname
        self.backend: BackendName = backend
        self.state_dir = state_dir
        self.footprint = footprint
        self.access_ifname = access_ifname
        self.on_sources_changed = on_sources_changed
        self.address = identity.mesh_address
        self.prefix = mesh_prefix_of(self.address)
        self.directory = Directory()
        self.link: ControlLink | None = None
        self.router = Router(self.address, [self.prefix], now_ms())
        self.links: dict[str, _Link] = {}  # by node id
        self.by_ifname: dict[str, _Link] = {}
        self.pending: dict[bytes, _Pending] = {}  # by reply token
        self.rtt_ms: dict[str, float] = {}
        self.installed: dict[ipaddress.IPv6Network, str] = {}
        self._routes_lock = asyncio.Lock()
        self.counters: dict[str, int] = {}
        self.wake = asyncio.Event()
        self._sources: frozenset[ipaddress.IPv6Network] = frozenset()
        self._sources_set_at = 0.0
        self._last_probe = 0.0
        self.events: list[str] = []  # one line per link event, newest last (status)

    @property
    def sources(self) -> frozenset[ipaddress.IPv6Network]:
        """What mesh links may carry now (the nft set's contents)."""
        return self._sources or frozenset({self.prefix})

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _event(self, line: str) -> None:
        log.info("%s", line)
        self.events = [*self.events[-19:], f"{time.strftime('%H:%M:%S')} {line}"]

    # ---- host setup

    async def build(self) -> None:
        self.footprint.will_set_sysctl(IPV6_FORWARDING)
        write_sysctl(IPV6_FORWARDING, "1")
        rule = RuleSpec(socket.AF_INET6, MESH_RULE_PRIORITY, MESH_TABLE, dst=str(MESH_RANGE))
        self.footprint.will_add_rule(rule)
        async with Netlink() as nl:
            await nl.rule_add(rule)
            # The relay's own address lives on its access interface; its clients'
            # addresses are the rest of its /64, behind that same interface.
            await nl.address_add(self.access_ifname, ipaddress.IPv6Interface(f"{self.address}/128"))
            await nl.route_replace(self.prefix, self.access_ifname, MESH_TABLE)

    # ---- the broker side: directory, link negotiation

    def on_announcement(self, topic: str, payload: bytes) -> None:
        reason = self.directory.offer(topic, payload, now_ms())
        if reason is None:
            self.wake.set()

    def want_reply(self, topic: str) -> bool:
        mine = self.identity.node_id
        return any(reply_topic(mine, t) == topic for t in self.pending)

    def on_reply(self, topic: str, payload: bytes) -> None:
        for token, p in self.pending.items():
            if reply_topic(self.identity.node_id, token) == topic:
                try:
                    grant = p.pending.read_link_grant(payload)
                except MessageError as exc:
                    self._count(f"bad-link-grant:{exc.reason}")
                    return
                if not p.future.done():
                    p.future.set_result(grant)
                return

    async def on_link_request(self, received: ReceivedRequest) -> LinkGrant:
        request = received.request
        assert isinstance(request, LinkRequest)  # noqa: S101 - the agent dispatched on type
        node_id = node_id_of(received.client_identity)
        entry = self.directory.entries.get(node_id)

        def refuse(status: int, reason: str) -> LinkGrant:
            self._count(f"link-refused:{reason}")
            return LinkGrant(request.nonce, status, reason, self.identity.wireguard_public, 0)

        if entry is None:
            return refuse(REFUSED_BAD, "not announced")
        if entry.announcement.wireguard_key != request.wireguard_key:
            return refuse(REFUSED_BAD, "WireGuard key differs from the announcement")
        mine = self.identity.node_id
        crossing = [p for p in self.pending.values() if p.node_id == node_id]
        if crossing and not crossed_request_wins(mine, node_id):
            return refuse(REFUSED_BAD, "crossed: take mine")
        for p in crossing:
            p.future.cancel()
        existing = self.links.get(node_id)
        if existing is not None:
            # The neighbour restarted and lost the link: rebuild our end.
            await self._remove_link(existing, "neighbour asked again")
        slot = self._free_slot()
        if slot is None:
            return refuse(REFUSED_FULL, "no free link slot")
        host = entry.announcement.endpoints[0][0]
        link = await self._create_link(
            node_id, slot, entry, Endpoint(host, request.link_port), request.wireguard_key
        )
        if link is None:
            return refuse(REFUSED_FULL, "link setup failed here")
        self._event(f"link up: {node_id} on {link.ifname} (asked by it)")
        return LinkGrant(request.nonce, GRANTED, "", self.identity.wireguard_public, link.port)

    async def _request_link(self, entry: Entry) -> None:
        assert self.link is not None  # noqa: S101
        slot = self._free_slot()
        if slot is None:
            return
        token = os.urandom(16)
        request = LinkRequest(
            relay=entry.signer,
            control_key=self.identity.control_public,
            wireguard_key=self.identity.wireguard_public,
            link_port=self.opts.link_port_base + slot,
            reply_token=token,
            nonce=os.urandom(16),
            issued_ms=now_ms(),
        )
        wire, pending = open_request(
            self.identity.identity_key,
            self.identity.control_key,
            entry.signer,
            entry.announcement.control_key,
            request,
        )
        future: asyncio.Future[LinkGrant] = asyncio.get_running_loop().create_future()
        self.pending[token] = _Pending(entry.node_id, slot, pending, future)
        try:
            if not await self.link.subscribe(reply_topic(self.identity.node_id, token)):
                return
            await self.link.publish(session_topic(entry.node_id), wire)
            try:
                grant = await asyncio.wait_for(future, LINK_TIMEOUT_S)
            except (TimeoutError, asyncio.CancelledError):
                if future.cancelled():
                    return  # their request crossed ours and won
                raise
        except TimeoutError:
            self._count("link-timeout")
            return
        finally:
            del self.pending[token]
            await self.link.unsubscribe(reply_topic(self.identity.node_id, token))
        if not grant.granted or grant.wireguard_key != entry.announcement.wireguard_key:
            self._count("link-refused-by-peer")
            log.debug("link to %s refused: %s", entry.node_id, grant.reason)
            return
        if entry.node_id in self.links:
            return
        host = entry.announcement.endpoints[0][0]
        link = await self._create_link(
            entry.node_id, slot, entry, Endpoint(host, grant.link_port), grant.wireguard_key
        )
        if link is not None:
            self._event(f"link up: {entry.node_id} on {link.ifname}")

    def _free_slot(self) -> int | None:
        used = {link.slot for link in self.links.values()} | {p.slot for p in self.pending.values()}
        return next((s for s in range(self.opts.max_links) if s not in used), None)

    # ---- links

    async def _create_link(
        self, node_id: str, slot: int, entry: Entry, endpoint: Endpoint, wg_key: PublicKey
    ) -> _Link | None:
        """Build a link's interface, routes and routing socket; None if the host
        would not (wireguard-go failing to start, the interface vanishing meanwhile):
        what was built is taken down again, counted and logged, and the neighbour is
        asked again at the next selection. It must not take the agent down."""
        name = f"{self.ifname}m{slot}"
        if len(name) > 15:
            raise LocalError(
                f"mesh interface name {name!r} is too long", "use a shorter --interface"
            )
        neighbour_addr = ipaddress.IPv6Address(entry.announcement.mesh_address)
        link = _Link(
            node_id,
            slot,
            name,
            self.opts.link_port_base + slot,
            entry.signer,
            neighbour_addr,
        )
        self.links[node_id] = link
        self.by_ifname[name] = link
        try:
            await self._build_link(link, endpoint, wg_key)
        except (LocalError, OSError) as exc:
            self._count("link-setup-failed")
            self.links.pop(node_id, None)
            self.by_ifname.pop(name, None)
            await self._take_down(link)
            self._event(f"link setup failed: {node_id} on {name} ({exc})")
            return None
        await self._reconcile_routes()  # its address becomes a source the links may carry
        self._apply(self.router.link_up(name, neighbour_addr, now_ms()))
        self.wake.set()
        return link

    async def _build_link(self, link: _Link, endpoint: Endpoint, wg_key: PublicKey) -> None:
        name, neighbour_addr = link.ifname, link.mesh_address
        log_path = self.state_dir / f"wireguard-go-{name}.log"
        device = await open_recorded(self.footprint, name, self.backend, log_path)
        link.device = device
        await create_recorded(self.footprint, device)
        await device.set_interface(self.identity.wireguard_key, link.port, 0)
        async with Netlink() as nl:
            await nl.address_add(name, ipaddress.IPv6Interface(f"{self.address}/128"))
            await nl.link_up(name, LINK_MTU)
            await nl.route_replace(ipaddress.IPv6Network(f"{neighbour_addr}/128"), name, MESH_TABLE)
        await device.reconcile({wg_key: PeerSpec(wg_key, (MESH_RANGE,), endpoint, LINK_KEEPALIVE)})
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, name.encode())
        sock.bind((str(self.address), ROUTING_PORT))
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _RoutingSocket(self, name), sock=sock
        )
        link.transport = transport

    async def _take_down(self, link: _Link) -> None:
        if link.transport is not None:
            link.transport.close()
        if link.device is not None:
            with contextlib.suppress(Exception):
                await link.device.destroy()
        async with Netlink() as nl:
            await nl.link_delete(link.ifname)

    async def _remove_link(self, link: _Link, why: str) -> None:
        self.links.pop(link.node_id, None)
        self.by_ifname.pop(link.ifname, None)
        self._apply(self.router.link_down(link.ifname, now_ms()))
        await self._take_down(link)
        self._event(f"link down: {link.node_id} on {link.ifname} ({why})")
        await self._reconcile_routes()

    # ---- routing

    def on_routing_packet(self, ifname: str, data: bytes) -> None:
        if ifname not in self.by_ifname:
            return
        self._apply(self.router.receive(ifname, data, now_ms()))

    def _apply(self, actions: list[Any]) -> None:
        for action in actions:
            if isinstance(action, Send):
                link = self.by_ifname.get(action.link)
                # a closed transport's socket is gone (sendto would hit None)
                if link is not None and link.transport and not link.transport.is_closing():
                    with contextlib.suppress(OSError):
                        link.transport.sendto(action.data, (str(link.mesh_address), ROUTING_PORT))
            elif isinstance(action, RoutesChanged):
                self.wake.set()
            elif isinstance(action, NeighbourLost):
                lost = self.by_ifname.get(action.link)
                if lost is not None:
                    lost.silent_since = time.monotonic()
                    self._event(f"neighbour silent: {lost.node_id} on {lost.ifname}")
                    self.wake.set()

    async def _reconcile_routes(self) -> None:
        # Called from the loop and from a link's creation: one pass at a time, or
        # two would delete the same route and the second would find it gone.
        async with self._routes_lock:
            await self._reconcile_routes_once()

    async def _reconcile_routes_once(self) -> None:
        desired: dict[ipaddress.IPv6Network, str] = {}
        for prefix, route in self.router.table().items():
            if route.link in self.by_ifname:
                desired[prefix] = route.link
        gone = [p for p in self.installed if p not in desired]
        moved = {p: link for p, link in desired.items() if self.installed.get(p) != link}
        if gone or moved:  # a netlink socket per pass costs more than the pass: only on change
            async with Netlink() as nl:
                for prefix in gone:
                    await nl.route_delete(prefix, MESH_TABLE)
                    self.installed.pop(prefix, None)
                for prefix, link in moved.items():
                    try:
                        await nl.route_replace(prefix, link, MESH_TABLE)
                    except LocalError:
                        continue  # the link went away meanwhile; the next pass fixes it
                    self.installed[prefix] = link
        # Neighbours' own addresses too: their hellos come before any route does.
        neighbours = {ipaddress.IPv6Network(f"{x.mesh_address}/128") for x in self.links.values()}
        sources = frozenset(desired) | neighbours | {self.prefix}
        if sources == self._sources:
            return
        # A new source is allowed at once (its traffic may flow now); one that went
        # waits: a neighbour found silent and heard again a moment later must not
        # cost two nft runs, and a route that went is dropped by routing anyway.
        now = time.monotonic()
        if sources <= self._sources and now - self._sources_set_at < SOURCES_SHRINK_S:
            return
        self._sources, self._sources_set_at = sources, now
        await self.on_sources_changed(sources)

    # ---- the loop

    async def run(self, link: ControlLink) -> None:
        self.link = link
        loop = asyncio.get_running_loop()
        last_select = 0.0
        requests: set[asyncio.Task[None]] = set()
        async with asyncio.TaskGroup() as tasks:
            try:
                while True:
                    timer = self.router.next_timer_ms()
                    wait = SELECT_INTERVAL_S
                    if timer is not None:
                        wait = min(wait, max(0.0, (timer - now_ms()) / 1000))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), wait)
                    self.wake.clear()
                    self._apply(self.router.tick(now_ms()))
                    await self._drop_dead_links()
                    await self._reconcile_routes()
                    if loop.time() - last_select >= SELECT_INTERVAL_S:
                        last_select = loop.time()
                        await self._select(tasks, requests)
            finally:
                for task in requests:
                    task.cancel()

    async def _drop_dead_links(self) -> None:
        """Remove the links whose neighbour is silent and gone from the directory, or
        silent (or never answered) for ``LINK_GIVE_UP_S``."""
        neighbours = self.router.neighbours()
        now = time.monotonic()
        for link in list(self.links.values()):
            nb = neighbours.get(link.ifname)
            if nb is not None and nb.state is NeighbourState.REACHABLE:
                link.silent_since = None
                continue
            quiet_s = now - (link.silent_since or link.up_since)
            if link.node_id not in self.directory.entries and link.silent_since is not None:
                await self._remove_link(link, "neighbour silent, announcement gone")
            elif quiet_s > LINK_GIVE_UP_S:
                await self._remove_link(link, f"neighbour silent for {quiet_s:.0f} s")

    async def _select(self, tasks: asyncio.TaskGroup, requests: set[asyncio.Task[None]]) -> None:
        now = now_ms()
        for gone in self.directory.expire(now):
            link = self.links.get(gone)
            if link is not None:
                await self._remove_link(link, "announcement expired")
        known = {nid for nid in self.directory.entries if nid != self.identity.node_id}
        if not self.opts.neighbours and (
            time.monotonic() - self._last_probe > RESELECT_INTERVAL_S
            or not (known <= set(self.rtt_ms))
        ):
            await self._probe(known)
        wanted = choose_neighbours(
            self.identity.node_id, known, self.rtt_ms, k=self.opts.k, fixed=self.opts.neighbours
        )
        asking = {p.node_id for p in self.pending.values()}
        for node_id in sorted(wanted - set(self.links) - asking):
            entry = self.directory.entries[node_id]
            task = tasks.create_task(self._request_link(entry))
            requests.add(task)
            task.add_done_callback(requests.discard)

    async def _probe(self, known: set[str]) -> None:
        from meshvpn.client import probe_all  # noqa: PLC0415 - shared prober, client-side module

        self._last_probe = time.monotonic()
        entries = [self.directory.entries[n] for n in sorted(known)]
        if entries:
            self.rtt_ms = await probe_all(entries, settle=False)

    async def close(self) -> None:
        for link in list(self.links.values()):
            if link.transport is not None:
                link.transport.close()
            if link.device is not None:
                with contextlib.suppress(Exception):
                    await link.device.destroy()
        self.links.clear()
        self.by_ifname.clear()

    async def link_bytes(self) -> dict[str, tuple[int, int]]:
        """(received, sent) on each link's WireGuard interface, by interface name."""
        out = {}
        for link in list(self.links.values()):
            if link.device is None:
                continue
            try:
                peers = (await link.device.state()).peers
            except (OSError, LocalError):
                continue  # the link is going away just now
            out[link.ifname] = (
                sum(p.rx_bytes for p in peers.values()),
                sum(p.tx_bytes for p in peers.values()),
            )
        return out

    def resolve(self, node_id: str) -> tuple[ipaddress.IPv6Address, dict[str, Any] | None]:
        """A relay's mesh address (from its announcement) and this relay's route to it:
        ``{"prefix", "via", "neighbour", "metric"}``, or None when there is none."""
        entry = self.directory.entries.get(node_id)
        if entry is None:
            raise LocalError(
                f"no relay {node_id} is announced on the broker",
                "check the node id (`meshvpn id` on that relay)",
            )
        address = ipaddress.IPv6Address(entry.announcement.mesh_address)
        prefix = mesh_prefix_of(address)
        route = self.router.table().get(prefix)
        if route is None:
            return address, None
        neighbour = next((x.node_id for x in self.links.values() if x.ifname == route.link), None)
        return address, {
            "prefix": str(prefix),
            "via": route.link,
            "neighbour": neighbour,
            "metric": route.metric,
        }

    def node_of_address(self, address: str) -> str | None:
        """Which announced relay has this mesh address (for the hops of a ping)."""
        if address == str(self.address):
            return self.identity.node_id
        for node_id, entry in self.directory.entries.items():
            if str(ipaddress.IPv6Address(entry.announcement.mesh_address)) == address:
                return node_id
        return None

    def status(self, link_bytes: Mapping[str, tuple[int, int]] | None = None) -> dict[str, Any]:
        neighbours = self.router.neighbours()
        counted = link_bytes or {}
        return {
            "address": str(self.address),
            "prefix": str(self.prefix),
            "links": [
                {
                    "node_id": link.node_id,
                    "interface": link.ifname,
                    "mesh_address": str(link.mesh_address),
                    **_neighbour_status(neighbours.get(link.ifname)),
                    "probe_rtt_ms": self.rtt_ms.get(link.node_id),
                    "rx_bytes": counted.get(link.ifname, (None, None))[0],
                    "tx_bytes": counted.get(link.ifname, (None, None))[1],
                }
                for link in sorted(self.links.values(), key=lambda x: x.slot)
            ],
            "routes": {
                str(prefix): {"via": route.link, "metric": route.metric}
                for prefix, route in sorted(self.router.table().items())
            },
            "known_relays": len(self.directory.entries),
            "counters": dict(self.counters),
            "events": list(self.events),
        }


def _neighbour_status(neighbour: Neighbour | None) -> dict[str, Any]:
    if neighbour is None:
        return {"state": None, "rtt_ms": None, "cost": None}
    rtt = neighbour.rtt_ms
    return {
        "state": neighbour.state.value,
        "rtt_ms": None if rtt is None else round(rtt, 2),
        "cost": neighbour.cost,
    }
