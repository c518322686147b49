"""The lab network itself, before any VPN: reachability, home-router NAT, the broker's
namespace, relay latency, sealing, cleanup."""

from __future__ import annotations

import errno
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

import meshvpn
from meshvpn.errors import LocalError
from meshvpn.lab import Lab, netns
from meshvpn.lab import lab as lab_module
from meshvpn.lab.httpserver import pattern
from meshvpn.lab.topology import DELAY_PORTS, LAB_RANGES, owns_netns

if TYPE_CHECKING:
    from collections.abc import Callable

    MakeLab = Callable[..., Lab]  # (relays, clients, **Lab.up options)

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(meshvpn.__file__).resolve().parent.parent
FETCH = """
import sys, urllib.error, urllib.request
try:
    body = urllib.request.urlopen(sys.argv[1], timeout=10).read()
except urllib.error.HTTPError as e:
    sys.stdout.write(f"HTTP {e.code}")
else:
    sys.stdout.buffer.write(body)
"""
ROUTABLE_V4 = (*LAB_RANGES, IPv4Network("127.0.0.0/8"))
ROUTABLE_V6 = (IPv6Network("::1/128"), IPv6Network("ff00::/8"))  # loopback, multicast


# Small programs run inside lab nodes. Servers print "listening on" once bound.
TCP_WHO = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening on", flush=True)
while True:
    conn, peer = srv.accept()
    with conn:
        conn.sendall(peer[0].encode())
"""
TCP_ASK = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
    sys.stdout.write(s.recv(100).decode())
"""
UDP_ECHO = """
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    sel.register(s, selectors.EVENT_READ)
print("listening on", flush=True)
while True:
    for key, _ in sel.select():
        data, peer = key.fileobj.recvfrom(2048)
        key.fileobj.sendto(data + f" {peer[0]}:{peer[1]}".encode(), peer)
"""
UDP_PING = """
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
rtts = []
for i in range(n):
    t = time.monotonic()
    s.sendto(b"ping %d" % i, (host, port))
    data, src = s.recvfrom(2048)
    rtts.append((time.monotonic() - t) * 1000)
    assert data.startswith(b"ping %d " % i), data
seen = data.split()[-1].decode()
print(json.dumps({"rtts_ms": rtts, "reply_from": f"{src[0]}:{src[1]}", "relay_saw": seen}))
"""
# Bulk download: the sink asks with "go COUNT SIZE MBIT"; the source answers with COUNT
# datagrams of SIZE bytes, numbered, paced at MBIT Mbit/s.
UDP_SOURCE = """
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("listening on", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    _, count, size, mbit = data.split()
    count, size, pps = int(count), int(size), float(mbit) * 1e6 / 8 / int(size)
    pad, start, i = bytes(size - 8), time.monotonic(), 0
    while i < count:
        due = min(count, int((time.monotonic() - start) * pps) + 1)
        while i < due:
            s.sendto(struct.pack("!Q", i) + pad, peer)
            i += 1
        time.sleep(0.0005)
"""
UDP_SINK = """
import json, socket, struct, sys, time
host, port, mbit = sys.argv[1], int(sys.argv[2]), sys.argv[5]
count, size = int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: hold the whole transfer
s.connect((host, port))
s.settimeout(3)
s.send(f"go {count} {size} {mbit}".encode())
seen, first, last = set(), None, None
try:
    while len(seen) < count:
        data = s.recv(4096)
        last = time.monotonic()
        first = first or last
        seen.add(struct.unpack("!Q", data[:8])[0])
except TimeoutError:
    pass
print(json.dumps({"got": len(seen), "seconds": (last - first) if first else None}))
"""


def spawn_server(lab: Lab, node: str, name: str, code: str, *args: str) -> int:
    """Run a ``python -c`` server in ``node``; return its pid once it prints ``listening on``."""
    log = lab.state_dir / f"{node}-{name}.log"
    pid = lab.spawn(node, [sys.executable, "-c", code, *args], log=log)
    deadline = time.monotonic() + 20
    while b"listening on" not in log.read_bytes():
        assert time.monotonic() < deadline, log.read_text()
        assert not gone(pid), log.read_text()
        time.sleep(0.02)
    return pid


