"""The relay mesh in the lab: links, routes, multi-hop sessions, failover.

Six relays whose links are pinned to a ring (relay1 … relay6, relay6 back to
relay1): relay1 and relay4 have no direct link, so a client entering at
relay1 and leaving at relay4 crosses three hops, whichever way routing sends
it. Real wireguard-go links, real routing packets, real kills.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import pytest

from accounting.exchange import tolerance
from accounting.receipts import COUNTERSIGN_LABEL, ReceiptBundle
from meshvpn.identity import PublicKey
from meshvpn.lab.httpserver import pattern
from meshvpn.lab.nodes import (
    Download,
    discover_and_connect,
    fetch,
    meshvpn,
    node_ifname,
    node_state_dir,
    node_status,
    start_broker,
    start_mesh,
    wait_mesh_routes,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from meshvpn.lab import Lab

pytestmark = pytest.mark.e2e

RING = [(1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 1)]
DOWNLOAD_BYTES = 50_000_000


def _ring(make_lab: Callable[..., Lab]) -> tuple[Lab, dict[int, dict[str, Any]]]:
    lab = make_lab(6, 1)
    start_broker(lab)
    started = start_mesh(lab, RING)
    wait_mesh_routes(lab)
    return lab, started


def _status(lab: Lab, node: str) -> dict[str, Any]:
    status = node_status(lab, node)
    assert status is not None, f"{node} does not answer"
    return status


def _connect(lab: Lab, ids: dict[int, str], *, entry: int, exit_: int) -> dict[str, Any]:
    discover_and_connect(lab, 1, "--entry", ids[entry], "--exit", ids[exit_])
    path = _status(lab, "client1")["path"]
    assert path["entry"] == ids[entry]
    assert path["exit"] == ids[exit_]
    return dict(path)


def _next_hop(lab: Lab, ids: dict[int, str], at: int, to: int) -> int:
    """Which relay ``at`` forwards to on its way to ``to`` (from its route table)."""
    mesh = _status(lab, f"relay{at}")["mesh"]
    target = _status(lab, f"relay{to}")["mesh"]["prefix"]
    via = mesh["routes"][target]["via"]
    neighbour = next(link["node_id"] for link in mesh["links"] if link["interface"] == via)
    return next(i for i, nid in ids.items() if nid == neighbour)


def _kill(lab: Lab, index: int) -> None:
    pid = _status(lab, f"relay{index}")["pid"]
    os.kill(pid, signal.SIGKILL)  # the lab started it: ours to kill


def _download_while_killing(lab: Lab, index: int) -> dict[str, Any]:
    """A 50 MB download from client1; relay ``index`` dies a second into it.
    Asserts the download completed; returns its result (with the longest stall)."""
    download = Download(lab, "client1", DOWNLOAD_BYTES)
    try:
        time.sleep(1.0)
        _kill(lab, index)
        result = download.result()
    finally:
        download.stop()
    print(f"\nrelay{index} killed: longest stall {result['max_gap_s']:.2f} s")
    assert result["error"] == ""
    assert result["bytes"] == DOWNLOAD_BYTES
    return result


def test_ring_converges_to_shortest_paths(make_lab: Callable[..., Lab]) -> None:
    lab, started = _ring(make_lab)
    ids = {i: s["node_id"] for i, s in started.items()}
    # One snapshot of every relay (a status call is a Python start-up in a namespace).
    mesh = {i: _status(lab, f"relay{i}")["mesh"] for i in ids}
    by_node = {nid: i for i, nid in ids.items()}

    def next_hop(at: int, to: int) -> int:
        via = mesh[at]["routes"][mesh[to]["prefix"]]["via"]
        return by_node[next(x["node_id"] for x in mesh[at]["links"] if x["interface"] == via)]

    # What each relay says its links cost (base cost + smoothed RTT): the routing
    # minimises their sum, so on a loaded machine a slow link may rightly make
    # the long way round the ring the cheaper one.
    cost = {(i, by_node[link["node_id"]]): link["cost"] for i in ids for link in mesh[i]["links"]}

    def ring_way(i: int, j: int, step: int) -> list[int]:
        way = [i]
        while way[-1] != j:
            way.append((way[-1] - 1 + step) % 6 + 1)
        return way

    def path_cost(way: list[int]) -> int:
        return sum(cost[a, b] for a, b in itertools.pairwise(way))

    for i in ids:
        neighbours = {link["node_id"] for link in mesh[i]["links"]}
        ring_partners = {ids[b] for a, b in RING if a == i} | {ids[a] for a, b in RING if b == i}
        assert neighbours == ring_partners, f"relay{i} linked with the wrong relays"
        for j in ids:
            if j == i:
                continue
            assert mesh[i]["routes"][mesh[j]["prefix"]]["metric"] > 0
            # Walk the next hops: they reach j, without a loop, one of the two ways
            # round the ring, and the cheaper one by the relays' own link costs
            # (within the hysteresis and the time between the status snapshots).
            walked = [i]
            while walked[-1] != j:
                walked.append(next_hop(walked[-1], j))
                assert len(walked) <= 6, f"forwarding loop from relay{i} to relay{j}: {walked}"
            ways = [ring_way(i, j, +1), ring_way(i, j, -1)]
            assert walked in ways, f"relay{i} → relay{j} left the ring: {walked}"
            cheapest = min(path_cost(w) for w in ways)
            assert path_cost(walked) <= cheapest * 1.25 + 5, (
                f"relay{i} → relay{j} takes {walked} at cost {path_cost(walked)};"
                f" the other way costs {cheapest} ({cost})"
            )

    _forged_mesh_sources_are_dropped_and_counted(lab, ids)

    # A relay that stops takes its links, routes and rule with it.
    links = [link["interface"] for link in _status(lab, "relay6")["mesh"]["links"]]
    meshvpn(lab, "relay6", "down")
    ip_links = lab.exec("relay6", ["ip", "-o", "link"]).stdout.decode()
    assert not [name for name in links if f" {name}:" in ip_links]
    assert "51830" not in lab.exec("relay6", ["ip", "-6", "rule"]).stdout.decode()
    routes = lab.exec("relay6", ["ip", "-6", "route", "show", "table", "51830"], check=False)
    assert routes.stdout.strip() == b""


def test_three_hops_entry_sees_only_ciphertext_exit_never_the_client(
    make_lab: Callable[..., Lab],
) -> None:
    lab, started = _ring(make_lab)
    ids = {i: s["node_id"] for i, s in started.items()}
    _connect(lab, ids, entry=1, exit_=4)
    client_uplink = str(lab.plan.client(1).uplink_addr)
    exit_status = _status(lab, "relay4")
    exit_ifaces = [
        "wan0",
        node_ifname(lab, "relay4"),
        *(link["interface"] for link in exit_status["mesh"]["links"]),
    ]
    body = pattern(400_000)
    with (
        lab.capture("relay1", node_ifname(lab, "relay1")) as at_entry,
        lab.capture("relay4", exit_ifaces[0]) as exit_wan,
        lab.capture("relay4", exit_ifaces[1]) as exit_access,
        lab.capture("relay4", exit_ifaces[2]) as exit_link_a,
        lab.capture("relay4", exit_ifaces[3]) as exit_link_b,
    ):
        seen_ip = fetch(lab, "client1", "/ip").decode()
        assert fetch(lab, "client1", "/bytes/400000") == body
    assert seen_ip == str(lab.plan.relay(4).wan_addr), "the web server must see the exit"

    # The entry decrypts the access link and finds only UDP (and echo) to the mesh.
    assert len(at_entry) > 100, "the entry's capture saw too little to judge"
    mesh_range = ipaddress.ip_network("fd00::/8")
    for pkt in at_entry:
        raw = bytes(pkt)
        assert body[1000:1064] not in raw, "plaintext of the download at the entry relay"
        assert b"GET /bytes/400000" not in raw, "the client's request in clear at the entry"
        if pkt.haslayer("IPv6"):
            assert (
                ipaddress.ip_address(pkt["IPv6"].dst) in mesh_range
                or ipaddress.ip_address(pkt["IPv6"].src) in mesh_range
            )
            assert (
                pkt.haslayer("UDP")
                or pkt.haslayer("ICMPv6EchoRequest")
                or pkt.haslayer("ICMPv6EchoReply")
            )
    # The exit saw the traffic, and never the client's own address.
    exit_packets = [*exit_wan, *exit_access, *exit_link_a, *exit_link_b]
    assert len(exit_packets) > 100
    for pkt in exit_packets:
        for layer in ("IP", "IPv6"):
            if pkt.haslayer(layer):
                assert client_uplink not in (pkt[layer].src, pkt[layer].dst)
        assert client_uplink.encode() not in bytes(pkt)


def test_transit_relay_dies_during_a_download(
    make_lab: Callable[..., Lab], record_property: Callable[[str, object], None]
) -> None:
    lab, started = _ring(make_lab)
    ids = {i: s["node_id"] for i, s in started.items()}
    _connect(lab, ids, entry=1, exit_=4)
    transit = _next_hop(lab, ids, 1, 4)
    assert transit in {2, 6}
    result = _download_while_killing(lab, transit)
    record_property("transit_failover_gap_s", round(result["max_gap_s"], 2))
    assert _next_hop(lab, ids, 1, 4) == ({2, 6} - {transit}).pop(), "not routed around"


def test_entry_relay_dies_client_moves_to_its_standby(
    make_lab: Callable[..., Lab], record_property: Callable[[str, object], None]
) -> None:
    lab, started = _ring(make_lab)
    ids = {i: s["node_id"] for i, s in started.items()}
    _connect(lab, ids, entry=1, exit_=4)
    deadline = time.monotonic() + 30  # the spare is granted once the tunnel is up
    while (standby := _status(lab, "client1")["path"]["standby_entry"]) is None:
        assert time.monotonic() < deadline, "no standby entry was granted"
        time.sleep(0.5)
    assert standby not in (ids[1], ids[4])
    result = _download_while_killing(lab, 1)
    record_property("entry_failover_gap_s", round(result["max_gap_s"], 2))
    after = _status(lab, "client1")["path"]
    assert after["entry"] == standby
    assert after["exit"] == ids[4], "the session with the exit must survive"
    assert any("is silent: switching to" in line for line in after["events"])
    assert fetch(lab, "client1", "/ip").decode() == str(lab.plan.relay(4).wan_addr)


_SEND_FROM = """\
import socket, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((src, 0))
for _ in range(20):
    s.sendto(b"forged?", (dst, port))
