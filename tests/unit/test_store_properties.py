"""Ledger invariants through the real store (SQLite), under hostile receipt streams.

Random streams of several sessions' cumulative receipts, with duplicates,
replays, reordering, forged bytes, receipts countersigned by the wrong relay
or not by all, in random batches with epochs closing in between. Whatever
comes: every epoch balances to zero (emission included), emission follows
the schedule exactly, no byte is credited twice, nothing forged is booked,
and a relay paying itself through a fake client never gains.
"""

from __future__ import annotations

import collections
import hashlib
import random
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from accounting.epochs import sign_statement
from accounting.ledger import (
    FEE_BPS,
    MINT,
    Outcome,
    client_account,
    emission_schedule,
    relay_account,
)
from accounting.receipts import GIB, Receipt, ReceiptBundle, countersign, sign_receipt
from accounting.store import Store
from meshvpn.identity import PrivateKey, node_id_of
from tests.unit.test_ledger import CLIENTS, RELAYS, bundle
from tests.unit.test_store import ACCOUNTING, NOW, ingest, setup_parties

Truth = dict[bytes, int]  # session -> highest total of an honest receipt


def wrongly_countersigned(client: PrivateKey, path: list[PrivateKey], session: bytes) -> bytes:
    """A well-formed bundle whose countersignature is by a relay not on the path."""
    receipt = Receipt(
        session_id=session, client=client.ed25519_public(),
        path=tuple(r.ed25519_public() for r in path), bytes_up=1, bytes_down=50 * GIB,
        price_per_gib=10**6, seq=99, started_ms=1, issued_ms=2,
    )  # fmt: skip
    wire = sign_receipt(receipt, client)
    impostor = next(r for r in RELAYS if r not in path)
    sigs = [countersign(wire, impostor)] + [countersign(wire, r) for r in path[1:]]
    return ReceiptBundle(receipt, wire, tuple(sigs)).encode()


