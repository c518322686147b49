"""A crowd of simulated relays, for scale tests and benchmarks.

Each simulated relay shows the control plane what a real one does: identity
and control keys of its own, a broker certificate from the lab broker's CA
(the broker's ACL lets a node write only its own announcement topic), one
signed Announcement retained on its topic, and an authenticated RTT probe
responder on a UDP port of its own. Nothing else of a relay (no WireGuard,
no sessions). They all live in one process, at one address.

``announce`` publishes them the way relays do, each over its own TLS
connection with its own certificate (``certificates`` issues them, as
enrollment would): connect, publish retained at QoS 1, disconnect, a few
connections at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt

from meshvpn import broker as brokerd
from meshvpn import pki
from meshvpn.clock import now_ms
from meshvpn.directory import announce_topic
from meshvpn.identity import (
    PrivateKey,
    PublicKey,
    mesh_address_of,
    new_ed25519,
    new_x25519,
    node_id_of,
)
from meshvpn.messages import ROLE_ENTRY, ROLE_EXIT, Announcement, sign
from meshvpn.mqtt import BrokerAddress, BrokerCredentials
from meshvpn.probe import ProbeResponder

GEOHASH_CHARS = "0123456789bcdefghjkmnpqrstuvwxyz"


@dataclass(frozen=True)
class SimRelay:
    identity: PrivateKey = field(repr=False)
    control: PrivateKey = field(repr=False)
    topic: str
    wire: bytes
    probe_port: int


@dataclass(frozen=True)
class Population:
    """What the crowd looks like: a share ``near_share`` of the relays have geohashes
    starting with ``near`` (the client's location), ``exit_share`` are exits."""

    host: str  # every relay's endpoint and probe address
    probe_base: int = 20000  # relay i answers probes on probe_base + i
    near: str = "u33d"
    near_share: float = 0.01
    exit_share: float = 0.8
    ttl_ms: int = 3_600_000


def make_relays(
    population: Population, first: int, count: int, rng: random.Random
) -> list[SimRelay]:
    """Relays ``first`` .. ``first + count - 1``; ``rng`` picks geohash, price, load, roles."""
    relays = []
    now = now_ms()
    for index in range(first, first + count):
        identity, control = new_ed25519(), new_x25519()
        head = population.near if rng.random() < population.near_share else ""
        geohash = head + "".join(rng.choice(GEOHASH_CHARS) for _ in range(6 - len(head)))
        port = population.probe_base + index
        ann = Announcement(
            wireguard_key=PublicKey(os.urandom(32)),
            control_key=control.x25519_public(),
            endpoints=((ipaddress.ip_address(population.host), 51820),),
            probe_port=port,
            mesh_address=mesh_address_of(identity.ed25519_public()).packed,
            roles=ROLE_ENTRY | (ROLE_EXIT if rng.random() < population.exit_share else 0),
            geohash=geohash,
            price_per_gib=rng.randrange(500_000, 3_000_000, 1000),
            capacity=100,
            load=rng.randrange(0, 100),
            version="0.1.0",
            issued_ms=now,
            expires_ms=now + population.ttl_ms,
        )
        topic = announce_topic(node_id_of(identity.ed25519_public()))
        relays.append(SimRelay(identity, control, topic, sign(ann, identity), port))
    return relays


def certificates(relays: list[SimRelay], ca_dir: Path) -> list[bytes]:
    """Each relay's broker certificate from the lab broker's CA, as enrollment gives it."""
    ca_key, ca_pem = brokerd.load_ca(ca_dir)
    now = dt.datetime.now(dt.UTC)
    return [
        pki.issue_client(ca_key, ca_pem, r.identity.ed25519_public(), pki.ROLE_NODE, now=now)
        for r in relays
    ]


async def announce(
    relays: list[SimRelay],
    certs: list[bytes],
    broker: BrokerAddress,
    ca_dir: Path,
    *,
    connections: int = 16,
) -> float:
    """Publish every relay's announcement over its own connection, with its own
    certificate (``certificates``); seconds until all are acknowledged."""
    _, ca_pem = brokerd.load_ca(ca_dir)
    now = dt.datetime.now(dt.UTC)
    gate = asyncio.Semaphore(connections)
    with tempfile.TemporaryDirectory() as tmp:
        ca_file = Path(tmp) / "ca.crt"
        ca_file.write_bytes(ca_pem)

        async def one(relay: SimRelay, leaf: bytes) -> None:
            async with gate:
                cert = Path(tmp) / f"{relay.probe_port}.crt"
                cert.write_bytes(leaf)
                public = relay.identity.ed25519_public()
                enrollment = pki.check_client(leaf, ca_pem, public, now)
                credentials = BrokerCredentials(cert, ca_file, enrollment, relay.identity)
                client = aiomqtt.Client(
                    broker.dial or broker.host,
                    broker.port,
                    identifier=f"crowd-{os.urandom(8).hex()}",
                    tls_context=credentials.context(broker.host),
                    timeout=60,
                )
                async with client:
                    await client.publish(relay.topic, relay.wire, qos=1, retain=True, timeout=60)
                cert.unlink()

        start = time.perf_counter()
        await asyncio.gather(*(one(r, c) for r, c in zip(relays, certs, strict=True)))
        return time.perf_counter() - start


async def answer_probes(relays: list[SimRelay], host: str) -> list[asyncio.BaseTransport]:
    """A real probe responder per relay, on its port; close the transports to stop."""
    from relay.agent import ProbeProtocol  # noqa: PLC0415 - the relay's own responder

    loop = asyncio.get_running_loop()
    transports: list[asyncio.BaseTransport] = []
    for relay in relays:
        transport, _ = await loop.create_datagram_endpoint(
            lambda r=relay: ProbeProtocol(ProbeResponder(r.control)),  # type: ignore[misc]
            local_addr=(host, relay.probe_port),
        )
        transports.append(transport)
    return transports


@contextlib.contextmanager
def more_files(wanted: int = 65536) -> Iterator[None]:
    """One socket per simulated relay: raise this process's open-file limit meanwhile."""
    import resource  # noqa: PLC0415 - Unix only, and only here

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, wanted)), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
