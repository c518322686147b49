"""The ledger: receipts become balances, epochs become signed rewards. Pure.

Theory of operation
-------------------
Double-entry, integer token units, no floats. Accounts are strings:
``client:<id>``, ``relay:<id>``, ``fee`` (the protocol), ``mint`` (where
emission comes from; its balance is minus all tokens ever emitted) and
``bridge`` (where deposits come from, standing in for a chain bridge). Every
entry's postings sum to zero, so all balances together always sum to zero.

Booking is idempotent and order-independent because receipts are cumulative:
for each session we keep what has been booked so far and book only the
increase over it. Money is computed cumulatively and then differenced, so
rounding never drifts: after any sequence of receipts for a session, the
client has paid exactly ``floor(bytes * price / GiB)`` for the highest one.
A receipt at or below what is held books nothing: the same total is a
duplicate, a lower one is *stale* (recorded, never subtracted).

The decisions are two pure functions, and nothing else computes money:
``assess(bundle, held, known)`` says what one receipt books given the
session's held state, and ``close(...)`` what an epoch emits given its tally.
Each returns the postings and the new state. ``Ledger`` below applies them
to dictionaries (the reference model the tests check invariants on);
``accounting.store`` applies the very same decisions to SQL tables.

Split of what a client pays, per receipt:
- ``FEE_BPS`` (10 %) to the protocol fee account;
- the rest to the relays on the path by weight: the exit 2 shares, every
  transit relay 1 share (exits carry the legal and bandwidth burden); the
  floor remainders go to the exit. The *entry* of a multi-hop path (its first
  relay) countersigns as a witness but takes no share: it is paid for the
  same bytes by its own access-link session (``meshvpn.client``), and must
  not bill them twice.

A session's path may change (a transit relay died and routing went around
it, the client moved to another entry): a receipt naming another path is
booked like any newer receipt, its increase split over the *new* path (the
held state is re-split over the new path before the difference is taken, so
no relay is ever debited). Client and price may not change.

Emission per epoch follows ``emission_schedule`` (halving every
``HALVING_EPOCHS``) plus whatever the previous epoch carried over. It is
shared in proportion to the *fees* each relay's paid bytes generated (paid
bytes weighted by their price), and no relay gets more than those fees; what
is left is carried to the next epoch. Why fees and not plain bytes: with a
per-byte share, a relay could buy its own bytes through a fake client at a
near-zero price and collect emission for them. With a fee-proportional,
fee-capped share, a relay that pays itself a fee f gains at most
``pool * f / total_fees <= f`` in emission: self-dealing never gains.

Ranges: bytes and amounts stay below ``MAX_UNITS`` (2**62) so that every
number fits a signed 64-bit column (BIGINT) with room for sums; a receipt
beyond that is rejected ("out of range"), never wrapped or rounded. Relay
accounts are only ever credited, so a relay's balance *is* its cumulative
earnings, the amount its Merkle leaf commits to.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from accounting.merkle import MerkleTree
from accounting.receipts import GIB, ReceiptBundle
from meshvpn.identity import PublicKey, node_id_of
from meshvpn.messages import MessageError

FEE_BPS: Final = 1_000
EXIT_WEIGHT: Final = 2
OTHER_WEIGHT: Final = 1  # a transit relay
ENTRY_WEIGHT: Final = 0  # a witness: paid by its own access-link session
EMISSION_START: Final = 1_000_000_000  # token units per epoch, first halving period
HALVING_EPOCHS: Final = 1_000
MAX_UNITS: Final = 1 << 62
MINT: Final = "mint"
FEE: Final = "fee"
BRIDGE: Final = "bridge"


# A node id is a hash and a base32 encoding: booking asks for the same few thousand often.
cached_node_id: Final = functools.lru_cache(maxsize=1 << 16)(node_id_of)


def client_account(key: PublicKey) -> str:
    return f"client:{cached_node_id(key)}"


def relay_account(key: PublicKey) -> str:
    return f"relay:{cached_node_id(key)}"


def emission_schedule(epoch: int) -> int:
    return EMISSION_START >> min(epoch // HALVING_EPOCHS, 63)


def split(amount: int, path: tuple[PublicKey, ...]) -> dict[PublicKey, int]:
    """Divide ``amount`` among the path by weight; remainders to the exit."""
    if len(path) == 1:  # the common single-hop case, and the hot path of booking
        return {path[0]: amount}
    weights = [ENTRY_WEIGHT] + [OTHER_WEIGHT] * (len(path) - 2) + [EXIT_WEIGHT]
    total = sum(weights)
    shares = {relay: amount * w // total for relay, w in zip(path, weights, strict=True)}
    shares[path[-1]] += amount - sum(shares.values())
    return shares


class Outcome(enum.Enum):
    BOOKED = "booked"
    DUPLICATE = "duplicate"
    STALE = "stale"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Posting:
    account: str
    amount: int  # positive: credit to the account; negative: debit


@dataclass(frozen=True)
class Entry:
    entry_id: int
    kind: str  # "receipt", "deposit", "emission"
    ref: str  # the receipt (session hex:seq), the deposit note, or the epoch
    postings: tuple[Posting, ...]


@dataclass(frozen=True)
class SessionState:
    """What has been booked for one session: its terms and its highest receipt."""

    client: PublicKey
    path: tuple[PublicKey, ...]
    price_per_gib: int
    bytes_up: int
    bytes_down: int
    seq: int

    @property
    def total_bytes(self) -> int:
        return self.bytes_up + self.bytes_down

    @functools.cached_property
    def cost(self) -> int:
        return self.total_bytes * self.price_per_gib // GIB

    @functools.cached_property
    def fee(self) -> int:
        return self.cost * FEE_BPS // 10_000

    @functools.cached_property
    def relay_paid(self) -> dict[PublicKey, int]:
        return split(self.cost - self.fee, self.path)

    @functools.cached_property
    def fee_shares(self) -> dict[PublicKey, int]:
        return split(self.fee, self.path)


@dataclass(frozen=True)
class Booking:
    """What one receipt does to the books: ``assess``'s decision."""

    outcome: Outcome
    reason: str = ""
    session_id: bytes = b""
    ref: str = ""
    postings: tuple[Posting, ...] = ()
    session: SessionState | None = None  # the held state after booking
    # this epoch's tally increments, per relay on the path
    gross: Mapping[PublicKey, int] = field(default_factory=dict)
    fee: Mapping[PublicKey, int] = field(default_factory=dict)
    bytes: Mapping[PublicKey, int] = field(default_factory=dict)
    new_bytes: int = 0


