"""Mesh routing: a distance-vector protocol in the spirit of Babel (RFC 8966). Pure.

Theory of operation
-------------------
Every relay is a node with an id, its mesh address (an IPv6 ULA /128), and
originates one prefix: that address's /64, which also holds the tunnel
addresses it hands to its clients. Relays are joined by *links*, one
WireGuard interface per neighbour, named by an opaque link id the adapter
gives us. A ``Router`` is fed link events, routing packets and the time
(``now_ms``: the core never reads a clock), and answers with actions: bytes to
``Send`` on a link, ``RoutesChanged`` (then read ``table()``), and
``NeighbourLost``. The adapter arms a timer for ``next_timer_ms()`` and calls
``tick`` when it fires (as aioquic does).

Neighbours and link cost. Every ``hello_interval_ms`` a router sends each link
a Hello carrying its own timestamp. Every packet it sends to a neighbour whose
Hello it heard within the hold time also carries an IHU ("I heard you"): that
timestamp echoed back, with how long it was held. The sender of the Hello
gets ``rtt = (now - echoed timestamp) - held`` from one clock of its own, as in
Babel's RTT extension (draft-ietf-babel-rtt-extension); no clocks need to
agree. Only the first IHU echoing a given Hello is an RTT sample (the others
only prove the neighbour alive): one sample per Hello interval, however many
packets flow. A neighbour is REACHABLE while we hear its Hellos and its IHUs (so it
hears us too); silent past ``hold_time_ms`` (default 6 hello intervals), it is
LOST: its routes go, ``NeighbourLost`` tells the adapter. The link cost is
``base_cost + min(srtt_ms, max_rtt_cost)`` from the smoothed RTT (an EWMA of
1/8, like TCP's), and moves only when the target differs from the current cost
by more than ``cost_hysteresis_pct`` (at least ``cost_hysteresis_min``), so
jitter does not make routes flap. A metric is the sum of link costs along a
path, in about milliseconds; ``INFINITY`` (0xFFFF) means unreachable.

Routes. Each router keeps, per prefix, what each neighbour last advertised
(router id of the origin, 16-bit sequence number, metric) and selects the
neighbour with the least metric (advertised + link cost) among *feasible*
routes. Sequence numbers compare modulo 2^16 (``seqno_newer``).

Feasibility (RFC 8966 section 2.4/3.5.1) is what keeps routing loop-free at every
instant, not just after convergence. For each source (prefix, router id) a
router remembers its *feasibility distance* FD = (seqno, metric): the best it
ever advertised (a newer seqno resets it). An advertisement (s, m) from a
neighbour is feasible when s is newer than FD's seqno, or equal and m < FD's
metric; retractions are always feasible. Since a neighbour's FD is at most
what it advertised to us and never grows, every hop X -> Y in use has
FD(Y) < FD(X), and a cycle would need FD(X) < FD(X). Three things protect this
across time: FD entries outlive every route built on them (``source_gc_ms``);
a router that starts (or restarts: its FDs are gone) selects no route for
``hold_time_ms``, by when every neighbour has either forgotten it or heard its
Hellos, and those Hellos carry RetractAll ("forget what I told you") until the
neighbour's IHU proves it heard one; and an unfeasible update for the selected
route from the same origin is not applied (section 3.5.4): the old, feasible
values stay, and a seqno request goes out.

Starvation and suboptimal routes are cured by sequence numbers: when a
neighbour offers a route that is unfeasible but better than what we have (or we
have nothing), we send a seqno request for FD's seqno + 1 to that neighbour.
Each router on the way answers with its own update if its route is new enough,
or forwards the request along its selected route (hop count, no return to
sender, duplicates suppressed); the origin raises its seqno to the one
requested and advertises. Newer seqnos are feasible everywhere, so the better
route can be taken. Requests are resent (``request_resends``, every
``request_timeout_ms``) while still wanted, and the wish is re-checked at each
periodic update, so a lost request only delays.

Updates. A router advertises its own prefixes (metric 0) and its selected
routes: a full dump to a neighbour when it becomes REACHABLE and to all every
``update_interval_ms``; a triggered update of a prefix to all when its selected
route changes link, seqno or origin, appears, goes, or its metric moves by more
than the cost hysteresis (smaller moves wait for the periodic update: on a
loaded machine, RTT noise otherwise rippled through the mesh as a storm of
updates, each carrying IHUs that moved costs again). To the neighbour that is its
next hop it advertises the route as retracted (poison reverse). Losing a route
advertises a retraction (metric INFINITY), repeated in full dumps for one
route-expiry time, so a lost packet cannot leave a stale route for long.
Entries expire after 3.5 times the update interval they were announced with
(checked every half update interval); sources no route uses any more are
forgotten after ``source_gc_ms``.

Wire format (one UDP datagram on the link, at most ``MAX_PACKET`` bytes, so it
fits a 1280-byte IPv6 MTU with the IPv6 and UDP headers)::

    packet  = "MR" | version:u8 (1) | flags:u8 (0) | body_len:u16 | TLV*
    TLV     = type:u8 | len:u8 | body
    HELLO        1  interval_cs:u16 | timestamp_ms:u32
    IHU          2  origin_ms:u32 | held_ms:u16
    UPDATE       3  interval_cs:u16 | seqno:u16 | metric:u16 | router_id:16 | plen:u8 | prefix
    SEQNO_REQ    4  seqno:u16 | hop_count:u8 | router_id:16 | plen:u8 | prefix
    RETRACT_ALL  5  (empty)

``prefix`` is the first ceil(plen/8) bytes of the network, host bits zero.
Unknown TLV types below 128 are skipped (room to grow within a version);
unknown types from 128 up, any bad length, value or trailing byte make the
whole packet invalid. ``decode_packet`` raises nothing but
``RoutingCodecError``; the router counts it and drops the packet. Packets carry
no signature: mesh links are WireGuard tunnels, so every packet already comes
authenticated from the one neighbour on that interface (Babel over a secured
link, as RFC 8966 section 6 suggests).

Neighbour states (one table)::

    state      event                                        next       actions
    (none)     link_up                                      WAITING    Hello + RetractAll
    WAITING    Hello heard (at most once an interval)       WAITING    Hello + IHU at once
    WAITING    Hello heard, and an IHU echoing a Hello      REACHABLE  full dump to it
               sent since link_up, both within hold time
    REACHABLE  no Hello or no IHU for hold time             LOST       NeighbourLost, drop routes
    LOST       Hello and fresh IHU again                    REACHABLE  full dump to it
    any        link_down                                    (none)     drop its routes, no action
    any        packet that does not decode                  same       counted, dropped

Per prefix: a selected route changes only by re-selection among feasible
entries of REACHABLE neighbours; any change emits a triggered update and
``RoutesChanged``.
"""

