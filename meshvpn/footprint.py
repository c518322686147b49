"""What an agent has put on the host, written down before it is put there.

The agent appends each resource (interface, policy rule, nftables table,
sysctl it changed, child pid) to ``footprint.json`` in its state directory
*before* creating it. A clean stop removes everything and deletes the file.
A ``kill -9`` leaves the file; the next start (or ``meshvpn down``) reads it
and removes what is listed, so the host converges to clean whatever happened.

Pids are recorded with their start time from /proc, so a recycled pid that
now belongs to someone else is never signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshvpn.netconf import Netlink, RuleSpec

FILE_NAME = "footprint.json"


def proc_start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces or parens: split after the last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in {"Z", "X"}:
        return None  # a zombie is already gone for our purposes
    return int(fields[19])


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctl(name: str) -> str:
    return _sysctl_path(name).read_text().strip()


def write_sysctl(name: str, value: str) -> None:
    _sysctl_path(name).write_text(value + "\n")


@dataclass
class Footprint:
    path: Path
    links: list[str] = field(default_factory=list)
    rules: list[RuleSpec] = field(default_factory=list)
    nft_tables: list[str] = field(default_factory=list)  # "inet meshvpn"
    sysctls: dict[str, str] = field(default_factory=dict)  # name -> value before us
    pids: list[tuple[int, int]] = field(default_factory=list)  # (pid, start time)

    @classmethod
    def load(cls, state_dir: Path) -> Footprint:
        path = state_dir / FILE_NAME
        fp = cls(path)
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            return fp
        except (OSError, ValueError):
            # A torn write: nothing listed can be trusted, but the file says we ran.
            return fp
        fp.links = list(data.get("links", []))
        fp.rules = [RuleSpec.from_json(r) for r in data.get("rules", [])]
        fp.nft_tables = list(data.get("nft_tables", []))
        fp.sysctls = dict(data.get("sysctls", {}))
        fp.pids = [(int(p), int(s)) for p, s in data.get("pids", [])]
        return fp

    @property
    def empty(self) -> bool:
        return not (self.links or self.rules or self.nft_tables or self.sysctls or self.pids)

    def save(self) -> None:
        data = {
            "links": self.links,
            "rules": [r.to_json() for r in self.rules],
            "nft_tables": self.nft_tables,
            "sysctls": self.sysctls,
            "pids": self.pids,
        }
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)

    # Recording: each call persists before the caller creates the resource.
    def will_create_link(self, ifname: str) -> None:
        if ifname not in self.links:
            self.links.append(ifname)
            self.save()

    def will_add_rule(self, rule: RuleSpec) -> None:
        if rule not in self.rules:
            self.rules.append(rule)
            self.save()

    def will_create_nft_table(self, table: str) -> None:
        if table not in self.nft_tables:
            self.nft_tables.append(table)
            self.save()

    def will_set_sysctl(self, name: str) -> None:
        if name not in self.sysctls:
            self.sysctls[name] = read_sysctl(name)
            self.save()

    def started_pid(self, pid: int) -> None:
        start = proc_start_time(pid)
        if start is not None:
            self.pids.append((pid, start))
            self.save()

    async def remove_all(self) -> list[str]:
        """Undo everything listed; return one line per thing removed."""
        done: list[str] = []
        for pid, start in self.pids:
            if proc_start_time(pid) == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                    done.append(f"stopped process {pid}")
                for _ in range(60):
                    if proc_start_time(pid) != start:
                        break
                    await asyncio.sleep(0.05)
                else:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        async with Netlink() as nl:
            for rule in self.rules:
                removed = await nl.rule_delete(rule)
                done += [f"removed rule priority {rule.priority}"] if removed else []
            for ifname in self.links:
                removed = await nl.link_delete(ifname)
                done += [f"removed interface {ifname}"] if removed else []
        for table in self.nft_tables:
            done += [f"removed nftables table {table}"] if nft_delete_table(table) else []
        for name, value in self.sysctls.items():
            with contextlib.suppress(OSError):
                write_sysctl(name, value)
        self.links, self.rules, self.nft_tables, self.sysctls, self.pids = [], [], [], {}, []
        self.path.unlink(missing_ok=True)
        return done


def nft_apply(ruleset: str) -> None:
    """Load a ruleset atomically (nft -f applies all of it or nothing)."""
    from meshvpn.errors import LocalError  # noqa: PLC0415

    try:
        proc = subprocess.run(
            ["nft", "-f", "-"], input=ruleset.encode(), capture_output=True, check=False
        )
    except FileNotFoundError:
        raise LocalError("nft not found", "install nftables: `apt-get install nftables`") from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise LocalError(f"nftables refused our ruleset: {err[0] if err else proc.returncode}")


def nft_delete_table(table: str) -> bool:
    try:
        proc = subprocess.run(
            ["nft", "delete", "table", *table.split()], capture_output=True, check=False
        )
    except FileNotFoundError:
        return False
    return proc.returncode == 0


def nft_table_exists(table: str) -> bool:
    try:
        proc = subprocess.run(
            ["nft", "list", "table", *table.split()], capture_output=True, check=False
        )
    except FileNotFoundError:
        return False
    return proc.returncode == 0
