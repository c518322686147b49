"""A receipt flood for the accounting service, run inside a lab namespace as a script.

python flood_tool.py parties SEED FILE                  -> write the parties (JSON) to FILE
python flood_tool.py flood HOST PORT SEED COUNT RATE CA_DIR [packed]
                                                        -> announce the relays, then publish

Everything follows from SEED: the relays' and clients' keys, the sessions,
and the order of COUNT receipt bundles (cumulative, with duplicates and
receipts out of order, as at-least-once delivery produces), so two runs
publish the very same stream. The relays announce themselves (retained) the
way real ones do; the bundles go to each exit relay's receipts topic at
about RATE per second, each message acknowledged by the broker (QoS 1):
one bundle a message, or with ``packed`` as relays deliver them (several
of a relay's bundles packed into one, ``accounting.receipts.pack_bundles``). The
broker lets a relay write only its own topics, so each relay connects as
itself, with a certificate from the broker CA in CA_DIR (the lab's).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import random
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from accounting.receipts import GIB, Receipt, ReceiptBundle, pack_bundles, sign_receipt
from meshvpn import broker as brokerd
from meshvpn import pki
from meshvpn.broker import MAX_PAYLOAD
from meshvpn.directory import announce_topic
from meshvpn.identity import PrivateKey, node_id_of
from meshvpn.messages import ROLE_ENTRY, ROLE_EXIT, Announcement, sign
from meshvpn.mqtt import BrokerCredentials

RELAYS, CLIENTS, SESSIONS = 3, 4, 24
PACK_WINDOW = 48  # packed: bundles taken together, as a relay's delivery pass takes them


def keys(seed: int) -> tuple[list[PrivateKey], list[PrivateKey]]:
    rng = random.Random(seed)
    relays = [PrivateKey(rng.randbytes(32)) for _ in range(RELAYS)]
    clients = [PrivateKey(rng.randbytes(32)) for _ in range(CLIENTS)]
    return relays, clients


def parties(seed: int) -> dict[str, list[str]]:
    relays, clients = keys(seed)
    return {
        "relays": [node_id_of(k.ed25519_public()) for k in relays],
        "clients": [node_id_of(k.ed25519_public()) for k in clients],
    }


def stream(seed: int, count: int) -> list[tuple[str, bytes]]:
    """(topic, bundle) in publishing order."""
    relays, clients = keys(seed)
    rng = random.Random(seed + 1)
    sessions = []
    for _ in range(SESSIONS):
        path = rng.sample(relays, rng.randint(1, 2))
        sessions.append((rng.randbytes(16), rng.choice(clients), path, rng.choice([1, 10**6])))
    state = {s[0]: [0, 0, 0] for s in sessions}  # up, down, seq
    out: list[tuple[str, bytes]] = []
    while len(out) < count:
        session_id, client, path, price = rng.choice(sessions)
        up_down_seq = state[session_id]
        up_down_seq[0] += rng.randint(0, 1 << 20)
        up_down_seq[1] += rng.randint(0, GIB // 8)
        up_down_seq[2] += 1
        receipt = Receipt(
            session_id=session_id,
            client=client.ed25519_public(),
            path=tuple(k.ed25519_public() for k in path),
            bytes_up=up_down_seq[0],
            bytes_down=up_down_seq[1],
            price_per_gib=price,
            seq=up_down_seq[2],
            started_ms=1_800_000_000_000,
            issued_ms=1_800_000_000_000 + up_down_seq[2],
        )
        bundle = ReceiptBundle.from_client(sign_receipt(receipt, client))
        for relay in path:
            bundle = bundle.add_countersignature(relay)
        topic = f"meshvpn/v1/receipts/{node_id_of(path[-1].ed25519_public())}"
        out.append((topic, bundle.encode()))
        if out and rng.random() < 0.1:  # a resend of an older one: duplicate or stale
            out.append(rng.choice(out))
    return out[:count]


def announcement(key: PrivateKey, index: int) -> bytes:
    from meshvpn.identity import mesh_address_of  # noqa: PLC0415

    now = int(time.time() * 1000)
    ann = Announcement(
        wireguard_key=PrivateKey(bytes([index + 1]) * 32).x25519_public(),
        control_key=PrivateKey(bytes([index + 101]) * 32).x25519_public(),
        endpoints=((ipaddress.ip_address(f"198.51.100.{10 + index}"), 51820),),
        probe_port=51821,
        mesh_address=mesh_address_of(key.ed25519_public()).packed,
        roles=ROLE_ENTRY | ROLE_EXIT,
        geohash="u33d",
        price_per_gib=10**6,
        capacity=100,
        load=0,
        version="flood",
        issued_ms=now,
        expires_ms=now + 3_600_000,
    )
    return sign(ann, key)


def relay_client(key: PrivateKey, host: str, port: int, ca_dir: Path) -> mqtt.Client:
    """Connected as ``key``'s node, with a certificate made for it now."""
    now = dt.datetime.now(dt.UTC)
    leaf, ca, enrollment = pki.read_bundle(brokerd.enroll(ca_dir, key.ed25519_public()),
                                           key.ed25519_public(), now)  # fmt: skip
    # in the lab's state, removed with it
    where = ca_dir.parent / f"flood-{node_id_of(key.ed25519_public())}"
    where.mkdir(exist_ok=True)
    (where / "node.crt").write_bytes(leaf)
    (where / "ca.crt").write_bytes(ca)
    creds = BrokerCredentials(where / "node.crt", where / "ca.crt", enrollment, key)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.tls_set_context(creds.context(host))
    client.max_queued_messages_set(0)
    client.connect(host, port)
    client.loop_start()
    return client


