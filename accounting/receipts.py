"""Bandwidth receipts: what a client signs and every relay on its path countersigns.

Theory of operation
-------------------
A ``Receipt`` is a control message (same canonical codec and Ed25519 rules as
every other, label ``meshvpn/v1/receipt``) signed by the *client*. It is
cumulative: it states all bytes of one session so far, so a newer receipt
supersedes an older one and a resent one changes nothing.

Bytes are counted as WireGuard counts them on both ends of the access link
(encrypted payload bytes, about 3 % above the IP bytes), because that is the
one number both parties can observe without touching packets.

A ``ReceiptBundle`` is the client's signed receipt plus one countersignature
per relay on the path, in path order. A countersignature is Ed25519 by the
relay's identity key over ``b"meshvpn/v1/receipt-countersign\\x00"`` followed
by the client's signed receipt bytes, so it vouches for exactly that receipt
and cannot be moved to another.

Bundle wire format::

    b"MVRB" | version:u8 | receipt_len:u16 | receipt | count:u8 | count x signature:64

(The signers' keys are the receipt's ``path``; they are not repeated.)

A relay delivers its bundles to accounting packed several to a broker
message (``pack_bundles``), as many as fit the broker's payload limit, so
per-message costs (TLS, MQTT, the broker's routing, one acknowledgement)
are paid once for many receipts::

    b"MVRL" | count:u16 | count x (bundle_len:u16 | bundle)

``unpack_bundles`` also takes a lone bundle (a relay of an earlier version).
The list carries no signature of its own: every bundle in it is checked on
its own, and a bad one fails alone.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

from cryptography.exceptions import InvalidSignature

from meshvpn.identity import PrivateKey, PublicKey
from meshvpn.messages import (
    KEY,
    NONCE,
    U64,
    Field,
    ListOf,
    Message,
    MessageError,
    register,
    sign,
    verify,
)

GIB: Final = 1 << 30
MAX_PATH: Final = 8
BUNDLE_MAGIC: Final = b"MVRB"
BUNDLE_VERSION: Final = 1
COUNTERSIGN_LABEL: Final = b"meshvpn/v1/receipt-countersign\x00"
_HEAD: Final = struct.Struct("!4sBH")
LIST_MAGIC: Final = b"MVRL"
_LIST_HEAD: Final = struct.Struct("!4sH")
_LEN: Final = struct.Struct("!H")


@register
@dataclass(frozen=True)
class Receipt(Message):
    TYPE: ClassVar[int] = 4
    LABEL: ClassVar[str] = "receipt"
    FIELDS: ClassVar[dict[str, Field]] = {
        "session_id": NONCE,
        "client": KEY,
        "path": ListOf(KEY, MAX_PATH),
        "bytes_up": U64,
        "bytes_down": U64,
        "price_per_gib": U64,
        "seq": U64,
        "started_ms": U64,
        "issued_ms": U64,
    }

    session_id: bytes
    client: PublicKey  # the client's identity key: the signer
    path: tuple[PublicKey, ...]  # relay identity keys: entry, transit..., exit
    bytes_up: int  # client to internet, cumulative for the session
    bytes_down: int  # internet to client, cumulative
    price_per_gib: int  # token units per GiB, as granted
    seq: int  # strictly increasing per session
    started_ms: int
    issued_ms: int

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("a receipt names at least one relay")
        if len(set(self.path)) != len(self.path):
            raise ValueError("a relay appears twice on the path")

    @property
    def total_bytes(self) -> int:
        return self.bytes_up + self.bytes_down

    @property
    def cost(self) -> int:
        """What the client owes for the whole session so far, rounded down."""
        return self.total_bytes * self.price_per_gib // GIB

    def covers(self, other: Receipt) -> bool:
        """True if this receipt states at least everything ``other`` does."""
        return (
            self.session_id == other.session_id
            and self.bytes_up >= other.bytes_up
            and self.bytes_down >= other.bytes_down
            and self.seq >= other.seq
        )


def sign_receipt(receipt: Receipt, client_key: PrivateKey) -> bytes:
    if client_key.ed25519_public() != receipt.client:
        raise ValueError("a receipt is signed by the client it names")
    return sign(receipt, client_key)


def verify_receipt(wire: bytes) -> Receipt:
    signed = verify(wire, Receipt)
    receipt = signed.message
    assert isinstance(receipt, Receipt)  # noqa: S101 - verify() checked the type
    if signed.signer != receipt.client:
        raise MessageError("wrong-signer", "receipt not signed by its client")
    return receipt


def countersign(receipt_wire: bytes, relay_key: PrivateKey) -> bytes:
    return relay_key.ed25519_sign(COUNTERSIGN_LABEL + receipt_wire)


@dataclass(frozen=True)
class ReceiptBundle:
    receipt: Receipt
    receipt_wire: bytes
    signatures: tuple[bytes, ...]  # one per relay on the path, in path order

    @property
    def complete(self) -> bool:
        return len(self.signatures) == len(self.receipt.path)

    def encode(self) -> bytes:
        return (
            _HEAD.pack(BUNDLE_MAGIC, BUNDLE_VERSION, len(self.receipt_wire))
            + self.receipt_wire
            + bytes([len(self.signatures)])
            + b"".join(self.signatures)
        )

    def add_countersignature(self, relay_key: PrivateKey) -> ReceiptBundle:
        """The next relay on the path vouches for the receipt."""
        position = len(self.signatures)
        if position >= len(self.receipt.path):
            raise ValueError("every relay on the path has countersigned already")
        if relay_key.ed25519_public() != self.receipt.path[position]:
            raise ValueError("relays countersign in path order")
        return ReceiptBundle(
            self.receipt,
            self.receipt_wire,
            (*self.signatures, countersign(self.receipt_wire, relay_key)),
        )

    @classmethod
    def from_client(cls, receipt_wire: bytes) -> ReceiptBundle:
        return cls(verify_receipt(receipt_wire), receipt_wire, ())

    @classmethod
    def decode(cls, wire: bytes) -> ReceiptBundle:
        """Parse and verify the client's signature and every countersignature present."""
        if len(wire) < _HEAD.size + 1:
            raise MessageError("malformed", "bundle too short")
        magic, version, receipt_len = _HEAD.unpack_from(wire)
        if magic != BUNDLE_MAGIC:
            raise MessageError("malformed", "bad bundle magic")
        if version != BUNDLE_VERSION:
            raise MessageError("unsupported-version")
        end = _HEAD.size + receipt_len
        if len(wire) < end + 1:
            raise MessageError("malformed", "bundle truncated")
        receipt_wire = wire[_HEAD.size : end]
        receipt = verify_receipt(receipt_wire)
        count = wire[end]
        sigs = wire[end + 1 :]
        if count > len(receipt.path) or len(sigs) != count * 64:
            raise MessageError("malformed", "countersignature count")
        signatures = tuple(sigs[i * 64 : (i + 1) * 64] for i in range(count))
        for relay, signature in zip(receipt.path, signatures, strict=False):
            try:
                relay.ed25519_verify(signature, COUNTERSIGN_LABEL + receipt_wire)
            except (InvalidSignature, ValueError):
                raise MessageError("bad-countersignature") from None
        return cls(receipt, receipt_wire, signatures)


