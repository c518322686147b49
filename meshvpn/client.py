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
import ipaddress
import json
import logging
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

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
from meshvpn.agent import CLIENT_KEEPALIVE, TUNNEL_MTU, Agent, CommonOptions, ipv6_enabled
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
from meshvpn.identity import PublicKey
from meshvpn.killswitch import TABLE as LOCKDOWN_TABLE
from meshvpn.killswitch import (
    Allowed,
    address_of,
    dropped_counts,
    lock_down,
    set_allowed,
)
from meshvpn.messages import STATUS_NAMES, MessageError, SessionGrant, SessionRequest
from meshvpn.mqtt import BrokerAddress, ControlLink
from meshvpn.netconf import Netlink
from meshvpn.probe import ProbeSent, check_reply, make_request, reply_nonce
from meshvpn.tunnel import DEFAULT_FWMARK, full_tunnel
from meshvpn.wireguard.model import Endpoint, PeerSpec

log = logging.getLogger("meshvpn.client")

GATHER_MAX_S: Final = 3.0
PROBE_CANDIDATES: Final = 8
PROBES_EACH: Final = 2
PROBE_SPACING_S: Final = 0.005
PROBE_TIMEOUT_S: Final = 1.0
GRANT_TIMEOUT_S: Final = 5.0
MAX_ATTEMPTS: Final = 3
ANY_PRICE: Final = 2**64 - 1


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


