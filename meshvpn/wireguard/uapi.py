"""The WireGuard cross-platform UAPI (https://www.wireguard.com/xplatform/).

``encode_set`` and ``parse_get`` are pure; ``UapiSocket`` moves the bytes.

We speak UAPI ourselves instead of using wireguard_tools' UAPI device because
its ``set_config`` always sends ``replace_peers=true``: that drops every peer's
session and zeroes its counters on each change, which would break metering and
interrupt every client whenever one joins. Here a change touches only the
peers it names.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from meshvpn.errors import LocalError
from meshvpn.identity import PrivateKey, PublicKey
from meshvpn.wireguard.model import (
    DeviceState,
    Endpoint,
    IPNetwork,
    PeerPlan,
    PeerSpec,
    PeerState,
)

SOCKET_DIR: Final = Path("/var/run/wireguard")
MAX_RESPONSE: Final = 16 * 1024 * 1024
CALL_TIMEOUT_S: Final = 10.0  # wireguard-go answers in milliseconds; silence means it is stuck


class UapiError(LocalError):
    """wireguard-go refused a command or answered something we cannot parse."""


def _peer_lines(spec: PeerSpec, *, update_only: bool) -> list[str]:
    lines = [f"public_key={spec.public_key.hex}"]
    if update_only:
        lines.append("update_only=true")
    if spec.endpoint is not None:
        lines.append(f"endpoint={spec.endpoint}")
    lines.append(f"persistent_keepalive_interval={spec.keepalive}")
    lines.append("replace_allowed_ips=true")
    lines.extend(f"allowed_ip={net}" for net in spec.allowed_ips)
    return lines


def encode_set(
    plan: PeerPlan,
    *,
    private_key: PrivateKey | None = None,
    listen_port: int | None = None,
    fwmark: int | None = None,
) -> bytes:
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={private_key.hex}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    if fwmark is not None:
        lines.append(f"fwmark={fwmark}")
    for key in plan.remove:
        lines += [f"public_key={key.hex}", "remove=true"]
    for spec in plan.update:
        lines += _peer_lines(spec, update_only=True)
    for spec in plan.add:
        lines += _peer_lines(spec, update_only=False)
    return ("\n".join(lines) + "\n\n").encode()


@dataclass
class _PeerBuilder:
    public_key: PublicKey
    allowed: list[IPNetwork] = field(default_factory=list)
    endpoint: Endpoint | None = None
    keepalive: int = 0
    rx: int = 0
    tx: int = 0
    hs_sec: int = 0
    hs_nsec: int = 0

    def build(self) -> PeerState:
        spec = PeerSpec(self.public_key, tuple(self.allowed), self.endpoint, self.keepalive)
        handshake = self.hs_sec + self.hs_nsec / 1e9 if self.hs_sec else None
        return PeerState(spec, rx_bytes=self.rx, tx_bytes=self.tx, last_handshake=handshake)


def _apply_peer_line(cur: _PeerBuilder, name: str, value: str) -> None:
    if name == "endpoint":
        cur.endpoint = Endpoint.parse(value)
    elif name == "allowed_ip":
        cur.allowed.append(ipaddress.ip_network(value, strict=False))
    elif name == "rx_bytes":
        cur.rx = int(value)
    elif name == "tx_bytes":
        cur.tx = int(value)
    elif name == "last_handshake_time_sec":
        cur.hs_sec = int(value)
    elif name == "last_handshake_time_nsec":
        cur.hs_nsec = int(value)
    elif name == "persistent_keepalive_interval":
        cur.keepalive = int(value)
    # other keys (preshared_key, protocol_version, newer ones) are not ours to track


def parse_get(text: str) -> DeviceState:
    """Parse the answer to ``get=1``; raise UapiError on anything malformed."""
    public: PublicKey | None = None
    listen_port = 0
    fwmark = 0
    peers: dict[PublicKey, PeerState] = {}
    cur: _PeerBuilder | None = None
    errno = None
    try:
        for line in text.split("\n"):
            if not line:
                continue
            name, sep, value = line.partition("=")
            if not sep:
                raise UapiError(f"malformed UAPI line {line[:80]!r}")
            if name == "private_key":
                # Derive the public key and forget the private one at once.
                public = PrivateKey(bytes.fromhex(value)).x25519_public()
            elif name == "listen_port":
                listen_port = int(value)
            elif name == "fwmark":
                fwmark = int(value)
            elif name == "errno":
                errno = int(value)
            elif name == "public_key":
                if cur is not None:
                    peers[cur.public_key] = cur.build()
                cur = _PeerBuilder(PublicKey(bytes.fromhex(value)))
            elif cur is not None:
                _apply_peer_line(cur, name, value)
        if cur is not None:
            peers[cur.public_key] = cur.build()
    except ValueError as exc:
        raise UapiError(f"malformed UAPI answer: {exc}") from None
    if errno is None:
        raise UapiError("UAPI answer has no errno line")
    if errno != 0:
        raise UapiError(f"wireguard-go refused get: errno {errno}")
    return DeviceState(public_key=public, listen_port=listen_port, fwmark=fwmark, peers=peers)


def decode_answer(data: bytes) -> str:
    """wireguard-go answers in ASCII; anything else is a malformed answer, not a crash."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise UapiError("UAPI answer is not text") from None


def parse_set_answer(text: str) -> None:
    lines = [line for line in text.split("\n") if line]
    if lines != ["errno=0"]:
        raise UapiError(f"wireguard-go refused set: {' '.join(lines)[:120]}")


class UapiSocket:
    """One request per connection: simple, and immune to half-read state."""

    def __init__(self, ifname: str, socket_dir: Path = SOCKET_DIR) -> None:
        self.path = socket_dir / f"{ifname}.sock"

    async def _call(self, request: bytes) -> str:
        try:
            return await asyncio.wait_for(self._exchange(request), CALL_TIMEOUT_S)
        except TimeoutError:
            raise UapiError(f"{self.path}: no answer within {CALL_TIMEOUT_S:g} s") from None

    async def _exchange(self, request: bytes) -> str:
        reader, writer = await asyncio.open_unix_connection(str(self.path), limit=MAX_RESPONSE)
        try:
            writer.write(request)
            await writer.drain()
            data = await reader.readuntil(b"\n\n")
        except asyncio.IncompleteReadError as exc:
            raise UapiError(f"{self.path}: connection closed mid-answer") from exc
        finally:
            writer.close()
            await writer.wait_closed()
        return decode_answer(data)

    async def get(self) -> DeviceState:
        return parse_get(await self._call(b"get=1\n\n"))

    async def set(self, request: bytes) -> None:
        parse_set_answer(await self._call(request))
