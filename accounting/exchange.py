"""The receipt exchange between a relay and its client. Pure.

Theory of operation
-------------------
Both ends count the session's bytes from their WireGuard counters through a
``Meter`` (cumulative, and safe against counter resets: a re-added peer or a
restarted wireguard-go starts again from zero, and we neither lose nor
double-count across that).

On the schedule the grant set (every ``interval_s`` or ``interval_bytes``,
whichever comes first) the relay sends a ``Statement`` of its counts through
the tunnel. The client signs, per direction, the stated number capped at its
own count plus ``tolerance(own)`` (packets in flight), as a cumulative
``Receipt``, and sends it back. The client pays for what reached it, not for
what was lost on the way: the two counts differ by the path's loss (9 % in
this lab, where wireguard-go's small socket buffer drops bursts).

Where the statement exceeds what loss can explain (more than ``MAX_LOSS_PCT``
above the client's count plus tolerance), the client refuses and says so: an
inflating relay gets no signature. The relay accepts a receipt only for a
statement it made, never above it, and not below it by more than the same
loss allowance ("under-signed"), newer than the last it accepted; then it
countersigns and (in the agent) journals the bundle *before* acknowledging.
So an honest pair always agrees, a relay can over-bill by at most the
tolerance (1 %), and a client can under-pay by at most the loss allowance.
(A session's first bursts may lose more, 22 % of a download's first 30 MB in
this lab: the client refuses those statements, and signs a later one once
its cumulative loss is back under the allowance; the cut-off allowance below
covers the wait.)

Cut-off: the relay tracks *unanswered* bytes (counted minus what the last
accepted receipt answered) and the statements waiting for an answer. Statements
and receipts are single datagrams through the session's own tunnel, which at
full rate drops packets (a UDP flood fills the client's TUN queue and the
relay's socket buffer: most of its packets are lost), so the relay sends the
newest statement again after ``RESEND_MS`` until a receipt answers it (the
client answers a statement it already signed with the same receipt; the
wait doubles up to ``RESEND_MAX_MS`` while no new statement is due, for a
client that is gone; at full rate a new one is due every 8 MiB anyway), and
judges the client only on statements it really sent: its own stalls are not
the client's silence. The session is cut off

- when the unanswered bytes pass the *allowance*: the bytes the session carried
  in the last ``ALLOWANCE_S`` seconds, at least ``grace_bytes`` (64 MiB), at
  most ``ALLOWANCE_CAP`` (256 MiB). An honest client at a steady rate can lose
  every statement and receipt for ``ALLOWANCE_S`` seconds less a statement
  interval, a round trip and a resend (about 3 s at 300 Mbit/s, 15 chances to
  answer), and not be cut (above 512 Mbit/s the cap shortens that); one that
  stopped answering costs the relay about the allowance, at most
  ``ALLOWANCE_CAP`` plus one reading's traffic (``READ_INTERVAL_S``) at any
  rate;
- or when a statement has waited ``grace_s`` (30 s) unanswered while sent
  again: a quiet client, not abusive unless it sent bad receipts.

Neither rule fires before the client has had two statements (or one and a
resend) to answer. A multi-hop exit whose traced path changed (the client
moved to another entry) states afresh at once, naming the new path, rather than
re-sending a statement the client can no longer sign.

Multi-hop: the exit's statements may name the path (``Statement`` v2, set in
``RelaySession.path`` by ``relay.paths``); the client signs only a path that
ends at its exit and starts at its entry (``ClientSession.entry``), the exit
accepts only the path it stated, and its countersignature is the first of
several (``ReceiptCountersigned.partial``); the other relays on the path
vouch for the bytes with ``backed`` against their own counts.

Relay states (one table)::

    ACTIVE --receipt ok--> ACTIVE (receipted advances)
    ACTIVE --bad receipt--> ACTIVE (counted, rejected; grace keeps running)
    ACTIVE --statement due, or unanswered RESEND_MS--> ACTIVE (SendStatement)
    ACTIVE --over the allowance, or unanswered grace_s--> CUT_OFF (terminal)
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Final

from accounting.receipts import (
    MAX_PATH,
    PartialBundle,
    Receipt,
    ReceiptBundle,
    sign_receipt,
    verify_receipt,
)
from meshvpn.identity import PrivateKey, PublicKey
from meshvpn.messages import MessageError

MIB: Final = 1 << 20
READ_INTERVAL_S: Final = 0.1
DEFAULT_INTERVAL_S: Final = 10
DEFAULT_INTERVAL_BYTES: Final = 8 * MIB
DEFAULT_GRACE_BYTES: Final = 64 * MIB
RESEND_MS: Final = 200  # an unanswered statement goes out again after this long,
RESEND_MAX_MS: Final = 2_000  # doubling up to this while no new one is due (a gone client)
ALLOWANCE_S: Final = 4  # the allowance: this many seconds of the session's traffic...
ALLOWANCE_CAP: Final = 256 * MIB  # ...at most (and at least the grant's grace_bytes)
ALLOWANCE_STEP_MS: Final = 250  # resolution of the traffic history behind the allowance
LATE_SENDS: Final = 2  # statements sent unanswered before a rule may cut
DEFAULT_GRACE_S: Final = 30
TOLERANCE_MIN: Final = 256 * 1024
TOLERANCE_SHARE: Final = 100  # 1 %
MAX_LOSS_PCT: Final = 20  # loss between relay and client that still counts as honest
REMEMBERED_VERDICTS: Final = 64  # refused statements a client remembers (resends come for seconds)
RECENT_STATEMENTS: Final = 16
CHANNEL_PORT: Final = 51822  # UDP, inside the tunnel, on both ends' tunnel addresses


def tolerance(own: int) -> int:
    """How far above its own count a client signs: packets still in flight."""
    return max(TOLERANCE_MIN, own // TOLERANCE_SHARE)


def plausible(own: int) -> int:
    """The most a relay may state for ``own`` received bytes before it is inflating."""
    return (own + tolerance(own)) * 100 // (100 - MAX_LOSS_PCT)


def least_acceptable(stated: int) -> int:
    """The least a relay accepts a client to sign for ``stated`` bytes (loss allowance)."""
    return max(0, stated * (100 - MAX_LOSS_PCT) // 100 - tolerance(stated))


def backed(stated_up: int, stated_down: int, own: Counters) -> bool:
    """May a relay on a path vouch for these receipted bytes, given what it counted
    for the session's flow? Up to its count plus ``tolerance`` (packets in flight
    past it). Its count is of IPv6 packets carrying the session's WireGuard
    datagrams, 48 bytes a packet above what the exit's WireGuard counts, so an
    honest receipt (the exit's count, less the client's loss) stays below it."""
    return stated_up <= own.up + tolerance(own.up) and stated_down <= own.down + tolerance(own.down)


@dataclass(frozen=True)
class Counters:
    up: int = 0  # client to internet
    down: int = 0  # internet to client

    @property
    def total(self) -> int:
        return self.up + self.down

    def __sub__(self, other: Counters) -> Counters:
        return Counters(max(0, self.up - other.up), max(0, self.down - other.down))


@dataclass(frozen=True)
class Meter:
    """Cumulative bytes from raw device counters that may reset to zero.

    A reset the agent knows of (it re-added the peer, wireguard-go restarted) is
    announced with ``reset()``; one it does not know of is caught when a counter
    goes down. (A reset followed by more traffic than before, unannounced, is
    invisible to anyone: hence the agent announces every one it causes.)
    """

    total: Counters = Counters()
    last_raw: Counters | None = None

    def feed(self, raw: Counters) -> Meter:
        # A first reading (fresh session, or restored after a restart that reset the
        # device's counters) counts everything the device has seen so far.
        if self.last_raw is None:
            return Meter(Counters(self.total.up + raw.up, self.total.down + raw.down), raw)
        up = raw.up - self.last_raw.up if raw.up >= self.last_raw.up else raw.up
        down = raw.down - self.last_raw.down if raw.down >= self.last_raw.down else raw.down
        return Meter(Counters(self.total.up + up, self.total.down + down), raw)

    def reset(self) -> Meter:
        """The device's counters restarted from zero: the next reading counts in full."""
        return Meter(self.total, None)


