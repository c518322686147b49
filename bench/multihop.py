"""Multi-hop throughput: a 3-relay meshvpn path vs. a chain of plain wireguard-go tunnels.

One lab: client1, and relay1 — relay2 — relay3 in a mesh whose links are
pinned to a chain, so relay1 is the entry, relay2 the transit and relay3 the
exit; an iperf3 server listens on the lab internet's web address. Two arms
between the same namespaces, taken in turn as in ``bench/throughput.py``
(the order reverses every round):

- meshvpn: ``meshvpn connect --broker --entry relay1 --exit relay3``, what a
  user gets: the client's access link to the entry (MTU 1420) carrying its
  end-to-end WireGuard session with the exit (MTU 1340, ``INNER_MTU``), the
  entry and the transit forwarding that ciphertext over their mesh links
  (one wireguard-go per link, MTU 1420), the exit's policy and NAT, the
  receipts. A fresh client identity each round, as the metered arm of
  ``bench/throughput.py`` does;
- plain, the baseline: the same nesting built by hand with the same
  wireguard-go binary and MTUs, beside the running agents: on the client an
  access tunnel to relay1 and, inside it, a tunnel to relay3's ULA address
  (fwmark and wg-quick's two policy rules); relay1 forwards from its access
  tunnel into a link tunnel to relay2, relay2 from that link into a link
  tunnel to relay3, where the inner tunnel ends and a bare nftables
  masquerade lets it out. One wireguard-go per tunnel end, as in meshvpn.

Per arm and round, iperf3 from client1: TCP up, TCP down and UDP up; the
ratio is paired (each meshvpn run over the plain run of the same round and
test). Agent CPU and RSS as in ``bench/throughput.py``, for the client and
all three relays, and ``wireguard_cpu_s_per_gb``: the wireguard-go CPU of
each node per GB delivered, in both arms (where the data plane's time goes,
whatever the machine's load). ``--profile`` adds a round under perf(1) and
py-spy first.

    python bench/multihop.py [--rounds N] [--seconds S] [--quick] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import CLK_TCK, GB, Benchmark, Goal, write_report
from throughput import (
    TESTS,
    Arm,
    IperfServer,
    MeshvpnArm,
    PlainArm,
    Rounds,
    Tally,
    iperf,
    report,
    run_rounds,
    sh,
)

from meshvpn.lab import Lab
from meshvpn.lab.nodes import start_broker, start_mesh, wait_mesh_routes

BENCHMARK = Benchmark(
    name="multihop",
    title="Multi-hop: a 3-relay meshvpn path vs. a chain of plain wireguard-go tunnels",
    order=35,
    needs_root=True,
    profiles=True,
    goals=(
        Goal("TCP up, meshvpn 3 hops / plain chain", "ratio_tcp_up", ">=", 0.95),
        Goal("TCP down, meshvpn 3 hops / plain chain", "ratio_tcp_down", ">=", 0.95),
        Goal("UDP up, meshvpn 3 hops / plain chain", "ratio_udp_up", ">=", 0.95),
    ),
)

CHAIN = [(1, 2), (2, 3)]  # entry relay1, transit relay2, exit relay3
OUTER_MTU = 1420  # meshvpn.agent.TUNNEL_MTU, relay.mesh.LINK_MTU
INNER_MTU = 1340  # meshvpn.client.INNER_MTU: IPv6 + UDP + WireGuard less
KEEPALIVE = "5"  # meshvpn.client.PATH_KEEPALIVE, relay.mesh.LINK_KEEPALIVE
MESH_RANGE = "fd00::/8"  # relay.mesh.MESH_RANGE: the plain ULAs go through the same rule
ULA = "fd0b:3e4c:5a1e::"  # the plain chain's addresses: ::1 entry, ::2 transit, ::3 exit
CLIENT6 = f"{ULA}10"
ACCESS_PORT, LINK_A_PORT, LINK_B_PORT, INNER_PORT = 51901, 51902, 51903, 51904
INNER_NET = "100.64.1"  # the relays' pools are 100.64.0.0/24
MARK = "51821"
EQUAL_RATE = "25M"  # iperf3 -b: both arms carry it even on a loaded machine


@dataclass
class PlainChainArm(PlainArm):
    """Plain wireguard-go, nested and chained as meshvpn's multi-hop path is.

    Tunnel ends ("sides"): client access ``ca`` and inner ``ci``; entry access
    ``ea`` and link ``el``; transit links ``t1`` (to the entry) and ``t2``;
    exit link ``xl`` and inner ``xi``. The relays' ends stay up (``prepare``),
    the client's come and go (``up``/``down``)."""

    name: str = "plain"
    started: list[str] = field(default_factory=list)

    def _end(self, node: str, side: str, *wg: str, mtu: int, addrs: tuple[str, ...]) -> None:
        """One wireguard-go tunnel end: ``wg set`` arguments after the private key."""
        key, _ = self._key(side)
        self._wireguard_go(node, side)
        ifname = self.ifname(side)
        sh(self.lab, node, "wg", "set", ifname, "private-key", str(key), *wg)
        for addr in addrs:
            sh(self.lab, node, "ip", "address", "add", addr, "dev", ifname)
        sh(self.lab, node, "ip", "link", "set", ifname, "mtu", str(mtu), "up")

    def _wan(self, index: int, port: int) -> str:
        return f"{self.lab.plan.relay(index).wan_addr}:{port}"

    def _link(self, node: str, side: str, port: int, peer: str, to: int, addr: str) -> None:  # noqa: PLR0917
        """A mesh link's end, as relay.mesh makes it: the neighbour its only peer."""
        self._end(node, side, "listen-port", str(port), "peer", peer, "endpoint",
                  self._wan(to, port), "allowed-ips", MESH_RANGE, "persistent-keepalive",
                  KEEPALIVE, mtu=OUTER_MTU, addrs=(addr,))  # fmt: skip

    def _route6(self, node: str, dest: str, side: str) -> None:
        sh(self.lab, node, "ip", "-6", "route", "add", dest, "dev", self.ifname(side))

    def prepare(self) -> None:
        pub = {
            side: self._key(side)[1] for side in ("ca", "ci", "ea", "el", "t1", "t2", "xl", "xi")
        }
        # entry: the client's access link, and a link to the transit
        self._end("relay1", "ea", "listen-port", str(ACCESS_PORT), "peer", pub["ca"],
                  "allowed-ips", f"{CLIENT6}/128", mtu=OUTER_MTU,
                  addrs=(f"{ULA}1/128",))  # fmt: skip
        self._link("relay1", "el", LINK_A_PORT, pub["t1"], 2, f"{ULA}1/128")
        self._route6("relay1", f"{CLIENT6}/128", "ea")
        for far in ("2", "3"):
            self._route6("relay1", f"{ULA}{far}/128", "el")
        # transit: a link each way
        self._link("relay2", "t1", LINK_A_PORT, pub["el"], 1, f"{ULA}2/128")
        self._link("relay2", "t2", LINK_B_PORT, pub["xl"], 3, f"{ULA}2/128")
        for near in ("1", "10"):
            self._route6("relay2", f"{ULA}{near}/128", "t1")
        self._route6("relay2", f"{ULA}3/128", "t2")
        # exit: the link from the transit, and the end of the client's inner tunnel
        self._link("relay3", "xl", LINK_B_PORT, pub["t2"], 2, f"{ULA}3/128")
        for near in ("1", "2", "10"):
            self._route6("relay3", f"{ULA}{near}/128", "xl")
        self._end("relay3", "xi", "listen-port", str(INNER_PORT), "peer", pub["ci"],
                  "allowed-ips", f"{INNER_NET}.2/32", mtu=OUTER_MTU,
                  addrs=(f"{INNER_NET}.1/24",))  # fmt: skip
        for node in ("relay1", "relay2", "relay3"):  # the agents set these too
            sh(self.lab, node, "sysctl", "-q", "net.ipv6.conf.all.forwarding=1")
        wan = self.lab.plan.relay(3).wan_iface
        rules = (
            "table ip bench_plain {\n chain postrouting {\n"
            "  type nat hook postrouting priority srcnat; policy accept;\n"
            f'  ip saddr {INNER_NET}.0/24 oifname "{wan}" masquerade\n }}\n}}\n'
        )
        self.lab.exec("relay3", ["nft", "-f", "-"], input=rules.encode())

    def up(self) -> None:
        pub = {side: self._key(side)[1] for side in ("ea", "xi")}
        self._end("client1", "ca", "fwmark", MARK, "peer", pub["ea"], "endpoint",
                  self._wan(1, ACCESS_PORT), "allowed-ips", MESH_RANGE, "persistent-keepalive",
                  KEEPALIVE, mtu=OUTER_MTU, addrs=(f"{CLIENT6}/128",))  # fmt: skip
        self._route6("client1", MESH_RANGE, "ca")
        self._end("client1", "ci", "fwmark", MARK, "peer", pub["xi"], "endpoint",
                  f"[{ULA}3]:{INNER_PORT}", "allowed-ips", "0.0.0.0/0", "persistent-keepalive",
                  KEEPALIVE, mtu=INNER_MTU, addrs=(f"{INNER_NET}.2/32",))  # fmt: skip
        ci = self.ifname("ci")
        sh(self.lab, "client1", "ip", "route", "add", "default", "dev", ci, "table", MARK)
        sh(self.lab, "client1", "ip", "rule", "add", "not", "fwmark", MARK, "table", MARK,
           "priority", "32751")  # fmt: skip
        sh(self.lab, "client1", "ip", "rule", "add", "table", "main", "suppress_prefixlength",
           "0", "priority", "32750")  # fmt: skip
        sh(self.lab, "client1", "sysctl", "-q", "net.ipv4.conf.all.src_valid_mark=1")
        deadline = time.monotonic() + 15
        while sh(self.lab, "client1", "wg", "show", ci, "latest-handshakes").split()[-1] == "0":
            if time.monotonic() > deadline:
                raise RuntimeError("the plain chain did not handshake end to end")
            time.sleep(0.02)

    def down(self) -> None:
        for prio in ("32750", "32751"):
            self.lab.exec("client1", ["ip", "rule", "del", "priority", prio], check=False)
        self._stop("ci")
        self._stop("ca")  # wireguard-go takes its interface and routes with it

    def close(self) -> None:
        for side in list(self.procs):
            self._stop(side)

    def dataplane(self) -> dict[str, list[int]]:
        nodes = {"c": "client", "e": "entry", "t": "transit", "x": "exit"}
        out: dict[str, list[int]] = {}
        for side, proc in self.procs.items():
            out.setdefault(nodes[side[0]], []).append(proc.pid)
        return out


