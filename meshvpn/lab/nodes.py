"""Running meshvpn nodes inside the lab: relays, clients, the demo.

The lab (``lab.py``) builds the sealed network; this module puts agents on
it, the same way a user would: ``meshvpn init``, ``meshvpn relay``,
``meshvpn admit`` and ``meshvpn connect``, each run inside the node's
namespace. Tests, the demo and ``meshvpn lab up`` all go through here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshvpn.errors import LocalError
from meshvpn.lab.lab import Lab

RELAY_PORT = 51820
AGENT_START_TIMEOUT = 20.0


def meshvpn_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshvpn", *args]


def node_state_dir(lab: Lab, node: str) -> Path:
    return lab.state_dir / "nodes" / node


def node_ifname(lab: Lab, node: str) -> str:
    """Unique across the machine: wireguard-go's UAPI sockets share one directory."""
    kind, index = node[0], node.lstrip("abcdefghijklmnopqrstuvwxyz")
    return f"{lab.prefix}{kind}{index}"


def meshvpn(lab: Lab, node: str, *args: str, check: bool = True, timeout: float = 60) -> str:
    """Run ``meshvpn ARGS --state-dir <node's>`` in the node; return stdout."""
    argv = meshvpn_argv(*args, "--state-dir", str(node_state_dir(lab, node)))
    proc = lab.exec(node, argv, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise LocalError(f"{node}: meshvpn {args[0]} failed: {err[-1] if err else proc.returncode}")
    return proc.stdout.decode()


def node_status(lab: Lab, node: str) -> dict[str, Any] | None:
    argv = meshvpn_argv("status", "--json", "--state-dir", str(node_state_dir(lab, node)))
    proc = lab.exec(node, argv, check=False, timeout=15)
    try:
        data: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        return None
    return data if data.get("running") else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_relay(lab: Lab, index: int, *extra: str) -> dict[str, Any]:
    node = f"relay{index}"
    meshvpn(lab, node, "init")
    sd = node_state_dir(lab, node)
    argv = meshvpn_argv(
        "relay", "--state-dir", str(sd), "--interface", node_ifname(lab, node),
        "--listen-port", str(RELAY_PORT), *extra,
    )  # fmt: skip
    pid = lab.spawn(node, argv, log=sd / "agent.log")
    deadline = time.monotonic() + AGENT_START_TIMEOUT
    while time.monotonic() < deadline:
        status = node_status(lab, node)
        if status is not None:
            return status
        if not _pid_alive(pid):
            break
        time.sleep(0.1)
    log_tail = (sd / "agent.log").read_text(errors="replace").strip().splitlines()[-1:]
    raise LocalError(f"{node}: the relay agent did not start: {' '.join(log_tail) or 'no log'}")


def connect_client(lab: Lab, index: int, relay_index: int, *extra: str) -> dict[str, Any]:
    node, relay = f"client{index}", f"relay{relay_index}"
    meshvpn(lab, node, "init")
    key = json.loads(meshvpn(lab, node, "id", "--json"))["wireguard_public_key"]
    grant = json.loads(meshvpn(lab, relay, "admit", key, "--json"))
    wan = lab.plan.relays[relay_index - 1].wan_addr
    meshvpn(
        lab, node, "connect", "--relay", f"{wan}:{RELAY_PORT}", "--relay-key", grant["relay_key"],
        "--address", grant["address"], "--interface", node_ifname(lab, node), *extra,
    )  # fmt: skip
    status = node_status(lab, node)
    if status is None:
        raise LocalError(f"{node}: connected, but the agent does not answer")
    return status


def fetch(lab: Lab, node: str, path: str, timeout: float = 60) -> bytes:
    """GET http://<web>/path from inside a node with plain urllib."""
    url = f"http://{lab.plan.internet.web_addr}{path}"
    code = (
        "import sys, urllib.request\n"
        f"sys.stdout.buffer.write(urllib.request.urlopen({url!r}, timeout={timeout}).read())\n"
    )
    proc = lab.exec(node, [sys.executable, "-c", code], check=False, timeout=timeout + 10)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise LocalError(f"{node}: GET {url} failed: {err[-1] if err else proc.returncode}")
    return proc.stdout


def up(prefix: str, relays: int, clients: int) -> Lab:
    """The whole single-hop lab: network, relays with exit, connected clients."""
    lab = Lab(prefix)
    lab.up(relays, clients)
    try:
        for i in range(1, relays + 1):
            start_relay(lab, i)
        for j in range(1, clients + 1):
            connect_client(lab, j, (j - 1) % relays + 1)
    except BaseException:
        lab.down()
        raise
    return lab


# ---- CLI -------------------------------------------------------------------


def cli(args: argparse.Namespace) -> int:
    if args.lab_command == "up":
        lab = up(args.prefix, args.relays, args.clients)
        print(f"lab {args.prefix} is up: {args.relays} relay(s), {args.clients} client(s)")
        for r in lab.plan.relays:
            print(
                f"  {r.name:<8} WAN {r.wan_addr}  LAN {r.lan_net}"
                f"  WireGuard {node_ifname(lab, r.name)}"
            )
        for c in lab.plan.clients:
            print(
                f"  {c.name:<8} uplink {c.uplink_addr}"
                f"  connected through relay{(c.index - 1) % args.relays + 1}"
            )
        print(f"  web server http://{lab.plan.internet.web_addr}/ip in `internet`")
        print(
            'try: meshvpn lab exec client1 -- python3 -c "import urllib.request as u;'
            f" print(u.urlopen('http://{lab.plan.internet.web_addr}/ip').read().decode())\""
        )
        print("then: meshvpn lab down")
        return 0
    if args.lab_command == "down":
        try:
            lab = Lab.load(args.prefix)
        except LocalError:
            print(f"no lab {args.prefix} is up; nothing to do")
            return 0
        lab.down()
        print(f"lab {args.prefix} is down; nothing left behind")
        return 0
    lab = Lab.load(args.prefix)
    if args.lab_command == "status":
        status = lab.status()
        nodes = [r.name for r in lab.plan.relays] + [c.name for c in lab.plan.clients]
        agents = {n: node_status(lab, n) for n in nodes}
        status["agents"] = agents
        if args.json:
            print(json.dumps(status, indent=2, sort_keys=True, default=str))
        else:
            for node, agent in agents.items():
                state = "not running" if agent is None else f"{agent['role']} pid {agent['pid']}"
                print(f"{node:<10} {lab.netns(node):<20} {state}")
        return 0
    if args.lab_command == "exec":
        cmd = [c for c in args.cmd if c != "--"] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            raise LocalError(
                "lab exec needs a command", "e.g. `meshvpn lab exec client1 -- ip addr`"
            )
        os.execvp("ip", ["ip", "netns", "exec", lab.netns(args.node), *cmd])  # noqa: S606
    raise LocalError(f"unknown lab command {args.lab_command}")


def demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    print("building the lab: an internet with a web server, a home-router relay, a client ...")
    lab = up(args.prefix, 1, 1)
    try:
        relay, client = lab.plan.relays[0], lab.plan.clients[0]
        print(
            f"client1 ({client.uplink_addr}) is connected through relay1 ({relay.wan_addr})"
            f" in {time.monotonic() - started:.1f} s"
        )
        seen = fetch(lab, "client1", "/ip").decode()
        print(
            f"client1 fetched http://{lab.plan.internet.web_addr}/ip; the server saw: {seen}"
            f" ({'relay1, as it should' if seen == str(relay.wan_addr) else 'NOT the relay!'})"
        )
        t0 = time.monotonic()
        body = fetch(lab, "client1", "/bytes/10000000")
        secs = time.monotonic() - t0
        print(
            f"client1 downloaded {len(body):,} bytes through the tunnel in {secs:.2f} s"
            f" ({len(body) * 8 / secs / 1e6:.0f} Mbit/s)"
        )
        status = node_status(lab, "relay1") or {}
        for peer in status.get("peers", []):
            print(
                f"relay1 counted for client {peer['address']}: rx {peer['rx_bytes']:,} B,"
                f" tx {peer['tx_bytes']:,} B"
            )
        if args.keep:
            print(
                f"lab left up; `meshvpn lab status --prefix {args.prefix}`,"
                f" `meshvpn lab down --prefix {args.prefix}`"
            )
            return 0 if seen == str(relay.wan_addr) else 1
    except BaseException:
        lab.down()
        raise
    lab.down()
    print("lab torn down; nothing left behind")
    return 0 if seen == str(relay.wan_addr) else 1


def add_lab_parsers(
    sub: Any,  # noqa: ANN401 - argparse's private _SubParsersAction
    cmd_lab: Callable[[argparse.Namespace], int],
    cmd_demo: Callable[[argparse.Namespace], int],
) -> None:
    lab = sub.add_parser(
        "lab",
        help="a sealed network of namespaces on this machine: internet, relays, clients",
        description="Build and drive a lab of network namespaces joined by veth pairs. Nothing"
        " is added to this machine's own namespace and nothing routes out of it.",
    )
    lab_sub = lab.add_subparsers(dest="lab_command", required=True, metavar="LAB_COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--prefix",
        default="mvlab",
        help="name prefix of the lab's namespaces (default: %(default)s)",
    )
    p = lab_sub.add_parser(
        "up", parents=[common], help="build the lab, start relays, connect clients"
    )
    p.add_argument(
        "--relays", type=int, default=1, help="relays, each a home router (default: %(default)s)"
    )
    p.add_argument(
        "--clients", type=int, default=1, help="clients, each connected (default: %(default)s)"
    )
    p = lab_sub.add_parser("status", parents=[common], help="namespaces and agents of the lab")
    p.add_argument("--json", action="store_true")
    p = lab_sub.add_parser(
        "exec", parents=[common], help="run a command inside a node: lab exec NODE -- CMD"
    )
    p.add_argument("node", metavar="NODE", help="internet, relayN, lanN or clientN")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    lab_sub.add_parser("down", parents=[common], help="tear the lab down, leaving nothing behind")
    lab.set_defaults(func=cmd_lab)

    p = sub.add_parser(
        "demo",
        help="the whole network on this machine: connect a client through a relay and fetch a page",
    )
    p.add_argument(
        "--prefix", default="mvdemo", help="name prefix of the demo lab (default: %(default)s)"
    )
    p.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    p.set_defaults(func=cmd_demo)
