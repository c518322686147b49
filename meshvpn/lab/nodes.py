"""Running meshvpn nodes inside the lab: relays, clients, the demo.

The lab (``lab.py``) builds the sealed network; this module puts agents on
it, the same way a user would: ``meshvpn init``, ``meshvpn relay``,
``meshvpn admit`` and ``meshvpn connect``, each run inside the node's
namespace. Tests, the demo and ``meshvpn lab up`` all go through here.

The broker runs TLS-only, like a real one. Its CA lives in the broker node's
state directory, made on first use; ``enroll`` gives a node its certificate
with the functions behind ``meshvpn broker enroll`` and ``meshvpn init
--enroll``, called in this process rather than as two more commands per node.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from meshvpn import broker as brokerd
from meshvpn import pki
from meshvpn.agent import LOCK_NAME
from meshvpn.errors import ConfigError, LocalError
from meshvpn.identity import init_identity, load_identity
from meshvpn.lab import netns
from meshvpn.lab.lab import Lab
from meshvpn.lab.topology import owns_netns
from meshvpn.mqtt import install_enrollment, load_credentials

RELAY_PORT = 51820
LAB_INTERNET = "203.0.113.0/24"
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
        # The last line is the error; the lines before it (a connect's agent.log tail)
        # are what a failed CI run has to go on.
        context = "\n".join(err[-80:-1])
        raise LocalError(
            f"{node}: meshvpn {args[0]} failed: {err[-1] if err else proc.returncode}"
            + (f"\n{context}" if context else "")
        )
    return proc.stdout.decode()


def node_status(lab: Lab, node: str) -> dict[str, Any] | None:
    argv = meshvpn_argv("status", "--json", "--state-dir", str(node_state_dir(lab, node)))
    proc = lab.exec(node, argv, check=False, timeout=45)  # a loaded machine starts Python slowly
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


def broker_address(lab: Lab) -> str:
    return f"{lab.plan.broker.addr}:{lab.plan.broker.port}"


def broker_ca(lab: Lab) -> Path:
    """The lab broker's state directory, with its CA and server certificate made if missing."""
    sd = node_state_dir(lab, "broker")
    brokerd.init_broker(sd, [str(lab.plan.broker.addr)], dt.datetime.now(dt.UTC))
    return sd


def enroll(lab: Lab, node: str, role: str = pki.ROLE_NODE) -> Path:
    """Keys and a broker certificate in ``role`` for ``node``, unless it has them; its state dir.

    ``node`` need not be a namespace: any name gets a state dir (tests use
    ``accounting`` for a receipt reader)."""
    sd = node_state_dir(lab, node)
    identity, _ = init_identity(sd)
    ca_dir = broker_ca(lab)
    with contextlib.suppress(ConfigError):
        held = load_credentials(sd, identity, role).enrollment
        if held.role == role and held.ca_fingerprint == pki.fingerprint(
            (ca_dir / brokerd.CA_CERT).read_bytes()
        ):
            return sd  # enrolled already, in that role
    bundle = brokerd.enroll(ca_dir, identity.identity_public, role)
    install_enrollment(sd, identity, bundle)
    return sd


def start_broker(lab: Lab) -> int:
    """mosquitto via `meshvpn broker` in the lab's broker namespace; returns its pid."""
    sd = broker_ca(lab)
    argv = meshvpn_argv("broker", "--listen", broker_address(lab), "--state-dir", str(sd))
    pid = lab.spawn("broker", argv, log=sd / "broker.log")
    target = (str(lab.plan.broker.addr), lab.plan.broker.port)
    probe = f"import socket; socket.create_connection({target!r}, 1).close()"
    deadline = time.monotonic() + AGENT_START_TIMEOUT
    while time.monotonic() < deadline:
        if lab.exec("broker", [sys.executable, "-c", probe], check=False).returncode == 0:
            return pid
        if not _pid_alive(pid):
            break
        time.sleep(0.1)
    tail = (sd / "broker.log").read_text(errors="replace").strip().splitlines()[-1:]
    raise LocalError(f"the lab's broker did not start: {' '.join(tail) or 'no log'}")


def start_accounting(
    lab: Lab, epoch_seconds: float = 5.0, *extra: str, name: str = "accounting"
) -> tuple[str, int]:
    """`meshvpn accounting serve` in the broker's namespace, its ledger in SQLite in its
    state dir (node ``name``); returns its identity key (for relays' --accounting-key)
    and its pid."""
    sd = enroll(lab, name, pki.ROLE_ACCOUNTING)  # only that role may read receipts
    identity = load_identity(sd)
    argv = meshvpn_argv(
        "accounting", "serve", "--broker", broker_address(lab), "--state-dir", str(sd),
        "--epoch-seconds", str(epoch_seconds), *extra,
    )  # fmt: skip
    log = sd / "accounting.log"
    started = log.stat().st_size if log.exists() else 0
    pid = lab.spawn("broker", argv, log=log)
    deadline = time.monotonic() + AGENT_START_TIMEOUT
    while time.monotonic() < deadline:
        ledger = "--db" in extra or (sd / "ledger.db").exists()  # --db: PostgreSQL
        if ledger and "accounting mv" in _tail(log, started, 1000):
            return identity.identity_public.b64, pid
        if not _pid_alive(pid):
            break
        time.sleep(0.1)
    raise LocalError(f"the accounting service did not start: {_tail(sd / 'accounting.log')}")


