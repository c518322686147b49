"""The routing core: codec, one router's behaviour, and whole meshes in virtual time.

The mesh properties (issue #4) run on ``meshvpn.routing_sim``: random connected
topologies of up to 12 nodes with random link delays (so random measured
costs), random cuts, link downs, node deaths and restarts, random loss. At
every table change no forwarding loop may exist; after the chaos, with loss
off, the tables must settle on shortest paths of the graph as it then is, and
no live node may keep a route to a dead or unreachable node's prefix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshvpn.routing import (
    INFINITY,
    MAX_PACKET,
    Hello,
    Ihu,
    NeighbourLost,
    NeighbourState,
    RetractAll,
    Router,
    RoutesChanged,
    RoutingCodecError,
    RoutingParams,
    Send,
    SeqnoRequest,
    Tlv,
    Update,
    decode_packet,
    encode_packet,
    pack,
    seqno_newer,
)
from meshvpn.routing_sim import (
    START_MS,
    Simulation,
    find_loop,
    node_address,
    node_prefix,
    routing_errors,
)

# ---- codec --------------------------------------------------------------------------

addresses = st.integers(0, (1 << 128) - 1).map(ipaddress.IPv6Address)


@st.composite
def prefixes(draw: st.DrawFn) -> ipaddress.IPv6Network:
    plen = draw(st.integers(0, 128))
    addr = draw(st.integers(0, (1 << 128) - 1))
    return ipaddress.IPv6Network((addr >> (128 - plen) << (128 - plen), plen))


u16 = st.integers(0, 0xFFFF)
tlvs: st.SearchStrategy[Tlv] = st.one_of(
    st.builds(Hello, st.integers(1, 0xFFFF), st.integers(0, (1 << 32) - 1)),
    st.builds(Ihu, st.integers(0, (1 << 32) - 1), u16),
    st.builds(Update, prefixes(), addresses, u16, u16, st.integers(1, 0xFFFF)),
    st.builds(SeqnoRequest, prefixes(), addresses, u16, st.integers(1, 255)),
    st.just(RetractAll()),
)


@given(st.lists(tlvs, max_size=30))
@settings(max_examples=300)
def test_codec_round_trips(body: list[Tlv]) -> None:
    try:
        data = encode_packet(body)
    except ValueError:
        assert sum(len(encode_packet([t])) - 6 for t in body) + 6 > MAX_PACKET
        return
    assert len(data) <= MAX_PACKET
    assert decode_packet(data) == tuple(body)


@given(st.lists(tlvs, max_size=200), st.lists(tlvs, max_size=3), st.lists(tlvs, max_size=3))
@settings(max_examples=100)
def test_pack_splits_in_order_and_fits(body: list[Tlv], first: list[Tlv], every: list[Tlv]) -> None:
    packets = [decode_packet(p) for p in pack(body, first, every)]
    if not (body or first or every):
        assert packets == []
        return
    assert all(len(p) <= MAX_PACKET for p in pack(body, first, every))
    assert packets[0][: len(first)] == tuple(first)
    rebuilt: list[Tlv] = []
    for i, tlv_seq in enumerate(packets):
        rest = tlv_seq[len(first) :] if i == 0 else tlv_seq
        assert rest[: len(every)] == tuple(every)
        rebuilt.extend(rest[len(every) :])
    assert rebuilt == body


@given(st.lists(tlvs, min_size=1, max_size=20), st.data())
@settings(max_examples=300)
def test_truncation_or_garbage_raises_only_codec_error(
    body: list[Tlv], data: st.DataObject
) -> None:
    packet = pack(body)[0]
    cut = data.draw(st.integers(0, len(packet) - 1))
    with pytest.raises(RoutingCodecError):
        decode_packet(packet[:cut])
    flipped = bytearray(packet)
    pos = data.draw(st.integers(0, len(packet) - 1))
    flipped[pos] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(RoutingCodecError):
        decode_packet(bytes(flipped))


@given(st.binary(max_size=2000))
@settings(max_examples=500)
def test_any_bytes_decode_or_raise_codec_error(data: bytes) -> None:
    with contextlib.suppress(RoutingCodecError):
        decode_packet(data)
    with contextlib.suppress(RoutingCodecError):
        decode_packet(b"MR\x01\x00" + struct.pack("!H", len(data)) + data)


def raw_packet(*tlvs: tuple[int, bytes]) -> bytes:
    body = b"".join(struct.pack("!BB", kind, len(v)) + v for kind, v in tlvs)
    return b"MR\x01\x00" + struct.pack("!H", len(body)) + body


def test_decode_rejects_what_it_must() -> None:
    good = encode_packet([Hello(50, 7)])
    update = struct.pack("!HHH16s", 1, 0, 0, bytes(16))
    cases = {
        "magic": b"XX" + good[2:],
        "version": good[:2] + b"\x02" + good[3:],
        "flags": good[:3] + b"\x01" + good[4:],
        "length": good + b"\x00",
        "too long": raw_packet(*[(0x10, bytes(200))] * 7),
        "hello size": raw_packet((1, b"\x00\x01\x02")),
        "retract-all size": raw_packet((5, b"\x00")),
        "mandatory": raw_packet((0x80, b"")),
        "plen": raw_packet((3, update + b"\x81" + bytes(17))),
        "prefix size": raw_packet((3, update + b"\x40" + bytes(7))),
        "host bits": raw_packet((3, update + b"\x07\x01")),
        "interval 0": raw_packet((1, bytes(6))),
        "hop count 0": raw_packet((4, struct.pack("!HB16s", 1, 0, bytes(16)) + b"\x00")),
        "tlv head": good + b"\x01",
    }
    for name, data in cases.items():
        with pytest.raises(RoutingCodecError):
            decode_packet(data)
            pytest.fail(name)
    # an unknown optional TLV is skipped, for growth within a version
    assert decode_packet(raw_packet((0x10, b"ab"), (5, b""))) == (RetractAll(),)


def test_seqno_comparison_is_modular() -> None:
    assert seqno_newer(1, 0)
    assert seqno_newer(0, 0xFFFF)
    assert not seqno_newer(0, 1)
    assert not seqno_newer(5, 5)
    assert seqno_newer(0x7FFF, 0)
    assert not seqno_newer(0x8000, 0)
    assert not seqno_newer(0, 0x8000)


def test_params_are_validated() -> None:
    with pytest.raises(ValueError, match="hold_time"):
        RoutingParams(hello_interval_ms=1000, hold_time_ms=1500)
    with pytest.raises(ValueError, match="multiple of 10"):
        RoutingParams(hello_interval_ms=505)


# ---- one router, by hand ----------------------------------------------------------------

A, B = node_address(1), node_address(2)


def sends(actions: list[object], link: str) -> list[tuple[Tlv, ...]]:
    return [decode_packet(a.data) for a in actions if isinstance(a, Send) and a.link == link]


def pair(delay: int = 10) -> tuple[Router, Router, int]:
    """Two routers one link apart, brought to REACHABLE by hand."""
    t = START_MS
    a = Router(A, [node_prefix(1)], t)
    b = Router(B, [node_prefix(2)], t)
    out_a = a.link_up("ab", B, t)
    out_b = b.link_up("ba", A, t)
    (hello_a,) = [x for x in out_a if isinstance(x, Send)]
    (hello_b,) = [x for x in out_b if isinstance(x, Send)]
    assert any(isinstance(t_, RetractAll) for t_ in decode_packet(hello_a.data))
    t += delay
    back_b = b.receive("ba", hello_a.data, t)  # b now echoes a's hello
    a.receive("ab", hello_b.data, t)
    assert a.neighbours()["ab"].state is NeighbourState.WAITING
    t += delay
    for act in back_b:
        if isinstance(act, Send):
            a.receive("ab", act.data, t)
    assert a.neighbours()["ab"].state is NeighbourState.REACHABLE
    assert a.neighbours()["ab"].rtt_ms == 2 * delay
    assert a.neighbours()["ab"].cost == a.params.base_cost + 2 * delay
    return a, b, t


def test_rtt_and_cost_are_measured_inside_the_protocol() -> None:
    a, _, _ = pair(delay=17)
    nb = a.neighbours()["ab"]
    assert nb.neighbour == B
    assert nb.rtt_ms == 34


def test_garbage_and_unknown_links_are_counted_never_raised() -> None:
    a, _, t = pair()
    assert a.receive("ab", b"\x00garbage", t) == []
    assert a.receive("nope", encode_packet([]), t) == []
    assert a.counters["malformed"] == 1
    assert a.counters["unknown_link"] == 1


def test_update_from_neighbour_is_routed_after_startup_hold() -> None:
    a, _, t = pair()
    prefix = ipaddress.IPv6Network("fd00:1234::/64")
    rid = ipaddress.IPv6Address("fd00:1234::1")
    upd = encode_packet([Update(prefix, rid, 5, 100, 400)])
    assert not any(isinstance(x, RoutesChanged) for x in a.receive("ab", upd, t))
    assert a.table() == {}  # still in the startup hold: no selection yet
    t = START_MS + a.params.hold_time_ms
    out = a.tick(t)
    assert RoutesChanged() in out
    route = a.table()[prefix]
    assert (route.link, route.next_hop, route.metric, route.seqno, route.router_id) == (
        "ab",
        B,
        100 + a.neighbours()["ab"].cost,
        5,
        rid,
    )
    # the triggered update goes back to the next hop as a retraction (poison reverse)
    updates = [u for p in sends(out, "ab") for u in p if isinstance(u, Update)]
    assert updates == [Update(prefix, rid, 5, INFINITY, 400)]


def test_silent_neighbour_is_lost_and_its_routes_retracted() -> None:
    a, _, t = pair()
    prefix = ipaddress.IPv6Network("fd00:1234::/64")
    a.receive("ab", encode_packet([Update(prefix, B, 5, 100, 400)]), t)
    a.tick(START_MS + a.params.hold_time_ms)
    assert prefix in a.table()
    lost_at = None
    now = t
    while lost_at is None:
        now = a.next_timer_ms() or now + 1
        out = a.tick(now)
        if NeighbourLost("ab") in out:
            lost_at = now
            assert RoutesChanged() in out
    assert lost_at - t <= a.params.hold_time_ms
    assert a.neighbours()["ab"].state is NeighbourState.LOST
    assert a.neighbours()["ab"].cost == INFINITY
    assert a.table() == {}


def test_seqno_request_makes_the_origin_raise_its_seqno() -> None:
    a, _, t = pair()
    before = a.seqno
    req = SeqnoRequest(node_prefix(1), A, (before + 3) % 65536, 10)
    out = a.receive("ab", encode_packet([req]), t)
    assert a.seqno == (before + 3) % 65536
    updates = [u for p in sends(out, "ab") for u in p if isinstance(u, Update)]
    assert Update(node_prefix(1), A, a.seqno, 0, 400) in updates


def test_restarted_neighbour_retracts_everything_it_said() -> None:
    a, _, t = pair()
    prefix = ipaddress.IPv6Network("fd00:1234::/64")
    a.receive("ab", encode_packet([Update(prefix, B, 5, 100, 400)]), t)
    a.tick(START_MS + a.params.hold_time_ms)
    assert prefix in a.table()
    b2 = Router(B, [node_prefix(2)], t)
    (hello,) = [x for x in b2.link_up("ba", A, t) if isinstance(x, Send)]
    out = a.receive("ab", hello.data, t + 1)
    assert RoutesChanged() in out
    assert a.table() == {}


def befriend(r: Router, link: str, who: ipaddress.IPv6Address, t: int, rtt: int) -> int:
    """Make ``who`` a REACHABLE neighbour of ``r`` with the given RTT, by hand."""
    r.link_up(link, who, t)
    t += rtt
    r.receive(link, encode_packet([Hello(50, t & 0xFFFFFFFF), Ihu((t - rtt) & 0xFFFFFFFF, 0)]), t)
    assert r.neighbours()[link].state is NeighbourState.REACHABLE
    return t


def test_cost_follows_smoothed_rtt_with_hysteresis() -> None:
    a = Router(A, [node_prefix(1)], START_MS)
    t = befriend(a, "ab", B, START_MS, 20)
    assert a.neighbours()["ab"].cost == 30

    def sample(rtt: int) -> None:
        nonlocal t
        t += 100
        a.receive(
            "ab", encode_packet([Hello(50, t & 0xFFFFFFFF), Ihu((t - rtt) & 0xFFFFFFFF, 0)]), t
        )

    for rtt in [24, 17, 23, 18] * 5:  # jitter: the smoothed RTT moves, the cost does not
        sample(rtt)
    assert a.neighbours()["ab"].rtt_ms != 20
    assert a.neighbours()["ab"].cost == 30
    assert a.counters["cost_changes"] == 0
    for _ in range(30):  # the path really got slower
        sample(80)
    assert a.neighbours()["ab"].cost > 80
    assert a.counters["cost_changes"] >= 1
    sample(-5 % (1 << 32))  # an echo from the future: ignored
    assert a.counters["ihu_stale"] == 1


def test_an_ihu_repeated_for_the_same_hello_is_one_rtt_sample() -> None:
    """Every packet carries an IHU; only the first echo of a Hello is a sample (else a
    burst of updates, held a while each, became a burst of RTT samples)."""
    a = Router(A, [node_prefix(1)], START_MS)
    t = befriend(a, "ab", B, START_MS, 20)
    t += 100
    origin = (t - 20) & 0xFFFFFFFF
    a.receive("ab", encode_packet([Hello(50, t & 0xFFFFFFFF), Ihu(origin, 0)]), t)
    rtt = a.neighbours()["ab"].rtt_ms
    t += 400  # the same Hello echoed again, without the wait deducted: 420 ms if sampled
    a.receive("ab", encode_packet([Ihu(origin, 0)]), t)
    assert a.neighbours()["ab"].rtt_ms == rtt
    assert a.neighbours()["ab"].last_heard_ms == t
    t += 100
    a.receive("ab", encode_packet([Ihu((t - 420) & 0xFFFFFFFF, 0)]), t)  # a new echo counts
    assert a.neighbours()["ab"].rtt_ms != rtt


def test_a_small_metric_move_waits_for_the_periodic_update() -> None:
    """A triggered update goes out for a metric moved beyond the cost hysteresis, not
    for every wobble; the table follows both."""
    a = Router(A, [node_prefix(1)], START_MS)
    t = befriend(a, "ab", B, START_MS, 20)
    t = befriend(a, "ac", node_address(3), t, 20)
    prefix, rid = ipaddress.IPv6Network("fd00:55::/64"), ipaddress.IPv6Address("fd00:55::1")
    a.receive("ab", encode_packet([Update(prefix, rid, 5, 100, 400)]), t)
    t = START_MS + a.params.hold_time_ms
    out = a.tick(t)
    assert [u.metric for p in sends(out, "ac") for u in p if isinstance(u, Update)] == [130]

    def update(metric: int) -> list[int]:
        out = a.receive("ab", encode_packet([Update(prefix, rid, 5, metric, 400)]), t)
        assert RoutesChanged() in out
        assert a.table()[prefix].metric == metric + 30
        return [u.metric for p in sends(out, "ac") for u in p if isinstance(u, Update)]

    assert update(97) == []  # 3 less: within the hysteresis
    assert update(40) == [70]  # much better: everyone hears at once


def test_feasibility_keeps_the_old_route_and_asks_for_a_new_seqno() -> None:
    """RFC 8966 3.5.4 and 3.8: an unfeasible update for the selected route is not
    applied; starvation and better-but-unfeasible routes make a seqno request."""
    prefix, rid = ipaddress.IPv6Network("fd00:77::/64"), ipaddress.IPv6Address("fd00:77::1")
    c_addr = node_address(3)
    a = Router(A, [node_prefix(1)], START_MS)
    befriend(a, "ab", B, START_MS, 10)  # cost 20
    t = befriend(a, "ac", c_addr, START_MS, 30)  # cost 40
    t = max(t, START_MS + a.params.hold_time_ms)
    a.tick(t)

    def hear(link: str, seqno: int, metric: int) -> list[tuple[Tlv, ...]]:
        out = a.receive(link, encode_packet([Update(prefix, rid, seqno, metric, 400)]), t)
        return sends(out, "ab") + sends(out, "ac")

    out = hear("ab", 5, 100)
    assert a.table()[prefix].metric == 120  # advertised to c: FD = (5, 120)
    assert Update(prefix, rid, 5, 120, 400) in [u for p in out for u in p]
    out = hear("ab", 5, 300)  # worse, same seqno: unfeasible, kept
    assert a.table()[prefix].metric == 120
    assert a.counters["unfeasible_kept"] == 1
    assert SeqnoRequest(prefix, rid, 6, 64) in [u for p in out for u in p]
    hear("ab", 5, INFINITY)  # b retracts; c offers 5/150, unfeasible (150 >= 120)
    out = a.receive("ac", encode_packet([Update(prefix, rid, 5, 150, 400)]), t)
    assert prefix not in a.table()  # starving: nothing feasible
    assert a.counters["unfeasible"] >= 1
    assert SeqnoRequest(prefix, rid, 6, 64) in [u for p in sends(out, "ac") for u in p]
    # c's newer seqno is feasible whatever its metric
    hear("ac", 6, 150)
    assert a.table()[prefix].link == "ac"
    assert a.table()[prefix].metric == 190


# ---- meshes in virtual time ---------------------------------------------------------------


def ring(n: int, seed: int = 0) -> Simulation:
    sim = Simulation(seed=seed)
    for i in range(n):
        sim.add_node(i)
    for i in range(n):
        sim.connect(i, (i + 1) % n, 3 + 7 * i % 23)
    return sim


def no_loops(sim: Simulation) -> None:
    loop = find_loop(sim)
    assert loop is None, f"forwarding loop at {sim.now_ms - START_MS} ms: {loop}"


def test_ring_of_six_heals_around_a_dead_node() -> None:
    sim = ring(6)
    sim.on_change.append(no_loops)
    assert sim.run_until_quiet(quiet_ms=20_000, limit_ms=120_000)
    assert routing_errors(sim) == []
    died = sim.now_ms
    sim.kill(3)
    assert sim.run_until_quiet(quiet_ms=20_000, limit_ms=120_000)
    assert routing_errors(sim) == []
    converged_ms = sim.last_change_ms - died
    # Virtual time, so a protocol bound: detection (hold time) plus a few
    # link round trips and, at worst, one seqno request and its answer.
    p = sim.params
    assert converged_ms <= p.hold_time_ms + p.request_timeout_ms + 1000, converged_ms
    assert {node for _, node, _ in sim.lost} == {2, 4}


def test_the_model_checks_can_fail() -> None:
    """find_loop and routing_errors see a loop and a non-shortest path we plant."""
    sim = ring(4)
    assert sim.run_until_quiet(20_000, 120_000)
    assert find_loop(sim) is None
    assert routing_errors(sim) == []
    prefix = node_prefix(0)
    r1, r2 = sim.routers[1].table()[prefix], sim.routers[2].table()[prefix]
    sim.routers[1]._routes[prefix] = dataclasses.replace(r1, link="mv2")
    sim.routers[2]._routes[prefix] = dataclasses.replace(r2, link="mv1")
    loop = find_loop(sim)
    assert loop is not None
    assert loop[0] == 0
    assert set(loop[1]) == {1, 2}
    assert routing_errors(sim)
    sim.routers[1]._routes[prefix] = dataclasses.replace(r1, metric=r1.metric + 1)
    sim.routers[2]._routes[prefix] = r2
    assert routing_errors(sim) == [f"1 -> 0: metric {r1.metric + 1}, shortest {r1.metric}"]


def test_link_cost_change_moves_traffic_to_the_shorter_path() -> None:
    """A square 0-1-2-3-0: 0 reaches 2 via 1 until that path's RTT grows."""
    sim = Simulation()
    for i in range(4):
        sim.add_node(i)
    sim.connect(0, 1, 5)
    sim.connect(1, 2, 5)
    sim.connect(2, 3, 20)
    sim.connect(3, 0, 20)
    sim.on_change.append(no_loops)
    assert sim.run_until_quiet(20_000, 120_000)
    assert sim.routers[0].table()[node_prefix(2)].link == "mv1"
    sim.links[frozenset((1, 2))].delay_ms = 60
    assert sim.run_until_quiet(20_000, 300_000)
    assert routing_errors(sim) == []
    assert sim.routers[0].table()[node_prefix(2)].link == "mv3"


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, object]:
    n = draw(st.integers(2, 12))
    delays = st.integers(1, 40)
    edges: dict[frozenset[int], int] = {}
    for i in range(1, n):  # a random spanning tree keeps it connected
        edges[frozenset((i, draw(st.integers(0, i - 1))))] = draw(delays)
    for a, b in draw(
        st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=2 * n)
    ):
        if a != b:
            edges.setdefault(frozenset((a, b)), draw(delays))
    kinds = st.sampled_from(["cut", "heal", "down", "up", "kill", "restart", "delay"])
    events = draw(
        st.lists(st.tuples(st.integers(0, 5000), kinds, st.integers(0, 10_000)), max_size=12)
    )
    return {
        "n": n,
        "edges": sorted((sorted(k), v) for k, v in edges.items()),
        "loss": draw(st.sampled_from([0.0, 0.05, 0.2, 0.4])),
        "warmup": draw(st.integers(0, 10_000)),
        "events": events,
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@given(scenarios())
@settings(
    max_examples=int(os.environ.get("MESHVPN_ROUTING_EXAMPLES", "40")),  # more for a soak
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_mesh_never_loops_and_converges_to_shortest_paths(scenario: dict[str, object]) -> None:
    n = scenario["n"]
    edges = scenario["edges"]
    events = scenario["events"]
    assert isinstance(n, int)
    assert isinstance(edges, list)
    assert isinstance(events, list)
    sim = Simulation(seed=int(str(scenario["seed"])), loss=float(str(scenario["loss"])))
    checks = 0

    def check(s: Simulation) -> None:
        nonlocal checks
        checks += 1
        no_loops(s)

    sim.on_change.append(check)
    for i in range(n):
        sim.add_node(i)
    for (a, b), delay in edges:
        sim.connect(a, b, delay)
    sim.run_for(int(str(scenario["warmup"])))
    links = [tuple(e) for e, _ in edges]
    for gap, kind, which in events:
        sim.run_for(gap)
        a, b = links[which % len(links)]
        node = which % n
        if kind == "cut":
            sim.cut(a, b)
        elif kind == "heal":
            sim.cut(a, b, cut=False)
        elif kind == "down":
            sim.set_down(a, b)
        elif kind == "up":
            sim.set_down(a, b, down=False)
        elif kind == "kill" and node in sim.routers:
            sim.kill(node)
        elif kind == "restart":
            sim.restart(node)
        elif kind == "delay":
            sim.links[frozenset((a, b))].delay_ms = 1 + which % 60
    sim.loss = 0.0
    assert sim.run_until_quiet(quiet_ms=30_000, limit_ms=600_000), "tables never settled"
    assert routing_errors(sim) == []
    assert checks >= min(1, sim.changes)
    for router in sim.routers.values():
        assert router.counters["malformed"] == 0
