"""The relay's admission under floods: budgets, pending sessions, eviction. Pure.

The session book is driven directly with verified requests (no Noise here:
test_negotiation covers the crypto); identities are as cheap to make as they
are for an attacker.
"""

from __future__ import annotations

import ipaddress
import itertools
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from meshvpn.identity import PublicKey
from meshvpn.messages import GRANTED, REFUSED_FULL, REFUSED_POLICY, REFUSED_RATE, SessionRequest
from relay.pool import AddressPool
from relay.sessions import (
    MAX_SESSIONS_PER_CLIENT,
    MIN_PENDING_CAP,
    NEW_BURST,
    NEW_REFILL_MS,
    OPEN_BURST,
    OPEN_REFILL_MS,
    RATE_REFILL_MS,
    Decision,
    SessionBook,
)

NOW = 1_795_000_000_000
RELAY = PublicKey(b"R" * 32)
_serial = itertools.count(1)


def key() -> PublicKey:
    return PublicKey(next(_serial).to_bytes(32, "big"))


def book(capacity: int = 100, pool: str = "100.64.0.0/22") -> SessionBook:
    return SessionBook(
        pool=AddressPool(ipaddress.IPv4Network(pool)),
        node_id="relay",
        relay_wireguard_key=key(),
        price_per_gib=1000,
        capacity=capacity,
    )


def ask(b: SessionBook, identity: PublicKey, wg: PublicKey, now: int = NOW) -> Decision:
    request = SessionRequest(
        relay=RELAY,
        control_key=key(),
        wireguard_key=wg,
        want_exit="",
        max_price_per_gib=2000,
        reply_token=os.urandom(16),
        nonce=os.urandom(16),
        issued_ms=now,
    )
    return b.decide(request, identity, os.urandom(32), os.urandom(16), now)


def status(d: Decision) -> int | None:
    return d.grant.status if d.grant else None


def test_opening_requests_has_one_budget_for_everyone() -> None:
    b = book()
    assert sum(b.may_open(NOW) for _ in range(OPEN_BURST + 50)) == OPEN_BURST
    assert not b.may_open(NOW + OPEN_REFILL_MS - 1)
    assert b.may_open(NOW + OPEN_REFILL_MS)


def test_new_sessions_have_a_budget_but_renewals_do_not() -> None:
    b = book(capacity=1000, pool="100.64.0.0/20")
    clients = [(key(), key()) for _ in range(NEW_BURST + 5)]
    statuses = []
    for i, (ident, wg) in enumerate(clients):
        d = ask(b, ident, wg)
        statuses.append(status(d))
        b.confirm({wg: NOW})  # each came online at once: nothing is evicted
        assert len(b.pending) == 0, i
    assert statuses == [GRANTED] * NEW_BURST + [REFUSED_RATE] * 5
    ident, wg = clients[0]
    assert status(ask(b, ident, wg, NOW + RATE_REFILL_MS)) == GRANTED  # a renewal
    late_ident, late_wg = clients[-1]
    assert status(ask(b, late_ident, late_wg, NOW + NEW_REFILL_MS)) == GRANTED


def test_a_full_relay_evicts_the_oldest_pending_session_not_one_in_use() -> None:
    b = book(capacity=3)
    used, idle1, idle2 = [(key(), key()) for _ in range(3)]
    for ident, wg in (used, idle1, idle2):
        assert status(ask(b, ident, wg)) == GRANTED
    b.confirm({used[1]: NOW + 50})
    newcomer = (key(), key())
    d = ask(b, *newcomer, NOW + 100)
    assert status(d) == GRANTED
    assert [s.wireguard_key for s in d.evicted] == [idle1[1]]
    assert set(b.sessions) == {used[1], idle2[1], newcomer[1]}
    assert idle1[1] not in b.pool.leases
    # once everything is in use, the relay is simply full
    b.confirm(dict.fromkeys(b.sessions, NOW + 200))
    d = ask(b, key(), key(), NOW + 300)
    assert status(d) == REFUSED_FULL
    assert d.evicted == ()


def test_pending_sessions_are_capped_even_with_room() -> None:
    b = book(capacity=20, pool="100.64.0.0/20")
    assert b.pending_cap == MIN_PENDING_CAP
    first = None
    for i in range(MIN_PENDING_CAP + 3):
        wg = key()
        first = first or wg
        d = ask(b, key(), wg, NOW + i * NEW_REFILL_MS)
        assert status(d) == GRANTED
        assert len(b.pending) <= MIN_PENDING_CAP
    assert len(b.sessions) == MIN_PENDING_CAP
    assert first not in b.sessions
    assert book(capacity=100).pending_cap == 50  # half the capacity, past the floor


