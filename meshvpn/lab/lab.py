"""The lab: a sealed network of namespaces on this machine.

Theory of operation
-------------------
``Lab.up`` applies a ``LabPlan`` (see ``topology``) with ``ip``/``nft`` and
starts the web server in the internet namespace, and there too one delay
forwarder (``meshvpn.lab.delay``) per relay given a latency. The broker
namespace is made, but nothing runs in it until the caller ``spawn``s a broker.

Nothing is made in the root namespace: each veth is created inside one lab
namespace with its peer placed directly into the other, and the internet
namespace has no default route, so no packet can leave the lab.

Everything the lab makes is recorded in ``{state_root}/{prefix}/lab.json``
*before* it is made (write-ahead): a namespace is listed before ``ip netns
add``, a process right after it is started. ``down`` works from that file, so
another process (``meshvpn lab down``), or this one after ``up`` died halfway,
can always clean up. It also deletes any namespace whose name the prefix owns
(``{prefix}-internet``, ``{prefix}-relay3``, ...), in case the state file was
lost.

``down`` kills every process found inside a lab namespace, and nothing else:
pids come from the namespaces themselves (as ``ip netns pids`` does), and each
signal goes through a pidfd after re-checking the namespace, so a recycled pid
outside the lab is never hit. The processes this object spawned and has not
reaped are signalled directly too (an unreaped pid cannot be recycled), which
also catches one still inside ``ip netns exec`` on its way into its namespace.
Deleting a namespace takes its veths with it.

IPv6: new namespaces get the kernel's IPv6 defaults, which we keep (the mesh
runs IPv6 on the agent's WireGuard interfaces), but IPv6 is disabled on every
lab veth before it comes up. The underlay is IPv4-only, and router
solicitations, MLD reports and DAD probes would otherwise show up in the leak
captures.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeGuard

import meshvpn
from meshvpn.errors import LocalError
from meshvpn.lab import netns
from meshvpn.lab.topology import (
    DELAY_PORTS,
    NAT_TABLE,
    LabPlan,
    NodePlan,
    RelayPlan,
    owns_netns,
    plan_lab,
    validate_prefix,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from types import TracebackType

DEFAULT_STATE_ROOT = Path("/run/meshvpn/lab")
STATE_VERSION = 1
KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
READY_TIMEOUT = 20.0  # for the web server, delay forwarders and captures to start
LINK_TIMEOUT = 10.0  # for every veth to report operstate UP
REQUIRED_TOOLS = ("ip", "nft", "sysctl")


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    node: str
    argv: tuple[str, ...]
    log: str


@dataclass(frozen=True)
class LabState:
    """What ``lab.json`` holds: enough to rebuild the plan and to undo everything."""

    prefix: str
    relays: int
    clients: int
    namespaces: tuple[str, ...] = ()
    processes: tuple[ProcessRecord, ...] = field(default=())
    # Per relay, ms or None; None for no latencies at all (also what older files mean).
    latency_ms: tuple[float | None, ...] | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": STATE_VERSION,
                "prefix": self.prefix,
                "relays": self.relays,
                "clients": self.clients,
                "latency_ms": None if self.latency_ms is None else list(self.latency_ms),
                "namespaces": list(self.namespaces),
                "processes": [
                    {"pid": p.pid, "node": p.node, "argv": list(p.argv), "log": p.log}
                    for p in self.processes
                ],
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> LabState:
        """Parse and validate; ValueError (with what is wrong) on anything unexpected."""
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            raise ValueError(f"not a version {STATE_VERSION} lab state")
        prefix, relays, clients = raw.get("prefix"), raw.get("relays"), raw.get("clients")
        namespaces, processes = raw.get("namespaces"), raw.get("processes")
        if not (
            isinstance(prefix, str)
            and isinstance(relays, int)
            and isinstance(clients, int)
            and isinstance(namespaces, list)
            and all(isinstance(n, str) for n in namespaces)
            and isinstance(processes, list)
        ):
            raise ValueError("missing or mistyped fields")
        latency = raw.get("latency_ms")
        if not (latency is None or (isinstance(latency, list) and all(map(_is_ms, latency)))):
            raise ValueError(f"bad latency_ms {latency!r}")
        records = []
        for p in processes:
            if not (
                isinstance(p, dict)
                and isinstance(p.get("pid"), int)
                and isinstance(p.get("node"), str)
                and isinstance(p.get("argv"), list)
                and all(isinstance(a, str) for a in p["argv"])
                and isinstance(p.get("log"), str)
            ):
                raise ValueError(f"bad process record {p!r}")
            records.append(ProcessRecord(p["pid"], p["node"], tuple(p["argv"]), p["log"]))
        latencies = None if latency is None else tuple(latency)
        return cls(prefix, relays, clients, tuple(namespaces), tuple(records), latencies)


def _is_ms(value: object) -> TypeGuard[float | None]:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


class _LabProcess(subprocess.Popen[bytes]):
    """A process that belongs to the lab rather than to us.

    It may outlive this Python process (``meshvpn lab up`` exits, the web
    server runs on until ``meshvpn lab down``), so dropping the handle while
    it runs is normal, not the leak ``Popen`` warns about. ``down`` reaps the
    ones we still hold.
    """

    def __del__(self) -> None:
        pass


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment plus ``extra``, with this meshvpn first on PYTHONPATH.

    So ``python -m meshvpn...`` inside a namespace runs the same code as we do,
    installed or not. Lab agents read no config file unless given ``--config``:
    the host's /etc/meshvpn/meshvpn.toml is not the lab's.
    """
    env = {**os.environ, "MESHVPN_CONFIG": "", **(extra or {})}
    root = str(Path(meshvpn.__file__).resolve().parent.parent)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{root}{os.pathsep}{old}" if old else root
    return env


