"""A relay under a flood keeps serving its sessions and admits real clients.

relay1 runs on the lab's broker; client1 has a session and downloads from the
lab's web server in a loop for the whole test. Then, at once:

- 11,000 session requests in one burst over MQTT (from client2's namespace):
  10,000 forged (random bytes of every size, request-sized random bytes,
  bit-flipped, truncated and extended real requests, requests under valid
  Noise signed for another relay, expired, with a bad inner signature, and
  replays of one real request) and 1,000 valid requests from 1,000 fresh
  identities that will never use or pay for their sessions;
- a UDP flood on the probe port from the internet: real probes from 1,000
  forged source prefixes, a probe storm from one address, and garbage.

Then client2 connects by discovery, retrying while the relay is busy. What
must hold: the relay process is the same and answers; its memory grew by a
bounded amount; client1's downloads never failed; client2 got a session and
traffic flows; pending sessions never exceeded their cap and are all gone
once unused; and ``status --json`` accounts for what was dropped, and why.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import pytest

from meshvpn.directory import session_topic
from meshvpn.handshake import open_request
from meshvpn.identity import PrivateKey, PublicKey, new_ed25519, new_x25519
from meshvpn.lab import Lab
from meshvpn.lab.nodes import (
    broker_address,
    discover_and_connect,
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
from meshvpn.messages import SessionRequest
from meshvpn.probe import BURST_ALL, RATE_ALL, make_request

pytestmark = pytest.mark.e2e

TOOL = str(Path(__file__).with_name("mqtt_tool.py"))
MIB = 1 << 20
RSS_BOUND = 64 * MIB  # generous: the tables it may grow are bounded well below this

# Sends [[source, hex], ...] in order, 2,000 datagrams a second: a flood that lasts
# as long as the MQTT burst takes to drain, at four times the relay's probe budget.
UDP_FLOOD = r"""
import json, socket, sys, time
target, port, path, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
socks, sent, start = {}, 0, time.monotonic()
for src, h in json.load(open(path)):
    s = socks.get(src)
    if s is None:
        s = socks[src] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IP, 19, 1)  # IP_TRANSPARENT: send from a forged source
        s.bind((src, 0))
    s.sendto(bytes.fromhex(h), (target, port))
    sent += 1
    if sent % 100 == 0:
        time.sleep(max(0.0, start + sent / 2000 - time.monotonic()))
open(out, "w").write(json.dumps({"sent": sent, "seconds": time.monotonic() - start}) + "\n")
"""

DOWNLOADS = r"""
import json, sys, time, urllib.request
url, until_file, out = sys.argv[1], sys.argv[2], sys.argv[3]
done, fails = [], 0
import os
while not os.path.exists(until_file):
    start = time.time()
    try:
        n = len(urllib.request.urlopen(url, timeout=20).read())
        done.append([start, time.time(), n])
    except OSError as e:
        fails += 1
        print(repr(e), file=sys.stderr, flush=True)
    open(out + ".tmp", "w").write(json.dumps({"done": done, "fails": fails}))
    os.replace(out + ".tmp", out)
