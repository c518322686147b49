"""The signed epoch statement and offline claim verification.

At each epoch close the accounting service signs an ``EpochStatement``
(label ``meshvpn/v1/epoch``) holding the Merkle root over every relay's
cumulative earnings. A relay proves its claim with its leaf (its identity key
and cumulative amount), the proof (sibling hashes) and the statement; anyone
holding the accounting service's public key checks all three offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from accounting.ledger import EpochClose
from accounting.merkle import verify_proof
from meshvpn.identity import PrivateKey, PublicKey
from meshvpn.messages import U32, U64, Field, Fixed, Message, MessageError, register, sign, verify


@register
@dataclass(frozen=True)
class EpochStatement(Message):
    TYPE: ClassVar[int] = 5
    LABEL: ClassVar[str] = "epoch"
    FIELDS: ClassVar[dict[str, Field]] = {
        "epoch": U64,
        "start_ms": U64,
        "end_ms": U64,
        "root": Fixed(32),
        "relays": U32,
        "emitted": U64,
        "carried": U64,
    }

    epoch: int
    start_ms: int
    end_ms: int
    root: bytes
    relays: int
    emitted: int
    carried: int


def statement_of(close: EpochClose) -> EpochStatement:
    return EpochStatement(
        epoch=close.epoch,
        start_ms=close.start_ms,
        end_ms=close.end_ms,
        root=close.tree.root,
        relays=len(close.tree.leaves),
        emitted=close.emitted,
        carried=close.carried,
    )


def sign_statement(close: EpochClose, accounting_key: PrivateKey) -> bytes:
    return sign(statement_of(close), accounting_key)


@dataclass(frozen=True)
class ClaimCheck:
    ok: bool
    reason: str
    statement: EpochStatement | None = None


def verify_claim(
    statement_wire: bytes,
    accounting_key: PublicKey,
    relay: PublicKey,
    cumulative: int,
    proof: tuple[bytes, ...],
) -> ClaimCheck:
    """Offline: is ``cumulative`` what the accounting service committed to for ``relay``?"""
    try:
        signed = verify(statement_wire, EpochStatement)
    except MessageError as exc:
        return ClaimCheck(ok=False, reason=f"statement does not verify ({exc.reason})")
    statement = signed.message
    assert isinstance(statement, EpochStatement)  # noqa: S101 - verify() checked the type
    if signed.signer != accounting_key:
        return ClaimCheck(ok=False, reason="statement not signed by this accounting key")
    if not verify_proof(relay, cumulative, proof, statement.root):
        return ClaimCheck(
            ok=False, reason="leaf and proof do not lead to the signed root", statement=statement
        )
    return ClaimCheck(ok=True, reason="claim verified", statement=statement)
