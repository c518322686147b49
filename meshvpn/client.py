"""The client agent: ``meshvpn connect``.

Two ways to a relay:

- by hand: ``--relay``, ``--relay-key`` and ``--address`` (from ``meshvpn admit``);
- by discovery: ``--broker`` only. The agent reads the relays' retained
  announcements into a ``Directory``, probes the nearest few (authenticated
  UDP echo, see ``meshvpn.probe``), asks the best one for a session with a
  Noise-sealed request, and falls back to the next one if refused. Nothing is
  created on the host until a relay has said yes.

Then the tunnel goes up wg-quick style (``meshvpn.tunnel``) once the relay has
answered a WireGuard handshake. The broker connection stays open to renew the
session; if the broker goes away the tunnel does not notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Final, cast

from accounting.credit import CreditNotice, credit_topic
from accounting.exchange import (
    ACK_MAGIC,
    CHANNEL_PORT,
    Ack,
    ClientSession,
    Counters,
    Meter,
    Statement,
    StatementRefused,
    Terms,
)
from accounting.receipts import verify_receipt
from meshvpn.agent import (
    CLIENT_KEEPALIVE,
    TUNNEL_MTU,
    Agent,
    CommonOptions,
    create_recorded,
    ipv6_enabled,
    open_recorded,
)
from meshvpn.clock import now_ms
from meshvpn.directory import (
    ANNOUNCE_PREFIX,
    TIE_MS,
    Directory,
    Entry,
    choose,
    reply_topic,
    session_topic,
    sync_topic,
)
from meshvpn.errors import LocalError, RemoteError
from meshvpn.footprint import write_sysctl
from meshvpn.handshake import PendingRequest, open_request
from meshvpn.identity import PublicKey, client_mesh_address
from meshvpn.killswitch import TABLE as LOCKDOWN_TABLE
from meshvpn.killswitch import (
    Allowed,
    address_of,
    dropped_counts,
    lock_down,
    set_allowed,
)
from meshvpn.messages import (
    ROLE_MESH,
    STATUS_NAMES,
    MessageError,
    SessionGrant,
    SessionRequest,
    verify,
)
from meshvpn.mqtt import MAX_QUEUED_DIRECTORY, BrokerAddress, ControlLink, load_credentials
from meshvpn.netconf import Netlink
from meshvpn.probe import ProbeSent, check_reply, make_request, reply_nonce
from meshvpn.rates import Throughput
from meshvpn.tunnel import DEFAULT_FWMARK, full_tunnel
from meshvpn.wireguard.backend import WireGuardDevice
from meshvpn.wireguard.model import Endpoint, PeerSpec

log = logging.getLogger("meshvpn.client")

GATHER_MAX_S: Final = 3.0
PROBE_CANDIDATES: Final = 8
PROBES_EACH: Final = 2
PROBE_SPACING_S: Final = 0.005
PROBE_TIMEOUT_S: Final = 1.0
GRANT_TIMEOUT_S: Final = 5.0
MAX_ATTEMPTS: Final = 3
KEPT_SESSIONS: Final = 8  # receipt state per role, for sessions a relay may renew
ANY_PRICE: Final = 2**64 - 1
MESH_RANGE: Final = ipaddress.IPv6Network("fd00::/8")  # relay.mesh.MESH_RANGE
# The end-to-end tunnel rides inside the access link: IPv6 + UDP + WireGuard.
INNER_MTU: Final = TUNNEL_MTU - 80
PATH_KEEPALIVE: Final = 5  # s; multi-hop links keep talking, so a silent one is dead
ECHO_INTERVAL_S: Final = 0.5
THROUGHPUT_SAMPLE_S: Final = 1.0
ENTRY_DEAD_S: Final = 2.0  # no echo from the entry this long: switch to the standby
EXIT_DEAD_S: Final = 10.0  # longer: routing converges around a dead transit relay first


@dataclass(frozen=True)
class ClientOptions(CommonOptions):
    relay: Endpoint | None = None
    relay_key: PublicKey | None = None
    address: ipaddress.IPv4Interface | None = None
    broker: BrokerAddress | None = None
    near: str = ""
    exit_region: str = ""
    max_price: int | None = None
    handshake_timeout: float = 10.0
    fwmark: int = DEFAULT_FWMARK
    lockdown: bool = True  # the kill switch: see meshvpn.killswitch
    allow_lan: bool = False
    exit_node: str = ""  # multi-hop: leave the mesh here
    entry_node: str = ""  # enter the mesh here (single hop: the relay to use)
    hops: int = 1

    @property
    def multihop(self) -> bool:
        return bool(self.exit_node) or self.hops > 1

    @property
    def access_ifname(self) -> str:
        """Multi-hop: the access link to the entry; ``ifname`` is the end-to-end tunnel."""
        return f"{self.ifname}a"

    def kept_on_restart(self) -> frozenset[str]:
        return frozenset({LOCKDOWN_TABLE}) if self.lockdown else frozenset()


@dataclass(frozen=True)
class Chosen:
    """Where this client's tunnel goes."""

    endpoint: Endpoint
    wireguard_key: PublicKey
    address: ipaddress.IPv4Interface
    node_id: str | None = None
    rtt_ms: float | None = None
    grant: SessionGrant | None = None
    entry: Entry | None = None

    def __str__(self) -> str:
        return f"{self.node_id} at {self.endpoint}" if self.node_id else str(self.endpoint)

    @property
    def mesh_address(self) -> ipaddress.IPv6Address | None:
        """Our address in the relay's mesh /64 (multi-hop access links)."""
        if self.entry is None:
            return None
        relay = ipaddress.IPv6Address(self.entry.announcement.mesh_address)
        return client_mesh_address(relay, self.address.ip)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The relay's end of the tunnel: statements and echoes come from there."""
        return self.address.network.network_address + 1


