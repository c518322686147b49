"""The agent's one connection to the broker, kept alive.

Thin asyncio adapter over aiomqtt: it connects, subscribes, runs the
``on_connect`` hook (announce, for a relay), feeds every message to the
handler and, when the broker goes away, retries with capped exponential
backoff for as long as the agent runs. Nothing on the data plane waits for
it: publishing while disconnected returns False and the caller moves on.

Only plain MQTT 3.1.1 features are used (QoS 0/1, retained messages, last
will), over TLS 1.3 with a client certificate, so mosquitto, EMQX or VerneMQ
all serve. The certificate comes from ``meshvpn broker enroll`` and certifies
the node's own Ed25519 identity key (see ``meshvpn.pki``); it sits in the state
directory as ``broker.crt``, with the CA that vouches for the broker in
``broker-ca.crt``. The private half is the identity key itself, handed to
OpenSSL through an anonymous memory file, so it exists on disk only once.

Under a flood, memory stays bounded: messages wait in one queue of at most
``MAX_QUEUED_IN`` (each at most the broker's packet limit, 8 KiB: 2 MiB) and the
handler takes them one at a time; what arrives while the queue is full is
dropped and counted (``dropped``), and said once in the log rather than once
per message as aiomqtt would. A handler that answers ``post``-s its answer to
a bounded outbox that a writer task drains, so the reading never waits for
the broker's acknowledgements (a handler that awaited each QoS 1 publish
would handle one message per broker round trip, and a flood would back the
queue up behind a slow broker); a full outbox drops and counts
(``posts_dropped``).

Links with manual acknowledgements (``on_delivery``: the accounting service)
never drop: a dropped QoS 1 message is never acknowledged, mosquitto does not
send it again before a reconnect, and the link stalls once the unacknowledged
fill its window (seen draining a queue of receipts after a restart: mosquitto
2.0 sent 1,900 ahead of the acknowledgements despite ``max_inflight_messages``
100). Their queue is unbounded; what bounds it is the broker's queue for the
session (``meshvpn.broker.MAX_QUEUED``), receipts of about 400 bytes: 40 MB.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import aiomqtt

from meshvpn import pki
from meshvpn.errors import ConfigError, LocalError
from meshvpn.identity import Identity, PrivateKey

log = logging.getLogger("meshvpn.mqtt")

BACKOFF_START: Final = 0.25
BACKOFF_MAX: Final = 5.0
KEEPALIVE: Final = 10
DEFAULT_PORT: Final = 8883
CERT_FILE: Final = "broker.crt"
CA_FILE: Final = "broker-ca.crt"
MAX_QUEUED_IN: Final = 256  # about a second of work: older requests have timed out
MAX_OUTBOX: Final = 256
_QUEUE_FULL: Final = "Message queue is full"
# aiomqtt discards what arrives while its queue is full. A new client is sent
# every retained announcement at once (up to the directory's 100,000), faster
# than it verifies them: a link that follows the directory needs a queue that
# holds them all, or the directory comes out partial and the sync echo behind
# them is lost (bench/scale.py). Links that only take requests keep the small one.
MAX_QUEUED_DIRECTORY: Final = 110_000

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
    host: str  # what the broker's certificate must name
    port: int = DEFAULT_PORT
    dial: str | None = None  # the address to connect to, when resolved ahead (lockdown)

    @classmethod
    def parse(cls, text: str) -> BrokerAddress:
        host, sep, port = text.rpartition(":")
        if not sep or "]" in port:
            host, port = text, str(DEFAULT_PORT)
        try:
            number = int(port)
        except ValueError:
            number = 0
        if not host or not 0 < number < 65536:
            raise LocalError(
                f"bad broker address {text!r}", "give host:port, e.g. broker.example:8883"
            )
        return cls(host.strip("[]"), number)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class _TLSContext(ssl.SSLContext):
    """paho names the server by the address it dials. Under the lockdown we dial an
    address resolved ahead, and still check the certificate against the name given."""

    server_name = ""

    def wrap_socket(  # noqa: PLR0917 - ssl.SSLContext's own signature
        self,
        sock: socket.socket,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        return super().wrap_socket(
            sock,
            server_side=server_side,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=self.server_name or server_hostname,
            session=session,
        )


@dataclass(frozen=True)
class BrokerCredentials:
    """A node's TLS identity towards the broker. The key never shows in repr."""

    cert: Path
    ca: Path
    enrollment: pki.Enrollment
    key: PrivateKey = field(repr=False)

    def context(self, server_name: str) -> ssl.SSLContext:
        """TLS 1.3 only, the broker checked against our CA and ``server_name``."""
        ctx = _TLSContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.server_name = server_name
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(cafile=str(self.ca))
        # OpenSSL reads keys from files only: give it one that lives in memory.
        fd = os.memfd_create("meshvpn-broker-key", os.MFD_CLOEXEC)
        try:
            os.write(fd, pki.private_pem(self.key))
            ctx.load_cert_chain(str(self.cert), f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return ctx


def persistent_client_id(name: str, key: PrivateKey) -> str:
    """A client id that stays the same across restarts and that nobody else can work out.

    A client connecting with another's id takes that connection and its persistent
    session (the queue the broker keeps while we are away) over, whoever it
    authenticated as: mosquitto does not tie ids to certificates. So the id is a
    one-way function of our private key, not of anything public like the node id."""
    tag = hashlib.sha256(b"meshvpn/v1/mqtt-client-id\x00" + key.raw).hexdigest()[:32]
    return f"{name}-{tag}"


def _not_enrolled(state_dir: Path, what: str, role: str = pki.ROLE_NODE) -> ConfigError:
    flag = "" if role == pki.ROLE_NODE else f" --role {role}"
    return ConfigError(
        f"not enrolled with a broker: {what}",
        f"on the broker run `meshvpn broker enroll <identity key>{flag}` (`meshvpn id"
        f" --state-dir {state_dir}` shows the key), then `meshvpn init --enroll FILE"
        f" --state-dir {state_dir}` here",
    )


def load_credentials(
    state_dir: Path,
    identity: Identity,
    role: str | None = pki.ROLE_NODE,
    now: dt.datetime | None = None,
) -> BrokerCredentials:
    """This node's broker certificate, checked against its identity and the role it
    needs (None: any): ConfigError (saying how to enroll) if it has none that will do."""
    cert, ca = state_dir / CERT_FILE, state_dir / CA_FILE
    try:
        leaf_pem, ca_pem = cert.read_bytes(), ca.read_bytes()
    except FileNotFoundError as exc:
        raise _not_enrolled(state_dir, f"no {exc.filename}", role or pki.ROLE_NODE) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None
    try:
        enrollment = pki.check_client(
            leaf_pem, ca_pem, identity.identity_public, now or dt.datetime.now(dt.UTC)
        )
    except pki.CertificateError as exc:
        raise _not_enrolled(state_dir, f"{cert}: {exc}", role or pki.ROLE_NODE) from None
    if role is not None and enrollment.role != role:
        raise _not_enrolled(state_dir, f"{cert} is for the {enrollment.role} role", role)
    return BrokerCredentials(cert, ca, enrollment, identity.identity_key)


def install_enrollment(
    state_dir: Path, identity: Identity, bundle: bytes, now: dt.datetime | None = None
) -> pki.Enrollment:
    """Check what ``meshvpn broker enroll`` gave us, then keep it in the state dir."""
    try:
        leaf_pem, ca_pem, enrollment = pki.read_bundle(
            bundle, identity.identity_public, now or dt.datetime.now(dt.UTC)
        )
    except pki.CertificateError as exc:
        raise ConfigError(
            f"cannot enroll: {exc}",
            "give the file `meshvpn broker enroll <this node's identity key>` wrote",
        ) from None
    for name, data in ((CA_FILE, ca_pem), (CERT_FILE, leaf_pem)):
        tmp = state_dir / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.chmod(0o644)
        tmp.replace(state_dir / name)
    return enrollment


@dataclass(frozen=True)
class WillMessage:
    topic: str
    payload: bytes
    retain: bool = True


class _CountDrops(logging.Filter):
    """aiomqtt warns once per message it drops from a full queue: count them instead."""

    def __init__(self, link: ControlLink) -> None:
        super().__init__()
        self.link = link

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(_QUEUE_FULL):
            return True
        self.link.dropped += 1
        if self.link.dropped == 1:
            log.warning("messages arrive faster than they are handled; dropping and counting")
        return False


class ControlLink:
    def __init__(
        self,
        broker: BrokerAddress,
        *,
        name: str,
        tls: ssl.SSLContext,
        subscriptions: list[tuple[str, int]],  # (topic filter, QoS)
        handler: Handler,
        will: WillMessage | None = None,
        on_connect: Hook | None = None,
        persistent_id: str | None = None,
        on_delivery: DeliveryHandler | None = None,
        max_queued_in: int = MAX_QUEUED_IN,
    ) -> None:
        """``persistent_id``: a fixed client id and a persistent session, so the broker
        queues QoS 1 messages while we are away. ``on_delivery``: manual acks, messages
        go there instead of ``handler`` and count as delivered only once acked.
        ``max_queued_in``: ``MAX_QUEUED_DIRECTORY`` for links that follow the
        announcements."""
        self.max_queued_in = max_queued_in
        self.broker = broker
        self.tls = tls
        # Unguessable (see persistent_client_id): another node reusing our client id
        # would take our connection, and a persistent session's queue, over.
        self.client_id = persistent_id or f"{name}-{os.urandom(16).hex()}"
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
        self.last_error = ""
        self.dropped = 0  # messages dropped because the incoming queue was full
        self.posts_dropped = 0  # posted messages dropped: outbox full, or the broker failed
        self._outbox: asyncio.Queue[tuple[str, bytes, int, bool]] = asyncio.Queue(MAX_OUTBOX)
        self._logger = logging.getLogger(f"meshvpn.mqtt.client.{self.client_id}")
        self._logger.addFilter(_CountDrops(self))
        self._kicked = asyncio.Event()

    def _new_client(self) -> aiomqtt.Client:
        will = (
            aiomqtt.Will(self.will.topic, self.will.payload, qos=1, retain=self.will.retain)
            if self.will
            else None
        )
        client = aiomqtt.Client(
            self.broker.dial or self.broker.host,
            self.broker.port,
            identifier=self.client_id,
            tls_context=self.tls,
            will=will,
            keepalive=KEEPALIVE,
            timeout=5,
            # manual acks: never drop (see the module docstring); 0 is unbounded
            max_queued_incoming_messages=0 if self.on_delivery else self.max_queued_in,
            clean_session=False if self.persistent else None,
            logger=self._logger,
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
                    else:
                        log.info("connected to broker %s", self.broker)
                    delay = BACKOFF_START
                    if self.on_connect is not None:
                        await self.on_connect()
                    await self._serve(client)
            except _Reconnect:
                log.info("reconnecting to broker %s", self.broker)
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc)
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
            writer = tasks.create_task(self._write(client))
            await asyncio.wait([reader, kicked], return_when=asyncio.FIRST_COMPLETED)
            reader.cancel()
            kicked.cancel()
            writer.cancel()
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

    def post(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> bool:
        """Queue a message for the writer; never waits. False if the outbox is full (the
        message is dropped and counted). Sent once connected, in order."""
        try:
            self._outbox.put_nowait((topic, payload, qos, retain))
        except asyncio.QueueFull:
            self.posts_dropped += 1
            return False
        return True

    async def _write(self, client: aiomqtt.Client) -> None:
        while True:
            topic, payload, qos, retain = await self._outbox.get()
            try:
                await client.publish(topic, payload, qos=qos, retain=retain, timeout=5)
            except aiomqtt.MqttError:
                self.posts_dropped += 1  # the reader sees the connection fail, if it did

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
