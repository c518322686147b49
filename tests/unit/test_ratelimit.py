"""Token buckets: the bounds every rate limit in the agents relies on."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshvpn.ratelimit import RateTable, TokenBucket

bursts = st.integers(1, 50)
refills = st.integers(1, 5_000)
steps = st.lists(st.integers(-3_000, 10_000), min_size=1, max_size=300)


def run(bucket: TokenBucket, start: int, deltas: list[int]) -> list[tuple[int, bool]]:
    """Feed events at start + running sum of deltas (the clock may step back)."""
    out, now = [], start
    for d in deltas:
        now += d
        out.append((now, bucket.allow(now)))
    return out


@given(bursts, refills, st.integers(0, 2**40), steps)
def test_never_more_than_burst_plus_refills_in_any_window(
    burst: int, refill: int, start: int, deltas: list[int]
) -> None:
    events = run(TokenBucket(burst, refill), start, deltas)
    clock = list(itertools.accumulate((t for t, _ in events), max))  # what the bucket believes
    allowed = [ok for _, ok in events]
    for i in range(len(events)):
        since = clock[i - 1] if i else clock[0]
        for j in range(i, len(events)):
            assert sum(allowed[i : j + 1]) <= burst + (clock[j] - since) // refill


@given(bursts, refills, st.integers(0, 2**40), st.lists(st.integers(0, 10_000), max_size=100))
def test_a_client_within_the_rate_is_never_refused(
    burst: int, refill: int, start: int, extra: list[int]
) -> None:
    events = run(TokenBucket(burst, refill), start, [refill + e for e in extra])
    assert all(ok for _, ok in events)


@given(bursts, refills, st.integers(1, 10**6))
def test_a_burst_is_served_then_refused_then_refilled(burst: int, refill: int, now: int) -> None:
    bucket = TokenBucket(burst, refill)
    assert [bucket.allow(now) for _ in range(burst + 3)] == [True] * burst + [False] * 3
    assert bucket.tokens(now + refill - 1) == 0
    assert bucket.tokens(now + refill) == 1
    assert bucket.tokens(now + 10 * burst * refill) == burst  # never above the burst


@given(bursts, refills, st.integers(10**6, 10**9), st.integers(1, 10**6))
def test_a_clock_stepping_back_mints_nothing(burst: int, refill: int, now: int, back: int) -> None:
    bucket = TokenBucket(burst, refill)
    while bucket.allow(now):
        pass
    assert not bucket.allow(now - back)
    assert bucket.tokens(now - back) == 0
    # and time lost backwards is not counted twice forwards
    assert bucket.tokens(now + refill - 1) == 0


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(0, 10)
    with pytest.raises(ValueError, match="refill"):
        TokenBucket(1, 0)


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 50)), max_size=400), st.integers(1, 8))
def test_table_is_bounded_and_keys_do_not_share_buckets(
    events: list[tuple[int, int]], max_keys: int
) -> None:
    table: RateTable[int] = RateTable(burst=2, refill_ms=100, max_keys=max_keys)
    model: dict[int, TokenBucket] = {}
    now = 0
    for key, dt in events:
        now += dt
        # the model: the same buckets, forgotten in the same least-recently-seen order
        bucket = model.pop(key, None) or TokenBucket(2, 100)
        model[key] = bucket
        while len(model) > max_keys:
            del model[next(iter(model))]
        assert table.allow(key, now) == bucket.allow(now)
        assert len(table) <= max_keys
