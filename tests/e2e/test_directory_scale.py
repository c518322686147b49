"""A new client is sent every retained announcement at once, and must keep them all.

Thousands of relays announce through the lab's real broker (``meshvpn
broker``); a client then connects. Past about 4,400 relays, the broker's
per-client queue (1 MiB once) dropped the rest of the burst and the client's
sync echo with it, and the client's MQTT queue (4,096 once) dropped more: the
client chose from a partial directory after waiting out its gather timeout.
bench/scale.py measures how fast; this only checks that nothing is lost.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from meshvpn.lab.nodes import (
    broker_address,
    meshvpn,
    meshvpn_argv,
    node_ifname,
    node_state_dir,
    start_broker,
)

pytestmark = pytest.mark.e2e

RELAYS = 6000

# Runs inside relay1's namespace: sign RELAYS announcements of entry-only relays
# (so no client can pick one) and publish them retained, QoS 1, over one connection.
PUBLISHER = """
import asyncio, ipaddress, os, sys
import aiomqtt
from meshvpn.clock import now_ms
from meshvpn.directory import announce_topic
from meshvpn.identity import PublicKey, mesh_address_of, new_ed25519, node_id_of
from meshvpn.messages import ROLE_ENTRY, Announcement, sign

host, port, count, endpoint = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
now = now_ms()
items = []
for i in range(count):
    key = new_ed25519()
    ann = Announcement(
        wireguard_key=PublicKey(os.urandom(32)), control_key=PublicKey(os.urandom(32)),
        endpoints=((ipaddress.ip_address(endpoint), 51820),), probe_port=51821,
        mesh_address=mesh_address_of(key.ed25519_public()).packed, roles=ROLE_ENTRY,
        geohash="u33d", price_per_gib=1000, capacity=10, load=0, version="0.1.0",
        issued_ms=now, expires_ms=now + 600_000,
    )
    items.append((announce_topic(node_id_of(key.ed25519_public())), sign(ann, key)))

async def main():
    async with aiomqtt.Client(host, port, max_inflight_messages=64) as client:
        client.pending_calls_threshold = 100
        window = asyncio.Semaphore(64)
        async def one(topic, wire):
            async with window:
                await client.publish(topic, wire, qos=1, retain=True, timeout=60)
        await asyncio.gather(*(one(t, w) for t, w in items))

asyncio.run(main())
print(len(items))
"""


@pytest.fixture
def lab_state_root() -> Path:
    return Path("/run/meshvpn/d")  # short: the client's control socket lives below it


def test_a_new_client_keeps_every_retained_announcement(make_lab: Any) -> None:
    lab = make_lab(1, 1)
    start_broker(lab)
    host, port = broker_address(lab).split(":")
    endpoint = str(lab.plan.relay(1).wan_addr)
    argv = [sys.executable, "-c", PUBLISHER, host, port, str(RELAYS), endpoint]
    published = lab.exec("relay1", argv, timeout=180).stdout.decode().strip()
    assert published == str(RELAYS)

    meshvpn(lab, "client1", "init")
    connect = meshvpn_argv(
        "connect", "--broker", broker_address(lab), "--interface", node_ifname(lab, "client1"),
        "--state-dir", str(node_state_dir(lab, "client1")),
    )  # fmt: skip
    proc = lab.exec("client1", connect, check=False, timeout=60)
    err = proc.stderr.decode()
    # None is an exit, so the client cannot connect; it says how many relays it saw.
    assert proc.returncode != 0
    assert f"the broker listed {RELAYS} relay(s)" in err, err
