"""The ledger store's backends, for one shared suite.

``store`` is parametrized over SQLite and PostgreSQL. PostgreSQL comes from
``MESHVPN_TEST_PG_URL`` (``./run test`` starts a cluster and sets it), or from
a throwaway cluster started here when the server is installed. Without
either it skips, except under ``MESHVPN_REQUIRE_E2E=1`` (CI), where a
PostgreSQL test that cannot run fails.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from accounting.store import Store
from meshvpn.lab import postgres

REQUIRE = os.environ.get("MESHVPN_REQUIRE_E2E") == "1"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = os.environ.get("MESHVPN_TEST_PG_URL")
    if url:
        yield url
        return
    if not postgres.available():
        why = "PostgreSQL is not installed and MESHVPN_TEST_PG_URL is not set"
        if REQUIRE:
            pytest.fail(f"{why}, but MESHVPN_REQUIRE_E2E=1")
        pytest.skip(why)
    with postgres.cluster() as started:
        yield started


def _with_schema(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


@pytest.fixture
def pg_schema_url(pg_url: str) -> Iterator[str]:
    """A fresh, empty schema per test, dropped afterwards."""
    import psycopg  # noqa: PLC0415

    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield _with_schema(pg_url, schema)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'ledger.db'}"
    return str(request.getfixturevalue("pg_schema_url"))


@pytest.fixture
def open_store(store_url: str) -> Iterator[Callable[[], Store]]:
    """Opens (and later closes) stores on one database: a second one is a second writer."""
    opened: list[Store] = []

    def make() -> Store:
        opened.append(Store.open(store_url))
        return opened[-1]

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(open_store: Callable[[], Store]) -> Store:
    return open_store()
