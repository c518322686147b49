"""Accounting ingest: receipts booked per second, SQLite and PostgreSQL.

The service takes receipts in batches of ``accounting.service.BATCH`` (64),
verifies each bundle (client signature and relay countersignature), books
the batch in one transaction (synchronous=FULL on SQLite: on disk before it
is acknowledged) and acknowledges it. Measured here without MQTT, on one
core, per backend, each run on a fresh ledger:

- ``<db>_book``: booking pre-verified bundles (the store: what the ledger
  decides plus one commit per batch);
- ``<db>_ingest``: verifying and booking in one process (``--verify-workers 1``);
- ``<db>_ingest_pool``: as the service does by default: each batch verified in a
  process pool (split over one worker per core) while the batch before it is
  booked, batches booked in order.

Baseline, in the same run: verifying the same bundles alone (two Ed25519
verifications each), which bounds ``ingest`` on one core. The stream is
1,000 sessions over 10 relays and 100 clients, each session's receipts
cumulative, in random order (so most are updates of a held session).
PostgreSQL comes from ``MESHVPN_TEST_PG_URL`` or a throwaway cluster when
the server is installed; otherwise its figures are skipped, saying why.

    python bench/ingest.py [--receipts N] [--repeats R] [--quick]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from accounting.receipts import Receipt, ReceiptBundle, sign_receipt
from accounting.service import BATCH, PIPELINE, cpu_count, decode_all, verify_pool
from accounting.store import Ingest, Store
from meshvpn.identity import PrivateKey, node_id_of
from meshvpn.lab import postgres

NOW = 1_800_000_000_000


def make_stream(count: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)  # noqa: S311 - a reproducible stream, not secrets
    relays = [PrivateKey(rng.randbytes(32)) for _ in range(10)]
    clients = [PrivateKey(rng.randbytes(32)) for _ in range(100)]
    sessions = [
        [rng.randbytes(16), rng.choice(clients), rng.choice(relays), 0, 0] for _ in range(1000)
    ]
    out = []
    for _ in range(count):
        s = rng.choice(sessions)
        s[3] += rng.randint(1, 8 << 20)
        s[4] += 1
        receipt = Receipt(
            session_id=s[0], client=s[1].ed25519_public(), path=(s[2].ed25519_public(),),
            bytes_up=s[3] // 50, bytes_down=s[3], price_per_gib=1_000_000, seq=s[4],
            started_ms=NOW, issued_ms=NOW + s[4],
        )  # fmt: skip
        bundle = ReceiptBundle.from_client(sign_receipt(receipt, s[1]))
        out.append(bundle.add_countersignature(s[2]).encode())
    return out


def parties(wires: list[bytes]) -> tuple[set[str], set[str]]:
    clients, relays = set(), set()
    for w in wires[:5000]:
        r = ReceiptBundle.decode(w).receipt
        clients.add(node_id_of(r.client))
        relays.update(node_id_of(k) for k in r.path)
    return clients, relays


def fresh(url: str, clients: set[str], relays: set[str]) -> Store:
    store = Store.open(url)
    for c in sorted(clients):
        store.deposit(c, 10**15, f"bench-{c}", NOW)
    for r in sorted(relays):
        store.register(r, "relay", NOW)
    return store


def pooled(store: Store, raw: list[list[bytes]], workers: int) -> float:
    """The service's pipeline without MQTT: verify ahead in the pool, book in order.
    Returns the seconds it took (the pool's start-up not counted)."""
    pool = verify_pool(workers)
    assert pool is not None
    with pool:
        pool.submit(int).result()  # the workers are up before the clock starts
        pending: list[list[concurrent.futures.Future[list[Ingest]]]] = []

        def submit(batch: list[bytes]) -> None:
            share = -(-len(batch) // workers)
            parts = [batch[i : i + share] for i in range(0, len(batch), share)]
            pending.append([pool.submit(decode_all, part) for part in parts])

        start = time.perf_counter()
        for batch in raw[:PIPELINE]:
            submit(batch)
        for i in range(len(raw)):
            items = [item for f in pending.pop(0) for item in f.result()]
            if i + PIPELINE < len(raw):
                submit(raw[i + PIPELINE])
            store.book(items, NOW)
        return time.perf_counter() - start


def timed(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    fn()
    return n / (time.perf_counter() - start)


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "median_per_s": round(statistics.median(samples)),
        "min_per_s": round(min(samples)),
        "max_per_s": round(max(samples)),
        "runs": len(samples),
    }


@contextlib.contextmanager
def postgres_url() -> Iterator[str | None]:
    url = os.environ.get("MESHVPN_TEST_PG_URL")
    if url:
        yield url
    elif postgres.available():
        with postgres.cluster() as started:
            yield started
    else:
        yield None


@contextlib.contextmanager
def pg_schema(url: str) -> Iterator[str]:
    import psycopg  # noqa: PLC0415

    schema = f"bench_{secrets.token_hex(4)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in url else "?"
    try:
        yield f"{url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def measure(
    make_url: Callable[[], contextlib.AbstractContextManager[str]],
    wires: list[bytes],
    verified: list[Ingest],
    repeats: int,
) -> dict[str, dict[str, float]]:
    clients, relays = parties(wires)
    batches = [verified[i : i + BATCH] for i in range(0, len(verified), BATCH)]
    raw = [wires[i : i + BATCH] for i in range(0, len(wires), BATCH)]
    book: list[float] = []
    ingest: list[float] = []
    pool: list[float] = []
    workers = max(2, cpu_count())
    for _ in range(repeats):
        for kind, samples in (("book", book), ("ingest", ingest), ("pool", pool)):
            with make_url() as url:
                store = fresh(url, clients, relays)
                if kind == "pool":
                    samples.append(len(wires) / pooled(store, raw, workers))
                elif kind == "book":
                    samples.append(
                        timed(lambda s=store: [s.book(b, NOW) for b in batches], len(wires))
                    )
                else:
                    samples.append(
                        timed(lambda s=store: [s.book(decode_all(b), NOW) for b in raw], len(wires))
                    )
                store.close()
    return {
        "book": summary(book),
        "ingest": summary(ingest),
        "ingest_pool": {**summary(pool), "workers": workers},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--receipts", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    count, repeats = (500, 1) if args.quick else (args.receipts, args.repeats)

    wires = make_stream(count)
    verified: list[Ingest] = []
    verify_samples = [
        timed(lambda: verified.extend(decode_all(wires)), len(wires)) for _ in range(repeats)
    ]
    verified = verified[: len(wires)]
    report: dict[str, object] = {
        "receipts": count,
        "batch": BATCH,
        "baseline_bundle_verify": summary(verify_samples),
    }

    @contextlib.contextmanager
    def sqlite_url() -> Iterator[str]:
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite://{Path(tmp) / 'ledger.db'}"

    for name, figures in measure(sqlite_url, wires, verified, repeats).items():
        report[f"sqlite_{name}"] = figures
    with postgres_url() as pg:
        if pg is None:
            report["postgresql_skipped"] = "no MESHVPN_TEST_PG_URL and no PostgreSQL installed"
        else:
            for name, figures in measure(lambda: pg_schema(pg), wires, verified, repeats).items():
                report[f"postgresql_{name}"] = figures
    base = report["baseline_bundle_verify"]["median_per_s"]  # type: ignore[index]
    report["ratio_sqlite_ingest_to_verify"] = round(
        report["sqlite_ingest"]["median_per_s"] / base,  # type: ignore[index]
        2,
    )
    report["ratio_sqlite_pool_to_single"] = round(
        report["sqlite_ingest_pool"]["median_per_s"]  # type: ignore[index]
        / report["sqlite_ingest"]["median_per_s"],  # type: ignore[index]
        2,
    )
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
