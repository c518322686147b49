"""Control messages: one canonical binary codec, signed with domain separation.

Theory of operation
-------------------
Every control message is a frozen dataclass with a fixed schema (``FIELDS``).
Encoding writes the fields in schema order, each in exactly one possible
byte form: fixed-width big-endian integers, fixed-length keys, length-prefixed
UTF-8 and lists with declared maxima, IP endpoints as family|address|port.
There are no optional fields, maps or floats, so there is no second way to
write the same message: the same message always yields the same bytes, and
decoding then re-encoding is the identity (the property tests check both).

A signed message on the wire::

    b"MV" | version:u8 | type:u8 | body_len:u16 | body | signer:32 | signature:64

The signature is Ed25519 by ``signer`` (a node's identity key) over
``b"meshvpn/v1/<label>\\x00"`` followed by every byte before the signature.
The label differs per message type, so a signature made for one kind of
message can never be replayed as another.

We wrote this codec instead of using CBOR/protobuf because "canonical" is the
whole point: a strict fixed schema makes canonical form a property of the
code rather than of an encoder option, and keeps the parser small enough to
fuzz exhaustively. Decoding never raises anything but ``MessageError``.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final, Self

from cryptography.exceptions import InvalidSignature

from meshvpn.errors import RemoteError
from meshvpn.identity import PrivateKey, PublicKey, mesh_address_of, node_id_of

MAGIC: Final = b"MV"
VERSION: Final = 1
HEADER: Final = struct.Struct("!2sBBH")
SIG_LEN: Final = 64
KEY_LEN: Final = 32
MAX_MESSAGE: Final = 4096


class MessageError(RemoteError):
    """A peer sent bytes that are not a valid message. ``reason`` is a short tag."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---- field types ---------------------------------------------------------------


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise MessageError("malformed", "truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def done(self) -> None:
        if self.pos != len(self.data):
            raise MessageError("malformed", "trailing bytes")


class Field:
    def encode(self, value: Any) -> bytes:  # noqa: ANN401 - each subclass checks its own type
        raise NotImplementedError

    def decode(self, r: Reader) -> Any:  # noqa: ANN401
        raise NotImplementedError


@dataclass(frozen=True)
class UInt(Field):
    bits: int

    def encode(self, value: Any) -> bytes:  # noqa: ANN401
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"not an int: {value!r}")
        if not 0 <= value < 1 << self.bits:
            raise ValueError(f"not a u{self.bits}: {value!r}")
        return value.to_bytes(self.bits // 8, "big")

    def decode(self, r: Reader) -> int:
        return int.from_bytes(r.take(self.bits // 8), "big")


class Bool(Field):
    def encode(self, value: Any) -> bytes:  # noqa: ANN401
        if not isinstance(value, bool):
            raise TypeError(f"not a bool: {value!r}")
        return b"\x01" if value else b"\x00"

    def decode(self, r: Reader) -> bool:
        b = r.take(1)
        if b not in (b"\x00", b"\x01"):
            raise MessageError("malformed", "bool is neither 0 nor 1")
        return b == b"\x01"


@dataclass(frozen=True)
class Fixed(Field):
    length: int

    def encode(self, value: Any) -> bytes:  # noqa: ANN401
        if not isinstance(value, bytes) or len(value) != self.length:
            raise ValueError(f"need {self.length} bytes")
        return value

    def decode(self, r: Reader) -> bytes:
        return r.take(self.length)


class Key(Field):
    def encode(self, value: Any) -> bytes:  # noqa: ANN401
        if not isinstance(value, PublicKey):
            raise TypeError(f"not a PublicKey: {value!r}")
        return value.raw

    def decode(self, r: Reader) -> PublicKey:
        return PublicKey(r.take(KEY_LEN))


@dataclass(frozen=True)
class Text(Field):
    max_len: int
    alphabet: str | None = None

    def encode(self, value: Any) -> bytes:  # noqa: ANN401
        if not isinstance(value, str):
            raise TypeError(f"not a str: {value!r}")
        raw = value.encode()
        self._check(value, len(raw))
        return bytes([len(raw)]) + raw

    def _check(self, value: str, n: int) -> None:
        if n > self.max_len:
            raise ValueError(f"text longer than {self.max_len}")
        if self.alphabet is not None and any(c not in self.alphabet for c in value):
            raise ValueError("text outside its alphabet")

    def decode(self, r: Reader) -> str:
        n = r.take(1)[0]
        try:
            value = r.take(n).decode()
            self._check(value, n)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError too
            raise MessageError("malformed", str(exc)[:80]) from None
        return value


class Endpoint(Field):
    """(address, port): family 4|6, then 4 or 16 address bytes, then u16 port."""

    def encode(self, value: Any) -> bytes:  # noqa: ANN401
        addr, port = value
        if not isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise TypeError(f"not an IP address: {addr!r}")
        return bytes([addr.version]) + addr.packed + UInt(16).encode(port)

    def decode(self, r: Reader) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
        family = r.take(1)[0]
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address
        if family == 4:
            addr = ipaddress.IPv4Address(r.take(4))
        elif family == 6:
            addr = ipaddress.IPv6Address(r.take(16))
        else:
            raise MessageError("malformed", "unknown address family")
        port = UInt(16).decode(r)
        if port == 0:
            raise MessageError("malformed", "port 0")
        return addr, port


@dataclass(frozen=True)
class ListOf(Field):
    item: Field
    max_items: int

    def encode(self, value: Any) -> bytes:  # noqa: ANN401
        if not isinstance(value, tuple) or len(value) > self.max_items:
            raise ValueError(f"need a tuple of at most {self.max_items}")
        return bytes([len(value)]) + b"".join(self.item.encode(v) for v in value)

    def decode(self, r: Reader) -> tuple[Any, ...]:
        n = r.take(1)[0]
        if n > self.max_items:
            raise MessageError("malformed", f"more than {self.max_items} items")
        return tuple(self.item.decode(r) for _ in range(n))


U8, U16, U32, U64 = UInt(8), UInt(16), UInt(32), UInt(64)
KEY = Key()
NONCE = Fixed(16)
BOOL = Bool()
GEOHASH_ALPHABET: Final = "0123456789bcdefghjkmnpqrstuvwxyz"


# ---- messages ------------------------------------------------------------------


class Message:
    """Base of every message: schema-driven body codec."""

    TYPE: ClassVar[int]
    LABEL: ClassVar[str]
    FIELDS: ClassVar[dict[str, Field]]

    def encode_body(self) -> bytes:
        return b"".join(spec.encode(getattr(self, name)) for name, spec in self.FIELDS.items())

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        r = Reader(body)
        values = {name: spec.decode(r) for name, spec in cls.FIELDS.items()}
        r.done()
        try:
            return cls(**values)
        except ValueError as exc:
            raise MessageError("malformed", str(exc)) from None

    def validate(self) -> None:
        """Checks beyond the schema; raise ValueError."""


def _check_schema(cls: type[Message]) -> None:
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    if names != list(cls.FIELDS):
        raise TypeError(f"{cls.__name__}: FIELDS must list the dataclass fields in order")


ROLE_ENTRY: Final = 1
ROLE_EXIT: Final = 2
ROLE_MESH: Final = 4  # links with other relays: an entry for multi-hop, or an exit behind one
KNOWN_ROLES: Final = ROLE_ENTRY | ROLE_EXIT | ROLE_MESH


@dataclass(frozen=True)
class Announcement(Message):
    """A relay says who it is and how to reach it. Retained on its own topic."""

    TYPE: ClassVar[int] = 1
    LABEL: ClassVar[str] = "announce"
    FIELDS: ClassVar[dict[str, Field]] = {
        "wireguard_key": KEY,
        "control_key": KEY,
        "endpoints": ListOf(Endpoint(), 4),
        "probe_port": U16,
        "mesh_address": Fixed(16),
        "roles": U8,
        "geohash": Text(12, GEOHASH_ALPHABET),
        "price_per_gib": U64,
        "capacity": U32,
        "load": U32,
        "version": Text(32),
        "issued_ms": U64,
        "expires_ms": U64,
    }

    wireguard_key: PublicKey
    control_key: PublicKey
    endpoints: tuple[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], ...]
    probe_port: int
    mesh_address: bytes
    roles: int
    geohash: str
    price_per_gib: int
    capacity: int  # sessions it takes now; 0 while its owner's controls stop sharing ("full")
    load: int
    version: str
    issued_ms: int
    expires_ms: int

    def __post_init__(self) -> None:
        if self.roles & ~KNOWN_ROLES:
            raise ValueError("unknown role bits")
        if self.expires_ms <= self.issued_ms:
            raise ValueError("expires before it is issued")
        if not self.endpoints:
            raise ValueError("no endpoint")

    @property
    def is_exit(self) -> bool:
        return bool(self.roles & ROLE_EXIT)


@dataclass(frozen=True)
class SessionRequest(Message):
    """Client to relay, inside Noise IK message 1: "let my WireGuard key in"."""

    TYPE: ClassVar[int] = 2
    LABEL: ClassVar[str] = "session-request"
    FIELDS: ClassVar[dict[str, Field]] = {
        "relay": KEY,
        "control_key": KEY,
        "wireguard_key": KEY,
        "want_exit": Text(32),
        "max_price_per_gib": U64,
        "reply_token": NONCE,
        "nonce": NONCE,
        "issued_ms": U64,
    }

    relay: PublicKey  # the relay's identity key: a request for one relay is void at another
    control_key: PublicKey  # must equal the Noise static key it arrived under
    wireguard_key: PublicKey
    want_exit: str  # node id of the wanted exit; "" means this relay
    max_price_per_gib: int
    reply_token: bytes  # names the topic the grant goes to
    nonce: bytes
    issued_ms: int


GRANTED: Final = 0
REFUSED_FULL: Final = 1
REFUSED_PRICE: Final = 2
REFUSED_POLICY: Final = 3
REFUSED_RATE: Final = 4
REFUSED_BAD: Final = 5
STATUS_NAMES: Final = {
    GRANTED: "granted",
    REFUSED_FULL: "full",
    REFUSED_PRICE: "price",
    REFUSED_POLICY: "policy",
    REFUSED_RATE: "rate-limited",
    REFUSED_BAD: "bad-request",
}


@dataclass(frozen=True)
class SessionGrant(Message):
    """Relay to client, inside Noise IK message 2: the answer to one request."""

    TYPE: ClassVar[int] = 3
    LABEL: ClassVar[str] = "session-grant"
    FIELDS: ClassVar[dict[str, Field]] = {
        "request_nonce": NONCE,
        "status": U8,
        "reason": Text(200),
        "session_id": NONCE,
        "tunnel_address": Fixed(4),
        "tunnel_prefix": U8,
        "relay_wireguard_key": KEY,
        "price_per_gib": U64,
        "receipt_interval_s": U32,
        "receipt_interval_bytes": U64,
        "expires_ms": U64,
    }

    request_nonce: bytes
    status: int
    reason: str
    session_id: bytes
    tunnel_address: bytes
    tunnel_prefix: int
    relay_wireguard_key: PublicKey
    price_per_gib: int
    receipt_interval_s: int
    receipt_interval_bytes: int
    expires_ms: int

    def __post_init__(self) -> None:
        if self.status not in STATUS_NAMES:
            raise ValueError("unknown status")
        if self.tunnel_prefix > 32:
            raise ValueError("prefix over 32")

    @property
    def granted(self) -> bool:
        return self.status == GRANTED

    @property
    def address(self) -> ipaddress.IPv4Interface:
        return ipaddress.IPv4Interface(
            f"{ipaddress.IPv4Address(self.tunnel_address)}/{self.tunnel_prefix}"
        )


@dataclass(frozen=True)
class LinkRequest(Message):
    """Relay to relay, inside Noise IK message 1: "be my mesh neighbour".

    Each side runs one WireGuard interface per neighbour, so each names the
    UDP port it listens on for this one link; the endpoint host is the one in
    its announcement."""

    TYPE: ClassVar[int] = 10
    LABEL: ClassVar[str] = "link-request"
    FIELDS: ClassVar[dict[str, Field]] = {
        "relay": KEY,
        "control_key": KEY,
        "wireguard_key": KEY,
        "link_port": U16,
        "reply_token": NONCE,
        "nonce": NONCE,
        "issued_ms": U64,
    }

    relay: PublicKey  # the wanted neighbour's identity key
    control_key: PublicKey  # must equal the Noise static key it arrived under
    wireguard_key: PublicKey
    link_port: int
    reply_token: bytes
    nonce: bytes
    issued_ms: int


@dataclass(frozen=True)
class LinkGrant(Message):
    """The neighbour's answer to one ``LinkRequest``."""

    TYPE: ClassVar[int] = 11
    LABEL: ClassVar[str] = "link-grant"
    FIELDS: ClassVar[dict[str, Field]] = {
        "request_nonce": NONCE,
        "status": U8,
        "reason": Text(200),
        "wireguard_key": KEY,
        "link_port": U16,
    }

    request_nonce: bytes
    status: int
    reason: str
    wireguard_key: PublicKey
    link_port: int

    def __post_init__(self) -> None:
        if self.status not in STATUS_NAMES:
            raise ValueError("unknown status")

    @property
    def granted(self) -> bool:
        return self.status == GRANTED


MESSAGE_TYPES: Final[dict[int, type[Message]]] = {}


def register(cls: type[Message]) -> type[Message]:
    """Make a message type known to ``verify``; types are numbered once, forever."""
    _check_schema(cls)
    if MESSAGE_TYPES.setdefault(cls.TYPE, cls) is not cls:
        raise TypeError(f"message type {cls.TYPE} is taken by {MESSAGE_TYPES[cls.TYPE].__name__}")
    return cls


for _cls in (Announcement, SessionRequest, SessionGrant, LinkRequest, LinkGrant):
    register(_cls)


# ---- signing -------------------------------------------------------------------


def _label(cls: type[Message]) -> bytes:
    return f"meshvpn/v{VERSION}/{cls.LABEL}".encode() + b"\x00"


@dataclass(frozen=True)
class Signed:
    """A verified message and who signed it."""

    message: Message
    signer: PublicKey
    wire: bytes

    @property
    def node_id(self) -> str:
        return node_id_of(self.signer)


@dataclass(frozen=True)
class Unverified:
    """A well-formed message whose signature has not been checked (yet): ``peek``.

    Only for deciding which messages are worth a signature check (a directory
    of thousands of announcements verifies the few it considers); nothing in
    it may be acted on before ``verify_signature`` turned it into ``Signed``.
    """

    message: Message
    signer: PublicKey
    wire: bytes


def sign(message: Message, key: PrivateKey) -> bytes:
    body = message.encode_body()
    head = HEADER.pack(MAGIC, VERSION, message.TYPE, len(body)) + body + key.ed25519_public().raw
    if len(head) + SIG_LEN > MAX_MESSAGE:
        raise ValueError("message too large")
    return head + key.ed25519_sign(_label(type(message)) + head)


def _frame(wire: bytes, expect: type[Message] | None) -> type[Message]:
    """Check the framing; return the message class."""
    if len(wire) > MAX_MESSAGE:
        raise MessageError("oversized")
    if len(wire) < HEADER.size + KEY_LEN + SIG_LEN:
        raise MessageError("malformed", "too short")
    magic, version, mtype, body_len = HEADER.unpack_from(wire)
    if magic != MAGIC:
        raise MessageError("malformed", "bad magic")
    if version != VERSION:
        raise MessageError("unsupported-version")
    cls = MESSAGE_TYPES.get(mtype)
    if cls is None or (expect is not None and cls is not expect):
        raise MessageError("wrong-type")
    if len(wire) != HEADER.size + body_len + KEY_LEN + SIG_LEN:
        raise MessageError("malformed", "length mismatch")
    return cls


def _check_signature(cls: type[Message], wire: bytes) -> PublicKey:
    head = wire[:-SIG_LEN]
    signer = PublicKey(head[-KEY_LEN:])
    try:
        signer.ed25519_verify(wire[-SIG_LEN:], _label(cls) + head)
    except (InvalidSignature, ValueError):
        raise MessageError("bad-signature") from None
    return signer


def verify(wire: bytes, expect: type[Message] | None = None) -> Signed:
    """Parse and verify; MessageError with a reason tag on anything wrong."""
    cls = _frame(wire, expect)
    signer = _check_signature(cls, wire)
    message = cls.decode_body(wire[HEADER.size : -KEY_LEN - SIG_LEN])
    return Signed(message, signer, wire)


def peek(wire: bytes, expect: type[Message] | None = None) -> Unverified:
    """Everything ``verify`` checks but the signature."""
    cls = _frame(wire, expect)
    message = cls.decode_body(wire[HEADER.size : -KEY_LEN - SIG_LEN])
    return Unverified(message, PublicKey(wire[-KEY_LEN - SIG_LEN : -SIG_LEN]), wire)


def verify_signature(unverified: Unverified) -> Signed:
    """The signature check ``peek`` left out; MessageError("bad-signature") if it fails."""
    signer = _check_signature(type(unverified.message), unverified.wire)
    return Signed(unverified.message, signer, unverified.wire)


def _check_announcement(ann: Message, signer: PublicKey, now_ms: int) -> None:
    assert isinstance(ann, Announcement)  # noqa: S101 - the caller asked for this type
    if ann.mesh_address != mesh_address_of(signer).packed:
        raise MessageError("malformed", "mesh address is not the signer's")
    if ann.expires_ms <= now_ms:
        raise MessageError("expired")
    if ann.issued_ms > now_ms + CLOCK_SKEW_MS:
        raise MessageError("from-the-future")


def verify_announcement(wire: bytes, now_ms: int) -> Signed:
    signed = verify(wire, Announcement)
    _check_announcement(signed.message, signed.signer, now_ms)
    return signed


def peek_announcement(wire: bytes, now_ms: int) -> Unverified:
    """``verify_announcement`` but the signature: see ``Unverified``."""
    unverified = peek(wire, Announcement)
    _check_announcement(unverified.message, unverified.signer, now_ms)
    return unverified


CLOCK_SKEW_MS: Final = 60_000