class _ProbeClient(asyncio.DatagramProtocol):
    """Collects authenticated probe replies; wakes the prober on every new answer."""

    def __init__(self) -> None:
        # by nonce: a multi-homed relay may answer from another address than we asked
        self.sent: dict[bytes, tuple[str, ProbeSent, float]] = {}
        self.rtts: dict[str, float] = {}
        self.answer = asyncio.Event()

    def datagram_received(self, data: bytes, _addr: tuple[str | Any, int]) -> None:
        received = time.monotonic()
        found = self.sent.get(reply_nonce(data))
        if found is not None and check_reply(found[1], data):
            node_id, _, at = found
            rtt = (received - at) * 1000
            self.rtts[node_id] = min(rtt, self.rtts.get(node_id, rtt))
            self.answer.set()


async def probe_all(candidates: list[Entry], *, settle: bool = True) -> dict[str, float]:
    """RTT in ms of each relay that answered, probing all of them at once.

    With ``settle``, waiting stops as soon as no unanswered relay could still
    win: one that has not answered ``TIE_MS`` after the best one did is slower
    than the best. Without, it waits for every one (a relay ranking them all).
    """
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        _ProbeClient,
        local_addr=("0.0.0.0", 0),  # noqa: S104 - an ephemeral client port
    )
    start = loop.time()
    try:
        for _ in range(PROBES_EACH):
            for entry in candidates:
                ann = entry.announcement
                host = str(ann.endpoints[0][0])
                wire, probe = make_request(ann.control_key, now_ms())
                protocol.sent[probe.nonce] = (entry.node_id, probe, time.monotonic())
                transport.sendto(wire, (host, ann.probe_port))
            await asyncio.sleep(PROBE_SPACING_S)
        deadline = start + PROBE_TIMEOUT_S
        while len(protocol.rtts) < len(candidates):
            wait = deadline - loop.time()
            if protocol.rtts and settle:
                settled = start + (min(protocol.rtts.values()) + TIE_MS) / 1000 + PROBE_SPACING_S
                wait = min(wait, settled - loop.time())
            if wait <= 0:
                break
            protocol.answer.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(protocol.answer.wait(), wait)
    finally:
        transport.close()
    return dict(protocol.rtts)


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self, queue: asyncio.Queue[tuple[bytes, tuple[str, int]]]) -> None:
        self.queue = queue

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # a flood is dropped, not queued
            self.queue.put_nowait((data, (str(addr[0]), int(addr[1]))))


