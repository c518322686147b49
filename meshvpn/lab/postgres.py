"""A throwaway PostgreSQL cluster for tests and benchmarks.

    python -m meshvpn.lab.postgres start DIR   # prints the database URL
    python -m meshvpn.lab.postgres stop DIR

``initdb`` and ``pg_ctl`` from Debian's ``postgresql`` package make a cluster
in DIR that listens on a Unix socket in DIR only (no TCP port, so nothing
else on the machine can reach it or collide with it), with trust
authentication for its own superuser. As root, the server runs as the
``postgres`` user, as PostgreSQL insists. ``stop`` stops it and deletes DIR.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from meshvpn.errors import LocalError

PG_ROOT = Path("/usr/lib/postgresql")


def pg_binary(name: str) -> Path | None:
    """The newest installed ``name`` (initdb, pg_ctl): Debian keeps them off PATH."""
    versions = sorted(
        (p for p in PG_ROOT.glob(f"*/bin/{name}") if p.parent.parent.name.isdigit()),
        key=lambda p: int(p.parent.parent.name),
    )
    if versions:
        return versions[-1]
    found = shutil.which(name)
    return Path(found) if found else None


def available() -> bool:
    return pg_binary("initdb") is not None and pg_binary("pg_ctl") is not None


def _as_server_user(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    return ["runuser", "-u", "postgres", "--", *argv]


def url_of(base: Path) -> str:
    return f"postgresql://postgres@/postgres?host={base / 'sock'}"


def start(base: Path) -> str:
    initdb, pg_ctl = pg_binary("initdb"), pg_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise LocalError(
            "PostgreSQL is not installed", "apt-get install --no-install-recommends postgresql"
        )
    base.mkdir(parents=True, exist_ok=True)
    (base / "sock").mkdir(exist_ok=True)
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (base, base / "sock"):
            os.chown(path, user.pw_uid, user.pw_gid)
    data = base / "data"
    steps = [
        [str(initdb), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
         "--no-sync"],
        [str(pg_ctl), "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60",
         "-o", f"-c listen_addresses='' -k {base / 'sock'}", "start"],
    ]  # fmt: skip
    for argv in steps:
        proc = subprocess.run(
            _as_server_user(argv), capture_output=True, text=True, check=False, timeout=120
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            raise LocalError(f"{Path(argv[0]).name} failed: {' '.join(tail)}")
    return url_of(base)


def stop(base: Path) -> None:
    pg_ctl = pg_binary("pg_ctl")
    if pg_ctl is not None and (base / "data" / "postmaster.pid").exists():
        subprocess.run(
            _as_server_user([str(pg_ctl), "-D", str(base / "data"), "-m", "fast", "-w", "stop"]),
            capture_output=True,
            check=False,
            timeout=60,
        )
    shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def cluster() -> Iterator[str]:
    base = Path(tempfile.mkdtemp(prefix="meshvpn-pg-"))
    try:
        yield start(base)
    finally:
        stop(base)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    base = Path(argv[1])
    if argv[0] == "start":
        try:
            print(start(base))
        except LocalError as exc:
            print(exc.one_line(), file=sys.stderr)
            stop(base)
            return 1
        return 0
    stop(base)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
