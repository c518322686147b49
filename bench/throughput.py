"""Throughput through meshvpn vs. plain WireGuard, and what the agents cost.

One lab: client1 → internet → relay1 (exit) → internet's web address, where
an iperf3 server listens. Three arms between the same namespaces, taken in
turn (the order reverses every round, so none always gets the warmer machine):

- meshvpn: a session admitted by hand (``meshvpn admit`` on the relay,
  ``meshvpn connect --relay/--relay-key/--address``): the agents, their
  wireguard-go, the relay's exit policy and NAT, the client's kill switch
  and full tunnel; no receipts (hand-admitted clients are not metered);
- metered: ``meshvpn connect --broker``, what a user gets: the same, plus
  discovery, a negotiated session and the receipt exchange (the relay reads
  WireGuard's counters every 0.1 s, states its count every 8 MiB, the
  client signs, the relay countersigns and journals). A fresh client
  identity each round, so one round's cut-off cannot refuse the next;
- plain, the baseline: a hand-built wireguard-go tunnel from client1 to
  relay1, same binary, same MTU (1420), the same wg-quick-style full tunnel
  on the client (fwmark, two policy rules, a table with a default route) and
  a bare nftables masquerade on the relay; no agent, no meshvpn rules.

On this one machine standing in for several, the arms must also share the
CPU alike. Linux schedules by autogroup (kernel.sched_autogroup_enabled, on
by default): CPU time is shared fairly between sessions first, then between
the processes of a session. The lab starts every agent in a session of its
own, and wireguard-go runs in its agent's; so every plain wireguard-go gets
a session of its own too. (Until 2026-11-25 the plain ends ran in the
benchmark's session, with the iperf3 client: that arrangement alone gave the
plain arm 20-25 % more throughput, which the earlier reports took for
meshvpn's overhead. A plain arm moved to sessions of its own measured what
the meshvpn arm did.) In a multi-hop chain a plain relay's two ends have a
session each where a meshvpn relay's share its agent's: if anything, that
favours the baseline.

Per arm and round, iperf3 from client1: TCP up, TCP down (``-R``) and UDP up
(unlimited offered rate; the figure is what the server received). A ratio is
the median over rounds of each arm's run divided by the plain run of the
same round and test (paired, so the machine's drifting load cancels out).
A metered run that the relay cuts off ends in iperf3's send/receive
timeout; it counts as 0 and in ``metered_cut_offs``.

Agent overhead (both meshvpn arms), sampled from /proc/PID/stat and /proc/PID/status of the
meshvpn agent processes only (the relay's and the client's; wireguard-go is
their child and not counted, nor is the broker): CPU as a percentage of one
core and CPU seconds per GB of payload moved, idle (connected, no traffic)
and while iperf3 runs at full rate; RSS (VmRSS) and its peak (VmHWM).

The data plane's own cost, ``wireguard_cpu_s_per_gb``: CPU seconds of each
arm's wireguard-go processes (by node) per GB that arrived, per test: whether
the same binary does more work per byte in one arm than in another. It moves
with the load too (wireguard-go batches fewer packets per wake-up at lower
rates): compare arms of one run, not runs.

    python bench/throughput.py [--rounds N] [--seconds S] [--quick] [--arms metered,...]
    python bench/throughput.py --profile     # one round more, profiled (perf, py-spy)

Multi-hop (meshvpn over a 3-relay path vs. a chain of plain tunnels) is
``bench/multihop.py``, on the arms, rounds and reports defined here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

from common import (
    GB,
    MB,
    Benchmark,
    Goal,
    ProcSample,
    children,
    cpu_s,
    proc_sample,
    summary,
    write_report,
)

from meshvpn.errors import LocalError
from meshvpn.lab import Lab
from meshvpn.lab.netns import exec_argv
from meshvpn.lab.nodes import (
    broker_address,
    enroll,
    meshvpn_argv,
    node_ifname,
    node_state_dir,
    node_status,
    relay_endpoint,
    start_broker,
    start_relay,
)

BENCHMARK = Benchmark(
    name="throughput",
    title="Single hop: meshvpn vs. plain wireguard-go; agent CPU and memory",
    order=30,
    needs_root=True,
    profiles=True,
    goals=(
        Goal("TCP up, meshvpn / plain WireGuard", "ratio_tcp_up", ">=", 0.97),
        Goal("TCP down, meshvpn / plain WireGuard", "ratio_tcp_down", ">=", 0.97),
        Goal("UDP up, meshvpn / plain WireGuard", "ratio_udp_up", ">=", 0.97),
        Goal("metered session at full rate: runs cut off", "metered_cut_offs", "<=", 0),
        Goal(
            "relay agent CPU relaying (metered), % of a core",
            "metered.relay_agent.cpu_pct_busy",
            "<=",
            2.0,
        ),
        Goal(
            "client agent CPU relaying (metered), % of a core",
            "metered.client_agent.cpu_pct_busy",
            "<=",
            2.0,
        ),
        Goal("relay agent peak RSS (metered), MB", "metered.relay_agent.rss_peak", "<=", 60.0),
        Goal("client agent peak RSS (metered), MB", "metered.client_agent.rss_peak", "<=", 60.0),
    ),
)

IPERF_PORT = 5201
UDP_LEN = 1300  # fits the 1420 tunnel MTU unfragmented
PLAIN_PORT = 51830
PLAIN_NET = "100.64.1"  # the meshvpn relay's pool is 100.64.0.0/24
PLAIN_MARK = 51821
TUNNEL_MTU = 1420
TESTS = ("tcp_up", "tcp_down", "udp_up")


def sh(lab: Any, node: str, *argv: str) -> str:  # noqa: ANN401
    return lab.exec(node, list(argv)).stdout.decode()


class Arm(Protocol):
    """One way of carrying client1's traffic to the internet.

    ``up`` makes it client1's route to everything, ``down`` undoes that;
    ``agents`` names the meshvpn processes whose cost is measured (none for
    a baseline)."""

    name: str

    def up(self) -> None: ...
    def down(self) -> None: ...
    def agents(self) -> dict[str, int]: ...
    def dataplane(self) -> dict[str, list[int]]:
        """The wireguard-go processes carrying the traffic, by node."""
        ...


@dataclass
class MeshvpnArm:
    """A meshvpn session, admitted by hand or (``metered``) negotiated over the broker."""

    lab: Any
    relay_pid: int
    metered: bool = False
    name: str = "meshvpn"
    route: tuple[str, ...] = ()  # more `connect` arguments (multi-hop: --entry, --exit)
    # diagnostic: the agents stopped (SIGSTOP) while iperf3 runs, their wireguard-go not
    freeze: bool = False
    client_pid: int = 0
    rounds: int = 0
    signed: int = 0  # receipts the metered clients signed,
    acked: int = 0  # and how many of them the relay acknowledged

    def state_dir(self) -> Path:

        base = node_state_dir(self.lab, "client1")
        # metered: a fresh identity each round (a cut-off client is refused for a while)
        return base.with_name(f"client1-m{self.rounds}") if self.metered else base

    def meshvpn(self, *args: str) -> str:

        argv = meshvpn_argv(*args, "--state-dir", str(self.state_dir()))
        return self.lab.exec("client1", argv, timeout=60).stdout.decode()

    def up(self) -> None:

        self.rounds += 1
        if self.metered:
            enroll(self.lab, self.state_dir().name)  # keys and a certificate for the broker
        else:
            self.meshvpn("init")
        how = ["--broker", broker_address(self.lab)]
        if not self.metered:
            key = json.loads(self.meshvpn("id", "--json"))["wireguard_public_key"]
            grant = json.loads(sh(self.lab, "relay1", *admit_argv(self.lab, key)))
            how = ["--relay", relay_endpoint(self.lab, 1), "--relay-key", grant["relay_key"]]
            how += ["--address", grant["address"]]
        ifname = node_ifname(self.lab, "client1")
        self.meshvpn("connect", "--interface", ifname, *how, *self.route)
        self.client_pid = int(json.loads(self.meshvpn("status", "--json"))["pid"])

    def down(self) -> None:
        if self.metered:
            session = json.loads(self.meshvpn("status", "--json")).get("session") or {}
            self.signed += session.get("receipt_seq", 0)
            self.acked += session.get("acked_seq", 0)
        self.meshvpn("disconnect")

    def agents(self) -> dict[str, int]:
        return {"relay_agent": self.relay_pid, "client_agent": self.client_pid}

    def dataplane(self) -> dict[str, list[int]]:
        return {
            name.removesuffix("_agent"): children(pid, "wireguard-go")
            for name, pid in self.agents().items()
        }


def admit_argv(lab: Any, key: str) -> list[str]:  # noqa: ANN401

    return meshvpn_argv("admit", key, "--json", "--state-dir", str(node_state_dir(lab, "relay1")))


@dataclass
class PlainArm:
    """wireguard-go by hand, as ``wg`` and ``wg-quick`` would set it up."""

    lab: Any
    name: str = "plain"
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def ifname(self, side: str) -> str:
        return f"{self.lab.prefix}p{side}"

    def _wireguard_go(self, node: str, side: str) -> None:

        ifname = self.ifname(side)
        env = {**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"}
        log = (self.lab.state_dir / f"plain-{side}.log").open("ab")
        self.procs[side] = subprocess.Popen(
            exec_argv(self.lab.netns(node), ["wireguard-go", "-f", ifname]),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            # Its own session, as a meshvpn agent's wireguard-go has (the lab starts
            # agents in theirs): Linux's autogroup scheduling shares the CPU between
            # sessions, so the arms must be arranged alike (see the module's doc).
            start_new_session=True,
        )
        log.close()
        sock = Path("/var/run/wireguard") / f"{ifname}.sock"
        deadline = time.monotonic() + 10
        while not sock.exists():
            if time.monotonic() > deadline or self.procs[side].poll() is not None:
                raise RuntimeError(f"wireguard-go for {ifname} did not start")
            time.sleep(0.02)

    def _key(self, side: str) -> tuple[Path, str]:
        if side not in self.keys:
            private = subprocess.run(["wg", "genkey"], capture_output=True, check=True).stdout
            public = subprocess.run(
                ["wg", "pubkey"], input=private, capture_output=True, check=True
            )
            self.keys[side] = (private.decode().strip(), public.stdout.decode().strip())
        path = self.lab.state_dir / f"plain-{side}.key"
        path.write_text(self.keys[side][0] + "\n")
        path.chmod(0o600)
        return path, self.keys[side][1]

    def prepare(self) -> None:
        """The relay's side, once: it stays up like the meshvpn relay does."""
        lab, ifname = self.lab, self.ifname("r")
        key, _ = self._key("r")
        _, client_pub = self._key("c")
        self._wireguard_go("relay1", "r")
        sh(lab, "relay1", "wg", "set", ifname, "private-key", str(key), "listen-port",
           str(PLAIN_PORT), "peer", client_pub, "allowed-ips", f"{PLAIN_NET}.2/32")  # fmt: skip
        sh(lab, "relay1", "ip", "address", "add", f"{PLAIN_NET}.1/24", "dev", ifname)
        sh(lab, "relay1", "ip", "link", "set", ifname, "mtu", str(TUNNEL_MTU), "up")
        wan = lab.plan.relay(1).wan_iface
        rules = (
            "table ip bench_plain {\n chain postrouting {\n"
            "  type nat hook postrouting priority srcnat; policy accept;\n"
            f'  ip saddr {PLAIN_NET}.0/24 oifname "{wan}" masquerade\n }}\n}}\n'
        )
        lab.exec("relay1", ["nft", "-f", "-"], input=rules.encode())

    def up(self) -> None:
        lab, ifname = self.lab, self.ifname("c")
        key, _ = self._key("c")
        _, relay_pub = self._key("r")
        endpoint = f"{lab.plan.relay(1).wan_addr}:{PLAIN_PORT}"
        self._wireguard_go("client1", "c")
        sh(lab, "client1", "wg", "set", ifname, "private-key", str(key), "fwmark",
           str(PLAIN_MARK), "peer", relay_pub, "endpoint", endpoint, "allowed-ips", "0.0.0.0/0",
           "persistent-keepalive", "25")  # fmt: skip
        sh(lab, "client1", "ip", "address", "add", f"{PLAIN_NET}.2/32", "dev", ifname)
        sh(lab, "client1", "ip", "link", "set", ifname, "mtu", str(TUNNEL_MTU), "up")
        # wg-quick's full tunnel
        sh(lab, "client1", "ip", "route", "add", "default", "dev", ifname, "table", str(PLAIN_MARK))
        sh(lab, "client1", "ip", "rule", "add", "not", "fwmark", str(PLAIN_MARK), "table",
           str(PLAIN_MARK), "priority", "32751")  # fmt: skip
        sh(lab, "client1", "ip", "rule", "add", "table", "main", "suppress_prefixlength", "0",
           "priority", "32750")  # fmt: skip
        sh(lab, "client1", "sysctl", "-q", "net.ipv4.conf.all.src_valid_mark=1")
        deadline = time.monotonic() + 10
        while sh(lab, "client1", "wg", "show", ifname, "latest-handshakes").split()[-1] == "0":
            if time.monotonic() > deadline:
                raise RuntimeError("the plain tunnel did not handshake")
            time.sleep(0.02)

    def down(self) -> None:
        for prio in ("32750", "32751"):
            self.lab.exec("client1", ["ip", "rule", "del", "priority", prio], check=False)
        self._stop("c")

    def _stop(self, side: str) -> None:
        proc = self.procs.pop(side, None)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # wireguard-go removes its interface
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        self._stop("c")
        self._stop("r")

    def agents(self) -> dict[str, int]:
        return {}

    def dataplane(self) -> dict[str, list[int]]:
        nodes = {"c": "client", "r": "relay"}
        return {nodes.get(side, side): [proc.pid] for side, proc in self.procs.items()}


