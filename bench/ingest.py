"""Accounting ingest: receipts booked per second, SQLite and PostgreSQL.

The service takes receipts in batches of up to ``accounting.service.BATCH``
(256), verifies each bundle (client signature and every relay's
countersignature), books the batch in one transaction (synchronous=FULL on
SQLite: on disk before it is acknowledged) and acknowledges it. Per backend,
each run on a fresh ledger, without MQTT:

- ``<db>_book``: booking pre-verified bundles (the store: what the ledger
  decides plus one commit per batch);
- ``<db>_ingest``: verifying and booking in one process (``--verify-workers 1``);
- ``<db>_ingest_pool``: the service's pipeline as it runs by default: each batch
  verified in a process pool (split over one worker per core) while the batch
  before it is booked, batches booked in order;

and with it:

- ``<db>_service``: the real thing, end to end: ``meshvpn accounting serve``
  in a lab namespace draining its broker queue. The service is started once
  (so mosquitto keeps a persistent session for it) and stopped; the receipt
  flood of the crash test (tests/e2e/flood_tool.py: 3 relays, 4 clients,
  one- and two-hop paths, so 2.5 signatures a bundle, a tenth resent) is
  published to it as its relays deliver, bundles packed up to 8 KiB a
  message (about 20); then it is
  started again and the rate is taken from the ledger's own receive times
  (first batch to last). Needs root; skipped otherwise.

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
from meshvpn.lab import Lab, postgres
from meshvpn.lab.nodes import (
    accounting_connected,
    broker_address,
    broker_ca,
    node_state_dir,
    start_accounting,
    start_broker,
    stop_accounting,
)

FLOOD = Path(__file__).resolve().parent.parent / "tests" / "e2e" / "flood_tool.py"
DRAIN_TIMEOUT_S = 120.0

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


def _processed(url: str) -> int:
    """Receipts the ledger has taken so far: booked, stale, duplicate or rejected."""
    store = Store.open(url)
    try:
        return sum(store.counters().values())
    finally:
        store.close()


def _drain_rate(url: str, since_ms: int, count: int) -> float:
    """Per second, over the receive times of the batches booked since ``since_ms``
    (duplicates leave no row, but their batch does). The first batch's own time is
    not in the span from first to last, so a share of ``count`` is taken off."""
    store = Store.open(url)
    try:
        rows = store.db.execute(
            "SELECT DISTINCT received_ms FROM receipts WHERE received_ms >= ?", (since_ms,)
        )
    finally:
        store.close()
    times = sorted(int(ms) for (ms,) in rows)
    span_s = (times[-1] - times[0]) / 1000 if times else 0.0
    return count * (len(times) - 1) / len(times) / span_s if span_s > 0 else float("inf")


def _flood_parties(store: Store, seed: int) -> None:
    """The flood's clients get credit and its relays are known, as in production."""
    sys.path.insert(0, str(FLOOD.parent))
    import flood_tool  # noqa: PLC0415 - a test tool, not a package

    known = flood_tool.parties(seed)
    for client in known["clients"]:
        store.deposit(client, 10**15, f"bench-{seed}-{client}", NOW)
    for relay in known["relays"]:
        store.register(relay, "relay", NOW)


def service_drain(count: int, repeats: int, pg_url: str | None) -> dict[str, object]:
    """The accounting service's own rate, through mosquitto (see the module docstring)."""
    if os.geteuid() != 0:
        return {"skipped": "needs root (the lab)"}
    out: dict[str, object] = {}
    with Lab(f"bi{os.getpid() % 100_000:05d}") as lab:
        lab.up(1, 1)
        start_broker(lab)
        host, port = broker_address(lab).split(":")
        for db in ("sqlite", "postgresql"):
            if db == "postgresql" and pg_url is None:
                continue
            name = f"accounting-{db}"
            with contextlib.ExitStack() as stack:
                if db == "sqlite":
                    url = f"sqlite://{node_state_dir(lab, name) / 'ledger.db'}"
                    extra: tuple[str, ...] = ()
                else:
                    assert pg_url is not None
                    url = stack.enter_context(pg_schema(pg_url))
                    extra = ("--db", url)
                start_accounting(lab, 3600, *extra, name=name)
                accounting_connected(lab, name)  # subscribed: the broker queues for it now
                samples = []
                for run in range(repeats):
                    stop_accounting(lab, name)
                    seed = 100 + run
                    flood = [sys.executable, str(FLOOD), "flood", host, port, str(seed)]
                    flood += [str(count), "1e9", str(broker_ca(lab)), "packed"]
                    published = lab.exec("broker", flood, timeout=DRAIN_TIMEOUT_S).stdout
                    store = Store.open(url)
                    _flood_parties(store, seed)
                    store.close()
                    taken = _processed(url)
                    since_ms = int(time.time() * 1000)
                    start_accounting(lab, 3600, *extra, name=name)
                    deadline = time.monotonic() + DRAIN_TIMEOUT_S
                    while (done := _processed(url) - taken) < count:
                        if time.monotonic() > deadline:
                            log = node_state_dir(lab, name) / "accounting.log"
                            tail = log.read_text(errors="replace").splitlines()[-5:]
                            raise RuntimeError(
                                f"{name} took {done} of {count} receipts (flood published"
                                f" {published.decode().strip()}); its log ends: {tail}"
                            )
                        time.sleep(0.2)
                    samples.append(_drain_rate(url, since_ms, count))
                stop_accounting(lab, name)
            out[db] = summary(samples)
    return out


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
        drained = service_drain(count, repeats, pg)
        if "skipped" in drained:
            report["service_skipped"] = drained["skipped"]
        for db, figures in drained.items():
            if db != "skipped":
                report[f"{db}_service"] = figures
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
