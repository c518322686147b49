"""The lab network itself, before any VPN: reachability, home-router NAT, sealing, cleanup."""

from __future__ import annotations

import errno
import gc
import json
import os
import subprocess
import sys
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
from meshvpn.lab.topology import LAB_RANGES, owns_netns

if TYPE_CHECKING:
    from collections.abc import Callable

    MakeLab = Callable[[int, int], Lab]

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


# -- sealing ------------------------------------------------------------------------


def _route_in_lab(dst: str) -> bool:
    net = ip_network(dst, strict=False)
    if isinstance(net, IPv4Network):
        return any(net.subnet_of(r) for r in ROUTABLE_V4)
    return any(net.subnet_of(r) for r in ROUTABLE_V6)


def test_every_namespace_is_sealed(make_lab: MakeLab) -> None:
    lab = make_lab(2, 2)
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
    lab_pids = [p for n in lab.plan.nodes for p in netns.netns_pids(n.netns)]
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
        assert len(owned_namespaces(prefix)) == 6
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