def test_an_unused_session_stays_until_its_room_is_needed() -> None:
    """No timer: a multi-hop client's standby sessions are unused by design."""
    b = book(capacity=2)
    standby = (key(), key())
    ask(b, *standby)
    b.confirm({})
    assert b.expire(NOW + 60_000, {}) == []
    assert standby[1] in b.sessions
    ask(b, key(), key(), NOW + 60_000)
    d = ask(b, key(), key(), NOW + 61_000)  # full: the oldest unused one goes
    assert [s.wireguard_key for s in d.evicted] == [standby[1]]


def test_a_handshake_from_before_the_grant_does_not_confirm() -> None:
    b = book()
    ident, wg = key(), key()
    ask(b, ident, wg)
    b.confirm({wg: NOW - 60_000})  # an old session with the same key, long gone
    assert wg in b.pending


def test_one_identity_holds_a_bounded_number_of_sessions() -> None:
    b = book()
    ident = key()
    statuses = [
        status(ask(b, ident, key(), NOW + i * RATE_REFILL_MS))
        for i in range(MAX_SESSIONS_PER_CLIENT + 1)
    ]
    assert statuses == [GRANTED] * MAX_SESSIONS_PER_CLIENT + [REFUSED_POLICY]


# ---- a random flood against the book's invariants

ops = st.lists(
    st.tuples(
        st.sampled_from(["new", "again", "handshake", "tick", "expire"]),
        st.integers(0, 40),  # which client (for again/handshake), or ms to advance
    ),
    max_size=250,
)


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(2, 40))
def test_a_flood_never_breaks_the_books_invariants(steps: list[tuple[str, int]], cap: int) -> None:
    b = book(capacity=cap)
    now = NOW
    clients: list[tuple[PublicKey, PublicKey]] = []
    confirmed: set[PublicKey] = set()
    grants_at: list[int] = []
    handshakes: dict[PublicKey, int] = {}
    for op, n in steps:
        if op == "tick":
            now += n * 100
            continue
        if op == "expire":
            b.confirm(handshakes)
            for s in b.expire(now, handshakes):
                confirmed.discard(s.wireguard_key)
            continue
        if op == "handshake":
            if clients:
                wg = clients[n % len(clients)][1]
                if wg in b.sessions:
                    handshakes[wg] = now
                    b.confirm(handshakes)
                    confirmed.add(wg)
            continue
        if op == "again" and clients:
            ident, wg = clients[n % len(clients)]
        else:
            ident, wg = key(), key()
            clients.append((ident, wg))
        was_new = wg not in b.sessions
        d = ask(b, ident, wg, now)
        for s in d.evicted:
            assert s.wireguard_key not in confirmed  # eviction takes pending sessions only
        if status(d) == GRANTED and was_new:
            grants_at.append(now)
        # invariants
        assert len(b.sessions) <= cap
        assert len(b.pending) <= b.pending_cap
        assert set(b.pending) <= set(b.sessions)
        assert set(b.pool.leases) == set(b.sessions)
        assert len(set(b.pool.leases.values())) == len(b.pool.leases)
        confirmed &= set(b.sessions)
    # new sessions never outran their budget
    for i, start in enumerate(grants_at):
        for j in range(i, len(grants_at)):
            assert j - i + 1 <= NEW_BURST + (grants_at[j] - start) // NEW_REFILL_MS


def test_would_evict_says_when_a_pending_session_is_at_stake() -> None:
    b = book(capacity=2)
    first, second = (key(), key()), (key(), key())
    ask(b, *first)

    def request_for(wg: PublicKey) -> SessionRequest:
        return SessionRequest(RELAY, key(), wg, "", 2000, bytes(16), bytes(16), NOW)

    assert not b.would_evict(request_for(second[1]))  # there is room
    ask(b, *second)
    assert b.would_evict(request_for(key()))  # full, and both are pending
    assert not b.would_evict(request_for(first[1]))  # a renewal takes no room
    b.confirm({first[1]: NOW, second[1]: NOW})
    assert not b.would_evict(request_for(key()))  # full of sessions in use: a refusal
