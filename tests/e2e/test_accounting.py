"""The accounting service in the lab: real relays, real receipts, real epochs.

Expectations are computed here from the relays' own receipt journals with
plain arithmetic (cost = bytes x price / GiB, fee a tenth, single-hop
relays take the rest), not with the ledger's code.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from accounting.receipts import GIB, Receipt, ReceiptBundle
from accounting.store import Store
from meshvpn.agent import LOCK_NAME
from meshvpn.identity import init_identity, node_id_of
from meshvpn.lab import Lab
from meshvpn.lab.nodes import (
    accounting,
    accounting_connected,
    broker_address,
    broker_ca,
    deposit,
    discover_and_connect,
    fetch,
    meshvpn,
    node_state_dir,
    node_status,
    running,
    start_accounting,
    start_broker,
    start_relay,
    stop_accounting,
    wait_for_credit,
)
from meshvpn.mqtt import persistent_client_id

pytestmark = pytest.mark.e2e

FLOOD = str(Path(__file__).with_name("flood_tool.py"))
EPOCH_S = 4.0
DEPOSIT = 10**9
SCHEDULE = 1_000_000_000  # tokens per epoch before the first halving (epoch 1000)


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def ledger(lab: Lab, name: str = "accounting") -> Store:
    return Store.open(str(node_state_dir(lab, name) / "ledger.db"))


def journaled(lab: Lab, relays: int) -> dict[bytes, Receipt]:
    """The newest countersigned receipt per session, from each relay's own journal."""
    newest: dict[bytes, Receipt] = {}
    for i in range(1, relays + 1):
        db = sqlite3.connect(node_state_dir(lab, f"relay{i}") / "receipts.db")
        for (wire,) in db.execute("SELECT bundle FROM receipts"):
            receipt = ReceiptBundle.decode(bytes(wire)).receipt
            held = newest.get(receipt.session_id)
            if held is None or receipt.seq > held.seq:
                newest[receipt.session_id] = receipt
        db.close()
    return newest


def pending_delivery(lab: Lab, relays: int) -> int:
    total = 0
    for i in range(1, relays + 1):
        status = node_status(lab, f"relay{i}")
        assert status is not None
        total += int(status["receipts"]["pending_delivery"])
    return total


def run_traffic(lab: Lab) -> str:
    """Three relays, two clients with credit, a few epochs of downloads; the service's key."""
    start_broker(lab)
    key, _ = start_accounting(lab, EPOCH_S)
    for i in (1, 2, 3):
        start_relay(lab, i, "--accounting-key", key, "--geohash", f"u{i}", broker=True)
    for j in (1, 2):
        deposit(lab, f"client{j}", DEPOSIT)
        wait_for_credit(lab, f"client{j}", 3)
    discover_and_connect(lab, 1, "--exit-region", "u1")
    discover_and_connect(lab, 2, "--exit-region", "u2")
    for _ in range(2):  # traffic across a few epochs
        fetch(lab, "client1", "/bytes/20000000")
        fetch(lab, "client2", "/bytes/12000000")
        time.sleep(EPOCH_S)
    time.sleep(11)  # one statement interval: client1's last bytes through relay1 get receipted
    meshvpn(lab, "client1", "disconnect")
    discover_and_connect(lab, 1, "--exit-region", "u3")  # now through relay3
    fetch(lab, "client1", "/bytes/16000000")
    time.sleep(11)
    for j in (1, 2):  # no keepalive traffic, so no receipt after the ones we compare
        meshvpn(lab, f"client{j}", "disconnect")
    wait_for(lambda: pending_delivery(lab, 3) == 0, 20, "relays to deliver every receipt")
    return key


def expected(receipts: dict[bytes, Receipt]) -> tuple[dict[str, int], dict[str, int], int]:
    """What clients spent and relays earned before emission, and the fees: plain arithmetic."""
    spent: dict[str, int] = {}
    earned: dict[str, int] = {}
    fees = 0
    for r in receipts.values():
        assert len(r.path) == 1  # single hop: the relay is the exit and takes the whole share
        cost = r.total_bytes * r.price_per_gib // GIB
        fee = cost // 10
        fees += fee
        spent[node_id_of(r.client)] = spent.get(node_id_of(r.client), 0) + cost
        relay = node_id_of(r.path[0])
        earned[relay] = earned.get(relay, 0) + cost - fee
    return spent, earned, fees


