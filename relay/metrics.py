"""Prometheus metrics for a relay, on a local address: ``--metrics 127.0.0.1:9810``.

Nothing is counted twice: at each scrape a collector reads the numbers the
agent already keeps for ``meshvpn status`` (the operator controls' usage, the
session book, the control-plane and receipt counters) and renders them with
``prometheus-client``. The HTTP side is a few lines of asyncio on the agent's
own loop, so a scrape never reads the agent's state from another thread (the
library's ``start_http_server`` would).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from relay.agent import RelayAgent

log = logging.getLogger("meshvpn.metrics")

MAX_REQUEST_HEAD: Final = 8192


class RelayCollector(Collector):
    def __init__(self, agent: RelayAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent, usage = self.agent, self.agent.controls.usage
        relayed = CounterMetricFamily(
            "meshvpn_relayed_bytes",
            "Bytes carried for clients since the agent started (WireGuard counters)",
            labels=["direction"],
        )
        relayed.add_metric(["up"], usage.up)
        relayed.add_metric(["down"], usage.down)
        yield relayed
        yield GaugeMetricFamily(
            "meshvpn_month_relayed_bytes",
            "Bytes carried for clients this month, against the monthly cap",
            value=usage.used_bytes,
        )
        cap = agent.controls.settings.monthly_cap_bytes
        if cap is not None:
            yield GaugeMetricFamily(
                "meshvpn_monthly_cap_bytes", "The owner's monthly data cap", value=cap
            )
        yield GaugeMetricFamily("meshvpn_sessions", "Client sessions now", value=agent.book.load)
        yield GaugeMetricFamily(
            "meshvpn_session_capacity",
            "Sessions this relay takes now (announced; 0 while sharing is stopped)",
            value=agent.controls.capacity,
        )
        yield GaugeMetricFamily(
            "meshvpn_sharing_open",
            "1 while the relay shares (within its hours, under its cap)",
            value=int(agent.controls.gate.open),
        )
        requests = CounterMetricFamily(
            "meshvpn_session_requests", "Session requests by outcome", labels=["result"]
        )
        rejected = CounterMetricFamily(
            "meshvpn_rejected_messages",
            "Messages dropped: bad session requests, receipts, probes",
            labels=["kind", "reason"],
        )
        for name, count in sorted(agent.counters.items()):
            kind, _, reason = name.partition(":")
            if kind == "requests":
                requests.add_metric([reason], count)
            elif kind == "rejected":
                rejected.add_metric(["session-request", reason], count)
        desk = agent.desk.counters
        for name, count in sorted(desk.items()):
            kind, _, reason = name.partition(":")
            if kind == "receipt-rejected":
                rejected.add_metric(["receipt", reason], count)
        for reason, count in sorted(agent.probes.dropped.items()):
            rejected.add_metric(["probe", str(reason)], count)
        yield requests
        yield rejected
        receipts = CounterMetricFamily(
            "meshvpn_receipts", "Client receipts countersigned and journaled"
        )
        receipts.add_metric([], desk.get("receipts", 0))
        yield receipts
        delivered = CounterMetricFamily(
            "meshvpn_receipts_delivered", "Receipts handed to the broker for accounting"
        )
        delivered.add_metric([], desk.get("delivered", 0))
        yield delivered
        yield GaugeMetricFamily(
            "meshvpn_receipts_pending",
            "Receipts journaled but not yet delivered",
            value=agent.desk.journal.pending_count(),
        )


async def serve_metrics(agent: RelayAgent, host: str, port: int) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(agent))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            method, target, *_ = head.split(b" ", 2)
            if method == b"GET" and target.split(b"?")[0] in (b"/metrics", b"/"):
                body, status, ctype = generate_latest(registry), "200 OK", CONTENT_TYPE_LATEST
            else:
                body, status, ctype = b"not found; try /metrics\n", "404 Not Found", "text/plain"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:  # fmt: skip
            log.debug("metrics connection dropped: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(serve, host, port, limit=MAX_REQUEST_HEAD)
    log.info("metrics on http://%s:%d/metrics", host, port)
    async with server:
        await server.serve_forever()
