"""The CLI as a user meets it: real processes, one-line errors, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def meshvpn(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshvpn", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def test_init_then_id(tmp_path: Path) -> None:
    state = tmp_path / "s"
    first = meshvpn("init", "--state-dir", str(state))
    assert first.returncode == 0, first.stderr
    assert "created" in first.stdout
    again = meshvpn("init", "--state-dir", str(state))
    assert again.returncode == 0
    assert "nothing changed" in again.stdout
    shown = meshvpn("id", "--state-dir", str(state))
    assert shown.returncode == 0
    assert shown.stdout.split()[2].startswith("mv")
    for name in ("identity.key", "wireguard.key", "control.key"):
        secret = (state / name).read_text().strip()
        assert secret not in first.stdout + again.stdout + shown.stdout


def test_corrupt_key(tmp_path: Path) -> None:
    assert meshvpn("init", "--state-dir", str(tmp_path)).returncode == 0
    (tmp_path / "wireguard.key").write_text("garbage!\n")
    proc = meshvpn("id", "--state-dir", str(tmp_path))
    assert proc.returncode == 3
    line = one_error_line(proc)
    assert "wireguard.key is corrupt" in line and "meshvpn init" in line


def test_unwritable_state_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    proc = meshvpn("init", "--state-dir", str(tmp_path / "file" / "state"))
    assert proc.returncode == 1
    assert "--state-dir" in one_error_line(proc)


def test_connect_with_bad_arguments(tmp_path: Path) -> None:
    assert meshvpn("init", "--state-dir", str(tmp_path)).returncode == 0
    base = ["connect", "--state-dir", str(tmp_path), "--relay", "192.0.2.1:51820"]
    proc = meshvpn(*base, "--relay-key", "nope", "--address", "100.64.0.2/32")
    assert "bad --relay-key" in one_error_line(proc)
    proc = meshvpn(*base, "--relay-key", "A" * 43 + "=", "--address", "300.1.1.1")
    assert "bad --address" in one_error_line(proc)


def test_status_and_down_without_agent(tmp_path: Path) -> None:
    assert meshvpn("init", "--state-dir", str(tmp_path)).returncode == 0
    status = meshvpn("status", "--state-dir", str(tmp_path))
    assert status.returncode == 1
    assert "not running" in status.stdout
    down = meshvpn("down", "--state-dir", str(tmp_path))
    assert down.returncode == 0
    assert "nothing left behind" in down.stdout


def test_help_explains_every_command() -> None:
    proc = meshvpn("--help")
    assert proc.returncode == 0
    for command in (
        "init",
        "id",
        "relay",
        "admit",
        "connect",
        "disconnect",
        "down",
        "status",
        "broker",
        "lab",
        "demo",
        "peers",
        "ping",
        "dashboard",
        "earnings",
        "accounting",
    ):
        assert f"    {command} " in proc.stdout
    assert "Exit codes" in proc.stdout
    assert "--json" in proc.stdout


def refused_key(proc: subprocess.CompletedProcess[str], key: Path) -> None:
    line = one_error_line(proc)
    assert proc.returncode == 3
    assert str(key) in line
    assert f"chmod 600 {key}" in line
    assert key.read_text().strip() not in proc.stdout + proc.stderr


@pytest.mark.parametrize("mode", [0o640, 0o620, 0o604, 0o602, 0o660, 0o666])
def test_a_key_open_to_others_is_refused_in_one_line(tmp_path: Path, mode: int) -> None:
    """Readable or writable by group or others: not used, and the error says the fix."""
    assert meshvpn("init", "--state-dir", str(tmp_path)).returncode == 0
    key = tmp_path / ("identity.key", "wireguard.key", "control.key")[mode % 3]
    key.chmod(mode)
    refused_key(meshvpn("id", "--state-dir", str(tmp_path)), key)


def test_the_agents_refuse_a_key_open_to_others(tmp_path: Path) -> None:
    assert meshvpn("init", "--state-dir", str(tmp_path)).returncode == 0
    key = tmp_path / "wireguard.key"
    key.chmod(0o640)
    for argv in (
        ["relay", "--broker", "203.0.113.2:8883", "--endpoint", "198.51.100.2:51820"],
        ["connect", "--broker", "203.0.113.2:8883"],
        ["connect", "--foreground", "--broker", "203.0.113.2:8883"],
    ):
        refused_key(meshvpn(*argv, "--state-dir", str(tmp_path)), key)


def test_agents_on_a_broker_need_a_certificate(tmp_path: Path) -> None:
    assert meshvpn("init", "--state-dir", str(tmp_path)).returncode == 0
    for argv in (
        ["relay", "--broker", "203.0.113.2", "--endpoint", "198.51.100.2:51820"],
        ["connect", "--broker", "203.0.113.2"],
    ):
        proc = meshvpn(*argv, "--state-dir", str(tmp_path))
        line = one_error_line(proc)
        assert proc.returncode == 3
        assert "not enrolled" in line and "meshvpn init --enroll" in line
        assert not list(tmp_path.glob("footprint*"))  # stopped before touching the host


def test_broker_enroll_then_init_enroll(tmp_path: Path) -> None:
    broker_dir, node = tmp_path / "broker", tmp_path / "node"
    made = meshvpn("broker", "init", "--state-dir", str(broker_dir), "--name", "broker.example")
    assert made.returncode == 0, made.stderr
    assert "broker.example" in made.stdout
    init = meshvpn("init", "--state-dir", str(node))
    key = next(line.split()[-1] for line in init.stdout.splitlines() if "identity key" in line)
    bundle = tmp_path / "node.pem"
    out = meshvpn("broker", "--state-dir", str(broker_dir), "enroll", key, "--out", str(bundle))
    assert out.returncode == 0, out.stderr
    enrolled = meshvpn("init", "--state-dir", str(node), "--enroll", str(bundle))
    assert enrolled.returncode == 0, enrolled.stderr
    assert "enrolled as mv" in enrolled.stdout
    assert (node / "broker.crt").exists()
    # a bundle for someone else is refused, in one line
    other = tmp_path / "other"
    assert meshvpn("init", "--state-dir", str(other)).returncode == 0
    wrong = meshvpn("init", "--state-dir", str(other), "--enroll", str(bundle))
    assert wrong.returncode == 3
    assert "not this node" in one_error_line(wrong)
    # the CA's key is a secret like any other
    (broker_dir / "ca.key").chmod(0o644)
    refused = meshvpn("broker", "enroll", key, "--state-dir", str(broker_dir))
    assert f"chmod 600 {broker_dir / 'ca.key'}" in one_error_line(refused)


def test_read_commands_without_agent_say_so_in_one_line(tmp_path: Path) -> None:
    assert meshvpn("init", "--state-dir", str(tmp_path)).returncode == 0
    for argv in (
        ["peers"],
        ["peers", "--json"],
        ["ping", "mv" + "a" * 26],
        ["dashboard"],
        ["earnings", "--json"],
    ):
        proc = meshvpn(*argv, "--state-dir", str(tmp_path))
        assert proc.returncode == 1, argv
        line = one_error_line(proc)
        assert "no " in line, line
        assert "agent" in line, line
        assert "; " in line, line  # and what to do
        assert proc.stdout == ""


def test_demo_needs_a_terminal_or_a_duration() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "meshvpn", "demo"],
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "--duration 60 --json" in one_error_line(proc)
