"""The adapters' bounds under floods: probes, the receipt channel, the MQTT queue,
wireguard-go's log of forged sources, the exit table's counters."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import ssl
from pathlib import Path

import pytest

import relay.metering
from meshvpn.identity import init_identity, new_x25519
from meshvpn.mqtt import BrokerAddress, ControlLink
from meshvpn.probe import BURST_ALL, BURST_PER_SOURCE, ProbeResponder, make_request
from meshvpn.wireguard import backend
from meshvpn.wireguard.backend import SPOOFED_LINE, UserspaceDevice
from relay.exit import parse_counters
from relay.metering import ALL_RECEIPTS_BURST, RECEIPTS_BURST, ReceiptDesk
from relay.sessions import Session

NOW = 1_795_000_000_000


def test_a_probe_flood_from_everywhere_meets_one_bucket() -> None:
    control = new_x25519()
    responder = ProbeResponder(control)
    wires = [make_request(control.x25519_public(), NOW)[0] for _ in range(BURST_ALL + 200)]
    # one probe per source prefix: the per-source buckets never bite
    answered = sum(
        responder.handle(w, f"10.{i // 256}.{i % 256}.1", NOW) is not None
        for i, w in enumerate(wires)
    )
    assert answered == BURST_ALL
    assert responder.dropped == {"overload": 200}
    assert len(responder.per_source) == len(wires)


def test_probe_per_source_limit_comes_before_the_overall_one() -> None:
    control = new_x25519()
    responder = ProbeResponder(control)
    for _ in range(BURST_PER_SOURCE + 100):
        responder.handle(make_request(control.x25519_public(), NOW)[0], "192.0.2.9", NOW)
    assert responder.dropped == {"rate-limited": 100}
    # the flooder from one prefix spent only its own share of the overall budget
    assert responder.overall.tokens(NOW) == BURST_ALL - BURST_PER_SOURCE


def session(address: str) -> Session:
    key = new_x25519().x25519_public()
    return Session(
        session_id=os.urandom(16),
        client_identity=key,
        wireguard_key=key,
        address=ipaddress.IPv4Address(address),
        price_per_gib=1000,
        granted_ms=NOW,
        expires_ms=NOW + 60_000,
    )


def test_receipt_channel_is_rate_limited_per_session_and_overall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay.metering, "now_ms", lambda: NOW)  # one instant: no refill
    identity, _ = init_identity(tmp_path / "state")
    desk = ReceiptDesk(identity, tmp_path / "receipts.db")
    try:
        sessions = [session(f"100.64.{i // 250}.{i % 250 + 2}") for i in range(40)]
        for s in sessions:
            desk.start(s)
        for _ in range(RECEIPTS_BURST + 30):
            desk.on_datagram(b"MVR? not a receipt", str(sessions[0].address), 51822)
        assert desk.counters["receipt-rejected:rate-limited"] == 30
        assert desk.counters["receipt-rejected:malformed"] == RECEIPTS_BURST
        # many sessions at once meet the overall bucket
        for s in sessions[1:]:
            for _ in range(RECEIPTS_BURST):
                desk.on_datagram(b"garbage", str(s.address), 51822)
        checked = desk.counters["receipt-rejected:malformed"]
        assert checked == ALL_RECEIPTS_BURST
        desk.on_datagram(b"x", "100.64.9.9", 51822)  # nobody's address
        assert desk.counters["receipt-rejected:unknown-source"] == 1
    finally:
        desk.close()


def test_a_full_mqtt_queue_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    async def handler(_topic: str, _payload: bytes) -> None:
        return None

    tls = ssl.create_default_context()  # never used: the link is not run
    link = ControlLink(
        BrokerAddress("192.0.2.1"), name="t", subscriptions=[], handler=handler, tls=tls
    )
    client_logger = link._logger
    with caplog.at_level(logging.WARNING):
        for _ in range(500):
            client_logger.warning("Message queue is full. Discarding message.")
        client_logger.warning("something else")
    assert link.dropped == 500
    texts = [r.getMessage() for r in caplog.records]
    assert sum("dropping and counting" in t for t in texts) == 1
    assert not any(t.startswith("Message queue is full") for t in texts)
    assert "something else" in texts


def write_log(path: Path, lines: list[bytes]) -> None:
    with path.open("ab") as f:
        f.write(b"".join(line + b"\n" for line in lines))


def test_forged_sources_are_counted_from_wireguard_gos_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spoof = b"DEBUG: (wg0) 2026/01/01 00:00:00 peer(abcd\xe2\x80\xa6wxyz) - IPv4 " + SPOOFED_LINE
    other = b"DEBUG: (wg0) 2026/01/01 00:00:00 peer(abcd) - Receiving keepalive packet"
    log = tmp_path / "wireguard-go.log"
    write_log(log, [b"ERROR: (wg0) from a previous run " + SPOOFED_LINE])
    device = UserspaceDevice("wg0", log, count_spoofed=True)
    device._log_offset = log.stat().st_size  # as create() does: earlier runs do not count
    write_log(log, [spoof, other, spoof])
    with log.open("ab") as f:
        f.write(spoof[:20])  # half a line: counted once it is whole
    device.read_log()
    assert device._spoofed == 2
    with log.open("ab") as f:
        f.write(spoof[20:] + b"\n")
    device.read_log()
    assert device._spoofed == 3
    # the log is cut back once it grows past the limit, and counting goes on
    monkeypatch.setattr(backend, "LOG_LIMIT", 1000)
    write_log(log, [spoof] * 20)
    device.read_log()
    assert device._spoofed == 23
    assert log.stat().st_size == 0
    write_log(log, [other, spoof])
    device.read_log()
    assert device._spoofed == 24
    assert UserspaceDevice("wg1", log).count_spoofed is False


def test_exit_table_counters_are_parsed_from_nft_json() -> None:
    text = json.dumps(
        {
            "nftables": [
                {"metainfo": {"version": "1.0.6"}},
                {"counter": {"family": "inet", "name": "spoofed", "packets": 7, "bytes": 420}},
                {"counter": {"family": "inet", "name": "to_lan", "packets": 0, "bytes": 0}},
            ]
        }
    )
    assert parse_counters(text) == {"spoofed": 7, "to_lan": 0}
    assert parse_counters(b"") == {}
    assert parse_counters("not json") == {}
    assert parse_counters('{"nftables": 3}') == {}