"""


@pytest.fixture
def lab_state_root() -> Path:
    return Path("/run/meshvpn/f")  # short: control sockets live below it


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def status_of(lab: Lab, node: str) -> dict[str, Any]:
    status = node_status(lab, node)
    assert status is not None, f"{node} does not answer"
    return status


def request(relay_id: PublicKey, relay_control: PublicKey, *, identity: PrivateKey | None = None,
            relay_named: PublicKey | None = None, issued_ms: int | None = None,
            signer: PrivateKey | None = None) -> bytes:  # fmt: skip
    """A session request as a client makes it (Noise IK message 1)."""
    identity = identity or new_ed25519()
    control = new_x25519()
    req = SessionRequest(
        relay=relay_named or relay_id,
        control_key=control.x25519_public(),
        wireguard_key=new_x25519().x25519_public(),
        want_exit="",
        max_price_per_gib=10**12,
        reply_token=os.urandom(16),
        nonce=os.urandom(16),
        issued_ms=issued_ms if issued_ms is not None else time.time_ns() // 1_000_000,
    )
    wire, _ = open_request(signer or identity, control, relay_id, relay_control, req)
    return wire


def forged_requests(rng: random.Random, relay_id: PublicKey, control: PublicKey) -> list[bytes]:
    now = time.time_ns() // 1_000_000
    real = request(relay_id, control)
    out: list[bytes] = []
    for i in range(10_000):
        kind = i % 10
        if kind == 0:
            out.append(rng.randbytes(rng.randrange(0, 4500)))
        elif kind == 1:
            out.append(rng.randbytes(rng.randrange(343, 376)))  # a request's size: opened
        elif kind == 2:
            data = bytearray(real)
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            out.append(bytes(data))
        elif kind == 3:
            out.append(real[: rng.randrange(len(real))])
        elif kind == 4:
            out.append(real + rng.randbytes(rng.randrange(1, 40)))
        elif kind == 5 and i % 40 == 5:
            out.append(request(relay_id, control, relay_named=new_ed25519().ed25519_public()))
        elif kind == 6 and i % 40 == 6:
            out.append(request(relay_id, control, issued_ms=now - 3_600_000))
        elif kind == 7 and i % 40 == 7:
            # the request names one identity, the signature is another's
            out.append(request(relay_id, control, signer=new_ed25519()))
        else:
            out.append(real)  # replays of one real request: answered once at most
    return out


def probe_flood(rng: random.Random, control: PublicKey) -> list[tuple[str, str]]:
    """(source, datagram hex) for the UDP flooder, shuffled: real probes from 1,000
    forged source prefixes (past every per-source bucket, into the overall one), a
    storm of real probes from one address, and garbage."""
    now = time.time_ns() // 1_000_000
    plan = [
        (f"100.{65 + k // 250}.{k % 250}.7", make_request(control, now)[0].hex())
        for k in range(1_000)
        for _ in range(4)
    ]
    storm = "203.0.113.99"
    plan += [(storm, make_request(control, now)[0].hex()) for _ in range(2_000)]
    plan += [(storm, rng.randbytes(rng.randrange(1, 300)).hex()) for _ in range(6_000)]
    rng.shuffle(plan)
    return plan


class Watch:
    """Samples the relay's RSS every 0.2 s and its pending sessions every 2 s (a
    status call starts a Python: more often, the test would load the relay's CPU)."""

    def __init__(self, lab: Lab, pid: int) -> None:
        self.lab, self.pid = lab, pid
        self.before = self.peak = rss(pid)
        self.pending = 0  # the most pending sessions seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        for tick in itertools.count():
            if self._stop.wait(0.2):
                return
            self.peak = max(self.peak, rss(self.pid))
            if tick % 10 == 0 and (status := node_status(self.lab, "relay1")) is not None:
                self.pending = max(self.pending, status["sessions"]["pending"])

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def write_floods(lab: Lab, relay: dict[str, Any]) -> tuple[Path, Path, int]:
    """The MQTT burst and the UDP flood, as files for the tools that send them."""
    relay_id = PublicKey.from_b64(relay["identity_public_key"])
    control = PublicKey.from_b64(relay["control_public_key"])
    topic = session_topic(relay["node_id"])
    rng = random.Random(20260808)
    forged = forged_requests(rng, relay_id, control)
    unpaid = [request(relay_id, control) for _ in range(1_000)]  # 1,000 fresh identities
    burst = [[topic, w.hex(), False] for w in forged + unpaid]
    rng.shuffle(burst)
    burst_file = lab.state_dir / "burst.json"
    burst_file.write_text(json.dumps(burst))
    udp_file = lab.state_dir / "udp.json"
    udp_file.write_text(json.dumps(probe_flood(rng, control)))
    return burst_file, udp_file, len(burst)


def connect_while_flooded(lab: Lab, started: float) -> list[tuple[float, str]]:
    """client2 connects by discovery at once, retrying when refused or unanswered.
    Returns (seconds since the floods began, last line) per attempt."""
    attempts: list[tuple[float, str]] = []
    while not attempts or not attempts[-1][1].startswith("connected"):
        assert len(attempts) < 30, f"client2 never got a session: {attempts}"
        if attempts:
            time.sleep(1)
        line = connect_once(lab, 2)
        attempts.append((round(time.monotonic() - started, 1), line))
    return attempts


