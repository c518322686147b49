"""Client and relay negotiate in memory: Noise IK, signatures, the relay's policy.

The two parties exchange the two IK messages directly, as the broker would
carry them, the way aioquic's tests drive a client and a server in memory.
"""

from __future__ import annotations

import ipaddress
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshvpn.handshake import (
    REQUEST_SIZES,
    accept_request,
    open_request,
    request_size_ok,
)
from meshvpn.identity import PublicKey, new_ed25519, new_x25519, node_id_of
from meshvpn.messages import (
    GRANTED,
    REFUSED_FULL,
    REFUSED_POLICY,
    REFUSED_PRICE,
    REFUSED_RATE,
    LinkRequest,
    MessageError,
    SessionRequest,
)
from relay.pool import AddressPool
from relay.sessions import IDLE_GRACE_MS, RATE_BURST, SESSION_TTL_MS, SessionBook

NOW = 1_795_000_000_000


class Node:
    def __init__(self) -> None:
        self.identity = new_ed25519()
        self.control = new_x25519()
        self.wireguard = new_x25519()

    @property
    def id_pub(self) -> PublicKey:
        return self.identity.ed25519_public()


def make_relay(capacity: int = 10, price: int = 1000) -> tuple[Node, SessionBook]:
    node = Node()
    book = SessionBook(
        pool=AddressPool(ipaddress.IPv4Network("100.64.0.0/24")),
        node_id=node_id_of(node.id_pub),
        relay_wireguard_key=node.wireguard.x25519_public(),
        price_per_gib=price,
        capacity=capacity,
    )
    return node, book


def request_for(
    client: Node, relay: Node, *, max_price: int = 10_000, want_exit: str = "", now: int = NOW
) -> SessionRequest:
    return SessionRequest(
        relay=relay.id_pub,
        control_key=client.control.x25519_public(),
        wireguard_key=client.wireguard.x25519_public(),
        want_exit=want_exit,
        max_price_per_gib=max_price,
        reply_token=os.urandom(16),
        nonce=os.urandom(16),
        issued_ms=now,
    )


def negotiate(
    client: Node, relay: Node, book: SessionBook, request: SessionRequest, now: int = NOW
):
    """One IK exchange, message 1 then message 2, as the broker would carry them."""
    wire, pending = open_request(
        client.identity, client.control, relay.id_pub, relay.control.x25519_public(), request
    )
    received = accept_request(relay.control, relay.id_pub, wire, now)
    decision = book.decide(
        received.request, received.client_identity, received.ephemeral, os.urandom(16), now
    )
    if decision.grant is None:
        return None
    return pending.read_grant(received.answer(decision.grant, relay.identity))


def test_grant_gives_address_and_session() -> None:
    client = Node()
    relay, book = make_relay()
    grant = negotiate(client, relay, book, request_for(client, relay))
    assert grant is not None
    assert grant.status == GRANTED
    assert grant.address == ipaddress.IPv4Interface("100.64.0.2/32")
    assert grant.relay_wireguard_key == relay.wireguard.x25519_public()
    assert book.sessions[client.wireguard.x25519_public()].client_identity == client.id_pub


def test_renewal_keeps_address_and_session_id() -> None:
    client = Node()
    relay, book = make_relay()
    first = negotiate(client, relay, book, request_for(client, relay))
    second = negotiate(
        client, relay, book, request_for(client, relay, now=NOW + 1000), now=NOW + 1000
    )
    assert first is not None and second is not None
    assert second.address == first.address
    assert second.session_id == first.session_id
    assert second.expires_ms > first.expires_ms


def test_replayed_request_gets_no_answer_and_no_second_session() -> None:
    client = Node()
    relay, book = make_relay()
    request = request_for(client, relay)
    wire, _ = open_request(
        client.identity, client.control, relay.id_pub, relay.control.x25519_public(), request
    )
    first = accept_request(relay.control, relay.id_pub, wire, NOW)
    assert book.decide(
        first.request, first.client_identity, first.ephemeral, os.urandom(16), NOW
    ).grant
    again = accept_request(relay.control, relay.id_pub, wire, NOW + 5)
    decision = book.decide(
        again.request, again.client_identity, again.ephemeral, os.urandom(16), NOW + 5
    )
    assert decision.grant is None
    assert decision.reason == "replayed"


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [({"max_price": 999}, REFUSED_PRICE), ({"want_exit": "mvsomeoneelse"}, REFUSED_POLICY)],
)
def test_refusals_say_why(kwargs: dict[str, object], status: int) -> None:
    client = Node()
    relay, book = make_relay(price=1000)
    grant = negotiate(client, relay, book, request_for(client, relay, **kwargs))  # type: ignore[arg-type]
    assert grant is not None
    assert grant.status == status
    assert grant.reason
    assert not book.sessions


def test_full_relay_refuses_new_clients_but_renews_old() -> None:
    relay, book = make_relay(capacity=1)
    a, b = Node(), Node()
    assert negotiate(a, relay, book, request_for(a, relay)).status == GRANTED  # type: ignore[union-attr]
    book.confirm({a.wireguard.x25519_public(): NOW})  # a's tunnel is up: in use
    assert negotiate(b, relay, book, request_for(b, relay)).status == REFUSED_FULL  # type: ignore[union-attr]
    assert negotiate(a, relay, book, request_for(a, relay)).status == GRANTED  # type: ignore[union-attr]