# ---- messages on the tunnel channel (WireGuard authenticates who sent them)

_STATEMENT: Final = struct.Struct("!4s16sQQQQ")
_ACK: Final = struct.Struct("!4s16sQ")
STATEMENT_MAGIC: Final = b"MVS1"
PATH_STATEMENT_MAGIC: Final = b"MVS2"
ACK_MAGIC: Final = b"MVK1"
KEY_SIZE: Final = 32


@dataclass(frozen=True)
class Statement:
    """The relay's counts. Version 1 (``MVS1``) for a path of one relay, as
    before; version 2 (``MVS2``) adds the path the receipt is to name, when a
    multi-hop exit knows it: the v1 fields, then ``count:u8 | count x key:32``
    (relay identity keys: entry, transit..., exit)."""

    session_id: bytes
    seq: int
    counters: Counters
    issued_ms: int
    path: tuple[PublicKey, ...] = ()  # empty: the receipt names the session's own path

    def encode(self) -> bytes:
        magic = PATH_STATEMENT_MAGIC if self.path else STATEMENT_MAGIC
        head = _STATEMENT.pack(
            magic,
            self.session_id,
            self.seq,
            self.counters.up,
            self.counters.down,
            self.issued_ms,
        )
        if not self.path:
            return head
        return head + bytes([len(self.path)]) + b"".join(k.raw for k in self.path)

    @classmethod
    def decode(cls, wire: bytes) -> Statement:
        if wire.startswith(PATH_STATEMENT_MAGIC) and len(wire) > _STATEMENT.size:
            count = wire[_STATEMENT.size]
            keys = wire[_STATEMENT.size + 1 :]
            if not 1 < count <= MAX_PATH or len(keys) != count * KEY_SIZE:
                raise MessageError("malformed", "statement path")
            try:
                path = tuple(
                    PublicKey(keys[i * KEY_SIZE : (i + 1) * KEY_SIZE]) for i in range(count)
                )
            except ValueError:
                raise MessageError("malformed", "statement path key") from None
            _, session_id, seq, up, down, issued = _STATEMENT.unpack_from(wire)
            return cls(session_id, seq, Counters(up, down), issued, path)
        if len(wire) != _STATEMENT.size or not wire.startswith(STATEMENT_MAGIC):
            raise MessageError("malformed", "not a statement")
        _, session_id, seq, up, down, issued = _STATEMENT.unpack(wire)
        return cls(session_id, seq, Counters(up, down), issued)


