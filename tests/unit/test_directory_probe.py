"""Directory of announcements, nearest-relay choice, and authenticated probes."""

from __future__ import annotations

import dataclasses
import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from meshvpn.directory import Directory, announce_topic, choose
from meshvpn.identity import PrivateKey, mesh_address_of, new_ed25519, new_x25519, node_id_of
from meshvpn.messages import ROLE_ENTRY, ROLE_EXIT, Announcement, sign
from meshvpn.probe import (
    BURST_PER_SOURCE,
    REQUEST_LEN,
    ProbeResponder,
    check_reply,
    make_request,
)

NOW = 1_795_000_000_000


def announce(key: PrivateKey, **changes: object) -> Announcement:
    base = Announcement(
        wireguard_key=new_x25519().x25519_public(),
        control_key=new_x25519().x25519_public(),
        endpoints=((ipaddress.ip_address("198.51.100.2"), 51820),),
        probe_port=51821,
        mesh_address=mesh_address_of(key.ed25519_public()).packed,
        roles=ROLE_ENTRY | ROLE_EXIT,
        geohash="u33d",
        price_per_gib=1000,
        capacity=10,
        load=0,
        version="0.1.0",
        issued_ms=NOW,
        expires_ms=NOW + 60_000,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def topic_of(key: PrivateKey) -> str:
    return announce_topic(node_id_of(key.ed25519_public()))


def test_directory_keeps_newest_and_counts_the_rest() -> None:
    d = Directory()
    key = new_ed25519()
    first = sign(announce(key), key)
    assert d.offer(topic_of(key), first, NOW) is None
    assert d.offer(topic_of(key), first, NOW) is None  # the same retained message again
    newer = sign(announce(key, issued_ms=NOW + 1, expires_ms=NOW + 60_001), key)
    assert d.offer(topic_of(key), newer, NOW) is None
    assert d.offer(topic_of(key), first, NOW) == "stale"
    other = new_ed25519()
    assert d.offer(topic_of(other), newer, NOW) == "wrong-topic"  # someone else's topic
    assert d.offer("meshvpn/v1/announce/a/b", newer, NOW) == "wrong-topic"
    assert d.offer(topic_of(key), b"garbage", NOW) == "malformed"
    assert d.offer(topic_of(key), first, NOW + 61_000) == "expired"
    assert d.rejected == {"stale": 1, "wrong-topic": 2, "malformed": 1, "expired": 1}
    assert list(d.entries) == [node_id_of(key.ed25519_public())]
    assert d.offer(topic_of(key), b"", NOW) is None  # last will: cleared
    assert not d.entries


@given(st.binary(max_size=300), st.text(max_size=80))
def test_directory_never_raises(payload: bytes, suffix: str) -> None:
    d = Directory()
    d.offer("meshvpn/v1/announce/" + suffix, payload, NOW)
    assert len(d.entries) <= 1


def test_candidates_filter_and_order() -> None:
    d = Directory()
    keys = {name: new_ed25519() for name in ("near", "far", "pricey", "full", "entryonly")}
    anns = {
        "near": announce(keys["near"], geohash="u33dc"),
        "far": announce(keys["far"], geohash="9q8y"),
        "pricey": announce(keys["pricey"], geohash="u33dc", price_per_gib=5000),
        "full": announce(keys["full"], geohash="u33dc", load=10),
        "entryonly": announce(keys["entryonly"], geohash="u33dc", roles=ROLE_ENTRY),
    }
    for name, ann in anns.items():
        assert d.offer(topic_of(keys[name]), sign(ann, keys[name]), NOW) is None
    ids = {name: node_id_of(k.ed25519_public()) for name, k in keys.items()}
    got = [e.node_id for e in d.candidates(NOW, near="u33d")]
    # a full relay comes last, but still comes: its refusal tells the client why
    assert got == [ids["near"], ids["pricey"], ids["far"], ids["full"]]
    assert [e.node_id for e in d.candidates(NOW, near="u33d", max_price=1000)] == [
        ids["near"],
        ids["far"],
        ids["full"],
    ]
    assert [e.node_id for e in d.candidates(NOW, exit_region="9q")] == [ids["far"]]


def test_choose_lowest_rtt_then_price() -> None:
    d = Directory()
    keys = [new_ed25519() for _ in range(3)]
    prices = [3000, 1000, 2000]
    for k, p in zip(keys, prices, strict=True):
        d.offer(topic_of(k), sign(announce(k, price_per_gib=p), k), NOW)
    cands = d.candidates(NOW)
    ids = [node_id_of(k.ed25519_public()) for k in keys]
    ranked = choose(cands, {ids[0]: 5.0, ids[1]: 40.0, ids[2]: 5.5})
    # 5.0 and 5.5 ms tie (same 2 ms bucket); the cheaper of those two wins
    assert [e.node_id for e in ranked] == [ids[2], ids[0], ids[1]]
    assert choose(cands, {}) == []


def test_probe_round_trip_and_no_amplification() -> None:
    control = new_x25519()
    responder = ProbeResponder(control)
    wire, sent = make_request(control.x25519_public(), NOW)
    reply = responder.handle(wire, "192.0.2.2", NOW + 3)
    assert reply is not None
    assert len(reply) * 3 < len(wire) == REQUEST_LEN
    assert check_reply(sent, reply)
    assert not check_reply(sent, reply[:-1] + bytes([reply[-1] ^ 1]))


def test_probe_refuses_replays_forgeries_stale_and_floods() -> None:
    control = new_x25519()
    responder = ProbeResponder(control)
    wire, _ = make_request(control.x25519_public(), NOW)
    assert responder.handle(wire, "192.0.2.2", NOW) is not None
    assert responder.handle(wire, "192.0.2.2", NOW) is None  # replay
    forged, _ = make_request(new_x25519().x25519_public(), NOW)  # made for another key
    assert responder.handle(forged, "192.0.2.2", NOW) is None
    stale, _ = make_request(control.x25519_public(), NOW - 60_000)
    assert responder.handle(stale, "192.0.2.2", NOW) is None
    answered = sum(
        responder.handle(make_request(control.x25519_public(), NOW)[0], "198.51.100.9", NOW)
        is not None
        for _ in range(int(BURST_PER_SOURCE) + 20)
    )
    assert answered == BURST_PER_SOURCE
    assert responder.dropped == {"replayed": 1, "bad-mac": 1, "stale": 1, "rate-limited": 20}
    # another source prefix is not held back by the flood
    assert responder.handle(make_request(control.x25519_public(), NOW)[0], "203.0.113.7", NOW)


@given(st.binary(max_size=200))
def test_probe_responder_never_raises(data: bytes) -> None:
    responder = ProbeResponder(new_x25519())
    assert responder.handle(data, "192.0.2.1", NOW) is None


@given(st.binary(min_size=REQUEST_LEN - 4, max_size=REQUEST_LEN - 4))
def test_probe_responder_never_raises_on_well_framed_garbage(rest: bytes) -> None:
    responder = ProbeResponder(new_x25519())
    assert responder.handle(b"MVP1" + rest, "192.0.2.1", NOW) is None