class StalledError(Exception):
    """iperf3 could not finish: the tunnel stopped carrying traffic."""


@dataclass(frozen=True)
class IperfRun:
    bytes: float  # payload the receiver got
    bps: float
    active_s: float  # from the start to the end of the last second that carried traffic
    lost_pct: float = 0.0
    stalled: str = ""  # why iperf3 could not finish, if it could not


def iperf(lab: Any, test: str, seconds: float, rate: str = "0") -> IperfRun:  # noqa: ANN401
    """One iperf3 run from client1; ``rate`` caps what it offers (``-b``; 0: no cap)."""
    argv = ["timeout", "-s", "INT", f"{seconds + 15:g}"]  # a dead tunnel also stalls the control
    argv += ["iperf3", "-c", str(lab.plan.internet.web_addr), "-p", str(IPERF_PORT), "-J"]
    argv += ["-t", f"{seconds:g}", "--connect-timeout", "3000"]
    if test == "tcp_up":
        argv += ["--snd-timeout", "3000"]
    if test == "tcp_down":
        argv += ["-R", "--rcv-timeout", "3000"]
    if test == "udp_up":
        argv += ["-u", "-l", str(UDP_LEN)]
    argv += ["-b", rate]
    proc = lab.exec("client1", argv, check=False, timeout=seconds + 60)
    try:
        data = json.loads(proc.stdout or b"{}")
    except ValueError:
        data = {"error": proc.stdout.decode(errors="replace")[-200:]}
    intervals = [i["sum"] for i in data.get("intervals", [])]
    active = [i for i in intervals if i.get("bytes")]
    active_s = float(active[-1]["end"]) if active else 0.0
    if proc.returncode != 0 or "error" in data:
        why = str(data.get("error") or proc.stderr.decode()[-200:])
        moved = float(sum(i["bytes"] for i in active))
        return IperfRun(moved, moved * 8 / active_s if active_s else 0.0, active_s, 100.0, why)
    end = data["end"]
    if test == "udp_up":
        got = end["sum"]
        lost = got.get("lost_percent", 0.0)
        received = got["bytes"] * (1 - lost / 100)
        return IperfRun(received, received * 8 / got["seconds"], active_s, lost)
    got = end["sum_received"]
    return IperfRun(got["bytes"], got["bits_per_second"], active_s)