def _rejected(reason: str, session_id: bytes = b"") -> Booking:
    return Booking(Outcome.REJECTED, reason, session_id)


def assess(
    bundle: ReceiptBundle,
    held: SessionState | None,
    known_client: Callable[[PublicKey], bool],
    known_relay: Callable[[PublicKey], bool] | None = None,
) -> Booking:
    """Decide what a verified bundle books, given what is held for its session.

    The client must be registered (it deposited) and every relay on the path
    known (it announced itself); ``known_relay`` defaults to ``known_client``."""
    r = bundle.receipt
    if not bundle.complete:
        return _rejected("not countersigned by every relay", r.session_id)
    if max(r.bytes_up, r.bytes_down, r.total_bytes, r.seq, r.price_per_gib) >= MAX_UNITS or (
        r.total_bytes * r.price_per_gib // GIB >= MAX_UNITS
    ):
        return _rejected("out of range", r.session_id)
    relay_ok = known_relay or known_client
    if not known_client(r.client) or not all(relay_ok(k) for k in r.path):
        return _rejected("unknown client or relay", r.session_id)
    if held is not None:
        if (held.client, held.price_per_gib) != (r.client, r.price_per_gib):
            return _rejected("session terms changed", r.session_id)
        if r.total_bytes == held.total_bytes:
            return Booking(Outcome.DUPLICATE, session_id=r.session_id)
        if r.total_bytes < held.total_bytes:
            return Booking(Outcome.STALE, session_id=r.session_id)
    after = SessionState(r.client, r.path, r.price_per_gib, r.bytes_up, r.bytes_down, r.seq)
    before = SessionState(r.client, r.path, r.price_per_gib, 0, 0, 0)
    if held is not None:  # on the receipt's path: a path change moves no earlier credit
        before = dataclasses.replace(held, path=r.path)
    paid, paid_before = after.relay_paid, before.relay_paid
    fees, fees_before = after.fee_shares, before.fee_shares
    new_bytes = after.total_bytes - before.total_bytes
    postings = [
        Posting(client_account(r.client), -(after.cost - before.cost)),
        Posting(FEE, after.fee - before.fee),
    ]
    gross: dict[PublicKey, int] = {}
    fee: dict[PublicKey, int] = {}
    for relay in r.path:
        credit = paid[relay] - paid_before[relay]
        postings.append(Posting(relay_account(relay), credit))
        fee[relay] = fees[relay] - fees_before[relay]
        gross[relay] = credit + fee[relay]
    return Booking(
        Outcome.BOOKED,
        session_id=r.session_id,
        ref=f"{r.session_id.hex()}:{r.seq}",
        postings=tuple(p for p in postings if p.amount),
        session=after,
        gross=gross,
        fee=fee,
        bytes=split(new_bytes, r.path),
        new_bytes=new_bytes,
    )


