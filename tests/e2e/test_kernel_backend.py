"""The kernel WireGuard backend: runs only where the module exists."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from meshvpn.lab.nodes import connect_client, fetch, node_status, start_relay

pytestmark = [pytest.mark.e2e, pytest.mark.kernel_wg]

PROBE = (
    "import asyncio\n"
    "from meshvpn.wireguard.backend import kernel_wireguard_available\n"
    "raise SystemExit(0 if asyncio.run(kernel_wireguard_available()) else 1)\n"
)


def kernel_module_present() -> bool:
    # Probe in a throwaway namespace: the host sees nothing, not even the probe link.
    ns = f"mvkprobe{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE], check=False)
        return proc.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


def test_single_hop_over_kernel_wireguard(make_lab) -> None:
    if not kernel_module_present():
        pytest.skip("no kernel WireGuard module here (`ip link add type wireguard` fails)")
    lab = make_lab(1, 1)
    start_relay(lab, 1, "--wg-backend", "kernel")
    connect_client(lab, 1, 1, "--wg-backend", "kernel")
    assert fetch(lab, "client1", "/ip").decode() == str(lab.plan.relays[0].wan_addr)
    relay = node_status(lab, "relay1")
    assert relay is not None
    assert relay["backend"] == "kernel"
