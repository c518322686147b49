"""The ledger on disk: what ``accounting.ledger`` decides, persisted atomically.

Theory of operation
-------------------
The store computes no money. For a batch of verified receipt bundles it
loads, inside one write transaction, the held state of the sessions they
belong to and which of their parties are known, runs the pure
``ledger.assess`` on each in order (a later bundle of the same session sees
the state the earlier one left), and writes every decision: the receipt
row, the entry linked to it, its postings, the account balances, the
session's new held state and this epoch's tally. Epoch closes likewise run
``ledger.close`` on the tally and earnings loaded in their transaction.

Crash safety is the database's: one transaction per batch (or deposit, or
epoch close), so a kill at any moment leaves either all of a batch or none
of it. The service acknowledges receipts to the broker only after the
commit, so whatever a crash rolled back is delivered again, and booking it
again is idempotent (the held state says it is a duplicate or stale).

Every write transaction starts by bumping the ``next_id`` row in ``meta``
(``UPDATE ... RETURNING``): that allocates the batch's row ids and, on
PostgreSQL, takes a row lock that serialises writers, so two transactions
never both read a session's held state and both book its increase. (SQLite
serialises writers by ``BEGIN IMMEDIATE``.)

Tables (schema version 1): ``meta`` (next_id, epoch, epoch_start_ms, carry),
``parties`` (known clients and relays by node id), ``accounts``,
``receipts`` (booked and stale ones, with the bundle), ``sessions``,
``entries`` (each with the receipt, deposit or epoch that caused it),
``postings``, ``deposits``, ``tally`` (per epoch and relay), ``epochs``
(with the signed statement), ``rewards`` (per epoch and relay, with the
Merkle proof), ``counters`` (duplicates and rejections by reason) and
``parked``: valid receipts naming a client or relay not known yet (its
announcement or deposit may simply not have arrived); ``unpark`` books them
again once parties change. They are kept in the same transaction that
decided so, since the broker forgets a receipt once we acknowledge it.
Migrations are numbered and applied in order, each in its own transaction.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from accounting.db import Database, open_database, render
from accounting.ledger import (
    Booking,
    EpochClose,
    EpochTally,
    Outcome,
    Posting,
    SessionState,
    assess,
    cached_node_id,
    close,
    deposit_postings,
)
from accounting.receipts import ReceiptBundle
from meshvpn.identity import PublicKey

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value {bigint} NOT NULL)",
        (
            "INSERT INTO meta (key, value) VALUES ('next_id', 0), ('epoch', 0),"
            " ('epoch_start_ms', 0), ('carry', 0)"
        ),
        (
            "CREATE TABLE parties (node_id TEXT NOT NULL, kind TEXT NOT NULL,"
            " since_ms {bigint} NOT NULL, PRIMARY KEY (node_id, kind))"
        ),
        (
            "CREATE TABLE accounts (account TEXT PRIMARY KEY, kind TEXT NOT NULL,"
            " key {blob}, balance {bigint} NOT NULL)"
        ),
        (
            "CREATE TABLE receipts (id {bigint} PRIMARY KEY, session_id {blob} NOT NULL,"
            " seq {bigint} NOT NULL, total_bytes {bigint} NOT NULL, outcome TEXT NOT NULL,"
            " epoch {bigint} NOT NULL, received_ms {bigint} NOT NULL, bundle {blob} NOT NULL)"
        ),
        "CREATE INDEX receipts_session ON receipts (session_id)",
        (
            "CREATE TABLE sessions (session_id {blob} PRIMARY KEY, client {blob} NOT NULL,"
            " path {blob} NOT NULL, price_per_gib {bigint} NOT NULL, bytes_up {bigint} NOT NULL,"
            " bytes_down {bigint} NOT NULL, seq {bigint} NOT NULL,"
            " receipt_id {bigint} NOT NULL REFERENCES receipts (id))"
        ),
        (
            "CREATE TABLE entries (id {bigint} PRIMARY KEY, kind TEXT NOT NULL, ref TEXT NOT NULL,"
            " epoch {bigint} NOT NULL, created_ms {bigint} NOT NULL,"
            " receipt_id {bigint} REFERENCES receipts (id))"
        ),
        (
            "CREATE TABLE postings (entry_id {bigint} NOT NULL REFERENCES entries (id),"
            " account TEXT NOT NULL REFERENCES accounts (account), amount {bigint} NOT NULL)"
        ),
        "CREATE INDEX postings_entry ON postings (entry_id)",
        (
            "CREATE TABLE deposits (ref TEXT PRIMARY KEY, account TEXT NOT NULL,"
            " amount {bigint} NOT NULL, entry_id {bigint} NOT NULL REFERENCES entries (id))"
        ),
        (
            "CREATE TABLE tally (epoch {bigint} NOT NULL, relay {blob} NOT NULL,"
            " gross {bigint} NOT NULL, fee {bigint} NOT NULL, bytes {bigint} NOT NULL,"
            " PRIMARY KEY (epoch, relay))"
        ),
        (
            "CREATE TABLE epochs (epoch {bigint} PRIMARY KEY, start_ms {bigint} NOT NULL,"
            " end_ms {bigint} NOT NULL, pool {bigint} NOT NULL, emitted {bigint} NOT NULL,"
            " carried {bigint} NOT NULL, root {blob} NOT NULL, statement {blob} NOT NULL,"
            " entry_id {bigint} NOT NULL REFERENCES entries (id))"
        ),
        (
            "CREATE TABLE rewards (epoch {bigint} NOT NULL REFERENCES epochs (epoch),"
            " relay {blob} NOT NULL, gross {bigint} NOT NULL, fee {bigint} NOT NULL,"
            " emission {bigint} NOT NULL, net {bigint} NOT NULL, paid_bytes {bigint} NOT NULL,"
            " cumulative {bigint} NOT NULL, proof {blob} NOT NULL, PRIMARY KEY (epoch, relay))"
        ),
        "CREATE TABLE counters (name TEXT PRIMARY KEY, count {bigint} NOT NULL)",
        (
            "CREATE TABLE parked (digest {blob} PRIMARY KEY, bundle {blob} NOT NULL,"
            " since_ms {bigint} NOT NULL)"
        ),
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)
CHUNK: Final = 500  # parameters per IN (...) list
MAX_PARKED: Final = 100_000  # receipts waiting for an unknown party; beyond, dropped
UNKNOWN: Final = "unknown client or relay"
KEY_LEN: Final = 32

# an entry to write: id, kind, ref, epoch, created_ms, receipt_id and its postings
_Entry = tuple[int, str, str, int, int, int | None, tuple[Posting, ...]]

CLIENT: Final = "client"
RELAY: Final = "relay"


def _kind_of(account: str) -> str:
    return account.split(":", 1)[0] if ":" in account else account


@dataclass(frozen=True)
class Ingest:
    """One item of a batch: a verified bundle, or why a wire did not verify."""

    bundle: ReceiptBundle | None
    reason: str = ""


@dataclass(frozen=True)
class EpochRow:
    epoch: int
    start_ms: int
    end_ms: int
    pool: int
    emitted: int
    carried: int
    root: bytes
    statement: bytes


@dataclass(frozen=True)
class RewardRow:
    epoch: int
    relay: PublicKey
    gross: int
    fee: int
    emission: int
    net: int
    paid_bytes: int
    cumulative: int
    proof: tuple[bytes, ...]


@dataclass(frozen=True)
class Pending:
    epoch: int
    start_ms: int
    gross: int
    fee: int
    paid_bytes: int


def _pack_path(path: tuple[PublicKey, ...]) -> bytes:
    return b"".join(k.raw for k in path)


def _unpack_keys(raw: bytes) -> tuple[PublicKey, ...]:
    return tuple(PublicKey(raw[i : i + KEY_LEN]) for i in range(0, len(raw), KEY_LEN))


def _proof_of(raw: bytes) -> tuple[bytes, ...]:
    return tuple(raw[i : i + 32] for i in range(0, len(raw), 32))


@dataclass
class _Batch:
    """One batch's decisions, gathered to be written at once. ``held`` moves with them."""

    epoch: int
    now_ms: int
    next_id: int
    held: dict[bytes, SessionState]
    clients: set[str]
    relays: set[str]
    results: list[Booking] = field(default_factory=list)
    receipts: list[tuple[Any, ...]] = field(default_factory=list)
    entries: list[_Entry] = field(default_factory=list)
    parked: list[tuple[bytes, bytes, int]] = field(default_factory=list)
    last_booked: dict[bytes, int] = field(default_factory=dict)
    tally: EpochTally = field(default_factory=EpochTally)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)

    def known_client(self, key: PublicKey) -> bool:
        return cached_node_id(key) in self.clients

    def known_relay(self, key: PublicKey) -> bool:
        return cached_node_id(key) in self.relays

    def decide(self, item: Ingest) -> None:
        if item.bundle is None:
            self.counts[f"rejected:{item.reason}"] += 1
            self.results.append(Booking(Outcome.REJECTED, item.reason))
            return
        r = item.bundle.receipt
        booking = assess(
            item.bundle, self.held.get(r.session_id), self.known_client, self.known_relay
        )
        self.results.append(booking)
        if booking.outcome is Outcome.REJECTED:
            self.counts[f"rejected:{booking.reason}"] += 1
            if booking.reason == UNKNOWN:
                wire = item.bundle.encode()
                self.parked.append((hashlib.sha256(wire).digest(), wire, self.now_ms))
            return
        if booking.outcome is Outcome.DUPLICATE:
            self.counts["duplicate"] += 1
            return
        receipt_id = self.next_id
        self.next_id += 2  # the receipt's row and its entry's
        self.receipts.append(
            (receipt_id, r.session_id, r.seq, r.total_bytes, booking.outcome.value, self.epoch,
             self.now_ms, item.bundle.encode())
        )  # fmt: skip
        if booking.outcome is Outcome.STALE:
            self.counts["stale"] += 1
            return
        self.counts["booked"] += 1
        assert booking.session is not None  # noqa: S101 - BOOKED carries it
        self.held[r.session_id] = booking.session
        self.last_booked[r.session_id] = receipt_id
        self.tally.add(booking)
        self.entries.append(
            (receipt_id + 1, "receipt", booking.ref, self.epoch, self.now_ms, receipt_id,
             booking.postings)
        )  # fmt: skip