@dataclass(frozen=True)
class Ack:
    session_id: bytes
    seq: int

    def encode(self) -> bytes:
        return _ACK.pack(ACK_MAGIC, self.session_id, self.seq)

    @classmethod
    def decode(cls, wire: bytes) -> Ack:
        if len(wire) != _ACK.size or not wire.startswith(ACK_MAGIC):
            raise MessageError("malformed", "not an ack")
        _, session_id, seq = _ACK.unpack(wire)
        return cls(session_id, seq)


# ---- the relay's side


class RelayState(enum.Enum):
    ACTIVE = "active"
    CUT_OFF = "cut-off"


@dataclass(frozen=True)
class Terms:
    """What the grant fixed for the session."""

    session_id: bytes
    client: PublicKey
    path: tuple[PublicKey, ...]
    price_per_gib: int
    started_ms: int
    interval_s: int = DEFAULT_INTERVAL_S
    interval_bytes: int = DEFAULT_INTERVAL_BYTES
    grace_bytes: int = DEFAULT_GRACE_BYTES
    grace_s: int = DEFAULT_GRACE_S


@dataclass(frozen=True)
class SendStatement:
    statement: Statement


@dataclass(frozen=True)
class ReceiptCountersigned:
    partial: PartialBundle  # complete on a one-relay path; else the others still sign
    ack: Ack

    @property
    def bundle(self) -> ReceiptBundle:
        """The finished bundle (one-relay paths: at once)."""
        return self.partial.bundle()


