"""Throughput from per-peer counters (meshvpn/rates.py) against a plain model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshvpn.rates import Throughput


def test_rate_now_history_and_resets() -> None:
    t = Throughput(bucket_ms=5_000, buckets=3)
    t.observe(10_000, {"a": (1_000, 9_000)})  # baseline: the past is not a burst
    assert (t.up_bps, t.down_bps, t.total_up) == (0, 0, 0)
    t.observe(11_000, {"a": (3_000, 9_500)})
    assert (t.up_bps, t.down_bps) == (2_000, 500)
    t.observe(13_000, {"a": (3_000, 9_500), "b": (400, 0)})  # b is new: from zero
    assert (t.up_bps, t.down_bps) == (200, 0)
    t.observe(16_000, {"a": (100, 50), "b": (400, 0)})  # a was re-added: from zero
    assert (t.up_bps, t.down_bps) == (33, 16)
    assert (t.total_up, t.total_down) == (2_500, 550)
    # buckets [0,5) [5,10) [10,15) complete at 16 s; 15..16 s is still open
    assert t.history(16_000) == [(0, 0), (0, 0), (480, 100)]
    assert t.history(20_000) == [(0, 0), (480, 100), (20, 10)]
    assert t.status(20_000)["history"] == [[0, 0], [480, 100], [20, 10]]


@given(
    st.lists(
        st.tuples(
            st.integers(1, 4_000),
            st.dictionaries(
                st.sampled_from("abc"), st.tuples(st.integers(0, 99), st.integers(0, 99))
            ),
        ),
        max_size=40,
    )
)
def test_buckets_hold_every_byte_counted(
    rounds: list[tuple[int, dict[str, tuple[int, int]]]],
) -> None:
    t = Throughput(bucket_ms=1_000, buckets=10_000)
    now = 0
    last: dict[str, tuple[int, int]] | None = None
    naive_up = 0
    for step, counters in rounds:
        now += step
        if last is not None:
            for key, (rx, _tx) in counters.items():
                before = last.get(key, (0, 0))[0]
                naive_up += rx - before if rx >= before else rx
        last = dict(counters)
        t.observe(now, counters)
    assert t.total_up == naive_up
    assert sum(up for up, _ in t.history(now + 1_000)) == naive_up  # 1 s buckets: B/s = bytes