class ClientAgent(Agent):
    role = "client"
    opts: ClientOptions

    def __init__(self, opts: ClientOptions) -> None:
        super().__init__(opts)
        self.duties: dict[str, _Duty] = {}
        self.directory = Directory(lazy=True)  # checks only the signatures it uses
        self.link: ControlLink | None = None
        self.chosen: Chosen | None = None  # the relay, or multi-hop: the entry
        self.exit: Chosen | None = None  # multi-hop: the exit, reached over the mesh
        self.standby_entry: Chosen | None = None
        self.standby_exit: Chosen | None = None
        self.access: WireGuardDevice | None = None
        self._access_addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
        self.path_events: list[str] = []
        self._standby_wanted = asyncio.Event()  # a failover used a spare: get another
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._rejections_logged: set[str] = set()
        self.rtts: dict[str, float] = {}
        # Before anything touches the host: a node that is not enrolled stops here.
        self.credentials = (
            load_credentials(opts.state_dir, self.identity) if opts.broker is not None else None
        )
        self.path_rtt_ms: dict[str, float] = {}  # multi-hop: the latest echo to entry and exit
        self.credit: dict[str, Any] | None = None
        self.throughput = Throughput()  # up: what this client sends, down: what it gets

    # ---- finding a relay

    async def prepare(self) -> None:
        opts = self.opts
        if opts.broker is None:
            if opts.relay is None or opts.relay_key is None or opts.address is None:
                raise LocalError(
                    "connect needs --broker, or all of --relay, --relay-key and --address"
                )
            self.chosen = Chosen(opts.relay, opts.relay_key, opts.address)
            if opts.lockdown:
                # Before the first packet: only the relay's WireGuard may leave the host.
                only = Allowed(relays=frozenset({(opts.relay.host, opts.relay.port)}))
                await lock_down(self.footprint, opts.ifname, opts.fwmark, only, opts.allow_lan)
            return
        broker, allowed = opts.broker, Allowed()
        if opts.lockdown:
            # Before the broker connection or a probe: from here on only what the
            # lockdown lets out leaves the host (meshvpn.killswitch).
            address = await address_of(broker.host, "broker")
            broker = dataclasses.replace(broker, dial=str(address))
            allowed = Allowed(broker=frozenset({(address, broker.port)}))
            await lock_down(
                self.footprint,
                opts.ifname,
                opts.fwmark,
                allowed,
                opts.allow_lan,
                access=opts.access_ifname if opts.multihop else None,
            )
        assert self.credentials is not None  # noqa: S101 - loaded in __init__ with --broker
        self.link = ControlLink(
            broker,
            name=f"client-{self.identity.node_id}",
            tls=self.credentials.context(broker.host),
            # QoS 0: announcements are refreshed anyway, and QoS 0 is not held
            # back by the broker's in-flight window when thousands are retained.
            subscriptions=[
                (ANNOUNCE_PREFIX + "+", 0),
                (credit_topic(self.identity.node_id), 1),  # what the client has left
            ],
            handler=self._on_message,
            max_queued_in=MAX_QUEUED_DIRECTORY,
        )
        self.spawn(self.link.run())
        try:
            await asyncio.wait_for(self.link.connected.wait(), self.opts.handshake_timeout)
        except TimeoutError:
            why = f" ({self.link.last_error})" if self.link.last_error else ""
            raise RemoteError(
                f"broker {opts.broker} is unreachable{why}",
                "check the address (--broker host:port) and that the broker runs",
            ) from None
        await self._gather()
        if opts.lockdown:
            # Exactly the relays _find_relay probes, at the address each announces.
            probes = frozenset(
                (e.announcement.endpoints[0][0], e.announcement.probe_port)
                for e in self._candidates()
            )
            await set_allowed(dataclasses.replace(allowed, probes=probes))
        self.chosen = await self._find_relay()
        log.info("%s %s granted a session", "entry" if opts.multihop else "relay", self.chosen)
        if opts.multihop:
            assert self.chosen.node_id is not None  # noqa: S101 - from the directory
            self.exit = await self._find_exit(exclude=frozenset({self.chosen.node_id}))
            log.info("exit %s granted a session", self.exit)
            # The spares (standby entry and exit) are granted once the tunnel is up,
            # off the connect path: see _find_standbys.
        if opts.lockdown:
            # The chosen relays' WireGuard may leave now; probing is over.
            await set_allowed(dataclasses.replace(allowed, relays=self._relay_endpoints()))

    async def _gather(self) -> None:
        """Wait until the broker has sent every retained announcement.

        The broker answers a subscription with its retained messages, in order,
        before anything published later on the same connection. So we publish a
        message to a topic of our own and wait for it to come back: when it
        does, the directory is complete, with no guessing at quiet periods.
        """
        assert self.link is not None  # noqa: S101 - only with a broker
        topic = sync_topic(self.identity.node_id, os.urandom(16))
        echoed: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[topic] = echoed
        try:
            if await self.link.subscribe(topic, qos=0) and await self.link.publish(
                topic, b"sync", qos=0
            ):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(echoed, GATHER_MAX_S)
        finally:
            self._pending.pop(topic, None)
            await self.link.unsubscribe(topic)

    def _candidates(self, exclude: frozenset[str] = frozenset()) -> list[Entry]:
        """Where the tunnel may start: single hop, an exit; multi-hop, a mesh entry."""
        opts = self.opts
        entry_node = opts.entry_node if opts.entry_node not in exclude else ""

        def mesh_entry(e: Entry) -> bool:
            return bool(e.announcement.roles & ROLE_MESH) and entry_node in ("", e.node_id)

        def pinned(e: Entry) -> bool:
            return entry_node in ("", e.node_id)

        return self.directory.candidates(
            now_ms(),
            near=opts.near,
            exit_region="" if opts.multihop else opts.exit_region,
            max_price=opts.max_price,
            need_exit=not opts.multihop,
            exclude=exclude,
            where=mesh_entry if opts.multihop else pinned,
            limit=PROBE_CANDIDATES,
        )

    async def _find_relay(
        self, exclude: frozenset[str] = frozenset(), *, probe: bool = True, announce: bool = True
    ) -> Chosen:
        candidates = self._candidates(exclude)
        what = "mesh entry" if self.opts.multihop else "exit"
        if not candidates:
            raise RemoteError(
                f"no usable relay: the broker listed {len(self.directory)} relay(s),"
                f" none of them a {what} that fits the filters you gave",
                "try again later or relax the filters",
            )
        if probe:
            rtts = await probe_all(candidates)
            self.rtts = rtts
        else:
            # A spare: no probing (the lockdown may be closed to it by now); relays
            # not probed at connect time rank after every one that was.
            unprobed = 10_000.0
            rtts = {e.node_id: self.rtts.get(e.node_id, unprobed) for e in candidates}
        for entry in candidates:
            rtt = rtts.get(entry.node_id)
            if announce:
                log.info(
                    "relay %s: %s", entry.node_id, f"{rtt:.1f} ms" if rtt else "no answer to probes"
                )
        ranked = choose(candidates, rtts)
        if not ranked:
            # Probes only rank relays. None answering is what a probe flood at the
            # relays looks like (their budgets and sockets drop ours with the flood's),
            # or a network that drops them: ask the relays in location order instead.
            log.warning(
                "none of the %d nearest relays answered a probe; asking them by location",
                len(candidates),
            )
            ranked = candidates
        refusals = []
        for entry in ranked[:MAX_ATTEMPTS]:
            grant = await self._negotiate(entry)
            if grant is None:
                refusals.append(f"{entry.node_id}: no answer")
                continue
            if not grant.granted:
                refusals.append(f"{entry.node_id}: {STATUS_NAMES[grant.status]} ({grant.reason})")
                log.info("relay %s refused: %s", entry.node_id, refusals[-1])
                continue
            host, port = entry.announcement.endpoints[0]
            return Chosen(
                endpoint=Endpoint(host, port),
                wireguard_key=grant.relay_wireguard_key,
                address=grant.address,
                node_id=entry.node_id,
                rtt_ms=round(rtts[entry.node_id], 2) if entry.node_id in rtts else None,
                grant=grant,
                entry=entry,
            )
        raise RemoteError(f"no relay gave a session: {'; '.join(refusals)}", "try again later")

    async def _find_exit(self, exclude: frozenset[str]) -> Chosen:
        """Multi-hop: an exit on the mesh other than the entry, reached at its mesh
        address. No probing: the mesh's routing finds the way there."""
        opts = self.opts
        candidates = self.directory.candidates(
            now_ms(),
            near=opts.near,
            exit_region=opts.exit_region,
            max_price=opts.max_price,
            exclude=exclude,
            where=lambda e: (
                bool(e.announcement.roles & ROLE_MESH) and opts.exit_node in ("", e.node_id)
            ),
            limit=MAX_ATTEMPTS,
        )
        if not candidates:
            wanted = opts.exit_node or "an exit on the mesh"
            raise RemoteError(
                f"no usable exit: {wanted} is not announced with room and within your filters",
                "check the node id (`meshvpn peers` on a relay), or relax the filters",
            )
        refusals = []
        for entry in candidates[:MAX_ATTEMPTS]:
            grant = await self._negotiate(entry)
            if grant is None or not grant.granted:
                reason = "no answer" if grant is None else STATUS_NAMES[grant.status]
                refusals.append(f"{entry.node_id}: {reason}")
                continue
            ann = entry.announcement
            return Chosen(
                endpoint=Endpoint(ipaddress.IPv6Address(ann.mesh_address), ann.endpoints[0][1]),
                wireguard_key=grant.relay_wireguard_key,
                address=grant.address,
                node_id=entry.node_id,
                grant=grant,
                entry=entry,
            )
        raise RemoteError(f"no exit gave a session: {'; '.join(refusals)}", "try again later")

    async def _negotiate(self, entry: Entry) -> SessionGrant | None:
        assert self.link is not None  # noqa: S101 - only with a broker
        ann = entry.announcement
        request = SessionRequest(
            relay=entry.signer,
            control_key=self.identity.control_public,
            wireguard_key=self.identity.wireguard_public,
            want_exit="",
            max_price_per_gib=self.opts.max_price if self.opts.max_price is not None else ANY_PRICE,
            reply_token=os.urandom(16),
            nonce=os.urandom(16),
            issued_ms=now_ms(),
        )
        wire, pending = open_request(
            self.identity.identity_key,
            self.identity.control_key,
            entry.signer,
            ann.control_key,
            request,
        )
        topic = reply_topic(self.identity.node_id, request.reply_token)
        answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[topic] = answer
        try:
            if not await self.link.subscribe(topic):
                return None
            if not await self.link.publish(session_topic(entry.node_id), wire):
                return None
            return await self._await_grant(answer, pending)
        finally:
            self._pending.pop(topic, None)
            await self.link.unsubscribe(topic)

    async def _await_grant(
        self, answer: asyncio.Future[bytes], pending: PendingRequest
    ) -> SessionGrant | None:
        try:
            wire = await asyncio.wait_for(answer, GRANT_TIMEOUT_S)
        except TimeoutError:
            return None
        try:
            return pending.read_grant(wire)
        except MessageError as exc:
            self._count_reject(exc.reason)
            return None

    def _count_reject(self, reason: str) -> None:
        self.directory.rejected[reason] += 1
        if reason not in self._rejections_logged:
            self._rejections_logged.add(reason)
            log.warning("dropped a control message (%s); further ones are only counted", reason)

    async def _on_message(self, topic: str, payload: bytes) -> None:
        if topic == credit_topic(self.identity.node_id):
            self._on_credit(payload)
            return
        if topic.startswith(ANNOUNCE_PREFIX):
            reason = self.directory.offer(topic, payload, now_ms())
            if reason is not None and reason not in self._rejections_logged:
                self._rejections_logged.add(reason)
                log.warning("dropped an announcement (%s); further ones are only counted", reason)
            return
        future = self._pending.get(topic)
        if future is not None and not future.done():
            future.set_result(payload)

    def _on_credit(self, payload: bytes) -> None:
        """The accounting service's newest word on this client's balance (the relays
        act on the same notices; the client only shows it)."""
        try:
            signed = verify(payload, CreditNotice)
        except MessageError:
            self._count_reject("credit-notice")
            return
        notice = signed.message
        assert isinstance(notice, CreditNotice)  # noqa: S101 - verify() checked the type
        held = self.credit
        if notice.client != self.identity.node_id or (
            held is not None and notice.issued_ms <= held["issued_ms"]
        ):
            self._count_reject("credit-notice")
            return
        self.credit = {
            "status": "ok" if notice.ok else "exhausted",
            "credit": notice.credit,
            "issued_ms": notice.issued_ms,
            "accounting_key": signed.signer.b64,
        }

    async def _sample_throughput(self) -> None:
        """Once a second: the paying session's counters into the throughput history."""
        while True:
            await asyncio.sleep(THROUGHPUT_SAMPLE_S)
            tunnel_to = self.exit or self.chosen
            if self.device is None or tunnel_to is None:
                continue
            peer = (await self.device.state()).peers.get(tunnel_to.wireguard_key)
            counters = {} if peer is None else {"session": (peer.tx_bytes, peer.rx_bytes)}
            self.throughput.observe(now_ms(), counters)

    # ---- the tunnel

    async def build(self) -> None:
        assert self.device is not None  # noqa: S101
        assert self.chosen is not None  # noqa: S101 - prepare() chose
        opts = self.opts
        ipv6 = ipv6_enabled()
        if self.exit is not None:
            await self._build_access()
            tunnel_to, mtu = self.exit, INNER_MTU
        else:
            tunnel_to, mtu = self.chosen, TUNNEL_MTU
        await self.device.set_interface(self.identity.wireguard_key, 0, opts.fwmark)
        async with Netlink() as nl:
            await nl.address_add(opts.ifname, tunnel_to.address)
            await nl.link_up(opts.ifname, mtu)
        # With the link up, a keepalive makes WireGuard handshake at once.
        keepalive = PATH_KEEPALIVE if self.exit is not None else CLIENT_KEEPALIVE
        await self.device.reconcile(_full_tunnel_peer(tunnel_to, keepalive))
        await self._await_handshake(self.device, tunnel_to)
        plan = full_tunnel(opts.ifname, opts.fwmark, ipv6=ipv6)
        self.footprint.will_set_sysctl("net.ipv4.conf.all.src_valid_mark")
        write_sysctl("net.ipv4.conf.all.src_valid_mark", "1")
        async with Netlink() as nl:
            for net in plan.routes:
                await nl.route_add(net, opts.ifname, plan.table)
            for rule in plan.rules:
                self.footprint.will_add_rule(rule)
                await nl.rule_add(rule)
        if opts.lockdown:
            # Everything routes into the tunnel now: only WireGuard may leave the host.
            await set_allowed(Allowed(relays=self._relay_endpoints()))
        if self.link is not None:
            # The broker connection was made over the uplink; from now on its packets
            # would go into the tunnel with the uplink's source and be dropped. Start
            # a new one, which runs inside the tunnel like all other traffic.
            self.link.reconnect()

    def _relay_endpoints(
        self,
    ) -> frozenset[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
        """The WireGuard endpoints this client may talk to outside the tunnel."""
        return frozenset(
            (c.endpoint.host, c.endpoint.port)
            for c in (self.chosen, self.standby_entry)
            if c is not None
        )

    async def _build_access(self) -> None:
        """Multi-hop: the access link to the entry, carrying only the mesh range."""
        assert self.chosen is not None  # noqa: S101
        opts = self.opts
        name = opts.access_ifname
        if len(name) > 15:
            raise LocalError(f"interface name {name!r} is too long", "use a shorter --interface")
        log_path = opts.state_dir / "wireguard-go-access.log"
        device = await open_recorded(self.footprint, name, opts.backend, log_path)
        self.access = device
        await create_recorded(self.footprint, device)
        await device.set_interface(self.identity.wireguard_key, 0, opts.fwmark)
        async with Netlink() as nl:
            await nl.link_up(name, TUNNEL_MTU)
            # WireGuard's marked packets skip the tunnel's table and land in main:
            # there the exit's mesh address must lead into the access link.
            await nl.route_add(MESH_RANGE, name)
        await self._enter(self.chosen)

    async def _enter(self, entry: Chosen) -> None:
        """Point the access link at ``entry`` (at start, and when switching over)."""
        assert self.access is not None  # noqa: S101
        name = self.opts.access_ifname
        mesh_address = entry.mesh_address
        assert mesh_address is not None  # noqa: S101 - multi-hop entries come from the directory
        # IPv4: the entry's receipt statements (from its gateway, which we do not
        # know); the mesh range: the end-to-end tunnel's packets.
        allowed = (ipaddress.ip_network("0.0.0.0/0"), MESH_RANGE)
        peer = PeerSpec(entry.wireguard_key, allowed, entry.endpoint, PATH_KEEPALIVE)
        await self.access.reconcile({entry.wireguard_key: peer})
        async with Netlink() as nl:
            for old in self._access_addresses:
                await nl.address_delete(name, old)
            self._access_addresses = [
                entry.address,
                ipaddress.IPv6Interface(f"{mesh_address}/128"),
            ]
            for new in self._access_addresses:
                await nl.address_add(name, new)
        await self._await_handshake(self.access, entry)

    async def _await_handshake(self, device: WireGuardDevice, relay: Chosen) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.handshake_timeout
        started = loop.time()
        while loop.time() < deadline:
            peer = (await device.state()).peers.get(relay.wireguard_key)
            if peer is not None and peer.last_handshake:
                waited_ms = (loop.time() - started) * 1000
                log.info("%s: handshake with %s after %.0f ms", device.ifname, relay, waited_ms)
                return
            await asyncio.sleep(0.02)
        hint = (
            "the relay granted a session but its tunnel is silent; try again"
            if relay.grant
            else "check the relay's address and key, and that it admitted this client"
            f" (`meshvpn admit {self.identity.wireguard_public.b64}` on the relay)"
        )
        raise RemoteError(
            f"relay {relay.endpoint} did not answer a WireGuard handshake within "
            f"{self.opts.handshake_timeout:g} s",
            hint,
        )

    def background(self) -> list[Coroutine[Any, Any, None]]:
        chosen = self.chosen
        if chosen is None or chosen.grant is None or chosen.entry is None:
            return []
        assert self.device is not None  # noqa: S101 - built
        jobs: list[Coroutine[Any, Any, None]] = [self._sample_throughput()]
        if self.exit is None:
            self.duties["relay"] = _Duty(self, "relay", chosen, self.device, self.opts.ifname)
        else:
            assert self.access is not None  # noqa: S101
            self.duties["entry"] = _Duty(
                self, "entry", chosen, self.access, self.opts.access_ifname
            )
            self.duties["exit"] = _Duty(self, "exit", self.exit, self.device, self.opts.ifname)
            self.duties["exit"].entry = chosen.entry.signer if chosen.entry else None
            jobs += [self._watch_path(), self._keep_standbys()]
        for duty in self.duties.values():
            jobs += [duty.serve(), duty.save_loop()]
        jobs.append(self._renew())
        return jobs

    @property
    def receipts(self) -> ClientSession | None:
        """The session paying for the traffic: the exit's, or the one relay's."""
        duty = self.duties.get("exit") or self.duties.get("relay")
        return duty.session if duty is not None else None

    # ---- multi-hop failover

    async def _watch_path(self) -> None:
        """Echo the entry's and the exit's mesh addresses every half second; switch to
        the standby entry or exit when one stays silent (no broker needed: the
        standbys were granted at connect time)."""
        assert self.chosen is not None  # noqa: S101
        assert self.exit is not None  # noqa: S101
        loop = asyncio.get_running_loop()
        # Raw: root needs no ping_group_range; the kernel checksums ICMPv6 for us.
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        sock.setblocking(False)  # noqa: FBT003 - the socket API's own flag
        heard: dict[str, float] = {"entry": loop.time(), "exit": loop.time()}
        seq = 0
        try:
            while True:
                targets = {
                    "entry": _mesh_of(self.chosen),
                    "exit": self.exit.endpoint.host,
                }
                seq = (seq + 1) & 0xFFFF
                sent_at = loop.time()
                for target in targets.values():
                    with contextlib.suppress(OSError):
                        sock.sendto(
                            struct.pack("!BBHHH", 128, 0, 0, os.getpid() & 0xFFFF, seq),
                            (str(target), 0),
                        )
                end = loop.time() + ECHO_INTERVAL_S
                while (left := end - loop.time()) > 0:
                    try:
                        data, addr = await asyncio.wait_for(loop.sock_recvfrom(sock, 256), left)
                    except TimeoutError:
                        break
                    if data[:1] != b"\x81":
                        continue
                    source = ipaddress.ip_address(addr[0].split("%")[0])
                    for name, target in targets.items():
                        if source == target:
                            heard[name] = loop.time()
                            self.path_rtt_ms[name] = round((heard[name] - sent_at) * 1000, 2)
                now = loop.time()
                if now - heard["entry"] > ENTRY_DEAD_S:
                    if await self._switch_entry():
                        heard = dict.fromkeys(heard, loop.time())
                elif now - heard["exit"] > EXIT_DEAD_S and await self._switch_exit():
                    heard["exit"] = loop.time()
        finally:
            sock.close()

    def _path_event(self, line: str) -> None:
        log.warning("%s", line)
        self.path_events = [*self.path_events[-19:], f"{time.strftime('%H:%M:%S')} {line}"]

    async def _switch_entry(self) -> bool:
        old, new = self.chosen, self.standby_entry
        assert old is not None  # noqa: S101
        if new is None:
            self._path_event(f"entry {old.node_id} is silent and there is no standby; waiting")
            return False
        self.standby_entry = None
        self._path_event(f"entry {old.node_id} is silent: switching to {new.node_id}")
        try:
            await self._enter(new)
        except RemoteError as exc:
            self._path_event(f"standby entry {new.node_id} failed too: {exc.what}")
            return False
        self.chosen = new
        await self._roam_now()
        self.duties["entry"].switch(new)
        self.duties["exit"].entry = new.entry.signer if new.entry else None
        if self.opts.lockdown:
            await set_allowed(Allowed(relays=self._relay_endpoints()))
        self._standby_wanted.set()
        return True

    async def _roam_now(self) -> None:
        """Make the end-to-end tunnel send at once from our new address, so the
        exit (WireGuard roams on the first authenticated packet) answers there
        without waiting for TCP's next retransmission: wireguard-go sends a
        keepalive when a persistent keepalive is switched on."""
        assert self.device is not None  # noqa: S101
        assert self.exit is not None  # noqa: S101
        for keepalive in (0, PATH_KEEPALIVE):
            await self.device.reconcile(_full_tunnel_peer(self.exit, keepalive))

    async def _switch_exit(self) -> bool:
        old, new = self.exit, self.standby_exit
        assert old is not None  # noqa: S101
        assert self.device is not None  # noqa: S101
        if new is None:
            self._path_event(f"exit {old.node_id} is silent and there is no standby; waiting")
            return False
        self.standby_exit = None
        self._path_event(f"exit {old.node_id} is silent: switching to {new.node_id}")
        await self.device.reconcile(_full_tunnel_peer(new, PATH_KEEPALIVE))
        async with Netlink() as nl:
            await nl.address_delete(self.opts.ifname, old.address)
            await nl.address_add(self.opts.ifname, new.address)
        self.exit = new
        self.duties["exit"].switch(new)
        if self.link is not None:
            self.link.reconnect()  # its socket was bound to the old tunnel address
        self._standby_wanted.set()
        return True

    async def _keep_standbys(self) -> None:
        """Keep a granted spare entry (and exit, unless the user pinned one) at hand."""
        while True:
            if self.standby_entry is None or (
                self.standby_exit is None and not self.opts.exit_node
            ):
                await self._find_standbys()
            self._standby_wanted.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._standby_wanted.wait(), 2.0 if self.standby_entry is None else 10.0
                )

    async def _find_standbys(self) -> None:
        """A granted spare entry and exit, so a failover needs no broker."""
        assert self.chosen is not None  # noqa: S101
        assert self.exit is not None  # noqa: S101
        for _ in range(30):
            if self.link is not None and self.link.connected.is_set():
                break
            await asyncio.sleep(1.0)
        in_use = frozenset(n for n in (self.chosen.node_id, self.exit.node_id) if n)
        if self.standby_entry is None:
            with contextlib.suppress(RemoteError):
                self.standby_entry = await self._find_relay(
                    exclude=in_use, probe=False, announce=False
                )
        if self.standby_exit is None:
            with contextlib.suppress(RemoteError):
                self.standby_exit = await self._find_exit(exclude=in_use)
        if self.opts.lockdown:
            await set_allowed(Allowed(relays=self._relay_endpoints()))

    async def _renew(self) -> None:
        """Ask again before the grants run out; failures only delay the next try."""
        while True:
            grants = [c.grant.expires_ms for c in (self.chosen, self.exit) if c and c.grant]
            wait_s = max(5.0, (min(grants, default=now_ms() + 60_000) - now_ms()) / 2000)
            await asyncio.sleep(wait_s)
            for which in ("chosen", "exit"):
                current: Chosen | None = getattr(self, which)
                if current is None or current.entry is None:
                    continue
                renewed = await self._negotiate(current.entry)
                if renewed is not None and renewed.granted:
                    setattr(self, which, dataclasses.replace(current, grant=renewed))
                else:
                    log.warning("could not renew the session yet; the tunnel stays up meanwhile")

    async def status(self) -> dict[str, Any]:
        base = await super().status()
        chosen = self.chosen
        lockdown = LOCKDOWN_TABLE in self.footprint.nft_tables
        relay: dict[str, Any] = {}
        if chosen is not None:
            relay = {
                "endpoint": str(chosen.endpoint),
                "wireguard_key": chosen.wireguard_key.b64,
                "node_id": chosen.node_id,
                "rtt_ms": chosen.rtt_ms,
            }
            device = self.access if self.exit is not None else self.device
            if device is not None:
                peer = (await device.state()).peers.get(chosen.wireguard_key)
                if peer is not None:
                    relay |= {
                        "rx_bytes": peer.rx_bytes,
                        "tx_bytes": peer.tx_bytes,
                        "last_handshake": peer.last_handshake,
                    }
        # The session that carries the traffic out: the exit's, or the one relay's.
        paying = self.duties.get("exit") or self.duties.get("relay")
        session = None
        tunnel_to = self.exit or chosen
        if paying is not None:
            session = paying.status()
        elif tunnel_to is not None and tunnel_to.grant is not None:
            session = {
                "session_id": tunnel_to.grant.session_id.hex(),
                "price_per_gib": tunnel_to.grant.price_per_gib,
                "expires_ms": tunnel_to.grant.expires_ms,
            }
        path = None
        if self.exit is not None and chosen is not None:
            path = {
                "entry": chosen.node_id,
                "entry_rtt_ms": chosen.rtt_ms,
                "entry_echo_rtt_ms": self.path_rtt_ms.get("entry"),
                "exit_rtt_ms": self.path_rtt_ms.get("exit"),
                "exit": self.exit.node_id,
                "exit_endpoint": str(self.exit.endpoint),
                "standby_entry": self.standby_entry.node_id if self.standby_entry else None,
                "standby_exit": self.standby_exit.node_id if self.standby_exit else None,
                "sessions": {name: duty.status() for name, duty in self.duties.items()},
                "cost": sum(duty.session.cost for duty in self.duties.values()),
                "events": list(self.path_events),
            }
        return {
            **base,
            "address": str(tunnel_to.address) if tunnel_to else None,
            "relay": relay,
            "session": session,
            "path": path,
            "broker": {
                "address": str(self.opts.broker) if self.opts.broker else None,
                "connected": bool(self.link and self.link.connected.is_set()),
            },
            "directory": {
                "relays": len(self.directory),
                "rejected": dict(self.directory.rejected),
            },
            "lockdown": lockdown,
            "lockdown_dropped": await dropped_counts() if lockdown else {},
            "throughput": self.throughput.status(now_ms()),
            "credit": self.credit,
        }


