"""Ledger invariants under hostile receipt streams, epochs, emission and claims."""

from __future__ import annotations

import os
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from accounting.ledger import (
    BRIDGE,
    FEE,
    MINT,
    Ledger,
    Outcome,
    client_account,
    emission_schedule,
    relay_account,
    split,
)
from accounting.merkle import verify_proof
from accounting.receipts import GIB, Receipt, ReceiptBundle, sign_receipt
from meshvpn.identity import PrivateKey, PublicKey

CLIENTS = [PrivateKey(bytes([10 + i]) * 32) for i in range(3)]
RELAYS = [PrivateKey(bytes([40 + i]) * 32) for i in range(4)]
KNOWN = {k.ed25519_public() for k in CLIENTS + RELAYS}


def known(key: PublicKey) -> bool:
    return key in KNOWN


def bundle(  # noqa: PLR0917 - a receipt's fields, in their order
    client: PrivateKey,
    path: list[PrivateKey],
    session: bytes,
    up: int,
    down: int,
    price: int,
    seq: int,
) -> bytes:
    receipt = Receipt(
        session_id=session,
        client=client.ed25519_public(),
        path=tuple(r.ed25519_public() for r in path),
        bytes_up=up,
        bytes_down=down,
        price_per_gib=price,
        seq=seq,
        started_ms=1,
        issued_ms=1 + seq,
    )
    b = ReceiptBundle.from_client(sign_receipt(receipt, client))
    for relay in path:
        b = b.add_countersignature(relay)
    return b.encode()