def test_relays_earn_what_their_receipts_say_over_epochs(make_lab: Any) -> None:
    lab = make_lab(3, 2)
    key = run_traffic(lab)
    receipts = journaled(lab, 3)
    assert len({r.path[0] for r in receipts.values()}) == 3, "every relay carried traffic"

    def caught_up() -> bool:
        store = ledger(lab)
        try:
            held = store.sessions()
        finally:
            store.close()
        return all(
            sid in held and held[sid].total_bytes == r.total_bytes for sid, r in receipts.items()
        )

    wait_for(caught_up, 20, "the service to book the newest receipts")
    store = ledger(lab)
    first_open = store.current_epoch()[0]
    store.close()

    def epoch_closed() -> bool:
        s = ledger(lab)
        try:
            return s.current_epoch()[0] > first_open
        finally:
            s.close()

    wait_for(epoch_closed, 3 * EPOCH_S, "an epoch to close after the last booking")

    spent, earned, fees = expected(receipts)  # from the journals alone
    assert all(v > 0 for v in earned.values())

    store = ledger(lab)
    try:
        balances = store.balances()
        epochs = store.epochs()
        rewards = store.rewards()
    finally:
        store.close()
    assert len(epochs) >= 3
    # emission: the schedule, emitted or carried, epoch by epoch; each share within its fee
    carried = 0
    for e in epochs:
        assert e.emitted + e.carried == SCHEDULE + carried
        carried = e.carried
        rows = [r for r in rewards if r.epoch == e.epoch]
        assert sum(r.emission for r in rows) == e.emitted
        assert all(r.emission <= r.fee for r in rows)
    emission: dict[str, int] = {}
    for r in rewards:
        emission[node_id_of(r.relay)] = emission.get(node_id_of(r.relay), 0) + r.emission
    for relay, paid in earned.items():
        assert balances[f"relay:{relay}"] == paid + emission.get(relay, 0), relay
    for client, cost in spent.items():
        assert balances[f"client:{client}"] == DEPOSIT - cost, client
    assert balances["fee"] == fees
    assert balances["mint"] == -sum(e.emitted for e in epochs)
    assert sum(balances.values()) == 0
    check_reports(lab, key, balances, emission)


def check_reports(lab: Lab, key: str, balances: dict[str, int], emission: dict[str, int]) -> None:
    """Each relay fetches its report over MQTT and checks its claim offline."""
    for i in (1, 2, 3):
        node = f"relay{i}"
        argv = ["earnings", "--broker", broker_address(lab), "--accounting-key", key, "--json"]

        def report_now(node: str = node, argv: list[str] = argv) -> dict[str, Any] | None:
            report: dict[str, Any] = json.loads(meshvpn(lab, node, *argv))
            relay = f"relay:{report['node_id']}"
            return report if report["balance"] == balances[relay] else None

        report = wait_for(report_now, 10, f"{node}'s report to show its balance")
        assert report["claim"]["cumulative"] == report["balance"]  # nothing pending any more
        assert sum(e["emission"] for e in report["epochs"]) <= emission[report["node_id"]]
        out = meshvpn(lab, node, "earnings", "verify", "--accounting-key", key)
        assert "claim verified" in out


def test_client_without_credit_is_refused_and_cut_off(make_lab: Any) -> None:
    lab = make_lab(1, 1)
    start_broker(lab)
    key, _ = start_accounting(lab, 60)
    start_relay(lab, 1, "--accounting-key", key, broker=True)
    meshvpn(lab, "client1", "init")
    # never deposited: refused
    discover_and_connect(lab, 1, check=False)
    relay = node_status(lab, "relay1")
    assert relay is not None
    assert relay["credit"]["refused"] >= 1
    assert not relay["peers"]
    # credit for about 20 MB at the relay's price of 1,000,000 per GiB
    deposit(lab, "client1", 20_000)
    wait_for_credit(lab, "client1", 1)
    meshvpn(lab, "client1", "disconnect")
    discover_and_connect(lab, 1)
    with pytest.raises(Exception, match="failed"):
        fetch(lab, "client1", "/bytes/400000000", timeout=60)
    relay = wait_for(
        lambda: (s := node_status(lab, "relay1")) and s["credit"].get("cut-off") and s,
        20,
        "the relay to cut the client off",
    )
    assert not relay["peers"], "the client's peer is still there"
    store = ledger(lab)
    client_id = json.loads(meshvpn(lab, "client1", "id", "--json"))["node_id"]
    try:
        assert store.balance(f"client:{client_id}") <= 0
    finally:
        store.close()
    refused = relay["credit"]["refused"]
    meshvpn(lab, "client1", "disconnect")
    discover_and_connect(lab, 1, check=False)
    relay = node_status(lab, "relay1")
    assert relay is not None
    assert relay["credit"]["refused"] > refused
    assert "no credit" in (node_state_dir(lab, "relay1") / "agent.log").read_text()


