"""Credit notices: the accounting service tells relays which clients may be served.

A ``CreditNotice`` (label ``meshvpn/v1/credit``) is signed by the accounting
service and published retained on ``meshvpn/v1/credit/<client node id>``:
status ``ok`` while the client's balance is above ``MIN_CREDIT``, else
``exhausted``. Relays started with the accounting service's key subscribe to
``meshvpn/v1/credit/+`` and keep, per client, the newest notice signed by that
key (``CreditBook``): a client whose newest notice is not ``ok`` (or who has
none: it never deposited) is refused new sessions, and an open session of a
client that becomes exhausted is cut off. A notice older than the one held is
ignored, so replaying an old ``ok`` changes nothing. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Final

from meshvpn.identity import PublicKey
from meshvpn.messages import U8, U64, Field, Message, MessageError, Text, register, verify

CREDIT_OK: Final = 0
CREDIT_EXHAUSTED: Final = 1
MIN_CREDIT: Final = 1  # a balance below this (zero or a debt) is no credit
TOPIC_PREFIX: Final = "meshvpn/v1/credit/"
TOPIC_FILTER: Final = TOPIC_PREFIX + "+"
REFRESH_MS: Final = 5_000  # a changed balance alone is told no more often than this


def credit_topic(client_node_id: str) -> str:
    return TOPIC_PREFIX + client_node_id


@register
@dataclass(frozen=True)
class CreditNotice(Message):
    TYPE: ClassVar[int] = 8
    LABEL: ClassVar[str] = "credit"
    FIELDS: ClassVar[dict[str, Field]] = {
        "client": Text(32),
        "status": U8,
        "credit": U64,
        "issued_ms": U64,
    }

    client: str  # the client's node id
    status: int
    credit: int  # the balance, or 0 for a debt
    issued_ms: int

    def __post_init__(self) -> None:
        if self.status not in (CREDIT_OK, CREDIT_EXHAUSTED):
            raise ValueError("unknown credit status")

    @property
    def ok(self) -> bool:
        return self.status == CREDIT_OK


def notice_for(client: str, balance: int, issued_ms: int) -> CreditNotice:
    status = CREDIT_OK if balance >= MIN_CREDIT else CREDIT_EXHAUSTED
    return CreditNotice(client, status, max(balance, 0), issued_ms)


def worth_telling(published: tuple[int, int, int], notice: CreditNotice) -> bool:
    """Publish ``notice`` after ``published`` (status, credit, when)? A new status at
    once (relays act on it); a new balance only every ``REFRESH_MS``."""
    status, amount, at = published
    if notice.status != status:
        return True
    return notice.credit != amount and notice.issued_ms - at >= REFRESH_MS


@dataclass
class CreditBook:
    """A relay's view: the newest notice per client from one accounting key."""

    accounting_key: PublicKey
    notices: dict[str, CreditNotice] = field(default_factory=dict)

    def receive(self, topic: str, wire: bytes) -> CreditNotice:
        """Verify and keep a notice; MessageError if it is not one to act on."""
        signed = verify(wire, CreditNotice)
        notice = signed.message
        assert isinstance(notice, CreditNotice)  # noqa: S101 - verify() checked the type
        if signed.signer != self.accounting_key:
            raise MessageError("wrong-signer", "not our accounting service")
        if topic != credit_topic(notice.client):
            raise MessageError("wrong-topic")
        held = self.notices.get(notice.client)
        if held is not None and notice.issued_ms <= held.issued_ms:
            raise MessageError("replayed", "not newer than the notice held")
        self.notices[notice.client] = notice
        return notice

    def may_serve(self, client_node_id: str) -> bool:
        notice = self.notices.get(client_node_id)
        return notice is not None and notice.ok
