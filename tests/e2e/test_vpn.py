"""Single-hop VPN in the lab: real wireguard-go, nftables, namespaces, packets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from meshvpn.lab import Lab
from meshvpn.lab.httpserver import pattern
from meshvpn.lab.nodes import (
    RELAY_PORT,
    connect_client,
    fetch,
    meshvpn,
    meshvpn_argv,
    node_ifname,
    node_state_dir,
    node_status,
    start_relay,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def lab_state_root() -> Path:
    # Short: agents' control sockets live below it, and AF_UNIX paths max out at 108 bytes.
    return Path("/run/meshvpn/t")


def snapshot(lab: Lab, node: str) -> dict[str, Any]:
    """Everything meshvpn may touch in a node, in comparable form."""

    def run(*argv: str) -> str:
        return lab.exec(node, list(argv)).stdout.decode()

    links = sorted(link["ifname"] for link in json.loads(run("ip", "-j", "link")))
    return {
        "links": links,
        "rules4": run("ip", "-4", "rule"),
        "rules6": run("ip", "-6", "rule"),
        "routes": run("ip", "-4", "route", "show", "table", "all"),
        "nft": run("nft", "list", "ruleset"),
        "sysctl": run("sysctl", "net.ipv4.ip_forward", "net.ipv4.conf.all.src_valid_mark"),
        # from the root namespace: run inside, it would list itself
        "pids": subprocess.run(
            ["ip", "netns", "pids", lab.netns(node)], capture_output=True, check=True, text=True
        ).stdout.split(),
    }


def agent_pid(lab: Lab, node: str) -> int:
    status = node_status(lab, node)
    assert status is not None, f"{node} has no running agent"
    return int(status["pid"])


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return
        if stat[stat.rindex(")") + 2] == "Z":
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} still alive")


def test_client_reaches_internet_through_relay(make_lab) -> None:
    lab = make_lab(1, 1)
    relay = lab.plan.relays[0]
    start_relay(lab, 1)
    connect_client(lab, 1, 1)

    assert fetch(lab, "client1", "/ip").decode() == str(relay.wan_addr)
    # without the tunnel the server would see the client's own uplink address
    assert str(lab.plan.clients[0].uplink_addr) != str(relay.wan_addr)

    before = node_status(lab, "relay1")
    assert before is not None
    body = fetch(lab, "client1", "/bytes/10000000")
    assert len(body) == 10_000_000
    assert body == pattern(10_000_000)

    after = node_status(lab, "relay1")
    assert after is not None
    (peer_before,) = before["peers"]
    (peer,) = after["peers"]
    assert peer["address"] == "100.64.0.2"
    # the relay sent the download to the client: at least its bytes, plus overhead
    assert peer["tx_bytes"] - peer_before["tx_bytes"] >= 10_000_000
    client = node_status(lab, "client1")
    assert client is not None
    assert client["relay"]["rx_bytes"] >= 10_000_000


def test_no_plaintext_leaves_the_client(make_lab) -> None:
    from scapy.layers.inet import IP, UDP  # noqa: PLC0415
    from scapy.layers.inet6 import IPv6  # noqa: PLC0415

    lab = make_lab(1, 1)
    relay, client = lab.plan.relays[0], lab.plan.clients[0]
    start_relay(lab, 1)
    connect_client(lab, 1, 1)
    with lab.capture("client1", "wan0") as packets:
        assert fetch(lab, "client1", "/bytes/300000") == pattern(300_000)
        assert fetch(lab, "client1", "/ip").decode() == str(relay.wan_addr)

    ip_packets = [p for p in packets if IP in p or IPv6 in p]
    assert len(ip_packets) > 50, "the capture saw too little: is it on the right interface?"
    wg_pair = {str(client.uplink_addr), str(relay.wan_addr)}
    for pkt in ip_packets:
        assert IP in pkt, f"IPv6 left the client outside the tunnel: {pkt.summary()}"
        assert {pkt[IP].src, pkt[IP].dst} == wg_pair, f"not WireGuard to the relay: {pkt.summary()}"
        assert UDP in pkt, f"not UDP: {pkt.summary()}"
        assert RELAY_PORT in {pkt[UDP].sport, pkt[UDP].dport}, pkt.summary()
    assert not any(str(lab.plan.internet.web_addr) in p.summary() for p in packets)


def test_down_leaves_nodes_as_found(make_lab) -> None:
    lab = make_lab(1, 1)
    clean = {n: snapshot(lab, n) for n in ("relay1", "client1")}
    start_relay(lab, 1)
    connect_client(lab, 1, 1)
    busy = snapshot(lab, "client1")
    assert node_ifname(lab, "client1") in busy["links"]
    assert "lookup 51820" in busy["rules4"]

    relay_pid = agent_pid(lab, "relay1")
    out = meshvpn(lab, "client1", "disconnect")
    assert "stopped" in out
    meshvpn(lab, "relay1", "down")
    wait_gone(relay_pid)
    for node, before in clean.items():
        assert snapshot(lab, node) == before, f"{node} not restored"


def children(pid: int, name: str = "wireguard-go") -> list[int]:
    """The pids of ``pid``'s children called ``name``."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, rest = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        if int(rest.split()[1]) == pid and comm.endswith(f"({name}"):
            kids.append(int(stat.parent.name))
    return kids


