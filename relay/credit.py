"""The relay's credit gate: serve only clients the accounting service vouches for. Pure.

With ``meshvpn relay --accounting-key KEY`` the relay subscribes to the
accounting service's credit notices (``accounting.credit``) and keeps the
newest per client. A session request from a client without an ``ok``
notice (it never deposited, or its credit ran out) is refused with status
``policy``; when a client's notice turns to ``exhausted`` while it has a
session here, ``on_notice`` names it so the agent cuts it off. Without an
accounting key there is no gate (hand-run relays, labs without accounting).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from accounting.credit import CreditBook
from meshvpn.identity import PublicKey, node_id_of
from meshvpn.messages import REFUSED_POLICY, MessageError, SessionGrant, SessionRequest

NO_CREDIT = "no credit with the accounting service"


@dataclass
class CreditGate:
    accounting_key: PublicKey
    book: CreditBook = field(init=False)
    counters: collections.Counter[str] = field(default_factory=collections.Counter)

    def __post_init__(self) -> None:
        self.book = CreditBook(self.accounting_key)

    def on_notice(self, topic: str, wire: bytes) -> str | None:
        """Take a notice; the client's node id if it must be cut off now."""
        try:
            notice = self.book.receive(topic, wire)
        except MessageError as exc:
            self.counters[f"notice-dropped:{exc.reason}"] += 1
            return None
        self.counters["notices"] += 1
        return None if notice.ok else notice.client

    def may_serve(self, client_identity: PublicKey) -> bool:
        return self.book.may_serve(node_id_of(client_identity))

    def refusal(
        self,
        request: SessionRequest,
        client_identity: PublicKey,
        relay_wireguard_key: PublicKey,
        price_per_gib: int,
        now_ms: int,
    ) -> SessionGrant | None:
        """The answer to a client without credit, or None to go on deciding."""
        if self.may_serve(client_identity):
            return None
        self.counters["refused"] += 1
        return SessionGrant(
            request_nonce=request.nonce,
            status=REFUSED_POLICY,
            reason=NO_CREDIT,
            session_id=bytes(16),
            tunnel_address=bytes(4),
            tunnel_prefix=0,
            relay_wireguard_key=relay_wireguard_key,
            price_per_gib=price_per_gib,
            receipt_interval_s=0,
            receipt_interval_bytes=0,
            expires_ms=now_ms,
        )
