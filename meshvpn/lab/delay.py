"""A UDP port forwarder that adds delay: the lab's stand-in for distance.

``python -m meshvpn.lab.delay --listen PUBLIC --to WAN --ports 51820,51821 --delay-ms D``

Theory of operation
-------------------
There is no netem on the lab's kernel, so a relay that should look far away
gets a public address on the internet namespace's loopback, and this process,
running in that namespace, forwards UDP between that address and the relay's
WAN address, holding every datagram for D ms in each direction (so a round
trip through it takes 2·D ms longer than one to the WAN address).

It behaves like a port-forwarding NAT on a home router: a datagram from a new
client source (address, port) to PUBLIC:p opens a *mapping*, an upstream
socket bound to PUBLIC (fresh port) and connected to WAN:p. The relay sees the
mapping's address; what it sends back goes out of PUBLIC:p to that client.
Mappings idle for IDLE_TIMEOUT in both directions are closed; at most
MAX_MAPPINGS exist at once (a new source beyond that is dropped and counted).

Two pure cores, with time passed in as ``now``:

- ``DelayQueue``: every datagram in flight, FIFO, each released no earlier
  than ``delay`` after it was pushed. The delay is the same for everything, so
  a deque is the whole timer wheel: deadlines are non-decreasing and only the
  head needs a timer. Bounded; a push over the bound is dropped and counted,
  as a router's full queue would.
- ``MappingTable``: client source -> mapping, with last-use times, expiry and
  the bound.

The asyncio adapter (``Forwarder``) reads each socket until it would block
(one loop callback per burst, not per datagram), pushes with one ``now`` per
burst, and arms one ``loop.call_at`` for the head's deadline; the callback
sends everything due and re-arms. A datagram the kernel will not take at once
(send buffer full, ICMP error pending) is dropped and counted.

Prints ``listening on ...`` once bound, and its counters on SIGTERM/SIGINT,
after which it exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal
import socket
import sys
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Generic, TypeVar

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

MAX_QUEUE = 8192  # datagrams in flight: > 1 s of 150 Mbit/s at the largest lab delays
MAX_MAPPINGS = 4096
IDLE_TIMEOUT = 180.0  # seconds, as a typical home router's UDP timeout
SWEEP_INTERVAL = 10.0
READ_BURST = 256  # datagrams read per readiness callback before yielding to the loop
RECV_SIZE = 65536
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>: root may exceed net.core.rmem_max
SO_SNDBUFFORCE = 32
SOCKET_BUFFER = 4 * 1024 * 1024


class DelayQueue(Generic[T]):
    """Items released in push order, each no earlier than ``delay`` after its push.

    If ``now`` ever goes backwards, a deadline is raised to the one before it:
    order wins over an item leaving earlier than its predecessor.
    """

    def __init__(self, delay: float, limit: int = MAX_QUEUE) -> None:
        if not delay >= 0:
            raise ValueError(f"delay must be >= 0, not {delay}")
        if limit < 1:
            raise ValueError(f"limit must be >= 1, not {limit}")
        self.delay = delay
        self.limit = limit
        self.dropped = 0
        self._items: collections.deque[tuple[float, T]] = collections.deque()
        self._last = float("-inf")

    def __len__(self) -> int:
        return len(self._items)

    def push(self, item: T, now: float) -> bool:
        """Queue ``item``; False (and counted in ``dropped``) if the queue is full."""
        if len(self._items) >= self.limit:
            self.dropped += 1
            return False
        self._last = max(self._last, now + self.delay)
        self._items.append((self._last, item))
        return True

    def pop_due(self, now: float) -> list[T]:
        """Remove and return, in order, every item whose deadline is ``<= now``."""
        items = self._items
        due: list[T] = []
        while items and items[0][0] <= now:
            due.append(items.popleft()[1])
        return due

    def next_deadline(self) -> float | None:
        return self._items[0][0] if self._items else None


class MappingTable(Generic[K, V]):
    """Bounded map with per-entry last-use time; entries idle ``timeout`` expire."""

    def __init__(self, timeout: float = IDLE_TIMEOUT, limit: int = MAX_MAPPINGS) -> None:
        self.timeout = timeout
        self.limit = limit
        self._entries: dict[K, tuple[V, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def full(self) -> bool:
        return len(self._entries) >= self.limit

    def get(self, key: K, now: float) -> V | None:
        """The value for ``key``, marking it used at ``now``; None if absent."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries[key] = (entry[0], max(entry[1], now))
        return entry[0]

    def add(self, key: K, value: V, now: float) -> bool:
        """Add a new entry; False if ``key`` is present or the table is full."""
        if key in self._entries or self.full:
            return False
        self._entries[key] = (value, now)
        return True

    def expire(self, now: float) -> list[V]:
        """Remove and return the values idle for ``timeout`` or more."""
        old = [k for k, (_, used) in self._entries.items() if now - used >= self.timeout]
        return [self._entries.pop(k)[0] for k in old]

    def clear(self) -> list[V]:
        values = [v for v, _ in self._entries.values()]
        self._entries.clear()
        return values


