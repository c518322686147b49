"""Keys and privileges, in the lab: no secret in any log or output, and the agents
work with only the capabilities their systemd units give them."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from meshvpn import pki
from meshvpn.identity import KEY_FILES, PrivateKey, read_key
from meshvpn.lab import Lab
from meshvpn.lab.nodes import (
    broker_address,
    enroll,
    fetch,
    meshvpn,
    meshvpn_argv,
    node_ifname,
    node_state_dir,
    node_status,
    start_broker,
    start_relay,
)

pytestmark = pytest.mark.e2e

UNITS = Path(__file__).parent.parent.parent / "systemd"
PEM_KEYS = ("server.key",)  # the broker's TLS key, PEM for mosquitto


@pytest.fixture
def lab_state_root() -> Path:
    return Path("/run/meshvpn/k")  # short: control sockets live below it


def encodings(raw: bytes) -> dict[str, bytes]:
    """Every way a 32-byte key could plausibly be written out."""
    pem = pki.private_pem(PrivateKey(raw))
    pem_body = b"".join(pem.splitlines()[1:-1])
    der = base64.b64decode(pem_body)
    return {
        "raw": raw,
        "hex": raw.hex().encode(),
        "HEX": raw.hex().upper().encode(),
        "base64": base64.b64encode(raw),
        "base64 unpadded": base64.b64encode(raw).rstrip(b"="),
        "base64url": base64.urlsafe_b64encode(raw).rstrip(b"="),
        "base32": base64.b32encode(raw).rstrip(b"="),
        "base32 lower": base64.b32encode(raw).rstrip(b"=").lower(),
        "python repr": repr(raw).encode(),
        "pkcs8 pem": pem_body,
        "pkcs8 der": der,
        # a key is also exposed by any long enough piece of it
        "hex, first half": raw.hex()[:32].encode(),
        "base64, first half": base64.b64encode(raw)[:22],
    }


def secrets_of(lab: Lab) -> dict[str, bytes]:
    """Every private key in the lab: each node's three, the broker CA's and server's."""
    found = {}
    for d in sorted((lab.state_dir / "nodes").iterdir()):
        for name in (*KEY_FILES, "ca.key"):
            if (d / name).exists():
                found[f"{d.name}/{name}"] = read_key(d / name).raw
        for name in PEM_KEYS:
            if (d / name).exists():
                key = serialization.load_pem_private_key((d / name).read_bytes(), None)
                found[f"{d.name}/{name}"] = key.private_bytes(  # type: ignore[union-attr]
                    serialization.Encoding.Raw,
                    serialization.PrivateFormat.Raw,
                    serialization.NoEncryption(),
                )
    return found


def is_key_file(path: Path) -> bool:
    return path.name in (*KEY_FILES, "ca.key", *PEM_KEYS)


def test_no_private_key_reaches_a_log_or_an_output(make_lab: Any) -> None:
    """A whole lab run with debug logging: broker, relay, client, a receipted download,
    status, errors, a clean stop. Then every file the run wrote (but the key files)
    and every output is searched for every private key in every encoding."""
    lab = make_lab(1, 1)
    start_broker(lab)
    start_relay(lab, 1, program=meshvpn_argv("-v", "relay"), broker=True)
    sd = enroll(lab, "client1")
    connect = meshvpn_argv(
        "-v", "connect", "--state-dir", str(sd), "--broker", broker_address(lab),
        "--interface", node_ifname(lab, "client1"),
    )  # fmt: skip
    outputs = [lab.exec("client1", connect)]
    assert len(fetch(lab, "client1", "/bytes/12000000")) == 12_000_000  # statements, receipts
    for node in ("relay1", "client1"):
        for args in (["status", "--json"], ["id", "--json"], ["status"]):
            argv = meshvpn_argv(*args, "--state-dir", str(node_state_dir(lab, node)))
            outputs.append(lab.exec(node, argv, check=False))
    # and errors: a second agent on the same state dir; a private key, mistyped, given
    # where a public one belongs (the error must not echo it)
    outputs.append(lab.exec("client1", connect, check=False))
    typo = (sd / "wireguard.key").read_text().strip()[:-2] + "!="
    relay_dir = str(node_state_dir(lab, "relay1"))
    admit = lab.exec("relay1", meshvpn_argv("admit", typo, "--state-dir", relay_dir), check=False)
    assert admit.returncode != 0
    outputs.append(admit)
    relay = node_status(lab, "relay1")
    assert relay is not None
    assert relay["receipts"]["receipts"] >= 1
    meshvpn(lab, "client1", "disconnect")
    meshvpn(lab, "relay1", "down")

    secrets = secrets_of(lab)
    assert len(secrets) == 3 + 3 + 2  # relay, client, broker CA and server
    texts = {f"{p}": p.read_bytes() for p in lab.state_dir.rglob("*") if p.is_file()}
    texts = {p: data for p, data in texts.items() if not is_key_file(Path(p))}
    for i, proc in enumerate(outputs):
        texts[f"output {i} of {proc.args[-8:]}"] = proc.stdout + proc.stderr
    logs = b"".join(data for p, data in texts.items() if p.endswith(".log"))
    assert b"DEBUG" in logs and b"session for client" in logs  # real, verbose logs
    assert len([p for p in texts if p.endswith("agent.log")]) == 2
    leaks = [
        f"{key} as {form} in {where}"
        for key, raw in secrets.items()
        for form, needle in encodings(raw).items()
        for where, data in texts.items()
        if needle in data
    ]
    assert not leaks
    # the search itself finds a key where one is written (the key files): it is not blind
    client_key = (sd / "identity.key").read_bytes()
    assert encodings(secrets["client1/identity.key"])["base64"] in client_key


