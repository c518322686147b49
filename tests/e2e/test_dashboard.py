"""`meshvpn dashboard` in a real terminal (tmux) during a lab run with traffic.

Three relays in a mesh chain (relay1 - relay2 - relay3) with the accounting
service (10 s epochs); client1
single-hop through relay1, client2 multi-hop entering at relay2 and leaving at
relay1, both downloading. relay1's dashboard runs in an 80x24 tmux pane;
``tmux capture-pane -p`` reads the screen, and every earnings, bytes and
session figure on it must be the figure of ``meshvpn status --json`` /
``meshvpn earnings --json`` taken around that moment: a refresh (0.5 s) may
lie between the two, so each figure is compared with the snapshots taken in
the second before the capture and right after it (the last ones by the CLI
itself). While the downloads run, the screen must move with the data; once
they are paused, it must equal it. Then Ctrl-C (exit 0, the shell's screen
back), and a killed agent (one line, exit 1) on client2's dashboard.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from typing import TYPE_CHECKING, Any

import pytest

from meshvpn.dashboard import earnings_rows
from meshvpn.lab import netns
from meshvpn.lab.demo import start_stream
from meshvpn.lab.lab import DEFAULT_STATE_ROOT, Lab
from meshvpn.lab.nodes import (
    LAB_CREDIT,
    deposit,
    discover_and_connect,
    meshvpn,
    node_id,
    node_state_dir,
    start_accounting,
    start_broker,
    start_mesh,
    wait_for_credit,
    wait_mesh_routes,
)
from meshvpn.lab.topology import owns_netns
from meshvpn.views import (
    fmt_bytes,
    fmt_duration,
    fmt_ms,
    fmt_share,
    fmt_units,
    read_earnings,
    read_status,
    sessions_of,
    short_id,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path


pytestmark = pytest.mark.e2e

CHAIN = [(1, 2), (2, 3)]
EPOCH_S = 10.0
WIDTH, HEIGHT = 80, 24


class Tmux:
    """A tmux server of our own (its own socket), one 80x24 shell pane."""

    def __init__(self) -> None:
        if shutil.which("tmux") is None:
            pytest.fail("tmux is missing: ./run installs it (SYSTEM_DEPS)")
        self.socket = f"meshvpn-test-{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, "TERM": "xterm-256color", "LANG": "C.UTF-8"}
        self.run("new-session", "-d", "-s", "t", "-x", str(WIDTH), "-y", str(HEIGHT),
                 "bash --norc --noprofile")  # fmt: skip
        self.run("set-option", "-g", "status", "off")
        self.type("PS1='$ '; clear")

    def run(self, *args: str) -> str:
        argv = ["tmux", "-L", self.socket, "-f", "/dev/null", *args]
        proc = subprocess.run(argv, capture_output=True, env=self.env, check=True, timeout=10)
        return proc.stdout.decode(errors="replace")

    def type(self, line: str) -> None:
        self.run("send-keys", "-t", "t", line, "Enter")

    def screen(self, *, joined: bool = False) -> list[str]:
        """The pane's lines; ``joined``: lines the terminal wrapped, joined again."""
        flags = ["-J"] if joined else []
        return self.run("capture-pane", "-p", *flags, "-t", "t").rstrip("\n").split("\n")

    def wait_for(self, pattern: str, timeout: float = 30.0, *, joined: bool = False) -> list[str]:
        deadline = time.monotonic() + timeout
        lines: list[str] = []
        while time.monotonic() < deadline:
            lines = self.screen(joined=joined)
            if re.search(pattern, "\n".join(lines)):
                return lines
            time.sleep(0.2)
        pytest.fail(f"{pattern!r} never appeared on screen:\n" + "\n".join(lines))

    def close(self) -> None:
        subprocess.run(
            ["tmux", "-L", self.socket, "kill-server"], capture_output=True, check=False, timeout=10
        )


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    t = Tmux()
    try:
        yield t
    finally:
        t.close()


