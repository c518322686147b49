"""`meshvpn demo --duration S --json`: what README's first command runs, headless.

The demo as a user runs it (a subprocess, its own lab prefix, the default
lab state root), with short epochs: every relay must show receipts and
earnings, and nothing may be left behind: no namespace of the prefix, no
process of the demo's agents, no lab state directory. The demo says so in
its summary; this test checks for itself too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from meshvpn.lab import netns
from meshvpn.lab.lab import DEFAULT_STATE_ROOT, Lab
from meshvpn.lab.nodes import running
from meshvpn.lab.topology import owns_netns

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_headless_demo_every_relay_earns_and_nothing_is_left(
    new_prefix: Callable[[], str],
) -> None:
    prefix = new_prefix()
    argv = [sys.executable, "-m", "meshvpn", "demo", "--prefix", prefix, "--duration", "30",
            "--epoch-seconds", "10", "--json"]  # fmt: skip
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=840, check=False)
    finally:
        if any(owns_netns(prefix, n) for n in netns.list_netns()):
            Lab(prefix).down()  # the demo failed to: leave the machine clean anyway
    log = proc.stderr.decode(errors="replace")
    summary = json.loads(proc.stdout)
    relays = summary["relays"]
    assert sorted(relays) == [f"relay{i}" for i in range(1, 6)], log
    for name, relay in relays.items():
        assert relay["receipts"] > 0, (name, relay, log)
        assert relay["earnings"]["total"] > 0, (name, relay, log)
        assert relay["bytes_relayed"] > 0, (name, relay)
        assert relay["sessions"] >= 1, (name, relay)
    assert summary["left_behind"] == {"namespaces": [], "processes": [], "state_dir": False}
    assert summary["ok"] is True
    assert proc.returncode == 0, log
    # and for ourselves: no namespace, no lab state
    assert [n for n in netns.list_netns() if owns_netns(prefix, n)] == []
    assert not (DEFAULT_STATE_ROOT / prefix).exists()
    # the summary counted some processes (agents, broker, downloads): none survives
    assert "nothing left behind" in log
    assert len(summary["pids"]) >= 5 + 2 + 2 + 2  # relays, clients, downloads, broker, accounting
    assert not any(running(pid) for pid in summary["pids"])
