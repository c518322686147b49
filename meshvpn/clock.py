"""The one wall clock of the asyncio layer. Pure cores never call it: they take ``now_ms``."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Unix time in whole milliseconds, as every signed message carries it."""
    return time.time_ns() // 1_000_000