# -- the asyncio adapter ---------------------------------------------------------------

Address = tuple[str, int]


@dataclass
class Counters:
    forwarded_up: int = 0  # client -> relay
    forwarded_down: int = 0  # relay -> client
    queue_full: int = 0
    send_failed: int = 0
    mapping_full: int = 0
    mappings_opened: int = 0
    mappings_expired: int = 0

    def line(self) -> str:
        return " ".join(f"{k}={v}" for k, v in vars(self).items())


@dataclass(frozen=True)
class Send:
    """A datagram waiting in the delay queue, and the socket it will leave by."""

    sock: socket.socket
    data: bytes
    dest: Address | None  # None: ``sock`` is connected


def _buffers(sock: socket.socket) -> None:
    # A burst of a WireGuard download must wait in the kernel, not be dropped there.
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


def _udp_socket(bind: Address) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)  # noqa: FBT003 - the stdlib's signature
        _buffers(sock)
        sock.bind(bind)
    except BaseException:
        sock.close()
        raise
    return sock


class Forwarder:
    """Forwards ``listen:port`` <-> ``to:port`` for each port, through one delay queue."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listen: IPv4Address,
        to: IPv4Address,
        ports: list[int],
        delay: float,
        *,
        max_queue: int = MAX_QUEUE,
        max_mappings: int = MAX_MAPPINGS,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.loop = loop
        self.listen = str(listen)
        self.to = str(to)
        self.ports = ports
        self.queue: DelayQueue[Send] = DelayQueue(delay, max_queue)
        self.mappings: MappingTable[tuple[int, Address], socket.socket] = MappingTable(
            idle_timeout, max_mappings
        )
        self.counters = Counters()
        self._listeners: dict[int, socket.socket] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._buf = bytearray(RECV_SIZE)
        self._view = memoryview(self._buf)

    def start(self) -> None:
        try:
            for port in self.ports:
                sock = _udp_socket((self.listen, port))
                self._listeners[port] = sock
                self.loop.add_reader(sock.fileno(), self._from_client, sock, port)
        except BaseException:
            self.close()
            raise
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def close(self) -> None:
        for handle in (self._timer, self._sweeper):
            if handle is not None:
                handle.cancel()
        for sock in (*self._listeners.values(), *self.mappings.clear()):
            self._close(sock)
        self._listeners.clear()

    def _close(self, sock: socket.socket) -> None:
        if sock.fileno() >= 0:
            self.loop.remove_reader(sock.fileno())
            sock.close()

    # Hooks named for the event that calls them.

    def _from_client(self, listener: socket.socket, port: int) -> None:
        now = self.loop.time()
        for _ in range(READ_BURST):
            try:
                n, src = listener.recvfrom_into(self._buf)
            except BlockingIOError:
                break
            except OSError:
                continue  # an ICMP error for an earlier reply: nothing to read here
            upstream = self.mappings.get((port, src), now)
            if upstream is None:
                upstream = self._open_mapping(port, src, now)
                if upstream is None:
                    continue
            if self.queue.push(Send(upstream, bytes(self._view[:n]), None), now):
                self.counters.forwarded_up += 1
            else:
                self.counters.queue_full += 1
        self._arm()

    def _from_relay(self, upstream: socket.socket, port: int, client: Address) -> None:
        now = self.loop.time()
        listener = self._listeners[port]
        self.mappings.get((port, client), now)
        for _ in range(READ_BURST):
            try:
                n = upstream.recv_into(self._buf)
            except BlockingIOError:
                break
            except OSError:
                continue  # ICMP port unreachable from the relay, reported on our socket
            if self.queue.push(Send(listener, bytes(self._view[:n]), client), now):
                self.counters.forwarded_down += 1
            else:
                self.counters.queue_full += 1
        self._arm()

    def _open_mapping(self, port: int, client: Address, now: float) -> socket.socket | None:
        if self.mappings.full:
            self._expire(now)
        if self.mappings.full:
            self.counters.mapping_full += 1
            return None
        upstream = _udp_socket((self.listen, 0))
        upstream.connect((self.to, port))
        self.mappings.add((port, client), upstream, now)
        self.loop.add_reader(upstream.fileno(), self._from_relay, upstream, port, client)
        self.counters.mappings_opened += 1
        return upstream

    def _arm(self) -> None:
        deadline = self.queue.next_deadline()
        if deadline is None or self._timer is not None:
            return  # deadlines never decrease: an armed timer is already early enough
        self._timer = self.loop.call_at(deadline, self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        for item in self.queue.pop_due(self.loop.time()):
            try:
                if item.dest is None:
                    item.sock.send(item.data)
                else:
                    item.sock.sendto(item.data, item.dest)
            except OSError:  # full send buffer, pending ICMP error, or a mapping since closed
                self.counters.send_failed += 1
        self._arm()

    def _sweep(self) -> None:
        self._expire(self.loop.time())
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _expire(self, now: float) -> None:
        for sock in self.mappings.expire(now):
            self._close(sock)
            self.counters.mappings_expired += 1


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    fwd = Forwarder(
        loop,
        args.listen,
        args.to,
        args.ports,
        args.delay_ms / 1000,
        max_queue=args.max_queue,
        max_mappings=args.max_mappings,
        idle_timeout=args.idle_timeout,
    )
    fwd.start()
    try:
        ports = ",".join(map(str, args.ports))
        print(
            f"listening on {args.listen} ports {ports} -> {args.to}, {args.delay_ms:g} ms each way",
            flush=True,
        )
        await stop.wait()
    finally:
        fwd.close()
        print(f"stopped: {fwd.counters.line()}", flush=True)


def _ports(text: str) -> list[int]:
    try:
        ports = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port list: {text!r}") from None
    if not ports or not all(0 < p < 65536 for p in ports) or len(set(ports)) != len(ports):
        raise argparse.ArgumentTypeError(f"want distinct ports 1..65535, not {text!r}")
    return ports


def _non_negative(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"want a finite number >= 0, not {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshvpn.lab.delay")
    parser.add_argument("--listen", type=IPv4Address, required=True, help="public address")
    parser.add_argument("--to", type=IPv4Address, required=True, help="the relay's WAN address")
    parser.add_argument("--ports", type=_ports, required=True, help="comma-separated UDP ports")
    parser.add_argument("--delay-ms", type=_non_negative, required=True, help="one way")
    parser.add_argument("--max-queue", type=int, default=MAX_QUEUE)
    parser.add_argument("--max-mappings", type=int, default=MAX_MAPPINGS)
    parser.add_argument("--idle-timeout", type=_non_negative, default=IDLE_TIMEOUT)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
