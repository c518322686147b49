"""One small data-access layer over SQLite and PostgreSQL.

Why our own thin adapter and not SQLAlchemy Core: the ledger needs a handful
of statements (inserts, one upsert form, ``UPDATE ... RETURNING``) that both
databases spell the same way, and booking runs them thousands of times a
second; a Core statement costs tens of microseconds of Python per execution
on top of the driver, which alone would eat the ingest budget. So SQL is
written once, with ``?`` placeholders and two type words (``{blob}``,
``{bigint}``), and each backend only translates those, opens transactions
and runs batches (``executemany``; psycopg pipelines it).

- SQLite (default, no setup): WAL, ``synchronous=FULL`` (a commit is on disk
  before we acknowledge anything), ``BEGIN IMMEDIATE`` so a write transaction
  holds the write lock from its first statement, a busy timeout so a second
  writer (``meshvpn accounting deposit``) waits instead of failing.
- PostgreSQL (``postgresql://`` URL): psycopg 3 in autocommit mode, with
  explicit transactions. Writers serialise on one row lock (see the store).

Integers only: amounts are BIGINT in both (SQLite INTEGER is 64-bit); the
ledger keeps every number below 2**62, so nothing is ever stored as a float.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from meshvpn.errors import ConfigError, LocalError

Row = tuple[Any, ...]
BUSY_TIMEOUT_MS: Final = 30_000


class Database(Protocol):
    dialect: str

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...
    def transaction(self) -> contextlib.AbstractContextManager[None]: ...
    def close(self) -> None: ...


_TYPES: Final = {
    "sqlite": {"blob": "BLOB", "bigint": "INTEGER"},
    "postgresql": {"blob": "BYTEA", "bigint": "BIGINT"},
}


def render(sql: str, dialect: str) -> str:
    return sql.format(**_TYPES[dialect])


class SQLiteDatabase:
    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
            self.conn.execute("PRAGMA foreign_keys=ON")
        except (OSError, sqlite3.Error) as exc:
            raise LocalError(f"cannot open the ledger {path}: {exc}", "check --db") from None
        self.path = path

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self.conn.execute(sql, tuple(params)).fetchall()

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)  # nothing to do for no rows: sqlite3 returns at once

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


_PLACEHOLDER: Final = re.compile(r"\?")


class PostgresDatabase:
    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        try:
            import psycopg  # noqa: PLC0415 - only needed with a PostgreSQL URL
        except ImportError:
            raise ConfigError(
                "a PostgreSQL URL needs the psycopg package",
                "install meshvpn with its postgres extra: pip install 'meshvpn[postgres]'",
            ) from None
        try:
            self.conn = psycopg.connect(url, autocommit=True)
        except psycopg.Error as exc:
            first = str(exc).strip().splitlines()[:1]
            raise LocalError(
                f"cannot connect to PostgreSQL: {first[0] if first else 'error'}", "check --db"
            ) from None
        self._sql: dict[str, str] = {}

    def _pg(self, sql: str) -> str:
        done = self._sql.get(sql)
        if done is None:
            done = self._sql[sql] = _PLACEHOLDER.sub("%s", sql.replace("%", "%%"))
        return done

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        cur = self.conn.execute(self._pg(sql), tuple(params))
        return [tuple(r) for r in cur.fetchall()] if cur.description else []

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        batch = list(rows)
        if not batch:  # spare the round trip
            return
        with self.conn.cursor() as cur:
            cur.executemany(self._pg(sql), batch)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self.conn.transaction():
            yield

    def close(self) -> None:
        self.conn.close()


def open_database(url: str | None, state_dir: Path | None) -> Database:
    """``postgresql://...`` -> PostgreSQL; ``sqlite:///path``, a path, or nothing -> SQLite."""
    if url and url.startswith(("postgresql://", "postgres://")):
        return PostgresDatabase(url)
    if url:
        path = Path(url.removeprefix("sqlite://")) if url.startswith("sqlite://") else Path(url)
    elif state_dir is not None:
        path = state_dir / "ledger.db"
    else:
        raise ConfigError("no ledger database", "give --db URL or --state-dir DIR")
    return SQLiteDatabase(path)
