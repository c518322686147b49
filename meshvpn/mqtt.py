"""The agent's one connection to the broker, kept alive.

Thin asyncio adapter over aiomqtt: it connects, subscribes, runs the
``on_connect`` hook (announce, for a relay), feeds every message to the
handler and, when the broker goes away, retries with capped exponential
backoff for as long as the agent runs. Nothing on the data plane waits for
it: publishing while disconnected returns False and the caller moves on.

Only plain MQTT 3.1.1 features are used (QoS 0/1, retained messages, last
will), so mosquitto, EMQX or VerneMQ all serve.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import aiomqtt

from meshvpn.errors import LocalError

log = logging.getLogger("meshvpn.mqtt")

BACKOFF_START: Final = 0.25
BACKOFF_MAX: Final = 5.0
KEEPALIVE: Final = 10
# aiomqtt discards what arrives while its queue is full. A new client is sent
# every retained announcement at once (up to the directory's 100,000), faster
# than it verifies them: the queue must hold them all, or the directory comes
# out partial and the sync echo behind them is lost (bench/scale.py).
MAX_QUEUED_IN: Final = 110_000

Handler = Callable[[str, bytes], Awaitable[None]]
Hook = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Delivery:
    """A QoS 1 message the receiver acknowledges itself, once it has made it durable.

    ``ack`` sends the PUBACK; after a reconnect it does nothing, and the broker
    (persistent session) delivers the message again."""

    topic: str
    payload: bytes
    ack: Callable[[], None]


DeliveryHandler = Callable[[Delivery], Awaitable[None]]


class _Reconnect(aiomqtt.MqttError):
    """Raised inside run() to leave the connection on purpose."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int = 1883

    @classmethod
    def parse(cls, text: str) -> BrokerAddress:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, "1883"
        try:
            number = int(port)
        except ValueError:
            number = 0
        if not host or not 0 < number < 65536:
            raise LocalError(
                f"bad broker address {text!r}", "give host:port, e.g. 203.0.113.2:1883"
            )
        return cls(host.strip("[]"), number)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class WillMessage:
    topic: str
    payload: bytes
    retain: bool = True


class ControlLink:
    def __init__(
        self,
        broker: BrokerAddress,
        *,
        name: str,
        subscriptions: list[tuple[str, int]],  # (topic filter, QoS)
        handler: Handler,
        will: WillMessage | None = None,
        on_connect: Hook | None = None,
        persistent_id: str | None = None,
        on_delivery: DeliveryHandler | None = None,
    ) -> None:
        """``persistent_id``: a fixed client id and a persistent session, so the broker
        queues QoS 1 messages while we are away. ``on_delivery``: manual acks, messages
        go there instead of ``handler`` and count as delivered only once acked."""
        self.broker = broker
        self.client_id = persistent_id or f"{name}-{os.urandom(4).hex()}"
        self.persistent = persistent_id is not None
        self.on_delivery = on_delivery
        self.subscriptions = subscriptions
        self.handler = handler
        self.will = will
        self.on_connect = on_connect
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.outages = 0
        self.handler_errors = 0
        self._kicked = asyncio.Event()

    def _new_client(self) -> aiomqtt.Client:
        will = (
            aiomqtt.Will(self.will.topic, self.will.payload, qos=1, retain=self.will.retain)
            if self.will
            else None
        )
        client = aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            identifier=self.client_id,
            will=will,
            keepalive=KEEPALIVE,
            timeout=5,
            max_queued_incoming_messages=MAX_QUEUED_IN,
            clean_session=False if self.persistent else None,
        )
        if self.on_delivery is not None:
            # aiomqtt has no switch for paho's manual acks yet (aiomqtt issue #345)
            client._client.manual_ack_set(True)  # noqa: SLF001, FBT003
        return client

    def _acker(self, client: aiomqtt.Client, message: aiomqtt.Message) -> Callable[[], None]:
        def ack() -> None:
            if self._client is client and message.qos > 0:
                client._client.ack(message.mid, message.qos)  # noqa: SLF001 - see _new_client

        return ack

    async def run(self) -> None:
        """Forever: connect, serve, and on any broker trouble wait and retry."""
        delay = BACKOFF_START
        while True:
            try:
                async with self._new_client() as client:
                    self._client = client
                    for topic, qos in self.subscriptions:
                        await client.subscribe(topic, qos=qos)
                    self.connected.set()
                    if self.outages:
                        log.info("broker %s is back", self.broker)
                    delay = BACKOFF_START
                    if self.on_connect is not None:
                        await self.on_connect()
                    await self._serve(client)
            except _Reconnect:
                log.info("reconnecting to broker %s", self.broker)
            except aiomqtt.MqttError as exc:
                if self.connected.is_set() or self.outages == 0:
                    log.warning("broker %s unreachable (%s); retrying", self.broker, exc)
                self.outages += 1
            finally:
                self._client = None
                self.connected.clear()
            if self._kicked.is_set():
                self._kicked.clear()
                continue  # asked to reconnect: at once, no backoff
            await asyncio.sleep(delay)
            delay = min(BACKOFF_MAX, delay * 2)

    def reconnect(self) -> None:
        """Drop the connection and make a new one now, e.g. after the host's routes changed."""
        self._kicked.set()

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Read messages until the connection fails or reconnect() is called."""
        failure: list[aiomqtt.MqttError] = []
        async with asyncio.TaskGroup() as tasks:
            reader = tasks.create_task(self._read(client, failure))
            kicked = tasks.create_task(self._kicked.wait())
            await asyncio.wait([reader, kicked], return_when=asyncio.FIRST_COMPLETED)
            reader.cancel()
            kicked.cancel()
        if failure:
            raise failure[0]
        raise _Reconnect

    async def _read(self, client: aiomqtt.Client, failure: list[aiomqtt.MqttError]) -> None:
        try:
            await self._dispatch(client)
        except aiomqtt.MqttError as exc:
            failure.append(exc)

    async def _dispatch(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            data = payload if isinstance(payload, bytes | bytearray) else b""
            try:
                if self.on_delivery is not None:
                    delivery = Delivery(
                        str(message.topic), bytes(data), self._acker(client, message)
                    )
                    await self.on_delivery(delivery)
                    continue
                await self.handler(str(message.topic), bytes(data))
            except Exception:  # hostile input must never take the agent down
                self.handler_errors += 1
                if self.handler_errors == 1:
                    log.exception("a message handler failed; counting further failures")

    async def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1
    ) -> bool:
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=5)
        except aiomqtt.MqttError:
            return False
        return True

    async def subscribe(self, topic: str, qos: int = 1) -> bool:
        client = self._client
        if client is None:
            return False
        try:
            await client.subscribe(topic, qos=qos, timeout=5)
        except aiomqtt.MqttError:
            return False
        self.subscriptions.append((topic, qos))
        return True

    async def unsubscribe(self, topic: str) -> None:
        self.subscriptions = [(t, q) for t, q in self.subscriptions if t != topic]
        client = self._client
        if client is not None:
            try:
                await client.unsubscribe(topic, timeout=5)
            except aiomqtt.MqttError:
                return
