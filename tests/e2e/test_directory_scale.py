"""A new client is sent every retained announcement at once, and must keep them all.

Thousands of relays announce through the lab's real broker (``meshvpn
broker``), each over its own TLS connection (``meshvpn.lab.crowd``); a client
then connects. Past about 4,400 relays, the broker's
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
    enroll,
    meshvpn_argv,
    node_ifname,
    node_state_dir,
    start_broker,
)

pytestmark = pytest.mark.e2e

RELAYS = 5000  # past the ~4,400 that 1 MiB of broker queue held

# Runs inside relay1's namespace: entry-only relays (so no client can pick one),
# each announcing over its own TLS connection with its own certificate.
PUBLISHER = """
import asyncio, random, sys
from pathlib import Path
from meshvpn.lab import crowd
from meshvpn.mqtt import BrokerAddress

broker, ca_dir, count, host = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
relays = crowd.make_relays(crowd.Population(host, exit_share=0.0), 0, count, random.Random(1))
certs = crowd.certificates(relays, Path(ca_dir))
asyncio.run(crowd.announce(relays, certs, BrokerAddress.parse(broker), Path(ca_dir)))
print(len(relays))
"""


@pytest.fixture
def lab_state_root() -> Path:
    return Path("/run/meshvpn/d")  # short: the client's control socket lives below it


def test_a_new_client_keeps_every_retained_announcement(make_lab: Any) -> None:
    lab = make_lab(1, 1)
    start_broker(lab)
    endpoint = str(lab.plan.relay(1).wan_addr)
    ca_dir = str(node_state_dir(lab, "broker"))
    argv = [sys.executable, "-c", PUBLISHER, broker_address(lab), ca_dir, str(RELAYS), endpoint]
    published = lab.exec("relay1", argv, timeout=300).stdout.decode().strip()
    assert published == str(RELAYS)

    enroll(lab, "client1")
    connect = meshvpn_argv(
        "connect", "--broker", broker_address(lab), "--interface", node_ifname(lab, "client1"),
        "--state-dir", str(node_state_dir(lab, "client1")),
    )  # fmt: skip
    proc = lab.exec("client1", connect, check=False, timeout=60)
    err = proc.stderr.decode()
    # None is an exit, so the client cannot connect; it says how many relays it saw.
    assert proc.returncode != 0
    assert f"the broker listed {RELAYS} relay(s)" in err, err