def test_kill9_then_restart_removes_leftovers(make_lab) -> None:
    lab = make_lab(1, 1)
    clean = {n: snapshot(lab, n) for n in ("relay1", "client1")}
    start_relay(lab, 1)
    connect_client(lab, 1, 1)

    # relay: SIGKILL, then a restart cleans up and serves the same client again
    os.kill(agent_pid(lab, "relay1"), signal.SIGKILL)
    time.sleep(0.5)
    assert "table inet meshvpn" in snapshot(lab, "relay1")["nft"]  # the dead agent's leftovers
    start_relay(lab, 1)
    assert fetch(lab, "client1", "/ip").decode() == str(lab.plan.relays[0].wan_addr)

    # client: SIGKILL leaves its rules; status says so; down removes them
    client_pid = agent_pid(lab, "client1")
    wireguard_go = children(client_pid)
    assert len(wireguard_go) == 1, wireguard_go
    os.kill(client_pid, signal.SIGKILL)
    wait_gone(client_pid)
    wait_gone(wireguard_go[0])  # told by the kernel that its parent died (PDEATHSIG)
    status = lab.exec(
        "client1",
        meshvpn_argv("status", "--json", "--state-dir", str(node_state_dir(lab, "client1"))),
        check=False,
    )
    assert status.returncode == 1
    # the kill switch (on by default) stays up after a crash, and status says so
    assert json.loads(status.stdout) == {"running": False, "leftovers": True, "lockdown": True}
    assert "cleaned up" in meshvpn(lab, "client1", "down")

    relay_pid = agent_pid(lab, "relay1")
    meshvpn(lab, "relay1", "down")
    wait_gone(relay_pid)
    for node, before in clean.items():
        assert snapshot(lab, node) == before, f"{node} not restored"


def test_second_agent_on_same_state_dir_refuses(make_lab) -> None:
    lab = make_lab(1, 0)
    start_relay(lab, 1)
    sd = str(node_state_dir(lab, "relay1"))
    proc = lab.exec(
        "relay1",
        meshvpn_argv("relay", "--state-dir", sd, "--interface", "other0"),
        check=False,
        timeout=20,
    )
    assert proc.returncode == 4
    err = proc.stderr.decode().strip().splitlines()
    assert len(err) == 1, err
    assert "another meshvpn agent" in err[0] and "meshvpn down" in err[0]
    assert node_status(lab, "relay1") is not None  # the first one is unharmed


def _one_line_failure(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got: {lines}"
    assert lines[0].startswith("error: ")
    return lines[0]


def test_missing_wireguard_go_fails_cleanly(make_lab) -> None:
    lab = make_lab(1, 0)
    clean = snapshot(lab, "relay1")
    meshvpn(lab, "relay1", "init")
    argv = meshvpn_argv(
        "relay", "--state-dir", str(node_state_dir(lab, "relay1")),
        "--interface", node_ifname(lab, "relay1"), "--wg-backend", "userspace",
    )  # fmt: skip
    env_argv = ["env", "MESHVPN_WIREGUARD_GO=/nonexistent/wireguard-go", *argv]
    line = _one_line_failure(lab.exec("relay1", env_argv, check=False, timeout=20))
    assert "wireguard-go not found" in line and "apt-get install" in line
    assert snapshot(lab, "relay1") == clean


def test_relay_that_does_not_answer(make_lab) -> None:
    lab = make_lab(1, 1)
    clean = snapshot(lab, "client1")
    meshvpn(lab, "client1", "init")
    silent = f"{lab.plan.relays[0].wan_addr}:{RELAY_PORT}"  # the host exists, no relay runs
    argv = meshvpn_argv(
        "connect", "--state-dir", str(node_state_dir(lab, "client1")),
        "--interface", node_ifname(lab, "client1"), "--relay", silent,
        "--relay-key", "w9JA3ZxmHx9Frv/kuDhfpoX1hFoJs/3waGFnbLsqlko=",
        "--address", "100.64.0.2/32", "--timeout", "2",
    )  # fmt: skip
    proc = lab.exec("client1", argv, check=False, timeout=40)
    line = _one_line_failure(proc)
    assert proc.returncode == 5
    assert f"relay {silent} did not answer" in line and "meshvpn admit" in line
    time.sleep(0.3)
    assert snapshot(lab, "client1") == clean


def test_lab_down_after_a_failing_test_leaves_nothing(make_lab) -> None:
    prefix = f"tf{os.getpid() % 1000}"
    lab = Lab(prefix)
    with pytest.raises(RuntimeError, match="boom"), lab:
        lab.up(1, 1)
        start_relay(lab, 1)
        connect_client(lab, 1, 1)
        raise RuntimeError("boom")
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, check=True).stdout.decode()
    assert prefix not in names
    assert not lab.state_dir.exists()
    leftover = subprocess.run(["pgrep", "-f", str(lab.state_dir)], capture_output=True, check=False)
    assert leftover.stdout == b"", "a process of the lab survived"
    wg = subprocess.run(
        ["pgrep", "-af", f"wireguard-go -f {prefix}"], capture_output=True, check=False
    )
    assert wg.stdout == b""