def messages(items: list[tuple[str, bytes]], packed: bool) -> list[tuple[str, int, bytes]]:
    """(topic, receipts in it, payload): one bundle a message, or (``packed``) as relays
    send them, each relay's next bundles packed into as few messages as fit."""
    if not packed:
        return [(topic, 1, wire) for topic, wire in items]
    out = []
    for start in range(0, len(items), PACK_WINDOW):
        by_topic: dict[str, list[bytes]] = {}
        for topic, wire in items[start : start + PACK_WINDOW]:
            by_topic.setdefault(topic, []).append(wire)
        for topic, wires in by_topic.items():
            out += [(topic, n, m) for n, m in pack_bundles(wires, MAX_PAYLOAD)]
    return out


def flood(
    host: str, port: int, seed: int, count: int, rate: float, *, ca_dir: Path, packed: bool
) -> int:
    relays, _ = keys(seed)
    clients = {}
    for i, relay in enumerate(relays):
        node_id = node_id_of(relay.ed25519_public())
        clients[node_id] = client = relay_client(relay, host, port, ca_dir)
        topic = announce_topic(node_id)
        client.publish(topic, announcement(relay, i), qos=1, retain=True).wait_for_publish(10)
    items = stream(seed, count)
    sent = 0
    started = time.monotonic()
    for topic, receipts, payload in messages(items, packed):
        info = clients[topic.rsplit("/", 1)[1]].publish(topic, payload, qos=1)
        info.wait_for_publish(30)
        sent += receipts
        lag = started + sent / rate - time.monotonic()
        if lag > 0:
            time.sleep(lag)
    for client in clients.values():
        client.loop_stop()
        client.disconnect()
    return len(items)


if __name__ == "__main__":
    if sys.argv[1] == "parties":
        with open(sys.argv[3], "w") as fh:  # noqa: PTH123
            json.dump(parties(int(sys.argv[2])), fh)
    else:
        host, port, seed, count, rate, ca_dir, *how = sys.argv[2:]
        packed = how == ["packed"]
        print(flood(host, int(port), int(seed), int(count), float(rate), ca_dir=Path(ca_dir),
                    packed=packed))  # fmt: skip