def run_json(lab: Lab, node: str, code: str, *args: str) -> dict[str, object]:
    out = lab.exec(node, [sys.executable, "-c", code, *args], timeout=60).stdout
    result: dict[str, object] = json.loads(out)
    return result


def delay_pids(lab: Lab) -> dict[str, int]:
    """Public address -> pid of the delay forwarder listening on it."""
    procs = lab.status()["processes"]
    assert isinstance(procs, list)
    forwarders = [p for p in procs if p["argv"][1:3] == ["-m", "meshvpn.lab.delay"]]
    return {p["argv"][p["argv"].index("--listen") + 1]: p["pid"] for p in forwarders}


def fetch(lab: Lab, node: str, path: str) -> bytes:
    url = f"{lab.plan.web_url}{path}"
    return lab.exec(node, [sys.executable, "-c", FETCH, url], timeout=30).stdout


def root_snapshot() -> dict[str, str]:
    def out(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    return {
        "link": out("ip", "-j", "link"),
        "route": out("ip", "-j", "route"),
        "rule": out("ip", "-j", "rule"),
        "nft": out("nft", "list", "ruleset"),
    }


def owned_namespaces(prefix: str) -> list[str]:
    return [n for n in netns.list_netns() if owns_netns(prefix, n)]


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for an init that does not reap counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def assert_nothing_left(prefix: str, state_dir: Path, pids: list[int]) -> None:
    assert owned_namespaces(prefix) == []
    assert not state_dir.exists()
    for pid in pids:
        assert gone(pid), pid


# -- reachability -------------------------------------------------------------------


def test_client_reaches_web_with_its_own_address(make_lab: MakeLab) -> None:
    lab = make_lab(2, 1)
    assert fetch(lab, "client1", "/ip") == str(lab.plan.client(1).uplink_addr).encode()
    body = fetch(lab, "client1", "/bytes/1000000")
    assert len(body) == 1_000_000
    assert body == pattern(1_000_000)


def test_lan_hosts_are_natted_by_their_home_router(make_lab: MakeLab) -> None:
    lab = make_lab(2, 1)
    for i in (1, 2):
        assert fetch(lab, f"lan{i}", "/ip") == str(lab.plan.relay(i).wan_addr).encode()
    # The relays themselves reach the web from their WAN address, un-NATted.
    assert fetch(lab, "relay2", "/ip") == str(lab.plan.relay(2).wan_addr).encode()
    nat = lab.exec("relay1", ["nft", "list", "table", "ip", "lab_home"]).stdout.decode()
    assert "masquerade" in nat


def test_web_server_answers_bad_paths(make_lab: MakeLab) -> None:
    lab = make_lab(1, 1)
    assert fetch(lab, "client1", "/nothing") == b"HTTP 404"
    assert fetch(lab, "client1", f"/bytes/{2 * 1024**3 + 1}") == b"HTTP 400"
    assert fetch(lab, "client1", "/bytes/-1") == b"HTTP 400"
    assert fetch(lab, "client1", "/bytes/0") == b""
    assert fetch(lab, "client1", "/bytes/300") == pattern(300)


# -- the broker's namespace ---------------------------------------------------------


def test_broker_is_reachable_from_clients_and_relays(make_lab: MakeLab) -> None:
    lab = make_lab(1, 1)
    broker = lab.plan.broker
    assert lab.netns("broker") == broker.netns == f"{lab.prefix}-broker"
    spawn_server(lab, "broker", "tcpwho", TCP_WHO, str(broker.addr), str(broker.port))
    for node, addr in (
        ("client1", lab.plan.client(1).uplink_addr),
        ("relay1", lab.plan.relay(1).wan_addr),
        ("lan1", lab.plan.relay(1).wan_addr),  # through its home router's NAT
    ):
        ask = [sys.executable, "-c", TCP_ASK, str(broker.addr), str(broker.port)]
        assert lab.exec(node, ask).stdout == str(addr).encode(), node
    # The broker is an ordinary host of the lab's internet.
    assert fetch(lab, "broker", "/ip") == str(broker.addr).encode()


# -- relay latency -------------------------------------------------------------------


def test_latency_is_added_at_the_public_address(make_lab: MakeLab) -> None:
    lab = make_lab(2, 1, latency_ms=[60, 5])
    r1, r2 = lab.plan.relays
    for r in (r1, r2):
        spawn_server(lab, r.name, "echo", UDP_ECHO, *map(str, DELAY_PORTS))

    def ping(addr: object, port: int = DELAY_PORTS[0]) -> tuple[float, dict[str, object]]:
        out = run_json(lab, "client1", UDP_PING, str(addr), str(port), "5")
        rtts = out["rtts_ms"]
        assert isinstance(rtts, list)
        return statistics.median(rtts), out

    far, out = ping(r1.public_addr)
    assert far >= 60, out
    # Like a port-forwarding NAT: the relay sees the public address, the reply comes from it.
    assert out["reply_from"] == f"{r1.public_addr}:{DELAY_PORTS[0]}"
    assert str(out["relay_saw"]).startswith(f"{r1.public_addr}:")
    near, out = ping(r2.public_addr)
    assert 5 <= near < 60, out
    far_probe, out = ping(r1.public_addr, DELAY_PORTS[1])  # the agent's probe port too
    assert far_probe >= 60, out
    # The WAN address is still there, without delay, and the relay sees the client itself.
    direct, out = ping(r1.wan_addr)
    assert direct < 60, out
    assert str(out["relay_saw"]).startswith(f"{lab.plan.client(1).uplink_addr}:")


def test_bulk_udp_through_a_forwarder_loses_little(make_lab: MakeLab) -> None:
    lab = make_lab(1, 1, latency_ms=[20])
    relay = lab.plan.relay(1)
    spawn_server(lab, "relay1", "source", UDP_SOURCE, str(DELAY_PORTS[0]))
    count, size, mbit = 7500, 1400, 200  # 10.5 MB, as a WireGuard download would arrive
    args = (str(relay.public_addr), str(DELAY_PORTS[0]), str(count), str(size), str(mbit))
    out = run_json(lab, "client1", UDP_SINK, *args)
    got = out["got"]
    assert isinstance(got, int)
    assert got >= 0.99 * count, out
    # The forwarder's own counters: nothing dropped in its queue or on sending.
    pid = delay_pids(lab)[str(relay.public_addr)]
    log = lab.state_dir / f"internet-delay-{relay.name}.log"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while b"stopped:" not in log.read_bytes():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    counters = dict(kv.split("=") for kv in log.read_text().split("stopped:")[1].split())
    assert counters["queue_full"] == counters["send_failed"] == "0", counters
    assert int(counters["forwarded_down"]) == count, counters


def test_latency_lab_status_load_and_down(
    new_prefix: Callable[[], str], lab_state_root: Path
) -> None:
    before = root_snapshot()
    lab = Lab(new_prefix(), lab_state_root)
    try:
        with pytest.raises(LocalError, match="one entry per relay"):
            lab.up(2, 1, latency_ms=[60])
        assert owned_namespaces(lab.prefix) == []
        lab.up(3, 1, latency_ms=[60, None, 0])
        other = Lab.load(lab.prefix, lab_state_root)
        assert other.plan == lab.plan
        assert other.plan.relay(1).latency_ms == 60
        assert other.plan.relay(2).public_addr is None
        status = other.status()
        json.dumps(status)
        assert status["broker"] == "203.0.113.2:8883"
        assert status["latency"] == [
            {"relay": "relay1", "public_addr": "203.0.113.101", "wan_addr": "198.51.100.2",
             "latency_ms": 60.0},
            {"relay": "relay3", "public_addr": "203.0.113.103", "wan_addr": "198.51.100.10",
             "latency_ms": 0.0},
        ]  # fmt: skip
        forwarders = delay_pids(other)
        assert sorted(forwarders) == ["203.0.113.101", "203.0.113.103"]
        procs = status["processes"]
        assert isinstance(procs, list)
        assert all(p["alive"] for p in procs)
        pids = [p for n in lab.plan.nodes for p in netns.netns_pids(n.netns)]
        assert set(forwarders.values()) <= set(pids)
        other.down()
        assert_nothing_left(lab.prefix, lab.state_dir, pids)
        assert root_snapshot() == before
    finally:
        lab.down()


# -- sealing ------------------------------------------------------------------------


def _route_in_lab(dst: str) -> bool:
    net = ip_network(dst, strict=False)
    if isinstance(net, IPv4Network):
        return any(net.subnet_of(r) for r in ROUTABLE_V4)
    return any(net.subnet_of(r) for r in ROUTABLE_V6)


def test_every_namespace_is_sealed(make_lab: MakeLab) -> None:
    lab = make_lab(2, 2, latency_ms=[10, None])  # a forwarder and public address too
    for node in lab.plan.nodes:
        for family in ("-4", "-6"):
            raw = lab.exec(node.name, ["ip", "-j", family, "route", "show", "table", "all"])
            for route in json.loads(raw.stdout or b"[]"):
                dst = route["dst"]
                if dst == "default":
                    assert node.gateway is not None, (node.name, route)
                    assert ip_address(route["gateway"]) == node.gateway, (node.name, route)
                else:
                    assert _route_in_lab(dst), (node.name, route)
        # Only loopback and the planned veths, each with its peer in another lab namespace.
        links = json.loads(lab.exec(node.name, ["ip", "-j", "link", "show"]).stdout)
        assert sorted(link["ifname"] for link in links) == sorted(("lo", *node.ifaces))
        for link in links:
            if link["ifname"] != "lo":
                assert link.get("link_netnsid") is not None, (node.name, link)
                assert link["operstate"] == "UP", (node.name, link)
    assert not any(n.gateway is None for n in lab.plan.nodes if n.name != "internet")
    probe = "import socket; socket.create_connection(('1.1.1.1', 80), timeout=5)"
    out = lab.exec("internet", [sys.executable, "-c", probe], check=False)
    assert out.returncode != 0
    assert os.strerror(errno.ENETUNREACH).encode() in out.stderr


def test_up_and_down_leave_the_root_namespace_alone(make_lab: MakeLab) -> None:
    before = root_snapshot()
    lab = make_lab(2, 1)
    assert fetch(lab, "lan1", "/ip") == str(lab.plan.relay(1).wan_addr).encode()
    # A process the lab did not start, forking a child, and one that ignores SIGTERM.
    lab.spawn("client1", ["sh", "-c", "sleep 300 & sleep 300"])
    lab.spawn("relay1", ["sh", "-c", "trap '' TERM; sleep 300"])
    # The shells fork their sleeps a moment after spawn() returns: wait for them.
    deadline = time.monotonic() + 10
    while True:
        lab_pids = [p for n in lab.plan.nodes for p in netns.netns_pids(n.netns)]
        if len(lab_pids) >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(lab_pids) >= 5  # web server, 2 x sh, 2 x sleep
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        lab.down()
        assert bystander.poll() is None  # outside the lab: never touched
    finally:
        bystander.kill()
        bystander.wait()
    assert_nothing_left(lab.prefix, lab.state_dir, lab_pids)
    assert root_snapshot() == before
    lab.down()  # idempotent


# -- state file, failures, crashes ------------------------------------------------


def test_status_and_load_from_another_lab_object(make_lab: MakeLab) -> None:
    lab = make_lab(1, 1)
    other = Lab.load(lab.prefix, lab.state_root)
    assert other.plan == lab.plan
    status = other.status()
    json.dumps(status)
    assert status["up"] is True
    assert all(ns["exists"] for ns in status["namespaces"])  # type: ignore[attr-defined]
    procs = status["processes"]
    assert [p["argv"][2] for p in procs] == ["meshvpn.lab.httpserver"]  # type: ignore[attr-defined]
    assert all(p["alive"] for p in procs)  # type: ignore[attr-defined]
    out = other.exec("client1", ["ip", "-4", "-br", "addr", "show", "wan0"]).stdout.decode()
    assert str(lab.plan.client(1).uplink_addr) in out
    with pytest.raises(LocalError, match="no node"):
        other.netns("relay2")
    with pytest.raises(LocalError) as e:
        other.exec("client1", ["false"])
    assert "`false` in client1 failed (exit 1)" in e.value.what


def test_up_refuses_an_existing_lab(make_lab: MakeLab) -> None:
    lab = make_lab(1, 0)
    with pytest.raises(LocalError, match="already exists"):
        Lab(lab.prefix, lab.state_root).up(1, 0)
    # Nor does leaving a `with` block around the refused up() tear the lab down.
    with pytest.raises(LocalError, match="already exists"), Lab(lab.prefix, lab.state_root) as dup:
        dup.up(1, 0)
    assert fetch(lab, "lan1", "/ip") == str(lab.plan.relay(1).wan_addr).encode()


def test_load_without_a_lab(tmp_path: Path) -> None:
    with pytest.raises(LocalError) as e:
        Lab.load("nolab", tmp_path)
    assert "meshvpn lab up" in e.value.hint


@pytest.mark.parametrize("step", ["third veth", "after the web server started"])
def test_failed_up_leaves_nothing(
    step: str,
    new_prefix: Callable[[], str],
    lab_state_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = root_snapshot()

    class InjectedError(Exception):
        pass

    if step == "third veth":
        real_add_veth = netns.add_veth
        calls = []

        def add_veth(*args: str) -> None:
            calls.append(args)
            if len(calls) == 3:
                raise InjectedError
            real_add_veth(*args)

        monkeypatch.setattr(netns, "add_veth", add_veth)
    else:

        def wait_links_up(plan: object) -> None:
            raise InjectedError

        monkeypatch.setattr(Lab, "_wait_links_up", staticmethod(wait_links_up))
    spawned: list[int] = []
    real_spawn = Lab.spawn

    def spawn(self: Lab, *args: object, **kwargs: object) -> int:
        spawned.append(real_spawn(self, *args, **kwargs))  # type: ignore[arg-type]
        return spawned[-1]

    monkeypatch.setattr(Lab, "spawn", spawn)

    lab = Lab(new_prefix(), lab_state_root)
    try:
        with pytest.raises(InjectedError):
            lab.up(2, 1)
        assert len(spawned) == (0 if step == "third veth" else 1)
        assert_nothing_left(lab.prefix, lab.state_dir, spawned)
        assert root_snapshot() == before
    finally:
        lab.down()


def test_down_after_up_crashed_uses_the_state_file(
    new_prefix: Callable[[], str], lab_state_root: Path
) -> None:
    # A real crash: the process running up() is SIGKILLed once the web server runs.
    crash = """
import os, sys
from pathlib import Path
from meshvpn.lab.lab import Lab
Lab._wait_links_up = staticmethod(lambda plan: os.kill(os.getpid(), 9))
Lab(sys.argv[1], Path(sys.argv[2])).up(2, 1)
"""
    prefix = new_prefix()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", crash, prefix, str(lab_state_root)],
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == -9, proc.stderr
        assert len(owned_namespaces(prefix)) == 7  # internet, broker, 2 x (relay, lan), client
        lab = Lab.load(prefix, lab_state_root)
        status = lab.status()
        assert all(ns["exists"] for ns in status["namespaces"])  # type: ignore[attr-defined]
        pids = [p["pid"] for p in status["processes"]]  # type: ignore[attr-defined]
        assert len(pids) == 1
        lab.down()
        assert_nothing_left(prefix, lab.state_dir, pids)
    finally:
        Lab(prefix, lab_state_root).down()


def test_down_from_another_process(new_prefix: Callable[[], str], lab_state_root: Path) -> None:
    # As `meshvpn lab down` does it, while the Lab that started the web server lives on here.
    down = "import sys; from pathlib import Path; from meshvpn.lab import Lab; "
    down += "Lab(sys.argv[1], Path(sys.argv[2])).down()"
    prefix = new_prefix()
    lab = Lab(prefix, lab_state_root)
    try:
        lab.up(1, 1)
        pids = [p for n in lab.plan.nodes for p in netns.netns_pids(n.netns)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        subprocess.run(
            [sys.executable, "-c", down, prefix, str(lab_state_root)], env=env, check=True
        )
        assert_nothing_left(prefix, lab.state_dir, pids)
        del lab
        gc.collect()  # dropping a handle on a lab process is not a leak: no ResourceWarning
    finally:
        Lab(prefix, lab_state_root).down()


def test_down_without_a_state_file_finds_namespaces_by_name(
    new_prefix: Callable[[], str], lab_state_root: Path
) -> None:
    lab = Lab(new_prefix(), lab_state_root)
    try:
        lab.up(1, 0)
        lab.state_file.unlink()
        Lab(lab.prefix, lab_state_root).down()
        assert_nothing_left(lab.prefix, lab.state_dir, [])
    finally:
        lab.down()


# -- capture ------------------------------------------------------------------------


def test_capture_sees_the_fetch_and_no_ipv6(make_lab: MakeLab) -> None:
    lab = make_lab(1, 1)
    web = str(lab.plan.web_addr)
    with lab.capture("client1", "wan0") as pkts:
        assert fetch(lab, "client1", "/ip") == str(lab.plan.client(1).uplink_addr).encode()
        assert len(fetch(lab, "client1", "/bytes/1000000")) == 1_000_000
    assert pkts, "captured nothing"
    to_web = [p for p in pkts if p.haslayer(TCP) and p[IP].dst == web and p[TCP].dport == 80]
    assert to_web
    assert {IPv4Address(p[IP].src) for p in to_web} == {lab.plan.client(1).uplink_addr}
    assert not [p for p in pkts if p.haslayer(IPv6)]  # IPv6 is off on lab veths
    # Nothing dropped under a burst: every byte of the download is accounted for.
    # (Sizes from the headers: a coalesced 64 KiB frame may be cut short in the pcap.)
    from_web = [p for p in pkts if p.haslayer(TCP) and p[IP].src == web]
    payload = sum(p[IP].len - 4 * p[IP].ihl - 4 * p[TCP].dataofs for p in from_web)
    assert payload > 1_000_000


def test_capture_on_a_missing_interface_fails_clearly(make_lab: MakeLab) -> None:
    lab = make_lab(1, 1)
    with (
        pytest.raises(LocalError, match="capture on client1 nosuch"),
        lab.capture("client1", "nosuch"),
    ):
        pass


def test_corrupt_state_is_refused_by_load_and_cleaned_by_down(tmp_path: Path) -> None:
    lab = Lab("corrupt", tmp_path)
    lab.state_dir.mkdir(parents=True)
    lab.state_file.write_text('{"version": 1, "prefix": "corrupt"}')
    with pytest.raises(LocalError, match="corrupt lab state"):
        Lab.load("corrupt", tmp_path)
    lab.down()  # cleans up by the names the prefix owns
    assert not lab.state_dir.exists()
    assert lab_module.LabState.from_json(
        lab_module.LabState("x", 1, 0, ("x-internet",)).to_json()
    ) == lab_module.LabState("x", 1, 0, ("x-internet",))
    with_latency = lab_module.LabState("x", 2, 0, latency_ms=(60.0, None))
    assert lab_module.LabState.from_json(with_latency.to_json()) == with_latency
    bad = with_latency.to_json().replace("60.0", "true")
    with pytest.raises(ValueError, match="bad latency_ms"):
        lab_module.LabState.from_json(bad)
