"""Authenticated RTT probes: a small UDP echo a relay answers only for real
probes, and never with more bytes than it received.

Request (``REQUEST_LEN`` bytes, zero-padded)::

    b"MVP1" | client ephemeral X25519 key:32 | nonce:16 | sent_ms:u64 | mac:16 | zeros

Reply (``REPLY_LEN`` bytes)::

    b"MVR1" | nonce:16 | mac:16

Both MACs are keyed BLAKE2s with a key from X25519(ephemeral, relay control
key): only someone who addressed this relay's key can make the relay answer,
and only the relay can answer. So a relay cannot be used as a reflector: a
forged or replayed request gets nothing, replies are a third the size of
requests (no amplification), and each source /24 (or /48) gets a bounded
number of replies per second. A flood from many prefixes (or forged sources)
meets one more bucket, for all sources together, in front of the X25519
operation, so it costs the relay a bounded amount of CPU per second; what
it drops is counted per reason.

Pure: keys, time and the source address come in; bytes and decisions go out.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from meshvpn.identity import PrivateKey, PublicKey
from meshvpn.ratelimit import RateTable, TokenBucket

REQ_MAGIC: Final = b"MVP1"
REP_MAGIC: Final = b"MVR1"
REQUEST_LEN: Final = 128
REPLY_LEN: Final = 4 + 16 + 16
_REQ: Final = struct.Struct("!4s32s16sQ16s")
FRESH_MS: Final = 30_000
REPLAY_CACHE: Final = 65_536
RATE_PER_SOURCE: Final = 20  # replies per second per source prefix
BURST_PER_SOURCE: Final = 40
RATE_TABLE: Final = 65_536
RATE_ALL: Final = 500  # X25519 operations per second, all sources together
BURST_ALL: Final = 1_000


def _mac_key(shared: bytes) -> bytes:
    return hashlib.blake2s(shared, person=b"mvprobe1").digest()


def _mac(key: bytes, label: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(label + data, key=key, digest_size=16).digest()


@dataclass(frozen=True)
class ProbeSent:
    """What the client keeps to check the reply."""

    nonce: bytes
    mac_key: bytes
    sent_ms: int


def make_request(relay_control: PublicKey, now_ms: int) -> tuple[bytes, ProbeSent]:
    eph = x25519.X25519PrivateKey.generate()
    shared = eph.exchange(x25519.X25519PublicKey.from_public_bytes(relay_control.raw))
    key = _mac_key(shared)
    nonce = os.urandom(16)
    eph_pub = eph.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    body = REQ_MAGIC + eph_pub + nonce + now_ms.to_bytes(8, "big")
    wire = body + _mac(key, b"req", body)
    return wire.ljust(REQUEST_LEN, b"\0"), ProbeSent(nonce, key, now_ms)


def reply_nonce(wire: bytes) -> bytes:
    """The nonce a reply claims to answer (unverified: look it up, then check_reply)."""
    return wire[4:20]


def check_reply(sent: ProbeSent, wire: bytes) -> bool:
    if len(wire) != REPLY_LEN or not wire.startswith(REP_MAGIC):
        return False
    nonce, mac = wire[4:20], wire[20:36]
    return nonce == sent.nonce and mac == _mac(sent.mac_key, b"rep", nonce)


@dataclass
class ProbeResponder:
    """The relay's side: answer valid, fresh, first-seen probes within rate."""

    control_key: PrivateKey
    seen: OrderedDict[bytes, int] = field(default_factory=OrderedDict)
    per_source: RateTable[str] = field(
        default_factory=lambda: RateTable(BURST_PER_SOURCE, 1000 // RATE_PER_SOURCE, RATE_TABLE)
    )
    overall: TokenBucket = field(default_factory=lambda: TokenBucket(BURST_ALL, 1000 // RATE_ALL))
    answered: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def _drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def handle(self, wire: bytes, source: str, now_ms: int) -> bytes | None:
        if len(wire) != REQUEST_LEN or not wire.startswith(REQ_MAGIC):
            self._drop("malformed")
            return None
        if not self.per_source.allow(_source_prefix(source), now_ms):
            self._drop("rate-limited")
            return None
        _, eph_pub, nonce, sent_ms, mac = _REQ.unpack_from(wire)
        if wire[_REQ.size :].strip(b"\0"):
            self._drop("malformed")
            return None
        if abs(now_ms - sent_ms) > FRESH_MS:
            self._drop("stale")
            return None
        if not self.overall.allow(now_ms):
            self._drop("overload")
            return None
        try:
            priv = x25519.X25519PrivateKey.from_private_bytes(self.control_key.raw)
            shared = priv.exchange(x25519.X25519PublicKey.from_public_bytes(eph_pub))
        except ValueError:  # a low-order point gives an all-zero secret
            self._drop("bad-mac")
            return None
        key = _mac_key(shared)
        if mac != _mac(key, b"req", wire[: _REQ.size - 16]):
            self._drop("bad-mac")
            return None
        if nonce in self.seen:
            self._drop("replayed")
            return None
        self.seen[nonce] = now_ms
        while len(self.seen) > REPLAY_CACHE:
            self.seen.popitem(last=False)
        self.answered += 1
        return REP_MAGIC + bytes(nonce) + _mac(key, b"rep", bytes(nonce))


def _source_prefix(source: str) -> str:
    try:
        addr = ipaddress.ip_address(source)
    except ValueError:
        return source
    bits = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))
