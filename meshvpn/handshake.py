"""Session negotiation sealed with Noise IK, carried over any byte transport.

The client knows the relay's control key from its announcement, so IK fits:
one message each way. Message 1 (client to relay) carries the client's
signed ``SessionRequest``; message 2 (relay to client) the relay's signed
``SessionGrant``. The broker that carries them sees only Noise ciphertext:
not the client's identity, WireGuard key, nor the address it is given.

Noise authenticates the control keys; the Ed25519 signatures inside bind
those to the node identities (a request names the control key it was sent
under and the relay it is meant for, a grant names the request's nonce), so
neither can be lifted into another conversation.

Pure: no I/O and no clock; ``now_ms`` comes in. (Noise draws its ephemeral
keys from the OS, which is the one input we do not pass in.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from noise.connection import Keypair, NoiseConnection
from noise.exceptions import (
    NoiseHandshakeError,
    NoiseInvalidMessage,
    NoiseValidationError,
    NoiseValueError,
)

from meshvpn.identity import PrivateKey, PublicKey
from meshvpn.messages import (
    CLOCK_SKEW_MS,
    HEADER,
    KEY_LEN,
    SIG_LEN,
    Fixed,
    Key,
    LinkGrant,
    LinkRequest,
    MessageError,
    SessionGrant,
    SessionRequest,
    Text,
    UInt,
    sign,
    verify,
)

NOISE_NAME: Final = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
PROLOGUE: Final = b"meshvpn/v1/session"
MAX_HANDSHAKE: Final = 4096
REQUEST_TTL_MS: Final = CLOCK_SKEW_MS
# IK message 1: ephemeral 32, encrypted static 32+16, then the sealed payload (+16).
_IK1_OVERHEAD: Final = 32 + 32 + 16 + 16
_SIGNED_OVERHEAD: Final = HEADER.size + KEY_LEN + SIG_LEN


def _body_bounds(cls: type[SessionRequest | LinkRequest]) -> tuple[int, int]:
    """Shortest and longest body the schema allows (requests hold fixed fields and text)."""
    low = high = 0
    for spec in cls.FIELDS.values():
        if isinstance(spec, Text):
            low, high = low + 1, high + 1 + spec.max_len
        elif isinstance(spec, UInt):
            low, high = low + spec.bits // 8, high + spec.bits // 8
        elif isinstance(spec, Fixed):
            low, high = low + spec.length, high + spec.length
        elif isinstance(spec, Key):
            low, high = low + KEY_LEN, high + KEY_LEN
        else:
            raise TypeError(f"{cls.__name__}: no size bound for {spec!r}")
    return low, high


REQUEST_SIZES: Final = tuple(
    (_IK1_OVERHEAD + _SIGNED_OVERHEAD + low, _IK1_OVERHEAD + _SIGNED_OVERHEAD + high)
    for low, high in map(_body_bounds, (SessionRequest, LinkRequest))
)


def request_size_ok(wire: bytes) -> bool:
    """Whether ``wire`` is the size of a request (session or link): a check that
    costs nothing, before the one that costs two X25519 operations."""
    return any(low <= len(wire) <= high for low, high in REQUEST_SIZES)


# What the noise library raises on hostile bytes (it is not consistent about it).
_NOISE_ERRORS: Final = (
    NoiseHandshakeError,
    NoiseInvalidMessage,
    NoiseValidationError,
    NoiseValueError,
    InvalidTag,
    ValueError,
    IndexError,
    TypeError,
    AttributeError,
)


def _noise(initiator: bool, static: PrivateKey) -> NoiseConnection:
    conn = NoiseConnection.from_name(NOISE_NAME)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_prologue(PROLOGUE)
    conn.set_keypair_from_private_bytes(Keypair.STATIC, static.raw)
    return conn


Request = SessionRequest | LinkRequest
_GRANT_FOR: Final[dict[type[Request], type[SessionGrant | LinkGrant]]] = {
    SessionRequest: SessionGrant,
    LinkRequest: LinkGrant,
}


@dataclass
class PendingRequest:
    """The initiator's half-open handshake, waiting for the answer."""

    conn: NoiseConnection
    request: Request
    relay_identity: PublicKey

    def _read(self, wire: bytes) -> SessionGrant | LinkGrant:
        if len(wire) > MAX_HANDSHAKE:
            raise MessageError("oversized")
        try:
            payload = bytes(self.conn.read_message(wire))
        except _NOISE_ERRORS as exc:
            raise MessageError("bad-handshake", type(exc).__name__) from None
        signed = verify(payload, _GRANT_FOR[type(self.request)])
        grant = signed.message
        assert isinstance(grant, SessionGrant | LinkGrant)  # noqa: S101 - verify() checked
        if signed.signer != self.relay_identity:
            raise MessageError("wrong-signer")
        if grant.request_nonce != self.request.nonce:
            raise MessageError("wrong-request")
        return grant

    def read_grant(self, wire: bytes) -> SessionGrant:
        grant = self._read(wire)
        if not isinstance(grant, SessionGrant):
            raise MessageError("wrong-type")
        return grant

    def read_link_grant(self, wire: bytes) -> LinkGrant:
        grant = self._read(wire)
        if not isinstance(grant, LinkGrant):
            raise MessageError("wrong-type")
        return grant


def open_request(
    identity_key: PrivateKey,
    control_key: PrivateKey,
    relay_identity: PublicKey,
    relay_control: PublicKey,
    request: Request,
) -> tuple[bytes, PendingRequest]:
    """Initiator side: seal a request for one relay; returns message 1."""
    conn = _noise(initiator=True, static=control_key)
    conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, relay_control.raw)
    conn.start_handshake()
    wire = bytes(conn.write_message(sign(request, identity_key)))
    return wire, PendingRequest(conn, request, relay_identity)


@dataclass
class ReceivedRequest:
    """The relay's view of a verified request, ready to be answered once."""

    conn: NoiseConnection
    request: Request
    client_identity: PublicKey  # the initiator: a client, or a relay asking for a link
    ephemeral: bytes  # the initiator's Noise ephemeral: a replay repeats it

    def answer(self, grant: SessionGrant | LinkGrant, identity_key: PrivateKey) -> bytes:
        if not isinstance(grant, _GRANT_FOR[type(self.request)]):
            raise TypeError("the answer does not fit the request")
        return bytes(self.conn.write_message(sign(grant, identity_key)))


def accept_request(
    control_key: PrivateKey, relay_identity: PublicKey, wire: bytes, now_ms: int
) -> ReceivedRequest:
    """Relay side: open message 1 and check everything that can be checked alone."""
    if len(wire) > MAX_HANDSHAKE:
        raise MessageError("oversized")
    if not request_size_ok(wire):
        raise MessageError("malformed", "not the size of a request")
    conn = _noise(initiator=False, static=control_key)
    conn.start_handshake()
    try:
        payload = bytes(conn.read_message(wire))
        remote_static = bytes(conn.noise_protocol.handshake_state.rs.public_bytes)
    except _NOISE_ERRORS as exc:
        raise MessageError("bad-handshake", type(exc).__name__) from None
    signed = verify(payload)
    request = signed.message
    if not isinstance(request, SessionRequest | LinkRequest):
        raise MessageError("wrong-type")
    if request.control_key.raw != remote_static:
        raise MessageError("key-mismatch", "request not signed for this Noise key")
    if request.relay != relay_identity:
        raise MessageError("wrong-relay")
    if abs(now_ms - request.issued_ms) > REQUEST_TTL_MS:
        raise MessageError("expired")
    return ReceivedRequest(conn, request, signed.signer, wire[:32])