async def probe_all(candidates: list[Entry]) -> dict[str, float]:
    """RTT in ms of each relay that answered, probing all of them at once.

    Waiting stops as soon as no unanswered relay could still win: one that has
    not answered ``TIE_MS`` after the best one did is slower than the best.
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
            if protocol.rtts:
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
        self.receipts: ClientSession | None = None
        self.directory = Directory()
        self.link: ControlLink | None = None
        self.chosen: Chosen | None = None
        self._pending: dict[str, asyncio.Future[bytes]] = {}
        self._rejections_logged: set[str] = set()

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
            broker = BrokerAddress(str(address), broker.port)
            allowed = Allowed(broker=frozenset({(address, broker.port)}))
            await lock_down(self.footprint, opts.ifname, opts.fwmark, allowed, opts.allow_lan)
        self.link = ControlLink(
            broker,
            name=f"client-{self.identity.node_id}",
            # QoS 0: announcements are refreshed anyway, and QoS 0 is not held
            # back by the broker's in-flight window when thousands are retained.
            subscriptions=[(ANNOUNCE_PREFIX + "+", 0)],
            handler=self._on_message,
        )
        self.spawn(self.link.run())
        try:
            await asyncio.wait_for(self.link.connected.wait(), self.opts.handshake_timeout)
        except TimeoutError:
            raise RemoteError(
                f"broker {opts.broker} is unreachable",
                "check the address (--broker host:port) and that the broker runs",
            ) from None
        await self._gather()
        if opts.lockdown:
            # Exactly the relays _find_relay probes, at the address each announces.
            candidates = self.directory.candidates(
                now_ms(), near=opts.near, exit_region=opts.exit_region, max_price=opts.max_price
            )[:PROBE_CANDIDATES]
            probes = frozenset(
                (e.announcement.endpoints[0][0], e.announcement.probe_port) for e in candidates
            )
            await set_allowed(dataclasses.replace(allowed, probes=probes))
        self.chosen = await self._find_relay()
        if opts.lockdown:
            # The chosen relay's WireGuard may leave now; probing is over.
            relay = frozenset({(self.chosen.endpoint.host, self.chosen.endpoint.port)})
            await set_allowed(dataclasses.replace(allowed, relays=relay))

    async def _gather(self) -> None:
        """Wait until the broker has sent every retained announcement.

        The broker answers a subscription with its retained messages, in order,
        before anything published later on the same connection. So we publish a
        message to a topic of our own and wait for it to come back: when it
        does, the directory is complete, with no guessing at quiet periods.
        """
        assert self.link is not None  # noqa: S101 - only with a broker
        topic = sync_topic(os.urandom(8))
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

    async def _find_relay(self) -> Chosen:
        opts = self.opts
        candidates = self.directory.candidates(
            now_ms(), near=opts.near, exit_region=opts.exit_region, max_price=opts.max_price
        )[:PROBE_CANDIDATES]
        if not candidates:
            raise RemoteError(
                f"no usable relay: the broker listed {len(self.directory.entries)} relay(s),"
                " none of them an exit that fits --exit-region/--max-price",
                "try again later or relax the filters",
            )
        rtts = await probe_all(candidates)
        for entry in candidates:
            rtt = rtts.get(entry.node_id)
            log.info(
                "relay %s: %s", entry.node_id, f"{rtt:.1f} ms" if rtt else "no answer to probes"
            )
        ranked = choose(candidates, rtts)
        if not ranked:
            raise RemoteError(
                f"none of the {len(candidates)} nearest relays answered a probe",
                "check this host's network, or try again later",
            )
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
                rtt_ms=round(rtts[entry.node_id], 2),
                grant=grant,
                entry=entry,
            )
        raise RemoteError(f"no relay gave a session: {'; '.join(refusals)}", "try again later")

    async def _negotiate(self, entry: Entry) -> SessionGrant | None:
        assert self.link is not None  # noqa: S101 - only with a broker
        ann = entry.announcement
        request = SessionRequest(
            relay=entry.signed.signer,
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
            entry.signed.signer,
            ann.control_key,
            request,
        )
        topic = reply_topic(request.reply_token)
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
        if topic.startswith(ANNOUNCE_PREFIX):
            reason = self.directory.offer(topic, payload, now_ms())
            if reason is not None and reason not in self._rejections_logged:
                self._rejections_logged.add(reason)
                log.warning("dropped an announcement (%s); further ones are only counted", reason)
            return
        future = self._pending.get(topic)
        if future is not None and not future.done():
            future.set_result(payload)

    # ---- the tunnel

    async def build(self) -> None:
        assert self.device is not None  # noqa: S101
        assert self.chosen is not None  # noqa: S101 - prepare() chose
        opts, chosen = self.opts, self.chosen
        ipv6 = ipv6_enabled()
        allowed = [ipaddress.ip_network("0.0.0.0/0")]
        if ipv6:
            allowed.append(ipaddress.ip_network("::/0"))
        await self.device.set_interface(self.identity.wireguard_key, 0, opts.fwmark)
        async with Netlink() as nl:
            await nl.address_add(opts.ifname, chosen.address)
            await nl.link_up(opts.ifname, TUNNEL_MTU)
        # With the link up, a keepalive makes WireGuard handshake at once.
        relay_peer = PeerSpec(
            chosen.wireguard_key, tuple(allowed), chosen.endpoint, CLIENT_KEEPALIVE
        )
        await self.device.reconcile({chosen.wireguard_key: relay_peer})
        await self._await_handshake()
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
            relay = chosen.endpoint
            await set_allowed(Allowed(relays=frozenset({(relay.host, relay.port)})))
        if self.link is not None:
            # The broker connection was made over the uplink; from now on its packets
            # would go into the tunnel with the uplink's source and be dropped. Start
            # a new one, which runs inside the tunnel like all other traffic.
            self.link.reconnect()

    async def _await_handshake(self) -> None:
        assert self.device is not None  # noqa: S101
        assert self.chosen is not None  # noqa: S101
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.handshake_timeout
        while loop.time() < deadline:
            peer = (await self.device.state()).peers.get(self.chosen.wireguard_key)
            if peer is not None and peer.last_handshake:
                return
            await asyncio.sleep(0.02)
        hint = (
            "the relay granted a session but its tunnel is silent; try again"
            if self.chosen.grant
            else "check the relay's address and key, and that it admitted this client"
            f" (`meshvpn admit {self.identity.wireguard_public.b64}` on the relay)"
        )
        raise RemoteError(
            f"relay {self.chosen.endpoint} did not answer a WireGuard handshake within "
            f"{self.opts.handshake_timeout:g} s",
            hint,
        )

    def background(self) -> list[Coroutine[Any, Any, None]]:
        chosen = self.chosen
        if chosen is None or chosen.grant is None or chosen.entry is None:
            return []
        terms = Terms(
            session_id=chosen.grant.session_id,
            client=self.identity.identity_public,
            path=(chosen.entry.signed.signer,),
            price_per_gib=chosen.grant.price_per_gib,
            started_ms=now_ms(),
        )
        self.receipts = ClientSession(terms)
        self._restore_receipts()
        return [self._renew(), self._serve_receipts(), self._save_receipts_loop()]

    # ---- receipts: the relay states, we check against our own count and sign

    def _receipt_file(self) -> Path:
        return self.opts.state_dir / "receipts.json"

    def _restore_receipts(self) -> None:
        """Same session after a restart: go on from what we counted and signed."""
        assert self.receipts is not None  # noqa: S101
        try:
            data = json.loads(self._receipt_file().read_text())
            if bytes.fromhex(data["session_id"]) != self.receipts.terms.session_id:
                return
            counted = Counters(int(data["up"]), int(data["down"]))
            wire = bytes.fromhex(data["signed"]) if data.get("signed") else b""
        except (OSError, ValueError, KeyError, TypeError):
            return
        self.receipts.meter = Meter(counted)
        if wire:
            with contextlib.suppress(MessageError):
                self.receipts.signed, self.receipts.signed_wire = verify_receipt(wire), wire

    def _save_receipts(self) -> None:
        session = self.receipts
        if session is None:
            return
        data = {
            "session_id": session.terms.session_id.hex(),
            "up": session.counted.up,
            "down": session.counted.down,
            "signed": session.signed_wire.hex(),
        }
        tmp = self._receipt_file().with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self._receipt_file())

    async def _save_receipts_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self._read_own_counters()
            self._save_receipts()

    async def _read_own_counters(self) -> None:
        assert self.device is not None  # noqa: S101
        assert self.chosen is not None  # noqa: S101
        assert self.receipts is not None  # noqa: S101
        peer = (await self.device.state()).peers.get(self.chosen.wireguard_key)
        if peer is not None:
            self.receipts.observe(Counters(up=peer.tx_bytes, down=peer.rx_bytes))

    async def _serve_receipts(self) -> None:
        assert self.chosen is not None  # noqa: S101
        assert self.receipts is not None  # noqa: S101
        queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue(maxsize=64)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Inbox(queue), local_addr=(str(self.chosen.address.ip), CHANNEL_PORT)
        )
        try:
            while True:
                data, addr = await queue.get()
                await self._on_channel(data, addr, transport)
        finally:
            transport.close()

    async def _on_channel(
        self, data: bytes, addr: tuple[str, int], transport: asyncio.BaseTransport
    ) -> None:
        assert self.receipts is not None  # noqa: S101
        session = self.receipts
        if data.startswith(ACK_MAGIC):
            with contextlib.suppress(MessageError):
                session.on_ack(Ack.decode(data))
            return
        try:
            statement = Statement.decode(data)
        except MessageError:
            self._count_reject("bad-statement")
            return
        await self._read_own_counters()
        action = session.on_statement(statement, self.identity.identity_key, now_ms())
        if isinstance(action, StatementRefused):
            if session.refused == 1 or session.refused % 10 == 0:
                log.warning("not signing the relay's statement: %s", action.reason)
            return
        cast("asyncio.DatagramTransport", transport).sendto(action.wire, addr)
        self._save_receipts()

    async def _renew(self) -> None:
        """Ask again before the grant runs out; failures only delay the next try."""
        assert self.chosen is not None  # noqa: S101
        while True:
            grant = self.chosen.grant
            assert grant is not None  # noqa: S101 - background() checked
            wait_s = max(5.0, (grant.expires_ms - now_ms()) / 2000)
            await asyncio.sleep(wait_s)
            entry = self.chosen.entry
            if entry is None:
                return
            renewed = await self._negotiate(entry)
            if renewed is not None and renewed.granted:
                self.chosen = Chosen(**{**self.chosen.__dict__, "grant": renewed})
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
            if self.device is not None:
                peer = (await self.device.state()).peers.get(chosen.wireguard_key)
                if peer is not None:
                    relay |= {
                        "rx_bytes": peer.rx_bytes,
                        "tx_bytes": peer.tx_bytes,
                        "last_handshake": peer.last_handshake,
                    }
        session = None
        if chosen is not None and chosen.grant is not None:
            session = {
                "session_id": chosen.grant.session_id.hex(),
                "price_per_gib": chosen.grant.price_per_gib,
                "expires_ms": chosen.grant.expires_ms,
            }
            if self.receipts is not None:
                signed = self.receipts.signed
                session |= {
                    "bytes_used": self.receipts.counted.total,
                    "bytes_receipted": signed.total_bytes if signed else 0,
                    "cost": self.receipts.cost,
                    "receipt_seq": signed.seq if signed else 0,
                    "acked_seq": self.receipts.acked_seq,
                    "statements_refused": self.receipts.refused,
                }
        return {
            **base,
            "address": str(chosen.address) if chosen else None,
            "relay": relay,
            "session": session,
            "broker": {
                "address": str(self.opts.broker) if self.opts.broker else None,
                "connected": bool(self.link and self.link.connected.is_set()),
            },
            "directory": {
                "relays": len(self.directory.entries),
                "rejected": dict(self.directory.rejected),
            },
            "lockdown": lockdown,
            "lockdown_dropped": await dropped_counts() if lockdown else {},
        }
