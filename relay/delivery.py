"""When the relay (re)sends a receipt bundle to accounting, and when it is delivered. Pure.

Theory of operation
-------------------
The journal (``relay.journal``) holds per session the newest countersigned
bundle not yet delivered. The ``Courier`` decides, given those and ``now``,
which to publish on this pass, and what counts as delivered:

- *End to end* (the relay has an accounting key): a bundle is delivered
  once a ``BookedAck`` signed by that key covers its session at its seq or
  higher (``accounting.booked``). Until then the courier re-sends it: at
  once when it is new (a newer seq resets the schedule), then after
  ``FIRST_RETRY_MS``, doubling up to ``MAX_RETRY_MS``; and at most
  ``PER_PASS`` bundles per pass, oldest-due first, so a relay with many
  sessions and an absent accounting service sends a bounded trickle rather
  than a flood.
- *Broker ack* (no accounting key: hand-run relays, labs without
  accounting): the old behaviour, delivered once the broker acknowledged the
  QoS 1 publish. Acks, if any arrive, are ignored: without a key there is no
  way to tell the real service's from anyone's.

Attempts live in memory only: after a restart every undelivered bundle is
sent once more, which the ledger books as a duplicate and acknowledges.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from relay.journal import Pending

FIRST_RETRY_MS: Final = 5_000
MAX_RETRY_MS: Final = 120_000
PER_PASS: Final = 64


@dataclass
class _Attempt:
    seq: int
    sent: int  # how many times this seq went out
    due_ms: int  # next re-send


def retry_delay_ms(sent: int) -> int:
    """The wait after the ``sent``-th publish of one bundle (sent >= 1)."""
    return min(MAX_RETRY_MS, FIRST_RETRY_MS << min(sent - 1, 16))


@dataclass
class Courier:
    end_to_end: bool
    per_pass: int = PER_PASS
    attempts: dict[bytes, _Attempt] = field(default_factory=dict)

    def due(self, pending: Sequence[Pending], now_ms: int) -> list[Pending]:
        """What to publish now, most overdue first (new bundles count as due since 0)."""
        live = {p.session_id for p in pending}
        for gone in [s for s in self.attempts if s not in live]:
            del self.attempts[gone]  # delivered meanwhile
        ready: list[tuple[int, Pending]] = []
        for p in pending:
            held = self.attempts.get(p.session_id)
            if held is None or held.seq != p.seq:
                ready.append((0, p))
            elif held.due_ms <= now_ms:
                ready.append((held.due_ms, p))
        ready.sort(key=lambda t: (t[0], t[1].session_id))
        return [p for _, p in ready[: self.per_pass]]

    def sent(self, item: Pending, now_ms: int) -> bool:
        """The broker took ``item``; True if that alone makes it delivered (broker-ack mode)."""
        if not self.end_to_end:
            return True
        held = self.attempts.get(item.session_id)
        count = held.sent + 1 if held is not None and held.seq == item.seq else 1
        self.attempts[item.session_id] = _Attempt(item.seq, count, now_ms + retry_delay_ms(count))
        return False

    def acked(self, sessions: Iterable[tuple[bytes, int]]) -> None:
        """Accounting holds these (session, seq): stop re-sending what they cover."""
        for session_id, seq in sessions:
            held = self.attempts.get(session_id)
            if held is not None and held.seq <= seq:
                del self.attempts[session_id]

    def resends(self) -> int:
        """Bundles sent at least once and still waiting for accounting's ack."""
        return len(self.attempts)