class Sampler:
    """/proc samples of some processes every ``every`` seconds, in a thread."""

    def __init__(self, pids: dict[str, int], every: float = 0.2) -> None:
        self.pids, self.every = pids, every
        self.samples: list[tuple[float, dict[str, ProcSample]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _take(self) -> None:
        self.samples.append((time.monotonic(), {n: proc_sample(p) for n, p in self.pids.items()}))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._take()

    def __enter__(self) -> Self:
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def at(self, t: float) -> dict[str, ProcSample]:
        """The last sample taken no later than ``t`` (the first one if none)."""
        found = self.samples[0][1]
        for when, sample in self.samples:
            if when > t:
                break
            found = sample
        return found


@dataclass
class Window:
    """What one agent did between two samples."""

    cpu_s: float
    wall_s: float
    payload_bytes: float
    rss: int
    peak: int


def window(before: ProcSample, after: ProcSample, wall: float, payload: float) -> Window:
    return Window(after.cpu_s - before.cpu_s, wall, payload, after.rss_bytes, after.peak_rss_bytes)


class IperfServer:
    """``iperf3 -s`` on the web address in the internet namespace, ours to restart.

    After a run whose tunnel died, the server may still be serving that run's
    test ("the server is busy"): restart it then."""

    def __init__(self, lab: Any) -> None:  # noqa: ANN401
        self.lab = lab
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:

        log = self.lab.state_dir / "iperf3.log"
        web = str(self.lab.plan.internet.web_addr)
        argv = ["iperf3", "-s", "--forceflush", "-B", web, "-p", str(IPERF_PORT)]
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                exec_argv(self.lab.netns("internet"), argv), stdout=out, stderr=out
            )
        deadline = time.monotonic() + 10
        while log.read_bytes().count(b"listening") <= self.starts:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"iperf3 server did not start: {log.read_text()[-200:]}")
            time.sleep(0.05)
        self.starts += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


