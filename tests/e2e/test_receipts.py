"""Metering and signed receipts in the lab: honest, rogue and crashing parties."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from accounting.exchange import ALLOWANCE_CAP, least_acceptable, tolerance
from accounting.receipts import GIB, ReceiptBundle
from accounting.store import Store
from meshvpn.identity import node_id_of
from meshvpn.lab import Lab
from meshvpn.lab.httpserver import pattern
from meshvpn.lab.nodes import (
    broker_address,
    deposit,
    discover_and_connect,
    enroll,
    fetch,
    meshvpn,
    node_ifname,
    node_state_dir,
    node_status,
    start_accounting,
    start_broker,
    start_relay,
)

pytestmark = pytest.mark.e2e

ROGUE = str(Path(__file__).with_name("rogue.py"))
TOOL = str(Path(__file__).with_name("mqtt_tool.py"))
MB = 1_000_000
CREDIT = 10**12


@pytest.fixture
def lab_state_root() -> Path:
    return Path("/run/meshvpn/r")  # short: control sockets live below it


def relay_session(lab: Lab) -> dict[str, Any]:
    status = node_status(lab, "relay1")
    assert status is not None
    (peer,) = [p for p in status["peers"] if p["receipts"] is not None]
    return dict(peer)


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def brokered(make_lab: Any, clients: int = 1, relay_program: list[str] | None = None) -> Lab:
    lab = make_lab(1, clients)
    start_broker(lab)
    start_relay(lab, 1, broker=True, program=relay_program)
    return lab


def test_download_is_receipted_within_tolerance(make_lab: Any) -> None:
    lab = brokered(make_lab)
    discover_and_connect(lab, 1)
    body = fetch(lab, "client1", "/bytes/100000000", timeout=120)
    assert body == pattern(100 * MB)

    def settled() -> dict[str, Any] | None:
        peer = relay_session(lab)
        r = peer["receipts"]
        return peer if r["bytes_unreceipted"] <= tolerance(r["bytes_counted"]) else None

    peer = wait_for(settled, 15, "the last statement to be receipted")
    r = peer["receipts"]
    client = node_status(lab, "client1")
    assert client is not None
    arrived = (
        client["relay"]["rx_bytes"] + client["relay"]["tx_bytes"]
    )  # the client's WireGuard view
    # the receipt is what reached the client, within the stated in-flight tolerance...
    assert arrived - tolerance(arrived) <= r["bytes_receipted"] <= arrived + tolerance(arrived)
    # ...and the relay's own WireGuard counters, less at most the stated loss allowance
    sent = peer["rx_bytes"] + peer["tx_bytes"]
    assert abs(r["bytes_counted"] - sent) <= tolerance(sent)
    assert least_acceptable(r["bytes_counted"]) <= r["bytes_receipted"] <= r["bytes_counted"]
    # and the client really received the 100 MB (WireGuard adds a few % on top)
    assert r["bytes_receipted"] >= 100 * MB
    assert r["receipts_rejected"] == 0
    session = client["session"]
    assert session["bytes_receipted"] == r["bytes_receipted"]
    assert session["cost"] == r["revenue"] > 0
    assert session["acked_seq"] == r["receipt_seq"]
    assert session["statements_refused"] == 0


def start_rogue_client(lab: Lab, mode: str) -> int:
    node = "client1"
    sd = enroll(lab, node)
    argv = [
        sys.executable, ROGUE, "client", mode, "--state-dir", str(sd),
        "--broker", broker_address(lab), "--interface", node_ifname(lab, node),
    ]  # fmt: skip
    pid = lab.spawn(node, argv, log=sd / "agent.log")
    wait_for(lambda: node_status(lab, node), 20, "the rogue client to connect")
    return pid


@pytest.mark.parametrize("mode", ["never-sign", "under-sign", "replay"])
def test_client_that_does_not_pay_is_cut_off(make_lab: Any, mode: str) -> None:
    lab = brokered(make_lab)
    start_rogue_client(lab, mode)
    with pytest.raises(Exception, match="failed"):
        fetch(lab, "client1", "/bytes/300000000", timeout=60)
    relay = node_status(lab, "relay1")
    assert relay is not None
    (cut,) = relay["receipts"]["cut_offs"]
    # the relay's exposure: at most the allowance's cap, overshot by the reading that passed it
    assert cut["bytes_unreceipted"] <= ALLOWANCE_CAP + cut["bytes_last_reading"]
    assert cut["allowance"] <= ALLOWANCE_CAP
    assert not relay["peers"], "the cut-off client's peer is still there"
    rejected = {k for k in relay["receipts"] if k.startswith("receipt-rejected:")}
    expected = {"never-sign": set(), "under-sign": {"receipt-rejected:under-signed"}}
    expected["replay"] = {"receipt-rejected:replayed"}
    assert rejected == expected[mode]
    # and it is not let straight back in
    agent_log = (node_state_dir(lab, "relay1") / "agent.log").read_text()
    assert "cut off client" in agent_log


def test_inflating_relay_gets_no_signature(make_lab: Any) -> None:
    lab = brokered(make_lab, relay_program=[sys.executable, ROGUE, "relay", "inflate"])
    discover_and_connect(lab, 1)
    fetch(lab, "client1", "/bytes/12000000", timeout=60)  # past one statement, short of a cut-off
    time.sleep(1)
    client = node_status(lab, "client1")
    assert client is not None
    session = client["session"]
    assert session["statements_refused"] >= 1
    log = (node_state_dir(lab, "client1") / "agent.log").read_text()
    assert "inflated, not signing" in log
    # A statement that reaches the client late (a resend, on a loaded machine) is
    # judged against the client's count by then, which may have grown past the
    # claim: then the client signs its own count plus tolerance. Never more.
    used = session["bytes_used"]
    assert session["bytes_receipted"] <= used + 2 * tolerance(used)
    peer = relay_session(lab)
    assert peer["receipts"]["bytes_receipted"] <= session["bytes_receipted"]


def test_relay_crashes_lose_no_acknowledged_receipt(make_lab: Any) -> None:
    lab = brokered(make_lab)
    start_accounting(lab, 3600)  # the real service: books what reaches it, each byte once
    deposit(lab, "client1", CREDIT)
    discover_and_connect(lab, 1)
    report = lab.state_dir / "download.json"
    loop = (
        "import json, time, urllib.request\n"
        f"url = 'http://{lab.plan.internet.web_addr}/bytes/20000000'\n"
        "got = fails = 0\n"
        "end = time.monotonic() + 30\n"
        "while time.monotonic() < end:\n"
        "    try:\n"
        "        got += len(urllib.request.urlopen(url, timeout=15).read())\n"
        "    except OSError:\n"
        "        fails += 1\n"
        f"open({str(report)!r}, 'w').write(json.dumps({{'bytes': got, 'fails': fails}}))\n"
    )
    lab.spawn("client1", [sys.executable, "-c", loop])
    rng = random.Random(5)
    for _ in range(3):
        time.sleep(rng.uniform(3, 7))
        status = node_status(lab, "relay1")
        assert status is not None
        os.kill(int(status["pid"]), signal.SIGKILL)
        time.sleep(0.3)
        start_relay(lab, 1, broker=True)
    wait_for(report.exists, 60, "the downloads to finish")
    time.sleep(12)  # one more statement interval: the last bytes get receipted
    client = node_status(lab, "client1")
    assert client is not None
    acked = client["session"]["acked_seq"]
    journal = sqlite3.connect(node_state_dir(lab, "relay1") / "receipts.db")
    seqs = {int(s) for (s,) in journal.execute("SELECT seq FROM receipts")}
    assert acked in seqs, "the client holds an acknowledgement the journal does not"
    top = max(seqs)
    # the relay and the client agree on the newest receipt
    assert client["session"]["receipt_seq"] == top
    meshvpn(lab, "client1", "disconnect")  # from here on, no new receipt
    wait_for(lambda: relay_pending(lab) == 0, 10, "delivery to the broker")
    (newest,) = [
        ReceiptBundle.decode(bytes(b)).receipt
        for (b,) in journal.execute("SELECT bundle FROM receipts ORDER BY seq DESC LIMIT 1")
    ]
    top = newest.seq

    def booked() -> bool:
        store = Store.open(str(node_state_dir(lab, "accounting") / "ledger.db"))
        try:
            held = store.sessions().get(newest.session_id)
        finally:
            store.close()
        return held is not None and held.seq == top

    wait_for(booked, 20, "accounting to book the newest acknowledged receipt")
    store = Store.open(str(node_state_dir(lab, "accounting") / "ledger.db"))
    try:
        (held,) = store.sessions().values()
        balances = store.balances()
    finally:
        store.close()
    # cumulative: whatever arrived how often, the session is booked once, at its newest receipt
    assert held.total_bytes == newest.total_bytes
    cost = newest.total_bytes * newest.price_per_gib // GIB
    assert balances[f"client:{node_id_of(newest.client)}"] == CREDIT - cost
    assert balances[f"relay:{node_id_of(newest.path[0])}"] == cost - cost // 10


def relay_pending(lab: Lab) -> int:
    status = node_status(lab, "relay1")
    return int(status["receipts"]["pending_delivery"]) if status else -1
