"""What a relay hears from the accounting service: its earnings and epoch closes. Pure.

The accounting service publishes, retained (see ``accounting.service``), a
signed earnings report per relay on ``meshvpn/v1/earnings/<relay node id>``
(refreshed while the relay's pending epoch grows, and at each close) and a
signed ``EpochStatement`` on ``meshvpn/v1/epochs/<its node id>`` at each
close. A relay with a broker follows both, so ``meshvpn earnings`` and the
dashboard read its earnings from the agent (the control socket) with no
broker connection of their own.

``EarningsFeed`` keeps the newest report that verifies (signed by the
accounting key given with ``--accounting-key``; without one, by whichever key
signed it, which ``status`` shows as unpinned) and the newest statement from
that key. From the statements it knows the epoch length, so it can say when
the pending epoch closes, and whether the service is keeping time: an epoch
overdue by more than ``overdue_ms(epoch)`` means the accounting service (or
the broker's way to it) is gone. Anything that does not verify is counted,
never raised.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Final

from accounting.earnings import earnings_topic, open_report
from accounting.epochs import EpochStatement
from accounting.service import EPOCHS_PREFIX
from meshvpn.identity import PublicKey, node_id_of
from meshvpn.messages import MessageError, verify

EPOCHS_FILTER: Final = EPOCHS_PREFIX + "+"
MIN_OVERDUE_MS: Final = 10_000


def overdue_ms(epoch_ms: int) -> int:
    """How late an epoch close may be before the service counts as unreachable."""
    return max(MIN_OVERDUE_MS, epoch_ms // 5)


@dataclass
class EarningsFeed:
    node_id: str  # this relay's
    pinned: PublicKey | None = None
    report: dict[str, Any] | None = None
    report_wire: bytes = b""  # as signed: what `meshvpn earnings verify` checks
    report_received_ms: int = 0
    statement: EpochStatement | None = None
    statement_received_ms: int = 0
    epoch_ms: int | None = None
    counters: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def topic(self) -> str:
        return earnings_topic(self.node_id)

    @property
    def accounting_key(self) -> PublicKey | None:
        if self.pinned is not None:
            return self.pinned
        if self.report is not None:
            return PublicKey.from_b64(str(self.report["accounting_key"]))
        return None

    def wants(self, topic: str) -> bool:
        return topic == self.topic or topic.startswith(EPOCHS_PREFIX)

    def on_message(self, topic: str, wire: bytes, now_ms: int) -> None:
        if not wire:  # a retained message cleared
            return
        try:
            if topic == self.topic:
                self._on_report(wire, now_ms)
            else:
                self._on_statement(topic, wire, now_ms)
        except MessageError as exc:
            self.counters[f"dropped:{exc.reason}"] += 1

    def _on_report(self, wire: bytes, now_ms: int) -> None:
        report = open_report(wire, self.pinned)
        if report.get("node_id") != self.node_id:
            raise MessageError("wrong-relay", "an earnings report for another relay")
        held = self.report
        if held is not None and int(report["issued_ms"]) < int(held["issued_ms"]):
            raise MessageError("replayed", "older than the report held")
        self.report, self.report_wire, self.report_received_ms = report, wire, now_ms
        self.counters["reports"] += 1

    def _on_statement(self, topic: str, wire: bytes, now_ms: int) -> None:
        key = self.accounting_key
        if key is None or topic != EPOCHS_PREFIX + node_id_of(key):
            self.counters["statements-ignored"] += 1  # not (yet) known as ours
            return
        signed = verify(wire, EpochStatement)
        statement = signed.message
        assert isinstance(statement, EpochStatement)  # noqa: S101 - verify() checked the type
        if signed.signer != key:
            raise MessageError("wrong-signer", "an epoch statement not signed by its topic's key")
        if self.statement is not None and statement.epoch < self.statement.epoch:
            raise MessageError("replayed", "older than the statement held")
        self.statement, self.statement_received_ms = statement, now_ms
        self.epoch_ms = statement.end_ms - statement.start_ms
        self.counters["statements"] += 1

    def next_close_ms(self) -> int | None:
        """When the pending epoch closes: it began where the last closed one ended."""
        if self.statement is None or self.epoch_ms is None:
            return None
        return self.statement.end_ms + self.epoch_ms

    def status(self, now_ms: int) -> dict[str, Any]:
        key = self.accounting_key
        next_close = self.next_close_ms()
        if self.report is None and self.statement is None:
            state = "no word yet"
        elif next_close is not None and self.epoch_ms is not None:
            late = now_ms - next_close
            state = "overdue" if late > overdue_ms(self.epoch_ms) else "ok"
        else:
            state = "ok"
        last = self.statement
        return {
            "state": state,
            "accounting_key": key.b64 if key else None,
            "accounting_node_id": node_id_of(key) if key else None,
            "pinned": self.pinned is not None,
            "report_issued_ms": int(self.report["issued_ms"]) if self.report else None,
            "report_received_ms": self.report_received_ms or None,
            "last_epoch": None
            if last is None
            else {"epoch": last.epoch, "start_ms": last.start_ms, "end_ms": last.end_ms},
            "epoch_ms": self.epoch_ms,
            "next_close_ms": next_close,
            "counters": dict(self.counters),
        }
