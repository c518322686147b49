"""Discovery, nearest-relay choice and Noise-sealed negotiation over a real
mosquitto, in the lab, with user-space latency on the relays' links."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from meshvpn.directory import announce_topic, session_topic
from meshvpn.identity import (
    PrivateKey,
    PublicKey,
    load_identity,
    mesh_address_of,
    new_ed25519,
    node_id_of,
)
from meshvpn.lab import Lab
from meshvpn.lab.nodes import (
    broker_address,
    discover_and_connect,
    enroll,
    fetch,
    meshvpn_argv,
    node_state_dir,
    node_status,
    start_broker,
    start_relay,
)
from meshvpn.messages import Announcement, sign, verify

pytestmark = pytest.mark.e2e

TOOL = str(Path(__file__).with_name("mqtt_tool.py"))
LATENCY = [60.0, 10.0, 35.0]  # relay2 is nearest, then relay3


@pytest.fixture
def lab_state_root() -> Path:
    return Path("/run/meshvpn/c")  # short: control sockets live below it


def relay_node_id(lab: Lab, index: int) -> str:
    status = node_status(lab, f"relay{index}")
    assert status is not None
    return str(status["node_id"])


def tool(lab: Lab, node: str, *args: str, timeout: float = 60) -> str:
    """mqtt_tool.py inside ``node``, as that node (enrolled with the broker if it was not)."""
    host, port = broker_address(lab).split(":")
    argv = [sys.executable, TOOL, "--state-dir", str(enroll(lab, node)), host, port, *args]
    return lab.exec(node, argv, timeout=timeout).stdout.decode().strip()


def retained(lab: Lab, node: str, topic: str) -> bytes:
    return bytes.fromhex(tool(lab, node, "retained", topic))


def publish_all(lab: Lab, node: str, items: list[tuple[str, bytes, bool]]) -> None:
    path = lab.state_dir / f"publish-{os.getpid()}.json"
    path.write_text(json.dumps([[t, p.hex(), r] for t, p, r in items]))
    tool(lab, node, "publish", str(path), timeout=120)


def kill_agent(lab: Lab, node: str) -> None:
    status = node_status(lab, node)
    assert status is not None
    os.kill(int(status["pid"]), signal.SIGKILL)


def mesh_lab(make_lab: Any, clients: int = 1) -> Lab:
    lab = make_lab(3, clients, latency_ms=LATENCY)
    start_broker(lab)
    for i in (1, 2, 3):
        start_relay(lab, i, broker=True)
    return lab


def test_connect_picks_the_nearest_relay(make_lab: Any) -> None:
    lab = mesh_lab(make_lab)
    out = discover_and_connect(lab, 1)
    assert "connected" in out
    assert fetch(lab, "client1", "/ip").decode() == str(lab.plan.relay(2).wan_addr)
    status = node_status(lab, "client1")
    assert status is not None
    assert status["relay"]["node_id"] == relay_node_id(lab, 2)
    assert LATENCY[1] <= status["relay"]["rtt_ms"] < LATENCY[2]
    assert status["directory"]["relays"] == 3
    relay = node_status(lab, "relay2")
    assert relay is not None
    assert relay["counters"]["requests:granted"] == 1
    (peer,) = relay["peers"]
    assert peer["client_id"] == status["identity_public_key"]


def test_dead_relay_is_cleared_and_the_next_nearest_chosen(make_lab: Any) -> None:
    lab = mesh_lab(make_lab, clients=2)
    discover_and_connect(lab, 1)
    nearest = relay_node_id(lab, 2)
    assert retained(lab, "client2", announce_topic(nearest))
    kill_agent(lab, "relay2")
    deadline = time.monotonic() + 10
    while retained(lab, "client2", announce_topic(nearest)):
        assert time.monotonic() < deadline, "last will did not clear the announcement"
        time.sleep(0.2)
    discover_and_connect(lab, 2)
    status = node_status(lab, "client2")
    assert status is not None
    assert status["relay"]["node_id"] == relay_node_id(lab, 3)
    assert fetch(lab, "client2", "/ip").decode() == str(lab.plan.relay(3).wan_addr)


def test_broker_outage_does_not_touch_the_data_plane(make_lab: Any) -> None:
    lab = make_lab(1, 1)
    broker_pid = start_broker(lab)
    start_relay(lab, 1, "--announce-ttl", "15", broker=True)
    discover_and_connect(lab, 1)
    node_id = relay_node_id(lab, 1)
    # download continuously for the whole outage, in the background
    report = lab.state_dir / "download.json"
    loop = (
        "import json, time, urllib.request\n"
        f"url = 'http://{lab.plan.internet.web_addr}/bytes/2000000'\n"
        "got = fails = 0\n"
        "end = time.monotonic() + 36\n"
        "while time.monotonic() < end:\n"
        "    try:\n"
        "        got += len(urllib.request.urlopen(url, timeout=10).read())\n"
        "    except OSError:\n"
        "        fails += 1\n"
        f"open({str(report)!r}, 'w').write(json.dumps({{'bytes': got, 'fails': fails}}))\n"
    )
    downloader = lab.spawn("client1", [sys.executable, "-c", loop])
    time.sleep(2)
    os.kill(broker_pid, signal.SIGKILL)
    time.sleep(30)
    restarted = time.time_ns() // 1_000_000
    start_broker(lab)
    relay = node_status(lab, "relay1")
    assert relay is not None
    refresh_s = 15 / 3
    deadline = time.monotonic() + refresh_s + 1
    while True:
        wire = retained(lab, "client1", announce_topic(node_id))
        if wire and _issued_ms(wire) >= restarted:
            break
        assert time.monotonic() < deadline, "announcement not back within one refresh interval"
        time.sleep(0.2)
    while not report.exists():
        time.sleep(0.5)
    result = json.loads(report.read_text())
    assert result["fails"] == 0
    assert result["bytes"] >= 2_000_000 * 10
    del downloader
    relay = node_status(lab, "relay1")
    assert relay is not None
    assert relay["broker"]["outages"] >= 1
    assert relay["broker"]["connected"]


def _fuzz_payloads(rng: random.Random, good: bytes, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        kind = rng.randrange(5)
        if kind == 0:
            data = bytearray(good)
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            out.append(bytes(data))
        elif kind == 1:
            out.append(good[: rng.randrange(len(good))])
        elif kind == 2:
            out.append(rng.randbytes(rng.randrange(1, 600)))
        elif kind == 3:
            out.append(good + rng.randbytes(rng.randrange(1, 64)))
        else:
            out.append(
                rng.randbytes(rng.randrange(4097, 8000))
            )  # oversized, under the broker's cap
    return out


def test_hostile_messages_are_counted_and_survived(make_lab: Any) -> None:
    lab = make_lab(1, 2)
    start_broker(lab)
    start_relay(lab, 1, broker=True)
    discover_and_connect(lab, 1)
    relay_id = relay_node_id(lab, 1)
    rng = random.Random(20261124)
    good_announce = retained(lab, "client2", announce_topic(relay_id))
    # The broker lets client2 write only its own announcement topic (test_broker.py
    # shows it), so the hostile announcements all come from there.
    own = announce_topic(own_node_id(lab, "client2"))
    forger = new_ed25519()
    expired = sign(_announcement_of(forger, issued_ms=1, expires_ms=2), forger)
    items = [(own, payload, False) for payload in _fuzz_payloads(rng, good_announce, 1500)]
    items += [(session_topic(relay_id), p, False) for p in _fuzz_payloads(rng, good_announce, 1500)]
    items += [(own, expired, False)] * 50
    # signed by someone else than the topic's owner
    items += [(own, sign(_announcement_of(forger), forger), False)] * 50
    publish_all(lab, "client2", items)
    time.sleep(1)
    relay = node_status(lab, "relay1")
    client = node_status(lab, "client1")
    assert relay is not None, "the relay died under hostile input"
    assert client is not None, "the client died under hostile input"
    rejected = {k: v for k, v in relay["counters"].items() if k.startswith("rejected:")}
    assert sum(rejected.values()) >= 1500
    assert client["directory"]["rejected"].get("expired", 0) >= 1
    assert client["directory"]["rejected"].get("wrong-topic", 0) >= 50
    assert sum(client["directory"]["rejected"].values()) >= 1500
    # and a legitimate client still gets in
    discover_and_connect(lab, 2)
    assert fetch(lab, "client2", "/ip").decode() == str(lab.plan.relay(1).wan_addr)


def own_node_id(lab: Lab, node: str) -> str:
    """The node id of ``node``'s keys, whether or not an agent runs there."""
    identity = load_identity(node_state_dir(lab, node))
    return node_id_of(identity.identity_public)