def flood_parties(lab: Lab, seed: int) -> dict[str, list[str]]:
    path = lab.state_dir / f"parties-{seed}.json"
    lab.exec("broker", [sys.executable, FLOOD, "parties", str(seed), str(path)])
    parties: dict[str, list[str]] = json.loads(path.read_text())
    return parties


def booked_view(lab: Lab, name: str) -> tuple[dict[str, int], dict[bytes, int]]:
    store = ledger(lab, name)
    try:
        return store.balances(), {s: v.total_bytes for s, v in store.sessions().items()}
    finally:
        store.close()


def test_kill_9_during_a_receipt_flood_changes_no_balance(make_lab: Any) -> None:
    """Two services on one broker: one left alone, one killed -9 three times mid-flood."""
    lab = make_lab(1, 1)
    start_broker(lab)
    # The broker queues at most 1,000 messages for a subscriber that is away (see
    # meshvpn/broker.py) and drops the rest: at 100/s a restart may take 10 s.
    seed, count, rate = 5, 2000, 100
    parties = flood_parties(lab, seed)
    host, port = broker_address(lab).split(":")
    flood = [sys.executable, FLOOD, "flood", host, port, str(seed), str(count), str(rate)]
    flood.append(str(broker_ca(lab)))  # its relays get certificates from the lab's CA

    def start(name: str) -> int:
        _, pid = start_accounting(lab, 3600, name=name)
        return pid

    def ready(name: str) -> None:  # connected: it published the clients' credit
        log = node_state_dir(lab, name) / "accounting.log"
        wait_for(lambda: log.read_text().count("credit ok") >= len(parties["clients"]), 20,
                 f"{name} to connect")  # fmt: skip

    for name in ("calm", "crashy"):
        start(name)
        for i, client in enumerate(parties["clients"]):
            accounting(lab, "deposit", client, str(DEPOSIT), "--ref", f"bridge-{i}", name=name)
        ready(name)
    pid = int((node_state_dir(lab, "crashy") / LOCK_NAME).read_text().strip())  # the running one
    flooder = lab.spawn("broker", flood, log=lab.state_dir / "flood.log")
    rng = random.Random(seed)
    for _ in range(3):
        time.sleep(rng.uniform(1.5, 4.0))
        assert str(count) not in (lab.state_dir / "flood.log").read_text(), "killed after the flood"
        os.kill(pid, signal.SIGKILL)
        time.sleep(rng.uniform(0.0, 0.5))
        pid = start("crashy")
    wait_for(lambda: str(count) in (lab.state_dir / "flood.log").read_text(), 90, "the flood")
    del flooder

    def settled() -> bool:
        return booked_view(lab, "calm") == booked_view(lab, "crashy") and bool(
            booked_view(lab, "calm")[1]
        )

    dropped = "Outgoing messages are being dropped"
    broker_log = node_state_dir(lab, "broker") / "broker.log"
    assert dropped not in broker_log.read_text(), "the broker dropped messages: its queue is full"
    wait_for(settled, 30, "the killed service to book what the calm one booked")
    log = (node_state_dir(lab, "crashy") / "accounting.log").read_text()
    assert log.count("ledger ") == 4  # started, and restarted after each kill
    balances, sessions = booked_view(lab, "crashy")
    assert sum(balances.values()) == 0
    assert len(sessions) > 10
    # and the calm one booked every session at its newest receipt of the stream
    sys.path.insert(0, str(Path(FLOOD).parent))
    import flood_tool  # noqa: PLC0415

    newest: dict[bytes, int] = {}
    for _topic, wire in flood_tool.stream(seed, count):
        r = ReceiptBundle.decode(wire).receipt
        newest[r.session_id] = max(newest.get(r.session_id, 0), r.total_bytes)
    assert sessions == newest


