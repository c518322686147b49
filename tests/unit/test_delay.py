"""The delay forwarder's pure cores against naive models, and its adapter over loopback."""

from __future__ import annotations

import asyncio
import math
import socket
from ipaddress import IPv4Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshvpn.lab.delay import DelayQueue, Forwarder, MappingTable, main

delays = st.floats(min_value=0, max_value=1000, allow_nan=False)
steps = st.floats(min_value=0, max_value=50, allow_nan=False)
# An operation: push (after dt) or pop (after dt).
ops = st.lists(st.tuples(st.sampled_from(["push", "pop"]), steps), max_size=200)


def run_monotonic(
    delay: float, limit: int, script: list[tuple[str, float]]
) -> tuple[DelayQueue[int], list[tuple[int, float]], list[tuple[int, float]], list[bool]]:
    """Drive a queue with a clock that only moves forward.

    Returns the queue, (item, push time) of every accepted push, (item, release
    time) of every release, and each push's result.
    """
    q: DelayQueue[int] = DelayQueue(delay, limit)
    now = 0.0
    pushed: list[tuple[int, float]] = []
    released: list[tuple[int, float]] = []
    results: list[bool] = []
    for n, (op, dt) in enumerate(script):
        now += dt
        if op == "push":
            ok = q.push(n, now)
            results.append(ok)
            if ok:
                pushed.append((n, now))
        else:
            released += [(item, now) for item in q.pop_due(now)]
            head = q.next_deadline()
            assert head is None or head > now  # nothing due is left behind
    return q, pushed, released, results


@given(delays, ops)
def test_fifo_never_early_nothing_lost_under_the_bound(
    delay: float, script: list[tuple[str, float]]
) -> None:
    q, pushed, released, results = run_monotonic(delay, 10_000, script)
    assert all(results)
    assert q.dropped == 0
    push_time = dict(pushed)
    for item, at in released:
        assert at >= push_time[item] + delay
    rest = q.pop_due(math.inf)
    assert len(q) == 0
    assert q.next_deadline() is None
    assert [item for item, _ in released] + rest == [item for item, _ in pushed]


@given(delays, ops)
def test_next_deadline_is_the_heads(delay: float, script: list[tuple[str, float]]) -> None:
    q, pushed, released, _ = run_monotonic(delay, 10_000, script)
    waiting = pushed[len(released) :]
    if waiting:
        assert q.next_deadline() == waiting[0][1] + delay
        assert q.pop_due(waiting[0][1] + delay)[0] == waiting[0][0]
    else:
        assert q.next_deadline() is None


@given(delays, st.integers(min_value=1, max_value=20), ops)
def test_bound_drops_and_counts(delay: float, limit: int, script: list[tuple[str, float]]) -> None:
    q, pushed, released, results = run_monotonic(delay, limit, script)
    assert q.dropped == results.count(False)
    assert len(pushed) == results.count(True)
    assert len(q) == len(pushed) - len(released) <= limit
    # What was accepted still comes out whole and in order.
    assert [i for i, _ in released] + q.pop_due(math.inf) == [i for i, _ in pushed]


@given(delays, st.lists(st.floats(min_value=0, max_value=1000, allow_nan=False), max_size=100))
def test_a_clock_going_backwards_keeps_order_and_is_never_early(
    delay: float, times: list[float]
) -> None:
    q: DelayQueue[int] = DelayQueue(delay, 10_000)
    released: list[int] = []
    for n, now in enumerate(times):
        q.push(n, now)
        for item in q.pop_due(now):
            assert now >= times[item] + delay
            released.append(item)
    released += q.pop_due(math.inf)
    assert released == list(range(len(times)))