@dataclass(frozen=True)
class ReceiptRejected:
    reason: str


@dataclass(frozen=True)
class ClientCutOff:
    reason: str
    unreceipted: Counters
    # True when the client took more than the allowance without paying, or sent bad
    # receipts; False when it merely went quiet (it may have disconnected mid-interval).
    abusive: bool
    allowance: int = 0  # the allowance in force when it was cut
    reading: int = 0  # bytes the last counter reading added (the overshoot's bound)


RelayAction = SendStatement | ReceiptCountersigned | ReceiptRejected | ClientCutOff


@dataclass
class RelaySession:
    terms: Terms
    meter: Meter = field(default_factory=Meter)
    receipted: Receipt | None = None
    answered: Counters = Counters()  # the statement the last accepted receipt answered
    last_receipt_ms: int = 0
    state: RelayState = RelayState.ACTIVE
    seq: int = 0
    stated: Counters = Counters()
    stated_ms: int = 0
    recent: dict[int, Statement] = field(default_factory=dict)
    rejected: int = 0
    # A multi-hop exit's path as last traced (entry, transit..., exit); statements
    # name it once it has more than one relay (see relay.paths).
    path: tuple[PublicKey, ...] = ()
    # The wait for a receipt: when the oldest unanswered statement was first sent
    # (0: none is), how many sends (new statements and re-sends) went unanswered
    # since, and when the newest one last went out.
    waiting_since_ms: int = 0
    sends: int = 0
    sent_ms: int = 0
    resent: int = 0
    # (ms, counted total) about every ALLOWANCE_STEP_MS, the oldest at or before
    # ALLOWANCE_S ago: the traffic the allowance is made of.
    history: list[tuple[int, int]] = field(default_factory=list)
    _reading: int = 0
    _resends: int = 0  # of the newest statement

    @property
    def counted(self) -> Counters:
        return self.meter.total

    @property
    def receipted_counters(self) -> Counters:
        r = self.receipted
        return Counters(r.bytes_up, r.bytes_down) if r else Counters()

    @property
    def unreceipted(self) -> Counters:
        """Bytes no receipt has answered yet (what a cut-off is about)."""
        return self.counted - self.answered

    @property
    def allowance(self) -> int:
        """How many unanswered bytes the session may owe: its traffic over the last
        ``ALLOWANCE_S`` seconds, at least ``grace_bytes``, at most ``ALLOWANCE_CAP``."""
        base = self.history[0][1] if self.history else self.counted.total
        recent = self.counted.total - base
        return max(self.terms.grace_bytes, min(ALLOWANCE_CAP, recent))

    def observe(self, raw: Counters, now_ms: int) -> list[RelayAction]:
        """New counter reading: maybe a statement is due (or due again), maybe the
        client is cut off."""
        if self.state is RelayState.CUT_OFF:
            return []
        before = self.counted.total
        self.meter = self.meter.feed(raw)
        self._reading = self.counted.total - before
        if not self.history:  # the session's traffic counts from where it was
            self.history.append((now_ms, before))
        self._remember(now_ms)
        owed = self.unreceipted
        late = self.sends >= LATE_SENDS
        if late and owed.total > self.allowance:
            return self._cut(
                f"{owed.total} bytes unreceipted, over the allowance ({self.allowance})",
                abusive=True,
            )
        waited_ms = now_ms - self.waiting_since_ms if self.waiting_since_ms else 0
        if late and owed.total and waited_ms > self.terms.grace_s * 1000:
            return self._cut(f"no receipt for {waited_ms // 1000} s", abusive=self.rejected > 0)
        new = self.counted - self.stated
        due_time = now_ms - self.stated_ms >= self.terms.interval_s * 1000
        due_bytes = new.total >= self.terms.interval_bytes
        if new.total and (due_time or due_bytes):
            return [SendStatement(self._state(now_ms))]
        if not self.waiting_since_ms:
            return []
        newest = self.recent.get(self.seq)
        if newest is None or newest.path != self._stated_path():
            return [SendStatement(self._state(now_ms))]  # the path moved: state anew, now
        if now_ms - self.sent_ms >= min(RESEND_MAX_MS, RESEND_MS << min(self._resends, 8)):
            self.sends += 1
            self.resent += 1
            self._resends += 1
            self.sent_ms = now_ms
            return [SendStatement(newest)]
        return []

    def _remember(self, now_ms: int) -> None:
        history = self.history
        if not history or now_ms - history[-1][0] >= ALLOWANCE_STEP_MS:
            history.append((now_ms, self.counted.total))
        start = now_ms - ALLOWANCE_S * 1000
        while len(history) > 1 and history[1][0] <= start:
            del history[0]

    def _stated_path(self) -> tuple[PublicKey, ...]:
        return self.path if len(self.path) > 1 else ()

    def _state(self, now_ms: int) -> Statement:
        self.seq += 1
        self.stated, self.stated_ms = self.counted, now_ms
        statement = Statement(
            self.terms.session_id, self.seq, self.counted, now_ms, self._stated_path()
        )
        self.recent[self.seq] = statement
        for old in [s for s in self.recent if s <= self.seq - RECENT_STATEMENTS]:
            del self.recent[old]
        if not self.waiting_since_ms:
            self.waiting_since_ms = now_ms
        self.sends += 1
        self.sent_ms = now_ms
        self._resends = 0
        return statement

    def _cut(self, reason: str, *, abusive: bool) -> list[RelayAction]:
        self.state = RelayState.CUT_OFF
        return [ClientCutOff(reason, self.unreceipted, abusive, self.allowance, self._reading)]

    def on_receipt(self, wire: bytes, relay_key: PrivateKey, now_ms: int) -> list[RelayAction]:
        if self.state is RelayState.CUT_OFF:
            return [self._reject("session cut off")]
        try:
            receipt = verify_receipt(wire)
        except MessageError as exc:
            return [self._reject(exc.reason)]
        t = self.terms
        if (receipt.session_id, receipt.client) != (t.session_id, t.client):
            return [self._reject("not this session")]
        if receipt.price_per_gib != t.price_per_gib:  # started_ms is the client's own note
            return [self._reject("terms differ from the grant")]
        if self.receipted is not None and receipt.seq <= self.receipted.seq:
            # Re-sent statements are answered again, and a late answer may come
            # after a newer one: rejected, but no sign of a bad client.
            return [ReceiptRejected("replayed")]
        stated = self.recent.get(receipt.seq)
        if stated is None:
            return [self._reject("no such statement")]
        if receipt.path != (stated.path or t.path):
            return [self._reject("not the stated path")]
        signed, claim = Counters(receipt.bytes_up, receipt.bytes_down), stated.counters
        if signed.up > claim.up or signed.down > claim.down:
            return [self._reject("over-signed")]
        if signed.up < least_acceptable(claim.up) or signed.down < least_acceptable(claim.down):
            return [self._reject("under-signed")]
        if self.receipted is not None and (
            signed.up < self.receipted.bytes_up or signed.down < self.receipted.bytes_down
        ):
            return [self._reject("not cumulative")]
        self.receipted = receipt
        self.answered = claim
        self.last_receipt_ms = now_ms
        # statements after the answered one still wait, since the first of them went out
        waiting = [st.issued_ms for q, st in self.recent.items() if q > receipt.seq]
        self.waiting_since_ms = min(waiting, default=0)
        self.sends = len(waiting)
        partial = PartialBundle(receipt, wire, (None,) * len(receipt.path)).sign(relay_key)
        return [ReceiptCountersigned(partial, Ack(t.session_id, receipt.seq))]

    def _reject(self, reason: str) -> ReceiptRejected:
        self.rejected += 1
        return ReceiptRejected(reason)


