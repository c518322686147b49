"""Every parser the network can reach, as a fuzz target, with its seeds.

A target takes bytes and feeds them to one parser the way the agent does. It
may raise only its documented error family (``allowed``): anything else is a
crash, i.e. a bug. Parsers that the agents call without a try (the probe
responder, the directory, the relay's receipt exchange) may raise nothing.

The seeds are valid inputs of each kind; ``mutate`` makes structure-aware
variants: bit and byte flips, interesting values, inserted, deleted, repeated
and spliced ranges, edited length fields, and, for signed messages, a mutated
body signed again by a fuzzer key, and for session requests a mutated request
sealed again under valid Noise, so that the mutation reaches the parsers
*behind* the signature and the Noise layer, as it would from a peer that
signs its own garbage.

Not here, because the network cannot reach them: the relay's journal (it
reads back only bundles the relay countersigned itself), leases.json, the
control socket (local, root only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import itertools
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network
from typing import Any

from noise.connection import Keypair

from accounting.credit import credit_topic, notice_for
from accounting.epochs import EpochStatement, verify_claim
from accounting.exchange import (
    Ack,
    ClientSession,
    Counters,
    RelaySession,
    Statement,
    Terms,
)
from accounting.merkle import leaf_hash, verify_proof
from accounting.receipts import (
    LIST_MAGIC,
    Receipt,
    ReceiptBundle,
    pack_bundles,
    sign_receipt,
    unpack_bundles,
    verify_receipt,
)
from accounting.service import decode_all, relay_of_announcement
from meshvpn.directory import Directory, announce_topic
from meshvpn.handshake import PendingRequest, _noise, accept_request, open_request
from meshvpn.identity import (
    PrivateKey,
    PublicKey,
    mesh_address_of,
    mesh_prefix_of,
    new_x25519,
)
from meshvpn.identity import node_id_of as node_id
from meshvpn.messages import (
    HEADER,
    MESSAGE_TYPES,
    ROLE_ENTRY,
    ROLE_EXIT,
    Announcement,
    LinkGrant,
    LinkRequest,
    Message,
    MessageError,
    SessionGrant,
    SessionRequest,
    sign,
    verify,
    verify_announcement,
)
from meshvpn.probe import ProbeResponder, ProbeSent, check_reply, make_request, reply_nonce
from meshvpn.routing import (
    Hello,
    Ihu,
    RetractAll,
    Router,
    RoutingCodecError,
    SeqnoRequest,
    Update,
    decode_packet,
    encode_packet,
)
from meshvpn.wireguard.uapi import UapiError, decode_answer, parse_get, parse_set_answer
from relay.credit import CreditGate
from relay.paths import CosignAnswer, CosignRefusal, CosignRequest, witness
from relay.paths import decode_answer as decode_cosign_answer
from relay.pool import AddressPool
from relay.sessions import SessionBook

NOW = 1_795_000_000_000


def _key(seed: int) -> PrivateKey:
    return PrivateKey(random.Random(seed).randbytes(32))


# Fixed keys: a fuzz run is reproducible from its seed.
RELAY_ID, RELAY_CONTROL, RELAY_WG = _key(1), _key(2), _key(3)
CLIENT_ID, CLIENT_CONTROL, CLIENT_WG = _key(4), _key(5), _key(6)
FUZZER = _key(7)  # an attacker's identity: signs whatever the mutation made
ACCOUNTING = _key(9)


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...]  # the documented error family
    seeds: tuple[bytes, ...]
    resign: bool = False  # seeds are signed messages: mutate the body and sign again
    reseal: bool = False  # seeds are IK message 1: mutate the request and seal again
    weight: int = 1
    remake: Callable[[random.Random], bytes] | None = None  # target-specific valid variants


# ---- seeds


def announcement(key: PrivateKey = RELAY_ID) -> Announcement:
    return Announcement(
        wireguard_key=RELAY_WG.x25519_public(),
        control_key=RELAY_CONTROL.x25519_public(),
        endpoints=(
            (ipaddress.ip_address("198.51.100.2"), 51820),
            (ipaddress.ip_address("2001:db8::2"), 51820),
        ),
        probe_port=51821,
        mesh_address=mesh_address_of(key.ed25519_public()).packed,
        roles=ROLE_ENTRY | ROLE_EXIT,
        geohash="u33dc",
        price_per_gib=1_000_000,
        capacity=100,
        load=3,
        version="0.1.0",
        issued_ms=NOW - 1000,
        expires_ms=NOW + 60_000,
    )


def session_request(want_exit: str = "") -> SessionRequest:
    return SessionRequest(
        relay=RELAY_ID.ed25519_public(),
        control_key=CLIENT_CONTROL.x25519_public(),
        wireguard_key=CLIENT_WG.x25519_public(),
        want_exit=want_exit,
        max_price_per_gib=2_000_000,
        reply_token=bytes(range(16)),
        nonce=bytes(range(16, 32)),
        issued_ms=NOW,
    )


def grant(status: int = 0) -> SessionGrant:
    return SessionGrant(
        request_nonce=bytes(range(16, 32)),
        status=status,
        reason="" if status == 0 else "relay is full",
        session_id=bytes(range(32, 48)),
        tunnel_address=bytes([100, 64, 0, 2]),
        tunnel_prefix=32,
        relay_wireguard_key=RELAY_WG.x25519_public(),
        price_per_gib=1_000_000,
        receipt_interval_s=10,
        receipt_interval_bytes=8 << 20,
        expires_ms=NOW + 600_000,
    )


TERMS = Terms(
    session_id=bytes(range(32, 48)),
    client=CLIENT_ID.ed25519_public(),
    path=(RELAY_ID.ed25519_public(),),
    price_per_gib=1_000_000,
    started_ms=NOW,
)


def receipt(seq: int = 1, up: int = 1000, down: int = 50_000) -> Receipt:
    return Receipt(
        session_id=TERMS.session_id,
        client=TERMS.client,
        path=TERMS.path,
        bytes_up=up,
        bytes_down=down,
        price_per_gib=TERMS.price_per_gib,
        seq=seq,
        started_ms=NOW,
        issued_ms=NOW + 10,
    )


ROOT = leaf_hash(RELAY_ID.ed25519_public(), 10**6)  # a tree of one: the leaf is the root


def epoch_statement() -> EpochStatement:
    return EpochStatement(
        epoch=7, start_ms=NOW, end_ms=NOW + 3_600_000, root=ROOT, relays=1, emitted=10**9,
        carried=0,
    )  # fmt: skip


def signed_seeds() -> list[bytes]:
    return [
        sign(announcement(), RELAY_ID),
        sign(session_request(), CLIENT_ID),
        sign(session_request("abcdefghijklmnopqrstuvwxyz234567"), CLIENT_ID),
        sign(grant(), RELAY_ID),
        sign(grant(1), RELAY_ID),
        sign_receipt(receipt(), CLIENT_ID),
        sign(epoch_statement(), ACCOUNTING),
        sign(link_request(), CLIENT_ID),
        sign(LinkGrant(bytes(range(16, 32)), 0, "", RELAY_WG.x25519_public(), 51831), RELAY_ID),
        sign(notice_for(node_id(CLIENT_ID.ed25519_public()), 10**6, NOW), ACCOUNTING),
    ]


def request_wire(request: SessionRequest | None = None, signer: PrivateKey = CLIENT_ID) -> bytes:
    return open_request(
        signer,
        CLIENT_CONTROL,
        RELAY_ID.ed25519_public(),
        RELAY_CONTROL.x25519_public(),
        request or session_request(),
    )[0]


def uapi_seeds() -> list[bytes]:
    peer = new_x25519().x25519_public().hex
    get = (
        f"private_key={'11' * 32}\nlisten_port=51820\nfwmark=0\n"
        f"public_key={peer}\npreshared_key={'00' * 32}\nprotocol_version=1\n"
        "endpoint=[2001:db8::1]:51820\nlast_handshake_time_sec=1700000000\n"
        "last_handshake_time_nsec=5\ntx_bytes=100\nrx_bytes=200\n"
        "persistent_keepalive_interval=25\nallowed_ip=100.64.0.2/32\nallowed_ip=::/0\n"
        f"public_key={new_x25519().x25519_public().hex}\nendpoint=192.0.2.1:1\n"
        "errno=0\n\n"
    )
    return [get.encode(), b"errno=0\n\n", b"errno=22\n\n"]


# ---- the targets: each feeds bytes to a parser the way the agent does


def _verify_any(wire: bytes) -> None:
    signed = verify(wire)
    type(signed.message).decode_body(signed.message.encode_body())


def _decode_bodies(wire: bytes) -> None:
    """Behind the signature: any body of any registered type, as a signer made it."""
    if not wire:
        return
    types = sorted(MESSAGE_TYPES)
    cls = MESSAGE_TYPES.get(wire[0]) or MESSAGE_TYPES[types[wire[0] % len(types)]]
    message = cls.decode_body(wire[1:])
    assert message.encode_body() == wire[1:], "decoding then encoding is not the identity"


def link_request() -> LinkRequest:
    return LinkRequest(
        relay=RELAY_ID.ed25519_public(),
        control_key=CLIENT_CONTROL.x25519_public(),
        wireguard_key=CLIENT_WG.x25519_public(),
        link_port=51830,
        reply_token=bytes(range(16)),
        nonce=bytes(range(16, 32)),
        issued_ms=NOW,
    )


def _read_sealed_link_grant(payload: bytes) -> None:
    """A relay asking for a link opens the neighbour's answer (behind Noise)."""
    wire, pending = open_request(
        CLIENT_ID,
        CLIENT_CONTROL,
        RELAY_ID.ed25519_public(),
        RELAY_CONTROL.x25519_public(),
        link_request(),
    )
    received = accept_request(RELAY_CONTROL, RELAY_ID.ed25519_public(), wire, NOW)
    pending.read_link_grant(bytes(received.conn.write_message(payload)))