def _issued_ms(wire: bytes) -> int:
    message = verify(wire, Announcement).message
    assert isinstance(message, Announcement)
    return message.issued_ms


def _announcement_of(key: PrivateKey, **changes: int) -> Announcement:
    import dataclasses  # noqa: PLC0415
    import ipaddress  # noqa: PLC0415

    now = time.time_ns() // 1_000_000
    ann = Announcement(
        wireguard_key=PublicKey(bytes(32)),
        control_key=PublicKey(bytes(32)),
        endpoints=((ipaddress.ip_address("192.0.2.66"), 51820),),
        probe_port=51821,
        mesh_address=mesh_address_of(key.ed25519_public()).packed,
        roles=3,
        geohash="",
        price_per_gib=0,
        capacity=1,
        load=0,
        version="evil",
        issued_ms=now,
        expires_ms=now + 60_000,
    )
    return dataclasses.replace(ann, **changes)


def test_broker_sees_no_client_key_or_address(make_lab: Any) -> None:
    lab = make_lab(1, 1)
    start_broker(lab)
    start_relay(lab, 1, broker=True)
    from scapy.packet import Raw  # noqa: PLC0415

    with lab.capture("broker", "wan0") as packets:
        discover_and_connect(lab, 1)
    status = node_status(lab, "client1")
    assert status is not None
    stream = b"".join(bytes(p[Raw].load) for p in packets if Raw in p)
    assert len(stream) > 500, "the capture saw no MQTT traffic"
    key = PublicKey.from_b64(status["wireguard_public_key"])
    address = status["address"].split("/")[0]
    import ipaddress  # noqa: PLC0415

    for secret in (
        key.raw,
        key.b64.encode(),
        address.encode(),
        ipaddress.ip_address(address).packed,
    ):
        assert secret not in stream


def test_no_broker_or_no_relay_is_one_clear_line(make_lab: Any) -> None:
    lab = make_lab(1, 1)
    node = "client1"
    enroll(lab, node)
    argv = meshvpn_argv(
        "connect", "--state-dir", str(node_state_dir(lab, node)), "--broker", broker_address(lab),
        "--interface", "mvx0", "--timeout", "2",
    )  # fmt: skip
    proc = lab.exec(node, argv, check=False, timeout=60)
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 5
    assert len(lines) == 1
    assert "broker" in lines[0] and "unreachable" in lines[0]
    start_broker(lab)  # a broker, but no relay announces on it
    proc = lab.exec(node, argv, check=False, timeout=60)
    lines = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 5
    assert len(lines) == 1
    assert "no usable relay" in lines[0]