# ---- the client's side


@dataclass(frozen=True)
class SignReceipt:
    wire: bytes
    receipt: Receipt


@dataclass(frozen=True)
class StatementRefused:
    reason: str


ClientAction = SignReceipt | StatementRefused


@dataclass
class ClientSession:
    terms: Terms
    meter: Meter = field(default_factory=Meter)
    signed: Receipt | None = None
    signed_wire: bytes = b""
    acked_seq: int = 0
    refused: int = 0
    # Multi-hop: the entry a stated path must start at (it must end at our exit).
    entry: PublicKey | None = None
    # Statements refused, by seq: a re-sent statement gets the verdict its first
    # copy got. Judged again later, against a count that has grown since, an
    # inflated claim would pass.
    verdicts: dict[int, str] = field(default_factory=dict)

    @property
    def counted(self) -> Counters:
        return self.meter.total

    def observe(self, raw: Counters) -> None:
        self.meter = self.meter.feed(raw)

    def on_statement(
        self, statement: Statement, client_key: PrivateKey, now_ms: int
    ) -> ClientAction:
        if statement.session_id != self.terms.session_id:
            return self._refuse("statement for another session")
        earlier = self.verdicts.get(statement.seq)
        if earlier is not None:
            return StatementRefused(earlier)  # the same statement again: not counted twice
        path = statement.path or self.terms.path
        why = self._wrong_path(statement.path)
        if why is not None:
            return self._refuse(why)
        own, claimed = self.counted, statement.counters
        if claimed.up > plausible(own.up) or claimed.down > plausible(own.down):
            return self._refuse(
                f"relay claims {claimed.up} up / {claimed.down} down bytes,"
                f" we counted {own.up} / {own.down}: inflated, not signing",
                statement.seq,
            )
        signable = Counters(
            min(claimed.up, own.up + tolerance(own.up)),
            min(claimed.down, own.down + tolerance(own.down)),
        )
        last = self.signed
        if last is not None and (
            statement.seq <= last.seq
            or signable.up < last.bytes_up
            or signable.down < last.bytes_down
        ):
            return SignReceipt(self.signed_wire, last)  # re-send: cumulative, so harmless
        receipt = Receipt(
            session_id=self.terms.session_id,
            client=self.terms.client,
            path=path,
            bytes_up=signable.up,
            bytes_down=signable.down,
            price_per_gib=self.terms.price_per_gib,
            seq=statement.seq,
            started_ms=self.terms.started_ms,
            issued_ms=now_ms,
        )
        self.signed, self.signed_wire = receipt, sign_receipt(receipt, client_key)
        return SignReceipt(self.signed_wire, receipt)

    def _wrong_path(self, path: tuple[PublicKey, ...]) -> str | None:
        """Why a stated path is not ours to sign, or None (no path stated: fine)."""
        if not path:
            return None
        if len(set(path)) != len(path):
            return "the stated path names a relay twice, not signing"
        if path[-1] != self.terms.path[-1]:
            return f"the stated path ends at {path[-1].b64[:8]}…, not at our exit: not signing"
        if self.entry is not None and path[0] != self.entry:
            return f"the stated path starts at {path[0].b64[:8]}…, not at our entry: not signing"
        return None

    def on_ack(self, ack: Ack) -> None:
        if ack.session_id == self.terms.session_id:
            self.acked_seq = max(self.acked_seq, ack.seq)

    def _refuse(self, reason: str, seq: int | None = None) -> StatementRefused:
        self.refused += 1
        if seq is not None:
            self.verdicts[seq] = reason
            if len(self.verdicts) > REMEMBERED_VERDICTS:
                del self.verdicts[min(self.verdicts)]
        return StatementRefused(reason)

    @property
    def cost(self) -> int:
        return self.signed.cost if self.signed else 0
