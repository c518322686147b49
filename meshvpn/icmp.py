"""ICMPv6 echo over the mesh: round-trip times, and the hops on the way.

``meshvpn ping NODE_ID`` asks the relay agent, which calls ``probe_path``
in a thread: echo requests to the node's mesh address with a growing hop
limit (1, 2, ...) until the node itself answers; each relay on the way
answers "time exceeded" from its own mesh address, which names the hop.
Then ``count`` plain echoes measure the round trip. Blocking sockets with
timeouts, on a raw ICMPv6 socket (the agent is root; the kernel fills in
ICMPv6 checksums itself). The packet codec is pure and tested on its own.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Final

ECHO_REQUEST: Final = 128
ECHO_REPLY: Final = 129
TIME_EXCEEDED: Final = 3
DEST_UNREACHABLE: Final = 1
IPV6_HEADER: Final = 40
MAX_HOPS: Final = 8
PAYLOAD: Final = b"meshvpn ping\x00\x00\x00\x00"


def echo_request(ident: int, seq: int) -> bytes:
    return struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, ident, seq) + PAYLOAD


@dataclass(frozen=True)
class Answer:
    kind: str  # "reply", "time-exceeded", "unreachable"
    ident: int
    seq: int


def parse(message: bytes) -> Answer | None:
    """An ICMPv6 message as a raw socket hands it over (no IPv6 header): an answer
    to one of our echoes, or None (anything else on the wire)."""
    if len(message) < 8:
        return None
    kind, _code = message[0], message[1]
    if kind == ECHO_REPLY:
        ident, seq = struct.unpack("!HH", message[4:8])
        return Answer("reply", ident, seq)
    if kind in {TIME_EXCEEDED, DEST_UNREACHABLE}:
        inner = message[8 + IPV6_HEADER :]  # the start of the packet that failed
        if len(inner) < 8 or inner[0] != ECHO_REQUEST:
            return None
        ident, seq = struct.unpack("!HH", inner[4:8])
        return Answer("time-exceeded" if kind == TIME_EXCEEDED else "unreachable", ident, seq)
    return None


@dataclass(frozen=True)
class Hop:
    hop: int
    address: str | None  # who answered; None: nobody within the timeout
    rtt_ms: float | None
    reached: bool  # the target itself answered


class Pinger:
    def __init__(self, target: ipaddress.IPv6Address, timeout_s: float = 1.0) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.ident = int.from_bytes(os.urandom(2), "big")
        self.seq = 0
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)

    def close(self) -> None:
        self.sock.close()

    def send(self, hop_limit: int = 64) -> tuple[Answer | None, str | None, float | None]:
        """One echo; (answer, who answered, RTT ms), or (None, None, None) on timeout."""
        self.seq = (self.seq + 1) & 0xFFFF
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, hop_limit)
        sent = time.monotonic()
        self.sock.sendto(echo_request(self.ident, self.seq), (str(self.target), 0))
        deadline = sent + self.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                break
            data, addr = self.sock.recvfrom(2048)
            answer = parse(data)
            if answer is not None and (answer.ident, answer.seq) == (self.ident, self.seq):
                rtt = (time.monotonic() - sent) * 1000
                return answer, str(addr[0]).split("%")[0], round(rtt, 2)
        return None, None, None


def probe_path(
    target: ipaddress.IPv6Address, count: int, timeout_s: float = 1.0
) -> tuple[list[Hop], list[float | None]]:
    """The hops to ``target`` (hop limit 1, 2, ... until it answers) and ``count``
    echo round trips (None for a lost one)."""
    pinger = Pinger(target, timeout_s)
    try:
        hops: list[Hop] = []
        for limit in range(1, MAX_HOPS + 1):
            answer, who, rtt = pinger.send(limit)
            reached = answer is not None and answer.kind == "reply"
            hops.append(Hop(limit, who, rtt, reached))
            if reached or (answer is not None and answer.kind == "unreachable"):
                break
        rtts = []
        for _ in range(count):
            answer, _who, rtt = pinger.send()
            rtts.append(rtt if answer is not None and answer.kind == "reply" else None)
        return hops, rtts
    finally:
        pinger.close()
