"""WireGuard devices behind one small interface.

- ``KernelDevice``: the in-kernel module over netlink (routers, most Linux).
- ``UserspaceDevice``: wireguard-go as a supervised child in the foreground
  (``-f``), configured over its UAPI socket; what machines without the module
  use. The child gets SIGTERM if the agent dies (PR_SET_PDEATHSIG), so even a
  ``kill -9`` of the agent does not leave a tunnel running unsupervised.

Both share ``reconcile``: read the device, plan the difference to the wanted
peers, apply only that.

Both drop, before anything else on the host sees it, a packet whose inner
source address is not in its peer's allowed IPs (WireGuard's cryptokey
routing): that is where a client forging its source is stopped. Neither has
a counter for it in its configuration interface, so ``spoofed_packets`` reads
what each has: the kernel counts such packets in the interface's
``rx_frame_errors``; wireguard-go logs each one at its verbose level, so a
device made with ``count_spoofed`` runs it verbose and ``watch`` counts those
lines in its log (and keeps the log from growing without bound: the
per-packet lines are a flooder's to make). wireguard-go writes to a file,
never to a pipe the agent must drain: a busy agent never stalls the data
plane.
"""

from __future__ import annotations

import abc
import asyncio
import errno
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

from meshvpn.errors import LocalError
from meshvpn.identity import PrivateKey, PublicKey
from meshvpn.wireguard.model import DeviceState, Endpoint, PeerPlan, PeerSpec, PeerState, plan_peers
from meshvpn.wireguard.uapi import SOCKET_DIR, UapiError, UapiSocket, encode_set

BackendName = Literal["auto", "kernel", "userspace"]
WIREGUARD_GO_ENV: Final = "MESHVPN_WIREGUARD_GO"
START_TIMEOUT: Final = 5.0
SPOOFED_LINE: Final = b"packet with disallowed source address"
LOG_WATCH_S: Final = 1.0
LOG_LIMIT: Final = 4 << 20  # the verbose log is truncated past this
LOG_READ_MAX: Final = 64 << 20  # per look: what the flood wrote beyond it is skipped, uncounted


def die_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run so that the child gets SIGTERM when the agent dies, even by
    SIGKILL (prctl PR_SET_PDEATHSIG, kept across exec), by util-linux's setpriv.

    Not a ``preexec_fn``: that runs Python in the forked child of a process with
    threads (asyncio.to_thread), where a lock another thread held at the fork
    (malloc's, the dynamic loader's for ctypes) stays locked forever; Popen then
    waits on the child's exec with the event loop blocked. That was the connect
    that hung under load with nothing in its log."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


class WireGuardDevice(abc.ABC):
    kind: str

    def __init__(self, ifname: str) -> None:
        if not 0 < len(ifname) <= 15 or "/" in ifname or " " in ifname:
            raise LocalError(
                f"invalid interface name {ifname!r}", "use 1-15 characters, no / or space"
            )
        self.ifname = ifname

    @abc.abstractmethod
    async def create(self) -> None: ...

    @abc.abstractmethod
    async def set_interface(
        self, private_key: PrivateKey, listen_port: int, fwmark: int
    ) -> None: ...

    @abc.abstractmethod
    async def state(self) -> DeviceState: ...

    @abc.abstractmethod
    async def apply(self, plan: PeerPlan) -> None: ...

    @abc.abstractmethod
    async def destroy(self) -> None: ...

    async def wait_failed(self) -> str:
        """Return (with a reason) only if the device dies under us."""
        await asyncio.Event().wait()
        return "unreachable"

    def child_pid(self) -> int | None:
        return None

    async def spoofed_packets(self) -> int | None:
        """Packets dropped for a source outside their peer's allowed IPs (None: unknown)."""
        return None

    async def watch(self) -> None:
        """Whatever the device needs done while it runs (an owned background job)."""
        await asyncio.Event().wait()

    async def reconcile(self, desired: Mapping[PublicKey, PeerSpec]) -> PeerPlan:
        plan = plan_peers(desired, (await self.state()).peers)
        if not plan.empty:
            await self.apply(plan)
        return plan


