"""Receipt signing and verification per second on one core, against raw Ed25519.

Baseline, measured in the same run: Ed25519 sign/verify of a message of the
same size with no codec around it, with the libraries we use (OpenSSL
signs, libsodium verifies; see meshvpn/identity.py). The ratio shows what
our encoding, schema checks and countersignature handling cost on top of
the signature. OpenSSL's verification is measured too, for the choice.
Also: journal writes per second (SQLite WAL, synchronous=FULL, one fsync each).

    python bench/receipts.py [--seconds S] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import Benchmark
from cryptography.hazmat.primitives.asymmetric import ed25519
from nacl.bindings import crypto_sign_open

from accounting.receipts import Receipt, ReceiptBundle, sign_receipt
from meshvpn.identity import new_ed25519
from relay.journal import Journal

BENCHMARK = Benchmark(
    name="receipts",
    title="Receipts: sign, verify, journal per second on one core, against bare Ed25519",
    order=10,
)


def rate(fn: Callable[[int], object], seconds: float) -> float:
    """Calls per second over about ``seconds``."""
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(50):
            fn(n)
            n += 1
    return n / elapsed


def runs(fn: Callable[[int], object], seconds: float, repeats: int) -> dict[str, float]:
    samples = [rate(fn, seconds) for _ in range(repeats)]
    return {
        "median_per_s": round(statistics.median(samples)),
        "min_per_s": round(min(samples)),
        "max_per_s": round(max(samples)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    seconds, repeats = (0.1, 1) if args.quick else (args.seconds, args.repeats)

    client, relay = new_ed25519(), new_ed25519()
    base = Receipt(
        session_id=os.urandom(16),
        client=client.ed25519_public(),
        path=(relay.ed25519_public(),),
        bytes_up=1,
        bytes_down=2,
        price_per_gib=1_000_000,
        seq=1,
        started_ms=1,
        issued_ms=2,
    )
    wire = sign_receipt(base, client)
    bundle = ReceiptBundle.from_client(wire).add_countersignature(relay).encode()
    raw_key = ed25519.Ed25519PrivateKey.from_private_bytes(client.raw)
    raw_pub = raw_key.public_key()
    raw_msg = os.urandom(len(wire) - 64)
    raw_sig = raw_key.sign(raw_msg)
    raw_pub_bytes = raw_pub.public_bytes_raw()

    def sign_one(i: int) -> bytes:
        return sign_receipt(Receipt(**{**base.__dict__, "seq": i + 1}), client)

    report = {
        "baseline_ed25519_sign": runs(lambda _: raw_key.sign(raw_msg), seconds, repeats),
        "receipt_sign": runs(sign_one, seconds, repeats),
        "baseline_ed25519_verify": runs(
            lambda _: crypto_sign_open(raw_sig + raw_msg, raw_pub_bytes), seconds, repeats
        ),
        "openssl_ed25519_verify": runs(
            lambda _: raw_pub.verify(raw_sig, raw_msg), seconds, repeats
        ),
        "bundle_verify_client_and_relay": runs(
            lambda _: ReceiptBundle.decode(bundle), seconds, repeats
        ),
    }
    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal(Path(tmp) / "r.db")
        b = ReceiptBundle.decode(bundle)
        seq = iter(range(1, 10**9))

        def record(_: int) -> None:
            r = Receipt(**{**b.receipt.__dict__, "seq": next(seq)})
            journal.record(ReceiptBundle(r, b.receipt_wire, b.signatures), 0)

        report["journal_record_fsync"] = runs(record, seconds, repeats)
        journal.close()
    report["ratio_sign_to_baseline"] = round(
        report["receipt_sign"]["median_per_s"] / report["baseline_ed25519_sign"]["median_per_s"],
        2,
    )
    # a bundle holds two signatures (client's and relay's): compare with two raw verifies
    report["ratio_verify_to_2x_baseline"] = round(
        report["bundle_verify_client_and_relay"]["median_per_s"]
        * 2
        / report["baseline_ed25519_verify"]["median_per_s"],
        2,
    )
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
