"""End-to-end delivery: accounting's signed BookedAck, and the relay's courier."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accounting.booked import (
    MAX_SESSIONS,
    BookedAck,
    booked_topic,
    build_acks,
    covered,
    read_ack,
)
from accounting.exchange import Counters
from accounting.receipts import ReceiptBundle
from accounting.store import Store
from meshvpn.identity import PrivateKey, node_id_of
from meshvpn.messages import MessageError, sign, verify
from relay.delivery import FIRST_RETRY_MS, MAX_RETRY_MS, Courier, retry_delay_ms
from relay.journal import Journal, Pending
from tests.unit.test_ledger import CLIENTS, RELAYS, bundle
from tests.unit.test_store import NOW, ingest, make_stream, setup_parties

ACCOUNTING = PrivateKey(
    bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
)
RELAY = PrivateKey(b"\x25" * 32).ed25519_public()
VECTORS = Path(__file__).parent.parent / "vectors" / "booked.json"


def test_fixed_vector() -> None:
    ack = BookedAck(RELAY, 1_795_000_000_000, ((bytes(range(16)), 7), (bytes(range(1, 17)), 2**40)))
    wire = bytes.fromhex(json.loads(VECTORS.read_text())["ack"])
    assert sign(ack, ACCOUNTING) == wire
    assert verify(wire).message == ack


sessions_st = st.dictionaries(st.binary(min_size=16, max_size=16), st.integers(0, 2**64 - 1))


@settings(max_examples=50)
@given(sessions_st, st.integers(0, 2**63))
def test_acks_round_trip_and_any_flipped_bit_fails(sessions: dict[bytes, int], at: int) -> None:
    acks = build_acks(RELAY, sessions, at)
    assert all(len(a.sessions) <= MAX_SESSIONS for a in acks)
    topic = booked_topic(node_id_of(RELAY))
    said: dict[bytes, int] = {}
    for ack in acks:
        wire = sign(ack, ACCOUNTING)
        said.update(read_ack(topic, wire, ACCOUNTING.ed25519_public(), RELAY).sessions)
        for i in range(0, len(wire), 5):
            flipped = bytearray(wire)
            flipped[i] ^= 0x04
            with pytest.raises(MessageError):
                read_ack(topic, bytes(flipped), ACCOUNTING.ed25519_public(), RELAY)
    assert said == sessions


def test_an_ack_from_another_key_or_for_another_relay_is_refused() -> None:
    ack = build_acks(RELAY, {bytes(16): 3}, NOW)[0]
    topic = booked_topic(node_id_of(RELAY))
    other = PrivateKey(b"\x26" * 32)
    with pytest.raises(MessageError, match="wrong-signer"):
        read_ack(topic, sign(ack, other), ACCOUNTING.ed25519_public(), RELAY)
    wire = sign(ack, ACCOUNTING)
    with pytest.raises(MessageError, match="wrong-relay"):
        read_ack(topic, wire, ACCOUNTING.ed25519_public(), other.ed25519_public())
    with pytest.raises(MessageError, match="wrong-relay"):
        read_ack(booked_topic("mvelse"), wire, ACCOUNTING.ed25519_public(), RELAY)


def test_unsorted_or_repeated_sessions_are_not_canonical() -> None:
    with pytest.raises(ValueError, match="sorted"):
        BookedAck(RELAY, NOW, ((b"\x02" * 16, 1), (b"\x01" * 16, 1)))
    with pytest.raises(ValueError, match="sorted"):
        BookedAck(RELAY, NOW, ((b"\x01" * 16, 1), (b"\x01" * 16, 2)))


@pytest.mark.parametrize("batch", [1, 5, 64])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_acks_say_exactly_what_the_ledger_holds(store: Store, batch: int, seed: int) -> None:
    """Naive model: after every batch, per relay and session, the highest acked seq equals
    the seq the store holds; nothing is acked for a session the store does not hold."""
    stream = make_stream(seed)
    setup_parties(store)
    acked: dict[tuple[bytes, bytes], int] = {}
    for i in range(0, len(stream), batch):
        items = ingest(stream[i : i + batch])
        for relay, sessions in covered(items, store.book(items, NOW)).items():
            for sid, seq in sessions.items():
                acked[relay.raw, sid] = max(acked.get((relay.raw, sid), 0), seq)
        held = store.sessions()
        for (relay_raw, sid), seq in acked.items():
            assert sid in held
            assert relay_raw in {k.raw for k in held[sid].path}
            assert seq <= held[sid].seq
    expect = {(k.raw, sid): s.seq for sid, s in store.sessions().items() for k in s.path}
    assert acked == expect


def test_parked_receipts_are_not_acked(store: Store) -> None:
    wire = bundle(CLIENTS[0], [RELAYS[0]], b"\x09" * 16, 10, 10, 1000, 1)
    items = ingest([wire])  # nobody is known yet: parked
    assert covered(items, store.book(items, NOW)) == {}


# ---- the relay's courier


def pend(session: int, seq: int) -> Pending:
    return Pending(bytes([session]) * 16, seq, b"bundle")


def test_without_a_key_the_broker_ack_delivers() -> None:
    courier = Courier(end_to_end=False)
    item = pend(1, 1)
    assert courier.due([item], 0) == [item]
    assert courier.sent(item, 0) is True


def test_end_to_end_resends_with_capped_backoff_until_acked() -> None:
    courier = Courier(end_to_end=True)
    item = pend(1, 3)
    now, sends = 0, []
    while now < 3_600_000:
        if courier.due([item], now):
            assert courier.sent(item, now) is False
            sends.append(now)
        now += 1000
    gaps = [b - a for a, b in itertools.pairwise(sends)]
    assert gaps[0] == FIRST_RETRY_MS
    assert gaps == sorted(gaps)
    assert max(gaps) == MAX_RETRY_MS
    courier.acked([(item.session_id, 2)])  # an older seq covers nothing
    assert courier.due([item], now + MAX_RETRY_MS) == [item]
    courier.acked([(item.session_id, 3)])
    assert courier.resends() == 0


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(st.sampled_from(["receipt", "pass", "ack", "drop"]), st.integers(0, 5)),
        max_size=80,
    ),
    st.integers(1, 8),
)
def test_courier_never_gives_up_on_an_unacked_bundle(
    steps: list[tuple[str, int]], per_pass: int
) -> None:
    """Against a naive model: a session's newest bundle is sent again within the
    longest backoff times the queue depth unless accounting acked it; a new seq goes
    out on the next pass with room; acked sessions are never sent."""
    courier = Courier(end_to_end=True, per_pass=per_pass)
    newest: dict[int, int] = {}  # session -> newest seq the journal holds
    acked: dict[int, int] = {}
    last_sent: dict[int, int] = {}
    now = 0
    for op, s in steps:
        now += 1000
        if op == "receipt":
            newest[s] = newest.get(s, 0) + 1
        elif op == "ack" and s in newest:
            acked[s] = newest[s]
            courier.acked([(bytes([s]) * 16, newest[s])])
        elif op == "pass":
            pending = [pend(k, q) for k, q in sorted(newest.items()) if acked.get(k, 0) < q]
            out = courier.due(pending, now)
            assert len(out) <= per_pass
            assert {p.session_id for p in out} <= {p.session_id for p in pending}
            for p in out:
                courier.sent(p, now)
                last_sent[p.session_id[0]] = now
    # then only passes: every unacked session goes out again within a bounded time
    pending = [pend(k, q) for k, q in sorted(newest.items()) if acked.get(k, 0) < q]
    bound = now + MAX_RETRY_MS * (len(pending) // per_pass + 1) + 1000
    seen: set[int] = set()
    while now <= bound:
        now += 1000
        for p in courier.due(pending, now):
            courier.sent(p, now)
            seen.add(p.session_id[0])
    assert seen == {p.session_id[0] for p in pending}


def test_retry_delay_doubles_and_is_capped() -> None:
    assert retry_delay_ms(1) == FIRST_RETRY_MS
    assert retry_delay_ms(2) == 2 * FIRST_RETRY_MS
    assert retry_delay_ms(10_000) == MAX_RETRY_MS


def test_journal_marks_only_what_an_ack_covers(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "receipts.db")
    sid = b"\x05" * 16
    for seq in (1, 2, 3):
        wire = bundle(CLIENTS[0], [RELAYS[0]], sid, seq, seq, 1000, seq)
        journal.record(ReceiptBundle.decode(wire), NOW)
    assert journal.mark_delivered(sid, 2) == 2
    assert [(p.seq) for p in journal.pending()] == [3]
    assert journal.mark_delivered(sid, 2) == 0
    assert journal.mark_delivered(sid, 3) == 1
    assert journal.pending() == []
    journal.save_meter(sid, Counters(1, 2))
    journal.close()
