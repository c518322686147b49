"""Claims: `meshvpn earnings verify` accepts every real proof and rejects any changed byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from accounting.cli import verify_claim_data
from accounting.earnings import Claim, build_report, sign_report
from accounting.epochs import sign_statement
from accounting.ledger import relay_account
from accounting.store import Store
from meshvpn.cli import main
from meshvpn.identity import PrivateKey, PublicKey
from tests.unit.test_store import ACCOUNTING, NOW, ingest, make_stream, setup_parties

KEY = ACCOUNTING.ed25519_public()


@pytest.fixture
def closed(tmp_path: Path) -> Store:
    """Three epochs of traffic over four relays, closed and signed."""
    store = Store.open(f"sqlite://{tmp_path / 'ledger.db'}")
    setup_parties(store)
    for seed in (11, 12, 13):
        store.book(ingest(make_stream(seed, sessions=5)), NOW)
        store.close_epoch(NOW + seed, lambda c: sign_statement(c, ACCOUNTING))
    return store


def claims(store: Store) -> list[dict[str, Any]]:
    statements = {e.epoch: e.statement for e in store.epochs()}
    return [
        Claim(r.epoch, r.relay, r.cumulative, r.proof, statements[r.epoch]).to_json()
        for r in store.rewards()
        if r.cumulative  # a relay that earned nothing yet has no leaf
    ]


def flip(hex_text: str, index: int) -> str:
    raw = bytearray(bytes.fromhex(hex_text))
    raw[index] ^= 0x01
    return raw.hex()


def test_every_real_claim_verifies_and_every_change_fails(closed: Store) -> None:
    all_claims = claims(closed)
    assert len({c["epoch"] for c in all_claims}) == 3
    assert len({c["relay"] for c in all_claims}) >= 3
    for claim in all_claims:
        assert verify_claim_data(claim, KEY, None)["ok"], claim
        relay = PublicKey.from_b64(claim["relay"])
        assert verify_claim_data(claim, KEY, relay)["ok"]
        bad: list[dict[str, Any]] = []
        raw_relay = bytearray(relay.raw)
        for i in range(32):  # any leaf byte: the relay key
            changed = bytearray(raw_relay)
            changed[i] ^= 0x80
            bad.append({**claim, "relay": PublicKey(bytes(changed)).b64})
        bad += [  # the amount
            {**claim, "cumulative": claim["cumulative"] + delta} for delta in (1, -1, 1 << 40)
        ]
        for j, sibling in enumerate(claim["proof"]):  # any sibling byte
            for i in range(32):
                proof = list(claim["proof"])
                proof[j] = flip(sibling, i)
                bad.append({**claim, "proof": proof})
        bad.append({**claim, "proof": [*claim["proof"], "00" * 32]})
        if claim["proof"]:
            bad.append({**claim, "proof": claim["proof"][:-1]})
        bad += [  # any byte of the signed statement, the root's too
            {**claim, "statement": flip(claim["statement"], i)}
            for i in range(len(claim["statement"]) // 2)
        ]
        bad.append({**claim, "epoch": claim["epoch"] + 1})
        for b in bad:
            assert not verify_claim_data(b, KEY, None)["ok"], b
        other = PrivateKey(b"\x78" * 32).ed25519_public()
        assert not verify_claim_data(claim, other, None)["ok"]  # another accounting key
        stranger = PrivateKey(b"\x79" * 32).ed25519_public()
        assert not verify_claim_data(claim, KEY, stranger)["ok"]  # not this relay's claim


def report_for(store: Store, relay: PublicKey) -> dict[str, Any]:
    statements = {e.epoch: e.statement for e in store.epochs()}
    report = build_report(
        KEY,
        relay,
        store.balance(relay_account(relay)),
        store.pending(relay),
        store.rewards(relay),
        statements,
        NOW,
    )
    data: dict[str, Any] = json.loads(sign_report(report, ACCOUNTING))
    return data


def test_signed_reports_verify_offline_through_the_cli(
    closed: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    relay = closed.relays()[0]
    data = report_for(closed, relay)
    report = data["report"]
    assert report["claim"]["cumulative"] == closed.balance(relay_account(relay))
    assert [e["epoch"] for e in report["epochs"]] == [0, 1, 2]
    assert report["pending"]["epoch"] == 3
    saved = tmp_path / "earnings.json"
    saved.write_text(json.dumps(data))
    argv = ["earnings", "verify", "--file", str(saved), "--state-dir", str(tmp_path / "none")]
    assert main([*argv, "--accounting-key", KEY.b64]) == 0
    assert "claim verified" in capsys.readouterr().out
    assert main(argv) == 0  # the report's own key, said so
    # the report's figures are signed too: change one and it fails
    forged = json.loads(json.dumps(data))
    forged["report"]["epochs"][0]["emission"] += 1
    saved.write_text(json.dumps(forged))
    assert main(argv) == 1
    assert "does NOT verify" in capsys.readouterr().out
    # a claim alone, changed anywhere, fails through the CLI as well
    claim = dict(report["claim"])
    claim["cumulative"] += 1
    saved.write_text(json.dumps(claim))
    assert main([*argv, "--accounting-key", KEY.b64]) == 1
    claim["cumulative"] -= 1
    saved.write_text(json.dumps(claim))
    assert main([*argv, "--accounting-key", KEY.b64]) == 0
    assert main([*argv]) == 1  # a bare claim needs the key