def test_a_relay_under_flood_keeps_serving(make_lab: Callable[..., Lab]) -> None:
    lab = make_lab(1, 2)
    start_broker(lab)
    start_relay(lab, 1, broker=True)
    discover_and_connect(lab, 1)
    relay = status_of(lab, "relay1")
    pid = int(relay["pid"])
    relay_wan = str(lab.plan.relay(1).wan_addr)
    meshvpn(lab, "client2", "init")
    burst_file, udp_file, burst_len = write_floods(lab, relay)

    # client1 downloads for the whole test
    stop_file, report = lab.state_dir / "stop-downloads", lab.state_dir / "downloads.json"
    url = f"http://{lab.plan.web_addr}/bytes/2000000"
    lab.spawn("client1", [sys.executable, "-c", DOWNLOADS, url, str(stop_file), str(report)])
    time.sleep(2)

    host, port = broker_address(lab).split(":")
    udp_report = lab.state_dir / "udp-flood.json"
    with Watch(lab, pid) as watch:
        started, wall_started = time.monotonic(), time.time()
        as_client2 = ["--state-dir", str(enroll(lab, "client2"))]
        lab.spawn("client2", [sys.executable, TOOL, *as_client2, host, port, "flood",
                              str(burst_file)], log=lab.state_dir / "mqtt-flood.log")  # fmt: skip
        lab.spawn("internet", [sys.executable, "-c", UDP_FLOOD, relay_wan, "51821",
                               str(udp_file), str(udp_report)])  # fmt: skip
        attempts = connect_while_flooded(lab, started)
        assert fetch(lab, "client2", "/ip").decode() == relay_wan
        burst = wait_json(lab.state_dir / "mqtt-flood.log", 120)
        udp = wait_json(udp_report, 120)
    elapsed = time.monotonic() - started

    # the relay is the same process, answers, and its memory stayed bounded
    after = status_of(lab, "relay1")
    assert int(after["pid"]) == pid
    assert watch.peak - watch.before < RSS_BOUND, (watch.before, watch.peak)
    assert after["mqtt"]["handler_errors"] == 0
    assert watch.pending <= after["sessions"]["pending_cap"]

    # client1's downloads went on throughout
    stop_file.touch()
    time.sleep(0.5)
    downloads = wait_json(report, 60)
    assert downloads["fails"] == 0
    during = [d for d in downloads["done"] if d[1] > wall_started]
    assert during, "no download completed after the floods began"
    assert all(n == 2_000_000 for _, _, n in downloads["done"])

    assert burst["published"] == burst_len
    check_accounting(after, elapsed)

    # the unpaid sessions hold at most the pending cap; every other one was evicted
    final = status_of(lab, "relay1")
    ended = final["counters"]
    assert final["sessions"]["active"] == 2 + final["sessions"]["pending"]
    assert ended.get("sessions:evicted-pending", 0) == (
        ended["requests:granted"] - final["sessions"]["active"]
    )

    summary = {
        "rss_mib": [round(x / MIB, 1) for x in (watch.before, watch.peak, rss(pid))],
        "pending_max": watch.pending,
        "udp": udp,
        "burst": burst,
        "client2_attempts": attempts,
        "downloads_during": len(during),
        "mqtt": after["mqtt"],
        "counters": dict(sorted(ended.items())),
        "probes": after["probes"],
        "sessions_final": final["sessions"],
    }
    print(json.dumps(summary, indent=1))


def check_accounting(status: dict[str, Any], elapsed: float) -> None:
    """What was dropped, and why: every message the relay handled is accounted for."""
    counters = status["counters"]
    handled = counters["session-messages"]
    assert handled == sum(
        v for k, v in counters.items() if k.startswith(("rejected:", "requests:"))
    )
    assert handled + status["mqtt"]["dropped"] >= 1_000  # the rest the broker's queue dropped
    assert counters.get("rejected:malformed", 0) > 0
    assert counters.get("requests:granted", 0) >= 2  # client1, client2, and some unpaid
    probes = status["probes"]
    assert probes["dropped"].get("malformed", 0) > 0
    assert probes["dropped"].get("rate-limited", 0) > 0
    assert probes["answered"] <= BURST_ALL + RATE_ALL * elapsed + 10  # +10: the clients'


def connect_once(lab: Lab, index: int) -> str:
    """``meshvpn connect --broker`` once; its last line (the error, if it failed)."""
    node = f"client{index}"
    argv = meshvpn_argv(
        "connect", "--broker", broker_address(lab), "--interface", node_ifname(lab, node),
        "--state-dir", str(node_state_dir(lab, node)),
    )  # fmt: skip
    proc = lab.exec(node, argv, check=False, timeout=90)
    lines = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
    return lines[-1][:160] if lines else str(proc.returncode)


def wait_json(path: Path, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = path.read_text().strip().splitlines()
            data: dict[str, Any] = json.loads(text[-1])
        except (OSError, ValueError, IndexError):
            assert time.monotonic() < deadline, f"no result in {path}"
            time.sleep(0.2)
            continue
        return data
