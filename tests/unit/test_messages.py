"""The control-message codec: canonical, signed, domain-separated, strict."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshvpn.identity import PrivateKey, PublicKey, mesh_address_of
from meshvpn.messages import (
    HEADER,
    MAX_MESSAGE,
    MESSAGE_TYPES,
    Announcement,
    LinkGrant,
    LinkRequest,
    MessageError,
    SessionGrant,
    SessionRequest,
    sign,
    verify,
    verify_announcement,
)
from tests.unit.strategies import messages

VECTORS = Path(__file__).parent.parent / "vectors" / "messages.json"
SIGNER = PrivateKey(
    bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
)
any_message = st.sampled_from(sorted(MESSAGE_TYPES.values(), key=lambda c: c.TYPE)).flatmap(
    messages
)


def vector_messages() -> dict[str, object]:
    """The messages behind tests/vectors/messages.json, built field by field."""
    k = [PublicKey(bytes([i]) * 32) for i in range(1, 5)]
    return {
        "announce": Announcement(
            wireguard_key=k[0],
            control_key=k[1],
            endpoints=(
                (ipaddress.ip_address("198.51.100.2"), 51820),
                (ipaddress.ip_address("fd00::2"), 51820),
            ),
            probe_port=51821,
            mesh_address=mesh_address_of(SIGNER.ed25519_public()).packed,
            roles=3,
            geohash="u33dc0",
            price_per_gib=1_000_000,
            capacity=100,
            load=7,
            version="0.1.0",
            issued_ms=1_795_000_000_000,
            expires_ms=1_795_000_060_000,
        ),
        "session-request": SessionRequest(
            relay=k[2],
            control_key=k[1],
            wireguard_key=k[0],
            want_exit="",
            max_price_per_gib=2_000_000,
            reply_token=bytes(range(16)),
            nonce=bytes(range(16, 32)),
            issued_ms=1_795_000_000_123,
        ),
        "session-grant": SessionGrant(
            request_nonce=bytes(range(16, 32)),
            status=0,
            reason="",
            session_id=bytes(range(32, 48)),
            tunnel_address=bytes([100, 64, 0, 2]),
            tunnel_prefix=32,
            relay_wireguard_key=k[3],
            price_per_gib=1_000_000,
            receipt_interval_s=10,
            receipt_interval_bytes=8 << 20,
            expires_ms=1_795_000_600_000,
        ),
        "link-request": LinkRequest(
            relay=k[2],
            control_key=k[1],
            wireguard_key=k[0],
            link_port=51830,
            reply_token=bytes(range(48, 64)),
            nonce=bytes(range(64, 80)),
            issued_ms=1_795_000_000_456,
        ),
        "link-grant": LinkGrant(
            request_nonce=bytes(range(64, 80)),
            status=0,
            reason="",
            wireguard_key=k[3],
            link_port=51831,
        ),
    }


def test_fixed_vectors() -> None:
    vectors = json.loads(VECTORS.read_text())
    built = vector_messages()
    assert sorted(vectors["messages"]) == sorted(built)
    assert SIGNER.ed25519_public().hex == vectors["signer_public"]
    for name, message in built.items():
        wire = sign(message, SIGNER)  # type: ignore[arg-type]
        assert wire.hex() == vectors["messages"][name], f"{name} no longer encodes to its vector"
        signed = verify(bytes.fromhex(vectors["messages"][name]))
        assert signed.message == message
        assert signed.signer == SIGNER.ed25519_public()


@given(any_message)
def test_round_trip_and_canonical(message: Announcement) -> None:
    wire = sign(message, SIGNER)
    signed = verify(wire)
    assert signed.message == message
    assert sign(signed.message, SIGNER) == wire  # one message, one encoding
    body = message.encode_body()
    assert type(message).decode_body(body).encode_body() == body


@settings(max_examples=300)
@given(any_message, st.data())
def test_any_flipped_bit_fails(message: Announcement, data: st.DataObject) -> None:
    wire = bytearray(sign(message, SIGNER))
    bit = data.draw(st.integers(0, len(wire) * 8 - 1))
    wire[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(MessageError):
        verify(bytes(wire))


@given(any_message, st.data())
def test_changed_field_fails_under_old_signature(
    message: Announcement, data: st.DataObject
) -> None:
    wire = sign(message, SIGNER)
    other = data.draw(messages(type(message)))
    if other == message:
        return
    forged_head = sign(other, SIGNER)[:-64]
    with pytest.raises(MessageError):
        verify(forged_head + wire[-64:])


def test_signature_is_bound_to_message_type() -> None:
    """Same body bytes under another type label must not verify (domain separation)."""
    grant = vector_messages()["session-grant"]
    wire = bytearray(sign(grant, SIGNER))  # type: ignore[arg-type]
    wire[3] = SessionRequest.TYPE
    with pytest.raises(MessageError):
        verify(bytes(wire))
    with pytest.raises(MessageError, match="wrong-type"):
        verify(sign(grant, SIGNER), Announcement)  # type: ignore[arg-type]


@given(st.binary(max_size=600))
def test_random_bytes_only_ever_raise_message_error(data: bytes) -> None:
    with pytest.raises(MessageError):
        verify(data)


@given(any_message, st.integers(1, 200))
def test_truncated_and_extended_fail(message: Announcement, cut: int) -> None:
    wire = sign(message, SIGNER)
    with pytest.raises(MessageError):
        verify(wire[: max(0, len(wire) - cut)])
    with pytest.raises(MessageError):
        verify(wire + b"\0" * cut)


def test_oversized_is_rejected_before_parsing() -> None:
    with pytest.raises(MessageError, match="oversized"):
        verify(b"MV" + b"\0" * MAX_MESSAGE)


def test_announcement_checks() -> None:
    ann = vector_messages()["announce"]
    assert isinstance(ann, Announcement)
    wire = sign(ann, SIGNER)
    verify_announcement(wire, ann.issued_ms)
    with pytest.raises(MessageError, match="expired"):
        verify_announcement(wire, ann.expires_ms)
    with pytest.raises(MessageError, match="from-the-future"):
        verify_announcement(wire, ann.issued_ms - 10 * 60_000)
    other = PrivateKey(bytes(32))
    with pytest.raises(MessageError, match="mesh address"):
        verify_announcement(sign(ann, other), ann.issued_ms)


def test_schema_violations_are_malformed() -> None:
    ann = vector_messages()["announce"]
    bad_roles = dataclasses.replace(ann, roles=1)  # type: ignore[type-var]
    body = bytearray(bad_roles.encode_body())
    roles_at = 32 + 32 + 1 + (1 + 4 + 2) + (1 + 16 + 2) + 2 + 16
    body[roles_at] = 0x80
    head = (
        HEADER.pack(b"MV", 1, Announcement.TYPE, len(body))
        + bytes(body)
        + SIGNER.ed25519_public().raw
    )
    wire = head + SIGNER.ed25519_sign(b"meshvpn/v1/announce\x00" + head)
    with pytest.raises(MessageError, match="malformed"):
        verify(wire)
