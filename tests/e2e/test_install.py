"""Service files and `make install`: what a router owner installs.

Marked e2e: neither needs the lab, but both need tools CI must have
(systemd-analyze, make, pip reaching the package index), and under
MESHVPN_REQUIRE_E2E a missing tool fails the run instead of skipping it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "systemd").glob("*.service"))
HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "StateDirectory=",
    "Restart=on-failure",
    "CapabilityBoundingSet=",
)


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"needs {tool} (./run installs it)")
    return path


def verify(unit: Path, root: Path | None = None) -> str:
    argv = [need("systemd-analyze"), "verify", "--man=no"]
    if root is not None:
        argv.append(f"--root={root}")
    proc = subprocess.run([*argv, str(unit)], capture_output=True, text=True, check=False)
    # a typo'd key is only a warning with exit 0: any output at all is a failure
    return f"exit {proc.returncode}: {proc.stdout}{proc.stderr}".strip()


def test_units_exist() -> None:
    names = {u.name for u in UNITS}
    assert {"meshvpn-relay.service", "meshvpn-client.service", "meshvpn-broker.service"} <= names


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_passes_systemd_analyze_verify(unit: Path) -> None:
    assert verify(unit) == "exit 0:"
    text = unit.read_text()
    for line in HARDENING:
        assert line in text, f"{unit.name} lacks {line}"


@pytest.mark.parametrize("name", ["meshvpn-relay.service", "meshvpn-client.service"])
def test_agents_notify_and_keep_only_network_capabilities(name: str) -> None:
    text = (ROOT / "systemd" / name).read_text()
    assert "Type=notify\n" in text
    caps = next(line for line in text.splitlines() if line.startswith("CapabilityBoundingSet="))
    assert set(caps.split("=", 1)[1].split()) <= {
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_NET_BIND_SERVICE",
    }
    if name == "meshvpn-relay.service":
        assert "ExecReload=/bin/kill -HUP $MAINPID" in text


def test_verify_catches_a_typo(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    bad = tmp_path / "bad.service"
    bad.write_text(
        (ROOT / "systemd" / "meshvpn-relay.service")
        .read_text()
        .replace("ProtectHome=", "ProtectHom=")
    )
    assert "Unknown key" in verify(bad)


def make_install(
    stage: Path, prefix: Path, etc: Path, units: Path
) -> subprocess.CompletedProcess[str]:
    argv = ["make", "-C", str(ROOT), "install", f"DESTDIR={stage}", f"PREFIX={prefix}"]
    argv += [f"SYSCONFDIR={etc}", f"UNITDIR={units}"]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)


def test_make_install_into_a_scratch_root(tmp_path: Path) -> None:
    need("make")
    stage, final = tmp_path / "stage", tmp_path / "final"
    prefix, etc = final / "usr", final / "etc"
    units = final / "lib" / "systemd" / "system"
    proc = make_install(stage, prefix, etc, units)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    staged = stage / final.relative_to("/")
    # nothing in the installed scripts points into the staging area
    for script in (staged / "usr" / "lib" / "meshvpn" / "venv" / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            assert str(stage) not in script.read_text(errors="replace"), script
    # the packager moves the tree to its final place; there it works
    shutil.move(staged, final)
    meshvpn = prefix / "bin" / "meshvpn"
    assert meshvpn.is_symlink()
    help_text = subprocess.run(
        [str(meshvpn), "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "relay" in help_text
    assert "config" in help_text
    config = etc / "meshvpn" / "meshvpn.toml"
    checked = subprocess.run(
        [str(meshvpn), "config", "check", str(config)], capture_output=True, text=True, check=False
    )
    assert checked.stdout == f"{config}: ok\n", checked.stderr
    installed = sorted(p.name for p in units.iterdir())
    assert installed == [u.name for u in UNITS]
    for unit in units.iterdir():
        assert verify(unit) == "exit 0:"
    # a second install keeps the owner's config
    config.write_text("[sharing]\nprice_per_gib = 7\n")
    shutil.move(final, staged)
    again = make_install(stage, prefix, etc, units)
    assert again.returncode == 0, again.stderr
    assert (staged / "etc" / "meshvpn" / "meshvpn.toml").read_text() == (
        "[sharing]\nprice_per_gib = 7\n"
    )
