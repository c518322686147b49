"""The broker authenticates and confines every node, on a real mosquitto in the lab.

TLS 1.3 with client certificates from the broker's own CA, the certificate's
CN (the node id) as the username, and ACLs by it (meshvpn/broker.py). The
attacker in these tests is an enrolled node, client2, speaking MQTT 5 so that
the broker's PUBACK says "not authorized" (135) out loud; what counts is that
a second node, listening with the widest subscription its ACL could allow,
never receives what was refused.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshvpn import pki
from meshvpn.directory import announce_topic, session_topic
from meshvpn.identity import load_identity, new_ed25519
from meshvpn.lab import Lab
from meshvpn.lab.nodes import (
    broker_address,
    discover_and_connect,
    enroll,
    fetch,
    node_state_dir,
    node_status,
    start_broker,
    start_relay,
)
from meshvpn.messages import Announcement, sign, verify

pytestmark = pytest.mark.e2e

TOOL = str(Path(__file__).with_name("mqtt_tool.py"))
NOT_AUTHORIZED = 135
ROOT = "meshvpn/v1"


@pytest.fixture
def lab_state_root() -> Path:
    return Path("/run/meshvpn/b")  # short: control sockets live below it


def node_id(lab: Lab, node: str) -> str:
    return load_identity(enroll(lab, node)).node_id


def tool_argv(lab: Lab, node: str, *args: str, state: Path | None = None) -> list[str]:
    """mqtt_tool.py as ``node`` (enrolled if it was not); options go before the address."""
    host, port = broker_address(lab).split(":")
    argv: list[str] = []
    rest: list[str] = []
    it = iter(args)
    for a in it:
        if a in ("--username", "--ca", "--server-name"):
            argv += [a, next(it)]
        elif a == "--key-cert":
            argv += [a, next(it), next(it)]
        elif a.startswith("--"):
            argv.append(a)
        else:
            rest.append(a)
    sd = state or node_state_dir(lab, node)
    if not (sd / "broker.crt").exists():
        enroll(lab, node)
    return [sys.executable, TOOL, "--state-dir", str(sd), *argv, host, port, *rest]


def tool(lab: Lab, node: str, *args: str, timeout: float = 60) -> Any:
    out = lab.exec(node, tool_argv(lab, node, *args), timeout=timeout).stdout.decode()
    return json.loads(out.strip().splitlines()[-1])


@contextlib.contextmanager
def watching(lab: Lab, node: str, *filters: str, at: str | None = None) -> Iterator[dict[str, Any]]:
    """``node`` subscribes to ``filters`` before the block and listens until its end
    (from the namespace ``at``, by default its own); after the block the dict holds its
    SUBACK codes and the messages it got."""
    log = lab.state_dir / f"watch-{node}-{time.monotonic_ns()}.log"
    stop = log.with_suffix(".stop")
    argv = tool_argv(lab, node, "--v5", "watch", str(stop), *filters)
    lab.spawn(at or node, argv, log=log)
    deadline = time.monotonic() + 20
    while b"subscribed" not in log.read_bytes():
        assert time.monotonic() < deadline, f"the watcher did not subscribe: {log.read_text()}"
        time.sleep(0.05)
    result: dict[str, Any] = {}
    try:
        yield result
    finally:
        stop.touch()
    deadline = time.monotonic() + 20
    while not (lines := log.read_text().strip().splitlines()) or not lines[-1].startswith("{"):
        assert time.monotonic() < deadline, f"the watcher did not finish: {log.read_text()}"
        time.sleep(0.1)
    result.update(json.loads(lines[-1]))


def publish(lab: Lab, node: str, items: list[tuple[str, bytes, bool]], *options: str) -> list[int]:
    """Publish as ``node`` (MQTT 5, QoS 1); the PUBACK reason code of each message."""
    path = lab.state_dir / f"publish-{os.getpid()}-{time.monotonic_ns()}.json"
    path.write_text(json.dumps([[t, p.hex(), r] for t, p, r in items]))
    codes = tool(lab, node, "--v5", *options, "publish", str(path))
    assert isinstance(codes, list)
    return codes


def relay_lab(make_lab: Any) -> tuple[Lab, str]:
    lab = make_lab(1, 2)
    start_broker(lab)
    status = start_relay(lab, 1, broker=True)
    return lab, str(status["node_id"])


def forged_announcement() -> bytes:
    key = new_ed25519()
    now = time.time_ns() // 1_000_000
    import ipaddress  # noqa: PLC0415

    from meshvpn.identity import PublicKey, mesh_address_of  # noqa: PLC0415

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
    return sign(ann, key)


def test_a_node_cannot_write_another_nodes_topics(make_lab: Any) -> None:
    lab, relay_id = relay_lab(make_lab)
    victim_client, attacker = node_id(lab, "client1"), node_id(lab, "client2")
    genuine = bytes.fromhex(tool_raw(lab, "client1", "retained", announce_topic(relay_id)))
    assert verify(genuine, Announcement).node_id == relay_id

    refused = [
        (announce_topic(relay_id), forged_announcement(), True),  # squat the relay's entry
        (announce_topic(relay_id), b"", True),  # or clear it, as its last will would
        (f"{ROOT}/receipts/{relay_id}", b"fake receipt", False),
        (f"{ROOT}/sync/{victim_client}/00", b"sync", False),
        (f"{ROOT}/booked/{relay_id}", b"fake ack", False),  # only accounting acks receipts
        (f"{ROOT}/credit/{attacker}", b"fake credit", True),  # nor grants credit
        (f"{ROOT}/epochs/{attacker}", b"fake epoch", True),
        (f"{ROOT}/announce/{relay_id}/x", b"under it", False),
        ("$SYS/broker/x", b"x", False),
    ]
    allowed = [
        (announce_topic(attacker), b"my own topic", False),
        (session_topic(relay_id), b"a request to the relay", False),
    ]
    with watching(lab, "client1", f"{ROOT}/#", "#") as seen:
        codes = publish(lab, "client2", refused + allowed)
        # claiming the relay's name in CONNECT changes nothing: the username is the CN
        claimed = publish(lab, "client2", refused[:1], "--username", relay_id)
    assert codes == [NOT_AUTHORIZED] * len(refused) + [0] * len(allowed)
    assert claimed == [NOT_AUTHORIZED]

    got = [(topic, bytes.fromhex(payload)) for topic, payload, _ in seen["messages"]]
    assert (announce_topic(attacker), b"my own topic") in got  # the watcher does hear
    # on the relay's topic only the relay's own signed announcements (retained, or refreshed)
    relays = [p for t, p in got if t == announce_topic(relay_id)]
    assert relays
    assert all(p and verify(p, Announcement).node_id == relay_id for p in relays)
    refused_topics = {t for t, _, _ in refused}
    assert not [t for t, _ in got if t in refused_topics and t != announce_topic(relay_id)]
    assert not [t for t, _ in got if t.startswith(f"{ROOT}/session/")]  # not theirs to read
    # the relay's retained announcement is still its own, and the relay did get the request
    now_retained = bytes.fromhex(tool_raw(lab, "client1", "retained", announce_topic(relay_id)))
    assert verify(now_retained, Announcement).node_id == relay_id
    relay = node_status(lab, "relay1")
    assert relay is not None
    assert sum(v for k, v in relay["counters"].items() if k.startswith("rejected:")) == 1


def tool_raw(lab: Lab, node: str, *args: str) -> str:
    out = lab.exec(node, tool_argv(lab, node, *args)).stdout.decode()
    return out.strip().splitlines()[-1] if out.strip() else ""


def test_a_node_cannot_read_others_requests_replies_or_receipts(make_lab: Any) -> None:
    lab, relay_id = relay_lab(make_lab)
    client = node_id(lab, "client1")
    enroll(lab, "accounting", pki.ROLE_ACCOUNTING)
    nosy = [
        "#",
        f"{ROOT}/#",
        session_topic(relay_id),
        f"{ROOT}/session/+",
        f"{ROOT}/reply/+/+",
        f"{ROOT}/reply/{client}/+",
        f"{ROOT}/sync/+/+",
        f"{ROOT}/receipts/+",
        f"{ROOT}/receipts/{relay_id}",
    ]
    with (
        watching(lab, "client2", *nosy) as eavesdropper,
        watching(lab, "accounting", f"{ROOT}/receipts/+", at="broker") as accounting,
    ):
        # a session request, its grant and the client's sync echo cross the broker...
        assert "connected" in discover_and_connect(lab, 1)
        # ...and receipts: 20 MB through the tunnel is a few statements' worth
        fetch(lab, "client1", "/bytes/20000000")
        deadline = time.monotonic() + 20
        while True:
            relay = node_status(lab, "relay1")
            assert relay is not None
            if relay["receipts"].get("delivered", 0) >= 1:
                break
            assert time.monotonic() < deadline, "no receipt reached the broker"
            time.sleep(0.5)
    topics = [t for t, _, _ in eavesdropper["messages"]]
    assert announce_topic(relay_id) in topics  # the subscriptions worked: it hears the public
    assert all(t.startswith(f"{ROOT}/announce/") for t in topics), topics
    # while the party entitled to receipts got them
    receipts = [t for t, _, _ in accounting["messages"]]
    assert receipts and set(receipts) == {f"{ROOT}/receipts/{relay_id}"}


def rogue_credentials(lab: Lab, node: str) -> tuple[Path, Path, Path]:
    """A CA of our own, and a certificate from it for ``node``'s very identity key (same CN)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = new_ed25519()
    ca_pem = pki.make_ca(ca_key, now)
    identity = load_identity(enroll(lab, node))
    cert = pki.issue_client(ca_key, ca_pem, identity.identity_public, pki.ROLE_NODE, now=now)
    where = lab.state_dir / "rogue"
    where.mkdir(exist_ok=True)
    key_path = where / "node.key"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, pki.private_pem(identity.identity_key))
    os.close(fd)
    (where / "node.crt").write_bytes(cert)
    (where / "ca.crt").write_bytes(ca_pem)
    return key_path, where / "node.crt", where / "ca.crt"


def test_unauthenticated_connections_are_refused(make_lab: Any) -> None:
    lab = make_lab(1, 1)
    start_broker(lab)
    key, cert, rogue_ca = rogue_credentials(lab, "client1")
    attempts = {
        "plain TCP, no TLS": ["--plain"],
        "TLS without a client certificate": ["--no-cert"],
        "a certificate for the same node id from another CA": ["--key-cert", str(key), str(cert)],
        "TLS 1.2": ["--tls12"],
    }
    for what, options in attempts.items():
        result = tool(lab, "client1", *options, "connect")
        assert result["connack"] is None, f"{what} was let in: {result}"
    # and a node does not talk to a broker it cannot authenticate either
    for options in (["--ca", str(rogue_ca)], ["--server-name", "broker.wrong.example"]):
        result = tool(lab, "client1", *options, "connect")
        assert result["connack"] is None
        assert "CERTIFICATE_VERIFY_FAILED" in result["error"] or "mismatch" in result["error"]
    # the positive control: the node's own certificate gets in
    assert tool(lab, "client1", "connect") == {"connack": 0, "error": ""}