def _credit_notice(wire: bytes) -> str:
    """A relay takes the accounting service's word on a client (relay/credit.py), on
    the topic of the client the notice names, as the service publishes it."""
    gate = CreditGate(ACCOUNTING.ed25519_public())
    client = node_id(CLIENT_ID.ed25519_public())
    with contextlib.suppress(MessageError):
        named = verify(wire).message
        client = str(getattr(named, "client", client))
    gate.on_notice(credit_topic(client), wire)
    return next(iter(gate.counters))


def _accounting_intake(wire: bytes) -> str:
    """The accounting service's intake from the receipts topics and announcements."""
    (ingest,) = decode_all([wire])
    with contextlib.suppress(MessageError):
        relay_of_announcement(wire)
    return ingest.reason or "ok"


def _routing_packet(data: bytes) -> None:
    decode_packet(data)


def _router() -> Router:
    router = Router(IPv6Address("fd00::1"), [IPv6Network("fd00::/64")], NOW)
    router.link_up("mvm1", IPv6Address("fd00:0:0:1::1"), NOW)
    return router


def _router_receive(data: bytes) -> str:
    """What a neighbour's routing packet does to the router: never an exception."""
    router = _router()
    router.receive("mvm1", data, NOW + 10)
    router.tick(NOW + 60_000)
    return "malformed" if router.counters["malformed"] else "ok"


