"""Multi-hop receipts: the exit learns a session's path and collects every
relay's countersignature on it.

Theory of operation
-------------------
A multi-hop client runs its end-to-end session with the exit; the exit sees
that session's WireGuard peer at a mesh address (``relay.agent.session_role``),
which lies in the /64 of the client's *entry* (``client_mesh_address``). So
the exit knows the entry from the address alone, and learns the relays in
between by tracing (``meshvpn.icmp.probe_path``, in a thread) toward the
entry's mesh address: every hop answers from its own mesh address, which the
directory maps to a relay. The path is ``(entry, transit..., exit)``; it is
cached per client address and traced again when the exit's route toward the
entry changes (failover) or after ``RETRACE_S``. The trace runs from the exit
toward the entry; routing costs are symmetric (RTT), so it is the path the
client's packets take too. Until a trace is done the exit states no path, and
the receipt names the exit alone, as for a single hop.

The exit states the path (``Statement`` version 2), the client checks that it
starts at its entry and ends at its exit and signs a receipt naming it, the
exit checks and countersigns it as for one relay, journals it as *collecting*
(``relay.journal``) before it acknowledges, and asks every other relay on the
path to countersign: a ``CosignRequest`` (the client's mesh address and the
client-signed receipt) on UDP ``COSIGN_PORT`` to the relay's mesh address,
over the mesh. Each relay checks (``witness``) that the request comes from
the receipt's exit (mesh sources are checked against routing by the links'
nftables rules), that it is itself on the path, and that its *own* counters
back the bytes: per-flow counters of the mesh forward path (an nftables set
keyed by ``ip6 saddr . ip6 daddr``, with per-element counters, see
``relay.exit``) for the flow client → exit (up) and exit → client (down),
within ``accounting.exchange.backed``. It answers with its countersignature,
or a refusal with the reason. A countersignature signs only the receipt's
wire, so they are collected in any order and assembled in path order.

The ``Collector`` (pure) holds, per session, the newest receipt still
collecting: a newer one supersedes it (receipts are cumulative). Unanswered
requests are re-sent every ``RETRY_MS``; after ``GIVE_UP_MS`` without every
signature the receipt is dropped. Only *complete* bundles are journaled for
delivery and forwarded to accounting (which books only complete bundles), so
bytes of a dropped receipt wait for the next complete one, which covers them.

The entry countersigns as a witness (the client's traffic came in through
it); the ledger gives it no share of the path receipt (``accounting.ledger``),
because its own access-link session pays it for the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, cast

from accounting.exchange import Counters, backed
from accounting.receipts import PartialBundle, Receipt, ReceiptBundle, verify_receipt
from meshvpn.clock import now_ms
from meshvpn.identity import Identity, PublicKey, mesh_address_of, mesh_prefix_of
from meshvpn.messages import MessageError
from meshvpn.ratelimit import TokenBucket

log = logging.getLogger("meshvpn.paths")

COSIGN_PORT: Final = 51824  # UDP, on every relay's mesh address
RETRY_MS: Final = 1_000
GIVE_UP_MS: Final = 30_000
RETRACE_S: Final = 30.0
TRACE_TIMEOUT_S: Final = 0.5
FLOWS_SET: Final = "mesh_flows"
MAX_REASON: Final = 120
REQUESTS_BURST: Final = 200  # verifications a relay does for others...
REQUESTS_REFILL_MS: Final = 5  # ...200 a second sustained

REQUEST_MAGIC: Final = b"MVP1"
ANSWER_MAGIC: Final = b"MVP2"
REFUSAL_MAGIC: Final = b"MVP0"
_ANSWER: Final = struct.Struct("!4s16sQ64s")
_REFUSAL: Final = struct.Struct("!4s16sQ")
Address = ipaddress.IPv6Address


# ---- wire: exit -> relay on the path, and back


@dataclass(frozen=True)
class CosignRequest:
    """``MVP1 | client mesh address:16 | client-signed receipt``."""

    client_address: Address
    receipt_wire: bytes

    def encode(self) -> bytes:
        return REQUEST_MAGIC + self.client_address.packed + self.receipt_wire

    @classmethod
    def decode(cls, wire: bytes) -> CosignRequest:
        if not wire.startswith(REQUEST_MAGIC) or len(wire) <= 20:
            raise MessageError("malformed", "not a countersignature request")
        return cls(ipaddress.IPv6Address(wire[4:20]), wire[20:])


@dataclass(frozen=True)
class CosignAnswer:
    """``MVP2 | session id:16 | seq:u64 | signature:64``: this relay countersigned."""

    session_id: bytes
    seq: int
    signature: bytes

    def encode(self) -> bytes:
        return _ANSWER.pack(ANSWER_MAGIC, self.session_id, self.seq, self.signature)


@dataclass(frozen=True)
class CosignRefusal:
    """``MVP0 | session id:16 | seq:u64 | reason (UTF-8, at most 120 bytes)``."""

    session_id: bytes
    seq: int
    reason: str

    def encode(self) -> bytes:
        reason = self.reason.encode()[:MAX_REASON]
        return _REFUSAL.pack(REFUSAL_MAGIC, self.session_id, self.seq) + reason


def decode_answer(wire: bytes) -> CosignAnswer | CosignRefusal:
    if wire.startswith(ANSWER_MAGIC) and len(wire) == _ANSWER.size:
        _, session_id, seq, signature = _ANSWER.unpack(wire)
        return CosignAnswer(session_id, seq, signature)
    if wire.startswith(REFUSAL_MAGIC) and _REFUSAL.size <= len(wire) <= _REFUSAL.size + MAX_REASON:
        _, session_id, seq = _REFUSAL.unpack_from(wire)
        return CosignRefusal(session_id, seq, wire[_REFUSAL.size :].decode(errors="replace"))
    raise MessageError("malformed", "not a countersignature answer")


# ---- pure decisions


def path_from_trace(
    exit_key: PublicKey,
    entry: PublicKey,
    hops: list[str | None],
    key_of: Callable[[str], PublicKey | None],
) -> tuple[PublicKey, ...] | None:
    """The path (entry, transit..., exit) from a trace run at the exit toward the
    entry's mesh address; None when a hop is silent or unknown, or the trace did
    not end at the entry."""
    keys = []
    for hop in hops:
        key = key_of(hop) if hop is not None else None
        if key is None:
            return None
        keys.append(key)
    if not keys or keys[-1] != entry:
        return None
    path = (*reversed(keys), exit_key)
    return path if len(set(path)) == len(path) else None


def flow_counters(
    flows: Mapping[tuple[str, str], int], client: Address, exit_: Address
) -> Counters:
    """The session's bytes as this relay forwarded them: client to exit is up."""
    c, e = str(client), str(exit_)
    return Counters(up=flows.get((c, e), 0), down=flows.get((e, c), 0))


