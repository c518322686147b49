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

Split of what a client pays, per receipt:
- ``FEE_BPS`` (10 %) to the protocol fee account;
- the rest to the relays on the path by weight: the exit 2 shares, every other
  relay 1 share (exits carry the legal and bandwidth burden); the floor
  remainders go to the exit.

Emission per epoch follows ``emission_schedule`` (halving every
``HALVING_EPOCHS``) plus whatever the previous epoch carried over. It is
shared in proportion to the *fees* each relay's paid bytes generated (paid
bytes weighted by their price), and no relay gets more than those fees; what
is left is carried to the next epoch. Why fees and not plain bytes: with a
per-byte share, a relay could buy its own bytes through a fake client at a
near-zero price and collect emission for them. With a fee-proportional,
fee-capped share, a relay that pays itself a fee f gains at most
``pool * f / total_fees <= f`` in emission: self-dealing never gains.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from accounting.merkle import MerkleTree
from accounting.receipts import GIB, Receipt, ReceiptBundle
from meshvpn.identity import PublicKey, node_id_of
from meshvpn.messages import MessageError

FEE_BPS: Final = 1_000
EXIT_WEIGHT: Final = 2
OTHER_WEIGHT: Final = 1
EMISSION_START: Final = 1_000_000_000  # token units per epoch, first halving period
HALVING_EPOCHS: Final = 1_000
MINT: Final = "mint"
FEE: Final = "fee"
BRIDGE: Final = "bridge"


def client_account(key: PublicKey) -> str:
    return f"client:{node_id_of(key)}"


def relay_account(key: PublicKey) -> str:
    return f"relay:{node_id_of(key)}"