def _tail(path: Path, limit: int = 400) -> str:
    try:
        text = path.read_bytes()[-limit:].decode(errors="replace")
    except OSError:
        return "(no log)"
    return " ".join(text.split()) or "(empty log)"


def _home_nat(relay: RelayPlan) -> str:
    # Masquerade only the LAN: the agent NATs the traffic it exits in its own
    # `meshvpn` table, and a test must see that NAT, not ours. No filter chain:
    # a drop policy here would also drop what the agent forwards.
    return f"""
table ip {NAT_TABLE} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{relay.wan_iface}" ip saddr {relay.lan_net} masquerade
    }}
}}
"""


def _base_sysctls(node: NodePlan) -> dict[str, str]:
    # New namespaces inherit IPv4 settings from the root namespace
    # (net.core.devconf_inherit_init_net=0), so pin what the lab relies on.
    # Set before any veth exists, so `default` reaches every lab interface.
    return {
        "net.ipv4.ip_forward": "1" if node.forwarding else "0",
        "net.ipv4.conf.all.rp_filter": "0",
        "net.ipv4.conf.default.rp_filter": "0",
    }


def _veth_sysctls(node: NodePlan) -> dict[str, str]:
    if not Path("/proc/sys/net/ipv6").is_dir():
        return {}
    return {f"net.ipv6.conf.{iface}.disable_ipv6": "1" for iface in node.ifaces}


