"""Fuzz every parser the network can reach: ``python tests/fuzz/run.py [--inputs N]``.

Structure-aware mutations of valid messages plus random bytes (tests/fuzz/
targets.py), spread over the targets by weight. A crash is any exception
outside the target's documented error family; each distinct one (target,
exception type, where it was raised) is printed with a reproducer (hex) and
saved under ``--out``. Exit status 1 if anything crashed.

    python tests/fuzz/run.py                       # 100,000 inputs, random seed
    python tests/fuzz/run.py --inputs 2000 --seed 1 --target probe.responder
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.fuzz.targets import Target, build_targets, generate, random_pool, run_one


def where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1] if frames else None
    return f"{Path(last.filename).name}:{last.lineno}" if last else "?"


def schedule(targets: list[Target], n: int) -> list[Target]:
    wheel = [t for t in targets for _ in range(t.weight)]
    return [wheel[i % len(wheel)] for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/fuzz/run.py")
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--target", action="append", default=[], help="only these (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="save crash reproducers here")
    args = parser.parse_args(argv)

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    targets = build_targets()
    if args.target:
        targets = [t for t in targets if t.name in args.target]
        if not targets:
            parser.error(f"no such target; have: {', '.join(t.name for t in build_targets())}")
    pool = random_pool(build_targets())

    counts: collections.Counter[str] = collections.Counter()
    outcomes: collections.Counter[str] = collections.Counter()
    fared: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    crashes: dict[tuple[str, str, str], tuple[int, bytes, str]] = {}
    started = time.perf_counter()
    for target in schedule(targets, args.inputs):
        data = generate(target, rng, pool)
        counts[target.name] += 1
        crash, outcome = run_one(target, data)
        fared[target.name][outcome] += 1
        if crash is None:
            continue
        key = (target.name, type(crash).__name__, where(crash))
        seen, first, text = crashes.get(key, (0, data, f"{type(crash).__name__}: {crash}"))
        crashes[key] = (seen + 1, first, text)
        outcomes["crash"] += 1
    elapsed = time.perf_counter() - started

    total = sum(counts.values())
    print(f"fuzz: {total:,} inputs in {elapsed:.1f} s ({total / elapsed:,.0f}/s), seed {seed}")
    for target in targets:
        how = ", ".join(f"{k} {v}" for k, v in fared[target.name].most_common(6))
        print(f"  {counts[target.name]:>8,}  {target.name:<28} {how}")
    if not crashes:
        print("no crash")
        return 0
    print(f"{len(crashes)} distinct crash(es), {outcomes['crash']:,} crashing inputs:")
    for (name, kind, place), (seen, data, text) in sorted(crashes.items()):
        print(f"  {name}: {text[:160]} at {place} ({seen}x)\n    input: {data.hex()}")
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}-{kind}-{place.replace(':', '_')}.bin").write_bytes(data)
    return 1


if __name__ == "__main__":
    sys.exit(main())
