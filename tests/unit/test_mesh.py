"""The mesh's pure parts: neighbour choice, link negotiation, addresses, nft rules."""

from __future__ import annotations

import ipaddress
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshvpn.handshake import accept_request, open_request
from meshvpn.identity import client_mesh_address, mesh_address_of, mesh_prefix_of
from meshvpn.messages import GRANTED, REFUSED_BAD, LinkGrant, LinkRequest, MessageError
from relay.exit import ExitPolicy, MeshRules, exit_ruleset, mesh_sources_update
from relay.mesh import MESH_RANGE, choose_neighbours, crossed_request_wins
from tests.unit.test_exit_policy import needs_nft, nft_check
from tests.unit.test_negotiation import NOW, Node, make_relay, negotiate, request_for

node_ids = st.text("abcdefghijklmnopqrstuvwxyz234567", min_size=4, max_size=8).map(
    lambda s: "mv" + s
)


@given(
    me=node_ids,
    rtts=st.dictionaries(node_ids, st.floats(0.01, 5000, allow_nan=False), max_size=20),
    k=st.integers(1, 6),
)
def test_the_k_nearest_that_answered(me: str, rtts: dict[str, float], k: int) -> None:
    known = set(rtts) | {me}
    chosen = choose_neighbours(me, known, rtts, k=k)
    assert me not in chosen
    assert len(chosen) == min(k, len(set(rtts) - {me}))
    if chosen:
        worst_chosen = max(rtts[n] for n in chosen)
        assert all(rtts[n] >= worst_chosen for n in set(rtts) - chosen - {me})


def test_a_fixed_list_wins_over_rtt_but_only_announced_relays_count() -> None:
    rtts = {"mva": 1.0, "mvb": 2.0, "mvc": 3.0}
    fixed = frozenset({"mvc", "mvgone"})
    assert choose_neighbours("mvme", {"mva", "mvb", "mvc"}, rtts, k=1, fixed=fixed) == {"mvc"}
    assert choose_neighbours("mvme", {"mva"}, {}, k=3) == frozenset()  # nobody answered


@given(a=node_ids, b=node_ids)
def test_exactly_one_of_two_crossed_requests_wins(a: str, b: str) -> None:
    if a != b:
        assert crossed_request_wins(a, b) != crossed_request_wins(b, a)


def _link_request(asker: Node, asked: Node, port: int = 51830) -> LinkRequest:
    return LinkRequest(
        relay=asked.id_pub,
        control_key=asker.control.x25519_public(),
        wireguard_key=asker.wireguard.x25519_public(),
        link_port=port,
        reply_token=os.urandom(16),
        nonce=os.urandom(16),
        issued_ms=NOW,
    )


def test_link_negotiation_round_trip() -> None:
    a, b = Node(), Node()
    wire, pending = open_request(
        a.identity, a.control, b.id_pub, b.control.x25519_public(), _link_request(a, b)
    )
    received = accept_request(b.control, b.id_pub, wire, NOW)
    assert isinstance(received.request, LinkRequest)
    assert received.client_identity == a.id_pub
    assert received.request.link_port == 51830
    grant = LinkGrant(received.request.nonce, GRANTED, "", b.wireguard.x25519_public(), 51831)
    answer = received.answer(grant, b.identity)
    assert pending.read_link_grant(answer) == grant


def test_a_link_answer_never_passes_for_a_session_grant_or_the_reverse() -> None:
    a, b = Node(), Node()
    wire, pending = open_request(
        a.identity, a.control, b.id_pub, b.control.x25519_public(), _link_request(a, b)
    )
    received = accept_request(b.control, b.id_pub, wire, NOW)
    refusal = LinkGrant(received.request.nonce, REFUSED_BAD, "no", b.wireguard.x25519_public(), 0)
    answer = received.answer(refusal, b.identity)
    with pytest.raises(MessageError):
        pending.read_grant(answer)
    # and a session request is still answered with a session grant only
    client = Node()
    relay, book = make_relay()
    grant = negotiate(client, relay, book, request_for(client, relay))
    assert grant is not None
    assert grant.granted


def test_client_mesh_addresses_sit_in_the_relays_prefix() -> None:
    relay = mesh_address_of(Node().id_pub)
    prefix = mesh_prefix_of(relay)
    assert prefix.prefixlen == 64
    assert relay in prefix
    assert prefix.subnet_of(MESH_RANGE)
    one = client_mesh_address(relay, ipaddress.IPv4Address("100.64.0.2"))
    two = client_mesh_address(relay, ipaddress.IPv4Address("100.64.0.3"))
    assert one in prefix
    assert two in prefix
    assert len({one, two, relay}) == 3


def _mesh_rules() -> MeshRules:
    address = mesh_address_of(Node().id_pub)
    return MeshRules(
        link_prefix="mv0m",
        address=address,
        client_prefix=mesh_prefix_of(address),
        mesh_range=MESH_RANGE,
        sources=frozenset({mesh_prefix_of(address), ipaddress.IPv6Network(f"{address}/128")}),
    )


def _mesh_table(rules: MeshRules) -> str:
    return exit_ruleset(
        "mv0",
        ipaddress.IPv4Network("100.64.0.0/24"),
        ExitPolicy(),
        lan_networks=(),
        router_addresses=(),
        mesh=rules,
    )


def test_mesh_rules_drop_unknown_sources_and_carry_only_udp_for_clients() -> None:
    rules = _mesh_rules()
    text = _mesh_table(rules)
    assert 'iifname "mv0m*" ip6 saddr != @mesh_sources counter name mesh_spoofed drop' in text
    forward = text[text.index("chain forward") :]
    # the mesh rules come before the client rules that drop all IPv6
    assert forward.index("mesh transit") < forward.index("IPv6 source: the pool is IPv4")
    assert "ciphertext only" in forward
    assert f"ip6 daddr {rules.mesh_range}" in forward


@needs_nft
def test_nft_accepts_the_mesh_ruleset_and_its_source_updates() -> None:
    rules = _mesh_rules()
    table = _mesh_table(rules)
    nft_check(table)
    # the set update applies on top of the table, overlapping prefixes included
    nft_check(table + mesh_sources_update([*rules.sources, ipaddress.IPv6Network("fd00::/64")]))