def _dashboard(tmux: Tmux, state_dir: Path) -> None:
    cmd = f"{sys.executable} -m meshvpn dashboard --state-dir {state_dir}"
    tmux.type(f"{cmd}; echo EXIT=$?")


def _cli_json(command: str, state_dir: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "meshvpn", command, "--json", "--state-dir", str(state_dir)]
    out = subprocess.run(argv, capture_output=True, check=True, timeout=30).stdout
    return dict(json.loads(out))


def _snapshots(
    tmux: Tmux, state_dir: Path, before_s: float = 1.5
) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """The screen, and status/earnings snapshots from ``before_s`` before it until
    right after it (the last pair by `meshvpn status --json` / `earnings --json`)."""
    statuses, reports = [], []
    end = time.monotonic() + before_s
    while time.monotonic() < end:
        statuses.append(read_status(state_dir))
        reports.append(read_earnings(state_dir)[0])
        time.sleep(0.05)
    screen = tmux.screen()
    statuses.append(read_status(state_dir))
    reports.append(read_earnings(state_dir)[0])
    statuses.append(_cli_json("status", state_dir))
    reports.append(_cli_json("earnings", state_dir))
    return screen, statuses, reports


def _line(screen: list[str], start: str) -> str:
    found = [x for x in screen if x.strip().startswith(start)]
    assert len(found) == 1, (start, screen)
    return found[0]


def _earnings_on_screen(screen: list[str]) -> tuple[list[str], list[str], list[str], str]:
    epoch = next(x for x in screen if re.match(r"\s*epoch \d+ so far", x)).split()
    return (
        [epoch[1], *epoch[4:8]],
        _line(screen, "closed (").split()[2:6],
        _line(screen, "total").split()[1:5],
        next(x for x in screen if x.strip().startswith("pending ")).strip(),
    )


def _earnings_expected(report: dict[str, Any]) -> tuple[list[str], list[str], list[str], str]:
    rows = earnings_rows(report)
    cols = ("gross", "fee", "emission", "net")
    pending = report["pending"]
    claim = report.get("claim") or {}
    return (
        [str(pending["epoch"]), *(fmt_units(rows["now"][c]) for c in cols[:2]), "-",
         fmt_units(rows["now"]["net"])],
        [fmt_units(rows["closed"][c]) for c in cols],
        [fmt_units(rows["total"][c]) for c in cols],
        (
            f"pending {fmt_units(rows['now']['net'])} · closed {fmt_units(rows['closed']['net'])}"
            f" · claimable {fmt_units(claim.get('cumulative', 0))}"
            f" · balance {fmt_units(report['balance'])}"
        ),
    )  # fmt: skip


def _session_rows(screen: list[str], status: dict[str, Any]) -> dict[str, list[str]]:
    rows = {}
    for s in sessions_of(status):
        rows[short_id(s["client"])] = _line(screen, short_id(s["client"])).split()
    return rows


def _session_expected(s: dict[str, Any]) -> list[str]:
    return [
        short_id(s["client"]),
        s["role"],
        fmt_duration(s["duration_s"]),
        *fmt_bytes(s["bytes"]).split(),
        fmt_share(s["receipted_share"]),
        fmt_units(s["revenue"]),
    ]


def _mesh_expected(link: dict[str, Any]) -> list[str]:
    return [short_id(link["node_id"]), link["state"] or "-", *fmt_ms(link["rtt_ms"]).split(),
            *fmt_bytes(link["rx_bytes"]).split(), *fmt_bytes(link["tx_bytes"]).split()]  # fmt: skip


def _shared_expected(status: dict[str, Any]) -> tuple[str, str]:
    sharing = status["sharing"]
    return f"today {fmt_bytes(sharing['day_bytes'])}", f"month {fmt_bytes(sharing['used_bytes'])}"


