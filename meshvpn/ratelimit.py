"""Token buckets for flood resistance. Pure: time comes in as ``now_ms``.

Theory of operation
-------------------
A ``TokenBucket`` holds at most ``burst`` tokens and gains one every
``refill_ms``; each allowed event takes one. The level is kept in integer
"token-milliseconds" (one token = ``refill_ms`` units), so refilling is adding
the elapsed milliseconds: no floats, no drift. Hence the one bound the
property tests check: over any window of ``w`` ms a bucket allows at most
``burst + w // refill_ms`` events, and an event every ``refill_ms`` or slower
is never refused. A clock that goes backwards mints nothing.

``RateTable`` is a bucket per key (a client identity, a source prefix, a
session) in a bounded table: past ``max_keys`` the least recently seen key is
forgotten. Forgetting only ever gives a key a fresh (full) bucket back, which
a flooder could have had anyway by making a new key; that is why the
expensive paths also sit behind one global bucket.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass
class TokenBucket:
    burst: int
    refill_ms: int
    level: int = -1  # token-milliseconds; -1: full (set in __post_init__)
    at_ms: int | None = None

    def __post_init__(self) -> None:
        if self.burst < 1 or self.refill_ms < 1:
            raise ValueError("a bucket needs burst >= 1 and refill_ms >= 1")
        if self.level < 0:
            self.level = self.capacity

    @property
    def capacity(self) -> int:
        return self.burst * self.refill_ms

    def _refill(self, now_ms: int) -> None:
        if self.at_ms is None or now_ms > self.at_ms:
            if self.at_ms is not None:
                self.level = min(self.capacity, self.level + (now_ms - self.at_ms))
            self.at_ms = now_ms

    def allow(self, now_ms: int) -> bool:
        """Take a token if there is one."""
        self._refill(now_ms)
        if self.level < self.refill_ms:
            return False
        self.level -= self.refill_ms
        return True

    def tokens(self, now_ms: int) -> int:
        """Whole tokens left (refills first)."""
        self._refill(now_ms)
        return self.level // self.refill_ms


@dataclass
class RateTable(Generic[K]):
    burst: int
    refill_ms: int
    max_keys: int
    buckets: OrderedDict[K, TokenBucket] = field(default_factory=OrderedDict)

    def allow(self, key: K, now_ms: int) -> bool:
        bucket = self.buckets.pop(key, None) or TokenBucket(self.burst, self.refill_ms)
        self.buckets[key] = bucket  # most recently seen last: the oldest go first
        while len(self.buckets) > self.max_keys:
            self.buckets.popitem(last=False)
        return bucket.allow(now_ms)

    def __len__(self) -> int:
        return len(self.buckets)