class UserspaceDevice(WireGuardDevice):
    kind = "userspace"

    def __init__(
        self,
        ifname: str,
        log_path: Path,
        binary: str | None = None,
        *,
        count_spoofed: bool = False,
    ) -> None:
        super().__init__(ifname)
        self.binary = binary or os.environ.get(WIREGUARD_GO_ENV, "wireguard-go")
        self.log_path = log_path
        self.uapi = UapiSocket(ifname)
        self._proc: asyncio.subprocess.Process | None = None
        self.count_spoofed = count_spoofed
        self._spoofed = 0
        self._log_offset = 0

    def resolve_binary(self) -> str:
        found = shutil.which(self.binary)
        if found is None:
            raise LocalError(
                f"wireguard-go not found (looked for {self.binary!r})",
                "install it with `apt-get install --no-install-recommends wireguard-go`"
                f" or point {WIREGUARD_GO_ENV} at it",
            )
        return found

    async def _socket_answers(self) -> bool:
        try:
            await self.uapi.get()
        except (OSError, UapiError):
            return False
        return True

    async def create(self) -> None:
        binary = self.resolve_binary()
        sock = SOCKET_DIR / f"{self.ifname}.sock"
        if sock.exists():
            if await self._socket_answers():
                raise LocalError(
                    f"WireGuard interface {self.ifname} is already run by another process",
                    "stop it, or give this node another --interface",
                )
            sock.unlink(missing_ok=True)  # stale socket of a dead wireguard-go
        env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1")
        if self.count_spoofed:
            env["LOG_LEVEL"] = "verbose"
        log = self.log_path.open("ab")
        self._log_offset = log.tell()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *die_with_parent([binary, "-f", self.ifname]),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        finally:
            log.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while loop.time() < deadline:
            if self._proc.returncode is not None:
                raise LocalError(f"wireguard-go exited at start: {self._last_log_line()}")
            if sock.exists() and await self._socket_answers():
                return
            await asyncio.sleep(0.02)
        await self.destroy()
        raise LocalError(f"wireguard-go did not open its UAPI socket within {START_TIMEOUT:.0f} s")

    def _last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        lines = [line for line in lines if not line.startswith("DEBUG:")] or lines
        return lines[-1][:200] if lines else "no output"

    async def spoofed_packets(self) -> int | None:
        if not self.count_spoofed:
            return None
        self.read_log()
        return self._spoofed

    def read_log(self) -> None:
        """Count the spoofed-source lines written since the last look; truncate a
        log grown past ``LOG_LIMIT`` (wireguard-go appends, so it carries on at 0)."""
        try:
            with self.log_path.open("rb+") as f:
                size = f.seek(0, os.SEEK_END)
                if size < self._log_offset:  # truncated by someone else
                    self._log_offset = 0
                f.seek(max(self._log_offset, size - LOG_READ_MAX))
                data = f.read(size - f.tell())
                end = data.rfind(b"\n") + 1  # whole lines only; the rest next time
                self._spoofed += data.count(SPOOFED_LINE, 0, end)
                self._log_offset = f.tell() - len(data) + end
                if self._log_offset > LOG_LIMIT:
                    f.truncate(0)
                    self._log_offset = 0
        except OSError:
            return

    async def watch(self) -> None:
        if not self.count_spoofed:
            await super().watch()
        while True:
            await asyncio.sleep(LOG_WATCH_S)
            self.read_log()

    def child_pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def set_interface(self, private_key: PrivateKey, listen_port: int, fwmark: int) -> None:
        await self.uapi.set(
            encode_set(PeerPlan(), private_key=private_key, listen_port=listen_port, fwmark=fwmark)
        )

    async def state(self) -> DeviceState:
        return await self.uapi.get()

    async def apply(self, plan: PeerPlan) -> None:
        await self.uapi.set(encode_set(plan))

    async def wait_failed(self) -> str:
        if self._proc is None:
            return await super().wait_failed()
        code = await self._proc.wait()
        return f"wireguard-go for {self.ifname} exited with code {code}: {self._last_log_line()}"

    async def destroy(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()  # wireguard-go removes its interface and socket on SIGTERM
        try:
            await asyncio.wait_for(proc.wait(), 3.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()


class KernelDevice(WireGuardDevice):
    """In-kernel WireGuard. Untestable on machines without the module (tests skip)."""

    kind = "kernel"

    async def spoofed_packets(self) -> int | None:
        # drivers/net/wireguard/receive.c counts a disallowed source ("dishonest
        # packet peer") in rx_frame_errors, together with a packet of no known type.
        stat = Path("/sys/class/net") / self.ifname / "statistics" / "rx_frame_errors"
        try:
            return int(stat.read_text())
        except (OSError, ValueError):
            return None

    async def create(self) -> None:
        from meshvpn.netconf import Netlink  # noqa: PLC0415 - keep import cost off the CLI path

        async with Netlink() as nl:
            if await nl.link_exists(self.ifname):
                raise LocalError(
                    f"interface {self.ifname} already exists",
                    "stop what owns it, or give this node another --interface",
                )
            await nl.link_add(self.ifname, "wireguard")

    def _wg(self) -> Any:  # noqa: ANN401 - pyroute2 is untyped
        from pyroute2 import WireGuard  # noqa: PLC0415

        return WireGuard()

    async def set_interface(self, private_key: PrivateKey, listen_port: int, fwmark: int) -> None:
        def run() -> None:
            with self._wg() as wg:
                wg.set(
                    self.ifname,
                    private_key=_b64(private_key.raw),
                    listen_port=listen_port,
                    fwmark=fwmark,
                )

        await asyncio.to_thread(run)

    async def state(self) -> DeviceState:
        from wireguard_tools.wireguard_netlink import WireguardNetlinkDevice  # noqa: PLC0415

        def run() -> DeviceState:
            dev = WireguardNetlinkDevice(self.ifname)
            try:
                cfg = dev.get_config()
            finally:
                dev.close()
            peers: dict[PublicKey, PeerState] = {}
            for peer in cfg.peers.values():
                key = PublicKey(peer.public_key.keydata)
                endpoint = (
                    Endpoint.parse(f"[{peer.endpoint_host}]:{peer.endpoint_port}")
                    if peer.endpoint_host is not None and peer.endpoint_port
                    else None
                )
                spec = PeerSpec(
                    key,
                    tuple(i.network for i in peer.allowed_ips),
                    endpoint,
                    peer.persistent_keepalive or 0,
                )
                peers[key] = PeerState(
                    spec, peer.rx_bytes or 0, peer.tx_bytes or 0, peer.last_handshake or None
                )
            public = PublicKey(cfg.private_key.public_key().keydata) if cfg.private_key else None
            return DeviceState(public, cfg.listen_port or 0, cfg.fwmark or 0, peers)

        return await asyncio.to_thread(run)

    async def apply(self, plan: PeerPlan) -> None:
        def run() -> None:
            with self._wg() as wg:
                for key in plan.remove:
                    wg.set(self.ifname, peer={"public_key": key.b64, "remove": True})
                for spec in (*plan.update, *plan.add):
                    peer: dict[str, Any] = {
                        "public_key": spec.public_key.b64,
                        "allowed_ips": [str(n) for n in spec.allowed_ips],
                        "persistent_keepalive": spec.keepalive,
                    }
                    if spec.endpoint is not None:
                        peer["endpoint_addr"] = str(spec.endpoint.host)
                        peer["endpoint_port"] = spec.endpoint.port
                    wg.set(self.ifname, peer=peer)

        await asyncio.to_thread(run)

    async def destroy(self) -> None:
        from meshvpn.netconf import Netlink  # noqa: PLC0415

        async with Netlink() as nl:
            await nl.link_delete(self.ifname)


def _b64(raw: bytes) -> str:
    import base64  # noqa: PLC0415

    return base64.b64encode(raw).decode()


async def kernel_wireguard_available() -> bool:
    """Probe by creating and deleting a throwaway interface in this namespace."""
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: PLC0415

    from meshvpn.netconf import Netlink  # noqa: PLC0415

    probe = f"mvprobe{os.getpid() % 100000}"
    async with Netlink() as nl:
        try:
            await nl.link_add(probe, "wireguard")
        except NetlinkError as exc:
            if exc.code in {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENODEV}:
                return False
            raise
        await nl.link_delete(probe)
    return True


async def open_device(
    ifname: str, backend: BackendName, log_path: Path, *, count_spoofed: bool = False
) -> WireGuardDevice:
    if backend == "kernel" or (backend == "auto" and await kernel_wireguard_available()):
        return KernelDevice(ifname)
    return UserspaceDevice(ifname, log_path, count_spoofed=count_spoofed)