def _check_equal(
    screen: list[str], statuses: list[dict[str, Any]], reports: list[dict[str, Any]]
) -> None:
    """Every figure on screen is that figure in one of the snapshots."""
    shown = _earnings_on_screen(screen)
    assert shown in [_earnings_expected(r) for r in reports], (
        shown,
        _earnings_expected(reports[-1]),
    )
    rows = _session_rows(screen, statuses[-1])
    assert len(rows) == 2  # client1 (entry) and client2 (exit)
    for client, row in rows.items():
        candidates = [
            _session_expected(s) for st in statuses for s in sessions_of(st)
            if short_id(s["client"]) == client
        ]  # fmt: skip
        assert row in candidates, (row, candidates[-1])
    for link in statuses[-1]["mesh"]["links"]:
        row = _line(screen, short_id(link["node_id"])).split()
        candidates = [
            _mesh_expected(x) for st in statuses for x in st["mesh"]["links"]
            if x["node_id"] == link["node_id"]
        ]  # fmt: skip
        assert row in candidates, (row, candidates[-1])
    text = "\n".join(screen)
    today, month = zip(*(_shared_expected(st) for st in statuses), strict=True)
    assert any(t in text for t in today), today[-1]
    assert any(m in text for m in month), month[-1]


def _lab(make_lab: Callable[..., Lab]) -> tuple[Lab, dict[int, str], list[int]]:
    lab = make_lab(3, 2)
    start_broker(lab)
    key, _ = start_accounting(lab, EPOCH_S)
    ids = {i: node_id(lab, f"relay{i}") for i in (1, 2, 3)}
    start_mesh(lab, CHAIN, "--accounting-key", key)
    wait_mesh_routes(lab)
    for j in (1, 2):
        deposit(lab, f"client{j}", LAB_CREDIT)
        wait_for_credit(lab, f"client{j}", 3)
    discover_and_connect(lab, 1, "--entry", ids[1])
    discover_and_connect(lab, 2, "--hops", "2", "--entry", ids[2], "--exit", ids[1])
    streams = [start_stream(lab, f"client{j}") for j in (1, 2)]
    return lab, ids, streams


