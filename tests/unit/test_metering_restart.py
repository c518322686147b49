"""A relay restarted mid-session takes up the receipt exchange where it was."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from accounting.exchange import (
    ClientSession,
    Counters,
    ReceiptCountersigned,
    SendStatement,
    SignReceipt,
    Terms,
)
from meshvpn.identity import PrivateKey, init_identity, new_x25519
from relay.metering import ReceiptDesk
from relay.sessions import Session

NOW = 1_795_000_000_000
MIB = 1 << 20
CLIENT = PrivateKey(bytes([9]) * 32)


def test_a_restarted_relay_does_not_count_a_paid_session_as_unanswered(tmp_path: Path) -> None:
    """100 MiB carried and receipted, then the relay is killed and restarted: the
    restored session owes only what it owed before (bench/mesh.py: a restarted
    entry cut its returning client off at once, "87107468 bytes unreceipted,
    over the allowance", and banned it)."""
    identity, _ = init_identity(tmp_path / "state")
    wireguard = new_x25519().x25519_public()
    session = Session(
        session_id=os.urandom(16),
        client_identity=CLIENT.ed25519_public(),
        wireguard_key=wireguard,
        address=ipaddress.IPv4Address("100.64.0.2"),
        price_per_gib=1000,
        granted_ms=NOW,
        expires_ms=NOW + 3_600_000,
    )
    desk = ReceiptDesk(identity, tmp_path / "receipts.db")
    desk.start(session)
    exchange = desk.open[wireguard].exchange
    client = ClientSession(
        Terms(session.session_id, CLIENT.ed25519_public(), exchange.terms.path, 1000, NOW)
    )
    raw = Counters(MIB, 100 * MIB)
    client.observe(raw)
    (sent,) = exchange.observe(raw, NOW + 1000)
    assert isinstance(sent, SendStatement)
    answer = client.on_statement(sent.statement, CLIENT, NOW + 1000)
    assert isinstance(answer, SignReceipt)
    (accepted,) = exchange.on_receipt(answer.wire, identity.identity_key, NOW + 1000)
    assert isinstance(accepted, ReceiptCountersigned)
    desk.journal.record(accepted.bundle, NOW + 1000)
    desk.stop(wireguard)
    desk.close()

    again = ReceiptDesk(identity, tmp_path / "receipts.db")
    try:
        again.start(session)
        restored = again.open[wireguard].exchange
        assert restored.counted == raw
        assert restored.unreceipted.total == 0
        for step in range(1, 30):  # the client is back: device counters from zero
            actions = restored.observe(Counters(0, step * MIB // 10), NOW + 2000 + step * 100)
            assert not [a for a in actions if not isinstance(a, SendStatement)]
    finally:
        again.close()
