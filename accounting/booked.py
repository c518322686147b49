"""Booking acknowledgements: accounting tells each relay what its ledger holds. Pure.

Theory of operation
-------------------
The broker's QoS 1 acknowledgement only says the broker has a message; a
broker may still drop it before the accounting service reads it (mosquitto's
``max_queued_messages`` for a slow or offline subscriber, a cleared
persistent session, a broker restart without persistence). So delivery is
made end to end: after committing a batch, the accounting service publishes
one ``BookedAck`` (label ``meshvpn/v1/booked``, type 6) per relay on the
receipts' paths to ``meshvpn/v1/booked/<relay node id>`` (QoS 1, not
retained): per session id the highest cumulative ``seq`` of that batch that
the ledger now holds (booked, a duplicate of a held one, or recorded stale
behind a newer one). Parked receipts are not acknowledged until they are
booked. A relay re-sends the newest bundle of each session until an ack
signed by *its* accounting key covers it (``relay.delivery``); a lost ack
costs one re-send, which the ledger counts as a duplicate and acknowledges
again. An old ack replayed states something that was true and stays true
(the ledger never forgets a booked receipt), so acks need no freshness check.

Canonical form: the sessions are sorted by id, each at most once.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from accounting.ledger import Booking, Outcome
from accounting.store import Ingest
from meshvpn.identity import PublicKey, node_id_of
from meshvpn.messages import (
    KEY,
    NONCE,
    U64,
    Field,
    ListOf,
    Message,
    MessageError,
    Reader,
    register,
    verify,
)

TOPIC_PREFIX: Final = "meshvpn/v1/booked/"
MAX_SESSIONS: Final = 128  # per message: 128 x 24 bytes stays well inside MAX_MESSAGE
HELD: Final = frozenset({Outcome.BOOKED, Outcome.DUPLICATE, Outcome.STALE})


def booked_topic(relay_node_id: str) -> str:
    return TOPIC_PREFIX + relay_node_id


class SessionSeq(Field):
    """(session id, seq): 16 bytes, then a u64."""

    def encode(self, value: Any) -> bytes:  # noqa: ANN401 - checked here
        session_id, seq = value
        return NONCE.encode(session_id) + U64.encode(seq)

    def decode(self, r: Reader) -> tuple[bytes, int]:
        return NONCE.decode(r), U64.decode(r)


@register
@dataclass(frozen=True)
class BookedAck(Message):
    TYPE: ClassVar[int] = 6
    LABEL: ClassVar[str] = "booked"
    FIELDS: ClassVar[dict[str, Field]] = {
        "relay": KEY,
        "issued_ms": U64,
        "sessions": ListOf(SessionSeq(), MAX_SESSIONS),
    }

    relay: PublicKey  # whose receipts: acks for one relay are void for another
    issued_ms: int
    sessions: tuple[tuple[bytes, int], ...]  # (session id, highest seq held), sorted by id

    def __post_init__(self) -> None:
        ids = [s for s, _ in self.sessions]
        if any(a >= b for a, b in itertools.pairwise(ids)):
            raise ValueError("sessions not sorted by id, or one twice")


def covered(
    items: Sequence[Ingest], bookings: Sequence[Booking]
) -> dict[PublicKey, dict[bytes, int]]:
    """Per relay on the paths, per session: the highest seq the ledger holds after a
    batch (``bookings`` are ``Store.book``'s answers, one per item, in order)."""
    if len(items) != len(bookings):
        raise ValueError("one booking per item")
    out: dict[PublicKey, dict[bytes, int]] = collections.defaultdict(dict)
    for item, booking in zip(items, bookings, strict=True):
        if item.bundle is None or booking.outcome not in HELD:
            continue
        r = item.bundle.receipt
        for relay in r.path:
            held = out[relay]
            held[r.session_id] = max(held.get(r.session_id, 0), r.seq)
    return dict(out)


def build_acks(relay: PublicKey, sessions: dict[bytes, int], now_ms: int) -> list[BookedAck]:
    """The acks saying ``sessions`` to one relay, ``MAX_SESSIONS`` per message."""
    ordered = sorted(sessions.items())
    return [
        BookedAck(relay, now_ms, tuple(ordered[i : i + MAX_SESSIONS]))
        for i in range(0, len(ordered), MAX_SESSIONS)
    ]


def read_ack(topic: str, wire: bytes, accounting_key: PublicKey, relay: PublicKey) -> BookedAck:
    """Verify an ack for ``relay`` from ``accounting_key``; MessageError if not one to act on."""
    signed = verify(wire, BookedAck)
    ack = signed.message
    assert isinstance(ack, BookedAck)  # noqa: S101 - verify() checked the type
    if signed.signer != accounting_key:
        raise MessageError("wrong-signer", "not our accounting service")
    if ack.relay != relay or topic != booked_topic(node_id_of(relay)):
        raise MessageError("wrong-relay")
    return ack