@dataclass
class MultihopArm(MeshvpnArm):
    """``meshvpn connect --broker --entry relay1 --exit relay3``; every agent is measured."""

    relay_pids: dict[str, int] = field(default_factory=dict)

    def agents(self) -> dict[str, int]:
        return {**self.relay_pids, "client_agent": self.client_pid}


def user_sys_s(pids: list[int]) -> tuple[float, float]:
    """User and system CPU seconds of these processes so far (gone ones count 0)."""
    user = system = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            user += int(fields[11]) / CLK_TCK
            system += int(fields[12]) / CLK_TCK
    return user, system


def equal_rate(lab: Lab, arms: list[Arm], seconds: float, server: IperfServer) -> dict[str, Any]:
    """Where the data plane's time goes with the rate taken out: TCP and UDP up at
    ``EQUAL_RATE`` (which both arms carry on a loaded machine) through each arm, the
    user and system CPU seconds of each node's wireguard-go per GB delivered. At
    full rate the slower arm also batches fewer packets per wake-up, which costs
    CPU per byte by itself; at one rate, a difference is work one arm adds."""
    out: dict[str, Any] = {"rate": EQUAL_RATE}
    for test in ("tcp_up", "udp_up"):
        for arm in arms:
            arm.up()
            try:
                planes = arm.dataplane()
                before = {node: user_sys_s(pids) for node, pids in planes.items()}
                got = iperf(lab, test, seconds, rate=EQUAL_RATE)
                if got.stalled or not got.bytes:
                    server.restart()
                    continue
                gb = got.bytes / GB
                figures: dict[str, Any] = {"mbit_s": round(got.bps / 1e6, 1)}
                for node, pids in planes.items():
                    user, system = user_sys_s(pids)
                    figures[f"{node}_user_s_per_gb"] = round((user - before[node][0]) / gb, 1)
                    figures[f"{node}_sys_s_per_gb"] = round((system - before[node][1]) / gb, 1)
                out.setdefault(arm.name, {})[test] = figures
            finally:
                arm.down()
    return out