from __future__ import annotations

import collections
import enum
import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from meshvpn.errors import RemoteError

IPv6Address = ipaddress.IPv6Address
IPv6Network = ipaddress.IPv6Network

INFINITY: Final = 0xFFFF
SEQNO_MOD: Final = 1 << 16
TS_MASK: Final = (1 << 32) - 1
MAX_PACKET: Final = 1280 - 40 - 8  # IPv6 minimum MTU less the IPv6 and UDP headers
MAX_RTT_SAMPLE_MS: Final = 60_000

MAGIC: Final = b"MR"
VERSION: Final = 1
_HEADER: Final = struct.Struct("!2sBBH")
_TLV: Final = struct.Struct("!BB")
_HELLO: Final = struct.Struct("!HI")
_IHU: Final = struct.Struct("!IH")
_UPDATE: Final = struct.Struct("!HHH16sB")
_REQUEST: Final = struct.Struct("!HB16sB")
T_HELLO: Final = 1
T_IHU: Final = 2
T_UPDATE: Final = 3
T_SEQNO_REQUEST: Final = 4
T_RETRACT_ALL: Final = 5
MANDATORY: Final = 0x80  # unknown TLV types with this bit make the packet invalid


class RoutingCodecError(RemoteError):
    """A neighbour sent bytes that are not a valid routing packet."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"bad routing packet: {reason}")
        self.reason = reason


def seqno_newer(a: int, b: int) -> bool:
    """``a`` is newer than ``b`` modulo 2^16 (RFC 8966 section 3.2.1)."""
    return 0 < (a - b) % SEQNO_MOD < SEQNO_MOD // 2


def _check_u(name: str, value: int, bits: int) -> None:
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{name} {value} out of range for u{bits}")


# ---- TLVs and the codec -----------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    interval_cs: int  # the sender's hello interval, centiseconds
    timestamp: int  # sender's now_ms mod 2^32

    def __post_init__(self) -> None:
        _check_u("interval", self.interval_cs, 16)
        _check_u("timestamp", self.timestamp, 32)
        if self.interval_cs == 0:
            raise ValueError("hello interval 0")


@dataclass(frozen=True)
class Ihu:
    origin: int  # the timestamp of the last Hello heard from the receiver
    held_ms: int  # how long ago it was heard

    def __post_init__(self) -> None:
        _check_u("origin", self.origin, 32)
        _check_u("held", self.held_ms, 16)


@dataclass(frozen=True)
class Update:
    prefix: IPv6Network
    router_id: IPv6Address
    seqno: int
    metric: int  # INFINITY: retraction
    interval_cs: int  # the sender's update interval, centiseconds

    def __post_init__(self) -> None:
        _check_u("seqno", self.seqno, 16)
        _check_u("metric", self.metric, 16)
        _check_u("interval", self.interval_cs, 16)
        if self.interval_cs == 0:
            raise ValueError("update interval 0")


@dataclass(frozen=True)
class SeqnoRequest:
    prefix: IPv6Network
    router_id: IPv6Address
    seqno: int
    hop_count: int

    def __post_init__(self) -> None:
        _check_u("seqno", self.seqno, 16)
        _check_u("hop count", self.hop_count, 8)
        if self.hop_count == 0:
            raise ValueError("hop count 0")


@dataclass(frozen=True)
class RetractAll:
    """Forget every route learnt from the sender on this link (it restarted)."""


Tlv = Hello | Ihu | Update | SeqnoRequest | RetractAll


def _prefix_bytes(prefix: IPv6Network) -> bytes:
    return bytes([prefix.prefixlen]) + prefix.network_address.packed[: (prefix.prefixlen + 7) // 8]


def _encode_tlv(tlv: Tlv) -> bytes:
    if isinstance(tlv, Hello):
        kind, body = T_HELLO, _HELLO.pack(tlv.interval_cs, tlv.timestamp)
    elif isinstance(tlv, Ihu):
        kind, body = T_IHU, _IHU.pack(tlv.origin, tlv.held_ms)
    elif isinstance(tlv, Update):
        head = _UPDATE.pack(tlv.interval_cs, tlv.seqno, tlv.metric, tlv.router_id.packed, 0)
        kind, body = T_UPDATE, head[:-1] + _prefix_bytes(tlv.prefix)
    elif isinstance(tlv, SeqnoRequest):
        head = _REQUEST.pack(tlv.seqno, tlv.hop_count, tlv.router_id.packed, 0)
        kind, body = T_SEQNO_REQUEST, head[:-1] + _prefix_bytes(tlv.prefix)
    else:
        kind, body = T_RETRACT_ALL, b""
    return _TLV.pack(kind, len(body)) + body


def encode_packet(tlvs: Iterable[Tlv]) -> bytes:
    """One packet; ``ValueError`` if it would exceed ``MAX_PACKET`` (use ``pack``)."""
    body = b"".join(_encode_tlv(t) for t in tlvs)
    if _HEADER.size + len(body) > MAX_PACKET:
        raise ValueError(f"routing packet of {_HEADER.size + len(body)} bytes > {MAX_PACKET}")
    return _HEADER.pack(MAGIC, VERSION, 0, len(body)) + body


def pack(body: Sequence[Tlv], first: Sequence[Tlv] = (), every: Sequence[Tlv] = ()) -> list[bytes]:
    """Split TLVs into packets of at most ``MAX_PACKET`` bytes, in order.

    ``first`` heads the first packet, ``every`` heads each one (after ``first``).
    """
    head = [_encode_tlv(t) for t in first]
    each = [_encode_tlv(t) for t in every]
    budget = MAX_PACKET - _HEADER.size
    packets: list[bytes] = []
    current = head + each
    size = sum(map(len, current))
    fresh = True  # nothing but heads in ``current``
    for tlv in body:
        raw = _encode_tlv(tlv)
        if size + len(raw) > budget and not fresh:
            packets.append(b"".join(current))
            current, size = list(each), sum(map(len, each))
        current.append(raw)
        size += len(raw)
        fresh = False
    if current:
        packets.append(b"".join(current))
    return [_HEADER.pack(MAGIC, VERSION, 0, len(p)) + p for p in packets]


# Building ipaddress objects costs more than the rest of decoding: the few hundred
# distinct prefixes and router ids of a mesh are made once and reused.
_PREFIXES: dict[bytes, IPv6Network] = {}
_ADDRESSES: dict[bytes, IPv6Address] = {}
_CACHE_MAX: Final = 1 << 16


def _decode_prefix(raw: bytes) -> IPv6Network:
    cached = _PREFIXES.get(raw)
    if cached is not None:
        return cached
    plen = raw[0]
    if plen > 128:
        raise RoutingCodecError("prefix length")
    if len(raw) != 1 + (plen + 7) // 8:
        raise RoutingCodecError("prefix size")
    try:
        prefix = IPv6Network((raw[1:].ljust(16, b"\0"), plen))
    except ValueError:
        raise RoutingCodecError("prefix host bits set") from None
    if len(_PREFIXES) >= _CACHE_MAX:
        _PREFIXES.clear()
    _PREFIXES[raw] = prefix
    return prefix


def _decode_address(raw: bytes) -> IPv6Address:
    cached = _ADDRESSES.get(raw)
    if cached is None:
        if len(_ADDRESSES) >= _CACHE_MAX:
            _ADDRESSES.clear()
        cached = _ADDRESSES[raw] = IPv6Address(raw)
    return cached


def decode_packet(data: bytes) -> tuple[Tlv, ...]:
    """Parse one packet. Raises only ``RoutingCodecError``."""
    if len(data) > MAX_PACKET:
        raise RoutingCodecError("too long")
    if len(data) < _HEADER.size:
        raise RoutingCodecError("truncated header")
    magic, version, flags, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise RoutingCodecError("magic")
    if version != VERSION:
        raise RoutingCodecError(f"version {version}")
    if flags != 0:
        raise RoutingCodecError("flags")
    if length != len(data) - _HEADER.size:
        raise RoutingCodecError("length")
    out: list[Tlv] = []
    pos = _HEADER.size
    while pos < len(data):
        if pos + _TLV.size > len(data):
            raise RoutingCodecError("truncated tlv")
        kind, size = _TLV.unpack_from(data, pos)
        pos += _TLV.size
        body = data[pos : pos + size]
        if len(body) != size:
            raise RoutingCodecError("truncated tlv body")
        pos += size
        try:
            tlv = _decode_tlv(kind, body)
        except (ValueError, struct.error):
            raise RoutingCodecError("bad tlv value") from None
        if tlv is not None:
            out.append(tlv)
    return tuple(out)


def _decode_tlv(kind: int, body: bytes) -> Tlv | None:
    if kind == T_HELLO:
        if len(body) != _HELLO.size:
            raise RoutingCodecError("hello size")
        return Hello(*_HELLO.unpack(body))
    if kind == T_IHU:
        if len(body) != _IHU.size:
            raise RoutingCodecError("ihu size")
        return Ihu(*_IHU.unpack(body))
    if kind == T_UPDATE:
        fixed = _UPDATE.size - 1
        if len(body) < _UPDATE.size:
            raise RoutingCodecError("update size")
        interval, seqno, metric, rid, _ = _UPDATE.unpack_from(body)
        prefix = _decode_prefix(body[fixed:])
        return Update(prefix, _decode_address(rid), seqno, metric, interval)
    if kind == T_SEQNO_REQUEST:
        fixed = _REQUEST.size - 1
        if len(body) < _REQUEST.size:
            raise RoutingCodecError("request size")
        seqno, hops, rid, _ = _REQUEST.unpack_from(body)
        prefix = _decode_prefix(body[fixed:])
        return SeqnoRequest(prefix, _decode_address(rid), seqno, hops)
    if kind == T_RETRACT_ALL:
        if body:
            raise RoutingCodecError("retract-all size")
        return RetractAll()
    if kind & MANDATORY:
        raise RoutingCodecError(f"unknown mandatory tlv {kind}")
    return None


# ---- what the adapter sees --------------------------------------------------------


@dataclass(frozen=True)
class RoutingParams:
    """Timers and costs. The defaults aim at traffic flowing again within 5 s of a
    relay's death: a silent neighbour is declared lost 3 s after its last Hello
    (6 missed Hellos at 0.5 s), and the routes around it follow within a few
    link round trips (a triggered retraction, at worst a seqno request to the
    origin and its answer). Periodic full updates every 4 s repair anything lost
    on the way; entries live 14 s. The hold time was 1.75 s: on a host loaded
    to a run queue of dozens (30 lab relays, 150 wireguard-go, on 2 cores) a
    Hello's four wake-ups (agent, wireguard-go, wireguard-go, agent) took that
    long often enough that healthy neighbours were lost every second
    somewhere in the mesh, and each loss cost the whole mesh updates."""

    hello_interval_ms: int = 500
    hold_time_ms: int = 3000
    update_interval_ms: int = 4000
    request_timeout_ms: int = 1000
    request_resends: int = 3
    request_hops: int = 64
    source_gc_ms: int = 180_000
    base_cost: int = 10
    max_rtt_cost: int = 1000
    cost_hysteresis_pct: int = 10
    cost_hysteresis_min: int = 5
    rtt_smoothing: int = 8  # EWMA weight 1/n
    max_prefixes: int = 10_000

    def __post_init__(self) -> None:
        if self.hello_interval_ms < 10 or self.hello_interval_ms % 10:
            raise ValueError("hello_interval_ms: a multiple of 10, at least 10")
        if self.update_interval_ms < 10 or self.update_interval_ms % 10:
            raise ValueError("update_interval_ms: a multiple of 10, at least 10")
        if max(self.hello_interval_ms, self.update_interval_ms) // 10 >= 1 << 16:
            raise ValueError("intervals must fit 16 bits of centiseconds")
        if self.hold_time_ms < 2 * self.hello_interval_ms:
            raise ValueError("hold_time_ms must cover at least two hello intervals")
        if not 1 <= self.request_hops <= 255:
            raise ValueError("request_hops: 1..255")
        if self.source_gc_ms < 4 * self.update_interval_ms:
            raise ValueError("source_gc_ms must outlive route expiry (3.5 update intervals)")
        if self.base_cost < 1 or self.max_rtt_cost < 0 or self.rtt_smoothing < 1:
            raise ValueError("base_cost >= 1, max_rtt_cost >= 0, rtt_smoothing >= 1")
        if self.base_cost + self.max_rtt_cost >= INFINITY:
            raise ValueError("a link cost must stay below INFINITY")


class NeighbourState(enum.Enum):
    WAITING = "waiting"  # link up, two-way contact not (yet) made
    REACHABLE = "reachable"
    LOST = "lost"  # was reachable, then silent past the hold time


@dataclass(frozen=True)
class Neighbour:
    link: str
    neighbour: IPv6Address
    state: NeighbourState
    rtt_ms: float | None  # smoothed
    cost: int  # INFINITY unless REACHABLE
    last_heard_ms: int | None


@dataclass(frozen=True)
class Route:
    prefix: IPv6Network
    link: str
    next_hop: IPv6Address
    metric: int
    seqno: int
    router_id: IPv6Address


@dataclass(frozen=True)
class Send:
    link: str
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class RoutesChanged:
    """``table()`` differs from what it was at the last ``RoutesChanged``."""


@dataclass(frozen=True)
class NeighbourLost:
    link: str


Action = Send | RoutesChanged | NeighbourLost


# ---- internal state ---------------------------------------------------------------


@dataclass
class _Neighbour:
    link: str
    address: IPv6Address
    state: NeighbourState
    floor_ts: int  # our timestamp at link_up: IHUs echoing older Hellos are stale
    last_heard_ms: int | None = None
    last_hello_ms: int | None = None
    their_ts: int = 0
    their_interval_ms: int = 0
    last_ihu_ms: int | None = None
    srtt_ms: float | None = None
    cost: int = INFINITY  # from srtt, with hysteresis; used only while REACHABLE
    replied_ms: int | None = None  # last Hello sent in answer to one, while not REACHABLE
    sampled_ts: int | None = None  # our Hello timestamp the last RTT sample echoed


@dataclass
class _Entry:
    router_id: IPv6Address
    seqno: int
    metric: int  # as advertised, finite
    expires_ms: int
    stale: bool = False  # an unfeasible update for it was not applied


@dataclass
class _Source:
    seqno: int
    metric: int
    refreshed_ms: int


@dataclass
class _Pending:
    seqno: int
    resends_left: int
    next_ms: int
    asked: set[str] = field(default_factory=set)  # since the last (re)send


@dataclass
class _Retraction:
    router_id: IPv6Address
    seqno: int
    until_ms: int


SourceKey = tuple[IPv6Network, IPv6Address]


class Router:
    """One node's routing state. Feed it events, carry out the actions it returns."""

    def __init__(
        self,
        self_id: IPv6Address,
        prefixes: Sequence[IPv6Network],
        now_ms: int,
        params: RoutingParams = RoutingParams(),  # frozen: sharing the default is safe
    ) -> None:
        self.self_id = self_id
        self.prefixes = tuple(prefixes)
        self.params = params
        self.counters: collections.Counter[str] = collections.Counter()
        # Likely newer than what a previous run of this node advertised; seqno
        # requests from neighbours raise it where it is not.
        self.seqno = (now_ms // 1000) % SEQNO_MOD
        self._own = frozenset(self.prefixes)
        self._neighbours: dict[str, _Neighbour] = {}
        self._entries: dict[IPv6Network, dict[str, _Entry]] = {}
        self._routes: dict[IPv6Network, Route] = {}
        self._sources: dict[SourceKey, _Source] = {}
        self._retracted: dict[IPv6Network, _Retraction] = {}
        self._pending: dict[SourceKey, _Pending] = {}
        self._forwarded: dict[tuple[IPv6Network, IPv6Address, int, str], int] = {}
        self._selecting_from_ms = now_ms + params.hold_time_ms
        self._holding = True
        self._next_hello_ms = now_ms
        self._next_update_ms = now_ms + params.update_interval_ms
        self._next_housekeeping_ms = now_ms + params.update_interval_ms // 2
        self._next_source_gc_ms = now_ms + params.source_gc_ms // 4
        self._clear_outbox()

    # -- inputs ---------------------------------------------------------------------

    def link_up(self, link: str, neighbour: IPv6Address, now_ms: int) -> list[Action]:
        """A link to ``neighbour`` exists (again). Restarts it if it was up."""
        if link in self._neighbours:
            self._drop_link(link, now_ms)
        self._neighbours[link] = _Neighbour(
            link, neighbour, NeighbourState.WAITING, floor_ts=now_ms & TS_MASK
        )
        self._hello_links.add(link)
        return self._flush(now_ms)

    def link_down(self, link: str, now_ms: int) -> list[Action]:
        """The link is gone; its routes go with it (no ``NeighbourLost``)."""
        if link in self._neighbours:
            self._drop_link(link, now_ms)
        return self._flush(now_ms)

    def receive(self, link: str, data: bytes, now_ms: int) -> list[Action]:
        """A routing packet from ``link``'s neighbour. Bad input is counted, never raised."""
        nb = self._neighbours.get(link)
        if nb is None:
            self.counters["unknown_link"] += 1
            return []
        try:
            tlvs = decode_packet(data)
        except RoutingCodecError as exc:
            self.counters["malformed"] += 1
            self.counters[f"malformed:{exc.reason.split()[0]}"] += 1
            return []
        self.counters["packets_received"] += 1
        nb.last_heard_ms = now_ms
        for tlv in tlvs:
            if isinstance(tlv, Hello):
                nb.last_hello_ms = now_ms
                nb.their_ts = tlv.timestamp
                nb.their_interval_ms = tlv.interval_cs * 10
                self._refresh(nb, now_ms)
                if nb.state is not NeighbourState.REACHABLE and (
                    nb.replied_ms is None or now_ms - nb.replied_ms >= self.params.hello_interval_ms
                ):
                    # Answer at once rather than at our next Hello: a new link is
                    # usable one round trip after both ends are up.
                    nb.replied_ms = now_ms
                    self._hello_links.add(link)
            elif isinstance(tlv, Ihu):
                self._on_ihu(nb, tlv, now_ms)
                self._refresh(nb, now_ms)
            elif nb.state is not NeighbourState.REACHABLE:
                self.counters["ignored_not_reachable"] += 1
            elif isinstance(tlv, RetractAll):
                self._drop_entries(link, now_ms)
            elif isinstance(tlv, Update):
                self._on_update(nb, tlv, now_ms)
            else:
                self._on_request(nb, tlv, now_ms)
        return self._flush(now_ms)

    def tick(self, now_ms: int) -> list[Action]:
        """Run every timer that is due."""
        p = self.params
        for nb in list(self._neighbours.values()):
            if nb.state is NeighbourState.REACHABLE and not self._alive(nb, now_ms):
                nb.state = NeighbourState.LOST
                self.counters["neighbours_lost"] += 1
                self._lost.append(nb.link)
                self._drop_entries(nb.link, now_ms)
        if self._holding and now_ms >= self._selecting_from_ms:
            self._holding = False
            for prefix in list(self._entries):
                self._reselect(prefix, now_ms)
        if now_ms >= self._next_hello_ms:
            self._next_hello_ms = now_ms + p.hello_interval_ms
            self._hello_links.update(self._neighbours)
        if now_ms >= self._next_housekeeping_ms:
            self._next_housekeeping_ms = now_ms + p.update_interval_ms // 2
            self._housekeeping(now_ms)
        if now_ms >= self._next_update_ms:
            self._next_update_ms = now_ms + p.update_interval_ms
            self._dump_links.update(self._reachable())
            for prefix in list(self._entries):
                self._want_requests(prefix, now_ms)  # a lost request must not stall us
        for key, pend in list(self._pending.items()):
            if now_ms >= pend.next_ms:
                self._resend(key, pend, now_ms)
        return self._flush(now_ms)

    def next_timer_ms(self) -> int | None:
        """When ``tick`` should next be called."""
        when = min(self._next_hello_ms, self._next_update_ms, self._next_housekeeping_ms)
        if self._holding:
            when = min(when, self._selecting_from_ms)
        for nb in self._neighbours.values():
            if nb.state is NeighbourState.REACHABLE:
                when = min(when, self._dies_at(nb))
        for pend in self._pending.values():
            when = min(when, pend.next_ms)
        return when

    # -- outputs ----------------------------------------------------------------------

    def table(self) -> dict[IPv6Network, Route]:
        """Selected routes, one per prefix; own prefixes are not in it."""
        return dict(self._routes)

    def neighbours(self) -> dict[str, Neighbour]:
        return {
            link: Neighbour(
                link,
                nb.address,
                nb.state,
                nb.srtt_ms,
                nb.cost if nb.state is NeighbourState.REACHABLE else INFINITY,
                nb.last_heard_ms,
            )
            for link, nb in self._neighbours.items()
        }

    # -- neighbours ---------------------------------------------------------------------

    def _hold_ms(self, nb: _Neighbour) -> int:
        return max(self.params.hold_time_ms, nb.their_interval_ms * 7 // 2)

    def _dies_at(self, nb: _Neighbour) -> int:
        if nb.last_hello_ms is None or nb.last_ihu_ms is None:
            return 0
        return min(nb.last_hello_ms, nb.last_ihu_ms) + self._hold_ms(nb)

    def _alive(self, nb: _Neighbour, now_ms: int) -> bool:
        return nb.srtt_ms is not None and now_ms < self._dies_at(nb)

    def _refresh(self, nb: _Neighbour, now_ms: int) -> None:
        if nb.state is not NeighbourState.REACHABLE and self._alive(nb, now_ms):
            nb.state = NeighbourState.REACHABLE
            self.counters["neighbours_reachable"] += 1
            self._dump_links.add(nb.link)

    def _reachable(self) -> list[str]:
        return [
            link for link, nb in self._neighbours.items() if nb.state is NeighbourState.REACHABLE
        ]

    def _on_ihu(self, nb: _Neighbour, ihu: Ihu, now_ms: int) -> None:
        elapsed = (now_ms - ihu.origin) & TS_MASK
        if elapsed >= 1 << 31 or (ihu.origin - nb.floor_ts) & TS_MASK >= 1 << 31:
            self.counters["ihu_stale"] += 1  # echoes a Hello from before this link came up
            return
        sample = elapsed - ihu.held_ms
        if not 0 <= sample <= MAX_RTT_SAMPLE_MS:
            self.counters["rtt_implausible"] += 1
            return
        nb.last_ihu_ms = now_ms
        if ihu.origin == nb.sampled_ts:
            return  # the same Hello echoed again (every packet carries an IHU): one sample
        nb.sampled_ts = ihu.origin
        p = self.params
        if nb.srtt_ms is None:
            nb.srtt_ms = float(sample)
        else:
            nb.srtt_ms += (sample - nb.srtt_ms) / p.rtt_smoothing
        target = p.base_cost + min(round(nb.srtt_ms), p.max_rtt_cost)
        if nb.cost == INFINITY:
            nb.cost = target
            return
        if abs(target - nb.cost) > max(
            p.cost_hysteresis_min, nb.cost * p.cost_hysteresis_pct // 100
        ):
            nb.cost = target
            self.counters["cost_changes"] += 1
            if nb.state is NeighbourState.REACHABLE:
                for prefix, entries in list(self._entries.items()):
                    if nb.link in entries:
                        self._reselect(prefix, now_ms)

    def _drop_link(self, link: str, now_ms: int) -> None:
        del self._neighbours[link]
        self._drop_entries(link, now_ms)
        self._hello_links.discard(link)
        self._dump_links.discard(link)

    def _drop_entries(self, link: str, now_ms: int) -> None:
        for prefix, entries in list(self._entries.items()):
            if entries.pop(link, None) is not None:
                if not entries:
                    del self._entries[prefix]
                self._reselect(prefix, now_ms)

    # -- routes -------------------------------------------------------------------------

    def _feasible(self, prefix: IPv6Network, rid: IPv6Address, seqno: int, metric: int) -> bool:
        if metric >= INFINITY:
            return True
        src = self._sources.get((prefix, rid))
        if src is None:
            return True
        return seqno_newer(seqno, src.seqno) or (seqno == src.seqno and metric < src.metric)

    def _on_update(self, nb: _Neighbour, update: Update, now_ms: int) -> None:
        prefix, link = update.prefix, nb.link
        self.counters["updates_received"] += 1
        if prefix in self._own:
            return  # our own prefix, echoed back (mostly poisoned)
        entries = self._entries.get(prefix)
        if update.metric >= INFINITY:
            if entries is not None and entries.pop(link, None) is not None:
                if not entries:
                    del self._entries[prefix]
                self._reselect(prefix, now_ms)
            return
        if entries is None:
            if len(self._entries) >= self.params.max_prefixes:
                self.counters["table_full"] += 1
                return
            entries = self._entries[prefix] = {}
        expires = now_ms + update.interval_cs * 10 * 7 // 2
        old = entries.get(link)
        if (
            old is not None
            and not old.stale
            and (old.router_id, old.seqno, old.metric)
            == (update.router_id, update.seqno, update.metric)
        ):
            old.expires_ms = expires  # a periodic refresh: nothing to decide
            return
        route = self._routes.get(prefix)
        feasible = self._feasible(prefix, update.router_id, update.seqno, update.metric)
        if (
            not feasible
            and old is not None
            and route is not None
            and route.link == link
            and old.router_id == update.router_id
        ):
            # RFC 8966 section 3.5.4: keep the selected route's old, feasible values and
            # ask the origin for a newer seqno, rather than starve in the meantime.
            old.expires_ms = expires
            old.stale = True
            self.counters["unfeasible_kept"] += 1
            self._want_requests(prefix, now_ms)
            return
        if not feasible:
            self.counters["unfeasible"] += 1
        entries[link] = _Entry(update.router_id, update.seqno, update.metric, expires)
        key = (prefix, update.router_id)
        pend = self._pending.get(key)
        if pend is not None and not seqno_newer(pend.seqno, update.seqno):
            del self._pending[key]
        self._reselect(prefix, now_ms)

    def _best(self, prefix: IPv6Network) -> Route | None:
        if self._holding:
            return None
        current = self._routes.get(prefix)
        best: tuple[int, int, str] | None = None
        chosen: tuple[str, _Entry] | None = None
        for link, entry in self._entries.get(prefix, {}).items():
            nb = self._neighbours[link]
            if nb.state is not NeighbourState.REACHABLE:
                continue
            metric = entry.metric + nb.cost
            if metric >= INFINITY:
                continue
            if not self._feasible(prefix, entry.router_id, entry.seqno, entry.metric):
                continue
            rank = (metric, 0 if current is not None and current.link == link else 1, link)
            if best is None or rank < best:
                best, chosen = rank, (link, entry)
        if best is None or chosen is None:
            return None
        link, entry = chosen
        nexthop = self._neighbours[link].address
        return Route(prefix, link, nexthop, best[0], entry.seqno, entry.router_id)

    def _reselect(self, prefix: IPv6Network, now_ms: int) -> None:
        old = self._routes.get(prefix)
        new = self._best(prefix)
        if new == old:
            self._want_requests(prefix, now_ms)
            return
        self._table_changed = True
        if old is None or new is None or self._significant(old, new):
            self._dirty[prefix] = None
        if new is None:
            del self._routes[prefix]
            if old is not None:
                expiry = self.params.update_interval_ms * 7 // 2
                self._retracted[prefix] = _Retraction(old.router_id, old.seqno, now_ms + expiry)
        else:
            self._routes[prefix] = new
            self._retracted.pop(prefix, None)
        self._want_requests(prefix, now_ms)

    def _significant(self, old: Route, new: Route) -> bool:
        """Is this change of a selected route worth a triggered update? A new next hop,
        origin or seqno is; a metric that only moved within the cost hysteresis is not
        (the periodic update carries it). Else every RTT wobble on one link would ripple
        through the whole mesh as updates, each carrying IHUs that wobble costs again."""
        if (old.link, old.router_id, old.seqno) != (new.link, new.router_id, new.seqno):
            return True
        p = self.params
        return abs(new.metric - old.metric) > max(
            p.cost_hysteresis_min, old.metric * p.cost_hysteresis_pct // 100
        )

    def _housekeeping(self, now_ms: int) -> None:
        for prefix, entries in list(self._entries.items()):
            expired = [link for link, e in entries.items() if e.expires_ms <= now_ms]
            for link in expired:
                del entries[link]
                self.counters["entries_expired"] += 1
            if not entries:
                del self._entries[prefix]
            if expired:
                self._reselect(prefix, now_ms)
        for prefix, ret in list(self._retracted.items()):
            if ret.until_ms <= now_ms:
                del self._retracted[prefix]
        for fkey, until in list(self._forwarded.items()):
            if until <= now_ms:
                del self._forwarded[fkey]
        if now_ms < self._next_source_gc_ms:
            return
        self._next_source_gc_ms = now_ms + self.params.source_gc_ms // 4
        in_use = {(r.prefix, r.router_id) for r in self._routes.values()}
        in_use.update(
            (prefix, e.router_id)
            for prefix, entries in self._entries.items()
            for e in entries.values()
        )
        for skey, src in list(self._sources.items()):
            if skey not in in_use and now_ms - src.refreshed_ms >= self.params.source_gc_ms:
                del self._sources[skey]

    # -- seqno requests -----------------------------------------------------------------

    def _request_targets(self, prefix: IPv6Network) -> dict[IPv6Address, list[str]]:
        """Neighbours offering a better route we cannot take, by origin."""
        if self._holding:
            return {}
        route = self._routes.get(prefix)
        have = route.metric if route is not None else INFINITY
        targets: dict[IPv6Address, list[str]] = {}
        for link, entry in self._entries.get(prefix, {}).items():
            nb = self._neighbours[link]
            if nb.state is not NeighbourState.REACHABLE:
                continue
            selected_stale = route is not None and route.link == link and entry.stale
            better = entry.metric + nb.cost < have
            if selected_stale or (
                better and not self._feasible(prefix, entry.router_id, entry.seqno, entry.metric)
            ):
                targets.setdefault(entry.router_id, []).append(link)
        return targets

    def _want_requests(self, prefix: IPv6Network, now_ms: int) -> None:
        for rid, links in self._request_targets(prefix).items():
            src = self._sources.get((prefix, rid))
            if src is None:
                continue
            want = (src.seqno + 1) % SEQNO_MOD
            key = (prefix, rid)
            pend = self._pending.get(key)
            p = self.params
            if pend is None or seqno_newer(want, pend.seqno):
                pend = _Pending(want, p.request_resends, now_ms + p.request_timeout_ms)
                self._pending[key] = pend
            for link in links:
                if link not in pend.asked:  # a neighbour that offers the route only now
                    pend.asked.add(link)
                    self._requests[link].append(
                        SeqnoRequest(prefix, rid, pend.seqno, p.request_hops)
                    )
                    self.counters["requests_sent"] += 1

    def _resend(self, key: SourceKey, pend: _Pending, now_ms: int) -> None:
        prefix, rid = key
        src = self._sources.get(key)
        links = self._request_targets(prefix).get(rid, [])
        if not links or pend.resends_left <= 0:
            del self._pending[key]  # no longer wanted, or given up until the next update round
            return
        if src is not None and not seqno_newer(pend.seqno, src.seqno):
            del self._pending[key]  # we advertise that seqno already, and still want better
            self._want_requests(prefix, now_ms)
            return
        pend.resends_left -= 1
        pend.next_ms = now_ms + self.params.request_timeout_ms
        pend.asked = set(links)
        for link in links:
            self._requests[link].append(
                SeqnoRequest(prefix, rid, pend.seqno, self.params.request_hops)
            )
            self.counters["requests_resent"] += 1

    def _on_request(self, nb: _Neighbour, req: SeqnoRequest, now_ms: int) -> None:
        prefix, link = req.prefix, nb.link
        if prefix in self._own:
            if req.router_id != self.self_id:
                self.counters["requests_dropped"] += 1
            elif seqno_newer(req.seqno, self.seqno):
                self.seqno = req.seqno
                self.counters["seqno_bumps"] += 1
                self._dirty.update(dict.fromkeys(self.prefixes))
            else:
                self._unicast[link][prefix] = None
            return
        route = self._routes.get(prefix)
        if route is None or route.router_id != req.router_id:
            self.counters["requests_dropped"] += 1
        elif not seqno_newer(req.seqno, route.seqno):
            self.counters["requests_answered"] += 1
            self._unicast[link][prefix] = None
        elif req.hop_count <= 1 or route.link == link:
            self.counters["requests_dropped"] += 1
        elif self._forwarded.get((prefix, req.router_id, req.seqno, route.link), 0) > now_ms:
            self.counters["requests_duplicate"] += 1
        else:
            # Suppress duplicates per next hop only: if our route moved (say, away from a
            # relay that just died), the request must go out again along the new one.
            self._forwarded[(prefix, req.router_id, req.seqno, route.link)] = (
                now_ms + self.params.request_timeout_ms
            )
            self.counters["requests_forwarded"] += 1
            self._requests[route.link].append(
                SeqnoRequest(prefix, req.router_id, req.seqno, req.hop_count - 1)
            )

    # -- sending ------------------------------------------------------------------------

    def _clear_outbox(self) -> None:
        self._hello_links: set[str] = set()
        self._dump_links: set[str] = set()
        # dicts as ordered sets: the same inputs give the same packets
        self._dirty: dict[IPv6Network, None] = {}
        self._unicast: collections.defaultdict[str, dict[IPv6Network, None]] = (
            collections.defaultdict(dict)
        )
        self._requests: collections.defaultdict[str, list[SeqnoRequest]] = collections.defaultdict(
            list
        )
        self._lost: list[str] = []
        self._table_changed = False

    def _update_for(self, prefix: IPv6Network, link: str, now_ms: int) -> Update | None:
        interval = self.params.update_interval_ms // 10
        if prefix in self._own:
            return Update(prefix, self.self_id, self.seqno, 0, interval)
        route = self._routes.get(prefix)
        if route is None:
            ret = self._retracted.get(prefix)
            if ret is None:
                return None
            return Update(prefix, ret.router_id, ret.seqno, INFINITY, interval)
        if route.link == link:  # poison reverse to our next hop
            return Update(prefix, route.router_id, route.seqno, INFINITY, interval)
        key = (prefix, route.router_id)
        src = self._sources.get(key)
        if src is None or seqno_newer(route.seqno, src.seqno):
            self._sources[key] = _Source(route.seqno, route.metric, now_ms)
        else:
            if route.seqno == src.seqno and route.metric < src.metric:
                src.metric = route.metric
            src.refreshed_ms = now_ms
        return Update(prefix, route.router_id, route.seqno, route.metric, interval)

    def _flush(self, now_ms: int) -> list[Action]:
        actions: list[Action] = []
        everything: list[IPv6Network] = []
        if self._dump_links:
            everything = [*self.prefixes, *self._routes, *self._retracted]
        dirty = list(self._dirty)
        for link, nb in self._neighbours.items():
            body: list[Tlv] = []
            if nb.state is NeighbourState.REACHABLE:
                if link in self._dump_links:
                    prefixes: Iterable[IPv6Network] = everything
                else:
                    unicast = self._unicast.get(link, {})
                    prefixes = [*dirty, *(q for q in unicast if q not in self._dirty)]
                for prefix in prefixes:
                    update = self._update_for(prefix, link, now_ms)
                    if update is not None:
                        body.append(update)
                body.extend(self._requests.get(link, ()))
            hello = link in self._hello_links
            if not body and not hello:
                continue
            first: list[Tlv] = []
            if hello:
                interval = self.params.hello_interval_ms // 10
                first.append(Hello(interval, now_ms & TS_MASK))
            every: list[Tlv] = []
            if nb.last_hello_ms is not None:
                held = now_ms - nb.last_hello_ms
                if held <= min(self._hold_ms(nb), 0xFFFF):
                    every.append(Ihu(nb.their_ts, held))
            if nb.state is NeighbourState.WAITING:
                every.append(RetractAll())
            self.counters["updates_sent"] += sum(isinstance(t, Update) for t in body)
            for data in pack(body, first, every):
                self.counters["packets_sent"] += 1
                actions.append(Send(link, data))
        actions.extend(NeighbourLost(link) for link in self._lost)
        if self._table_changed:
            actions.append(RoutesChanged())
        self._clear_outbox()
        return actions