@pytest.mark.parametrize(("delay", "limit"), [(-1, 1), (math.nan, 1), (0, 0)])
def test_queue_rejects_bad_settings(delay: float, limit: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        DelayQueue(delay, limit)


# -- the mapping table against a dict with timestamps ----------------------------------

keys = st.integers(min_value=0, max_value=6)
table_ops = st.lists(
    st.tuples(st.sampled_from(["add", "get", "expire"]), keys, steps),
    max_size=100,
)


@given(st.integers(min_value=1, max_value=4), table_ops)
def test_mapping_table_matches_a_model(limit: int, script: list[tuple[str, int, float]]) -> None:
    timeout = 30.0
    table: MappingTable[int, str] = MappingTable(timeout, limit)
    model: dict[int, float] = {}  # key -> last use
    now = 0.0
    for op, key, dt in script:
        now += dt
        if op == "add":
            ok = table.add(key, f"v{key}", now)
            assert ok == (key not in model and len(model) < limit)
            if ok:
                model[key] = now
        elif op == "get":
            got = table.get(key, now)
            assert got == (f"v{key}" if key in model else None)
            if key in model:
                model[key] = now
        else:
            idle = sorted(k for k, used in model.items() if now - used >= timeout)
            assert sorted(table.expire(now)) == [f"v{k}" for k in idle]
            for k in idle:
                del model[k]
        assert len(table) == len(model)
        assert table.full == (len(model) >= limit)
    assert sorted(table.clear()) == sorted(f"v{k}" for k in model)
    assert len(table) == 0


# -- the adapter, over loopback (no root, no lab) --------------------------------------


def _udp(bind: tuple[str, int] = ("127.0.0.1", 0)) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(bind)
    s.setblocking(False)  # noqa: FBT003 - the stdlib signature
    return s


async def _recv(loop: asyncio.AbstractEventLoop, s: socket.socket) -> tuple[bytes, tuple[str, int]]:
    data, addr = await asyncio.wait_for(loop.sock_recvfrom(s, 2048), 5)
    return data, addr


def test_forwarder_maps_each_client_and_delays_both_ways() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        relay = _udp()
        relay_port = relay.getsockname()[1]
        fwd = Forwarder(
            loop, IPv4Address("127.0.0.2"), IPv4Address("127.0.0.1"), [relay_port], 0.05
        )
        fwd.start()
        a, b = _udp(), _udp()
        try:
            public = ("127.0.0.2", relay_port)
            sent = loop.time()
            a.sendto(b"from a", public)
            b.sendto(b"from b", public)
            got = [await _recv(loop, relay), await _recv(loop, relay)]
            assert loop.time() - sent >= 0.05
            assert sorted(d for d, _ in got) == [b"from a", b"from b"]
            # One mapping per client, both seen from the public address.
            mapped = dict(got)
            assert mapped[b"from a"] != mapped[b"from b"]
            assert {ip for ip, _ in mapped.values()} == {"127.0.0.2"}
            assert len(fwd.mappings) == 2

            sent = loop.time()
            relay.sendto(b"to b", mapped[b"from b"])
            data, src = await _recv(loop, b)
            assert (data, src) == (b"to b", public)
            assert loop.time() - sent >= 0.05

            # Idle mappings close; the next datagram opens a fresh one.
            fwd._expire(loop.time() + fwd.mappings.timeout)
            assert len(fwd.mappings) == 0
            a.sendto(b"again", public)
            data, src = await _recv(loop, relay)
            assert data == b"again"
            assert src != mapped[b"from a"]
            assert fwd.counters.mappings_opened == 3
            assert fwd.counters.mappings_expired == 2
            assert fwd.counters.forwarded_up == 3
            assert fwd.counters.forwarded_down == 1
        finally:
            fwd.close()
            for s in (relay, a, b):
                s.close()

    asyncio.run(scenario())


def test_forwarder_drops_new_clients_beyond_the_mapping_bound() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        relay = _udp()
        port = relay.getsockname()[1]
        fwd = Forwarder(
            loop, IPv4Address("127.0.0.2"), IPv4Address("127.0.0.1"), [port], 0, max_mappings=1
        )
        fwd.start()
        a, b = _udp(), _udp()
        try:
            a.sendto(b"a", ("127.0.0.2", port))
            assert (await _recv(loop, relay))[0] == b"a"
            b.sendto(b"b", ("127.0.0.2", port))
            a.sendto(b"a2", ("127.0.0.2", port))
            assert (await _recv(loop, relay))[0] == b"a2"  # b's was dropped, not queued
            assert fwd.counters.mapping_full == 1
        finally:
            fwd.close()
            for s in (relay, a, b):
                s.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "argv",
    [
        ["--ports", "0"],
        ["--ports", "51820,51820"],
        ["--ports", "x"],
        ["--delay-ms", "-1"],
        ["--delay-ms", "inf"],
    ],
)
def test_cli_rejects_bad_arguments(argv: list[str]) -> None:
    base = {"--listen": "127.0.0.2", "--to": "127.0.0.1", "--ports": "1", "--delay-ms": "1"}
    base.update(dict(zip(argv[::2], argv[1::2], strict=True)))
    with pytest.raises(SystemExit) as e:
        main([x for kv in base.items() for x in kv])
    assert e.value.code == 2