class _Duty:
    """One paid session's receipts: the relay states, we check against our own
    count and sign. A multi-hop client has two: with the entry, for the access
    link (one relay on the path: what the entry's cut-off watches, and what pays
    it), and with the exit, for the path: the exit states the relays it traced
    (entry, transit..., exit), and every one of them countersigns. The entry
    is only a witness on the path receipt (``accounting.ledger`` gives it no
    share), so it bills the same bytes once."""

    def __init__(
        self,
        agent: ClientAgent,
        name: str,
        relay: Chosen,
        device: WireGuardDevice,
        ifname: str,
    ) -> None:
        self.agent = agent
        self.name = name
        self.device = device
        self.ifname = ifname
        self.relay = relay
        self._entry: PublicKey | None = None
        self.session = self._new_session(relay)
        # The single-hop file keeps its old name: a restarted agent finds it.
        suffix = "" if name == "relay" else f"-{name}"
        self.path = agent.opts.state_dir / f"receipts{suffix}.json"
        self._kept: list[dict[str, Any]] = []  # saved sessions of this role, newest first
        self._restore()
        self._rebind = asyncio.Event()

    def _new_session(self, relay: Chosen) -> ClientSession:
        assert relay.grant is not None  # noqa: S101 - duties are for granted sessions
        assert relay.entry is not None  # noqa: S101
        terms = Terms(
            session_id=relay.grant.session_id,
            client=self.agent.identity.identity_public,
            path=(relay.entry.signer,),
            price_per_gib=relay.grant.price_per_gib,
            started_ms=now_ms(),
        )
        return ClientSession(terms, entry=self._entry)

    @property
    def entry(self) -> PublicKey | None:
        """Multi-hop exit duty: the entry a stated path must start at (it must end at
        the exit); the path receipt is countersigned by every relay on it."""
        return self._entry

    @entry.setter
    def entry(self, key: PublicKey | None) -> None:
        self._entry = key
        self.session.entry = key

    def switch(self, relay: Chosen) -> None:
        """Another relay in this role now: a new session, counted from its counters
        (or from where we left it, if the relay renewed one we had before)."""
        self._save()
        self.relay = relay
        self.session = self._new_session(relay)
        self._restore()
        self._rebind.set()

    def _restore(self) -> None:
        """Same session after a restart, or renewed after a failover and a reconnect:
        go on from what we counted and signed (the relay's counts are cumulative)."""
        try:
            data = json.loads(self.path.read_text())
            records = data.get("sessions", [data])  # or the old format: one session
            self._kept = [r for r in records if isinstance(r, dict)][:KEPT_SESSIONS]
            mine = self.session.terms.session_id.hex()
            record = next((r for r in self._kept if r.get("session_id") == mine), None)
            if record is None:
                return
            counted = Counters(int(record["up"]), int(record["down"]))
            wire = bytes.fromhex(record["signed"]) if record.get("signed") else b""
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return
        self.session.meter = Meter(counted)
        if wire:
            with contextlib.suppress(MessageError):
                self.session.signed, self.session.signed_wire = verify_receipt(wire), wire

    def _save(self) -> None:
        """The current session first, then the last few others of this role: a relay
        renews a session when the same key comes back, and states its counts since
        the session began."""
        session = self.session
        record = {
            "session_id": session.terms.session_id.hex(),
            "up": session.counted.up,
            "down": session.counted.down,
            "signed": session.signed_wire.hex(),
        }
        others = [r for r in self._kept if r.get("session_id") != record["session_id"]]
        self._kept = [record, *others][:KEPT_SESSIONS]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"sessions": self._kept}))
        tmp.replace(self.path)

    async def save_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self._read_counters()
            self._save()

    async def _read_counters(self) -> None:
        peer = (await self.device.state()).peers.get(self.relay.wireguard_key)
        if peer is not None:
            self.session.observe(Counters(up=peer.tx_bytes, down=peer.rx_bytes))

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue(maxsize=64)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            # Both ends of a multi-hop path may hand out the same address: each
            # channel is bound to its own interface (which also routes its answers).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.ifname.encode())
            sock.bind((str(self.relay.address.ip), CHANNEL_PORT))
            transport, _ = await loop.create_datagram_endpoint(
                functools.partial(_Inbox, queue), sock=sock
            )
            self._rebind.clear()
            try:
                while not self._rebind.is_set():
                    get = asyncio.ensure_future(queue.get())
                    rebind = asyncio.ensure_future(self._rebind.wait())
                    try:
                        await asyncio.wait({get, rebind}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        rebind.cancel()
                        if not get.done():
                            get.cancel()
                    if get.done() and not get.cancelled():
                        data, addr = get.result()
                        await self._on_channel(data, addr, transport)
            finally:
                transport.close()

    async def _on_channel(
        self, data: bytes, addr: tuple[str, int], transport: asyncio.BaseTransport
    ) -> None:
        session = self.session
        if data.startswith(ACK_MAGIC):
            with contextlib.suppress(MessageError):
                session.on_ack(Ack.decode(data))
            return
        try:
            statement = Statement.decode(data)
        except MessageError:
            self.agent._count_reject("bad-statement")  # noqa: SLF001 - the agent's counter
            return
        await self._read_counters()
        refused_before = session.refused  # a re-sent refused statement is not a new refusal
        action = session.on_statement(statement, self.agent.identity.identity_key, now_ms())
        if isinstance(action, StatementRefused):
            if session.refused > refused_before and (
                session.refused == 1 or session.refused % 10 == 0
            ):
                log.warning("not signing the %s's statement: %s", self.name, action.reason)
            return
        cast("asyncio.DatagramTransport", transport).sendto(action.wire, addr)
        self._save()

    def status(self) -> dict[str, Any]:
        assert self.relay.grant is not None  # noqa: S101
        signed = self.session.signed
        return {
            "session_id": self.relay.grant.session_id.hex(),
            "price_per_gib": self.relay.grant.price_per_gib,
            "expires_ms": self.relay.grant.expires_ms,
            "bytes_used": self.session.counted.total,
            "bytes_receipted": signed.total_bytes if signed else 0,
            "cost": self.session.cost,
            "receipt_seq": signed.seq if signed else 0,
            "acked_seq": self.session.acked_seq,
            "statements_refused": self.session.refused,
        }


def _full_tunnel_peer(relay: Chosen, keepalive: int) -> dict[PublicKey, PeerSpec]:
    """The one peer of the tunnel interface: everything routes to it."""
    allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
        ipaddress.IPv4Network("0.0.0.0/0")
    ]
    if ipv6_enabled():
        allowed.append(ipaddress.IPv6Network("::/0"))
    return {
        relay.wireguard_key: PeerSpec(
            relay.wireguard_key, tuple(allowed), relay.endpoint, keepalive
        )
    }


def _mesh_of(relay: Chosen) -> ipaddress.IPv6Address:
    assert relay.entry is not None  # noqa: S101 - multi-hop relays come from the directory
    return ipaddress.IPv6Address(relay.entry.announcement.mesh_address)