def emission_schedule(epoch: int) -> int:
    return EMISSION_START >> min(epoch // HALVING_EPOCHS, 63)


def split(amount: int, path: tuple[PublicKey, ...]) -> dict[PublicKey, int]:
    """Divide ``amount`` among the path by weight; remainders to the exit."""
    weights = [OTHER_WEIGHT] * (len(path) - 1) + [EXIT_WEIGHT]
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
class BookResult:
    outcome: Outcome
    reason: str = ""
    entry_id: int | None = None


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


@dataclass
class _Session:
    receipt: Receipt  # the highest booked
    cost: int
    fee: int
    relay_paid: dict[PublicKey, int]


@dataclass(frozen=True)
class RelayReward:
    gross: int  # what clients paid through this relay this epoch, before the fee
    fee: int  # the protocol fee on that
    emission: int
    net: int  # what the relay was credited this epoch: gross - fee + emission
    paid_bytes: int
    cumulative: int  # everything ever credited, the Merkle leaf


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


@dataclass
class _EpochTally:
    gross: defaultdict[PublicKey, int] = field(default_factory=lambda: defaultdict(int))
    fee: defaultdict[PublicKey, int] = field(default_factory=lambda: defaultdict(int))
    bytes: defaultdict[PublicKey, int] = field(default_factory=lambda: defaultdict(int))


@dataclass
class Ledger:
    balances: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    entries: list[Entry] = field(default_factory=list)
    sessions: dict[bytes, _Session] = field(default_factory=dict)
    earned: defaultdict[PublicKey, int] = field(default_factory=lambda: defaultdict(int))
    epoch: int = 0
    epoch_start_ms: int = 0
    carry: int = 0
    tally: _EpochTally = field(default_factory=_EpochTally)
    stale: int = 0

    def _post(self, kind: str, ref: str, postings: list[Posting]) -> int:
        postings = [p for p in postings if p.amount]
        if sum(p.amount for p in postings) != 0:
            raise AssertionError("unbalanced entry")  # a bug here must never book
        entry_id = len(self.entries) + 1
        self.entries.append(Entry(entry_id, kind, ref, tuple(postings)))
        for p in postings:
            self.balances[p.account] += p.amount
        return entry_id

    def deposit(self, account: str, amount: int, note: str = "") -> int:
        if amount <= 0:
            raise ValueError("a deposit is positive")
        return self._post("deposit", note, [Posting(account, amount), Posting(BRIDGE, -amount)])

    def credit(self, client: PublicKey) -> int:
        return self.balances[client_account(client)]

    def book(self, wire: bytes, known: Callable[[PublicKey], bool]) -> BookResult:
        """Book a countersigned bundle; anything short of fully valid is rejected."""
        try:
            bundle = ReceiptBundle.decode(wire)
        except MessageError as exc:
            return BookResult(Outcome.REJECTED, exc.reason)
        if not bundle.complete:
            return BookResult(Outcome.REJECTED, "not countersigned by every relay")
        r = bundle.receipt
        unknown = [k for k in (r.client, *r.path) if not known(k)]
        if unknown:
            return BookResult(Outcome.REJECTED, "unknown client or relay")
        held = self.sessions.get(r.session_id)
        if held is not None:
            if (held.receipt.client, held.receipt.path, held.receipt.price_per_gib) != (
                r.client,
                r.path,
                r.price_per_gib,
            ):
                return BookResult(Outcome.REJECTED, "session terms changed")
            if r.total_bytes == held.receipt.total_bytes:
                return BookResult(Outcome.DUPLICATE)
            if r.total_bytes < held.receipt.total_bytes:
                self.stale += 1
                return BookResult(Outcome.STALE)
        cost = r.total_bytes * r.price_per_gib // GIB
        fee = cost * FEE_BPS // 10_000
        paid = split(cost - fee, r.path)
        before = held or _Session(r, 0, 0, dict.fromkeys(r.path, 0))
        fee_shares = split(fee, r.path)
        before_fee_shares = split(before.fee, r.path)
        new_bytes = r.total_bytes - (held.receipt.total_bytes if held else 0)
        postings = [
            Posting(client_account(r.client), -(cost - before.cost)),
            Posting(FEE, fee - before.fee),
        ]
        for relay in r.path:
            amount = paid[relay] - before.relay_paid[relay]
            postings.append(Posting(relay_account(relay), amount))
            self.earned[relay] += amount
            self.tally.gross[relay] += amount + fee_shares[relay] - before_fee_shares[relay]
            self.tally.fee[relay] += fee_shares[relay] - before_fee_shares[relay]
        for relay, share in split(new_bytes, r.path).items():
            self.tally.bytes[relay] += share
        entry_id = self._post("receipt", f"{r.session_id.hex()}:{r.seq}", postings)
        self.sessions[r.session_id] = _Session(r, cost, fee, paid)
        return BookResult(Outcome.BOOKED, entry_id=entry_id)

    def close_epoch(self, end_ms: int) -> EpochClose:
        pool = emission_schedule(self.epoch) + self.carry
        fees = dict(self.tally.fee)
        emission = water_fill(pool, fees, fees)
        emitted = sum(emission.values())
        postings = [Posting(relay_account(k), v) for k, v in sorted(emission.items())]
        self._post("emission", f"epoch:{self.epoch}", [*postings, Posting(MINT, -emitted)])
        relays = set(self.tally.gross) | set(emission)
        rewards = {}
        for relay in relays:
            self.earned[relay] += emission.get(relay, 0)
        for relay in relays:
            gross, fee = self.tally.gross[relay], self.tally.fee[relay]
            rewards[relay] = RelayReward(
                gross=gross,
                fee=fee,
                emission=emission.get(relay, 0),
                net=gross - fee + emission.get(relay, 0),
                paid_bytes=self.tally.bytes[relay],
                cumulative=self.earned[relay],
            )
        close = EpochClose(
            epoch=self.epoch,
            start_ms=self.epoch_start_ms,
            end_ms=end_ms,
            rewards=rewards,
            emission_pool=pool,
            emitted=emitted,
            carried=pool - emitted,
            tree=MerkleTree.build(dict(self.earned)),
        )
        self.carry = pool - emitted
        self.epoch += 1
        self.epoch_start_ms = end_ms
        self.tally = _EpochTally()
        return close


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