def accounting_connected(lab: Lab, name: str = "accounting", timeout: float = 30) -> None:
    """Wait until the service ``name`` is subscribed: its broker queue exists from then on."""
    log = node_state_dir(lab, name) / "accounting.log"
    deadline = time.monotonic() + timeout
    while "connected to broker" not in _tail(log, 0, 1_000_000):
        if time.monotonic() > deadline:
            raise LocalError(f"{name} did not connect to the broker: {_tail(log)}")
        time.sleep(0.1)


def stop_accounting(lab: Lab, name: str = "accounting", timeout: float = 30) -> None:
    """SIGTERM the running service ``name`` and wait until it is gone."""
    pid = int((node_state_dir(lab, name) / LOCK_NAME).read_text().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running(pid):
        if time.monotonic() > deadline:
            raise LocalError(f"{name} ({pid}) did not stop within {timeout:g} s")
        time.sleep(0.05)


def running(pid: int) -> bool:
    """Alive and not a zombie (the lab reaps its children only at teardown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _tail(path: Path, since: int = 0, lines: int = 2) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(since)
            text = fh.read().decode(errors="replace")
        return " ".join(text.strip().splitlines()[-lines:])
    except OSError:
        return ""


def accounting(lab: Lab, *args: str, name: str = "accounting") -> str:
    """Run `meshvpn accounting ARGS` against the lab's ledger; return stdout."""
    argv = meshvpn_argv("accounting", *args, "--state-dir", str(node_state_dir(lab, name)))
    proc = lab.exec("broker", argv, check=False, timeout=60)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise LocalError(f"meshvpn accounting {args[0]} failed: {err[-1] if err else '?'}")
    return proc.stdout.decode()


def deposit(lab: Lab, node: str, amount: int) -> None:
    """Credit a lab node's client account (`meshvpn accounting deposit`)."""
    meshvpn(lab, node, "init")
    node_id = json.loads(meshvpn(lab, node, "id", "--json"))["node_id"]
    accounting(lab, "deposit", node_id, str(amount))


def relay_endpoint(lab: Lab, index: int) -> str:
    """What clients dial: the relay's public (latency) address if it has one, else its WAN."""
    relay = lab.plan.relay(index)
    host = relay.public_addr if relay.public_addr is not None else relay.wan_addr
    return f"{host}:{RELAY_PORT}"


def start_relay(
    lab: Lab,
    index: int,
    *extra: str,
    broker: bool = False,
    program: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start a relay agent in relayN and wait until it answers (and has announced).

    ``program`` replaces ``python -m meshvpn relay`` (tests run rogue relays so)."""
    node = f"relay{index}"
    meshvpn(lab, node, "init")
    sd = enroll(lab, node) if broker else node_state_dir(lab, node)
    head = program if program is not None else meshvpn_argv("relay")
    argv = [
        *head, "--state-dir", str(sd), "--interface", node_ifname(lab, node),
        "--listen-port", str(RELAY_PORT),
        # The lab's internet lives in documentation ranges, which the exit policy
        # closes by default, as it should on a real router.
        "--allow", LAB_INTERNET, *extra,
    ]  # fmt: skip
    if broker:
        argv += ["--broker", broker_address(lab), "--endpoint", relay_endpoint(lab, index)]
    pid = lab.spawn(node, argv, log=sd / "agent.log", env=env)
    deadline = time.monotonic() + AGENT_START_TIMEOUT
    while time.monotonic() < deadline:
        status = node_status(lab, node)
        if status is not None and (not broker or status["counters"].get("announcements")):
            return status
        if not _pid_alive(pid):
            break
        time.sleep(0.1)
    log_tail = (sd / "agent.log").read_text(errors="replace").strip().splitlines()[-1:]
    raise LocalError(f"{node}: the relay agent did not start: {' '.join(log_tail) or 'no log'}")


def node_id(lab: Lab, node: str) -> str:
    meshvpn(lab, node, "init")
    return str(json.loads(meshvpn(lab, node, "id", "--json"))["node_id"])


def start_mesh(
    lab: Lab, links: Sequence[tuple[int, int]] | None = None, *extra: str
) -> dict[int, dict[str, Any]]:
    """Start every relay of the lab with ``--mesh``; with ``links`` (pairs of relay
    indices), each links with exactly its partners there (a chain, a ring...),
    else with its nearest. Returns each relay's status by index."""
    count = len(lab.plan.relays)
    ids = {i: node_id(lab, f"relay{i}") for i in range(1, count + 1)}
    partners: dict[int, list[int]] = {i: [] for i in ids}
    for a, b in links or ():
        partners[a].append(b)
        partners[b].append(a)
    started = {}
    for i in ids:
        pinned = [arg for j in partners[i] for arg in ("--mesh-neighbour", ids[j])]
        started[i] = start_relay(lab, i, "--mesh", *pinned, *extra, broker=True)
    return started


def wait_mesh_routes(lab: Lab, timeout: float = 30.0) -> dict[int, dict[str, Any]]:
    """Until every relay has a route to every other relay's prefix."""
    count = len(lab.plan.relays)
    deadline = time.monotonic() + timeout
    statuses: dict[int, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        statuses = {}
        for i in range(1, count + 1):
            status = node_status(lab, f"relay{i}")
            if status is None:
                raise LocalError(f"relay{i} does not answer")
            statuses[i] = status
        if all(len(s["mesh"]["routes"]) >= count - 1 for s in statuses.values()):
            return statuses
        time.sleep(0.2)
    routes = {i: len(s["mesh"]["routes"]) for i, s in statuses.items()}
    raise LocalError(f"the mesh did not converge within {timeout:g} s: routes per relay {routes}")


def discover_and_connect(lab: Lab, index: int, *extra: str, check: bool = True) -> str:
    """`meshvpn connect --broker` from a client: it finds, probes and negotiates."""
    node = f"client{index}"
    enroll(lab, node)
    argv = ["connect", "--broker", broker_address(lab), "--interface", node_ifname(lab, node)]
    return meshvpn(lab, node, *argv, *extra, check=check)


def connect_client(lab: Lab, index: int, relay_index: int, *extra: str) -> dict[str, Any]:
    node, relay = f"client{index}", f"relay{relay_index}"
    meshvpn(lab, node, "init")
    key = json.loads(meshvpn(lab, node, "id", "--json"))["wireguard_public_key"]
    grant = json.loads(meshvpn(lab, relay, "admit", key, "--json"))
    meshvpn(
        lab, node, "connect", "--relay", relay_endpoint(lab, relay_index),
        "--relay-key", grant["relay_key"], "--address", grant["address"],
        "--interface", node_ifname(lab, node), *extra,
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


_DOWNLOAD = """\
import json, sys, time, urllib.request
url, want = sys.argv[1], int(sys.argv[2])
start = last = time.monotonic()
got, gap, err = 0, 0.0, ""
try:
    with urllib.request.urlopen(url, timeout=60) as r:
        while chunk := r.read(65536):
            now = time.monotonic()
            gap, last = max(gap, now - last), now
            got += len(chunk)
except Exception as e:  # reported, not raised: the caller judges
    err = repr(e)
print(json.dumps({"bytes": got, "want": want, "seconds": time.monotonic() - start,
                  "max_gap_s": max(gap, time.monotonic() - last) if err else gap, "error": err}))
"""


class Download:
    """``GET /bytes/N`` from a node in the background, timing the longest stall."""

    def __init__(self, lab: Lab, node: str, nbytes: int) -> None:
        url = f"http://{lab.plan.internet.web_addr}/bytes/{nbytes}"
        argv = ["ip", "netns", "exec", lab.netns(node), sys.executable, "-c", _DOWNLOAD]
        self.proc = subprocess.Popen(
            [*argv, url, str(nbytes)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    def result(self, timeout: float = 300) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise LocalError(f"the download did not end within {timeout:g} s") from None
        try:
            return dict(json.loads(out))
        except ValueError:
            why = err.decode(errors="replace")[-300:]
            raise LocalError(f"the download failed: {why}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


LAB_EPOCH_S = 30.0
LAB_CREDIT = 10**9  # token units per client: about 1000 GiB at the default price


def up(
    prefix: str,
    relays: int,
    clients: int,
    latency_ms: list[float] | None = None,
    with_accounting: bool = False,
) -> Lab:
    """The whole lab: network, broker, announcing relays, clients that discover them;
    with accounting, the service too, relays that ask it, and clients with credit."""
    lab = Lab(prefix)
    lab.up(relays, clients, latency_ms=latency_ms)
    try:
        start_broker(lab)
        extra: list[str] = []
        if with_accounting:
            extra = ["--accounting-key", start_accounting(lab, LAB_EPOCH_S)[0]]
        for i in range(1, relays + 1):
            start_relay(lab, i, *extra, broker=True)
        for j in range(1, clients + 1):
            if with_accounting:
                deposit(lab, f"client{j}", LAB_CREDIT)
                wait_for_credit(lab, f"client{j}", relays)
            discover_and_connect(lab, j)
    except BaseException:
        lab.down()
        raise
    return lab


def wait_for_credit(lab: Lab, node: str, relays: int, timeout: float = 15) -> None:
    """Until every relay holds a credit notice for the client (they refuse it before)."""
    node_id = json.loads(meshvpn(lab, node, "id", "--json"))["node_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [node_status(lab, f"relay{i}") for i in range(1, relays + 1)]
        if all(s and node_id in (s.get("credit_clients") or []) for s in states):
            return
        time.sleep(0.2)
    raise LocalError(f"the relays heard no credit notice for {node} within {timeout:g} s")


# ---- CLI -------------------------------------------------------------------


def _parse_latency(text: str | None, relays: int) -> list[float] | None:
    if not text:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise LocalError(
            f"bad --latency {text!r}", "give one number of ms per relay, e.g. 40,10,25"
        ) from None
    if len(values) != relays:
        raise LocalError(
            f"--latency has {len(values)} values for {relays} relays", "give one per relay"
        )
    return values


def _describe(lab: Lab) -> None:
    print(f"  broker   {broker_address(lab)} (mosquitto, TLS) in `broker`")
    if (node_state_dir(lab, "accounting") / "ledger.db").exists():
        print(f"  accounting in `broker`, state {node_state_dir(lab, 'accounting')}")
    for r in lab.plan.relays:
        extra = f", {r.latency_ms:g} ms away at {r.public_addr}" if r.latency_ms is not None else ""
        print(f"  {r.name:<8} WAN {r.wan_addr}  LAN {r.lan_net}{extra}")
    for c in lab.plan.clients:
        status = node_status(lab, c.name) or {}
        via = (status.get("relay") or {}).get("endpoint", "?")
        print(f"  {c.name:<8} uplink {c.uplink_addr}  tunnel {status.get('address')} via {via}")
    print(f"  web      http://{lab.plan.internet.web_addr}/ip in `internet`")


def cli(args: argparse.Namespace) -> int:
    if args.lab_command == "up":
        lab = up(
            args.prefix,
            args.relays,
            args.clients,
            _parse_latency(args.latency, args.relays),
            with_accounting=args.accounting,
        )
        print(f"lab {args.prefix} is up: {args.relays} relay(s), {args.clients} client(s)")
        _describe(lab)
        print(
            f"try: meshvpn lab exec --prefix {args.prefix} client1 -- python3 -c"
            ' "import urllib.request as u;'
            f" print(u.urlopen('http://{lab.plan.internet.web_addr}/ip').read().decode())\""
        )
        print(f"then: meshvpn lab down --prefix {args.prefix}")
        return 0
    if args.lab_command == "down":
        try:
            lab = Lab.load(args.prefix)
        except LocalError:
            # No state (e.g. a test's lab under another state root, or a
            # crash before lab.json was written): the prefix still owns its
            # namespaces, and down() sweeps them and their processes.
            lab = Lab(args.prefix)
            if not any(owns_netns(args.prefix, n) for n in netns.list_netns()):
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
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            raise LocalError(
                "lab exec needs a command", "e.g. `meshvpn lab exec client1 -- ip addr`"
            )
        os.execvp("ip", ["ip", "netns", "exec", lab.netns(args.node), *cmd])  # noqa: S606
    raise LocalError(f"unknown lab command {args.lab_command}")


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
    p.add_argument(
        "--latency",
        metavar="MS,MS,...",
        help="round-trip latency added in front of each relay, e.g. 40,10,25 (default: none)",
    )
    p.add_argument(
        "--accounting",
        action="store_true",
        help="also run the accounting service (epochs of 30 s); relays serve only clients"
        " with credit, and every client gets a deposit",
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
        help="the whole network on this machine: a broker, accounting, five relays in a mesh,"
        " two clients downloading; relay1's dashboard (or --duration: headless, a summary)",
        description="Builds a sealed lab: MQTT broker, accounting service (short epochs),"
        " five relays in a mesh ring, two clients with credit downloading continuously (one"
        " multi-hop, moving between relays). Opens relay1's dashboard; Ctrl-C tears it all"
        " down. With --duration S it runs headless and prints what each relay carried and"
        " earned; exit 0 only if every relay has receipts and earnings and nothing is left.",
    )
    p.add_argument(
        "--prefix", default="mvdemo", help="name prefix of the demo lab (default: %(default)s)"
    )
    p.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="run headless for S seconds, then print a summary and tear down",
    )
    p.add_argument(
        "--epoch-seconds",
        type=float,
        default=60.0,
        metavar="S",
        help="the accounting service's epoch length (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="the summary as JSON (with --duration)")
    p.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    p.set_defaults(func=cmd_demo)
