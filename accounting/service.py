"""The accounting service: ``meshvpn accounting serve``.

Theory of operation
-------------------
A thin asyncio layer around ``accounting.store`` (which persists what the
pure ``accounting.ledger`` decides). It holds an identity of its own (the
Ed25519 key in its state directory signs epoch statements, earnings reports
and credit notices) and one broker connection with a *persistent session*
(fixed client id, clean_session off) and *manual acknowledgements*:

- ``meshvpn/v1/receipts/+`` (QoS 1): countersigned bundles from relays,
  at-least-once. Messages are taken in batches; each bundle is verified
  (client signature and every relay's countersignature), the batch is
  booked in one transaction, and only then is every message of it
  acknowledged. A crash before the commit leaves the messages unacknowledged,
  so the broker delivers them again, and booking is idempotent. While the
  service is down, the broker queues for it.
- ``meshvpn/v1/announce/+`` (retained): a verified announcement makes its
  signer a known relay. Clients become known by a deposit. Receipts naming
  a party not known yet are parked and booked once parties change.

Every ``--epoch-seconds`` the current epoch closes (one transaction:
emission, Merkle tree, signed ``EpochStatement``, per-relay rewards with
proofs). The statement is published retained on
``meshvpn/v1/epochs/<accounting node id>``, and each relay's signed earnings
report (``accounting.earnings``) on ``meshvpn/v1/earnings/<relay node id>``,
refreshed while its pending epoch grows. Credit: client balances are
checked every second; when a client's status changes (ok <-> exhausted),
a signed ``CreditNotice`` goes out retained on its credit topic, which
relays with our key act on (and, at most every ``credit.REFRESH_MS``, when
only its balance changed, so the client can show what it has left). On
start everything retained is published again.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, ParamSpec, TypeVar

from accounting import booked, credit, earnings
from accounting.epochs import sign_statement
from accounting.ledger import Booking, EpochClose, Outcome, relay_account
from accounting.receipts import ReceiptBundle, unpack_bundles
from accounting.store import RELAY, Ingest, Store
from meshvpn.agent import StateLock
from meshvpn.clock import now_ms
from meshvpn.directory import ANNOUNCE_PREFIX
from meshvpn.identity import Identity, PublicKey, init_identity, mesh_address_of, node_id_of
from meshvpn.messages import Announcement, MessageError, sign, verify
from meshvpn.mqtt import (
    BrokerAddress,
    ControlLink,
    Delivery,
    load_credentials,
    persistent_client_id,
)
from meshvpn.pki import ROLE_ACCOUNTING

log = logging.getLogger("meshvpn.accounting")
P = ParamSpec("P")
T = TypeVar("T")

RECEIPTS_PREFIX: Final = "meshvpn/v1/receipts/"
EPOCHS_PREFIX: Final = "meshvpn/v1/epochs/"
BATCH: Final = 256  # receipts, so messages too: two batches fit the broker's 1,000 in flight
PIPELINE: Final = 2  # batches taken from the broker and not yet acknowledged
RETRY_S: Final = 1.0
CREDIT_CHECK_S: Final = 1.0
REPORT_S: Final = 2.0


def epochs_topic(accounting_node_id: str) -> str:
    return EPOCHS_PREFIX + accounting_node_id


@dataclass(frozen=True)
class ServiceOptions:
    state_dir: Path
    broker: BrokerAddress
    db_url: str | None = None
    epoch_seconds: float = 3600.0
    verify_workers: int | None = None  # processes verifying receipts; None: one per core


def relay_of_announcement(wire: bytes) -> PublicKey:
    """The relay a signed announcement proves (expired or not: the key is what counts)."""
    signed = verify(wire, Announcement)
    ann = signed.message
    assert isinstance(ann, Announcement)  # noqa: S101 - verify() checked the type
    if ann.mesh_address != mesh_address_of(signed.signer).packed:
        raise MessageError("malformed", "mesh address is not the signer's")
    return signed.signer


def decode_all(wires: list[bytes]) -> list[Ingest]:
    out = []
    for wire in wires:
        try:
            out.append(Ingest(ReceiptBundle.decode(wire)))
        except MessageError as exc:
            out.append(Ingest(None, exc.reason))
    return out


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) or 1


def verify_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor | None:
    """Processes that verify receipts (two Ed25519 checks per bundle: CPU-bound, so the
    GIL rules out threads); None for one worker (verify in the service's own process).
    Spawned, not forked: the service has threads by then."""
    if workers <= 1:
        return None
    return concurrent.futures.ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"))


async def _joined(parts: list[asyncio.Future[list[Ingest]]]) -> list[Ingest]:
    return [item for part in await asyncio.gather(*parts) for item in part]


class AccountingService:
    def __init__(self, opts: ServiceOptions) -> None:
        self.opts = opts
        self.workers = opts.verify_workers if opts.verify_workers is not None else cpu_count()
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.identity: Identity = init_identity(opts.state_dir)[0]
        # before anything else: its certificate, from `meshvpn broker enroll KEY --role accounting`
        credentials = load_credentials(opts.state_dir, self.identity, ROLE_ACCOUNTING)
        self.lock = StateLock(opts.state_dir)
        self.store = Store.open(opts.db_url, opts.state_dir)
        self._db_thread = concurrent.futures.ThreadPoolExecutor(1, "ledger")
        self.inbox: asyncio.Queue[Delivery] = asyncio.Queue()
        self.counters: collections.Counter[str] = collections.Counter()
        self._logged: set[str] = set()
        self._dirty: set[PublicKey] = set()  # relays whose pending tally changed
        # client -> (status, balance, when) last published
        self._credit: dict[str, tuple[int, int, int]] = {}
        self._parties = -1  # number of parties at the last unpark
        self._republish = asyncio.Event()
        self._unacked: dict[PublicKey, dict[bytes, int]] = {}  # booked, relay not told yet
        self._ack_ready = asyncio.Event()
        self.link = ControlLink(
            opts.broker,
            name="accounting",
            tls=credentials.context(opts.broker.host),
            subscriptions=[(RECEIPTS_PREFIX + "+", 1), (ANNOUNCE_PREFIX + "+", 1)],
            handler=self._unused,
            persistent_id=persistent_client_id("accounting", self.identity.identity_key),
            on_delivery=self.inbox.put,
            on_connect=self._connected,
        )

    async def _db(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a store call on the one database thread: calls never interleave, so one
        task's transaction never sees (or breaks) another's, and the loop is free."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_thread, functools.partial(fn, *args, **kwargs))

    async def _unused(self, _topic: str, _payload: bytes) -> None:
        raise AssertionError("deliveries go to the inbox")

    async def _connected(self) -> None:
        self._republish.set()

    # ---- running

    async def run(self) -> None:
        self.lock.acquire()
        self._pool = verify_pool(self.workers)
        self.store.set_epoch_start(now_ms())
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "accounting %s: ledger %s, epochs of %g s, broker %s",
            self.identity.node_id,
            self.opts.db_url or self.opts.state_dir / "ledger.db",
            self.opts.epoch_seconds,
            self.opts.broker,
        )
        try:
            async with asyncio.TaskGroup() as tasks:
                jobs = [
                    tasks.create_task(j)
                    for j in (
                        self.link.run(),
                        self._book_loop(),
                        self._ack_loop(),
                        self._epoch_loop(),
                        self._credit_loop(),
                        self._report_loop(),
                    )
                ]
                await stop.wait()
                log.info("stopping")
                for job in jobs:
                    job.cancel()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
            self._db_thread.shutdown(wait=True)
            self.store.close()
            self.lock.release()

    def _once(self, reason: str, message: str) -> None:
        self.counters[reason] += 1
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning("%s; further ones are only counted", message)

    # ---- receipts and announcements

    async def _book_loop(self) -> None:
        """Two stages, in inbox order: batches are verified in the process pool while
        the one before is booked; a batch is acknowledged to the broker only once it is
        committed (and the relays told what their ledger holds)."""
        verified: asyncio.Queue[tuple[list[Delivery], asyncio.Future[list[Ingest]]]]
        verified = asyncio.Queue(maxsize=PIPELINE - 1)
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._verify_stage(verified))
            tasks.create_task(self._book_stage(verified))

    async def _verify_stage(
        self, out: asyncio.Queue[tuple[list[Delivery], asyncio.Future[list[Ingest]]]]
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.inbox.get()]
            wires = self._bundles_of(batch[0])
            while len(wires) < BATCH and not self.inbox.empty():
                batch.append(self.inbox.get_nowait())
                wires += self._bundles_of(batch[-1])
            future: asyncio.Future[list[Ingest]]
            if self._pool is None or not wires:
                future = loop.create_future()
                future.set_result(decode_all(wires))
            else:  # split over the workers: one batch uses every core
                share = -(-len(wires) // self.workers)
                parts = [
                    loop.run_in_executor(self._pool, decode_all, wires[i : i + share])
                    for i in range(0, len(wires), share)
                ]
                future = asyncio.ensure_future(_joined(parts))
            await out.put((batch, future))

    def _bundles_of(self, delivery: Delivery) -> list[bytes]:
        """The bundles a relay packed into one message (none in an announcement). A
        malformed list is passed on whole: decoding rejects and counts it."""
        if not delivery.topic.startswith(RECEIPTS_PREFIX):
            return []
        try:
            return unpack_bundles(delivery.payload)
        except MessageError:
            return [delivery.payload]

    async def _book_stage(
        self, inbox: asyncio.Queue[tuple[list[Delivery], asyncio.Future[list[Ingest]]]]
    ) -> None:
        while True:
            batch, future = await inbox.get()
            items = await future
            while True:
                try:
                    await self._process(batch, items)
                    break
                except Exception:  # the database went away: keep the batch, unacknowledged
                    log.exception("booking failed; retrying in %g s", RETRY_S)
                    await asyncio.sleep(RETRY_S)
            for delivery in batch:
                delivery.ack()

    async def _process(self, batch: list[Delivery], items: list[Ingest]) -> None:
        for d in batch:
            if d.topic.startswith(ANNOUNCE_PREFIX) and d.payload:
                await self._on_announcement(d.payload)
        if not items:
            return
        bookings = await self._db(self.store.book, items, now_ms())
        self._tally(bookings)
        self._acknowledge(booked.covered(items, bookings))

    def _tally(self, bookings: list[Booking]) -> None:
        for booking in bookings:
            self.counters[booking.outcome.value] += 1
            if booking.outcome is Outcome.REJECTED:
                self._once(f"rejected:{booking.reason}", f"rejected a receipt ({booking.reason})")
            elif booking.outcome is Outcome.BOOKED and booking.session is not None:
                self._dirty.update(booking.session.path)

    def _acknowledge(self, covered: dict[PublicKey, dict[bytes, int]]) -> None:
        """Queue telling each relay what the ledger now holds of its sessions
        (accounting.booked); ``_ack_loop`` sends it. Never waits: booking (and the
        broker's acknowledgement of the receipts) must not wait for a publish round
        trip per relay per batch, which bounded ingest to about one batch per three
        round trips. What piles up meanwhile is merged, the highest seq per session."""
        for relay, sessions in covered.items():
            held = self._unacked.setdefault(relay, {})
            for session, seq in sessions.items():
                held[session] = max(seq, held.get(session, 0))
        if covered:
            self._ack_ready.set()

    async def _ack_loop(self) -> None:
        """Best effort: a relay that misses an ack sends the bundle again and is acked again."""
        while True:
            await self._ack_ready.wait()
            self._ack_ready.clear()
            pending, self._unacked = self._unacked, {}
            now = now_ms()
            for relay, sessions in sorted(pending.items()):
                for ack in booked.build_acks(relay, sessions, now):
                    wire = sign(ack, self.identity.identity_key)
                    if await self.link.publish(booked.booked_topic(node_id_of(relay)), wire):
                        self.counters["booked-acks"] += 1

    async def _on_announcement(self, wire: bytes) -> None:
        try:
            relay = relay_of_announcement(wire)
        except MessageError as exc:
            self._once(f"announcement:{exc.reason}", f"ignored an announcement ({exc.reason})")
            return
        if await self._db(self.store.register, relay, RELAY, now_ms()):
            log.info("relay %s is known now", node_id_of(relay))

    # ---- epochs and earnings

    def _sign(self, close: EpochClose) -> bytes:
        return sign_statement(close, self.identity.identity_key)

    async def _epoch_loop(self) -> None:
        period_ms = int(self.opts.epoch_seconds * 1000)
        while True:
            epoch, start_ms = await self._db(self.store.current_epoch)
            due = start_ms + period_ms
            now = now_ms()
            if now < due:
                await asyncio.sleep(min((due - now) / 1000, 1.0))
                continue
            close, statement = await self._db(self.store.close_epoch, due, self._sign)
            log.info(
                "epoch %d closed: %d relay(s) rewarded, %d emitted, %d carried, root %s",
                epoch,
                len(close.rewards),
                close.emitted,
                close.carried,
                close.tree.root.hex()[:16],
            )
            await self._publish_epoch(statement)
            self._dirty.update(close.earned)

    async def _publish_epoch(self, statement: bytes) -> None:
        await self.link.publish(epochs_topic(self.identity.node_id), statement, retain=True)

    def _reports(self, relays: set[PublicKey]) -> list[tuple[str, bytes]]:
        statements = {e.epoch: e.statement for e in self.store.epochs()}
        out = []
        for relay in sorted(relays):
            report = earnings.build_report(
                self.identity.identity_public,
                relay,
                self.store.balance(relay_account(relay)),
                self.store.pending(relay),
                self.store.rewards(relay),
                statements,
                now_ms(),
            )
            wire = earnings.sign_report(report, self.identity.identity_key)
            out.append((earnings.earnings_topic(node_id_of(relay)), wire))
        return out

    async def _report_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._republish.wait(), REPORT_S)
            if not self.link.connected.is_set():
                continue
            if self._republish.is_set():
                self._republish.clear()
                self._credit.clear()  # every notice goes out again
                epochs = await self._db(self.store.epochs)
                if epochs:
                    await self._publish_epoch(epochs[-1].statement)
                self._dirty.update(await self._db(self.store.relays))
            relays, self._dirty = self._dirty, set()
            if not relays:
                continue
            for topic, wire in await self._db(self._reports, relays):
                if not await self.link.publish(topic, wire, retain=True):
                    self._dirty.update(relays)  # not connected: next time
                    break

    # ---- credit

    async def _credit_loop(self) -> None:
        while True:
            await asyncio.sleep(CREDIT_CHECK_S)
            parties = await self._db(self._party_count)
            if parties != self._parties:
                self._parties = parties
                while done := await self._db(self._unpark):
                    self._acknowledge(done)
            if not self.link.connected.is_set():
                continue
            balances = await self._db(self.store.client_balances)
            now = now_ms()
            for client, balance in sorted(balances.items()):
                notice = credit.notice_for(client, balance, now)
                held = self._credit.get(client)
                if held is not None and not credit.worth_telling(held, notice):
                    continue
                wire = sign(notice, self.identity.identity_key)
                if await self.link.publish(credit.credit_topic(client), wire, retain=True):
                    self._credit[client] = (notice.status, notice.credit, now)
                    log.info(
                        "client %s: credit %s (balance %d)",
                        client,
                        "ok" if notice.ok else "EXHAUSTED: relays cut it off",
                        balance,
                    )

    def _party_count(self) -> int:
        return len(self.store.parties("client")) + len(self.store.parties(RELAY))

    def _unpark(self) -> dict[PublicKey, dict[bytes, int]]:
        """Book parked receipts again; what got booked, per relay (there may be more)."""
        if not self.store.parked_count():
            return {}
        bookings = self.store.unpark(now_ms())
        done: dict[PublicKey, dict[bytes, int]] = collections.defaultdict(dict)
        for b in bookings:
            if b.outcome is Outcome.BOOKED and b.session is not None:
                self._dirty.update(b.session.path)
                for relay in b.session.path:
                    done[relay][b.session_id] = b.session.seq
        if done:
            log.info(
                "booked %d parked receipt(s)", sum(b.outcome is Outcome.BOOKED for b in bookings)
            )
        return dict(done)
