"""Which clients a relay admits, and for how long. Pure.

Theory of operation
-------------------
A verified ``SessionRequest`` (see meshvpn.handshake) is ``decide``-d:

1. a replay (same Noise ephemeral or request nonce seen within the request
   lifetime) is dropped without an answer;
2. more than ``RATE_BURST`` requests from one client identity inside the
   refill window are refused "rate-limited";
3. an exit other than this relay is refused "policy" (multi-hop comes with
   the mesh), a price above the client's maximum "price", a full relay "full"
   with the reason (``relay.operator.admission``: the owner's max sessions,
   or ``gate`` closed by the monthly cap or the sharing hours);
4. otherwise the client's WireGuard key gets a lease from the pool and a
   session with an expiry. The same key asking again renews its session and
   keeps its address.

``expire`` ends sessions whose grant has run out *and* whose WireGuard peer
has been silent for ``IDLE_GRACE_MS``: a client that cannot reach the broker
to renew keeps its tunnel as long as it uses it, so the data plane never
depends on the control plane.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final

from meshvpn.identity import PublicKey
from meshvpn.messages import (
    GRANTED,
    REFUSED_FULL,
    REFUSED_POLICY,
    REFUSED_PRICE,
    REFUSED_RATE,
    SessionGrant,
    SessionRequest,
)
from relay.operator import Gate, admission
from relay.pool import AddressPool, PoolExhaustedError

SESSION_TTL_MS: Final = 10 * 60_000
IDLE_GRACE_MS: Final = 3 * 60_000
REPLAY_WINDOW_MS: Final = 2 * 60_000
RATE_BURST: Final = 5
RATE_REFILL_MS: Final = 2_000  # one more request allowed per refill period
MAX_TRACKED: Final = 100_000
RECEIPT_INTERVAL_S: Final = 10
RECEIPT_INTERVAL_BYTES: Final = 8 << 20


@dataclass(frozen=True)
class Session:
    session_id: bytes
    client_identity: PublicKey
    wireguard_key: PublicKey
    address: ipaddress.IPv4Address
    price_per_gib: int
    granted_ms: int
    expires_ms: int


@dataclass(frozen=True)
class Decision:
    grant: SessionGrant | None  # None: say nothing (a replay)
    session: Session | None  # set when a session was created or renewed
    reason: str  # for counters and logs


@dataclass
class SessionBook:
    pool: AddressPool
    node_id: str
    relay_wireguard_key: PublicKey
    price_per_gib: int
    capacity: int  # the owner's max_sessions
    gate: Gate = field(default_factory=lambda: Gate(open=True))  # set by the operator controls
    sessions: dict[PublicKey, Session] = field(default_factory=dict)  # by WireGuard key
    _seen: OrderedDict[bytes, int] = field(default_factory=OrderedDict)
    _rate: OrderedDict[PublicKey, tuple[float, int]] = field(default_factory=OrderedDict)
    _banned: OrderedDict[PublicKey, int] = field(default_factory=OrderedDict)  # identity -> until

    def ban(self, client_identity: PublicKey, until_ms: int) -> None:
        """A client cut off for not paying gets no new session for a while."""
        self._banned[client_identity] = until_ms
        while len(self._banned) > MAX_TRACKED:
            self._banned.popitem(last=False)

    def end(self, wireguard_key: PublicKey) -> Session | None:
        session = self.sessions.pop(wireguard_key, None)
        if session is not None:
            self.pool.release(wireguard_key)
        return session

    def _refused(self, request: SessionRequest, status: int, reason: str, now_ms: int) -> Decision:
        grant = SessionGrant(
            request_nonce=request.nonce,
            status=status,
            reason=reason.encode()[:200].decode(errors="ignore"),  # the grant's limit
            session_id=bytes(16),
            tunnel_address=bytes(4),
            tunnel_prefix=0,
            relay_wireguard_key=self.relay_wireguard_key,
            price_per_gib=self.price_per_gib,
            receipt_interval_s=0,
            receipt_interval_bytes=0,
            expires_ms=now_ms,
        )
        return Decision(grant, None, reason)

    def _replayed(self, marks: tuple[bytes, ...], now_ms: int) -> bool:
        while self._seen and next(iter(self._seen.values())) < now_ms - REPLAY_WINDOW_MS:
            self._seen.popitem(last=False)
        if any(m in self._seen for m in marks):
            return True
        for m in marks:
            self._seen[m] = now_ms
        while len(self._seen) > MAX_TRACKED:
            self._seen.popitem(last=False)
        return False

    def _rate_ok(self, client: PublicKey, now_ms: int) -> bool:
        tokens, at = self._rate.pop(client, (float(RATE_BURST), now_ms))
        tokens = min(float(RATE_BURST), tokens + (now_ms - at) / RATE_REFILL_MS)
        ok = tokens >= 1
        self._rate[client] = (tokens - 1 if ok else tokens, now_ms)
        while len(self._rate) > MAX_TRACKED:
            self._rate.popitem(last=False)
        return ok

    def decide(
        self,
        request: SessionRequest,
        client_identity: PublicKey,
        ephemeral: bytes,
        session_id: bytes,
        now_ms: int,
    ) -> Decision:
        if self._replayed((b"e" + ephemeral, b"n" + request.nonce), now_ms):
            return Decision(None, None, "replayed")
        if not self._rate_ok(client_identity, now_ms):
            return self._refused(
                request, REFUSED_RATE, "too many requests; wait a few seconds", now_ms
            )
        if self._banned.get(client_identity, 0) > now_ms:
            return self._refused(
                request, REFUSED_POLICY, "cut off recently for unreceipted traffic", now_ms
            )
        if request.want_exit not in ("", self.node_id):
            return self._refused(
                request, REFUSED_POLICY, "this relay offers itself as exit only", now_ms
            )
        if request.max_price_per_gib < self.price_per_gib:
            return self._refused(
                request, REFUSED_PRICE, f"price is {self.price_per_gib} per GiB", now_ms
            )
        held = self.sessions.get(request.wireguard_key)
        if held is not None and held.client_identity != client_identity:
            return self._refused(
                request, REFUSED_POLICY, "WireGuard key belongs to another client", now_ms
            )
        full = admission(self.gate, len(self.sessions), self.capacity, renewal=held is not None)
        if full is not None:
            return self._refused(request, REFUSED_FULL, full, now_ms)
        try:
            address = self.pool.lease(request.wireguard_key)
        except PoolExhaustedError:
            return self._refused(request, REFUSED_FULL, "no tunnel address left", now_ms)
        session = Session(
            session_id=held.session_id if held else session_id,
            client_identity=client_identity,
            wireguard_key=request.wireguard_key,
            address=address,
            price_per_gib=held.price_per_gib if held else self.price_per_gib,
            granted_ms=held.granted_ms if held else now_ms,
            expires_ms=now_ms + SESSION_TTL_MS,
        )
        self.sessions[request.wireguard_key] = session
        grant = SessionGrant(
            request_nonce=request.nonce,
            status=GRANTED,
            reason="",
            session_id=session.session_id,
            tunnel_address=address.packed,
            tunnel_prefix=32,
            relay_wireguard_key=self.relay_wireguard_key,
            price_per_gib=session.price_per_gib,
            receipt_interval_s=RECEIPT_INTERVAL_S,
            receipt_interval_bytes=RECEIPT_INTERVAL_BYTES,
            expires_ms=session.expires_ms,
        )
        return Decision(grant, session, "renewed" if held else "granted")

    def expire(self, now_ms: int, last_handshake_ms: dict[PublicKey, int]) -> list[Session]:
        ended = [
            s
            for key, s in self.sessions.items()
            if s.expires_ms <= now_ms and last_handshake_ms.get(key, 0) < now_ms - IDLE_GRACE_MS
        ]
        for s in ended:
            del self.sessions[s.wireguard_key]
            self.pool.release(s.wireguard_key)
        return ended

    @property
    def load(self) -> int:
        return len(self.sessions)