def test_rate_limit_per_identity() -> None:
    relay, book = make_relay()
    client = Node()
    statuses = [
        negotiate(client, relay, book, request_for(client, relay)).status
        for _ in range(RATE_BURST + 2)
    ]  # type: ignore[union-attr]
    assert statuses[:RATE_BURST] == [GRANTED] * RATE_BURST
    assert statuses[RATE_BURST:] == [REFUSED_RATE] * 2
    other = Node()  # another identity is not held back
    assert negotiate(other, relay, book, request_for(other, relay)).status == GRANTED  # type: ignore[union-attr]


def test_another_clients_wireguard_key_cannot_be_taken_over() -> None:
    relay, book = make_relay()
    victim, thief = Node(), Node()
    negotiate(victim, relay, book, request_for(victim, relay))
    thief.wireguard = victim.wireguard  # a thief who knows only the public key claims it
    grant = negotiate(thief, relay, book, request_for(thief, relay))
    assert grant is not None
    assert grant.status == REFUSED_POLICY


def test_request_for_another_relay_or_stale_is_rejected() -> None:
    client = Node()
    relay, _ = make_relay()
    other, _ = make_relay()
    req = request_for(client, other)  # names another relay, sealed to this one
    wire, _ = open_request(
        client.identity, client.control, relay.id_pub, relay.control.x25519_public(), req
    )
    with pytest.raises(MessageError, match="wrong-relay"):
        accept_request(relay.control, relay.id_pub, wire, NOW)
    req = request_for(client, relay, now=NOW - 10 * 60_000)
    wire, _ = open_request(
        client.identity, client.control, relay.id_pub, relay.control.x25519_public(), req
    )
    with pytest.raises(MessageError, match="expired"):
        accept_request(relay.control, relay.id_pub, wire, NOW)


def test_request_signed_for_another_noise_key_is_rejected() -> None:
    client = Node()
    relay, _ = make_relay()
    req = request_for(client, relay)
    stolen_control = new_x25519()  # sealed under a control key the request does not name
    wire, _ = open_request(
        client.identity, stolen_control, relay.id_pub, relay.control.x25519_public(), req
    )
    with pytest.raises(MessageError, match="key-mismatch"):
        accept_request(relay.control, relay.id_pub, wire, NOW)


def test_grant_from_someone_else_is_rejected() -> None:
    client = Node()
    relay, book = make_relay()
    impostor = Node()
    req = request_for(client, relay)
    wire, pending = open_request(
        client.identity, client.control, relay.id_pub, relay.control.x25519_public(), req
    )
    received = accept_request(relay.control, relay.id_pub, wire, NOW)
    decision = book.decide(
        received.request, received.client_identity, received.ephemeral, os.urandom(16), NOW
    )
    assert decision.grant is not None
    with pytest.raises(MessageError, match="wrong-signer"):
        pending.read_grant(received.answer(decision.grant, impostor.identity))


def test_broker_sees_no_keys_or_addresses_in_clear() -> None:
    client = Node()
    relay, book = make_relay()
    req = request_for(client, relay)
    wire1, _ = open_request(
        client.identity, client.control, relay.id_pub, relay.control.x25519_public(), req
    )
    received = accept_request(relay.control, relay.id_pub, wire1, NOW)
    grant = book.decide(
        received.request, received.client_identity, received.ephemeral, os.urandom(16), NOW
    ).grant
    assert grant is not None
    wire2 = received.answer(grant, relay.identity)
    secrets = [
        client.wireguard.x25519_public().raw,
        client.id_pub.raw,
        client.control.x25519_public().raw,
        grant.tunnel_address,
        grant.session_id,
    ]
    for wire in (wire1, wire2):
        for secret in secrets:
            assert secret not in wire


@settings(max_examples=200)
@given(st.binary(max_size=700))
def test_hostile_bytes_at_the_relay_raise_only_message_error(data: bytes) -> None:
    relay = Node()
    with pytest.raises(MessageError):
        accept_request(relay.control, relay.id_pub, data, NOW)


def test_expiry_waits_for_an_idle_tunnel() -> None:
    client = Node()
    relay, book = make_relay()
    negotiate(client, relay, book, request_for(client, relay))
    key = client.wireguard.x25519_public()
    after = NOW + SESSION_TTL_MS + 1
    assert book.expire(after, {key: after - 1000}) == []  # expired but in use: kept
    ended = book.expire(after, {key: after - IDLE_GRACE_MS - 1})
    assert [s.wireguard_key for s in ended] == [key]
    assert key not in book.pool.leases


@settings(max_examples=30)
@given(st.text(max_size=32).filter(lambda t: len(t.encode()) <= 32))
def test_every_real_request_passes_the_size_check(want_exit: str) -> None:
    client = Node()
    relay, _ = make_relay()
    wire, _ = open_request(
        client.identity,
        client.control,
        relay.id_pub,
        relay.control.x25519_public(),
        request_for(client, relay, want_exit=want_exit),
    )
    assert request_size_ok(wire)
    assert accept_request(relay.control, relay.id_pub, wire, NOW).request.want_exit == want_exit
    (low, high), _link = REQUEST_SIZES
    assert not request_size_ok(wire + b"\0" * (high + 1 - len(wire)))
    assert not request_size_ok(wire[: low - 1])


def test_a_link_request_passes_the_size_check_too() -> None:
    asker = Node()
    relay, _ = make_relay()
    request = LinkRequest(
        relay=relay.id_pub,
        control_key=asker.control.x25519_public(),
        wireguard_key=asker.wireguard.x25519_public(),
        link_port=51830,
        reply_token=os.urandom(16),
        nonce=os.urandom(16),
        issued_ms=NOW,
    )
    wire, _ = open_request(
        asker.identity, asker.control, relay.id_pub, relay.control.x25519_public(), request
    )
    assert request_size_ok(wire)
    assert isinstance(accept_request(relay.control, relay.id_pub, wire, NOW).request, LinkRequest)
