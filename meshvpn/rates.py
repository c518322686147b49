"""Throughput from WireGuard's per-peer byte counters: now, and the last minutes. Pure.

The agent calls ``observe`` about once a second with every peer's
(received, sent) counters; ``status`` says what ``meshvpn status --json``
shows and the dashboard draws: the rate over the last observation interval
(``up_bps``/``down_bps``, bytes per second) and a history of
``BUCKET_MS`` buckets over the last ``BUCKETS`` of them (complete buckets
only, oldest first, bytes per second each), for a sparkline of the last
minutes.

Counters only grow while a peer lives. A peer seen for the first time after
the first observation counts from zero (it was just added); one whose
counter went down was removed and added again, and counts from zero too.
The first observation only sets the baseline: an agent that restarts does
not count its peers' whole past as one burst.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

BUCKET_MS: Final = 5_000
BUCKETS: Final = 60  # five minutes


def _grown(now: int, before: int) -> int:
    return now - before if now >= before else now


@dataclass
class Throughput:
    bucket_ms: int = BUCKET_MS
    buckets: int = BUCKETS
    up_bps: int = 0  # "up": what the peers sent us (received), "down": what we sent them
    down_bps: int = 0
    total_up: int = 0
    total_down: int = 0
    _last: dict[str, tuple[int, int]] | None = None
    _last_ms: int = 0
    _history: collections.OrderedDict[int, list[int]] = field(
        default_factory=collections.OrderedDict
    )

    def observe(self, now_ms: int, counters: Mapping[str, tuple[int, int]]) -> None:
        """Take every peer's (received, sent) counters as of ``now_ms``."""
        if self._last is None:
            self._last, self._last_ms = dict(counters), now_ms
            return
        up = down = 0
        for key, (rx, tx) in counters.items():
            last_rx, last_tx = self._last.get(key, (0, 0))
            up += _grown(rx, last_rx)
            down += _grown(tx, last_tx)
        elapsed = now_ms - self._last_ms
        self._last = dict(counters)
        if elapsed > 0:  # else the clock stood still or went back: bytes count, no rate
            self._last_ms = now_ms
            self.up_bps = up * 1000 // elapsed
            self.down_bps = down * 1000 // elapsed
        self.total_up += up
        self.total_down += down
        bucket = self._bucket(now_ms)
        bucket[0] += up
        bucket[1] += down

    def _bucket(self, now_ms: int) -> list[int]:
        index = now_ms // self.bucket_ms
        if index not in self._history:
            self._history[index] = [0, 0]
            while len(self._history) > self.buckets + 1:
                self._history.popitem(last=False)
        return self._history[index]

    def history(self, now_ms: int) -> list[tuple[int, int]]:
        """(up, down) bytes per second of each complete bucket of the last ``buckets``."""
        current = now_ms // self.bucket_ms
        out = []
        for index in range(current - self.buckets, current):
            up, down = self._history.get(index, (0, 0))
            out.append((up * 1000 // self.bucket_ms, down * 1000 // self.bucket_ms))
        return out

    def status(self, now_ms: int) -> dict[str, Any]:
        return {
            "up_bps": self.up_bps,
            "down_bps": self.down_bps,
            "total_up": self.total_up,
            "total_down": self.total_down,
            "bucket_s": self.bucket_ms / 1000,
            "history": [list(pair) for pair in self.history(now_ms)],
        }