def _routing_seeds() -> list[bytes]:
    prefix = IPv6Network("fd00:0:0:1::/64")
    rid = IPv6Address("fd00:0:0:1::1")
    return [
        encode_packet([Hello(400, 12345), Ihu(NOW & 0xFFFFFFFF, 20)]),
        encode_packet(
            [Update(prefix, rid, 7, 256, 1600), Update(IPv6Network("::/0"), rid, 1, 0xFFFF, 1)]
        ),
        encode_packet([SeqnoRequest(prefix, rid, 8, 3), RetractAll()]),
    ]


def _announcement(wire: bytes) -> None:
    verify_announcement(wire, NOW)


def _directory(wire: bytes) -> str:
    d = Directory()
    # the retained topic it arrives on: its signer's (as a forger publishes), mostly
    signer = PublicKey(wire[-96:-64]) if len(wire) >= 96 else FUZZER.ed25519_public()
    topic = [
        announce_topic(node_id(signer)),
        announce_topic(node_id(signer)),
        announce_topic(node_id(signer)),
        announce_topic(node_id(RELAY_ID.ed25519_public())),
        announce_topic(wire[1:20].decode(errors="replace")),
    ][zlib.crc32(wire) % 5]
    reason = d.offer(topic, wire, NOW)
    if d.entries:
        d.candidates(NOW, near="u33", exit_region="u", max_price=10**7)
    d.expire(NOW + 10**6)
    return reason or "accepted"


