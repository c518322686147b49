"""An in-memory mesh of ``Router``s in virtual time, for tests and benchmarks.

Nodes are numbered; node ``i`` has the mesh address ``node_address(i)`` and
originates its /64. Links carry ``Send`` actions to
the other end after a fixed one-way delay (so the RTT, hence the link cost, is
known), dropping a packet with probability ``loss``. A link can be *cut*
(packets vanish, the routers are not told: a dead cable or a frozen relay) or
taken *down* (``link_down`` on both ends, as the agent does when it removes the
WireGuard interface). A node can be killed (it vanishes) or restarted (a fresh
``Router`` with the same address: all protocol state lost).

The clock only moves from one event to the next: deliveries and each router's
``next_timer_ms``. ``on_change`` callbacks run after every event that changed
some router's table, which is when forwarding loops could appear.

``check_*`` functions compare the routers against a brute-force model of the
same graph: next hops followed hop by hop, Dijkstra on the link costs the
routers themselves measured.
"""

from __future__ import annotations

import heapq
import ipaddress
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from meshvpn.routing import (
    INFINITY,
    Action,
    NeighbourLost,
    NeighbourState,
    Router,
    RoutesChanged,
    RoutingParams,
    Send,
)

START_MS = 1_700_000_000_000  # a realistic Unix time: timestamps wrap mod 2^32 on the wire


def node_address(i: int) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(f"fd6d:7368:{i >> 16:x}:{i & 0xFFFF:x}::1")


def node_prefix(i: int) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(f"{node_address(i)}/64", strict=False)


def owner_of(prefix: ipaddress.IPv6Network) -> int:
    """The node number whose prefix this is (the inverse of ``node_prefix``)."""
    return int(prefix.network_address) >> 64 & 0xFFFF_FFFF


def link_name(j: int) -> str:
    """The link id every node uses for its link to node ``j``."""
    return f"mv{j}"


@dataclass
class SimLink:
    a: int
    b: int
    delay_ms: int  # one way
    cut: bool = False
    down: bool = False


@dataclass(order=True)
class _Event:
    at_ms: int
    seq: int
    node: int = field(compare=False)
    link: str = field(compare=False)  # "" for a timer
    data: bytes = field(compare=False, default=b"")
    token: int = field(compare=False, default=0)


