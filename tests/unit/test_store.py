"""One suite for the ledger store, run on SQLite and on PostgreSQL.

The in-memory ``Ledger`` is the reference model: the store must end where it
ends, for any stream, in any batching, after any injected failure.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest

from accounting.db import Database
from accounting.epochs import sign_statement, verify_claim
from accounting.ledger import MAX_UNITS, Ledger, Outcome, client_account, relay_account
from accounting.receipts import GIB, ReceiptBundle
from accounting.store import Ingest, Store
from meshvpn.identity import PrivateKey, node_id_of
from meshvpn.messages import MessageError
from tests.unit.test_ledger import CLIENTS, RELAYS, bundle, known

ACCOUNTING = PrivateKey(b"\x77" * 32)
NOW = 1_800_000_000_000


def setup_parties(store: Store, deposit: int = 10**15) -> None:
    for c in CLIENTS:
        store.deposit(node_id_of(c.ed25519_public()), deposit, f"d-{c.ed25519_public().hex}", NOW)
    for r in RELAYS:
        store.register(r.ed25519_public(), "relay", NOW)


def reference(stream: Iterable[bytes], deposit: int = 10**15) -> Ledger:
    ledger = Ledger()
    for c in CLIENTS:
        ledger.deposit(client_account(c.ed25519_public()), deposit)
    for w in stream:
        ledger.book(w, known)
    return ledger


def ingest(wires: Iterable[bytes]) -> list[Ingest]:
    out = []
    for w in wires:
        try:
            out.append(Ingest(ReceiptBundle.decode(w)))
        except MessageError as exc:
            out.append(Ingest(None, exc.reason))
    return out


def make_stream(seed: int, sessions: int = 4) -> list[bytes]:
    rng = random.Random(seed)
    wires: list[bytes] = []
    for _ in range(sessions):
        session = rng.randbytes(16)
        client = rng.choice(CLIENTS)
        path = rng.sample(RELAYS, rng.randint(1, 3))
        price = rng.choice([1, 1_000, 1_000_000, 7_777_777])
        up = down = 0
        for seq in range(1, rng.randint(2, 6)):
            up += rng.randint(0, GIB // 20)
            down += rng.randint(0, 5 * GIB)
            wires.append(bundle(client, path, session, up, down, price, seq))
    stream = wires + rng.choices(wires, k=len(wires))
    forged = bytearray(rng.choice(wires))
    forged[-1] ^= 1
    stream.append(bytes(forged))
    rng.shuffle(stream)
    return stream


def nonzero(balances: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in balances.items() if v}


@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_store_ends_where_the_reference_ledger_ends(store: Store, batch: int) -> None:
    stream = make_stream(1)
    setup_parties(store)
    outcomes = []
    for i in range(0, len(stream), batch):
        outcomes += store.book(ingest(stream[i : i + batch]), NOW)
    ledger = reference(stream)
    assert nonzero(store.balances()) == nonzero(dict(ledger.balances))
    assert store.sessions() == ledger.sessions
    assert sum(store.balances().values()) == 0
    assert sum(o.outcome is Outcome.BOOKED for o in outcomes) == sum(
        e.kind == "receipt" for e in ledger.entries
    )
    counters = store.counters()
    assert counters["stale"] == ledger.stale
    assert (
        counters.get("rejected:bad-countersignature", 0) + counters.get("rejected:bad-signature", 0)
        == 1
    )


def test_order_and_batching_do_not_matter(open_store: Callable[[], Store]) -> None:
    stream = make_stream(2)
    a = open_store()
    setup_parties(a)
    a.book(ingest(stream), NOW)
    b = open_store()  # the same database: book the same stream again, reversed, one by one
    for w in reversed(stream):
        b.book(ingest([w]), NOW)
    assert a.balances() == b.balances()  # everything again was a duplicate or stale
    assert b.counters()["duplicate"] >= len(set(stream)) // 2


def test_every_entry_links_to_what_caused_it(store: Store) -> None:
    setup_parties(store)
    session = os.urandom(16)
    wires = [
        bundle(CLIENTS[0], [RELAYS[0], RELAYS[1]], session, 0, n * GIB, 1000, n) for n in (1, 2)
    ]
    store.book(ingest(wires), NOW)
    close, _ = store.close_epoch(NOW + 1, lambda c: sign_statement(c, ACCOUNTING))
    receipts = {int(i): bytes(b) for i, b in store.db.execute("SELECT id, bundle FROM receipts")}
    kinds = set()
    for _id, kind, ref, _epoch, receipt_id, postings in store.entries():
        kinds.add(kind)
        assert sum(a for _, a in postings) == 0
        if kind == "receipt":
            assert receipt_id is not None
            r = ReceiptBundle.decode(receipts[receipt_id]).receipt
            assert ref == f"{r.session_id.hex()}:{r.seq}"
        elif kind == "deposit":
            assert store.db.execute("SELECT 1 FROM deposits WHERE ref = ?", (ref,))
        else:
            assert ref == f"epoch:{close.epoch}"
    assert kinds == {"receipt", "deposit", "emission"}


def test_stale_is_recorded_never_subtracted(store: Store) -> None:
    setup_parties(store)
    session = os.urandom(16)
    high = bundle(CLIENTS[0], [RELAYS[0]], session, 0, 3 * GIB, 1000, 3)
    low = bundle(CLIENTS[0], [RELAYS[0]], session, 0, 1 * GIB, 1000, 1)
    store.book(ingest([high]), NOW)
    before = store.balances()
    (result,) = store.book(ingest([low]), NOW)
    assert result.outcome is Outcome.STALE
    assert store.balances() == before
    rows = store.db.execute("SELECT outcome, total_bytes FROM receipts ORDER BY id")
    assert [(str(o), int(t)) for o, t in rows] == [("booked", 3 * GIB), ("stale", GIB)]


def test_unknown_parties_are_refused_until_known(store: Store) -> None:
    session = os.urandom(16)
    wire = bundle(CLIENTS[0], [RELAYS[0]], session, 0, GIB, 1000, 1)
    (r,) = store.book(ingest([wire]), NOW)
    assert (r.outcome, r.reason) == (Outcome.REJECTED, "unknown client or relay")
    store.register(RELAYS[0].ed25519_public(), "relay", NOW)
    (r,) = store.book(ingest([wire]), NOW)
    assert r.outcome is Outcome.REJECTED  # the client has not deposited yet
    store.register(CLIENTS[0].ed25519_public(), "relay", NOW)  # a relay is no client
    assert store.book(ingest([wire]), NOW)[0].outcome is Outcome.REJECTED
    assert store.deposit(node_id_of(CLIENTS[0].ed25519_public()), 5, "first", NOW)
    assert store.book(ingest([wire]), NOW)[0].outcome is Outcome.BOOKED
    assert store.balance(client_account(CLIENTS[0].ed25519_public())) == 5 - 1000


def test_deposits_are_idempotent_by_reference(store: Store) -> None:
    node = node_id_of(CLIENTS[1].ed25519_public())
    assert store.deposit(node, 700, "bridge-tx-1", NOW)
    assert not store.deposit(node, 700, "bridge-tx-1", NOW)
    assert store.deposit(node, 5, "bridge-tx-2", NOW)
    assert store.balance(f"client:{node}") == 705
    assert store.balance("bridge") == -705
    with pytest.raises(ValueError, match="positive"):
        store.deposit(node, 0, "zero", NOW)
    with pytest.raises(ValueError, match="positive"):
        store.deposit(node, MAX_UNITS, "huge", NOW)


def test_out_of_range_amounts_are_rejected(store: Store) -> None:
    setup_parties(store)
    huge = bundle(CLIENTS[0], [RELAYS[0]], os.urandom(16), 0, MAX_UNITS, 1, 1)
    pricey = bundle(CLIENTS[0], [RELAYS[0]], os.urandom(16), 0, 1 << 40, 1 << 60, 1)
    results = store.book(ingest([huge, pricey]), NOW)
    assert [r.reason for r in results] == ["out of range", "out of range"]


def test_epochs_match_the_reference_and_claims_verify(store: Store) -> None:
    setup_parties(store)
    ledger = reference([])
    stream = make_stream(3, sessions=6)
    for part in (stream[: len(stream) // 2], stream[len(stream) // 2 :], []):
        store.book(ingest(part), NOW)
        for w in part:
            ledger.book(w, known)
        ours, statement = store.close_epoch(NOW + 5, lambda c: sign_statement(c, ACCOUNTING))
        theirs = ledger.close_epoch(NOW + 5)
        assert ours.tree.root == theirs.tree.root
        assert ours.rewards == theirs.rewards
        assert ours.carried == theirs.carried
        for relay, (amount, proof) in ours.claims().items():
            assert verify_claim(statement, ACCOUNTING.ed25519_public(), relay, amount, proof).ok
    assert nonzero(store.balances()) == nonzero(dict(ledger.balances))
    rows = store.rewards()
    assert {(r.epoch, r.relay) for r in rows} >= {(1, k) for k in ours.rewards}
    for row in rows:
        (epoch,) = [e for e in store.epochs() if e.epoch == row.epoch]
        check = verify_claim(
            epoch.statement, ACCOUNTING.ed25519_public(), row.relay, row.cumulative, row.proof
        )
        assert check.ok
    # relays only ever earn: the balance is the leaf
    for relay in store.relays():
        assert store.balance(relay_account(relay)) == ours.earned[relay]
    assert store.current_epoch()[0] == 3


class FaultyDatabase:
    """Fails the ``fail_at``-th statement: a crash at that point of a transaction."""

    def __init__(self, inner: Database, fail_at: int) -> None:
        self.inner = inner
        self.dialect = inner.dialect
        self.calls = 0
        self.fail_at = fail_at

    def _tick(self) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected crash")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._tick()
        return self.inner.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._tick()
        self.inner.executemany(sql, rows)

    def transaction(self) -> Any:
        return self.inner.transaction()

    def close(self) -> None:
        self.inner.close()


def snapshot(store: Store) -> tuple[Any, ...]:
    return (
        store.balances(),
        store.sessions(),
        store.entries(),
        store.epochs(),
        store.rewards(),
        store.counters(),
        store.current_epoch(),
    )


def test_a_failure_at_any_statement_leaves_all_or_nothing(store: Store) -> None:
    """Fail each statement of a batch and of an epoch close in turn: the transaction
    leaves nothing behind, and doing it again (the redelivery) ends as a clean run."""
    stream = make_stream(4)
    healthy = store.db
    setup_parties(store)
    store.book(ingest(stream), NOW)
    _, clean_statement = store.close_epoch(NOW + 1, lambda c: sign_statement(c, ACCOUNTING))
    clean = snapshot(store)
    failures = {"book": 0, "close": 0}
    for fail_at in itertools.count(1):
        _reset(store)
        setup_parties(store)
        failed_here = False
        for step in ("book", "close"):
            before = snapshot(store)
            store.db = FaultyDatabase(healthy, fail_at)
            try:
                if step == "book":
                    store.book(ingest(stream), NOW)
                else:
                    store.close_epoch(NOW + 1, lambda c: sign_statement(c, ACCOUNTING))
                failed = False
            except RuntimeError:
                failed = True
            store.db = healthy
            if failed:
                failed_here = True
                failures[step] += 1
                assert snapshot(store) == before, f"{step} left half a transaction at {fail_at}"
                if step == "book":
                    store.book(ingest(stream), NOW)
                else:
                    store.close_epoch(NOW + 1, lambda c: sign_statement(c, ACCOUNTING))
        assert snapshot(store) == clean
        assert store.epochs()[0].statement == clean_statement
        if not failed_here:  # past the last statement of both: every point was tried
            break
    assert failures["book"] >= 5
    assert failures["close"] >= 5


def _reset(store: Store) -> None:
    with store.db.transaction():
        for table in (
            "rewards", "epochs", "postings", "deposits", "entries", "sessions", "receipts",
            "tally", "accounts", "parties", "counters",
        ):  # fmt: skip
            store.db.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed names
        store.db.execute("UPDATE meta SET value = 0")


def test_migrations_are_idempotent(open_store: Callable[[], Store]) -> None:
    a = open_store()
    b = open_store()
    assert a.schema_version() == b.schema_version() == 1
    setup_parties(a)
    assert b.balances() == a.balances()


def test_two_writers_do_not_double_book(open_store: Callable[[], Store]) -> None:
    a, b = open_store(), open_store()
    setup_parties(a)
    wire = bundle(CLIENTS[0], [RELAYS[0]], os.urandom(16), 0, 4 * GIB, 1000, 1)
    assert a.book(ingest([wire]), NOW)[0].outcome is Outcome.BOOKED
    assert b.book(ingest([wire]), NOW)[0].outcome is Outcome.DUPLICATE
    assert b.deposit(node_id_of(CLIENTS[0].ed25519_public()), 1, "late", NOW)
    assert a.balance(client_account(CLIENTS[0].ed25519_public())) == 10**15 - 4000 + 1


def test_receipts_for_parties_not_known_yet_are_parked_then_booked(store: Store) -> None:
    """The broker forgets a receipt once acknowledged: one that names a relay whose
    announcement has not arrived yet is kept, and booked when the relay is known."""
    for c in CLIENTS:
        store.deposit(node_id_of(c.ed25519_public()), 10**9, f"d-{c.ed25519_public().hex}", NOW)
    session = os.urandom(16)
    wires = [bundle(CLIENTS[0], [RELAYS[2]], session, 0, n * GIB, 1000, n) for n in (1, 3)]
    results = store.book(ingest(wires), NOW)
    assert {r.reason for r in results} == {"unknown client or relay"}
    assert store.parked_count() == 2
    again = store.unpark(NOW)  # still unknown: parked again
    assert [r.outcome for r in again] == [Outcome.REJECTED, Outcome.REJECTED]
    assert store.parked_count() == 2
    store.register(RELAYS[2].ed25519_public(), "relay", NOW)
    booked = [b for b in store.unpark(NOW) if b.outcome is Outcome.BOOKED]
    assert booked
    assert store.parked_count() == 0
    assert store.sessions()[session].total_bytes == 3 * GIB
    assert store.balance(relay_account(RELAYS[2].ed25519_public())) == 3000 - 300