def _accept_request(wire: bytes) -> None:
    received = accept_request(RELAY_CONTROL, RELAY_ID.ed25519_public(), wire, NOW)
    if not isinstance(received.request, SessionRequest):
        return  # a link request: the mesh takes it (relay.mesh), the session book never
    book = SessionBook(
        pool=AddressPool(ipaddress.IPv4Network("100.64.0.0/24")),
        node_id=node_id(RELAY_ID.ed25519_public()),
        relay_wireguard_key=RELAY_WG.x25519_public(),
        price_per_gib=1_000_000,
        capacity=10,
    )
    if book.may_open(NOW):
        decision = book.decide(
            received.request, received.client_identity, received.ephemeral, bytes(16), NOW
        )
        if decision.grant is not None:
            received.answer(decision.grant, RELAY_ID)


def _pending() -> tuple[PendingRequest, bytes]:
    """A client's half-open handshake and the relay's real answer to it."""
    wire, pending = open_request(
        CLIENT_ID,
        CLIENT_CONTROL,
        RELAY_ID.ed25519_public(),
        RELAY_CONTROL.x25519_public(),
        session_request(),
    )
    received = accept_request(RELAY_CONTROL, RELAY_ID.ed25519_public(), wire, NOW)
    return pending, received.answer(grant(), RELAY_ID)


def _read_grant(wire: bytes) -> None:
    """The Noise layer: raw bytes where the client waits for message 2."""
    pending, _ = _pending()
    pending.read_grant(wire)


def _read_sealed_grant(payload: bytes) -> None:
    """Behind Noise: the relay (or whoever holds its control key) seals ``payload``
    as message 2 of a real handshake; the client opens and checks it."""
    wire, pending = open_request(
        CLIENT_ID,
        CLIENT_CONTROL,
        RELAY_ID.ed25519_public(),
        RELAY_CONTROL.x25519_public(),
        session_request(),
    )
    received = accept_request(RELAY_CONTROL, RELAY_ID.ed25519_public(), wire, NOW)
    answer = pending.read_grant(bytes(received.conn.write_message(payload)))
    if answer.granted:
        _ = answer.address


def _probe_request(wire: bytes) -> str:
    responder = ProbeResponder(RELAY_CONTROL)  # fresh: rate limits would turn inputs away
    if responder.handle(wire, f"192.0.2.{wire[0] if wire else 0}", NOW) is not None:
        return "answered"
    return next(iter(responder.dropped), "dropped")


_SENT = ProbeSent(nonce=bytes(16), mac_key=bytes(32), sent_ms=NOW)


LOW_ORDER = (bytes(32), bytes([1]) + bytes(31), bytes.fromhex(
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"
))  # fmt: skip


def _remake_probe(rng: random.Random) -> bytes:
    """A real probe with odd fields: any send time, or a low-order ephemeral key."""
    skew = rng.choice((0, 1, -1, 30_000, -30_000, 30_001, -30_001, rng.randrange(-(10**9), 10**9)))
    wire, _ = make_request(RELAY_CONTROL.x25519_public(), max(0, NOW + skew))
    if rng.random() < 0.3:
        wire = wire[:4] + rng.choice(LOW_ORDER) + wire[36:]
    if rng.random() < 0.3:
        wire = wire[:76] + rng.randbytes(52)  # garbage where the zero padding goes
    return wire


def _probe_reply(wire: bytes) -> None:
    reply_nonce(wire)
    check_reply(_SENT, wire)


def _bundle(wire: bytes) -> None:
    bundle = ReceiptBundle.decode(wire)
    assert bundle.encode() == wire, "a bundle decodes to another encoding"


def _bundle_list(wire: bytes) -> None:
    bundles = unpack_bundles(wire)
    if wire.startswith(LIST_MAGIC):
        assert len(bundles) < 2 or pack_bundles(bundles, len(wire)) == [(len(bundles), wire)]


def _receipt(wire: bytes) -> None:
    verify_receipt(wire)


def _relay_on_receipt(wire: bytes) -> str:
    session = RelaySession(TERMS)
    session.observe(Counters(5000, 100_000), NOW)
    session.observe(Counters(5000, 100_000), NOW + 11_000)  # a statement is out: seq 1
    (action,) = session.on_receipt(wire, RELAY_ID, NOW + 11_500)
    return str(getattr(action, "reason", "countersigned"))