def witness(
    request: CosignRequest,
    me: PublicKey,
    source: Address,
    flows: Mapping[tuple[str, str], int],
) -> Receipt | str:
    """Whether this relay countersigns: the receipt, or why not."""
    try:
        receipt = verify_receipt(request.receipt_wire)
    except MessageError as exc:
        return f"bad receipt ({exc.reason})"
    path = receipt.path
    if len(path) < 2 or me not in path[:-1]:
        return "not on the path (or its exit)"
    exit_ = mesh_address_of(path[-1])
    if source != exit_:
        return "not asked by the path's exit"
    if request.client_address not in mesh_prefix_of(mesh_address_of(path[0])):
        return "client address not behind the path's entry"
    own = flow_counters(flows, request.client_address, exit_)
    if not backed(receipt.bytes_up, receipt.bytes_down, own):
        return (
            f"receipt states {receipt.bytes_up} up / {receipt.bytes_down} down bytes,"
            f" this relay carried {own.up} / {own.down}"
        )
    return receipt


@dataclass(frozen=True)
class SendRequest:
    relay: PublicKey
    wire: bytes


@dataclass
class _Collecting:
    partial: PartialBundle
    client_address: Address
    since_ms: int
    due_ms: int


@dataclass
class Collector:
    """Per session, the newest receipt still collecting countersignatures."""

    waiting: dict[bytes, _Collecting] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)

    def add(self, partial: PartialBundle, client: Address, now_ms: int) -> list[SendRequest]:
        r = partial.receipt
        held = self.waiting.get(r.session_id)
        if held is not None and held.partial.receipt.seq >= r.seq:
            return []
        if held is not None:
            self.counters["superseded"] += 1
        self.waiting[r.session_id] = _Collecting(partial, client, now_ms, now_ms + RETRY_MS)
        return self._requests(self.waiting[r.session_id])

    def on_answer(
        self, answer: CosignAnswer | CosignRefusal, source: Address
    ) -> ReceiptBundle | str | None:
        """A complete bundle, a refusal's or bad answer's reason, or None (not yet)."""
        held = self.waiting.get(answer.session_id)
        if held is None or held.partial.receipt.seq != answer.seq:
            self.counters["answer-stale"] += 1
            return None
        relay = next((k for k in held.partial.receipt.path if mesh_address_of(k) == source), None)
        if relay is None:
            return "answer from a relay off the path"
        if isinstance(answer, CosignRefusal):
            self.counters["refused"] += 1
            return f"{relay.b64[:8]}… refused: {answer.reason}"
        try:
            held.partial = held.partial.with_signature(relay, answer.signature)
        except MessageError as exc:
            return exc.reason
        self.counters["countersigned"] += 1
        if not held.partial.complete:
            return None
        del self.waiting[answer.session_id]
        self.counters["complete"] += 1
        return held.partial.bundle()

    def due(self, now_ms: int) -> list[SendRequest]:
        out: list[SendRequest] = []
        for session_id, held in list(self.waiting.items()):
            if now_ms - held.since_ms >= GIVE_UP_MS:
                del self.waiting[session_id]
                self.counters["gave-up"] += 1
            elif held.due_ms <= now_ms:
                held.due_ms = now_ms + RETRY_MS
                self.counters["resent"] += 1
                out += self._requests(held)
        return out

    @staticmethod
    def _requests(held: _Collecting) -> list[SendRequest]:
        wire = CosignRequest(held.client_address, held.partial.receipt_wire).encode()
        return [SendRequest(relay, wire) for relay in held.partial.missing]