class Store:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.migrate()

    @classmethod
    def open(cls, url: str | None = None, state_dir: Path | None = None) -> Store:
        return cls(open_database(url, state_dir))

    def close(self) -> None:
        self.db.close()

    # ---- schema

    def _sql(self, sql: str) -> str:
        return render(sql, self.db.dialect)

    def schema_version(self) -> int:
        self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        rows = self.db.execute("SELECT MAX(version) FROM schema_version")
        return int(rows[0][0] or 0)

    def migrate(self) -> None:
        current = self.schema_version()
        if current > SCHEMA_VERSION:
            from meshvpn.errors import ConfigError  # noqa: PLC0415

            raise ConfigError(
                f"the ledger has schema version {current}, newer than this meshvpn's"
                f" {SCHEMA_VERSION}",
                "upgrade meshvpn",
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            with self.db.transaction():
                if self.schema_version() >= version:  # another process got there first
                    continue
                for statement in MIGRATIONS[version - 1]:
                    self.db.execute(self._sql(statement))
                self.db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    # ---- small helpers (inside a transaction where they write)

    def _allocate(self, count: int) -> int:
        """Reserve ``count`` ids; returns the first. Also the writers' lock: call it first."""
        (row,) = self.db.execute(
            "UPDATE meta SET value = value + ? WHERE key = 'next_id' RETURNING value", (count,)
        )
        return int(row[0]) - count + 1

    def _meta(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    def _in(self, sql: str, values: Sequence[Any]) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = []
        for i in range(0, len(values), CHUNK):
            part = values[i : i + CHUNK]
            rows += self.db.execute(sql.format(marks=",".join("?" * len(part))), part)
        return rows

    def _count(self, counts: collections.Counter[str]) -> None:
        if counts:
            self.db.executemany(
                "INSERT INTO counters (name, count) VALUES (?, ?) ON CONFLICT (name)"
                " DO UPDATE SET count = counters.count + excluded.count",
                sorted(counts.items()),
            )

    def _post(self, entries: list[_Entry], keys: dict[str, bytes] | None = None) -> None:
        """Write entries and their postings; ``keys``: public keys of relay accounts."""
        if not entries:
            return
        deltas: collections.Counter[str] = collections.Counter()
        rows = []
        for entry_id, _kind, _ref, _epoch, _ms, _receipt, postings in entries:
            if sum(p.amount for p in postings) != 0:
                raise AssertionError("unbalanced entry")  # a bug here must never book
            for p in postings:
                deltas[p.account] += p.amount
                rows.append((entry_id, p.account, p.amount))
        self._accounts(deltas, keys or {})
        self.db.executemany(
            "INSERT INTO entries (id, kind, ref, epoch, created_ms, receipt_id)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [e[:6] for e in entries],
        )
        self.db.executemany(
            "INSERT INTO postings (entry_id, account, amount) VALUES (?, ?, ?)", rows
        )

    def _accounts(self, deltas: dict[str, int], keys: dict[str, bytes]) -> None:
        self.db.executemany(
            "INSERT INTO accounts (account, kind, key, balance) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (account) DO UPDATE SET balance = accounts.balance + excluded.balance",
            [(a, _kind_of(a), keys.get(a), d) for a, d in sorted(deltas.items())],
        )

    # ---- parties

    def register(self, key_or_id: PublicKey | str, kind: str, now_ms: int) -> bool:
        """Make a client or relay known; True if it was new."""
        node_id = key_or_id if isinstance(key_or_id, str) else cached_node_id(key_or_id)
        with self.db.transaction():
            self._allocate(0)
            return self._register(node_id, kind, now_ms)

    def _register(self, node_id: str, kind: str, now_ms: int) -> bool:
        if self.db.execute("SELECT 1 FROM parties WHERE node_id = ? AND kind = ?", (node_id, kind)):
            return False
        self.db.execute(
            "INSERT INTO parties (node_id, kind, since_ms) VALUES (?, ?, ?)",
            (node_id, kind, now_ms),
        )
        return True

    def parties(self, kind: str) -> set[str]:
        return {
            str(r[0])
            for r in self.db.execute("SELECT node_id FROM parties WHERE kind = ?", (kind,))
        }

    # ---- deposits

    def deposit(self, node_id: str, amount: int, ref: str, now_ms: int) -> bool:
        """Credit a client (and register it); idempotent by ``ref``: False if seen."""
        account = f"{CLIENT}:{node_id}"
        postings = deposit_postings(account, amount)
        with self.db.transaction():
            entry_id = self._allocate(1)
            if self.db.execute("SELECT 1 FROM deposits WHERE ref = ?", (ref,)):
                return False
            epoch = self._meta()["epoch"]
            self._register(node_id, CLIENT, now_ms)
            self._post([(entry_id, "deposit", ref, epoch, now_ms, None, postings)])
            self.db.execute(
                "INSERT INTO deposits (ref, account, amount, entry_id) VALUES (?, ?, ?, ?)",
                (ref, account, amount, entry_id),
            )
        return True

    # ---- receipts

    def book(
        self, items: Sequence[Ingest], now_ms: int, *, unparked: Sequence[bytes] = ()
    ) -> list[Booking]:
        """Book a batch in one transaction; returns one decision per item, in order.

        ``unparked``: digests of the parked receipts being booked, to delete with it."""
        bundles = [i.bundle for i in items if i.bundle is not None]
        with self.db.transaction():
            first_id = self._allocate(2 * len(bundles))
            self.db.executemany("DELETE FROM parked WHERE digest = ?", [(d,) for d in unparked])
            ids = sorted(
                {cached_node_id(k) for b in bundles for k in (b.receipt.client, *b.receipt.path)}
            )
            known = self._in("SELECT node_id, kind FROM parties WHERE node_id IN ({marks})", ids)
            batch = _Batch(
                epoch=self._meta()["epoch"],
                now_ms=now_ms,
                next_id=first_id,
                held=self._held(sorted({b.receipt.session_id for b in bundles})),
                clients={str(n) for n, kind in known if kind == CLIENT},
                relays={str(n) for n, kind in known if kind == RELAY},
            )
            for item in items:
                batch.decide(item)
            self.db.executemany(
                "INSERT INTO receipts (id, session_id, seq, total_bytes, outcome, epoch,"
                " received_ms, bundle) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                batch.receipts,
            )
            relay_keys = {
                f"{RELAY}:{cached_node_id(k)}": k.raw
                for sid in batch.last_booked
                for k in batch.held[sid].path
            }
            self._post(batch.entries, relay_keys)
            self._write_sessions(batch.held, batch.last_booked)
            self._write_tally(batch.epoch, batch.tally)
            self._park(batch.parked, batch.counts)
            self._count(batch.counts)
        return batch.results

    def _park(
        self, parked: list[tuple[bytes, bytes, int]], counts: collections.Counter[str]
    ) -> None:
        if not parked:
            return
        (row,) = self.db.execute("SELECT COUNT(*) FROM parked")
        room = max(0, MAX_PARKED - int(row[0]))
        if len(parked) > room:
            counts["dropped:parked-full"] += len(parked) - room
        self.db.executemany(
            "INSERT INTO parked (digest, bundle, since_ms) VALUES (?, ?, ?)"
            " ON CONFLICT (digest) DO NOTHING",
            parked[:room],
        )

    def parked_count(self) -> int:
        (row,) = self.db.execute("SELECT COUNT(*) FROM parked")
        return int(row[0])

    def unpark(self, now_ms: int, limit: int = 1000) -> list[Booking]:
        """Book parked receipts again (those still unknown are parked again)."""
        rows = self.db.execute(
            "SELECT digest, bundle FROM parked ORDER BY since_ms LIMIT ?", (limit,)
        )
        if not rows:
            return []
        # verified before they were parked, and the bytes are the same: decode only checks again
        items = [Ingest(ReceiptBundle.decode(bytes(b))) for _, b in rows]
        return self.book(items, now_ms, unparked=[bytes(d) for d, _ in rows])

    def _held(self, session_ids: list[bytes]) -> dict[bytes, SessionState]:
        rows = self._in(
            "SELECT session_id, client, path, price_per_gib, bytes_up, bytes_down, seq"
            " FROM sessions WHERE session_id IN ({marks})",
            session_ids,
        )
        return {
            bytes(sid): SessionState(
                PublicKey(bytes(client)),
                _unpack_keys(bytes(path)),
                int(price),
                int(up),
                int(down),
                int(seq),
            )
            for sid, client, path, price, up, down, seq in rows
        }

    def _write_sessions(self, held: dict[bytes, SessionState], last: dict[bytes, int]) -> None:
        self.db.executemany(
            "INSERT INTO sessions (session_id, client, path, price_per_gib, bytes_up,"
            " bytes_down, seq, receipt_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (session_id) DO UPDATE SET bytes_up = excluded.bytes_up,"
            " bytes_down = excluded.bytes_down, seq = excluded.seq, path = excluded.path,"
            " receipt_id = excluded.receipt_id",
            [
                (
                    sid,
                    s.client.raw,
                    _pack_path(s.path),
                    s.price_per_gib,
                    s.bytes_up,
                    s.bytes_down,
                    s.seq,
                    last[sid],
                )
                for sid, s in ((sid, held[sid]) for sid in sorted(last))
            ],
        )

    def _write_tally(self, epoch: int, tally: EpochTally) -> None:
        relays = sorted(set(tally.gross) | set(tally.fee) | set(tally.bytes))
        self.db.executemany(
            "INSERT INTO tally (epoch, relay, gross, fee, bytes) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (epoch, relay) DO UPDATE SET gross = tally.gross + excluded.gross,"
            " fee = tally.fee + excluded.fee, bytes = tally.bytes + excluded.bytes",
            [(epoch, k.raw, tally.gross[k], tally.fee[k], tally.bytes[k]) for k in relays],
        )

    # ---- epochs

    def close_epoch(
        self, end_ms: int, sign: Callable[[EpochClose], bytes]
    ) -> tuple[EpochClose, bytes]:
        """Close the current epoch at ``end_ms``: emission, tree, signed statement."""
        with self.db.transaction():
            entry_id = self._allocate(1)
            meta = self._meta()
            epoch = meta["epoch"]
            tally = EpochTally()
            for relay, gross, fee, paid in self.db.execute(
                "SELECT relay, gross, fee, bytes FROM tally WHERE epoch = ?", (epoch,)
            ):
                key = PublicKey(bytes(relay))
                tally.gross[key], tally.fee[key], tally.bytes[key] = int(gross), int(fee), int(paid)
            result = close(
                epoch, meta["epoch_start_ms"], end_ms, meta["carry"], tally, self._earned()
            )
            statement = sign(result)
            emission = (
                entry_id,
                "emission",
                f"epoch:{epoch}",
                epoch,
                end_ms,
                None,
                result.postings,
            )
            self._post([emission], {f"{RELAY}:{cached_node_id(k)}": k.raw for k in result.earned})
            self.db.execute(
                "INSERT INTO epochs (epoch, start_ms, end_ms, pool, emitted, carried, root,"
                " statement, entry_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    epoch,
                    result.start_ms,
                    end_ms,
                    result.emission_pool,
                    result.emitted,
                    result.carried,
                    result.tree.root,
                    statement,
                    entry_id,
                ),
            )
            rows = []
            claims = result.claims()
            for relay in sorted(set(claims) | set(result.rewards)):
                cumulative, proof = claims.get(relay, (0, ()))  # nothing earned: no leaf
                reward = result.rewards.get(relay)
                rows.append(
                    (
                        epoch,
                        relay.raw,
                        reward.gross if reward else 0,
                        reward.fee if reward else 0,
                        reward.emission if reward else 0,
                        reward.net if reward else 0,
                        reward.paid_bytes if reward else 0,
                        cumulative,
                        b"".join(proof),
                    )
                )
            self.db.executemany(
                "INSERT INTO rewards (epoch, relay, gross, fee, emission, net, paid_bytes,"
                " cumulative, proof) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            self.db.executemany(
                "UPDATE meta SET value = ? WHERE key = ?",
                [(epoch + 1, "epoch"), (end_ms, "epoch_start_ms"), (result.carried, "carry")],
            )
        return result, statement

    def _earned(self) -> dict[PublicKey, int]:
        return {
            PublicKey(bytes(key)): int(balance)
            for key, balance in self.db.execute(
                "SELECT key, balance FROM accounts WHERE kind = ? AND balance <> 0", (RELAY,)
            )
        }

    def set_epoch_start(self, start_ms: int) -> None:
        """Start the clock of epoch 0 (once, when the service first runs)."""
        with self.db.transaction():
            self._allocate(0)
            meta = self._meta()
            if meta["epoch"] == 0 and meta["epoch_start_ms"] == 0:
                self.db.execute(
                    "UPDATE meta SET value = ? WHERE key = 'epoch_start_ms'", (start_ms,)
                )

    # ---- reading

    def current_epoch(self) -> tuple[int, int]:
        meta = self._meta()
        return meta["epoch"], meta["epoch_start_ms"]

    def balances(self) -> dict[str, int]:
        return {str(a): int(b) for a, b in self.db.execute("SELECT account, balance FROM accounts")}

    def client_balances(self) -> dict[str, int]:
        """Every client's balance, by node id."""
        return {
            str(a).split(":", 1)[1]: int(b)
            for a, b in self.db.execute(
                "SELECT account, balance FROM accounts WHERE kind = ?", (CLIENT,)
            )
        }

    def balance(self, account: str) -> int:
        rows = self.db.execute("SELECT balance FROM accounts WHERE account = ?", (account,))
        return int(rows[0][0]) if rows else 0

    def counters(self) -> dict[str, int]:
        return {str(n): int(c) for n, c in self.db.execute("SELECT name, count FROM counters")}

    def epochs(self, since: int = 0) -> list[EpochRow]:
        return [
            EpochRow(int(e), int(s), int(t), int(p), int(m), int(c), bytes(r), bytes(st))
            for e, s, t, p, m, c, r, st in self.db.execute(
                "SELECT epoch, start_ms, end_ms, pool, emitted, carried, root, statement"
                " FROM epochs WHERE epoch >= ? ORDER BY epoch",
                (since,),
            )
        ]

    def rewards(self, relay: PublicKey | None = None, since: int = 0) -> list[RewardRow]:
        sql = (
            "SELECT epoch, relay, gross, fee, emission, net, paid_bytes, cumulative, proof"
            " FROM rewards WHERE epoch >= ?"
        )
        params: list[Any] = [since]
        if relay is not None:
            sql += " AND relay = ?"
            params.append(relay.raw)
        return [
            RewardRow(
                int(e),
                PublicKey(bytes(k)),
                int(g),
                int(f),
                int(m),
                int(n),
                int(b),
                int(c),
                _proof_of(bytes(p)),
            )
            for e, k, g, f, m, n, b, c, p in self.db.execute(sql + " ORDER BY epoch, relay", params)
        ]

    def pending(self, relay: PublicKey) -> Pending:
        epoch, start_ms = self.current_epoch()
        rows = self.db.execute(
            "SELECT gross, fee, bytes FROM tally WHERE epoch = ? AND relay = ?", (epoch, relay.raw)
        )
        gross, fee, paid = (int(v) for v in rows[0]) if rows else (0, 0, 0)
        return Pending(epoch, start_ms, gross, fee, paid)

    def relays(self) -> list[PublicKey]:
        """Every relay that ever earned (has an account)."""
        return [
            PublicKey(bytes(k))
            for (k,) in self.db.execute(
                "SELECT key FROM accounts WHERE kind = ? ORDER BY key", (RELAY,)
            )
        ]

    def sessions(self) -> dict[bytes, SessionState]:
        rows = self.db.execute(
            "SELECT session_id, client, path, price_per_gib, bytes_up, bytes_down, seq"
            " FROM sessions"
        )
        return {
            bytes(sid): SessionState(
                PublicKey(bytes(c)), _unpack_keys(bytes(p)), int(pr), int(u), int(d), int(q)
            )
            for sid, c, p, pr, u, d, q in rows
        }

    def booked_bundles(self) -> list[bytes]:
        return [
            bytes(b)
            for (b,) in self.db.execute(
                "SELECT bundle FROM receipts WHERE outcome = ? ORDER BY id", ("booked",)
            )
        ]

    def entries(self) -> list[tuple[int, str, str, int, int | None, list[tuple[str, int]]]]:
        """Every entry (id, kind, ref, epoch, receipt_id, postings), for audits and tests."""
        postings: dict[int, list[tuple[str, int]]] = collections.defaultdict(list)
        for entry_id, account, amount in self.db.execute(
            "SELECT entry_id, account, amount FROM postings"
        ):
            postings[int(entry_id)].append((str(account), int(amount)))
        return [
            (int(i), str(k), str(r), int(e), None if rid is None else int(rid), postings[int(i)])
            for i, k, r, e, rid in self.db.execute(
                "SELECT id, kind, ref, epoch, receipt_id FROM entries ORDER BY id"
            )
        ]