class Lab:
    """One lab, named by its prefix. See the module comment."""

    def __init__(self, prefix: str = "mvlab", state_root: Path = DEFAULT_STATE_ROOT) -> None:
        self.prefix = validate_prefix(prefix)
        self.state_root = state_root
        self.state_dir = state_root / prefix
        self._plan: LabPlan | None = None
        self._state: LabState | None = None
        self._children: dict[int, _LabProcess] = {}
        self._captures = itertools.count(1)

    @property
    def state_file(self) -> Path:
        return self.state_dir / "lab.json"

    @property
    def plan(self) -> LabPlan:
        if self._plan is None:
            raise LocalError(f"lab {self.prefix} is not up", "run `meshvpn lab up`")
        return self._plan

    def __repr__(self) -> str:
        return f"Lab(prefix={self.prefix!r}, state_dir={str(self.state_dir)!r})"

    # -- state file -----------------------------------------------------------

    def _read_state(self) -> LabState | None:
        try:
            text = self.state_file.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise LocalError(f"cannot read {self.state_file}: {e}") from e
        try:
            state = LabState.from_json(text)
        except ValueError as e:
            raise LocalError(
                f"corrupt lab state {self.state_file}: {e}", "run `meshvpn lab down`"
            ) from e
        if state.prefix != self.prefix:
            raise LocalError(f"{self.state_file} belongs to lab {state.prefix!r}")
        return state

    def _write_state(self, state: LabState) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(state.to_json())
        tmp.replace(self.state_file)
        self._state = state

    @classmethod
    def load(cls, prefix: str = "mvlab", state_root: Path = DEFAULT_STATE_ROOT) -> Self:
        lab = cls(prefix, state_root)
        state = lab._read_state()
        if state is None:
            raise LocalError(f"no lab {prefix!r} (no {lab.state_file})", "run `meshvpn lab up`")
        lab._state = state
        try:
            lab._plan = plan_lab(prefix, state.relays, state.clients, state.latency_ms)
        except LocalError as e:
            raise LocalError(
                f"corrupt lab state {lab.state_file}: {e.what}", "run `meshvpn lab down`"
            ) from e
        return lab

    # -- up -------------------------------------------------------------------

    def up(
        self, relays: int, clients: int, *, latency_ms: Sequence[float | None] | None = None
    ) -> None:
        """Build the lab; ``latency_ms[i-1]`` (if given) is relay{i}'s added round trip."""
        plan = plan_lab(self.prefix, relays, clients, latency_ms)
        self._preflight()
        try:
            self.state_dir.mkdir(parents=True)
        except FileExistsError as e:  # lost a race with another `up`
            raise LocalError(f"lab {self.prefix} already exists", "run `meshvpn lab down`") from e
        except OSError as e:
            raise LocalError(f"cannot create {self.state_dir}: {e}") from e
        self._plan = plan
        try:
            latencies = None if latency_ms is None else tuple(r.latency_ms for r in plan.relays)
            self._write_state(LabState(self.prefix, relays, clients, latency_ms=latencies))
            self._make_namespaces(plan)
            self._make_links(plan)
            self._configure(plan)
            self._start_web(plan)
            self._start_delays(plan)
            self._wait_links_up(plan)
        except BaseException as e:
            try:
                self.down()
            except Exception as cleanup:  # noqa: BLE001 - reported on the original error
                e.add_note(f"and tearing the half-built lab down failed: {cleanup}")
            raise

    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise LocalError("the lab needs root (it creates network namespaces)", "run as root")
        missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
        if missing:
            raise LocalError(f"the lab needs {', '.join(missing)}", "install iproute2, nftables")
        owned = [n for n in netns.list_netns() if owns_netns(self.prefix, n)]
        if self.state_dir.exists() or owned:
            found = ", ".join(owned) or str(self.state_dir)
            raise LocalError(
                f"lab {self.prefix} already exists ({found})", "run `meshvpn lab down`"
            )

    def _make_namespaces(self, plan: LabPlan) -> None:
        for node in plan.nodes:
            state = self._require_state()
            self._write_state(replace(state, namespaces=(*state.namespaces, node.netns)))
            netns.add_netns(node.netns)
            netns.link_up(node.netns, "lo")
            netns.set_sysctls(node.netns, _base_sysctls(node))

    def _make_links(self, plan: LabPlan) -> None:
        for v in plan.veths:
            netns.add_veth(plan.netns(v.a_node), v.a_iface, plan.netns(v.b_node), v.b_iface)

    def _configure(self, plan: LabPlan) -> None:
        for node in plan.nodes:
            netns.set_sysctls(node.netns, _veth_sysctls(node))
            for a in node.addrs:
                netns.add_address(node.netns, a.iface, a.addr)
            for iface in node.ifaces:
                netns.link_up(node.netns, iface)
            if node.gateway is not None:
                netns.add_default_route(node.netns, node.gateway)
        for relay in plan.relays:
            netns.nft_apply(relay.netns, _home_nat(relay))

    @staticmethod
    def _wait_links_up(plan: LabPlan) -> None:
        # The kernel reports a veth's operstate up to a second after both ends
        # are up; callers (and agents that watch links) should not see that.
        deadline = time.monotonic() + LINK_TIMEOUT
        pending = list(plan.nodes)
        while pending:
            node = pending[0]
            states = netns.link_states(node.netns)
            if all(states.get(i) == "UP" for i in node.ifaces):
                pending.pop(0)
            elif time.monotonic() > deadline:
                raise LocalError(f"links of {node.netns} did not come up: {states}")
            else:
                time.sleep(0.02)

    def _start_web(self, plan: LabPlan) -> None:
        log = self.state_dir / "internet-httpserver.log"
        argv = [sys.executable, "-m", "meshvpn.lab.httpserver"]
        argv += ["--bind", str(plan.web_addr), "--port", str(plan.web_port)]
        self._spawn_server(plan.internet.name, argv, log, "the lab web server")

    def _start_delays(self, plan: LabPlan) -> None:
        for relay in plan.relays:
            if relay.public_addr is None or relay.latency_ms is None:
                continue
            argv = [sys.executable, "-m", "meshvpn.lab.delay"]
            argv += ["--listen", str(relay.public_addr), "--to", str(relay.wan_addr)]
            argv += ["--ports", ",".join(map(str, DELAY_PORTS))]
            argv += ["--delay-ms", repr(relay.latency_ms / 2)]
            log = self.state_dir / f"internet-delay-{relay.name}.log"
            what = f"the delay forwarder of {relay.name}"
            self._spawn_server(plan.internet.name, argv, log, what)

    def _spawn_server(self, node: str, argv: list[str], log: Path, what: str) -> None:
        """Spawn ``argv``; wait for it to print ``listening on``."""
        pid = self.spawn(node, argv, log=log)
        proc = self._children[pid]
        deadline = time.monotonic() + READY_TIMEOUT
        while b"listening on" not in log.read_bytes():
            if proc.poll() is not None:
                raise LocalError(f"{what} exited ({proc.returncode}): {_tail(log)}")
            if time.monotonic() > deadline:
                raise LocalError(f"{what} did not start: {_tail(log)}")
            time.sleep(0.02)

    def _require_state(self) -> LabState:
        if self._state is None:
            raise LocalError(f"lab {self.prefix} is not up", "run `meshvpn lab up`")
        return self._state

    # -- down -----------------------------------------------------------------

    def down(self) -> None:
        errors: list[str] = []
        names: dict[str, None] = {}
        if self._state is not None:
            names.update(dict.fromkeys(self._state.namespaces))
        try:
            on_disk = self._read_state()
        except LocalError:
            on_disk = None  # unreadable or corrupt: the names the prefix owns still find it all
        if on_disk is not None:
            names.update(dict.fromkeys(on_disk.namespaces))
        try:
            names.update(dict.fromkeys(n for n in netns.list_netns() if owns_netns(self.prefix, n)))
        except LocalError as e:
            errors.append(e.what)

        survivors = self._stop_processes(list(names))
        if survivors:
            errors.append(f"processes {sorted(survivors)} survived SIGKILL")
        for name in names:
            if netns.netns_exists(name):
                try:
                    netns.delete_netns(name)
                except LocalError as e:
                    errors.append(e.what)
        try:
            shutil.rmtree(self.state_dir)
        except FileNotFoundError:
            pass
        except OSError as e:
            errors.append(f"cannot remove {self.state_dir}: {e}")
        self._state = None
        if errors:
            raise LocalError(f"lab {self.prefix} down was incomplete: {'; '.join(errors)}")

    def _stop_processes(self, names: list[str]) -> set[int]:
        """SIGTERM, up to KILL_GRACE to exit, then SIGKILL; return the pids still alive."""
        for sig, grace in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, KILL_GRACE)):
            found = netns.pids_by_netns(names)
            if not found and not self._live_children():
                return set()
            for pid, name in found.items():
                netns.signal_in_netns(pid, name, sig)
            for proc in self._live_children():
                proc.send_signal(sig)  # ours and not yet reaped: the pid cannot be recycled
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if not self._live_children() and not netns.pids_by_netns(names):
                    break
                time.sleep(0.05)
        return set(netns.pids_by_netns(names)) | {p.pid for p in self._live_children()}

    def _live_children(self) -> list[_LabProcess]:
        """Reap the children that exited; return the rest."""
        for pid, proc in list(self._children.items()):
            if proc.poll() is not None:
                del self._children[pid]
        return list(self._children.values())

    # -- using the lab --------------------------------------------------------

    def netns(self, node: str) -> str:
        return self.plan.netns(node)

    def exec(
        self,
        node: str,
        argv: list[str],
        *,
        check: bool = True,
        timeout: float = 60,
        input: bytes | None = None,  # noqa: A002 - mirrors subprocess.run
    ) -> subprocess.CompletedProcess[bytes]:
        cmd = f"`{shlex.join(argv)}` in {node}"
        try:
            proc = subprocess.run(
                netns.exec_argv(self.netns(node), argv),
                input=input,
                capture_output=True,
                timeout=timeout,
                check=False,
                env=_child_env(),
            )
        except subprocess.TimeoutExpired as e:
            raise LocalError(f"{cmd} timed out after {timeout:g}s") from e
        if check and proc.returncode != 0:
            err = " ".join(proc.stderr.decode(errors="replace").split()) or "(no stderr)"
            raise LocalError(f"{cmd} failed (exit {proc.returncode}): {err}")
        return proc

    def spawn(
        self,
        node: str,
        argv: list[str],
        *,
        log: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> int:
        """Start ``argv`` in the background inside ``node``; return its pid.

        ``env`` adds to (does not replace) our environment. stdout and stderr
        go to ``log`` (appended), by default ``{state_dir}/{node}-{argv0}.log``.
        """
        ns = self.netns(node)
        state = self._require_state()
        log = log or self.state_dir / f"{node}-{Path(argv[0]).name}.log"
        with log.open("ab") as out:
            proc = _LabProcess(
                netns.exec_argv(ns, argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=_child_env(env),
            )
        self._children[proc.pid] = proc
        record = ProcessRecord(proc.pid, node, tuple(argv), str(log))
        self._write_state(replace(state, processes=(*state.processes, record)))
        return proc.pid

    def status(self) -> dict[str, object]:
        """A JSON-able summary: namespaces (and whether they exist), addresses, processes."""
        state = self._state or self._read_state()
        if state is None:
            return {"prefix": self.prefix, "up": False, "state_dir": str(self.state_dir)}
        plan = plan_lab(self.prefix, state.relays, state.clients, state.latency_ms)
        pids = netns.pids_by_netns([n.netns for n in plan.nodes])
        return {
            "prefix": self.prefix,
            "up": True,
            "state_dir": str(self.state_dir),
            "relays": state.relays,
            "clients": state.clients,
            "web": f"{plan.web_addr}:{plan.web_port}",
            "broker": f"{plan.broker.addr}:{plan.broker.port}",
            "latency": [
                {
                    "relay": r.name,
                    "public_addr": str(r.public_addr),
                    "wan_addr": str(r.wan_addr),
                    "latency_ms": r.latency_ms,
                }
                for r in plan.relays
                if r.public_addr is not None
            ],
            "namespaces": [
                {
                    "node": n.name,
                    "netns": n.netns,
                    "exists": netns.netns_exists(n.netns),
                    "addresses": {a.iface: str(a.addr) for a in n.addrs},
                    "gateway": None if n.gateway is None else str(n.gateway),
                }
                for n in plan.nodes
            ],
            "processes": [
                {
                    "pid": p.pid,
                    "node": p.node,
                    "argv": list(p.argv),
                    "log": p.log,
                    "alive": pids.get(p.pid) == plan.netns(p.node),
                }
                for p in state.processes
            ],
        }

    @contextlib.contextmanager
    def capture(self, node: str, iface: str, *, bpf: str | None = None) -> Iterator[list[Any]]:
        """Capture on ``iface`` inside ``node`` for the duration of the block.

        ``with lab.capture("client1", "wan0") as pkts: ...``; after the block
        ``pkts`` holds the scapy packets seen (both directions).
        """
        ns = self.netns(node)
        self._require_state()
        out_dir = self.state_dir / "captures"
        out_dir.mkdir(exist_ok=True)
        pcap = out_dir / f"{node}-{iface}-{next(self._captures)}.pcap"
        log = pcap.with_suffix(".log")
        argv = [sys.executable, "-m", "meshvpn.lab.capture", "--iface", iface, "--out", str(pcap)]
        if bpf is not None:
            argv += ["--filter", bpf]
        packets: list[Any] = []
        with log.open("ab") as err:
            proc = subprocess.Popen(
                netns.exec_argv(ns, argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                env=_child_env(),
            )
        try:
            self._wait_ready(proc, f"capture on {node} {iface}", log)
            yield packets
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if proc.returncode != 0 or not pcap.exists():
            raise LocalError(f"capture on {node} {iface} failed ({proc.returncode}): {_tail(log)}")
        # Slow imports, only for captures; the layers register Ethernet for rdpcap.
        import scapy.layers.inet  # noqa: PLC0415
        import scapy.layers.inet6  # noqa: F401, PLC0415
        from scapy.utils import rdpcap  # noqa: PLC0415

        packets.extend(rdpcap(str(pcap)))

    @staticmethod
    def _wait_ready(proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
        """Wait for a ``ready`` line on the child's stdout."""
        if proc.stdout is None:
            raise TypeError("_wait_ready needs stdout=PIPE")
        fd = proc.stdout.fileno()
        os.set_blocking(fd, False)
        seen = b""
        deadline = time.monotonic() + READY_TIMEOUT
        while b"ready\n" not in seen:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                chunk = None
            if chunk == b"" or proc.poll() is not None:
                raise LocalError(f"{what} exited before it was ready: {_tail(log)}")
            if chunk:
                seen += chunk
            elif time.monotonic() > deadline:
                raise LocalError(f"{what} was not ready after {READY_TIMEOUT:g}s: {_tail(log)}")
            else:
                time.sleep(0.02)

    # -- context manager --------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Only a lab this object brought up or loaded: an `up` refused because
        # the lab already existed must not tear that (someone else's) lab down.
        if self._plan is not None:
            self.down()