def _client_channel(wire: bytes) -> None:
    """What the client does with a datagram on its receipt channel."""
    session = ClientSession(TERMS)
    session.observe(Counters(5000, 100_000))
    if wire.startswith(b"MVK1"):
        session.on_ack(Ack.decode(wire))
        return
    session.on_statement(Statement.decode(wire), CLIENT_ID, NOW)


def _claim(wire: bytes) -> str:
    check = verify_claim(wire, ACCOUNTING.ed25519_public(), RELAY_ID.ed25519_public(), 10**6, ())
    return check.reason.split(" (")[0]


def _proof(wire: bytes) -> str:
    """A claim's proof, as the claimant hands it over: sibling hashes, any lengths."""
    cuts = sorted({0, len(wire), *(b % (len(wire) + 1) for b in wire[:8])})
    proof = tuple(wire[a:b] for a, b in itertools.pairwise(cuts))
    ok = verify_proof(RELAY_ID.ed25519_public(), int.from_bytes(wire[:15] or b"\0"), proof, ROOT)
    return "verified" if ok else "refused"


def _uapi_get(data: bytes) -> None:
    parse_get(decode_answer(data))


def _uapi_set(data: bytes) -> None:
    parse_set_answer(decode_answer(data))


# a multi-hop path: entry, transit, exit (relay.paths)
ENTRY_ID, TRANSIT_ID = _key(11), _key(12)
PATH = (ENTRY_ID.ed25519_public(), TRANSIT_ID.ed25519_public(), RELAY_ID.ed25519_public())
PATH_CLIENT = mesh_prefix_of(mesh_address_of(PATH[0]))[7]
PATH_EXIT = mesh_address_of(PATH[-1])
FLOWS = {(str(PATH_CLIENT), str(PATH_EXIT)): 10**6, (str(PATH_EXIT), str(PATH_CLIENT)): 10**7}


def _statement_seeds() -> list[bytes]:
    return [
        Statement(TERMS.session_id, 1, Counters(5000, 100_000), NOW).encode(),
        Statement(TERMS.session_id, 2, Counters(5000, 100_000), NOW, PATH).encode(),
        Ack(TERMS.session_id, 1).encode(),
    ]


def _cosign_seeds() -> list[bytes]:
    signed = sign_receipt(dataclasses.replace(receipt(), path=PATH), CLIENT_ID)
    return [CosignRequest(PATH_CLIENT, signed).encode()]


def _witness(wire: bytes) -> str:
    """What a transit relay does with a datagram on its countersignature port."""
    answer = witness(CosignRequest.decode(wire), PATH[1], PATH_EXIT, FLOWS)
    return answer if isinstance(answer, str) else "countersigned"


def _cosign_answer(wire: bytes) -> None:
    decode_cosign_answer(wire)


def build_targets() -> list[Target]:
    signed = signed_seeds()
    probe_wire, _ = make_request(RELAY_CONTROL.x25519_public(), NOW)
    pending, answer = _pending()
    del pending
    bundle = ReceiptBundle.from_client(sign_receipt(receipt(), CLIENT_ID))
    messages = [verify(s).message for s in signed]
    bodies = [bytes([m.TYPE]) + m.encode_body() for m in messages]
    return [
        Target("messages.verify", _verify_any, (MessageError,), tuple(signed), resign=True),
        Target("messages.decode_body", _decode_bodies, (MessageError,), tuple(bodies)),
        Target("messages.verify_announcement", _announcement, (MessageError,), (signed[0],),
               resign=True),
        Target("directory.offer", _directory, (), (signed[0],), resign=True),
        Target("handshake.accept_request", _accept_request, (MessageError,),
               (request_wire(), request_wire(session_request("x" * 32)),
                request_wire(link_request())), reseal=True, weight=2),
        Target("handshake.read_grant", _read_grant, (MessageError,), (answer,)),
        Target("handshake.read_grant.sealed", _read_sealed_grant, (MessageError,),
               (signed[3], signed[4]), resign=True),
        Target("handshake.read_link_grant.sealed", _read_sealed_link_grant, (MessageError,),
               (signed[8],), resign=True),
        Target("routing.decode_packet", _routing_packet, (RoutingCodecError,),
               tuple(_routing_seeds())),
        Target("routing.router_receive", _router_receive, (), tuple(_routing_seeds())),
        Target("credit.on_notice", _credit_notice, (), (signed[9],), resign=True),
        Target("accounting.intake", _accounting_intake, (), (bundle.encode(), signed[0])),
        Target("probe.responder", _probe_request, (), (probe_wire,), remake=_remake_probe),
        Target("probe.reply", _probe_reply, (), (b"MVR1" + bytes(32),)),
        Target("receipts.bundle", _bundle, (MessageError,),
               (bundle.encode(), bundle.add_countersignature(RELAY_ID).encode())),
        Target("receipts.unpack_bundles", _bundle_list, (MessageError,),
               (pack_bundles([bundle.encode()] * 3, 8192)[0][1],)),
        Target("receipts.verify_receipt", _receipt, (MessageError,), (signed[5],), resign=True),
        Target("exchange.relay_on_receipt", _relay_on_receipt, (), (signed[5],), resign=True),
        Target("exchange.client_channel", _client_channel, (MessageError,),
               tuple(_statement_seeds())),
        Target("epochs.verify_claim", _claim, (), (signed[6],), resign=True),
        Target("merkle.verify_proof", _proof, (), (bytes(32) * 3, bytes(31))),
        Target("uapi.parse_get", _uapi_get, (UapiError,), tuple(uapi_seeds())),
        Target("uapi.parse_set_answer", _uapi_set, (UapiError,), (b"errno=0\n\n",)),
        Target("paths.witness", _witness, (MessageError,), tuple(_cosign_seeds())),
        Target("paths.decode_answer", _cosign_answer, (MessageError,),
               (CosignAnswer(TERMS.session_id, 1, bytes(64)).encode(),
                CosignRefusal(TERMS.session_id, 1, "not on the path").encode())),
    ]  # fmt: skip