def perf_record(seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """Sample every CPU (kernel and user) for ``seconds``, if perf(1) is installed."""
    if shutil.which("perf") is None:
        return None
    argv = ["perf", "record", "-e", "cpu-clock", "-a", "-q", "-o", str(out)]
    argv += ["--", "sleep", f"{seconds:g}"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


DATAPLANE = ("wireguard-go", "iperf3", "ksoftirqd")
NETFILTER = ("nf_", "nft_", "conntrack", "ipv4_conntrack", "nf_nat")


def perf_summary(data: Path) -> list[str]:
    """Where the machine's CPU went: by process name, and how much of the data
    plane's own (wireguard-go, iperf3, softirq) was netfilter (nftables, conntrack, NAT)."""

    def report(*args: str) -> list[tuple[float, str]]:
        argv = ["perf", "report", "-i", str(data), "--no-children", "-q", "-g", "none", *args]
        out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
        rows = []
        for line in out.splitlines():
            head, _, rest = line.strip().partition("%")
            with contextlib.suppress(ValueError):
                rows.append((float(head), rest.strip()))
        return rows

    by_comm = report("--sort", "comm")
    if not by_comm:
        return ["(perf recorded nothing)"]
    lines = [f"{pct:5.1f} % of all samples: {comm}" for pct, comm in by_comm[:6]]
    comms = [c for _, c in by_comm if c.startswith(DATAPLANE)]
    plane = sum(p for p, c in by_comm if c in comms)
    symbols = report("--comm", ",".join(comms), "--sort", "sym")
    netfilter = sum(p for p, sym in symbols if any(k in sym for k in NETFILTER))
    # --comm rescales to the data plane's own samples
    lines.append(f"{plane:5.1f} % data plane ({', '.join(comms)}), of which netfilter "
                 f"{netfilter:.1f} %")  # fmt: skip
    # where wireguard-go's own time goes: the arms run the same binary, so a
    # difference here is in how it is set up (offloads, MTU, rules it meets)
    wg = report("--comm", "wireguard-go", "--sort", "sym")
    lines += [f"{pct:5.1f} % of wireguard-go: {sym}" for pct, sym in wg[:10]]
    return lines


def py_spy(pids: dict[str, int], seconds: float, out_dir: Path) -> dict[str, Path]:
    """Start py-spy on each agent (if installed); return the files it will write."""
    binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(binary).exists():
        return {}
    outs = {}
    for name, pid in pids.items():
        out = out_dir / f"{name}.txt"
        argv = [binary, "record", "-p", str(pid), "-d", f"{seconds:g}", "-r", "100"]
        argv += ["-f", "raw", "-o", str(out), "--nonblocking"]
        subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        outs[name] = out
    return outs


def top_frames(path: Path, lines: int = 8) -> list[str]:
    """From py-spy's collapsed stacks: the innermost meshvpn (else any) frame that
    took the most samples, leaving out the event loop waiting in select()."""
    if not path.exists():
        return ["(no profile written)"]
    frames: dict[str, int] = {}
    total = waiting = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        total += int(count)
        stack_frames = stack.split(";")
        if "select (selectors.py" in stack_frames[-1]:
            waiting += int(count)
            continue
        ours = [f for f in stack_frames if "meshvpn/" in f or "relay/" in f or "accounting/" in f]
        key = f"{ours[-1]} > {stack_frames[-1]}" if ours else stack_frames[-1]
        frames[key] = frames.get(key, 0) + int(count)
    top = sorted(frames.items(), key=lambda kv: kv[1], reverse=True)[:lines]
    busy = total - waiting
    head = [f"{total} samples at 100 Hz, {busy} not waiting in select()"]
    return head + [f"{100 * n / max(1, busy):5.1f} % of those  {frame}" for frame, n in top]


@dataclass
class Tally:
    speeds: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    lost: dict[str, list[float]] = field(default_factory=dict)
    idle: dict[str, list[Window]] = field(default_factory=dict)
    busy: dict[str, list[Window]] = field(default_factory=dict)
    stalled: dict[str, list[str]] = field(default_factory=dict)
    profiles: dict[str, list[str]] = field(default_factory=dict)
    exchange: dict[str, Any] = field(default_factory=dict)
    # arm -> test -> node -> wireguard-go CPU seconds per GB delivered, per run
    dataplane: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)


def sample_idle(arm: Arm, pids: dict[str, int], idle_s: float, tally: Tally) -> None:
    time.sleep(1.0)  # let the connect settle before idle counts
    before = {n: proc_sample(p) for n, p in pids.items()}
    t0 = time.monotonic()
    time.sleep(idle_s)
    wall = time.monotonic() - t0
    for n, p in pids.items():
        after = proc_sample(p)
        tally.idle.setdefault(f"{arm.name}.{n}", []).append(window(before[n], after, wall, 0))


def run_test(  # noqa: PLR0917
    lab: Any,  # noqa: ANN401
    arm: Arm,
    test: str,
    seconds: float,
    spy: bool,
    tally: Tally,
) -> bool:
    """One iperf3 run through ``arm``; False if the tunnel stalled."""
    pids = arm.agents()
    spying = py_spy(pids, seconds, lab.state_dir / arm.name) if spy and pids else {}
    planes = arm.dataplane()
    plane_before = {node: cpu_s(wg) for node, wg in planes.items()}
    with Sampler(pids) as sampler, frozen(pids if getattr(arm, "freeze", False) else {}):
        t0 = time.monotonic()
        got = iperf(lab, test, seconds)
    if not got.stalled and got.bytes:
        gb = got.bytes / GB
        for node, wg in planes.items():
            per_gb = (cpu_s(wg) - plane_before[node]) / gb
            tally.dataplane.setdefault(arm.name, {}).setdefault(test, {}).setdefault(
                node, []
            ).append(per_gb)
    if got.stalled:
        tally.stalled.setdefault(arm.name, []).append(f"{test}: {got.stalled}")
    if got.active_s >= 1.0:
        # CPU and memory over the time traffic flowed (a cut-off session stops early)
        start, end = sampler.at(t0), sampler.at(t0 + got.active_s)
        wall = got.active_s
        for n in pids:
            w = window(start[n], end[n], wall, got.bytes)
            tally.busy.setdefault(f"{arm.name}.{n}", []).append(w)
    tally.speeds.setdefault(arm.name, {}).setdefault(test, []).append(
        0.0 if got.stalled else got.bps / 1e6
    )
    if test == "udp_up" and not got.stalled:
        tally.lost.setdefault(arm.name, []).append(got.lost_pct)
    if spying:
        time.sleep(2)  # py-spy writes its file after the duration
        tally.profiles |= {f"{arm.name}.{n}": top_frames(f) for n, f in spying.items()}
    return not got.stalled


@contextlib.contextmanager
def frozen(pids: dict[str, int]) -> Iterator[None]:
    """The agents stopped for the block: what the data plane does without them."""
    for pid in pids.values():
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids.values():
            os.kill(pid, signal.SIGCONT)


def schedule(arms: list[Arm], r: int, *, single: bool) -> list[tuple[str, Arm, bool]]:
    """(test, arm, bring the arm up first?) in the order they run in round ``r``.

    Arms take turns per test, in an order that reverses every time: the
    machine's load drifts, and every arm should see the same drift. A single
    round (``--quick``) runs each arm's tests in one session, to save connects."""
    if single:
        return [(test, arm, t == 0) for arm in arms for t, test in enumerate(TESTS)]
    return [
        (test, arm, True)
        for t, test in enumerate(TESTS)
        for arm in (arms if (r + t) % 2 == 0 else arms[::-1])
    ]


def profile_round(
    lab: Any,  # noqa: ANN401
    arms: list[Arm],
    seconds: float,
    server: IperfServer,
    tally: Tally,
) -> None:
    """One round more, before the measured ones and not counted in them (profilers
    cost CPU, and py-spy only runs on the meshvpn arms): TCP and UDP up per arm
    under perf(1), the agents under py-spy during TCP up."""
    scratch = Tally()
    for test in ("tcp_up", "udp_up"):
        for arm in arms:
            (lab.state_dir / arm.name).mkdir(exist_ok=True)
            arm.up()
            try:
                data = lab.state_dir / f"{arm.name}-{test}.perf"
                perf = perf_record(seconds, data)
                if not run_test(lab, arm, test, seconds, test == "tcp_up", scratch):
                    server.restart()
                if perf is not None and perf.wait() == 0:
                    tally.profiles[f"{arm.name}.dataplane_{test}"] = perf_summary(data)
            finally:
                arm.down()
    tally.profiles |= scratch.profiles


ARMS = ("meshvpn", "plain", "metered", "frozen")
DEFAULT_ARMS = ("meshvpn", "plain", "metered")


def measure(
    rounds: int,
    seconds: float,
    idle_s: float,
    profile: bool,
    arms: tuple[str, ...] = DEFAULT_ARMS,
) -> dict[str, Any]:

    tally = Tally()
    with Lab(f"bt{os.getpid() % 100_000:05d}") as lab:
        lab.up(1, 1)
        start_broker(lab)
        relay = start_relay(lab, 1, broker=True)
        server = IperfServer(lab)
        server.start()
        plain = PlainArm(lab)
        plain.prepare()
        hand = MeshvpnArm(lab, int(relay["pid"]))
        metered = MeshvpnArm(lab, int(relay["pid"]), metered=True, name="metered")
        still = MeshvpnArm(lab, int(relay["pid"]), name="frozen", freeze=True)
        chosen: list[Arm] = [a for a in (hand, plain, metered, still) if a.name in arms]
        try:
            run_rounds(lab, chosen, server, Rounds(rounds, seconds, idle_s),
                       tally, profile=profile)  # fmt: skip
            tally.exchange = exchange(lab, metered)
        finally:
            plain.close()
            server.stop()
    return report(TESTS, tally)


@dataclass(frozen=True)
class Rounds:
    count: int
    seconds: float  # per iperf3 run
    idle_s: float  # idle sampling of the agents after each connect


def run_rounds(
    lab: Any,  # noqa: ANN401
    arms: list[Arm],
    server: IperfServer,
    rounds: Rounds,
    tally: Tally,
    *,
    profile: bool,
) -> None:
    """Every test through every arm, ``rounds.count`` times (see ``schedule``);
    with ``profile``, a profiled round first (``profile_round``)."""
    if profile:
        profile_round(lab, arms, rounds.seconds, server, tally)
    single = rounds.count == 1
    for r in range(rounds.count):
        for test, arm, first in schedule(arms, r, single=single):
            (lab.state_dir / arm.name).mkdir(exist_ok=True)
            if first:
                arm.up()
                if arm.agents() and test == TESTS[0]:
                    sample_idle(arm, arm.agents(), rounds.idle_s, tally)
            try:
                if not run_test(lab, arm, test, rounds.seconds, spy=False, tally=tally):
                    server.restart()  # it may still serve the dead run
                    if single:
                        arm.down()  # cut off: a new session for the next test
                        arm.up()
            finally:
                if not single or test == TESTS[-1]:
                    arm.down()


def exchange(lab: Any, metered: MeshvpnArm) -> dict[str, Any]:  # noqa: ANN401
    """The receipt exchange as both ends saw it, over all metered sessions."""

    status = None
    for _ in range(3):  # `meshvpn status` may time out on a loaded machine
        with contextlib.suppress(LocalError):
            status = node_status(lab, "relay1")
            break
    receipts = (status or {}).get("receipts", {})
    counters = {k: v for k, v in receipts.items() if isinstance(v, int)}
    return {
        "client_receipts_signed": metered.signed,  # highest seq per session, summed
        "client_receipts_acked": metered.acked,
        "relay": counters,  # statements sent, receipts accepted and rejected, cut-offs
        "cut_off_reasons": [c["reason"] for c in receipts.get("cut_offs", [])],
    }


def report(tests: tuple[str, ...], tally: Tally) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for test in tests:
        for arm, by_test in tally.speeds.items():
            out[f"{arm}_{test}"] = summary(by_test[test], "mbit_s", 0)
        base = tally.speeds.get("plain", {}).get(test)
        for arm, by_test in tally.speeds.items():
            if arm != "plain" and base is not None:
                # paired: each run over the plain run next to it (same round, same
                # test), so the load drifting between rounds cancels out
                pairs = [a / b for a, b in zip(by_test[test], base, strict=True) if b]
                key = "ratio" if arm == "meshvpn" else f"ratio_{arm}"
                out[f"{key}_{test}"] = summary(pairs, "x", 3)
    for arm, lost in tally.lost.items():
        out[f"{arm}_udp_lost"] = summary(lost, "pct", 1)
    out["wireguard_cpu_s_per_gb"] = dataplane_report(tally)
    out["metered_cut_offs"] = len(tally.stalled.get("metered", []))
    out["metered_exchange"] = tally.exchange
    out["stalled_runs"] = tally.stalled
    for name, windows in tally.busy.items():
        calm = tally.idle.get(name, [])
        figures: dict[str, Any] = {
            "cpu_pct_idle": summary([100 * w.cpu_s / w.wall_s for w in calm], "pct", 2),
            "cpu_pct_busy": summary([100 * w.cpu_s / w.wall_s for w in windows], "pct", 2),
            "cpu_s_per_gb": summary([w.cpu_s / (w.payload_bytes / GB) for w in windows], "s", 3),
            "rss_idle": summary([w.rss / MB for w in calm], "mb", 1),
            "rss_busy": summary([w.rss / MB for w in windows], "mb", 1),
            "rss_peak": summary([w.peak / MB for w in windows], "mb", 1),
        }
        if name in tally.profiles:
            figures["profile_busy"] = tally.profiles[name]
        arm, _, agent = name.partition(".")
        out.setdefault(arm, {})[agent] = figures
    for name, lines in tally.profiles.items():
        arm, _, what = name.partition(".")
        if what.startswith("dataplane"):
            out.setdefault(arm, {})[f"profile_{what}"] = lines
    return out


def dataplane_report(tally: Tally) -> dict[str, Any]:
    """wireguard-go CPU seconds per GB delivered, per arm and test: by node (median)
    and in all (median, min, max); the same binary's cost per byte, whatever the load."""
    out: dict[str, Any] = {}
    for arm, by_test in tally.dataplane.items():
        for test, by_node in by_test.items():
            runs = min(len(v) for v in by_node.values())
            total = [sum(v[i] for v in by_node.values()) for i in range(runs)]
            figures: dict[str, Any] = {
                node: round(statistics.median(v), 2) for node, v in by_node.items()
            }
            figures["all"] = summary(total, "s", 2)
            out.setdefault(arm, {})[test] = figures
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="per iperf3 run")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle sampling")
    parser.add_argument("--quick", action="store_true", help="one round of short runs")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="in the first round's TCP up: py-spy the agents (pip install py-spy) and"
        " perf(1) the whole machine",
    )
    parser.add_argument(
        "--arms",
        default=",".join(DEFAULT_ARMS),
        help="comma-separated arms to run (default: %(default)s; without plain, no ratios;"
        " frozen: the hand-admitted session with its agents stopped while iperf3 runs)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.idle = 1, 1.5, 0.5
    arms = tuple(a for a in args.arms.split(",") if a)
    if not arms or set(arms) - set(ARMS):
        parser.error(f"--arms: choose from {', '.join(ARMS)}")
    write_report(measure(args.rounds, args.seconds, args.idle, args.profile, arms), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