@st.composite
def streams(
    draw: st.DrawFn,
) -> tuple[list[bytes], dict[bytes, tuple[int, int, list[PrivateKey], PrivateKey]]]:
    """Several sessions' receipts, with duplicates, replays, reordering and forgeries."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    wires: list[bytes] = []
    truth: dict[bytes, tuple[int, int, list[PrivateKey], PrivateKey]] = {}
    for _ in range(draw(st.integers(1, 5))):
        session = rng.randbytes(16)
        client = rng.choice(CLIENTS)
        path = rng.sample(RELAYS, rng.randint(1, 3))
        price = rng.choice([1, 1_000, 1_000_000, 7_777_777])
        up = down = 0
        for seq in range(1, rng.randint(2, 6)):
            up += rng.randint(0, 5 * GIB // 100)
            down += rng.randint(0, 5 * GIB)
            wires.append(bundle(client, path, session, up, down, price, seq))
        truth[session] = (up + down, price, path, client)
    forged = []
    for wire in rng.sample(wires, min(3, len(wires))):
        flipped = bytearray(wire)
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        forged.append(bytes(flipped))
        forged.append(
            wire[:-64] + bytes([0]) if wire[-65] else wire[:-1]
        )  # drop a countersignature
    stream = wires + rng.choices(wires, k=len(wires)) + forged  # duplicates and replays
    rng.shuffle(stream)
    return stream, truth


@settings(max_examples=60, deadline=None)
@given(streams())
def test_stream_invariants(
    case: tuple[list[bytes], dict[bytes, tuple[int, int, list[PrivateKey], PrivateKey]]],
) -> None:
    stream, truth = case
    ledger = Ledger()
    results = [ledger.book(w, known) for w in stream]
    # the books balance, entry by entry and in total
    assert all(sum(p.amount for p in e.postings) == 0 for e in ledger.entries)
    assert sum(ledger.balances.values()) == 0
    # each session is booked exactly at its highest receipt: no byte twice, none lost
    paid_by_client: dict[str, int] = {}
    for session, (total, price, _path, client) in truth.items():
        cost = total * price // GIB
        assert ledger.sessions[session].cost == cost
        assert ledger.sessions[session].total_bytes == total
        paid_by_client[client_account(client.ed25519_public())] = (
            paid_by_client.get(client_account(client.ed25519_public()), 0) + cost
        )
        assert (
            sum(ledger.sessions[session].relay_paid.values()) + ledger.sessions[session].fee == cost
        )
    for account, paid in paid_by_client.items():
        assert ledger.balances[account] == -paid
    # nothing forged or incomplete was booked
    assert sum(r.outcome is Outcome.BOOKED for r in results) <= len(set(stream))
    booked_refs = {e.ref for e in ledger.entries if e.kind == "receipt"}
    assert all(len(ref.split(":")[0]) == 32 for ref in booked_refs)
    # order does not matter
    again = Ledger()
    for w in sorted(stream):
        again.book(w, known)
    nonzero = {k: v for k, v in ledger.balances.items() if v}
    assert {k: v for k, v in again.balances.items() if v} == nonzero


def test_forged_and_unknown_are_rejected() -> None:
    session = os.urandom(16)
    good = bundle(CLIENTS[0], [RELAYS[0]], session, 10, 10 * GIB, 1000, 1)
    ledger = Ledger()
    assert ledger.book(good[:-1] + bytes([good[-1] ^ 1]), known).outcome is Outcome.REJECTED
    stranger = PrivateKey(b"\x99" * 32)
    assert (
        ledger.book(bundle(stranger, [RELAYS[0]], session, 1, 1, 1, 1), known).reason
        == "unknown client or relay"
    )
    assert not ledger.entries
    assert ledger.book(good, known).outcome is Outcome.BOOKED
    assert ledger.book(good, known).outcome is Outcome.DUPLICATE
    older = bundle(CLIENTS[0], [RELAYS[0]], session, 5, 5, 1000, 0)
    assert ledger.book(older, known).outcome is Outcome.STALE
    assert len(ledger.entries) == 1


def test_split_is_exact_and_favours_the_exit() -> None:
    path = tuple(r.ed25519_public() for r in RELAYS[:3])
    shares = split(1001, path)
    assert sum(shares.values()) == 1001
    assert shares[path[-1]] >= 2 * shares[path[0]]


def pay(ledger: Ledger, client: PrivateKey, path: list[PrivateKey], gib: int, price: int) -> None:
    result = ledger.book(bundle(client, path, os.urandom(16), 0, gib * GIB, price, 1), known)
    assert result.outcome is Outcome.BOOKED


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 3), st.integers(1, 50), st.integers(1, 10**7)),
        max_size=12,
    ),
    st.integers(0, 3000),
)
def test_epochs_emit_exactly_the_schedule_and_never_past_fees(
    traffic: list[tuple[int, int, int, int]], epochs: int
) -> None:
    ledger = Ledger()
    scheduled = emitted = 0
    for i, (c, r, gib, price) in enumerate(traffic):
        pay(ledger, CLIENTS[c], [RELAYS[r]], gib, price)
        if i % 4 == 3:
            ledger.epoch = epochs + i  # jump ahead: halvings happen too
            close = ledger.close_epoch(end_ms=i)
            scheduled += emission_schedule(close.epoch)
            emitted += close.emitted
            for reward in close.rewards.values():
                assert reward.emission <= reward.fee  # capped by the fees paid
                assert reward.net == reward.gross - reward.fee + reward.emission
    assert emitted + ledger.carry == scheduled
    assert -ledger.balances[MINT] == emitted
    assert sum(ledger.balances.values()) == 0


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(1, 3), st.integers(1, 30), st.integers(1, 10**7)),
        max_size=8,
    ),
    st.integers(1, 200),
    st.integers(1, 10**7),
)
def test_self_dealing_never_gains(
    honest: list[tuple[int, int, int, int]], self_gib: int, self_price: int
) -> None:
    """Relay 0 pays itself through a fake client; compare with the same epoch without it."""
    cheat, fake = RELAYS[0], CLIENTS[0]

    def epoch(with_self_dealing: bool) -> int:
        ledger = Ledger()
        deposit = 10**15
        ledger.deposit(client_account(fake.ed25519_public()), deposit)
        for c, r, gib, price in honest:
            pay(ledger, CLIENTS[c], [RELAYS[r]], gib, price)
        if with_self_dealing:
            pay(ledger, fake, [cheat], self_gib, self_price)
        ledger.close_epoch(end_ms=1)
        return (
            ledger.balances[relay_account(cheat.ed25519_public())]
            + ledger.balances[client_account(fake.ed25519_public())]
        )

    assert epoch(with_self_dealing=True) <= epoch(with_self_dealing=False)


def test_claims_verify_and_any_change_fails() -> None:
    ledger = Ledger()
    for i, relay in enumerate(RELAYS):
        pay(ledger, CLIENTS[i % 3], [relay], 10 + i, 1_000_000)
    close = ledger.close_epoch(end_ms=1)
    keys = sorted(close.rewards)
    for index, relay in enumerate(keys):
        amount = close.rewards[relay].cumulative
        proof = close.tree.proof(index)
        assert verify_proof(relay, amount, proof, close.tree.root)
        assert not verify_proof(relay, amount + 1, proof, close.tree.root)
        assert not verify_proof(keys[(index + 1) % len(keys)], amount, proof, close.tree.root)
        for j in range(len(proof)):
            bad = list(proof)
            bad[j] = bytes([bad[j][0] ^ 1]) + bad[j][1:]
            assert not verify_proof(relay, amount, tuple(bad), close.tree.root)
        assert not verify_proof(
            relay, amount, proof, bytes([close.tree.root[0] ^ 1]) + close.tree.root[1:]
        )


def test_deposits_come_from_the_bridge() -> None:
    ledger = Ledger()
    ledger.deposit(client_account(CLIENTS[0].ed25519_public()), 500)
    assert ledger.credit(CLIENTS[0].ed25519_public()) == 500
    assert ledger.balances[BRIDGE] == -500
    assert ledger.balances[FEE] == 0


def test_epoch_statement_vector_and_offline_claims() -> None:
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from accounting.epochs import EpochStatement, sign_statement, verify_claim  # noqa: PLC0415
    from meshvpn.messages import sign, verify  # noqa: PLC0415

    accounting = PrivateKey(
        bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    )
    vector = json.loads((Path(__file__).parent.parent / "vectors" / "epoch.json").read_text())
    fixed = EpochStatement(
        epoch=3, start_ms=1_795_000_000_000, end_ms=1_795_000_060_000, root=bytes(range(32)),
        relays=4, emitted=1_000_000_000, carried=12,
    )  # fmt: skip
    assert sign(fixed, accounting).hex() == vector["statement"]
    assert verify(bytes.fromhex(vector["statement"])).message == fixed

    ledger = Ledger()
    for i, relay in enumerate(RELAYS):
        pay(ledger, CLIENTS[i % 3], [relay], 5 + i, 1_000_000)
    close = ledger.close_epoch(end_ms=60_000)
    wire = sign_statement(close, accounting)
    keys = sorted(close.rewards)
    for index, relay in enumerate(keys):
        amount, proof = close.rewards[relay].cumulative, close.tree.proof(index)
        assert verify_claim(wire, accounting.ed25519_public(), relay, amount, proof).ok
        assert not verify_claim(wire, accounting.ed25519_public(), relay, amount + 1, proof).ok
        other = RELAYS[0].ed25519_public()
        assert not verify_claim(wire, other, relay, amount, proof).ok  # wrong accounting key
        flipped = bytearray(wire)
        flipped[30] ^= 1  # inside the signed root
        assert not verify_claim(
            bytes(flipped), accounting.ed25519_public(), relay, amount, proof
        ).ok
