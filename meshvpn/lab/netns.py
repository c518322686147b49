"""Thin wrappers over ``ip`` and ``nft`` for the lab.

Every helper names the namespace it acts in; none of them touches the root
namespace (veths are created inside one lab namespace with their peer placed
straight into the other). A failed command raises ``LocalError`` carrying the
command line and its stderr on one line.

We drive the ``ip`` CLI rather than pyroute2: each step is then a command a
reader can paste into a shell to reproduce or debug the lab.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from meshvpn.errors import LocalError

if TYPE_CHECKING:
    from ipaddress import IPv4Address, IPv4Interface

NETNS_DIR = Path("/run/netns")
COMMAND_TIMEOUT = 30.0


def _one_line(text: str) -> str:
    return " ".join(text.split())


def run(argv: list[str], *, input: bytes | None = None, timeout: float = COMMAND_TIMEOUT) -> str:  # noqa: A002 - mirrors subprocess.run
    """Run a command; return its stdout, or raise LocalError with its stderr."""
    cmd = shlex.join(argv)
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False)
    except FileNotFoundError as e:
        raise LocalError(f"`{cmd}` failed: {argv[0]} not found", "install it (see README)") from e
    except subprocess.TimeoutExpired as e:
        raise LocalError(f"`{cmd}` timed out after {timeout:g}s") from e
    if proc.returncode != 0:
        err = _one_line(proc.stderr.decode(errors="replace")) or "(no stderr)"
        hint = "run as root" if "not permitted" in err or "denied" in err else ""
        raise LocalError(f"`{cmd}` failed (exit {proc.returncode}): {err}", hint)
    return proc.stdout.decode(errors="replace")


def exec_argv(netns: str, argv: list[str]) -> list[str]:
    """The argv that runs ``argv`` inside ``netns``."""
    return ["ip", "netns", "exec", netns, *argv]


def list_netns() -> list[str]:
    # `ip netns list` prints "name (id: N)" per line, newest first.
    return [line.split()[0] for line in run(["ip", "netns", "list"]).splitlines() if line.strip()]


def netns_exists(netns: str) -> bool:
    return (NETNS_DIR / netns).exists()


def add_netns(netns: str) -> None:
    run(["ip", "netns", "add", netns])


def delete_netns(netns: str) -> None:
    run(["ip", "netns", "delete", netns])


def add_veth(netns_a: str, iface_a: str, netns_b: str, iface_b: str) -> None:
    """A veth pair made inside ``netns_a`` with its peer created directly in ``netns_b``."""
    peer = ["peer", "name", iface_b, "netns", netns_b]
    run(["ip", "-n", netns_a, "link", "add", "name", iface_a, "type", "veth", *peer])


def link_up(netns: str, iface: str) -> None:
    run(["ip", "-n", netns, "link", "set", "dev", iface, "up"])


def link_states(netns: str) -> dict[str, str]:
    """Interface name -> operstate ("UP", "DOWN", "UNKNOWN", ...) inside ``netns``."""
    raw = json.loads(run(["ip", "-n", netns, "-j", "link", "show"]) or "[]")
    return {str(link["ifname"]): str(link.get("operstate", "UNKNOWN")) for link in raw}


def add_address(netns: str, iface: str, addr: IPv4Interface) -> None:
    run(["ip", "-n", netns, "address", "add", str(addr), "dev", iface])


def add_default_route(netns: str, gateway: IPv4Address) -> None:
    run(["ip", "-n", netns, "route", "add", "default", "via", str(gateway)])


def set_sysctls(netns: str, values: dict[str, str]) -> None:
    """Set sysctls (``net.*`` keys are per namespace) in one ``sysctl`` call."""
    if values:
        run(exec_argv(netns, ["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in values.items())]))


def nft_apply(netns: str, ruleset: str) -> None:
    run(exec_argv(netns, ["nft", "-f", "-"]), input=ruleset.encode())


def _netns_inode(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except (FileNotFoundError, PermissionError, ProcessLookupError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def pids_by_netns(names: list[str]) -> dict[int, str]:
    """Live processes in any of the named namespaces, as pid -> namespace name.

    The same test `ip netns pids` makes (compare /proc/PID/ns/net with the
    namespace's bind mount), in one pass over /proc for all namespaces.
    Zombies have no namespace any more and are not listed.
    """
    wanted = {ino: name for name in names if (ino := _netns_inode(NETNS_DIR / name))}
    found: dict[int, str] = {}
    if not wanted:
        return found
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        ino = _netns_inode(entry / "ns" / "net")
        if ino is not None and ino in wanted:
            found[int(entry.name)] = wanted[ino]
    return found


def netns_pids(netns: str) -> list[int]:
    """Live processes whose network namespace is ``netns`` (what `ip netns pids` prints)."""
    return sorted(pids_by_netns([netns]))


def signal_in_netns(pid: int, netns: str, sig: signal.Signals) -> bool:
    """Send ``sig`` to ``pid`` only if it is still a process inside ``netns``.

    The pidfd pins the process we check, so a pid reused by a process outside
    the lab between the check and the signal cannot be hit.
    """
    want = _netns_inode(NETNS_DIR / netns)
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if want is None or _netns_inode(Path(f"/proc/{pid}/ns/net")) != want:
            return False
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)
    return True
