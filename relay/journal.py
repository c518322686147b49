"""The relay's receipt journal: nothing acknowledged is ever lost.

SQLite in WAL mode with ``synchronous=FULL``: ``record`` returns only once the
countersigned bundle is on disk, and the agent acknowledges the receipt to the
client only after that. Delivery to accounting is at-least-once: ``pending``
gives, per session, the newest bundle not yet delivered (receipts are
cumulative, so the newest supersedes every older one), and ``mark_delivered``
is called once accounting's signed ``BookedAck`` covers it (or, on a relay
without an accounting key, once the broker acknowledged the QoS 1 publish;
``relay.delivery`` decides which). A crash between the two re-sends it, which
the ledger ignores as a duplicate.

A multi-hop exit first journals a receipt as *collecting* (``record_partial``:
the client's receipt with the exit's own countersignature), acknowledges it,
and records the bundle for delivery only once every relay on the path has
countersigned (``relay.paths``); completing it drops the session's older
collecting rows.

The journal also keeps each session's metered byte totals, so a restarted
relay goes on counting from where it was rather than from zero.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from accounting.exchange import Counters
from accounting.receipts import PartialBundle, ReceiptBundle

SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    session_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    bundle BLOB NOT NULL,
    bytes_up INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL,
    recorded_ms INTEGER NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (session_id, seq)
);
CREATE TABLE IF NOT EXISTS collecting (
    session_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    receipt BLOB NOT NULL,
    recorded_ms INTEGER NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE TABLE IF NOT EXISTS meters (
    session_id BLOB PRIMARY KEY,
    bytes_up INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Pending:
    session_id: bytes
    seq: int
    bundle: bytes


class Journal:
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def record(self, bundle: ReceiptBundle, now_ms: int) -> None:
        r = bundle.receipt
        with self.db:
            self.db.execute(
                "INSERT OR IGNORE INTO receipts"
                " (session_id, seq, bundle, bytes_up, bytes_down, recorded_ms)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (r.session_id, r.seq, bundle.encode(), r.bytes_up, r.bytes_down, now_ms),
            )

    def record_partial(self, partial: PartialBundle, now_ms: int) -> None:
        """A receipt this exit accepted, while the path's other relays countersign.
        (Only the client-signed receipt is kept: the exit's own countersignature
        is made again in a moment, the others are collected again after a restart.)"""
        r = partial.receipt
        with self.db:
            self.db.execute(
                "INSERT OR IGNORE INTO collecting (session_id, seq, receipt, recorded_ms)"
                " VALUES (?, ?, ?, ?)",
                (r.session_id, r.seq, partial.receipt_wire, now_ms),
            )

    def complete(self, bundle: ReceiptBundle, now_ms: int) -> None:
        """Every relay countersigned: deliver it; older collecting rows are covered."""
        r = bundle.receipt
        with self.db:
            self.record(bundle, now_ms)
            self.db.execute(
                "DELETE FROM collecting WHERE session_id = ? AND seq <= ?", (r.session_id, r.seq)
            )

    def collecting(self) -> list[bytes]:
        """The newest receipt wire per session still collecting countersignatures."""
        rows = self.db.execute(
            "SELECT receipt FROM collecting c"
            " WHERE seq = (SELECT MAX(seq) FROM collecting WHERE session_id = c.session_id)"
        ).fetchall()
        return [bytes(row[0]) for row in rows]

    def latest_seq(self, session_id: bytes) -> int:
        """The highest seq this relay acknowledged, complete or still collecting."""
        row = self.db.execute(
            "SELECT MAX(seq) FROM (SELECT seq FROM receipts WHERE session_id = ?"
            " UNION ALL SELECT seq FROM collecting WHERE session_id = ?)",
            (session_id, session_id),
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def latest(self, session_id: bytes) -> ReceiptBundle | None:
        row = self.db.execute(
            "SELECT bundle FROM receipts WHERE session_id = ? ORDER BY seq DESC LIMIT 1",
            (session_id,),
        ).fetchone()
        return ReceiptBundle.decode(row[0]) if row else None

    def pending(self) -> list[Pending]:
        rows = self.db.execute(
            "SELECT session_id, seq, bundle FROM receipts r WHERE delivered = 0"
            " AND seq = (SELECT MAX(seq) FROM receipts WHERE session_id = r.session_id)"
        ).fetchall()
        return [Pending(bytes(s), int(q), bytes(b)) for s, q, b in rows]

    def pending_count(self) -> int:
        row = self.db.execute(
            "SELECT COUNT(DISTINCT session_id) FROM receipts WHERE delivered = 0"
        ).fetchone()
        return int(row[0])

    def mark_delivered(self, session_id: bytes, seq: int) -> int:
        """Every bundle of the session up to ``seq`` is delivered; how many were not yet."""
        with self.db:
            cur = self.db.execute(
                "UPDATE receipts SET delivered = 1"
                " WHERE session_id = ? AND seq <= ? AND delivered = 0",
                (session_id, seq),
            )
        return cur.rowcount

    def save_meter(self, session_id: bytes, counted: Counters) -> None:
        with self.db:
            self.db.execute(
                "INSERT INTO meters (session_id, bytes_up, bytes_down) VALUES (?, ?, ?)"
                " ON CONFLICT (session_id) DO UPDATE SET"
                " bytes_up = excluded.bytes_up, bytes_down = excluded.bytes_down",
                (session_id, counted.up, counted.down),
            )

    def meter(self, session_id: bytes) -> Counters:
        row = self.db.execute(
            "SELECT bytes_up, bytes_down FROM meters WHERE session_id = ?", (session_id,)
        ).fetchone()
        return Counters(int(row[0]), int(row[1])) if row else Counters()