def deposit_postings(account: str, amount: int) -> tuple[Posting, ...]:
    if not 0 < amount < MAX_UNITS:
        raise ValueError(f"a deposit is positive and below {MAX_UNITS}")
    if account in (BRIDGE, MINT, FEE):
        raise ValueError(f"cannot deposit to {account}")
    return (Posting(account, amount), Posting(BRIDGE, -amount))


@dataclass(frozen=True)
class RelayReward:
    gross: int  # what clients paid through this relay this epoch, before the fee
    fee: int  # the protocol fee on that
    emission: int
    net: int  # what the relay was credited this epoch: gross - fee + emission
    paid_bytes: int
    cumulative: int  # everything ever credited, the Merkle leaf


@dataclass
class EpochTally:
    gross: defaultdict[PublicKey, int] = field(default_factory=lambda: defaultdict(int))
    fee: defaultdict[PublicKey, int] = field(default_factory=lambda: defaultdict(int))
    bytes: defaultdict[PublicKey, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, booking: Booking) -> None:
        for relay, v in booking.gross.items():
            self.gross[relay] += v
        for relay, v in booking.fee.items():
            self.fee[relay] += v
        for relay, v in booking.bytes.items():
            self.bytes[relay] += v


@dataclass(frozen=True)
class EpochClose:
    epoch: int
    start_ms: int
    end_ms: int
    rewards: dict[PublicKey, RelayReward]
    emission_pool: int
    emitted: int
    carried: int
    tree: MerkleTree
    postings: tuple[Posting, ...]  # the emission entry
    earned: dict[PublicKey, int]  # every relay's cumulative earnings after the close

    def claims(self) -> dict[PublicKey, tuple[int, tuple[bytes, ...]]]:
        """Every relay's leaf amount and proof (leaves are sorted by relay key)."""
        leaves = sorted(k for k, v in self.earned.items() if v)
        return {k: (self.earned[k], self.tree.proof(i)) for i, k in enumerate(leaves)}


def close(  # noqa: PLR0917 - the epoch's whole state, in order
    epoch: int,
    start_ms: int,
    end_ms: int,
    carry: int,
    tally: EpochTally,
    earned: Mapping[PublicKey, int],
) -> EpochClose:
    """Decide an epoch's emission and rewards; ``earned`` is before the close."""
    pool = emission_schedule(epoch) + carry
    fees = {k: v for k, v in tally.fee.items() if v}
    emission = water_fill(pool, fees, fees)
    emitted = sum(emission.values())
    postings = tuple(Posting(relay_account(k), v) for k, v in sorted(emission.items())) + (
        (Posting(MINT, -emitted),) if emitted else ()
    )
    after = dict(earned)
    for relay, v in emission.items():
        after[relay] = after.get(relay, 0) + v
    rewards = {}
    active = {k for k, v in tally.gross.items() if v} | {k for k, v in tally.bytes.items() if v}
    for relay in active | set(emission):
        gross, fee = tally.gross.get(relay, 0), tally.fee.get(relay, 0)
        rewards[relay] = RelayReward(
            gross=gross,
            fee=fee,
            emission=emission.get(relay, 0),
            net=gross - fee + emission.get(relay, 0),
            paid_bytes=tally.bytes.get(relay, 0),
            cumulative=after.get(relay, 0),
        )
    return EpochClose(
        epoch=epoch,
        start_ms=start_ms,
        end_ms=end_ms,
        rewards=rewards,
        emission_pool=pool,
        emitted=emitted,
        carried=pool - emitted,
        tree=MerkleTree.build({k: v for k, v in after.items() if v}),
        postings=postings,
        earned=after,
    )


