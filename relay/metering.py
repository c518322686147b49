"""The relay's receipt desk: metering, statements, countersigning, delivery.

Thin asyncio adapter around ``accounting.exchange.RelaySession`` (one per
session): it reads the WireGuard counters every ``READ_INTERVAL_S``, sends the
statements the sessions ask for to the clients' tunnel addresses, takes
receipts on UDP ``CHANNEL_PORT`` at the relay's tunnel gateway address,
journals each countersigned bundle durably before acknowledging it, and hands
the newest bundle per session to the broker (QoS 1) until accounting's signed
``BookedAck`` covers it (``relay.delivery`` decides when to re-send; without
an accounting key, until the broker has it).
Python never touches the clients' packets; only WireGuard's counters.

A session whose peer sits at a mesh address is the end-to-end session of a
multi-hop client and this relay its exit: statements name the path
``relay.paths`` traced, and an accepted receipt is journaled as collecting,
acknowledged, and handed to ``relay.paths`` to gather the other relays'
countersignatures; only the complete bundle is journaled for delivery.

Checking a receipt costs an Ed25519 verification, so datagrams on the channel
are rate-limited per session and for all sessions together before anything
is verified (an honest client answers one statement at a time: far below
either limit); what is over is dropped and counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

from accounting.booked import read_ack
from accounting.exchange import (
    CHANNEL_PORT,
    READ_INTERVAL_S,
    ClientCutOff,
    Counters,
    Meter,
    ReceiptCountersigned,
    ReceiptRejected,
    RelaySession,
    SendStatement,
    Terms,
)
from accounting.receipts import GIB, PartialBundle, ReceiptBundle, pack_bundles
from meshvpn.broker import MAX_PAYLOAD
from meshvpn.clock import now_ms
from meshvpn.identity import Identity, PublicKey
from meshvpn.messages import MessageError
from meshvpn.mqtt import ControlLink
from meshvpn.ratelimit import RateTable, TokenBucket
from meshvpn.wireguard.backend import WireGuardDevice
from meshvpn.wireguard.model import Endpoint
from relay.delivery import Courier
from relay.journal import Journal
from relay.mesh import MESH_RANGE
from relay.paths import PathService
from relay.sessions import Session

log = logging.getLogger("meshvpn.metering")

FORWARD_INTERVAL_S: Final = 1.0
MAX_CUT_OFFS_KEPT: Final = 20
METER_SAVE_S: Final = 1.0
RECEIPTS_BURST: Final = 50  # datagrams per session...
RECEIPTS_REFILL_MS: Final = 20  # ...50 per second sustained
ALL_RECEIPTS_BURST: Final = 1_000  # all sessions together: about a tenth of a core
ALL_RECEIPTS_REFILL_MS: Final = 1
MAX_RATE_KEYS: Final = 65_536

CutOff = Callable[[PublicKey, str, bool], Awaitable[None]]  # key, reason, abusive


def receipts_topic(node_id: str) -> str:
    return f"meshvpn/v1/receipts/{node_id}"


@dataclass
class _Open:
    session: Session
    exchange: RelaySession
    last_receipt_ms: int = 0
    mesh_source: ipaddress.IPv6Address | None = None  # multi-hop: the client's mesh address


class _Channel(asyncio.DatagramProtocol):
    def __init__(self, desk: ReceiptDesk) -> None:
        self.desk = desk
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.DatagramTransport", transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.desk.on_datagram(data, str(addr[0]), int(addr[1]))


class ReceiptDesk:
    def __init__(
        self, identity: Identity, journal_path: Path, accounting_key: PublicKey | None = None
    ) -> None:
        self.identity = identity
        self.journal = Journal(journal_path)
        self.accounting_key = accounting_key
        self.courier = Courier(end_to_end=accounting_key is not None)
        self.open: dict[PublicKey, _Open] = {}
        self.by_address: dict[str, PublicKey] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self._logged: set[str] = set()
        self._channel: _Channel | None = None
        self._deliver = asyncio.Event()
        self.cut_offs: list[dict[str, Any]] = []  # the latest few, for status and alerts
        self._per_session: RateTable[str] = RateTable(
            RECEIPTS_BURST, RECEIPTS_REFILL_MS, MAX_RATE_KEYS
        )
        self._overall = TokenBucket(ALL_RECEIPTS_BURST, ALL_RECEIPTS_REFILL_MS)
        self.paths: PathService | None = None  # a mesh relay's multi-hop receipts
        self._resume: list[bytes] = []

    def use_paths(self, paths: PathService) -> None:
        """Multi-hop sessions from now on; resumes what was collecting before a restart."""
        self.paths = paths
        paths.on_complete = self._completed
        self._resume = self.journal.collecting()

    def _completed(self, bundle: ReceiptBundle) -> None:
        self.journal.complete(bundle, now_ms())
        self.counters["path-receipts-complete"] += 1
        self._deliver.set()

    # ---- sessions come and go

    def start(self, session: Session) -> None:
        """Meter a session from now on (or again, after a restart)."""
        if session.wireguard_key in self.open:
            return
        terms = Terms(
            session_id=session.session_id,
            client=session.client_identity,
            path=(self.identity.identity_public,),
            price_per_gib=session.price_per_gib,
            started_ms=session.granted_ms,
        )
        exchange = RelaySession(terms)
        latest = self.journal.latest(session.session_id)
        restored = self.journal.meter(session.session_id)
        if latest is not None:
            exchange.receipted = latest.receipt
            # what the client answered: without it the whole session would count as
            # unanswered after a restart, over any allowance (an abusive cut-off)
            exchange.answered = Counters(latest.receipt.bytes_up, latest.receipt.bytes_down)
            restored = Counters(
                max(restored.up, latest.receipt.bytes_up),
                max(restored.down, latest.receipt.bytes_down),
            )
            exchange.seq = latest.receipt.seq
        # a receipt still collecting countersignatures was acknowledged too
        exchange.seq = max(exchange.seq, self.journal.latest_seq(session.session_id))
        exchange.meter = Meter(restored)  # the device's counters start again from zero
        exchange.stated = restored
        self.open[session.wireguard_key] = _Open(session, exchange)
        self.by_address[str(session.address)] = session.wireguard_key

    def stop(self, key: PublicKey) -> None:
        held = self.open.pop(key, None)
        if held is not None:
            self.journal.save_meter(held.session.session_id, held.exchange.counted)
            self.by_address.pop(str(held.session.address), None)

    def close(self) -> None:
        for key in list(self.open):
            self.stop(key)
        self.journal.close()

    # ---- the loops

    async def serve_channel(self, gateway: ipaddress.IPv4Address) -> None:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _Channel(self), local_addr=(str(gateway), CHANNEL_PORT)
        )
        self._channel = protocol
        try:
            await asyncio.Event().wait()
        finally:
            transport.close()

    async def meter(self, device: WireGuardDevice, cut_off: CutOff) -> None:
        last_save = 0.0
        while True:
            await asyncio.sleep(READ_INTERVAL_S)
            if not self.open:
                continue
            peers = (await device.state()).peers
            now = now_ms()
            for key, held in list(self.open.items()):
                peer = peers.get(key)
                if peer is None:
                    continue
                raw = Counters(up=peer.rx_bytes, down=peer.tx_bytes)
                self._follow_path(held, peer.spec.endpoint)
                sent_before = held.exchange.seq
                for action in held.exchange.observe(raw, now):
                    if isinstance(action, SendStatement):
                        self._send(action.statement.encode(), str(held.session.address))
                        again = action.statement.seq == sent_before
                        self.counters["statements-resent" if again else "statements"] += 1
                    elif isinstance(action, ClientCutOff):
                        self.counters["cut-off"] += 1
                        self.cut_offs.append(
                            {
                                "client_id": held.session.client_identity.b64,
                                "reason": action.reason,
                                "bytes_unreceipted": action.unreceipted.total,
                                "allowance": action.allowance,
                                "bytes_last_reading": action.reading,
                                "at_ms": now,
                            }
                        )
                        del self.cut_offs[:-MAX_CUT_OFFS_KEPT]
                        log.warning(
                            "cut off client %s… at %s: %s",
                            held.session.client_identity.b64[:8],
                            held.session.address,
                            action.reason,
                        )
                        await cut_off(key, action.reason, action.abusive)
            if time.monotonic() - last_save > METER_SAVE_S:
                last_save = time.monotonic()
                for held in self.open.values():
                    self.journal.save_meter(held.session.session_id, held.exchange.counted)

    def _follow_path(self, held: _Open, endpoint: Endpoint | None) -> None:
        host = endpoint.host if endpoint is not None else None
        if self.paths is None or not isinstance(host, ipaddress.IPv6Address):
            return
        if host not in MESH_RANGE:
            return
        if host != held.mesh_source and held.mesh_source is not None:
            self.paths.forget(held.mesh_source)  # the client moved to another entry
        held.mesh_source = host
        held.exchange.path = self.paths.path_for(host)
        if self._resume:  # after a restart: collect again what was collecting
            keep = []
            for wire in self._resume:
                try:
                    partial = PartialBundle.start(wire)
                    if partial.receipt.session_id != held.session.session_id:
                        keep.append(wire)
                        continue
                    self.paths.collect(partial.sign(self.identity.identity_key), host)
                except MessageError:
                    continue
            self._resume = keep

    async def deliver(self, link: ControlLink | None) -> None:
        """At-least-once to accounting: the newest bundle per session, until accounting
        acknowledges it (or, without an accounting key, until the broker has it)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._deliver.wait(), FORWARD_INTERVAL_S)
            self._deliver.clear()
            if link is None or not link.connected.is_set():
                continue
            now = now_ms()
            due = self.courier.due(self.journal.pending(), now)
            at = 0
            for count, message in pack_bundles([p.bundle for p in due], MAX_PAYLOAD):
                if not await link.publish(receipts_topic(self.identity.node_id), message):
                    break
                for item in due[at : at + count]:
                    again = item.session_id in self.courier.attempts
                    self.counters["resent" if again else "sent"] += 1
                    if self.courier.sent(item, now):
                        self.journal.mark_delivered(item.session_id, item.seq)
                        self.counters["delivered"] += 1
                at += count

    def on_booked(self, topic: str, wire: bytes) -> None:
        """Accounting's ``BookedAck``: what it covers is delivered. Ignored without a key."""
        if self.accounting_key is None:
            return
        try:
            ack = read_ack(topic, wire, self.accounting_key, self.identity.identity_public)
        except MessageError as exc:
            self._reject(f"booked-ack:{exc.reason}", topic)
            return
        self.counters["booked-acks"] += 1
        for session_id, seq in ack.sessions:
            if self.journal.mark_delivered(session_id, seq):
                self.counters["delivered"] += 1
        self.courier.acked(ack.sessions)

    # ---- datagrams from clients

    def _send(self, data: bytes, address: str) -> None:
        if self._channel is not None and self._channel.transport is not None:
            self._channel.transport.sendto(data, (address, CHANNEL_PORT))

    def on_datagram(self, data: bytes, source: str, port: int) -> None:
        key = self.by_address.get(source)
        held = self.open.get(key) if key is not None else None
        if held is None:
            self._reject("unknown-source", source)
            return
        now = now_ms()
        if not self._per_session.allow(source, now) or not self._overall.allow(now):
            self._reject("rate-limited", source)
            return
        for action in held.exchange.on_receipt(data, self.identity.identity_key, now):
            if isinstance(action, ReceiptCountersigned):
                # on disk before the client hears "ok"
                if action.partial.complete:
                    self.journal.record(action.bundle, now)
                else:
                    self.journal.record_partial(action.partial, now)
                    if self.paths is not None and held.mesh_source is not None:
                        self.paths.collect(action.partial, held.mesh_source)
                self.journal.save_meter(held.session.session_id, held.exchange.counted)
                held.last_receipt_ms = now
                self.counters["receipts"] += 1
                if self._channel is not None and self._channel.transport is not None:
                    self._channel.transport.sendto(action.ack.encode(), (source, port))
                self._deliver.set()
            elif isinstance(action, ReceiptRejected):
                self._reject(action.reason, source)

    def _reject(self, reason: str, source: str) -> None:
        self.counters[f"receipt-rejected:{reason}"] += 1
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning(
                "rejected a receipt from %s (%s); further ones are only counted", source, reason
            )

    # ---- status

    def session_status(self, key: PublicKey) -> dict[str, Any] | None:
        held = self.open.get(key)
        if held is None:
            return None
        ex = held.exchange
        receipted = ex.receipted_counters
        return {
            "state": ex.state.value,
            "bytes_counted": ex.counted.total,
            "bytes_counted_up": ex.counted.up,
            "bytes_counted_down": ex.counted.down,
            "bytes_receipted": receipted.total,
            "bytes_unreceipted": ex.unreceipted.total,
            "allowance": ex.allowance,
            "statements_resent": ex.resent,
            "bytes_lost_forgiven": max(0, ex.answered.total - receipted.total),
            "receipt_seq": ex.receipted.seq if ex.receipted else 0,
            "last_receipt_ms": held.last_receipt_ms or None,
            "price_per_gib": held.session.price_per_gib,
            "revenue": receipted.total * held.session.price_per_gib // GIB,
            "receipts_rejected": ex.rejected,
            "path": [k.b64 for k in ex.path] if len(ex.path) > 1 else None,
        }

    def summary(self) -> dict[str, Any]:
        return {
            "pending_delivery": self.journal.pending_count(),
            "awaiting_booked_ack": self.courier.resends(),
            "cut_offs": self.cut_offs,
            "paths": self.paths.status() if self.paths is not None else None,
            **dict(self.counters),
        }