def hostile_stream(seed: int) -> tuple[list[bytes], set[bytes], Truth, list[int]]:
    """Drawn from a seed, so that a failing example prints short."""
    rng = random.Random(seed)
    honest: list[bytes] = []
    truth: Truth = {}
    for _ in range(rng.randint(1, 5)):
        session = rng.randbytes(16)
        client = rng.choice(CLIENTS)
        path = rng.sample(RELAYS, rng.randint(1, 3))
        price = rng.choice([1, 1_000, 1_000_000, 7_777_777])
        up = down = 0
        for seq in range(1, rng.randint(2, 6)):
            up += rng.randint(0, GIB // 20)
            down += rng.randint(0, 5 * GIB)
            honest.append(bundle(client, path, session, up, down, price, seq))
        truth[session] = up + down
    forged: set[bytes] = set()
    for wire in rng.sample(honest, min(4, len(honest))):
        flipped = bytearray(wire)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        forged.add(bytes(flipped))
        count = wire[-65 - 64 * (len(ReceiptBundle.decode(wire).signatures) - 1)]
        if count:  # one countersignature short
            forged.add(wire[:-64])
    session = rng.choice(list(truth))
    forged.add(wrongly_countersigned(rng.choice(CLIENTS), [RELAYS[0]], session))
    forged -= set(honest)
    stream = honest + rng.choices(honest, k=len(honest)) + sorted(forged)
    rng.shuffle(stream)
    cuts = sorted(rng.sample(range(len(stream) + 1), k=min(3, len(stream) + 1)))
    return stream, forged, truth, cuts


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 2500))
def test_invariants_through_the_store(seed: int, first_epoch: int) -> None:
    stream, forged, truth, cuts = hostile_stream(seed)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(f"sqlite://{Path(tmp) / 'l.db'}")
        with store.db.transaction():  # start late in the schedule: halvings happen too
            store.db.execute("UPDATE meta SET value = ? WHERE key = 'epoch'", (first_epoch,))
        setup_parties(store)
        outcomes = []
        start = 0
        for n, cut in enumerate([*cuts, len(stream)]):
            outcomes += store.book(ingest(stream[start:cut]), NOW)
            start = cut
            store.close_epoch(NOW + n, lambda c: sign_statement(c, ACCOUNTING))
        entries = store.entries()
        balances = store.balances()
        epochs = store.epochs()
        rewards = store.rewards()
        booked = store.booked_bundles()
        sessions = store.sessions()
        store.close()

    # every entry, and so every epoch, balances to zero, emission included
    per_epoch: collections.Counter[int] = collections.Counter()
    for _id, _kind, _ref, epoch, _receipt, postings in entries:
        assert sum(a for _, a in postings) == 0
        per_epoch[epoch] += sum(a for _, a in postings)
    assert all(v == 0 for v in per_epoch.values())
    assert sum(balances.values()) == 0
    # emission: exactly the schedule, emitted or carried; the mint paid all of it
    scheduled = sum(emission_schedule(e.epoch) for e in epochs)
    assert sum(e.emitted for e in epochs) + epochs[-1].carried == scheduled
    assert -balances.get(MINT, 0) == sum(e.emitted for e in epochs)
    for r in rewards:
        assert r.emission <= r.fee
        assert r.net == r.gross - r.fee + r.emission
    # no byte credited twice, none lost: each session at its highest honest receipt
    assert {s: v.total_bytes for s, v in sessions.items()} == truth
    assert sum(r.paid_bytes for r in rewards) == sum(truth.values())
    for client in CLIENTS:
        owed = sum(v.cost for v in sessions.values() if v.client == client.ed25519_public())
        assert balances[client_account(client.ed25519_public())] == 10**15 - owed
    # nothing forged or wrongly countersigned was booked
    digests = {hashlib.sha256(w).digest() for w in booked}
    assert not digests & {hashlib.sha256(w).digest() for w in forged}
    for wire in booked:
        assert ReceiptBundle.decode(wire).complete
    rejected = [o for o in outcomes if o.outcome is Outcome.REJECTED]
    assert len(rejected) == len([w for w in stream if w in forged])
    assert sum(o.outcome is Outcome.BOOKED for o in outcomes) == len(booked)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(1, 3), st.integers(1, 30), st.integers(1, 10**7)),
        max_size=8,
    ),
    st.integers(1, 200),
    st.integers(1, 10**7),
)
def test_self_dealing_never_gains_through_the_store(
    honest: list[tuple[int, int, int, int]], self_gib: int, self_price: int
) -> None:
    """Relay 0 pays itself through a fake client: its net (relay + fake client) never rises."""
    cheat, fake = RELAYS[0], PrivateKey(b"\x5a" * 32)

    def epoch(with_self_dealing: bool) -> int:
        rng = random.Random(7)
        with tempfile.TemporaryDirectory() as tmp:
            store = Store.open(f"sqlite://{Path(tmp) / 'l.db'}")
            setup_parties(store)
            store.deposit(node_id_of(fake.ed25519_public()), 10**15, "fake", NOW)
            wires = [
                bundle(CLIENTS[c], [RELAYS[r]], rng.randbytes(16), 0, gib * GIB, price, 1)
                for c, r, gib, price in honest
            ]
            if with_self_dealing:
                wires.append(bundle(fake, [cheat], rng.randbytes(16), 0, self_gib * GIB,
                                    self_price, 1))  # fmt: skip
            store.book(ingest(wires), NOW)
            store.close_epoch(NOW, lambda c: sign_statement(c, ACCOUNTING))
            net = store.balance(relay_account(cheat.ed25519_public())) + store.balance(
                client_account(fake.ed25519_public())
            )
            store.close()
            return net

    gain = epoch(with_self_dealing=True) - epoch(with_self_dealing=False)
    assert gain <= 0
    assert FEE_BPS > 0  # the fee is what makes it so