def unit_capabilities(unit: str) -> list[str]:
    text = (UNITS / unit).read_text()
    (line,) = re.findall(r"^CapabilityBoundingSet=(.*)$", text, re.MULTILINE)
    (ambient,) = re.findall(r"^AmbientCapabilities=(.*)$", text, re.MULTILINE)
    assert ambient == line, f"{unit}: ambient and bounding sets differ"
    assert re.search(r"^NoNewPrivileges=yes$", text, re.MULTILINE)
    return [c.removeprefix("CAP_").lower() for c in line.split()]


def confined(unit: str) -> list[str]:
    """What systemd does to the agent's privileges, by setpriv: uid 0 (the units run as
    root), but only the unit's capabilities, and no way to gain any (no_new_privs)."""
    caps = ",".join(f"+{c}" for c in unit_capabilities(unit))
    return [
        "setpriv", "--no-new-privs", "--bounding-set", f"-all,{caps}", "--inh-caps", "-all",
        "--ambient-caps", "-all", "--",
    ]  # fmt: skip


# linux/capability.h, in bit order
CAP_NAMES = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid",
    "setpcap", "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw",
    "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct",
    "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time", "sys_tty_config", "mknod",
    "lease", "audit_write", "audit_control", "setfcap", "mac_override", "mac_admin", "syslog",
    "wake_alarm", "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
)  # fmt: skip


def effective_caps(pid: int) -> set[str]:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^CapEff:\s*([0-9a-f]+)$", status, re.MULTILINE)
    assert found is not None
    mask = int(found[1], 16)
    return {
        CAP_NAMES[bit] if bit < len(CAP_NAMES) else f"cap{bit}"
        for bit in range(64)
        if mask >> bit & 1
    }


def test_agents_work_with_only_their_units_capabilities(make_lab: Any) -> None:
    lab = make_lab(1, 1)
    start_broker(lab)
    relay_caps = set(unit_capabilities("meshvpn-relay.service"))
    client_caps = set(unit_capabilities("meshvpn-client.service"))
    assert "net_bind_service" not in relay_caps | client_caps  # no port below 1024
    relay = start_relay(
        lab, 1, program=[*confined("meshvpn-relay.service"), *meshvpn_argv("relay")], broker=True
    )
    assert effective_caps(relay["pid"]) == relay_caps
    sd = enroll(lab, "client1")
    connect = meshvpn_argv(
        "connect", "--state-dir", str(sd), "--broker", broker_address(lab),
        "--interface", node_ifname(lab, "client1"),
    )  # fmt: skip
    lab.exec("client1", [*confined("meshvpn-client.service"), *connect])
    client = node_status(lab, "client1")
    assert client is not None
    assert effective_caps(client["pid"]) == client_caps
    # the whole job: discovery, session, tunnel, exit NAT, metering and receipts
    assert fetch(lab, "client1", "/ip").decode() == str(lab.plan.relay(1).wan_addr)
    assert len(fetch(lab, "client1", "/bytes/12000000")) == 12_000_000
    status = node_status(lab, "relay1")
    assert status is not None
    assert status["receipts"]["receipts"] >= 1
    # and stopping cleans up with the same privileges (ExecStop)
    stop = meshvpn_argv("disconnect", "--state-dir", str(sd))
    out = lab.exec("client1", [*confined("meshvpn-client.service"), *stop]).stdout.decode()
    assert "stopped the agent" in out
    stop = meshvpn_argv("down", "--state-dir", str(node_state_dir(lab, "relay1")))
    lab.exec("relay1", [*confined("meshvpn-relay.service"), *stop])
    assert node_status(lab, "relay1") is None