def parse_flows(nft_json: str) -> dict[tuple[str, str], int]:
    """Bytes per (source, destination) from ``nft -j list set``'s elements."""
    flows: dict[tuple[str, str], int] = {}
    with contextlib.suppress(ValueError, KeyError, TypeError):
        for item in json.loads(nft_json)["nftables"]:
            for elem in item.get("set", {}).get("elem", []):
                e = elem["elem"]
                src, dst = e["val"]["concat"]
                flows[(str(ipaddress.IPv6Address(src)), str(ipaddress.IPv6Address(dst)))] = int(
                    e["counter"]["bytes"]
                )
    return flows


# ---- the adapter


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, service: PathService) -> None:
        self.service = service
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.DatagramTransport", transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.service.on_datagram(data, str(addr[0]).split("%")[0], int(addr[1]))


@dataclass
class _Traced:
    path: tuple[PublicKey, ...] | None
    via: str | None
    at: float


Completed = Callable[[ReceiptBundle], None]


class PathService:
    """One relay's part in multi-hop receipts: as an exit it traces paths and
    collects countersignatures; as an entry or transit it answers requests."""

    def __init__(
        self,
        identity: Identity,
        *,
        entry_of: Callable[[Address], PublicKey | None],
        key_of: Callable[[str], PublicKey | None],
        route_via: Callable[[PublicKey], str | None],
        trace: Callable[[Address], list[str | None]],
        read_flows: Callable[[], Awaitable[dict[tuple[str, str], int]]],
    ) -> None:
        self.identity = identity
        self.entry_of = entry_of
        self.key_of = key_of
        self.route_via = route_via
        self.trace = trace
        self.read_flows = read_flows
        self.collector = Collector()
        self.on_complete: Completed | None = None
        self.counters: Counter[str] = Counter()
        self._traced: dict[Address, _Traced] = {}
        self._to_trace: set[Address] = set()
        self._wake = asyncio.Event()
        self._transport: asyncio.DatagramTransport | None = None
        self._budget = TokenBucket(REQUESTS_BURST, REQUESTS_REFILL_MS)
        self._logged: set[str] = set()
        self._witness_jobs: set[asyncio.Task[None]] = set()

    # ---- as the exit: the path

    def path_for(self, client: Address) -> tuple[PublicKey, ...]:
        """The traced path of a client behind this mesh address; () until known."""
        entry = self.entry_of(client)
        if entry is None:
            return ()
        held = self._traced.get(client)
        stale = held is None or (
            held.via != self.route_via(entry) or time.monotonic() - held.at > RETRACE_S
        )
        if stale and client not in self._to_trace:
            self._to_trace.add(client)
            self._wake.set()
        return held.path or () if held is not None else ()

    async def _trace_one(self, client: Address) -> None:
        entry = self.entry_of(client)
        if entry is None:
            return
        via = self.route_via(entry)
        hops = await asyncio.to_thread(self.trace, mesh_address_of(entry))
        path = path_from_trace(self.identity.identity_public, entry, hops, self.key_of)
        old = self._traced.get(client)
        if path is not None and (old is None or old.path != path):
            log.info("path of client %s: %s", client, " → ".join(k.b64[:8] + "…" for k in path))
        self.counters["traced" if path is not None else "trace-failed"] += 1
        # A failed trace keeps the last good path until the next try.
        self._traced[client] = _Traced(path or (old.path if old else None), via, time.monotonic())

    def forget(self, client: Address) -> None:
        self._traced.pop(client, None)

    # ---- as the exit: collecting

    def collect(self, partial: PartialBundle, client: Address) -> None:
        self._send(self.collector.add(partial, client, now_ms()))

    def _send(self, requests: list[SendRequest]) -> None:
        if self._transport is None:
            return
        for req in requests:
            with contextlib.suppress(OSError):
                self._transport.sendto(req.wire, (str(mesh_address_of(req.relay)), COSIGN_PORT))
            self.counters["requests-sent"] += 1

    # ---- datagrams

    def on_datagram(self, data: bytes, source: str, port: int) -> None:
        try:
            address = ipaddress.IPv6Address(source)
        except ValueError:
            return
        if data.startswith(REQUEST_MAGIC):
            if not self._budget.allow(now_ms()):
                self._note("rate-limited", source)
                return
            try:
                request = CosignRequest.decode(data)
            except MessageError as exc:
                self._note(exc.reason, source)
                return
            task = asyncio.get_running_loop().create_task(self._witness(request, address, port))
            self._witness_jobs.add(task)
            task.add_done_callback(self._witness_jobs.discard)
            return
        try:
            answer = decode_answer(data)
        except MessageError as exc:
            self._note(exc.reason, source)
            return
        result = self.collector.on_answer(answer, address)
        if isinstance(result, str):
            self._note(result, source)
        elif isinstance(result, ReceiptBundle) and self.on_complete is not None:
            self.on_complete(result)

    async def _witness(self, request: CosignRequest, source: Address, port: int) -> None:
        flows = await self.read_flows()
        verdict = witness(request, self.identity.identity_public, source, flows)
        if self._transport is None:
            return
        if isinstance(verdict, str):
            self.counters["refused"] += 1
            self._note(f"refused: {verdict}", str(source))
            with contextlib.suppress(MessageError):
                r = verify_receipt(request.receipt_wire)
                reply = CosignRefusal(r.session_id, r.seq, verdict).encode()
                self._transport.sendto(reply, (str(source), port))
            return
        self.counters["countersigned"] += 1
        signature = PartialBundle.start(request.receipt_wire).sign(self.identity.identity_key)
        own = signature.signatures[verdict.path.index(self.identity.identity_public)]
        assert own is not None  # noqa: S101 - just signed
        self._transport.sendto(
            CosignAnswer(verdict.session_id, verdict.seq, own).encode(), (str(source), port)
        )

    def _note(self, reason: str, source: str) -> None:
        key = reason.split(":", maxsplit=1)[0][:40]
        self.counters[f"dropped:{key}"] += 1
        if key not in self._logged:
            self._logged.add(key)
            log.warning(
                "path receipts: %s (from %s); further ones are only counted", reason, source
            )

    # ---- the loop

    async def run(self, local: Address) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Socket(self), local_addr=(str(local), COSIGN_PORT)
        )
        self._transport = transport
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), RETRY_MS / 1000 / 2)
                self._wake.clear()
                while self._to_trace:
                    client = self._to_trace.pop()
                    await self._trace_one(client)
                self._send(self.collector.due(now_ms()))
        finally:
            for job in self._witness_jobs:
                job.cancel()
            transport.close()
            self._transport = None

    def status(self) -> dict[str, Any]:
        return {
            "collecting": len(self.collector.waiting),
            "paths": {
                str(c): [k.b64 for k in t.path] if t.path else None for c, t in self._traced.items()
            },
            **{f"collector:{k}": v for k, v in self.collector.counters.items()},
            **dict(self.counters),
        }
