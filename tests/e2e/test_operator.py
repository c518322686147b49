"""The owner's controls on a real relay in the lab: bandwidth cap (htb), monthly
data cap, sharing hours, max sessions, reload (SIGHUP and `meshvpn reload`),
and the metrics endpoint. Each relay reads a TOML config the test writes."""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from meshvpn.directory import announce_topic
from meshvpn.errors import LocalError
from meshvpn.lab import Lab
from meshvpn.lab.nodes import (
    broker_address,
    discover_and_connect,
    enroll,
    fetch,
    meshvpn,
    meshvpn_argv,
    node_ifname,
    node_state_dir,
    node_status,
    start_broker,
    start_relay,
)
from meshvpn.messages import Announcement, verify

pytestmark = pytest.mark.e2e

TOOL = str(Path(__file__).with_name("mqtt_tool.py"))
CAP_MBIT = 5.0
IPERF_S = 8
IPERF_OMIT_S = 2


@pytest.fixture
def lab_state_root() -> Path:
    return Path("/run/meshvpn/o")  # short: control sockets live below it


def write_config(path: Path, sharing: str) -> Path:
    path.write_text(f"# written by {__name__}\n[sharing]\n{sharing}\n")
    return path


def relay_lab(make_lab: Any, config: Path, clients: int = 1, *extra: str) -> Lab:
    lab = make_lab(1, clients)
    start_broker(lab)
    start_relay(lab, 1, "--config", str(config), *extra, broker=True)
    return lab


def relay_status(lab: Lab) -> dict[str, Any]:
    status = node_status(lab, "relay1")
    assert status is not None, "the relay agent is gone"
    return status