@dataclass
class Ledger:
    """The books in memory: the reference model, applying ``assess`` and ``close``."""

    balances: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    entries: list[Entry] = field(default_factory=list)
    sessions: dict[bytes, SessionState] = field(default_factory=dict)
    earned: defaultdict[PublicKey, int] = field(default_factory=lambda: defaultdict(int))
    epoch: int = 0
    epoch_start_ms: int = 0
    carry: int = 0
    tally: EpochTally = field(default_factory=EpochTally)
    stale: int = 0

    def _post(self, kind: str, ref: str, postings: tuple[Posting, ...]) -> int:
        if sum(p.amount for p in postings) != 0:
            raise AssertionError("unbalanced entry")  # a bug here must never book
        entry_id = len(self.entries) + 1
        self.entries.append(Entry(entry_id, kind, ref, postings))
        for p in postings:
            self.balances[p.account] += p.amount
        return entry_id

    def deposit(self, account: str, amount: int, note: str = "") -> int:
        return self._post("deposit", note, deposit_postings(account, amount))

    def credit(self, client: PublicKey) -> int:
        return self.balances[client_account(client)]

    def book(self, wire: bytes, known: Callable[[PublicKey], bool]) -> Booking:
        """Book a countersigned bundle; anything short of fully valid is rejected."""
        try:
            bundle = ReceiptBundle.decode(wire)
        except MessageError as exc:
            return _rejected(exc.reason)
        return self.book_bundle(bundle, known)

    def book_bundle(self, bundle: ReceiptBundle, known: Callable[[PublicKey], bool]) -> Booking:
        booking = assess(bundle, self.sessions.get(bundle.receipt.session_id), known)
        if booking.outcome is Outcome.STALE:
            self.stale += 1
        if booking.outcome is not Outcome.BOOKED or booking.session is None:
            return booking
        self._post("receipt", booking.ref, booking.postings)
        self.sessions[booking.session_id] = booking.session
        self.tally.add(booking)
        for relay in booking.session.path:
            self.earned[relay] = self.balances[relay_account(relay)]
        return booking

    def close_epoch(self, end_ms: int) -> EpochClose:
        result = close(self.epoch, self.epoch_start_ms, end_ms, self.carry, self.tally, self.earned)
        self._post("emission", f"epoch:{self.epoch}", result.postings)
        self.earned.update(result.earned)
        self.carry = result.carried
        self.epoch += 1
        self.epoch_start_ms = end_ms
        self.tally = EpochTally()
        return result


def water_fill(
    pool: int, weights: dict[PublicKey, int], caps: dict[PublicKey, int]
) -> dict[PublicKey, int]:
    """Share ``pool`` by ``weights``, nobody above its cap; integer, never over the pool."""
    given: dict[PublicKey, int] = {}
    open_ = {k for k, w in weights.items() if w > 0 and caps.get(k, 0) > 0}
    left = pool
    while open_ and left > 0:
        total = sum(weights[k] for k in open_)
        offer = {k: left * weights[k] // total for k in open_}
        capped = {k for k in open_ if given.get(k, 0) + offer[k] >= caps[k]}
        if not capped:
            for k in open_:
                given[k] = given.get(k, 0) + offer[k]
            left -= sum(offer.values())
            break
        for k in capped:
            left -= caps[k] - given.get(k, 0)
            given[k] = caps[k]
        open_ -= capped
    return {k: v for k, v in given.items() if v}