# ---- mutations

INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0xFE, 32, 64)


def _flip(data: bytearray, rng: random.Random) -> None:
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)


def _mutate_bytes(seed: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 6))):
        op = rng.randrange(10)
        if not data:
            data += rng.randbytes(rng.randint(1, 64))
            continue
        i = rng.randrange(len(data))
        if op == 0:
            _flip(data, rng)
        elif op == 1:
            data[i] = rng.choice(INTERESTING)
        elif op == 2:
            data[i : i + 1] = rng.randbytes(rng.randint(0, 16))
        elif op == 3:
            del data[i : i + rng.randint(1, 64)]
        elif op == 4:
            j = rng.randrange(len(data))
            data[i:i] = data[j : j + rng.randint(1, 64)]  # repeat a range
        elif op == 5:
            del data[i:]  # truncate
        elif op == 6:
            data += rng.randbytes(rng.randint(1, 300))
        elif op == 7 and len(data) >= HEADER.size:
            # a length field: the message header's body_len, or any u16/u8 there
            at = 4 if rng.random() < 0.5 else rng.randrange(len(data) - 1)
            value = rng.choice((0, 1, 0xFFFF, len(data), len(data) - 100, rng.getrandbits(16)))
            data[at : at + 2] = struct.pack("!H", value % 0x10000)
        elif op == 8:
            other = rng.choice(pool)
            j = rng.randrange(len(other) + 1)
            data = data[:i] + bytearray(other[j:])  # splice
        else:
            data[i] = rng.randrange(256)
    return bytes(data)


def _field_mutant(message: Message, rng: random.Random) -> Message | None:
    """The same message with one field set to an odd but encodable value."""
    fields = list(message.FIELDS)
    name = rng.choice(fields)
    value = getattr(message, name)
    candidates: list[Any] = []
    if isinstance(value, bool):
        candidates = [not value]
    elif isinstance(value, int):
        candidates = [0, 1, 2**63, 2**64 - 1, 2**32 - 1, 255, value + 1, value - 1]
    elif isinstance(value, str):
        candidates = ["", "\u0000", "é" * 6, "z" * 200, "0" * 12, value[::-1]]
    elif isinstance(value, bytes):
        candidates = [bytes(len(value)), b"\xff" * len(value), rng.randbytes(len(value))]
    elif isinstance(value, PublicKey):
        candidates = [PublicKey(bytes(32)), FUZZER.ed25519_public(), PublicKey(b"\xff" * 32)]
    elif isinstance(value, tuple):
        candidates = [(), value * 2, value[:1], tuple(reversed(value))]
    rng.shuffle(candidates)
    for candidate in candidates:
        try:
            mutant = dataclasses.replace(message, **{name: candidate})  # type: ignore[type-var]
            mutant.encode_body()
        except (ValueError, TypeError):
            continue
        return mutant
    return None


