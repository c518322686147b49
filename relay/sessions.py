"""Which clients a relay admits, and for how long. Pure.

Theory of operation
-------------------
Before a request is even opened, ``may_open`` spends a token from one bucket
for all requests together: opening costs the relay two X25519 operations and
a signature check, so a flood of requests (forged or not, from any number of
identities) costs it a bounded amount of CPU per second. What is over budget
is dropped unopened and counted ("overload").

A verified ``SessionRequest`` (see meshvpn.handshake) is ``decide``-d:

1. a replay (same Noise ephemeral or request nonce seen within the request
   lifetime) is dropped without an answer;
2. more than ``RATE_BURST`` requests from one client identity inside the
   refill window are refused "rate-limited";
3. an exit other than this relay is refused "policy" (multi-hop comes with
   the mesh), a price above the client's maximum "price", a client holding
   ``MAX_SESSIONS_PER_CLIENT`` already "policy"; a ``gate`` closed by the
   owner's monthly cap or sharing hours "full" with its reason, renewals too
   (``relay.operator``);
4. a *new* session spends a token from the new-session bucket (else
   "rate-limited": the relay is busy), and needs room: if the relay is full
   (the owner's max sessions, or the pool), or ``pending_cap`` sessions are
   still *pending*, the oldest pending session is evicted to make room (like
   a SYN cache); with nothing pending to evict, a full relay refuses "full"
   with the reason (``relay.operator.admission``);
5. otherwise the client's WireGuard key gets a lease from the pool and a
   session with an expiry. The same key asking again renews its session and
   keeps its address.

A session is *pending* from its grant until its WireGuard peer has made a
handshake (``confirm``). Identities cost nothing to make, so a request being
valid says nothing about whether its client will ever use or pay for the
session; pending sessions are what such clients can hold, and every newer
session that needs room evicts them first, so they never keep a real client
out. (They are not ended on a timer: a multi-hop client's standby entry and
exit are granted at connect time and stay unused until a failover; they
expire like any session.) A real client makes its handshake within a second
of the grant, and before evicting, the adapter reads the handshakes afresh.
Once in use, a session that does not pay is cut off by the receipt exchange
(accounting.exchange).

``expire`` ends sessions whose grant has run out *and* whose WireGuard peer
has been silent for ``IDLE_GRACE_MS``: a client that cannot reach the broker
to renew keeps its tunnel as long as it uses it, so the data plane never
depends on the control plane.

Every table here is bounded (``MAX_TRACKED``), so a flood cannot grow memory.
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
from meshvpn.ratelimit import RateTable, TokenBucket
from relay.operator import Gate, admission
from relay.pool import AddressPool, PoolExhaustedError

SESSION_TTL_MS: Final = 10 * 60_000
IDLE_GRACE_MS: Final = 3 * 60_000
REPLAY_WINDOW_MS: Final = 2 * 60_000
RATE_BURST: Final = 5
RATE_REFILL_MS: Final = 2_000  # one more request allowed per refill period
MAX_TRACKED: Final = 100_000
OPEN_BURST: Final = 600  # requests opened (Noise + signature), all clients together
OPEN_REFILL_MS: Final = 3  # ~330 per second: about a sixth of a core
NEW_BURST: Final = 20  # new sessions (peer added, lease taken), all clients together
NEW_REFILL_MS: Final = 200  # 5 per second sustained
MIN_PENDING_CAP: Final = 16  # sessions granted but not yet used: at least this many...
PENDING_SHARE: Final = 2  # ...or 1/2 of the capacity, whichever is more
HANDSHAKE_SKEW_MS: Final = 1_000  # WireGuard's clock (seconds, wall) against ours
MAX_SESSIONS_PER_CLIENT: Final = 4
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
    evicted: tuple[Session, ...] = ()  # pending sessions ended to make room


@dataclass
class SessionBook:
    pool: AddressPool
    node_id: str
    relay_wireguard_key: PublicKey
    price_per_gib: int
    capacity: int  # the owner's max_sessions
    gate: Gate = field(default_factory=lambda: Gate(open=True))  # set by the operator controls
    sessions: dict[PublicKey, Session] = field(default_factory=dict)  # by WireGuard key
    pending: OrderedDict[PublicKey, int] = field(default_factory=OrderedDict)  # key -> granted
    _seen: OrderedDict[bytes, int] = field(default_factory=OrderedDict)
    _rate: RateTable[PublicKey] = field(
        default_factory=lambda: RateTable(RATE_BURST, RATE_REFILL_MS, MAX_TRACKED)
    )
    _opens: TokenBucket = field(default_factory=lambda: TokenBucket(OPEN_BURST, OPEN_REFILL_MS))
    _new: TokenBucket = field(default_factory=lambda: TokenBucket(NEW_BURST, NEW_REFILL_MS))
    _banned: OrderedDict[PublicKey, int] = field(default_factory=OrderedDict)  # identity -> until

    def may_open(self, now_ms: int) -> bool:
        """Whether the budget allows opening one more request now (see the module doc)."""
        return self._opens.allow(now_ms)

    def ban(self, client_identity: PublicKey, until_ms: int) -> None:
        """A client cut off for not paying gets no new session for a while."""
        self._banned[client_identity] = until_ms
        while len(self._banned) > MAX_TRACKED:
            self._banned.popitem(last=False)

    def end(self, wireguard_key: PublicKey) -> Session | None:
        session = self.sessions.pop(wireguard_key, None)
        self.pending.pop(wireguard_key, None)
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

    @property
    def pending_cap(self) -> int:
        return max(MIN_PENDING_CAP, self.capacity // PENDING_SHARE)

    def would_evict(self, request: SessionRequest) -> bool:
        """Whether granting ``request`` now would end a pending session: the adapter
        then first confirms the sessions whose handshakes it can see (``confirm``),
        so that a client that has just come up is not taken for an unused one."""
        if request.wireguard_key in self.sessions or not self.pending:
            return False
        full = len(self.sessions) >= self.capacity or self.pool.free == 0
        return full or len(self.pending) >= self.pending_cap

    def _make_room(self) -> tuple[Session, ...] | None:
        """Room for one new session: () if there is, the evicted pending session if
        one had to go, None if the relay is full of sessions in use."""
        full = len(self.sessions) >= self.capacity or self.pool.free == 0
        if not full and len(self.pending) < self.pending_cap:
            return ()
        if not self.pending:
            return None
        oldest = next(iter(self.pending))
        evicted = self.end(oldest)
        return (evicted,) if evicted is not None else ()

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
        if not self._rate.allow(client_identity, now_ms):
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
        if not self.gate.open:  # the owner's caps or hours: renewals are refused too
            return self._refused(request, REFUSED_FULL, self.gate.reason, now_ms)
        evicted: tuple[Session, ...] = ()
        if held is None:
            if (
                sum(s.client_identity == client_identity for s in self.sessions.values())
                >= MAX_SESSIONS_PER_CLIENT
            ):
                return self._refused(
                    request, REFUSED_POLICY, "too many sessions for this client", now_ms
                )
            if not self._new.allow(now_ms):
                return self._refused(
                    request, REFUSED_RATE, "busy with new sessions; try again shortly", now_ms
                )
            room = self._make_room()
            if room is None:
                full = admission(self.gate, len(self.sessions), self.capacity, renewal=False)
                return self._refused(
                    request, REFUSED_FULL, full or "no tunnel address left", now_ms
                )
            evicted = room
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
        if held is None:
            self.pending[request.wireguard_key] = now_ms
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
        return Decision(grant, session, "renewed" if held else "granted", evicted)

    def confirm(self, last_handshake_ms: dict[PublicKey, int]) -> None:
        """Sessions whose WireGuard peer made a handshake since the grant are in use."""
        for key, granted in list(self.pending.items()):
            if last_handshake_ms.get(key, 0) >= granted - HANDSHAKE_SKEW_MS:
                del self.pending[key]

    def expire(self, now_ms: int, last_handshake_ms: dict[PublicKey, int]) -> list[Session]:
        ended = [
            s
            for key, s in self.sessions.items()
            if s.expires_ms <= now_ms and last_handshake_ms.get(key, 0) < now_ms - IDLE_GRACE_MS
        ]
        for s in ended:
            self.end(s.wireguard_key)
        return ended

    @property
    def load(self) -> int:
        return len(self.sessions)
