"""The relay agent: ``meshvpn relay``.

On top of the shared agent (lock, footprint, device, control socket) a relay:

- keeps a WireGuard interface whose peers are exactly its clients, derived
  from the pool's leases (hand-admitted keys and negotiated sessions) and
  reconciled after every change;
- with exit on, forwards and masquerades the clients' traffic (one nftables
  table, ``inet meshvpn``);
- with a broker, announces itself (retained, refreshed before expiry,
  cleared by its last will), answers authenticated RTT probes on UDP, and
  answers Noise-sealed session requests. All of that is decided by the pure
  cores (``meshvpn.messages``, ``meshvpn.handshake``, ``meshvpn.probe``,
  ``relay.sessions``); this file only moves bytes and applies decisions.

The owner's controls (price, exit, max sessions, bandwidth and monthly caps,
sharing hours; reloaded on SIGHUP or ``meshvpn reload``) are decided in
``relay.operator`` and carried out by ``relay.controls``; this file only
consults them (``self.controls``) and offers them ``end_sessions``,
``announce_now`` and ``apply_exit``.

Under a flood every input meets a bound before it costs anything: session
requests a size check, then one budget for opening them, then per-identity
limits and a budget for new sessions (relay.sessions); probes per-source and
overall buckets (meshvpn.probe); receipts per-session and overall buckets
(relay.metering); MQTT messages one bounded queue (meshvpn.mqtt). What is
dropped is counted in ``status --json`` and logged once per reason (grants
and refusals at most ``LOG_BURST`` lines a minute each), so neither memory
nor the log grows with the flood.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import json
import logging
import os
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Final, cast

from accounting.booked import TOPIC_PREFIX as BOOKED_PREFIX
from accounting.booked import booked_topic
from accounting.credit import TOPIC_FILTER as CREDIT_TOPICS
from accounting.credit import TOPIC_PREFIX as CREDIT_PREFIX
from accounting.exchange import CHANNEL_PORT
from meshvpn import __version__
from meshvpn.agent import DEFAULT_POOL, TUNNEL_MTU, Agent, CommonOptions
from meshvpn.clock import now_ms
from meshvpn.directory import ANNOUNCE_PREFIX, announce_topic, reply_topic, session_topic
from meshvpn.errors import LocalError
from meshvpn.footprint import nft_apply, write_sysctl
from meshvpn.handshake import ReceivedRequest, accept_request, request_size_ok
from meshvpn.icmp import probe_path
from meshvpn.identity import (
    PublicKey,
    client_mesh_address,
    mesh_address_of,
    mesh_prefix_of,
    node_id_of,
)
from meshvpn.messages import (
    ROLE_ENTRY,
    ROLE_EXIT,
    ROLE_MESH,
    STATUS_NAMES,
    Announcement,
    LinkRequest,
    MessageError,
    SessionGrant,
    SessionRequest,
    sign,
)
from meshvpn.mqtt import (
    MAX_QUEUED_DIRECTORY,
    MAX_QUEUED_IN,
    BrokerAddress,
    ControlLink,
    WillMessage,
    load_credentials,
)
from meshvpn.netconf import Netlink
from meshvpn.probe import ProbeResponder
from meshvpn.ratelimit import RateTable
from meshvpn.rates import Throughput
from meshvpn.wireguard.model import DeviceState, Endpoint, PeerSpec
from relay.controls import Loader, OperatorControls
from relay.credit import NO_CREDIT, CreditGate
from relay.earnings_feed import EPOCHS_FILTER, EarningsFeed
from relay.exit import (
    DEFAULT_EXIT_POLICY,
    ExitPolicy,
    MeshRules,
    discover_host_networks,
    exit_ruleset,
    mesh_sources_update,
    read_counters,
    read_flow_set,
)
from relay.exit import TABLE as EXIT_TABLE
from relay.mesh import MESH_RANGE, Mesh, MeshOptions
from relay.metering import ReceiptDesk
from relay.operator import OperatorSettings
from relay.paths import TRACE_TIMEOUT_S, PathService, parse_flows
from relay.pool import AddressPool
from relay.sessions import Session, SessionBook

log = logging.getLogger("meshvpn.relay")

EXPIRY_CHECK_S: Final = 5.0
ANNOUNCE_GAP_S: Final = 1.0  # load changes are announced at most this often
BAN_MS: Final = 10 * 60_000
THROUGHPUT_SAMPLE_S: Final = 1.0
LOG_BURST: Final = 10  # log lines per kind of event...
LOG_REFILL_MS: Final = 6_000  # ...and one more every 6 s


@dataclass(frozen=True)
class RelayOptions(CommonOptions):
    listen_port: int = 51820
    pool: ipaddress.IPv4Network = DEFAULT_POOL
    exit: bool = True
    broker: BrokerAddress | None = None
    endpoint: Endpoint | None = None  # what clients dial; announced
    probe_port: int = 0  # 0: listen_port + 1
    geohash: str = ""
    price_per_gib: int = 1_000_000
    capacity: int = 100
    announce_ttl_s: int = 60
    exit_policy: ExitPolicy = DEFAULT_EXIT_POLICY  # what clients may reach: relay/exit.py
    # The owner's controls (relay/operator.py); when set, they win over the four above.
    operator: OperatorSettings | None = None
    reload: Loader | None = None  # re-reads the config for SIGHUP / `meshvpn reload`
    fixed: tuple[tuple[str, Any], ...] = ()  # settings only a restart changes, as loaded
    metrics: tuple[str, int] | None = None  # serve Prometheus metrics here
    mesh: MeshOptions | None = None  # links to other relays: relay/mesh.py
    accounting_key: PublicKey | None = None  # serve only clients it vouches for: relay/credit.py

    @property
    def probe(self) -> int:
        return self.probe_port or self.listen_port + 1


class ProbeProtocol(asyncio.DatagramProtocol):
    """A probe responder on a UDP socket (the relay's, and the lab's simulated relays')."""

    def __init__(self, responder: ProbeResponder) -> None:
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport.
        self.transport = cast("asyncio.DatagramTransport", transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        reply = self.responder.handle(data, str(addr[0]), now_ms())
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


def session_role(endpoint_host: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> str:
    """A session reached over the mesh ends here as the path's exit; any other is the
    client's access link: this relay is its entry (and its exit, on a single hop)."""
    if endpoint_host is not None and endpoint_host in MESH_RANGE:
        return "exit"
    return "entry"


class RelayAgent(Agent):
    role = "relay"
    opts: RelayOptions
    count_spoofed = True

    def __init__(self, opts: RelayOptions) -> None:
        super().__init__(opts)
        if opts.broker is not None and opts.endpoint is None:
            raise LocalError(
                "a relay on a broker needs --endpoint", "give the address clients dial"
            )
        if opts.mesh is not None and opts.broker is None:
            raise LocalError("the mesh needs a broker", "give --broker, or leave out --mesh")
        self.credentials = (
            load_credentials(opts.state_dir, self.identity) if opts.broker is not None else None
        )
        self.pool = AddressPool(opts.pool)
        settings = opts.operator or OperatorSettings(
            price_per_gib=opts.price_per_gib,
            exit=opts.exit,
            max_sessions=opts.capacity,
            exit_policy=opts.exit_policy,
        )
        self.controls = OperatorControls(
            settings, opts.state_dir, opts.ifname, opts.reload, dict(opts.fixed)
        )
        self.book = SessionBook(
            pool=self.pool,
            node_id=self.identity.node_id,
            relay_wireguard_key=self.identity.wireguard_public,
            price_per_gib=settings.price_per_gib,
            capacity=settings.max_sessions,
        )
        self.manual: set[PublicKey] = set()
        self.leases_path = opts.state_dir / "leases.json"
        self.desk = ReceiptDesk(self.identity, opts.state_dir / "receipts.db", opts.accounting_key)
        self._load_leases()
        for session in self.book.sessions.values():
            self.desk.start(session)
        self.probes = ProbeResponder(self.identity.control_key)
        self.link: ControlLink | None = None
        self.counters: collections.Counter[str] = collections.Counter()
        self._logged: set[str] = set()
        self._log_budget: RateTable[str] = RateTable(LOG_BURST, LOG_REFILL_MS, 64)
        self._last_issued = 0
        self._peers_changed = asyncio.Event()
        self._announce_due = asyncio.Event()
        self.mesh: Mesh | None = None
        self.paths: PathService | None = None  # multi-hop receipts: relay/paths.py
        self.credit = CreditGate(opts.accounting_key) if opts.accounting_key else None
        self.earnings = EarningsFeed(self.identity.node_id, opts.accounting_key)
        self.throughput = Throughput()
        self.control.handlers["admit"] = self._op_admit
        self.control.handlers["earnings"] = self._op_earnings
        self.control.handlers["mesh_ping"] = self._op_mesh_ping
        self.control.handlers["release"] = self._op_release
        self.control.handlers["reload"] = self._op_reload

    # ---- persistence: leases survive a restart, so clients keep their tunnels

    def _load_leases(self) -> None:
        try:
            data = json.loads(self.leases_path.read_text())
        except (OSError, ValueError):
            return
        with contextlib.suppress(ValueError, KeyError, TypeError):
            for key_text in data.get("manual", []):
                key = PublicKey.from_b64(key_text)
                self.pool.lease(key)
                self.manual.add(key)
            for s in data.get("sessions", []):
                key = PublicKey.from_b64(s["wireguard_key"])
                address = self.pool.lease(key)
                self.book.sessions[key] = Session(
                    session_id=bytes.fromhex(s["session_id"]),
                    client_identity=PublicKey.from_b64(s["client_identity"]),
                    wireguard_key=key,
                    address=address,
                    price_per_gib=int(s["price_per_gib"]),
                    granted_ms=int(s["granted_ms"]),
                    expires_ms=int(s["expires_ms"]),
                )

    def _save_leases(self) -> None:
        data = {
            "manual": sorted(k.b64 for k in self.manual),
            "sessions": [
                {
                    "wireguard_key": s.wireguard_key.b64,
                    "session_id": s.session_id.hex(),
                    "client_identity": s.client_identity.b64,
                    "price_per_gib": s.price_per_gib,
                    "granted_ms": s.granted_ms,
                    "expires_ms": s.expires_ms,
                }
                for s in self.book.sessions.values()
            ],
        }
        tmp = self.leases_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.leases_path)

    def desired_peers(self) -> dict[PublicKey, PeerSpec]:
        peers = {}
        for key, addr in self.pool.leases.items():
            allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [
                ipaddress.ip_network(f"{addr}/32")
            ]
            if self.mesh is not None:
                # its address in our /64: what its end-to-end sessions come from
                v6 = client_mesh_address(self.identity.mesh_address, addr)
                allowed.append(ipaddress.IPv6Network(f"{v6}/128"))
            peers[key] = PeerSpec(key, tuple(allowed))
        return peers

    async def _apply_peers(self) -> None:
        assert self.device is not None  # noqa: S101 - set before build()
        self._save_leases()
        await self.device.reconcile(self.desired_peers())

    # ---- building the host

    async def build(self) -> None:
        assert self.device is not None  # noqa: S101
        opts = self.opts
        await self.device.set_interface(self.identity.wireguard_key, opts.listen_port, 0)
        gateway = ipaddress.IPv4Interface(f"{self.pool.gateway}/{opts.pool.prefixlen}")
        async with Netlink() as nl:
            await nl.address_add(opts.ifname, gateway)
            await nl.link_up(opts.ifname, TUNNEL_MTU)
        if opts.mesh is not None:
            self.mesh = Mesh(
                self.identity,
                opts.mesh,
                ifname=opts.ifname,
                backend=opts.backend,
                state_dir=opts.state_dir,
                footprint=self.footprint,
                access_ifname=opts.ifname,
                on_sources_changed=self._mesh_sources_changed,
            )
        await self.apply_exit()
        if self.mesh is not None:
            await self.mesh.build()
            self.paths = self._path_service(self.mesh)
            self.desk.use_paths(self.paths)
        await self.controls.apply_shaping(self.footprint)
        await self._apply_peers()
        await self.controls.check(self)  # the first announcement already tells the truth

    async def apply_exit(self) -> None:
        """The exit table, from the current settings (replaced atomically on reload)."""
        opts, settings = self.opts, self.controls.settings
        if settings.exit:
            self.footprint.will_set_sysctl("net.ipv4.ip_forward")
            write_sysctl("net.ipv4.ip_forward", "1")
        # The table goes in with exit off too: a home router forwards already, and
        # clients must reach neither its LAN nor the internet through it then.
        host = await discover_host_networks(opts.ifname)
        log.info(
            "exit %s: clients may not reach this router (%s) nor its LAN (%s)",
            "on" if settings.exit else "off",
            ", ".join(map(str, host.router_addresses)) or "no addresses",
            ", ".join(map(str, host.lan_networks)) or "none found",
        )
        self.footprint.will_create_nft_table(EXIT_TABLE)
        nft_apply(
            exit_ruleset(
                opts.ifname,
                opts.pool,
                settings.exit_policy,
                lan_networks=host.lan_networks,
                router_addresses=host.router_addresses,
                client_services=(("udp", CHANNEL_PORT),),  # receipts come back here
                forward=settings.exit,
                mesh=None
                if self.mesh is None
                else MeshRules(
                    link_prefix=f"{opts.ifname}m",
                    address=self.mesh.address,
                    client_prefix=self.mesh.prefix,
                    mesh_range=MESH_RANGE,
                    sources=self.mesh.sources,  # a reload keeps what routing knows
                ),
            )
        )

    def _path_service(self, mesh: Mesh) -> PathService:
        """Multi-hop receipts over this relay's mesh (relay/paths.py)."""

        def entry_of(client: ipaddress.IPv6Address) -> PublicKey | None:
            for entry in mesh.directory.entries.values():
                relay = ipaddress.IPv6Address(entry.announcement.mesh_address)
                if client in mesh_prefix_of(relay):
                    return entry.signer
            return None

        def key_of(address: str) -> PublicKey | None:
            node_id = mesh.node_of_address(address)
            if node_id == self.identity.node_id:
                return self.identity.identity_public
            entry = mesh.directory.entries.get(node_id) if node_id else None
            return entry.signer if entry is not None else None

        def route_via(relay: PublicKey) -> str | None:
            route = mesh.router.table().get(mesh_prefix_of(mesh_address_of(relay)))
            return route.link if route is not None else None

        def trace(target: ipaddress.IPv6Address) -> list[str | None]:
            try:
                hops, _ = probe_path(target, 0, TRACE_TIMEOUT_S)
            except OSError:
                return [None]
            return [h.address for h in hops]

        async def read_flows() -> dict[tuple[str, str], int]:
            return parse_flows(await read_flow_set(EXIT_TABLE))

        return PathService(
            self.identity,
            entry_of=entry_of,
            key_of=key_of,
            route_via=route_via,
            trace=trace,
            read_flows=read_flows,
        )

    async def _mesh_sources_changed(self, sources: frozenset[ipaddress.IPv6Network]) -> None:
        await asyncio.to_thread(nft_apply, mesh_sources_update(sources))

    def background(self) -> list[Coroutine[Any, Any, None]]:
        assert self.device is not None  # noqa: S101 - built before background()
        jobs = [
            self.controls.watch(self),
            self._sample_throughput(),
            self._expire_sessions(),
            self.desk.meter(self.device, self._cut_off),
            self.desk.serve_channel(self.pool.gateway),
        ]
        if self.opts.broker is not None:
            subscriptions = [
                (session_topic(self.identity.node_id), 1),
                (self.earnings.topic, 1),
                (EPOCHS_FILTER, 1),
            ]
            if self.credit is not None:
                subscriptions.append((CREDIT_TOPICS, 1))
                subscriptions.append((booked_topic(self.identity.node_id), 1))
            if self.mesh is not None:
                subscriptions.append((f"{ANNOUNCE_PREFIX}+", 1))
            assert self.credentials is not None  # noqa: S101 - loaded in __init__ with --broker
            self.link = ControlLink(
                self.opts.broker,
                name=f"relay-{self.identity.node_id}",
                tls=self.credentials.context(self.opts.broker.host),
                subscriptions=subscriptions,
                handler=self._on_message,
                will=WillMessage(announce_topic(self.identity.node_id), b""),
                on_connect=self._announce,
                # a mesh relay follows the announcements, like a client's directory
                max_queued_in=MAX_QUEUED_DIRECTORY if self.mesh is not None else MAX_QUEUED_IN,
            )
            jobs += [self.link.run(), self._announce_loop(), self._serve_probes()]
            if self.mesh is not None:
                jobs.append(self.mesh.run(self.link))
            if self.paths is not None and self.mesh is not None:
                jobs.append(self.paths.run(self.mesh.address))
        jobs.append(self.desk.deliver(self.link))
        if self.opts.metrics is not None:
            from relay.metrics import serve_metrics  # noqa: PLC0415 - only when asked for

            jobs.append(serve_metrics(self, *self.opts.metrics))
        return jobs

    def on_reload_signal(self) -> None:
        self.controls.reload_requested.set()

    async def end_sessions(self, keys: list[PublicKey], reason: str) -> None:
        """The owner's controls end these sessions (hours over, cap reached, too many)."""
        for key in keys:
            session = self.book.end(key)
            self.desk.stop(key)
            if session is not None:
                log.info("session of client %s… ended: %s", session.client_identity.b64[:8], reason)
        await self._apply_peers()
        await self._announce()

    async def announce_now(self) -> None:
        await self._announce()

    async def _cut_off(self, key: PublicKey, reason: str, abusive: bool) -> None:
        """End a session that stopped paying; keep an abusive client out for a while.

        A client that merely went quiet (it disconnected between two statements) may
        come back at once; one that took more than its allowance, or sent bad
        receipts, waits ``BAN_MS``."""
        session = self.book.end(key)
        self.desk.stop(key)
        if session is not None and abusive:
            self.book.ban(session.client_identity, now_ms() + BAN_MS)
        log.info("session ended: %s", reason)
        await self._apply_peers()
        self._announce_soon()

    # ---- announcements

    def announcement(self) -> Announcement:
        opts = self.opts
        assert opts.endpoint is not None  # noqa: S101 - checked in __init__
        issued = max(now_ms(), self._last_issued + 1)  # strictly newer, even within a ms
        self._last_issued = issued
        return Announcement(
            wireguard_key=self.identity.wireguard_public,
            control_key=self.identity.control_public,
            endpoints=((opts.endpoint.host, opts.endpoint.port),),
            probe_port=opts.probe,
            mesh_address=self.identity.mesh_address.packed,
            roles=ROLE_ENTRY
            | (ROLE_EXIT if self.controls.settings.exit else 0)
            | (ROLE_MESH if opts.mesh is not None else 0),
            geohash=opts.geohash,
            price_per_gib=self.book.price_per_gib,
            capacity=self.controls.capacity,  # 0 while sharing is stopped: "full"
            load=self.book.load,
            version=__version__,
            issued_ms=issued,
            expires_ms=issued + opts.announce_ttl_s * 1000,
        )

    async def _announce(self) -> None:
        if self.link is None:
            return
        wire = sign(self.announcement(), self.identity.identity_key)
        if await self.link.publish(announce_topic(self.identity.node_id), wire, retain=True):
            self.counters["announcements"] += 1

    def _announce_soon(self) -> None:
        """The load changed: announce it, coalesced with other changes (see the loop)."""
        self._announce_due.set()

    async def _announce_loop(self) -> None:
        # Refresh at a third of the lifetime: two refreshes may be lost before expiry.
        # A change is announced at once, then the next one waits ANNOUNCE_GAP_S: a burst
        # of grants or expiries makes one announcement, not one each.
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._announce_due.wait(), self.opts.announce_ttl_s / 3)
            self._announce_due.clear()
            await self._announce()
            await asyncio.sleep(ANNOUNCE_GAP_S)

    async def _clear_announcement(self) -> None:
        if self.link is not None:
            await self.link.publish(announce_topic(self.identity.node_id), b"", retain=True)

    # ---- probes

    async def _serve_probes(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: ProbeProtocol(self.probes),
            local_addr=("0.0.0.0", self.opts.probe),  # noqa: S104
        )
        try:
            await asyncio.Event().wait()
        finally:
            transport.close()

    # ---- sessions

    def _count_reject(self, reason: str, detail: str) -> None:
        self.counters[f"rejected:{reason}"] += 1
        if reason not in self._logged:
            self._logged.add(reason)
            log.warning(
                "dropped a session request (%s): %s; further ones are only counted", reason, detail
            )

    def _log_limited(self, kind: str, msg: str, *args: object) -> None:
        if self._log_budget.allow(kind, now_ms()):
            log.info(msg, *args)
        else:
            self.counters[f"log-suppressed:{kind}"] += 1

    async def _on_message(self, topic: str, payload: bytes) -> None:
        if self.earnings.wants(topic):
            self.earnings.on_message(topic, payload, now_ms())
            return
        if self.credit is not None and topic.startswith(CREDIT_PREFIX):
            await self._on_credit_notice(topic, payload)
            return
        if topic.startswith(BOOKED_PREFIX):
            self.desk.on_booked(topic, payload)
            return
        if self.mesh is not None:
            if topic.startswith(ANNOUNCE_PREFIX):
                self.mesh.on_announcement(topic, payload)
                return
            if self.mesh.want_reply(topic):
                self.mesh.on_reply(topic, payload)
                return
        self.counters["session-messages"] += 1
        if topic != session_topic(self.identity.node_id):
            self._count_reject("wrong-topic", topic[:80])
            return
        if not request_size_ok(payload):  # before any work
            self._count_reject("malformed", f"{len(payload)} bytes, not a request's size")
            return
        now = now_ms()
        if not self.book.may_open(now):
            self._count_reject("overload", "more requests than the relay opens per second")
            return
        try:
            received = accept_request(
                self.identity.control_key, self.identity.identity_public, payload, now
            )
        except MessageError as exc:
            self._count_reject(exc.reason, str(exc))
            return
        assert self.link is not None  # noqa: S101 - messages only come through the link
        if isinstance(received.request, LinkRequest):
            if self.mesh is None:
                self._count_reject("no-mesh", "a link request, but this relay runs no mesh")
                return
            self.counters["requests:link"] += 1
            link_grant = await self.mesh.on_link_request(received)
            wire = received.answer(link_grant, self.identity.identity_key)
            asker = node_id_of(received.client_identity)
            self.link.post(reply_topic(asker, received.request.reply_token), wire)
            return
        await self._on_session_request(received, now)

    async def _on_session_request(self, received: ReceivedRequest, now: int) -> None:
        assert self.link is not None  # noqa: S101 - messages only come through the link
        assert isinstance(received.request, SessionRequest)  # noqa: S101 - links went to the mesh
        client = node_id_of(received.client_identity)
        refusal = self._credit_refusal(received.request, received.client_identity, now)
        if refusal is not None:
            self.counters["requests:no-credit"] += 1
            wire = received.answer(refusal, self.identity.identity_key)
            self.link.post(reply_topic(client, received.request.reply_token), wire)
            return
        if self.book.would_evict(received.request) and self.device is not None:
            # Fresh handshakes first: a client that came up a moment ago is in use.
            self.book.confirm(self._handshakes(await self.device.state()))
        decision = self.book.decide(
            received.request, received.client_identity, received.ephemeral, os.urandom(16), now
        )
        self.counters[f"requests:{decision.reason}"] += 1
        for gone in decision.evicted:
            self.desk.stop(gone.wireguard_key)
            self.counters["sessions:evicted-pending"] += 1
            self._log_limited(
                "evicted",
                "session of client %s… ended: never used, and its place was needed",
                gone.client_identity.b64[:8],
            )
        if decision.grant is None:
            return
        if decision.session is not None:
            await self._apply_peers()  # the peer exists before the client hears "granted"
            if decision.reason == "granted":
                self.desk.start(decision.session)
                self._log_limited(
                    "granted",
                    "session for client %s… at %s",
                    received.client_identity.b64[:8],
                    decision.session.address,
                )
                self._announce_soon()  # load changed
        else:
            if decision.evicted:
                await self._apply_peers()
            self._log_limited(
                f"refused:{decision.reason}",
                "refused client %s…: %s",
                received.client_identity.b64[:8],
                STATUS_NAMES[decision.grant.status],
            )
        wire = received.answer(decision.grant, self.identity.identity_key)
        self.link.post(reply_topic(client, received.request.reply_token), wire)

    # ---- credit (relay/credit.py): the accounting service says whom to serve

    def _credit_refusal(
        self, request: SessionRequest, client: PublicKey, now: int
    ) -> SessionGrant | None:
        if self.credit is None:
            return None
        refusal = self.credit.refusal(
            request, client, self.identity.wireguard_public, self.opts.price_per_gib, now
        )
        if refusal is not None:  # capped: a flood of unfunded identities must not fill the log
            self._log_limited(
                "refused:no-credit", "refused client %s…: %s", client.b64[:8], NO_CREDIT
            )
        return refusal

    async def _on_credit_notice(self, topic: str, payload: bytes) -> None:
        assert self.credit is not None  # noqa: S101 - only subscribed with a gate
        exhausted = self.credit.on_notice(topic, payload)
        if exhausted is None:
            return
        for key, session in list(self.book.sessions.items()):
            if node_id_of(session.client_identity) == exhausted:
                self.credit.counters["cut-off"] += 1
                log.warning("cut off client %s…: %s", session.client_identity.b64[:8], NO_CREDIT)
                await self._cut_off(key, NO_CREDIT, abusive=False)

    @staticmethod
    def _handshakes(state: DeviceState) -> dict[PublicKey, int]:
        return {k: int(p.last_handshake * 1000) for k, p in state.peers.items() if p.last_handshake}

    async def _expire_sessions(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_CHECK_S)
            if not self.book.sessions or self.device is None:
                continue
            handshakes = self._handshakes(await self.device.state())
            self.book.confirm(handshakes)
            ended = self.book.expire(now_ms(), handshakes)
            if ended:
                for s in ended:
                    self.desk.stop(s.wireguard_key)
                    log.info(
                        "session of client %s… ended (expired and idle)", s.client_identity.b64[:8]
                    )
                await self._apply_peers()
                self._announce_soon()

    # ---- local control API

    async def _op_admit(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            key = PublicKey.from_b64(str(req.get("wireguard_key", "")))
        except ValueError as exc:
            raise LocalError(f"bad WireGuard key: {exc}") from None
        address = self.pool.lease(key)
        self.manual.add(key)
        await self._apply_peers()
        log.info("admitted client %s… at %s by hand", key.b64[:8], address)
        return {
            "address": f"{address}/32",
            "relay_key": self.identity.wireguard_public.b64,
            "listen_port": self.opts.listen_port,
        }

    async def _op_release(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            key = PublicKey.from_b64(str(req.get("wireguard_key", "")))
        except ValueError as exc:
            raise LocalError(f"bad WireGuard key: {exc}") from None
        self.manual.discard(key)
        self.book.end(key)
        self.desk.stop(key)
        self.pool.release(key)
        await self._apply_peers()
        return {}

    async def _op_reload(self, _req: dict[str, Any]) -> dict[str, Any]:
        return await self.controls.reload(self)

    async def _op_earnings(self, _req: dict[str, Any]) -> dict[str, Any]:
        """The newest verified earnings report (``meshvpn earnings``, the dashboard)."""
        if self.earnings.report is None:
            why = "no broker" if self.opts.broker is None else "none heard yet"
            raise LocalError(
                f"this relay has no earnings report from the accounting service ({why})",
                "is `meshvpn accounting serve` running on the broker, and has this relay"
                " carried paid traffic?",
            )
        return {
            "report": self.earnings.report,
            "wire": self.earnings.report_wire.decode(),
            "accounting": self.earnings.status(now_ms()),
        }

    async def _op_mesh_ping(self, req: dict[str, Any]) -> dict[str, Any]:
        """RTT and hops to another relay over the mesh (``meshvpn ping``)."""
        if self.mesh is None:
            raise LocalError("this relay runs no mesh", "start it with --mesh to ping over it")
        node_id = str(req.get("node_id", ""))
        count = max(1, min(int(req.get("count", 3)), 20))
        if node_id == self.identity.node_id:
            raise LocalError("that is this relay's own node id", "give another relay's")
        address, route = self.mesh.resolve(node_id)
        hops, rtts = await asyncio.to_thread(probe_path, address, count)
        answered = [r for r in rtts if r is not None]
        return {
            "node_id": node_id,
            "mesh_address": str(address),
            "route": route,
            "hops": [
                {
                    "hop": h.hop,
                    "address": h.address,
                    "node_id": self.mesh.node_of_address(h.address) if h.address else None,
                    "rtt_ms": h.rtt_ms,
                    "reached": h.reached,
                }
                for h in hops
            ],
            "rtt_ms": rtts,
            "sent": count,
            "received": len(answered),
            "min_ms": min(answered, default=None),
            "avg_ms": round(sum(answered) / len(answered), 2) if answered else None,
            "max_ms": max(answered, default=None),
        }

    async def _sample_throughput(self) -> None:
        """Once a second: the clients' counters into the throughput history."""
        while True:
            await asyncio.sleep(THROUGHPUT_SAMPLE_S)
            if self.device is None:
                continue
            peers = (await self.device.state()).peers
            counters = {key.b64: (p.rx_bytes, p.tx_bytes) for key, p in peers.items()}
            self.throughput.observe(now_ms(), counters)

    async def status(self) -> dict[str, Any]:
        base = await super().status()
        now = now_ms()
        peers = []
        if self.device is not None:
            state = await self.device.state()
            # "pending" below must not count a client that made its handshake since
            # the last expiry check (every EXPIRY_CHECK_S)
            self.book.confirm(self._handshakes(state))
            for key, peer in sorted(state.peers.items()):
                session = self.book.sessions.get(key)
                endpoint = peer.spec.endpoint
                peers.append(
                    {
                        "wireguard_key": key.b64,
                        "address": str(self.pool.leases.get(key, "")),
                        "session_id": session.session_id.hex() if session else None,
                        "client_id": session.client_identity.b64 if session else None,
                        "client_node_id": node_id_of(session.client_identity) if session else None,
                        # over the mesh: this relay is the exit of a multi-hop path; else
                        # the client's access link (its entry, and its exit if single-hop)
                        "role": session_role(endpoint.host if endpoint else None),
                        "granted_ms": session.granted_ms if session else None,
                        "duration_s": (now - session.granted_ms) // 1000 if session else None,
                        "endpoint": str(endpoint) if endpoint else None,
                        "rx_bytes": peer.rx_bytes,
                        "tx_bytes": peer.tx_bytes,
                        "last_handshake": peer.last_handshake,
                        "price_per_gib": session.price_per_gib if session else None,
                        "receipts": self.desk.session_status(key),
                    }
                )
        return {
            **base,
            "listen_port": self.opts.listen_port,
            "exit": self.controls.settings.exit,
            "pool": str(self.opts.pool),
            "broker": {
                "address": str(self.opts.broker) if self.opts.broker else None,
                "connected": bool(self.link and self.link.connected.is_set()),
                "outages": self.link.outages if self.link else 0,
            },
            "endpoint": str(self.opts.endpoint) if self.opts.endpoint else None,
            "probes": {"answered": self.probes.answered, "dropped": dict(self.probes.dropped)},
            "counters": dict(self.counters),
            "credit": dict(self.credit.counters) if self.credit else None,
            "credit_clients": sorted(c for c, n in self.credit.book.notices.items() if n.ok)
            if self.credit
            else None,
            "sessions": {
                "active": len(self.book.sessions),
                "pending": len(self.book.pending),  # granted, no handshake yet: evictable
                "pending_cap": self.book.pending_cap,
            },
            "mqtt": {
                "dropped": self.link.dropped if self.link else 0,
                "posts_dropped": self.link.posts_dropped if self.link else 0,
                "handler_errors": self.link.handler_errors if self.link else 0,
            },
            # what never reached a socket: WireGuard's own drops of forged sources, and
            # the exit table's named counters (relay/exit.py)
            "dropped": {
                "spoofed_in_tunnel": await self.device.spoofed_packets() if self.device else None,
                "exit_table": await read_counters(EXIT_TABLE),
            },
            "receipts": self.desk.summary(),
            "sharing": self.controls.status(),
            "peers": peers,
            "mesh": None if self.mesh is None else self.mesh.status(await self.mesh.link_bytes()),
            "roles": self.roles(),
            "throughput": self.throughput.status(now),
            "accounting": self.earnings.status(now),
        }

    def roles(self) -> list[str]:
        """What this relay offers: entry always, exit if the owner allows, mesh if linked."""
        return [
            "entry",
            *(["exit"] if self.controls.settings.exit else []),
            *(["mesh"] if self.mesh is not None else []),
        ]

    async def before_stop(self) -> None:
        await self._clear_announcement()

    async def teardown(self) -> None:
        if self.mesh is not None:
            await self.mesh.close()
        await super().teardown()
        self.desk.close()
        self.controls.save_usage()
