"""The mesh guard on real links: a node with two neighbours, each on a veth link.

    n1 (mesh fd01::1) --mvga-- guard (mesh fd00::1) --mvgb-- n2 (mesh fd02::1)

The guard node loads the per-link guard (relay/meshguard.py) beside the
relay's own table, and tells it that link a may carry fd01::/64 and link b
fd02::/64 (and each link's own subnet). Each neighbour then sends UDP to the guard's mesh address
from its own address and from forged ones (the other neighbour's, an
unrouted ULA, IPv4 from documentation space); a listener on the guard records
what arrives. Only the real sources arrive; ``mesh_spoofed`` counts the rest;
link-local neighbour discovery keeps working. Then routing changes (n2's
prefix is now offered on link a too) and one ``mesh_guard_update`` lets it in,
leaving the counter as it was. Forwarded traffic meets the guard as well.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshvpn.lab import netns
from relay.exit import ExitPolicy, exit_ruleset, parse_counters
from relay.meshguard import mesh_guard_table, mesh_guard_update
from tests.e2e.conftest import unique_prefix

pytestmark = pytest.mark.e2e

PORT = 7300
LISTENER = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
out = open(sys.argv[2], "a")
out.write("ready\n"); out.flush()
while True:
    data, src = s.recvfrom(2048)
    out.write(json.dumps([src[0], data.decode()]) + "\n"); out.flush()
"""
SENDER = r"""
import socket, sys
for spec in sys.argv[2:]:
    src, dst = spec.split(">")
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, 19, 1)  # IP_TRANSPARENT (IPv6 too): a source not ours
    s.bind((src, 0))
    for _ in range(3):
        s.sendto(spec.encode(), (dst, int(sys.argv[1])))
"""


def sh(ns: str, *argv: str) -> str:
    return netns.run(netns.exec_argv(ns, list(argv)))


@contextlib.contextmanager
def three_nodes() -> Iterator[dict[str, str]]:
    prefix = unique_prefix("g")
    names = {role: f"{prefix}-{role}" for role in ("guard", "n1", "n2")}
    made: list[str] = []
    try:
        for name in names.values():
            netns.run(["ip", "netns", "add", name])
            made.append(name)
            sh(name, "ip", "link", "set", "lo", "up")
            sh(name, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        g, n1, n2 = names["guard"], names["n1"], names["n2"]
        for link, peer, peer_ns, net6, net4 in (
            ("mvga", "mvna", n1, "fd10:a::", "198.51.100.0"),
            ("mvgb", "mvnb", n2, "fd10:b::", "198.51.100.4"),
        ):
            sh(g, "ip", "link", "add", link, "type", "veth", "peer", "name", peer, "netns", peer_ns)
            base4 = ipaddress.IPv4Address(net4)
            sh(g, "ip", "addr", "add", f"{net6}1/64", "dev", link, "nodad")
            sh(g, "ip", "addr", "add", f"{base4 + 1}/30", "dev", link)
            sh(g, "ip", "link", "set", link, "up")
            sh(peer_ns, "ip", "addr", "add", f"{net6}2/64", "dev", peer, "nodad")
            sh(peer_ns, "ip", "addr", "add", f"{base4 + 2}/30", "dev", peer)
            sh(peer_ns, "ip", "link", "set", peer, "up")
            sh(peer_ns, "ip", "-6", "route", "add", "fd00::/8", "via", f"{net6}1")
            sh(peer_ns, "ip", "route", "add", "default", "via", str(base4 + 1))
        sh(g, "ip", "addr", "add", "fd00::1/128", "dev", "lo")
        sh(n1, "ip", "addr", "add", "fd01::1/128", "dev", "lo")
        sh(n2, "ip", "addr", "add", "fd02::1/128", "dev", "lo")
        sh(g, "ip", "-6", "route", "add", "fd01::/64", "via", "fd10:a::2")
        sh(g, "ip", "-6", "route", "add", "fd02::/64", "via", "fd10:b::2")
        yield names
    finally:
        for name in reversed(made):
            with contextlib.suppress(Exception):
                for pid in netns.run(["ip", "netns", "pids", name]).split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            netns.run(["ip", "netns", "del", name])


def counters(ns: str) -> dict[str, int]:
    return parse_counters(
        sh(ns, "nft", "-j", "list", "counters", "table", "inet", "meshvpn_meshguard")
    )


def heard(out: Path) -> list[tuple[str, str]]:
    lines = out.read_text().splitlines()[1:]
    return [tuple(json.loads(line)) for line in lines]  # type: ignore[misc]


def load(ns: str, ruleset: str) -> None:
    netns.run(netns.exec_argv(ns, ["nft", "-f", "-"]), input=ruleset.encode())


def send(ns: str, *specs: str) -> None:
    sh(ns, sys.executable, "-c", SENDER, str(PORT), *specs)


def test_mesh_links_carry_only_what_routing_allows(tmp_path: Path) -> None:
    net = ipaddress.ip_network
    with three_nodes() as names:
        g, n1, n2 = names["guard"], names["n1"], names["n2"]
        links = {
            "mvga": [net("fd01::/64"), net("fd10:a::/64")],
            "mvgb": [net("fd02::/64"), net("fd10:b::/64")],
        }
        relay_table = exit_ruleset(
            "mvgw",  # no such WireGuard interface here: its rules match nothing
            ipaddress.IPv4Network("100.64.0.0/24"),
            ExitPolicy(),
            lan_networks=[],
            router_addresses=[],
        )
        load(g, relay_table + mesh_guard_table(links))
        out = tmp_path / "heard.jsonl"
        listener = subprocess.Popen(
            netns.exec_argv(g, [sys.executable, "-c", LISTENER, str(PORT), str(out)])
        )
        try:
            deadline = time.monotonic() + 10
            while not (out.exists() and out.read_text().startswith("ready")):
                assert time.monotonic() < deadline, "listener did not start"
                time.sleep(0.05)
            # neighbour discovery (link-local) works: the links carry traffic at all
            send(n1, "fd10:a::2>fd10:a::1")
            send(n2, "fd10:b::2>fd10:b::1")
            deadline = time.monotonic() + 5
            while {src for src, _ in heard(out)} != {"fd10:a::2", "fd10:b::2"}:
                assert time.monotonic() < deadline, heard(out)
                time.sleep(0.05)
            before = counters(g)["mesh_spoofed"]

            send(n1, "fd01::1>fd00::1", "fd02::1>fd00::1", "fd99::1>fd00::1",
                 "198.51.100.2>198.51.100.1", "203.0.113.9>198.51.100.1")  # fmt: skip
            send(n2, "fd02::1>fd00::1", "fd01::1>fd00::1")
            # forwarded: n1 to n2 through the guard, forged as coming from fd03::1
            send(n1, "fd03::1>fd02::1")
            time.sleep(0.5)
            got = {src for src, _ in heard(out)}
            assert got == {"fd10:a::2", "fd10:b::2", "fd01::1", "fd02::1"}, heard(out)
            spoofed = counters(g)["mesh_spoofed"] - before
            # 3 copies each of: fd02, fd99 and two IPv4 sources via a; fd01 via b; fd03
            assert spoofed >= 3 * 6

            # routing now offers n2's prefix over link a as well: one update lets it in
            links["mvga"].append(net("fd02::/64"))
            load(g, mesh_guard_update(links))
            send(n1, "fd02::1>fd00::1")
            time.sleep(0.5)
            assert ("fd02::1", "fd02::1>fd00::1") in heard(out)[-3:]
            assert counters(g)["mesh_spoofed"] - before >= spoofed  # the counter was kept
        finally:
            listener.kill()
            listener.wait()
