"""relay.operator: the owner's controls as pure decisions, and the session book obeying them."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshvpn.identity import new_ed25519, new_x25519
from meshvpn.messages import GRANTED, REFUSED_FULL, SessionRequest
from relay.operator import (
    GIB,
    Gate,
    OperatorSettings,
    Schedule,
    UsageMeter,
    admission,
    announced_capacity,
    gate,
    ifb_name,
    month_of,
    sessions_to_end,
    settings_from,
    shaping_batch,
    unshaping_batch,
)
from relay.pool import AddressPool
from relay.sessions import SessionBook


def ms(text: str, tz: str = "UTC") -> int:
    """Milliseconds since the epoch of a local time in ``tz``."""
    from zoneinfo import ZoneInfo  # noqa: PLC0415

    local = dt.datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz))
    return int(local.timestamp() * 1000)


# ---- schedule


def test_schedule_windows_and_midnight() -> None:
    s = Schedule.parse(["08:00-12:00", "22:00-06:00"], "UTC")
    assert s.is_open(ms("2025-03-01 08:00"))
    assert s.is_open(ms("2025-03-01 11:59"))
    assert not s.is_open(ms("2025-03-01 12:00"))
    assert s.is_open(ms("2025-03-01 23:30"))
    assert s.is_open(ms("2025-03-02 05:59"))
    assert not s.is_open(ms("2025-03-02 06:00"))
    assert s.describe() == "08:00-12:00, 22:00-06:00 UTC"
    assert Schedule.parse(["00:00-24:00"], "UTC").is_open(ms("2025-03-01 23:59"))


def test_schedule_follows_local_time_across_dst() -> None:
    s = Schedule.parse(["08:00-09:00"], "Europe/Berlin")
    # the Sunday clocks go forward (30 March 2025), 08:30 local is 06:30 UTC, not 07:30
    assert s.is_open(ms("2025-03-30 06:30"))
    assert not s.is_open(ms("2025-03-30 07:30"))
    # a week before, 08:30 local was 07:30 UTC
    assert s.is_open(ms("2025-03-23 07:30"))


def test_schedule_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="window"):
        Schedule(((60, 60),), "UTC")
    with pytest.raises(ValueError, match="at least one"):
        Schedule((), "UTC")
    with pytest.raises(Exception):  # noqa: B017 - zoneinfo's own error
        Schedule(((0, 60),), "Mars/Olympus")


# ---- usage


def test_usage_counts_deltas_resets_and_months() -> None:
    meter = UsageMeter()
    now = ms("2025-01-31 23:00", "Europe/Berlin")
    assert meter.observe(now, "Europe/Berlin", {"a": (100, 200)}) == 300
    assert meter.observe(now, "Europe/Berlin", {"a": (150, 250), "b": (10, 0)}) == 110
    # a's counters went back: its peer was re-added, it counts from zero
    assert meter.observe(now, "Europe/Berlin", {"a": (5, 5), "b": (10, 0)}) == 10
    assert (meter.used_bytes, meter.up, meter.down, meter.month) == (420, 165, 255, "2025-01")
    # an hour later it is February in Berlin (still January in UTC): the month starts over
    later = now + 3_600_000
    assert month_of(later, "UTC") == "2025-01"
    assert meter.observe(later, "Europe/Berlin", {"a": (5, 5), "b": (10, 1)}) == 1
    assert (meter.used_bytes, meter.month, meter.up + meter.down) == (1, "2025-02", 421)


def test_usage_counts_today_apart_in_the_owners_time_zone() -> None:
    meter = UsageMeter()
    evening = ms("2025-03-10 23:30", "Europe/Berlin")
    meter.observe(evening, "Europe/Berlin", {"a": (100, 0)})
    assert (meter.day, meter.day_bytes, meter.used_bytes) == ("2025-03-10", 100, 100)
    # 23:30 UTC+1 and an hour on is the next day in Berlin: the day starts over, the month not
    meter.observe(evening + 3_600_000, "Europe/Berlin", {"a": (130, 7)})
    assert (meter.day, meter.day_bytes, meter.used_bytes) == ("2025-03-11", 37, 137)


@given(
    st.lists(
        st.dictionaries(st.sampled_from("abc"), st.tuples(st.integers(0, 9), st.integers(0, 9)))
    )
)
def test_usage_equals_a_naive_sum_of_increments(rounds: list[dict[str, tuple[int, int]]]) -> None:
    meter = UsageMeter()
    last: dict[str, tuple[int, int]] = {}
    naive = 0
    for counters in rounds:
        for key, (rx, tx) in counters.items():
            prev_rx, prev_tx = last.get(key, (0, 0))
            naive += (rx - prev_rx if rx >= prev_rx else rx) + (
                tx - prev_tx if tx >= prev_tx else tx
            )
        last = dict(counters)
        meter.observe(0, "UTC", counters)
    assert meter.used_bytes == naive


# ---- the gate and what follows from it


HOURS = Schedule.parse(["08:00-20:00"], "UTC")


def test_gate_cap_then_hours() -> None:
    s = OperatorSettings(monthly_cap_bytes=GIB, schedule=HOURS)
    assert gate(s, ms("2025-03-01 10:00"), GIB - 1) == Gate(open=True)
    capped = gate(s, ms("2025-03-01 10:00"), GIB)
    assert not capped.open
    assert capped.reason == "monthly data cap of 1.00 GiB reached; try another relay"
    night = gate(s, ms("2025-03-01 21:00"), 0)
    assert night.reason == "outside sharing hours (08:00-20:00 UTC); try another relay"
    assert gate(OperatorSettings(), 0, 10 * GIB).open  # no cap, no hours: always open


def test_admission_capacity_and_sessions_to_end() -> None:
    s = OperatorSettings(max_sessions=2)
    open_, closed = Gate(open=True), Gate(open=False, reason="outside sharing hours (x)")
    assert admission(open_, 1, 2, renewal=False) is None
    assert admission(open_, 2, 2, renewal=False) == (
        "relay is full: 2 of 2 sessions in use (the owner's max_sessions); try another relay"
    )
    assert admission(open_, 2, 2, renewal=True) is None
    assert admission(closed, 0, 2, renewal=True) == "outside sharing hours (x)"
    assert announced_capacity(s, open_) == 2
    assert announced_capacity(s, closed) == 0
    granted = {"old": 1, "newest": 30, "mid": 20}
    assert sessions_to_end(s, open_, granted) == ["newest"]
    assert sorted(sessions_to_end(s, closed, granted)) == ["mid", "newest", "old"]
    assert sessions_to_end(OperatorSettings(max_sessions=5), open_, granted) == []


def test_settings_from_config_values() -> None:
    s = settings_from(
        {
            "sharing.price_per_gib": 5,
            "sharing.bandwidth_mbit": 5.0,
            "sharing.monthly_cap_gib": 0.5,
            "sharing.hours": ["08:00-20:00"],
            "sharing.timezone": "Europe/Berlin",
            "sharing.protected_networks": ["192.0.2.0/24"],
            "sharing.blocked_ports": [],
        }
    )
    assert (s.price_per_gib, s.bandwidth_kbit, s.monthly_cap_bytes) == (5, 5000, GIB // 2)
    assert s.schedule == Schedule(((480, 1200),), "Europe/Berlin")
    assert s.exit_policy.deny == (ipaddress.ip_network("192.0.2.0/24"),)
    assert s.exit_policy.blocked_ports == ()
    assert settings_from({}) == OperatorSettings()
    assert OperatorSettings().changes(s) == [
        "price_per_gib",
        "bandwidth_kbit",
        "monthly_cap_bytes",
        "schedule",
        "timezone",
        "exit_policy",
    ]


# ---- shaping


def test_shaping_batches() -> None:
    assert ifb_name("meshvpn0") == "meshvpn0-up"
    assert len(ifb_name("a-very-long-ifname")) <= 15
    create = shaping_batch("meshvpn0", 5000, create=True).splitlines()
    assert create == [
        "qdisc replace dev meshvpn0 root handle 1: htb default 10",
        "qdisc replace dev meshvpn0-up root handle 1: htb default 10",
        (
            "class replace dev meshvpn0 parent 1: classid 1:10 htb"
            " rate 5000kbit ceil 5000kbit quantum 1514"
        ),
        (
            "class replace dev meshvpn0-up parent 1: classid 1:10 htb"
            " rate 5000kbit ceil 5000kbit quantum 1514"
        ),
        "qdisc replace dev meshvpn0 parent 1:10 handle 10: bfifo limit 125000",
        "qdisc replace dev meshvpn0-up parent 1:10 handle 10: bfifo limit 125000",
        "qdisc replace dev meshvpn0 handle ffff: ingress",
        (
            "filter add dev meshvpn0 parent ffff: protocol all prio 1"
            " u32 match u32 0 0 action mirred egress redirect dev meshvpn0-up"
        ),
    ]
    update = shaping_batch("meshvpn0", 800, create=False).splitlines()
    assert update == [line.replace("5000", "800") for line in create if "class" in line]
    assert unshaping_batch("wg0") == "qdisc del dev wg0 root\nqdisc del dev wg0 ingress\n"


# ---- the session book obeys the gate


def request(wg_pub: bytes | None = None) -> SessionRequest:
    from meshvpn.identity import PublicKey  # noqa: PLC0415

    return SessionRequest(
        relay=new_ed25519().ed25519_public(),
        control_key=new_x25519().x25519_public(),
        wireguard_key=PublicKey(wg_pub or os.urandom(32)),
        want_exit="",
        max_price_per_gib=10**9,
        reply_token=os.urandom(16),
        nonce=os.urandom(16),
        issued_ms=0,
    )


def test_book_refuses_with_the_gates_reason_also_renewals() -> None:
    book = SessionBook(
        pool=AddressPool(ipaddress.IPv4Network("100.64.0.0/24")),
        node_id="n",
        relay_wireguard_key=new_x25519().x25519_public(),
        price_per_gib=1000,
        capacity=1,
    )
    client = new_ed25519().ed25519_public()
    first = request()
    d = book.decide(first, client, os.urandom(32), os.urandom(16), 1)
    assert d.grant is not None
    assert d.grant.status == GRANTED
    book.confirm({first.wireguard_key: 1})  # in use: a pending one would make room instead
    d = book.decide(request(), new_ed25519().ed25519_public(), os.urandom(32), os.urandom(16), 2)
    assert d.grant is not None
    assert (d.grant.status, d.grant.reason) == (
        REFUSED_FULL,
        "relay is full: 1 of 1 sessions in use (the owner's max_sessions); try another relay",
    )
    book.gate = Gate(open=False, reason="x" * 300)
    renewal = request(first.wireguard_key.raw)
    d = book.decide(renewal, client, os.urandom(32), os.urandom(16), 3)
    assert d.grant is not None
    assert d.grant.status == REFUSED_FULL
    assert d.grant.reason == "x" * 200  # cut to what a grant carries