"""

_LISTEN = """\
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind(("::", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
got = []
try:
    while True:
        got.append(s.recvfrom(100)[1][0])
except TimeoutError:
    pass
print(" ".join(got))
"""


def _forged_mesh_sources_are_dropped_and_counted(lab: Lab, ids: dict[int, str]) -> None:
    """relay2 sends to relay1 over their link from a source routing does not know,
    then from its own mesh address: only the second arrives, the first is counted."""
    link = next(
        x["interface"] for x in _status(lab, "relay2")["mesh"]["links"] if x["node_id"] == ids[1]
    )
    forged, own = "fd99:dead:beef::1", _status(lab, "relay2")["mesh"]["address"]
    lab.exec("relay2", ["ip", "-6", "addr", "add", f"{forged}/128", "dev", link, "nodad"])
    target = _status(lab, "relay1")["mesh"]["address"]
    before = _status(lab, "relay1")["dropped"]["exit_table"].get("mesh_spoofed", 0)
    port = "40999"
    listen = subprocess.Popen(
        ["ip", "netns", "exec", lab.netns("relay1"), sys.executable, "-c", _LISTEN, port, "4"],
        stdout=subprocess.PIPE,
    )
    try:
        time.sleep(0.5)
        for source in (forged, own):
            lab.exec("relay2", [sys.executable, "-c", _SEND_FROM, source, target, port])
        out, _ = listen.communicate(timeout=30)
    finally:
        if listen.poll() is None:
            listen.kill()
    senders = set(out.decode().split())
    assert own in senders, "the real mesh source must get through"
    assert forged not in senders, "a source routing does not know crossed a mesh link"
    after = _status(lab, "relay1")["dropped"]["exit_table"].get("mesh_spoofed", 0)
    assert after - before >= 20


def _journal(lab: Lab, node: str) -> list[ReceiptBundle]:
    """Every bundle the relay journaled for delivery (decoding verifies them all)."""
    db = sqlite3.connect(node_state_dir(lab, node) / "receipts.db")
    try:
        rows = db.execute("SELECT bundle FROM receipts ORDER BY session_id, seq").fetchall()
    finally:
        db.close()
    return [ReceiptBundle.decode(bytes(row[0])) for row in rows]


def test_path_receipts_are_countersigned_by_every_relay_on_the_path(
    make_lab: Callable[..., Lab],
) -> None:
    lab, started = _ring(make_lab)
    ids = {i: s["node_id"] for i, s in started.items()}
    keys = {
        i: PublicKey.from_b64(
            json.loads(meshvpn(lab, f"relay{i}", "id", "--json"))["identity_public_key"]
        )
        for i in (1, 2, 3)
    }
    _connect(lab, ids, entry=1, exit_=3)
    assert _next_hop(lab, ids, 1, 3) == 2, "the ring's shortest way is through relay2"
    size = 20_000_000
    assert fetch(lab, "client1", f"/bytes/{size}") == pattern(size)

    # Statements come every 8 MiB or 10 s: the last one covers the whole download.
    deadline = time.monotonic() + 90
    while True:
        on_path = [b for b in _journal(lab, "relay3") if len(b.receipt.path) == 3]
        if on_path and on_path[-1].receipt.bytes_down >= size:
            break
        assert time.monotonic() < deadline, (
            "no complete path receipt for the download at the exit: "
            f"{_status(lab, 'relay3')['receipts']}"
        )
        time.sleep(1.0)
    bundle = on_path[-1]
    r = bundle.receipt
    assert r.path == (keys[1], keys[2], keys[3]), "entry, transit, exit"
    assert bundle.complete
    assert len(bundle.signatures) == 3
    for relay, signature in zip(r.path, bundle.signatures, strict=True):
        relay.ed25519_verify(signature, COUNTERSIGN_LABEL + bundle.receipt_wire)

    # The bytes are the exit's own count of the end-to-end session (within tolerance).
    exit_status = _status(lab, "relay3")
    peer = next(p for p in exit_status["peers"] if p["session_id"] == r.session_id.hex())
    assert peer["role"] == "exit"
    assert size <= r.bytes_down <= peer["tx_bytes"] + tolerance(peer["tx_bytes"])
    assert r.bytes_up <= peer["rx_bytes"] + tolerance(peer["rx_bytes"])
    assert peer["receipts"]["path"] == [k.b64 for k in r.path]
    # The entry and the transit checked it against their own flow counters and signed.
    for witness in ("relay1", "relay2"):
        paths = _status(lab, witness)["receipts"]["paths"]
        assert paths["countersigned"] >= 1, f"{witness}: {paths}"