def measure(rounds: Rounds, profile: bool) -> dict[str, Any]:
    tally = Tally()
    with Lab(f"bh{os.getpid() % 100_000:05d}") as lab:
        lab.up(3, 1)
        start_broker(lab)
        started = start_mesh(lab, CHAIN)
        wait_mesh_routes(lab, 60)
        ids = {i: str(s["node_id"]) for i, s in started.items()}
        server = IperfServer(lab)
        server.start()
        plain = PlainChainArm(lab)
        meshvpn = MultihopArm(
            lab,
            int(started[1]["pid"]),
            metered=True,
            route=("--entry", ids[1], "--exit", ids[3]),
            relay_pids={
                f"{role}_agent": int(started[i]["pid"])
                for i, role in ((1, "entry"), (2, "transit"), (3, "exit"))
            },
        )
        arms: list[Arm] = [meshvpn, plain]
        costs: dict[str, Any] = {}
        try:
            plain.prepare()
            if profile:
                costs = equal_rate(lab, arms, rounds.seconds, server)
            run_rounds(lab, arms, server, rounds, tally, profile=profile)
        finally:
            plain.close()
            server.stop()
    out = report(TESTS, tally)
    # throughput.report names these after its own metered arm
    out.pop("metered_exchange", None)
    out.pop("metered_cut_offs", None)
    out["meshvpn_cut_offs"] = len(tally.stalled.get("meshvpn", []))
    out["mtu"] = {"outer": OUTER_MTU, "inner": INNER_MTU}
    if costs:
        out["wireguard_cpu_at_equal_rate"] = costs
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="per iperf3 run")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of idle sampling")
    parser.add_argument("--quick", action="store_true", help="one round of short runs")
    parser.add_argument(
        "--profile", action="store_true", help="a round under perf(1) and py-spy first"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.idle = 1, 1.5, 0.5
    write_report(measure(Rounds(args.rounds, args.seconds, args.idle), args.profile), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