def wait_for(what: str, check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def announcement(lab: Lab) -> Announcement:
    node_id = relay_status(lab)["node_id"]
    host, port = broker_address(lab).split(":")
    reader = str(enroll(lab, "reader"))  # any enrolled node may read announcements
    argv = [sys.executable, TOOL, "--state-dir", reader, host, port, "retained"]
    argv.append(announce_topic(node_id))
    wire = bytes.fromhex(lab.exec("broker", argv).stdout.decode().strip())
    ann = verify(wire, Announcement).message
    assert isinstance(ann, Announcement)
    return ann


def connect_fails(lab: Lab, client: int) -> str:
    """`meshvpn connect` that must fail; its one-line error."""
    node = f"client{client}"
    enroll(lab, node)
    argv = meshvpn_argv(
        "connect", "--broker", broker_address(lab), "--interface", node_ifname(lab, node),
        "--no-lockdown", "--state-dir", str(node_state_dir(lab, node)),
    )  # fmt: skip
    proc = lab.exec(node, argv, check=False, timeout=60)
    assert proc.returncode != 0, "the client got a session it should not have"
    return proc.stderr.decode()


def session_prices(lab: Lab) -> list[int]:
    return sorted(p["price_per_gib"] for p in relay_status(lab)["peers"] if p["session_id"])


# ---- bandwidth cap


def iperf(lab: Lab, node: str, port: int, *extra: str) -> float:
    """Mbit/s the receiving side saw, past the first seconds (TCP's slow start)."""
    server = str(lab.plan.internet.web_addr)
    argv = ["iperf3", "-c", server, "-p", str(port), "-t", str(IPERF_S), "-O", str(IPERF_OMIT_S)]
    proc = lab.exec(node, [*argv, "-J", *extra], timeout=IPERF_S + 30)
    return float(json.loads(proc.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e6


def test_bandwidth_cap_holds_for_relayed_traffic_and_spares_the_owners(
    make_lab: Any, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "relay.toml", f"bandwidth_mbit = {CAP_MBIT}")
    lab = relay_lab(make_lab, config)
    wan = lab.plan.relay(1).wan_iface
    wan_qdisc_before = lab.exec("relay1", ["tc", "qdisc", "show", "dev", wan]).stdout
    discover_and_connect(lab, 1)
    for port in (5201, 5202):
        lab.spawn("internet", ["iperf3", "-s", "-p", str(port)])
    time.sleep(0.5)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # the owner's LAN host uploads and downloads while a client does through the relay
        owner_up = pool.submit(iperf, lab, "lan1", 5202)
        client_up = iperf(lab, "client1", 5201)
        owner_up_mbit = owner_up.result()
        owner_down = pool.submit(iperf, lab, "lan1", 5202, "-R")
        client_down = iperf(lab, "client1", 5201, "-R")
        owner_down_mbit = owner_down.result()

    print(
        f"cap {CAP_MBIT} Mbit/s: client up {client_up:.2f}, down {client_down:.2f};"
        f" owner at the same time: up {owner_up_mbit:.1f}, down {owner_down_mbit:.1f}"
    )
    for direction, mbit in (("upload", client_up), ("download", client_down)):
        assert abs(mbit - CAP_MBIT) <= 0.1 * CAP_MBIT, f"relayed {direction}: {mbit:.2f} Mbit/s"
    for direction, mbit in (("upload", owner_up_mbit), ("download", owner_down_mbit)):
        assert mbit > 4 * CAP_MBIT, f"the owner's {direction} was held down: {mbit:.2f} Mbit/s"
    # the owner's uplink keeps its own qdisc: nothing of ours is on it
    assert lab.exec("relay1", ["tc", "qdisc", "show", "dev", wan]).stdout == wan_qdisc_before
    assert relay_status(lab)["sharing"]["bandwidth_kbit"] == CAP_MBIT * 1000


# ---- monthly data cap


def test_monthly_cap_stops_sharing_and_announces_full(make_lab: Any, tmp_path: Path) -> None:
    cap = 8 << 20
    config = write_config(tmp_path / "relay.toml", f"monthly_cap_gib = {cap / (1 << 30)!r}")
    lab = relay_lab(make_lab, config, clients=2)
    discover_and_connect(lab, 1)
    assert announcement(lab).capacity > 0
    with contextlib.suppress(LocalError):  # the session may end mid-download, or just after
        fetch(lab, "client1", f"/bytes/{cap + (4 << 20)}", timeout=20)
    sharing = wait_for(
        "the relay to stop sharing",
        lambda: None if (s := relay_status(lab)["sharing"])["open"] else s,
    )
    assert "monthly data cap" in sharing["reason"]
    assert sharing["used_bytes"] >= cap
    assert not any(p["session_id"] for p in relay_status(lab)["peers"]), (
        "a session outlived the cap"
    )
    ann = wait_for(
        "a full announcement", lambda: a if (a := announcement(lab)).capacity == 0 else None
    )
    assert ann.load == 0
    error = connect_fails(lab, 2)
    assert "full (monthly data cap of 8.0 MiB reached" in error, error
    # the month's usage outlives the agent: restarted, it is still full
    meshvpn(lab, "relay1", "down")
    usage = json.loads((node_state_dir(lab, "relay1") / "usage.json").read_text())
    assert usage["used_bytes"] >= cap
    assert usage["month"] == dt.datetime.now(dt.UTC).strftime("%Y-%m")
    start_relay(lab, 1, "--config", str(config), broker=True)
    assert not relay_status(lab)["sharing"]["open"]
    assert announcement(lab).capacity == 0


# ---- sharing hours, reloaded by SIGHUP


def hours_around_now(inside: bool) -> str:
    hour = dt.datetime.now(dt.UTC).hour
    start, end = (
        ((hour - 1) % 24, (hour + 2) % 24) if inside else ((hour + 3) % 24, (hour + 5) % 24)
    )
    return f'hours = ["{start:02d}:00-{end:02d}:00"]\ntimezone = "UTC"'


def sighup_and_wait(lab: Lab, reloads: int) -> None:
    os.kill(int(relay_status(lab)["pid"]), signal.SIGHUP)
    wait_for("the relay to reload", lambda: relay_status(lab)["sharing"]["reloads"] >= reloads)


def test_schedule_refuses_outside_its_hours_and_ends_sharing(make_lab: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.toml", hours_around_now(inside=False))
    lab = relay_lab(make_lab, config)
    assert announcement(lab).capacity == 0
    error = connect_fails(lab, 1)
    assert "full (outside sharing hours" in error, error

    write_config(config, hours_around_now(inside=True))
    sighup_and_wait(lab, 1)
    assert relay_status(lab)["sharing"]["open"]
    assert announcement(lab).capacity > 0
    discover_and_connect(lab, 1)
    assert fetch(lab, "client1", "/ip").decode() == str(lab.plan.relay(1).wan_addr)

    # the hours end: the running session ends with them, and the relay says it is full
    write_config(config, hours_around_now(inside=False))
    sighup_and_wait(lab, 2)
    sharing = relay_status(lab)["sharing"]
    assert not sharing["open"]
    assert sharing["ended_sessions"] == 1
    assert not any(p["session_id"] for p in relay_status(lab)["peers"])
    assert announcement(lab).capacity == 0


# ---- max sessions, and a reload that changes the price


def test_max_sessions_then_reload_with_a_new_price(make_lab: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.toml", "max_sessions = 1\nprice_per_gib = 1000")
    lab = relay_lab(make_lab, config, clients=2)
    discover_and_connect(lab, 1)
    error = connect_fails(lab, 2)
    assert "full (relay is full: 1 of 1 sessions in use" in error, error

    write_config(config, "max_sessions = 2\nprice_per_gib = 3000")
    out = meshvpn(lab, "relay1", "reload")
    assert "reloaded: price_per_gib, max_sessions" in out, out
    discover_and_connect(lab, 2)
    client_prices = [
        (node_status(lab, f"client{i}") or {})["session"]["price_per_gib"] for i in (1, 2)
    ]
    assert client_prices == [1000, 3000]  # the running session keeps its price
    assert session_prices(lab) == [1000, 3000]
    assert fetch(lab, "client1", "/ip").decode() == str(lab.plan.relay(1).wan_addr)

    # a broken config changes nothing and says where it is broken
    config.write_text("[sharing]\nmax_sessions = 'two'\n")
    proc = lab.exec(
        "relay1",
        meshvpn_argv("reload", "--state-dir", str(node_state_dir(lab, "relay1"))),
        check=False,
    )
    assert proc.returncode != 0
    assert f"{config}:2: sharing.max_sessions: expected an integer" in proc.stderr.decode()
    assert session_prices(lab) == [1000, 3000]

    # lowering max sessions keeps the oldest session, ends the newer one
    write_config(config, "max_sessions = 1\nprice_per_gib = 3000")
    answer = json.loads(meshvpn(lab, "relay1", "reload", "--json"))
    assert answer["ended_sessions"] == 1
    assert session_prices(lab) == [1000]


# ---- metrics


def test_metrics_endpoint(make_lab: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.toml", "price_per_gib = 1000")
    lab = relay_lab(make_lab, config, 1, "--metrics", "127.0.0.1:9810")
    discover_and_connect(lab, 1)
    fetch(lab, "client1", "/bytes/2000000")
    scrape = (
        "import urllib.request as u;"
        " print(u.urlopen('http://127.0.0.1:9810/metrics', timeout=5).read().decode())"
    )

    def metrics() -> dict[str, float]:
        text = lab.exec("relay1", [sys.executable, "-c", scrape]).stdout.decode()
        return {
            name: float(value)
            for line in text.splitlines()
            if line and not line.startswith("#")
            for name, value in [line.rsplit(" ", 1)]
        }

    got = wait_for(
        "relayed bytes in the metrics",
        lambda: (
            m
            if (m := metrics()).get('meshvpn_relayed_bytes_total{direction="down"}', 0) > 2_000_000
            else None
        ),
    )
    assert got["meshvpn_sessions"] == 1
    assert got['meshvpn_session_requests_total{result="granted"}'] == 1
    assert got["meshvpn_sharing_open"] == 1
    assert got["meshvpn_session_capacity"] == 100
    assert "meshvpn_receipts_total" in got


# ---- systemd's notify protocol, spoken by the relay itself


def test_relay_notifies_ready_reloading_and_stopping(make_lab: Any, tmp_path: Path) -> None:
    import socket  # noqa: PLC0415

    config = write_config(tmp_path / "relay.toml", "price_per_gib = 1000")
    lab = make_lab(1, 0)
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))  # a path socket: reachable from the relay's network namespace
        sock.settimeout(20)
        start_relay(lab, 1, "--config", str(config), env={"NOTIFY_SOCKET": str(path)})
        assert sock.recv(4096) == b"READY=1"
        write_config(config, "price_per_gib = 2000")
        os.kill(int(relay_status(lab)["pid"]), signal.SIGHUP)
        assert sock.recv(4096).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
        assert sock.recv(4096) == b"READY=1"
        assert relay_status(lab)["sharing"]["settings"]["price_per_gib"] == 2000
        meshvpn(lab, "relay1", "down")
        assert sock.recv(4096) == b"STOPPING=1"
