"""A relay's earnings report: what the accounting service tells each relay. Pure.

The service publishes one report per relay, retained, on
``meshvpn/v1/earnings/<relay node id>``: the current (pending) epoch's
tally, the last closed epochs itemised (gross, fees, emission, net, paid
bytes, cumulative), and the claim for the newest closed epoch: the relay's
leaf amount, its Merkle proof and the signed ``EpochStatement``.

The report is canonical JSON (sorted keys, no spaces) signed by the
accounting key over ``meshvpn/v1/earnings-report\\x00`` + those bytes, so the
itemised figures are the service's word too. The claim needs none of that:
``check_claim`` verifies leaf, proof and signed root offline, which is what
a chain's merkle-distributor would check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature

from accounting.epochs import ClaimCheck, verify_claim
from accounting.store import Pending, RewardRow
from meshvpn.identity import PrivateKey, PublicKey, node_id_of
from meshvpn.messages import MessageError

REPORT_LABEL: Final = b"meshvpn/v1/earnings-report\x00"
REPORT_VERSION: Final = 1
EPOCHS_SHOWN: Final = 16  # keeps a report well inside the broker's message size
TOPIC_PREFIX: Final = "meshvpn/v1/earnings/"


def earnings_topic(relay_node_id: str) -> str:
    return TOPIC_PREFIX + relay_node_id


def canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def build_report(  # noqa: PLR0917 - the report's parts, in order
    accounting_key: PublicKey,
    relay: PublicKey,
    balance: int,
    pending: Pending,
    rows: list[RewardRow],
    statements: dict[int, bytes],
    issued_ms: int,
) -> dict[str, Any]:
    shown = rows[-EPOCHS_SHOWN:]
    last = rows[-1] if rows else None
    return {
        "version": REPORT_VERSION,
        "accounting_key": accounting_key.b64,
        "relay": relay.b64,
        "node_id": node_id_of(relay),
        "issued_ms": issued_ms,
        "balance": balance,
        "pending": {
            "epoch": pending.epoch,
            "start_ms": pending.start_ms,
            "gross": pending.gross,
            "fee": pending.fee,
            "net": pending.gross - pending.fee,
            "paid_bytes": pending.paid_bytes,
        },
        "epochs": [
            {
                "epoch": r.epoch,
                "gross": r.gross,
                "fee": r.fee,
                "emission": r.emission,
                "net": r.net,
                "paid_bytes": r.paid_bytes,
                "cumulative": r.cumulative,
            }
            for r in shown
        ],
        "claim": None
        if last is None
        else {
            "epoch": last.epoch,
            "relay": relay.b64,
            "cumulative": last.cumulative,
            "proof": [p.hex() for p in last.proof],
            "statement": statements[last.epoch].hex(),
        },
    }


def sign_report(report: dict[str, Any], key: PrivateKey) -> bytes:
    body = canonical(report)
    signature = key.ed25519_sign(REPORT_LABEL + body)
    return canonical({"report": report, "signature": signature.hex()})


def open_report(wire: bytes, accounting_key: PublicKey | None = None) -> dict[str, Any]:
    """Parse and verify a signed report; MessageError if anything is off."""
    try:
        outer = json.loads(wire)
        report = outer["report"]
        signature = bytes.fromhex(outer["signature"])
        signer = PublicKey.from_b64(report["accounting_key"])
    except (ValueError, KeyError, TypeError):
        raise MessageError("malformed", "not an earnings report") from None
    if not isinstance(report, dict):
        raise MessageError("malformed", "not an earnings report")
    if accounting_key is not None and signer != accounting_key:
        raise MessageError("wrong-signer", "not signed by the accounting key given")
    try:
        signer.ed25519_verify(signature, REPORT_LABEL + canonical(report))
    except (InvalidSignature, ValueError):
        raise MessageError("bad-signature", "the report's signature does not verify") from None
    return report


@dataclass(frozen=True)
class Claim:
    epoch: int
    relay: PublicKey
    cumulative: int
    proof: tuple[bytes, ...]
    statement: bytes

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Claim:
        try:
            return cls(
                epoch=int(data["epoch"]),
                relay=PublicKey.from_b64(str(data["relay"])),
                cumulative=int(data["cumulative"]),
                proof=tuple(bytes.fromhex(str(p)) for p in data["proof"]),
                statement=bytes.fromhex(str(data["statement"])),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise MessageError("malformed", f"claim: {exc}") from None

    def to_json(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "relay": self.relay.b64,
            "cumulative": self.cumulative,
            "proof": [p.hex() for p in self.proof],
            "statement": self.statement.hex(),
        }


def check_claim(claim: Claim, accounting_key: PublicKey) -> ClaimCheck:
    """Offline: leaf, proof and the signed root; and the statement is for the claimed epoch."""
    if not 0 <= claim.cumulative < 1 << 128:
        return ClaimCheck(ok=False, reason="amount out of range")
    check = verify_claim(
        claim.statement, accounting_key, claim.relay, claim.cumulative, claim.proof
    )
    if check.ok and check.statement is not None and check.statement.epoch != claim.epoch:
        return ClaimCheck(ok=False, reason="the statement is for another epoch")
    return check