def test_a_backlog_drains_after_a_restart(make_lab: Any) -> None:
    """Receipts queued at the broker while the service was down are all taken when it
    comes back, at full speed. mosquitto then sends far more than its in-flight window
    ahead of our acknowledgements; a message the link dropped was never acknowledged
    nor sent again, and the service stalled with a third of the backlog left."""
    lab = make_lab(1, 1)
    start_broker(lab)
    seed, count = 7, 2000
    parties = flood_parties(lab, seed)
    start_accounting(lab, 3600)
    for i, client in enumerate(parties["clients"]):
        accounting(lab, "deposit", client, str(DEPOSIT), "--ref", f"bridge-{i}")
    accounting_connected(lab)  # subscribed: the broker keeps its queue from now on
    stop_accounting(lab)
    host, port = broker_address(lab).split(":")
    flood = [sys.executable, FLOOD, "flood", host, port, str(seed), str(count), "1e9"]
    lab.exec("broker", [*flood, str(broker_ca(lab))], timeout=120)
    start_accounting(lab, 3600)

    def taken() -> int:
        store = ledger(lab)
        try:
            return sum(store.counters().values())
        finally:
            store.close()

    wait_for(lambda: taken() >= count, 60, f"the service to take all {count} receipts")
    assert taken() == count
    balances, _ = booked_view(lab, "accounting")
    assert sum(balances.values()) == 0


MQTT_TOOL = str(Path(__file__).with_name("mqtt_tool.py"))


def relay_receipts(lab: Lab) -> dict[str, Any]:
    status = node_status(lab, "relay1")
    assert status is not None
    receipts: dict[str, Any] = status["receipts"]
    return receipts


def test_final_receipts_survive_a_broker_that_drops_them(make_lab: Any) -> None:
    """The service is stopped while the relay delivers, and the broker throws away what
    it queued for it (its persistent session is cleared). The broker acknowledged every
    publish, so only accounting's signed BookedAck can tell the relay to send again:
    after the restart, every session is booked at its newest (final) receipt."""
    lab = make_lab(1, 1)
    start_broker(lab)
    key, pid = start_accounting(lab, 3600)
    start_relay(lab, 1, "--accounting-key", key, broker=True)
    deposit(lab, "client1", DEPOSIT)
    wait_for_credit(lab, "client1", 1)
    discover_and_connect(lab, 1)
    fetch(lab, "client1", "/bytes/4000000")

    def booked_everything() -> bool:
        held = booked_view(lab, "accounting")[1]
        return bool(held) and all(
            held.get(sid) == r.total_bytes for sid, r in journaled(lab, 1).items()
        )

    wait_for(booked_everything, 30, "the running service to book the first receipts")
    assert relay_receipts(lab).get("booked-acks", 0) > 0, "the relay heard the service's acks"

    os.kill(pid, signal.SIGTERM)  # a clean stop: its persistent session stays on the broker
    wait_for(lambda: not running(pid), 20, "the service to stop")
    before = booked_view(lab, "accounting")[1]
    fetch(lab, "client1", "/bytes/8000000")
    time.sleep(11)  # a statement interval: the last bytes get receipted
    meshvpn(lab, "client1", "disconnect")  # the session's final receipt is the newest now
    final = journaled(lab, 1)
    assert any(before.get(sid) != r.total_bytes for sid, r in final.items()), "new receipts"
    wait_for(lambda: relay_receipts(lab).get("sent", 0) + relay_receipts(lab).get("resent", 0)
             > 0 and relay_receipts(lab)["awaiting_booked_ack"] > 0, 20,
             "the relay to hand the final receipt to the broker")  # fmt: skip

    # the broker forgets what it queued for the service
    host, port = broker_address(lab).split(":")
    sd = node_state_dir(lab, "accounting")
    session = persistent_client_id("accounting", init_identity(sd)[0].identity_key)
    clear = [sys.executable, MQTT_TOOL, "--state-dir", str(sd), host, port, "clear", session]
    lab.exec("broker", clear)
    assert relay_receipts(lab)["pending_delivery"] > 0, "a broker ack is not a delivery"

    start_accounting(lab, 3600)
    wait_for(booked_everything, 180, "every session's final receipt to be booked")
    wait_for(lambda: relay_receipts(lab)["pending_delivery"] == 0, 30, "the relay to hear so")
    assert relay_receipts(lab).get("resent", 0) > 0
    held = booked_view(lab, "accounting")[1]
    assert held == {sid: r.total_bytes for sid, r in final.items()}