class Simulation:
    def __init__(
        self, params: RoutingParams | None = None, seed: int = 0, loss: float = 0.0
    ) -> None:
        self.params = params or RoutingParams()
        self.rng = random.Random(seed)  # noqa: S311 - loss simulation, not secrets
        self.loss = loss
        self.now_ms = START_MS
        self.routers: dict[int, Router] = {}
        self.links: dict[frozenset[int], SimLink] = {}
        self.on_change: list[Callable[[Simulation], None]] = []
        self.lost: list[tuple[int, int, str]] = []  # (time, node, link) of NeighbourLost
        self.changes = 0  # RoutesChanged seen
        self.last_change_ms = START_MS
        self.delivered = 0
        self.bytes_sent = 0
        # then router_cpu_ns sums the time inside Router calls (a wall clock: a CPU
        # clock costs a system call, more than many a Router call)
        self.measure_cpu = False
        self.router_cpu_ns = 0
        self.dropped = 0
        self.dead: set[int] = set()
        self._queue: list[_Event] = []
        self._seq = 0
        self._timer_token: dict[int, int] = {}
        self._timer_at: dict[int, int] = {}
        self._changed = False

    # -- building and breaking --------------------------------------------------------

    def add_node(self, i: int) -> None:
        self.routers[i] = Router(node_address(i), [node_prefix(i)], self.now_ms, self.params)
        self.dead.discard(i)
        self._forget_timer(i)
        self._after(i, [])

    def connect(self, i: int, j: int, delay_ms: int) -> None:
        self.links[frozenset((i, j))] = SimLink(i, j, delay_ms)
        for a, b in ((i, j), (j, i)):
            if a in self.routers:
                self._link_up(a, b)

    def _deliver(self, ev: _Event) -> None:
        self._call(ev.node, lambda r: r.receive(ev.link, ev.data, self.now_ms))

    def _link_up(self, a: int, b: int) -> None:
        self._call(a, lambda r: r.link_up(link_name(b), node_address(b), self.now_ms))

    def _link_down(self, a: int, b: int) -> None:
        self._call(a, lambda r: r.link_down(link_name(b), self.now_ms))

    def _forget_timer(self, i: int) -> None:
        self._timer_token[i] = self._timer_token.get(i, 0) + 1
        self._timer_at.pop(i, None)

    def cut(self, i: int, j: int, cut: bool = True) -> None:
        self.links[frozenset((i, j))].cut = cut
        self.last_change_ms = self.now_ms

    def set_down(self, i: int, j: int, down: bool = True) -> None:
        """Take the link down (``link_down`` at both ends) or bring it back up."""
        link = self.links[frozenset((i, j))]
        if link.down == down:
            return
        link.down = down
        self.last_change_ms = self.now_ms
        for a, b in ((i, j), (j, i)):
            if a in self.routers:
                if down:
                    self._link_down(a, b)
                else:
                    self._link_up(a, b)

    def kill(self, i: int) -> None:
        del self.routers[i]
        self.dead.add(i)
        self._forget_timer(i)
        self._changed = True
        self.last_change_ms = self.now_ms

    def restart(self, i: int) -> None:
        """A fresh router for node ``i`` (alive or killed): every protocol state is lost."""
        self.routers.pop(i, None)
        self.add_node(i)
        for key, link in self.links.items():
            if i in key and not link.down:
                (j,) = key - {i}
                self._link_up(i, j)
        self._changed = True
        self.last_change_ms = self.now_ms

    # -- running --------------------------------------------------------------------------

    def run_until(self, until_ms: int) -> None:
        while self._queue and self._queue[0].at_ms <= until_ms:
            ev = heapq.heappop(self._queue)
            self.now_ms = max(self.now_ms, ev.at_ms)
            if ev.node not in self.routers:
                continue
            if not ev.link:
                if ev.token != self._timer_token.get(ev.node):
                    continue
                self._timer_at.pop(ev.node, None)
                self._call(ev.node, lambda r: r.tick(self.now_ms))
            else:
                self.delivered += 1
                self._deliver(ev)
            if self._changed:
                self._changed = False
                for fn in self.on_change:
                    fn(self)
        self.now_ms = max(self.now_ms, until_ms)
        if self._changed:
            self._changed = False
            for fn in self.on_change:
                fn(self)

    def run_for(self, ms: int) -> None:
        self.run_until(self.now_ms + ms)

    def run_until_quiet(self, quiet_ms: int, limit_ms: int) -> bool:
        """Run until no table changed for ``quiet_ms``; False if ``limit_ms`` passed first."""
        end = self.now_ms + limit_ms
        while self.now_ms < end:
            self.run_for(min(1000, end - self.now_ms))
            if self.now_ms - self.last_change_ms >= quiet_ms:
                return True
        return False

    def _call(self, i: int, fn: Callable[[Router], list[Action]]) -> None:
        router = self.routers[i]
        if not self.measure_cpu:
            self._after(i, fn(router))
            return
        started = time.perf_counter_ns()
        actions = fn(router)
        self.router_cpu_ns += time.perf_counter_ns() - started
        self._after(i, actions)

    def _after(self, i: int, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._send(i, action)
            elif isinstance(action, RoutesChanged):
                self.changes += 1
                self.last_change_ms = self.now_ms
                self._changed = True
            elif isinstance(action, NeighbourLost):
                self.lost.append((self.now_ms, i, action.link))
        at = self.routers[i].next_timer_ms()
        if at is not None and self._timer_at.get(i) != at:
            token = self._timer_token.get(i, 0) + 1
            self._timer_token[i] = token
            self._timer_at[i] = at
            self._push(_Event(max(at, self.now_ms), 0, i, "", token=token))

    def _send(self, i: int, send: Send) -> None:
        self.bytes_sent += len(send.data)
        j = int(send.link.removeprefix("mv"))
        link = self.links.get(frozenset((i, j)))
        if link is None or link.cut or link.down or j in self.dead or self.rng.random() < self.loss:
            self.dropped += 1
            return
        self._push(_Event(self.now_ms + link.delay_ms, 0, j, link_name(i), send.data))

    def _push(self, ev: _Event) -> None:
        self._seq += 1
        ev.seq = self._seq
        heapq.heappush(self._queue, ev)

    # -- the model -------------------------------------------------------------------------

    def working(self, i: int, j: int) -> bool:
        link = self.links.get(frozenset((i, j)))
        return (
            link is not None
            and not link.cut
            and not link.down
            and i in self.routers
            and j in self.routers
        )

    def forwarding(self) -> dict[int, dict[int, int]]:
        """node -> {prefix owner -> next node}: every live node's table, as node numbers."""
        out: dict[int, dict[int, int]] = {}
        for i, router in self.routers.items():
            out[i] = {
                owner_of(prefix): int(route.link.removeprefix("mv"))
                for prefix, route in router.table().items()
            }
        return out

    def costs(self) -> dict[int, dict[int, int]]:
        """Directed link costs as each router measured them, over working links."""
        graph: dict[int, dict[int, int]] = {i: {} for i in self.routers}
        for i, router in self.routers.items():
            for link, nb in router.neighbours().items():
                j = int(link.removeprefix("mv"))
                if nb.state is NeighbourState.REACHABLE and self.working(i, j):
                    graph[i][j] = nb.cost
        return graph


def delivers(
    sim: Simulation, src: int, dst: int, forwarding: dict[int, dict[int, int]] | None = None
) -> bool:
    """Would a packet from ``src`` to ``dst`` arrive, following next hops over working links?"""
    fwd = forwarding if forwarding is not None else sim.forwarding()
    node, steps = src, 0
    while node != dst:
        nxt = fwd.get(node, {}).get(dst)
        if nxt is None or steps > len(fwd) or not sim.working(node, nxt):
            return False
        node, steps = nxt, steps + 1
    return True


def find_loop(sim: Simulation) -> tuple[int, list[int]] | None:
    """A forwarding loop: (prefix owner, cycle), or None. Follows next hops even over
    broken links, to live nodes only: a packet must end at the owner or a node without
    a route."""
    fwd = sim.forwarding()
    for owner in sorted(set(sim.routers) | sim.dead):
        hops = {i: table[owner] for i, table in fwd.items() if owner in table}
        done: set[int] = set()
        for start in hops:
            path: list[int] = []
            seen: set[int] = set()
            node = start
            while node in hops and node != owner and node not in done:
                if node in seen:
                    return owner, path[path.index(node) :]
                seen.add(node)
                path.append(node)
                node = hops[node]
            done |= seen
    return None


def dijkstra(graph: dict[int, dict[int, int]], target: int) -> dict[int, int]:
    """Least cost from every node to ``target`` (reverse Dijkstra on directed costs)."""
    reverse: dict[int, dict[int, int]] = {i: {} for i in graph}
    for i, edges in graph.items():
        for j, cost in edges.items():
            reverse.setdefault(j, {})[i] = cost
    dist = {target: 0}
    queue = [(0, target)]
    while queue:
        d, node = heapq.heappop(queue)
        if d > dist.get(node, INFINITY * 1000):
            continue
        for prev, cost in reverse.get(node, {}).items():
            nd = d + cost
            if nd < dist.get(prev, INFINITY * 1000):
                dist[prev] = nd
                heapq.heappush(queue, (nd, prev))
    return dist


def routing_errors(sim: Simulation) -> list[str]:
    """How the converged tables differ from shortest paths on the current graph.

    Every live node must route to every prefix it can reach, over a path of least
    cost whose metric is that cost, and must have no route to a prefix it cannot
    reach (a killed node's, or one across a partition)."""
    graph = sim.costs()
    tables = {i: router.table() for i, router in sim.routers.items()}
    fwd = sim.forwarding()
    errors = []
    for owner in sorted(set(sim.routers) | sim.dead):
        dist = dijkstra(graph, owner) if owner in sim.routers else {}
        prefix = node_prefix(owner)
        for i in sorted(sim.routers):
            if i == owner:
                continue
            route = tables[i].get(prefix)
            if i not in dist:
                if route is not None:
                    errors.append(f"{i} routes to unreachable {owner} via {route.link}")
                continue
            if route is None:
                errors.append(f"{i} has no route to {owner} (cost {dist[i]})")
                continue
            if route.metric != dist[i]:
                errors.append(f"{i} -> {owner}: metric {route.metric}, shortest {dist[i]}")
            node, total, steps = i, 0, 0
            while node != owner and steps <= len(graph):
                nxt = fwd.get(node, {}).get(owner)
                if nxt is None:
                    break
                total += graph[node].get(nxt, INFINITY)
                node, steps = nxt, steps + 1
            if node != owner or total != dist[i]:
                errors.append(f"{i} -> {owner}: path cost {total} ends at {node}, want {dist[i]}")
    return errors
