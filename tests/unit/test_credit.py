"""Credit notices: the signed format, and the relay's gate acting on them."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from accounting.credit import (
    CREDIT_EXHAUSTED,
    CREDIT_OK,
    CreditNotice,
    credit_topic,
    notice_for,
    worth_telling,
)
from meshvpn.identity import PrivateKey, node_id_of
from meshvpn.messages import SessionRequest, sign, verify
from relay.credit import NO_CREDIT, CreditGate

ACCOUNTING = PrivateKey(
    bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
)
CLIENT = PrivateKey(b"\x21" * 32)
CLIENT_ID = node_id_of(CLIENT.ed25519_public())
VECTORS = Path(__file__).parent.parent / "vectors" / "credit.json"


def test_fixed_vector() -> None:
    notice = CreditNotice("mvwhdrroev7f5mfkw3rv3qiert6y", CREDIT_EXHAUSTED, 0, 1_795_000_000_000)
    wire = bytes.fromhex(json.loads(VECTORS.read_text())["notice"])
    assert sign(notice, ACCOUNTING) == wire
    assert verify(wire).message == notice


@settings(max_examples=50)
@given(st.integers(-(10**12), 10**12), st.integers(0, 2**63))
def test_status_follows_the_balance_and_any_flipped_bit_fails(balance: int, at: int) -> None:
    notice = notice_for(CLIENT_ID, balance, at)
    assert notice.ok == (balance >= 1)
    assert notice.credit == max(balance, 0)
    wire = sign(notice, ACCOUNTING)
    gate = CreditGate(ACCOUNTING.ed25519_public())
    for i in range(0, len(wire), 7):
        flipped = bytearray(wire)
        flipped[i] ^= 0x10
        assert gate.on_notice(credit_topic(CLIENT_ID), bytes(flipped)) is None
    assert gate.book.notices == {}


def request() -> SessionRequest:
    return SessionRequest(
        relay=PrivateKey(b"\x25" * 32).ed25519_public(),
        control_key=PrivateKey(b"\x26" * 32).x25519_public(),
        wireguard_key=PrivateKey(b"\x22" * 32).x25519_public(),
        want_exit="",
        max_price_per_gib=10**9,
        reply_token=bytes(16),
        nonce=bytes(range(16)),
        issued_ms=1,
    )


def test_gate_refuses_until_vouched_for_and_cuts_off_when_exhausted() -> None:
    gate = CreditGate(ACCOUNTING.ed25519_public())
    client = CLIENT.ed25519_public()
    relay_key = PrivateKey(b"\x23" * 32).x25519_public()
    refusal = gate.refusal(request(), client, relay_key, 1000, 5)
    assert refusal is not None
    assert not refusal.granted
    assert refusal.reason == NO_CREDIT
    topic = credit_topic(CLIENT_ID)
    ok = sign(CreditNotice(CLIENT_ID, CREDIT_OK, 50, 10), ACCOUNTING)
    assert gate.on_notice(topic, ok) is None
    assert gate.refusal(request(), client, relay_key, 1000, 5) is None
    # a notice from anyone else, on the wrong topic, or replayed, changes nothing
    stranger = sign(CreditNotice(CLIENT_ID, CREDIT_EXHAUSTED, 0, 20), PrivateKey(b"\x24" * 32))
    assert gate.on_notice(topic, stranger) is None
    exhausted = sign(CreditNotice(CLIENT_ID, CREDIT_EXHAUSTED, 0, 20), ACCOUNTING)
    assert gate.on_notice(credit_topic("mvsomeoneelse"), exhausted) is None
    assert gate.may_serve(client)
    assert gate.on_notice(topic, exhausted) == CLIENT_ID
    assert not gate.may_serve(client)
    assert gate.on_notice(topic, ok) is None  # the old "ok", replayed
    assert not gate.may_serve(client)
    assert gate.counters["notice-dropped:replayed"] == 1
    assert gate.counters["notice-dropped:wrong-signer"] == 1
    assert gate.counters["notice-dropped:wrong-topic"] == 1


def test_a_new_status_is_told_at_once_a_new_balance_every_few_seconds() -> None:
    published = (0, 500, 10_000)  # ok, 500 left, told at 10 s
    assert not worth_telling(published, notice_for(CLIENT_ID, 500, 60_000))  # nothing new
    assert not worth_telling(published, notice_for(CLIENT_ID, 400, 14_999))  # too soon
    assert worth_telling(published, notice_for(CLIENT_ID, 400, 15_000))
    assert worth_telling(published, notice_for(CLIENT_ID, 0, 10_001))  # exhausted: at once