def _wait_report_with_closed_epochs(state_dir: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            report = read_earnings(state_dir)[0]
        except Exception:  # noqa: BLE001 - none yet
            report = {}
        if report.get("epochs") and report["pending"]["net"] > 0:
            return
        time.sleep(0.5)
    pytest.fail("relay1 got no earnings report with closed epochs and a pending one")


def test_dashboard_shows_what_status_and_earnings_say(
    make_lab: Callable[..., Lab], tmux: Tmux
) -> None:
    lab, ids, streams = _lab(make_lab)
    relay1 = node_state_dir(lab, "relay1")
    _wait_report_with_closed_epochs(relay1)
    _dashboard(tmux, relay1)
    screen = tmux.wait_for(r"sessions \(2\)")
    assert len(screen) <= HEIGHT
    assert all(len(line) <= WIDTH for line in screen)
    assert ids[1] in screen[0]
    assert "entry exit mesh" in screen[0]
    assert short_id(ids[2]) in "\n".join(screen)  # the mesh neighbour on client2's path

    # while the downloads run, the screen moves with the data: between the snapshots
    screen, statuses, reports = _snapshots(tmux, relay1)
    totals = sorted(int(r["balance"]) for r in reports)
    shown = int(_earnings_on_screen(screen)[3].rsplit(" ", 1)[1].replace(",", ""))
    assert totals[0] <= shown <= totals[-1]
    assert statuses[-1]["throughput"]["down_bps"] > 0
    roles = {s["role"] for s in sessions_of(statuses[-1])}
    assert roles == {"entry", "exit"}

    # paused: every figure equals the data's
    for pid in streams:
        os.kill(pid, signal.SIGTERM)  # our own downloads, spawned in the lab
    time.sleep(12)  # the last statement and receipt, and their booking
    screen, statuses, reports = _snapshots(tmux, relay1)
    _check_equal(screen, statuses, reports)
    _check_equal(*_snapshots(tmux, relay1)[0:3])  # and again, a moment later

    # Ctrl-C: exit 0, and the shell's screen comes back as it was
    tmux.run("send-keys", "-t", "t", "C-c")
    after = tmux.wait_for(r"EXIT=\d+", joined=True)
    assert "EXIT=0" in "\n".join(after)
    assert not any("earnings (token units)" in line for line in after)
    assert any("meshvpn dashboard --state-dir" in line for line in after)

    # client2's view: its path and cost; then its agent dies: one line, exit 1
    client2 = node_state_dir(lab, "client2")
    tmux.type("clear")
    _dashboard(tmux, client2)
    screen = tmux.wait_for(r"cost so far")
    status = read_status(client2)
    path = status["path"]
    assert _line(screen, "entry").split()[1] == path["entry"] == ids[2]
    assert _line(screen, "exit").split()[1] == path["exit"] == ids[1]
    os.kill(status["pid"], signal.SIGKILL)  # the lab's client agent: ours to kill
    after = tmux.wait_for(r"EXIT=\d+", joined=True)
    text = "\n".join(after)
    assert "EXIT=1" in text
    errors = [line for line in after if line.startswith("error:") or "went away" in line]
    assert len(errors) == 1, after
    assert f"pid {status['pid']}" in errors[0]
    assert "went away" in errors[0]


def test_ping_names_the_hops_over_the_mesh(make_lab: Callable[..., Lab]) -> None:
    """relay1 -> relay3 on a chain: relay2 answers the first echo (hop limit 1) from
    its mesh address, relay3 the second; the route's first hop is relay2."""
    lab = make_lab(3, 0)
    start_broker(lab)
    ids = {i: node_id(lab, f"relay{i}") for i in (1, 2, 3)}
    start_mesh(lab, CHAIN)
    wait_mesh_routes(lab)
    out = meshvpn(lab, "relay1", "ping", ids[3], "-c", "3", "--json")
    answer = json.loads(out)
    assert answer["route"]["neighbour"] == ids[2]
    assert answer["route"]["metric"] > 0
    assert [h["node_id"] for h in answer["hops"]] == [ids[2], ids[3]]
    assert [h["reached"] for h in answer["hops"]] == [False, True]
    assert answer["received"] == answer["sent"] == 3
    assert 0 < answer["min_ms"] <= answer["avg_ms"] <= answer["max_ms"]
    text = meshvpn(lab, "relay1", "ping", ids[3], "-c", "1")
    assert f"first hop {ids[2]}" in text
    assert "1 sent, 1 received" in text
    # a node nobody announced: one line, what to do
    sd = str(node_state_dir(lab, "relay1"))
    argv = [sys.executable, "-m", "meshvpn", "ping", "mv" + "a" * 26, "--state-dir", sd]
    proc = lab.exec("relay1", argv, check=False)
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 1
    assert len(err) == 1
    assert "is announced" in err[0]


@pytest.mark.timeout(600)
def test_demo_opens_relay1s_dashboard_and_ctrl_c_leaves_nothing(
    tmux: Tmux, new_prefix: Callable[[], str]
) -> None:
    """`meshvpn demo` as README's first command runs it, in a terminal: relay1's
    dashboard comes up with its two mesh neighbours and earnings; Ctrl-C exits 0
    and tears everything down."""
    prefix = new_prefix()
    try:
        tmux.type(f"{sys.executable} -m meshvpn demo --prefix {prefix} --epoch-seconds 10;"
                  " echo EXIT=$?")  # fmt: skip
        screen = tmux.wait_for(r"mesh neighbours \(2;", timeout=300)
        assert screen[0].startswith("relay mv")
        assert "earnings (token units)" in "\n".join(screen)
        tmux.wait_for(r"sessions \([12]\)", timeout=60)
        tmux.run("send-keys", "-t", "t", "C-c")
        after = "\n".join(tmux.wait_for(r"EXIT=\d+", timeout=180, joined=True))
        assert "EXIT=0" in after
        assert "nothing left behind" in after
        assert [n for n in netns.list_netns() if owns_netns(prefix, n)] == []
        assert not (DEFAULT_STATE_ROOT / prefix).exists()
    finally:
        if any(owns_netns(prefix, n) for n in netns.list_netns()):
            Lab(prefix).down()