@dataclass(frozen=True)
class PartialBundle:
    """A receipt whose countersignatures are being collected, in any order.

    A countersignature signs only the receipt's wire, so the relays of a
    multi-hop path may answer in any order (the exit first, then whoever
    answers); ``bundle`` assembles them in path order once all are in."""

    receipt: Receipt
    receipt_wire: bytes
    signatures: tuple[bytes | None, ...]  # by path position; None: not yet

    @classmethod
    def start(cls, receipt_wire: bytes) -> PartialBundle:
        receipt = verify_receipt(receipt_wire)
        return cls(receipt, receipt_wire, (None,) * len(receipt.path))

    @property
    def complete(self) -> bool:
        return all(s is not None for s in self.signatures)

    @property
    def missing(self) -> tuple[PublicKey, ...]:
        """The relays whose countersignature is still wanted, in path order."""
        return tuple(
            k for k, s in zip(self.receipt.path, self.signatures, strict=True) if s is None
        )

    def sign(self, relay_key: PrivateKey) -> PartialBundle:
        """This relay (anywhere on the path) countersigns."""
        return self.with_signature(
            relay_key.ed25519_public(), countersign(self.receipt_wire, relay_key)
        )

    def with_signature(self, relay: PublicKey, signature: bytes) -> PartialBundle:
        """A countersignature from ``relay``, checked; raises MessageError if it is bad."""
        if relay not in self.receipt.path:
            raise MessageError("not-on-path", "countersigned by a relay off the path")
        try:
            relay.ed25519_verify(signature, COUNTERSIGN_LABEL + self.receipt_wire)
        except (InvalidSignature, ValueError):
            raise MessageError("bad-countersignature") from None
        position = self.receipt.path.index(relay)
        signatures = list(self.signatures)
        signatures[position] = signature
        return PartialBundle(self.receipt, self.receipt_wire, tuple(signatures))

    def bundle(self) -> ReceiptBundle:
        """The bundle in path order; only once every relay has countersigned."""
        if not self.complete:
            raise ValueError("countersignatures are missing")
        return ReceiptBundle(
            self.receipt, self.receipt_wire, tuple(s for s in self.signatures if s is not None)
        )


def pack_bundles(bundles: Sequence[bytes], limit: int) -> list[tuple[int, bytes]]:
    """Encoded bundles, in order, packed into messages of at most ``limit`` bytes:
    (how many bundles the message holds, the message). A bundle never straddles two
    messages; one too big for ``limit`` alone goes out alone, unwrapped."""
    out: list[tuple[int, bytes]] = []
    held: list[bytes] = []
    size = _LIST_HEAD.size

    def flush() -> None:
        if len(held) == 1:
            out.append((1, held[0]))
        elif held:
            parts = b"".join(_LEN.pack(len(b)) + b for b in held)
            out.append((len(held), _LIST_HEAD.pack(LIST_MAGIC, len(held)) + parts))

    for bundle in bundles:
        need = _LEN.size + len(bundle)
        if held and size + need > limit:
            flush()
            held, size = [], _LIST_HEAD.size
        held.append(bundle)
        size += need
    flush()
    return out


def unpack_bundles(wire: bytes) -> list[bytes]:
    """The encoded bundles of one message (a list, or a lone bundle), not yet checked;
    MessageError if the list itself is malformed."""
    if not wire.startswith(LIST_MAGIC):
        return [wire]
    if len(wire) < _LIST_HEAD.size:
        raise MessageError("malformed", "bundle list too short")
    _, count = _LIST_HEAD.unpack_from(wire)
    bundles, at = [], _LIST_HEAD.size
    for _ in range(count):
        if at + _LEN.size > len(wire):
            raise MessageError("malformed", "bundle list truncated")
        (length,) = _LEN.unpack_from(wire, at)
        at += _LEN.size
        if at + length > len(wire):
            raise MessageError("malformed", "bundle list truncated")
        bundles.append(wire[at : at + length])
        at += length
    if at != len(wire):
        raise MessageError("malformed", "bytes after the bundle list")
    return bundles