def _resigned(seed: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    """Mutate what is behind the signature, then sign it again (with the fuzzer's key,
    or, to reach the checks after the signer's, with the seed's own)."""
    signed = verify(seed)
    key = rng.choice((FUZZER, RELAY_ID, CLIENT_ID, ACCOUNTING))
    if rng.random() < 0.5:
        mutant = _field_mutant(signed.message, rng)
        if mutant is not None:
            return sign(mutant, key)
    body = _mutate_bytes(signed.message.encode_body(), rng, pool)
    head = HEADER.pack(b"MV", 1, signed.message.TYPE, len(body) % 0x10000) + body
    head += key.ed25519_public().raw
    label = f"meshvpn/v1/{type(signed.message).LABEL}".encode() + b"\x00"
    return head + key.ed25519_sign(label + head)


def _resealed(rng: random.Random, pool: list[bytes]) -> bytes:
    """A request mutated behind Noise: the relay opens it and meets the mutation."""
    base = session_request()
    signer = rng.choice((CLIENT_ID, FUZZER))
    if rng.random() < 0.6:
        mutant = _field_mutant(base, rng)
        if isinstance(mutant, SessionRequest):
            return request_wire(mutant, signer)
    conn = _noise(initiator=True, static=CLIENT_CONTROL)
    conn.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, RELAY_CONTROL.x25519_public().raw)
    conn.start_handshake()
    return bytes(conn.write_message(_mutate_bytes(sign(base, signer), rng, pool)))


def generate(target: Target, rng: random.Random, pool: list[bytes]) -> bytes:
    """One input for ``target``: random bytes, a mutated seed, or a re-signed/re-sealed one."""
    roll = rng.random()
    if roll < 0.12:
        return rng.randbytes(rng.choice((0, 1, 4, 16, 64, 128, 343, 400, 1000, 4200)))
    if roll < 0.2:
        return rng.choice(target.seeds)  # valid inputs must pass too
    if target.reseal and roll < 0.55:
        return _resealed(rng, pool)
    if target.remake is not None and roll < 0.55:
        return target.remake(rng)
    if target.resign and roll < 0.55:
        return _resigned(rng.choice(target.seeds), rng, pool)
    if target.name.startswith("uapi"):
        return _mutate_uapi(rng.choice(target.seeds), rng)
    return _mutate_bytes(rng.choice(target.seeds), rng, pool)


_UAPI_VALUES = ("", "-1", "0", "99999999999999999999999", "zz", "=", "1.5", "\x00", "ä",
                "[::1]:0", "300.1.1.1:80", "[fe80::1%eth0]:1", "::/129", "1.2.3.4/33",
                "11" * 31, "11" * 33, "nan", " 1", "0x10")  # fmt: skip


def _mutate_uapi(seed: bytes, rng: random.Random) -> bytes:
    lines = seed.decode().split("\n")
    for _ in range(rng.randint(1, 4)):
        if not lines:
            lines.append(rng.choice(_UAPI_VALUES))
        i = rng.randrange(len(lines))
        op = rng.randrange(5)
        name, _, value = lines[i].partition("=")
        if op == 0:
            lines[i] = f"{name}={rng.choice(_UAPI_VALUES)}"
        elif op == 1:
            del lines[i]
        elif op == 2:
            lines.insert(i, lines[rng.randrange(len(lines))])
        elif op == 3:
            lines[i] = value + name  # no '='
        else:
            lines[i] = f"{rng.choice(('errno', 'public_key', 'private_key', name))}={value}"
    data = "\n".join(lines).encode()
    if rng.random() < 0.2:
        return _mutate_bytes(data, rng, [seed])
    return data


def run_one(target: Target, data: bytes) -> tuple[BaseException | None, str]:
    """Feed one input. Returns the exception if it is a crash (outside the family), and
    how the input fared: "ok", or the documented error's reason (how deep it got)."""
    try:
        outcome = target.run(data)
    except target.allowed as exc:
        return None, str(getattr(exc, "reason", type(exc).__name__))
    except Exception as exc:  # noqa: BLE001 - this is exactly what a fuzzer looks for
        return exc, "crash"
    return None, outcome if isinstance(outcome, str) else "ok"


def random_pool(targets: list[Target]) -> list[bytes]:
    return [seed for t in targets for seed in t.seeds]
