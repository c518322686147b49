"""The agent process: one per node, ``meshvpn relay`` or ``meshvpn connect``.

Life of an agent:

1. lock the state directory (a second agent on it refuses);
2. remove whatever a crashed predecessor left (its footprint), but a table
   the node replaces in place itself (the client's lockdown: no gap);
3. build the node: WireGuard device, addresses, NAT or full-tunnel routing,
   each resource written to the footprint before it is created;
4. say "ready" (``--ready-fd`` for ``meshvpn connect``'s parent, sd_notify
   for systemd) and serve the control socket until told to stop, a signal
   arrives, or the WireGuard device dies;
5. remove everything in the footprint. The ``finally`` runs on every way out
   but SIGKILL, and step 2 covers that one.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import fcntl
import ipaddress
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from meshvpn import __version__
from meshvpn.control import ControlServer, notify_systemd
from meshvpn.errors import AlreadyRunningError, LocalError, MeshvpnError
from meshvpn.footprint import Footprint
from meshvpn.identity import Identity, load_identity
from meshvpn.wireguard.backend import BackendName, UserspaceDevice, WireGuardDevice, open_device
from meshvpn.wireguard.model import Endpoint

log = logging.getLogger("meshvpn.agent")

TUNNEL_MTU: Final = 1420
DEFAULT_POOL: Final = ipaddress.IPv4Network("100.64.0.0/24")
CLIENT_KEEPALIVE: Final = 25
LOCK_NAME: Final = "agent.lock"


def install_stack_dumps(loop: asyncio.AbstractEventLoop) -> None:
    """Let a stuck agent say where it is, into its log (stderr): SIGUSR1 lists every
    asyncio task's stack (needs a running loop), SIGQUIT every thread's (works even
    when the loop itself is blocked)."""
    faulthandler.register(signal.SIGQUIT, all_threads=True)

    def dump_tasks() -> None:
        tasks = asyncio.all_tasks(loop)
        log.warning("SIGUSR1: %d asyncio tasks", len(tasks))
        for task in tasks:
            task.print_stack(limit=12)

    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)


class StateLock:
    """flock(2) on the state dir: released by the kernel however we die."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        fh = self.path.open("a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            pid = fh.read().strip() or "?"
            fh.close()
            state_dir = self.path.parent
            raise AlreadyRunningError(
                f"another meshvpn agent (pid {pid}) is running with state dir {state_dir}",
                f"stop it with `meshvpn down --state-dir {state_dir}` or use another --state-dir",
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def held_by_other(self) -> bool:
        try:
            with self.path.open("a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except FileNotFoundError:
            return False
        return False


@dataclass(frozen=True)
class CommonOptions:
    state_dir: Path
    ifname: str
    backend: BackendName = "auto"
    ready_fd: int | None = None

    def kept_on_restart(self) -> frozenset[str]:
        """nftables tables a crashed predecessor left that this agent takes over and
        replaces atomically itself, instead of deleting them at start (for the
        client's lockdown, a gap between the two agents would be a leak)."""
        return frozenset()


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _report_ready(fd: int | None, payload: dict[str, Any]) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.write(fd, json.dumps(payload).encode() + b"\n")
            os.close(fd)
    if payload.get("ok"):
        notify_systemd("READY=1")


async def open_recorded(
    footprint: Footprint,
    ifname: str,
    backend: BackendName,
    log_path: Path,
    *,
    count_spoofed: bool = False,
) -> WireGuardDevice:
    """A device for ``ifname``, listed in the footprint before it exists; fails
    before anything is on the host if wireguard-go is missing. The caller keeps
    it (so teardown can destroy it) and then calls ``create_recorded``."""
    device = await open_device(ifname, backend, log_path, count_spoofed=count_spoofed)
    if isinstance(device, UserspaceDevice):
        device.resolve_binary()
    footprint.will_create_link(ifname)
    return device


async def create_recorded(footprint: Footprint, device: WireGuardDevice) -> None:
    """Create the device; a wireguard-go child goes into the footprint too."""
    await device.create()
    if (pid := device.child_pid()) is not None:
        footprint.started_pid(pid)


def ipv6_enabled() -> bool:
    try:
        return Path("/proc/sys/net/ipv6/conf/all/disable_ipv6").read_text().strip() == "0"
    except OSError:
        return False


class Agent:
    """What relay and client share: lock, footprint, device, control socket, teardown."""

    role = "agent"
    count_spoofed = False  # count packets WireGuard drops for a forged source (relays)

    def __init__(self, opts: CommonOptions) -> None:
        self.opts = opts
        self.identity: Identity = load_identity(opts.state_dir)
        self.lock = StateLock(opts.state_dir)
        self.footprint = Footprint.load(opts.state_dir)
        self.device: WireGuardDevice | None = None
        self.stop_requested = asyncio.Event()
        self.stop_reason = ""
        self.started = time.time()
        self._tasks: asyncio.TaskGroup | None = None
        self._jobs: list[asyncio.Task[None]] = []
        self.device_failure = ""
        self.control = ControlServer(
            opts.state_dir,
            {"ping": self._op_ping, "status": self._op_status, "stop": self._op_stop},
        )

    async def _op_ping(self, _req: dict[str, Any]) -> dict[str, Any]:
        return {"role": self.role, "pid": os.getpid()}

    async def _op_stop(self, _req: dict[str, Any]) -> dict[str, Any]:
        self.request_stop("asked to stop")
        return {}

    async def _op_status(self, _req: dict[str, Any]) -> dict[str, Any]:
        return await self.status()

    def on_reload_signal(self) -> None:
        """SIGHUP (systemd's ExecReload): re-read the configuration, where there is one."""
        log.info("SIGHUP: this agent has nothing to reload")

    def request_stop(self, reason: str) -> None:
        if not self.stop_requested.is_set():
            self.stop_reason = reason
            self.stop_requested.set()

    async def status(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            **self.identity.public_summary(),
            "interface": self.opts.ifname,
            "backend": self.device.kind if self.device else None,
        }

    async def prepare(self) -> None:
        """Work before anything is created on the host (e.g. find a relay)."""

    async def build(self) -> None:
        """Configure the device and the host; everything recorded in the footprint."""
        raise NotImplementedError

    async def before_stop(self) -> None:
        """Last words while the background jobs still run (e.g. clear an announcement)."""

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """The node's long-running jobs; they run until the agent stops."""
        return []

    async def run(self) -> None:
        self.lock.acquire()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop, f"signal {signal.Signals(sig).name}")
        loop.add_signal_handler(signal.SIGHUP, self.on_reload_signal)
        install_stack_dumps(loop)
        try:
            await self._clean_leftovers()
            try:
                await self._run_built()
            finally:
                await self.teardown()
        except MeshvpnError as exc:
            _report_ready(
                self.opts.ready_fd,
                {"ok": False, "error": exc.one_line(), "exit_code": exc.exit_code},
            )
            raise
        except Exception as exc:
            # A bug: the traceback goes to the log; the waiting `connect` hears at once.
            error = f"error: the agent failed: {exc!r}; see agent.log in {self.opts.state_dir}"
            _report_ready(self.opts.ready_fd, {"ok": False, "error": error, "exit_code": 1})
            raise
        finally:
            self.lock.release()

    async def _clean_leftovers(self) -> None:
        if self.footprint.empty:
            return
        fp = self.footprint
        kept = [t for t in fp.nft_tables if t in self.opts.kept_on_restart()]
        if kept:
            # The rest is removed through the old object, pointed elsewhere: the file
            # lists everything until the footprint of just the kept tables replaces
            # it, so a crash in between only means the next start removes it again.
            self.footprint = Footprint(fp.path, nft_tables=kept)
            fp.path = fp.path.with_suffix(".leftovers")
            fp.nft_tables = [t for t in fp.nft_tables if t not in kept]
        for line in await fp.remove_all():
            log.warning("cleaned up after a previous run: %s", line)
        if kept:
            self.footprint.save()
            log.warning("took over from a previous run: nftables table %s", ", ".join(kept))

    def spawn(self, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a job owned by the agent: it ends when the agent stops."""
        assert self._tasks is not None  # noqa: S101 - only while run() holds the group
        task = self._tasks.create_task(job)
        self._jobs.append(task)
        return task

    async def _run_built(self) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                try:
                    await self._serve()
                finally:
                    for task in self._jobs:
                        task.cancel()
                    self._tasks = None
        except BaseExceptionGroup as group:
            # Our own errors carry the one line the user should see: unwrap them.
            ours, _ = group.split(MeshvpnError)
            if ours is not None:
                raise _first_leaf(ours) from None
            raise

    async def _serve(self) -> None:
        await self.prepare()
        if self.stop_requested.is_set():
            return
        device = await open_recorded(
            self.footprint,
            self.opts.ifname,
            self.opts.backend,
            self.opts.state_dir / "wireguard-go.log",
            count_spoofed=self.count_spoofed,
        )
        self.device = device
        await create_recorded(self.footprint, device)
        await self.build()
        await self.control.start()
        if self.stop_requested.is_set():
            return
        _report_ready(self.opts.ready_fd, {"ok": True, **await self.status()})
        log.info(
            "%s ready: %s on %s (%s)",
            self.role,
            self.identity.node_id,
            self.opts.ifname,
            device.kind,
        )
        died = self.spawn(self._watch_device(device))
        self.spawn(device.watch())
        stop = self.spawn(self._wait_stop())
        jobs = [self.spawn(job) for job in self.background()]
        await asyncio.wait([died, stop, *jobs], return_when=asyncio.FIRST_COMPLETED)
        if died.done() and not died.cancelled() and self.device_failure:
            raise LocalError(self.device_failure, "see wireguard-go.log in the state directory")
        notify_systemd("STOPPING=1")
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.before_stop(), 3.0)
        log.info("stopping: %s", self.stop_reason)

    async def _watch_device(self, device: WireGuardDevice) -> None:
        self.device_failure = await device.wait_failed()

    async def _wait_stop(self) -> None:
        await self.stop_requested.wait()

    async def teardown(self) -> None:
        with contextlib.suppress(Exception):
            await self.control.close()
        if self.device is not None:
            try:
                await self.device.destroy()
            except Exception:
                log.exception("stopping the WireGuard device failed; removing its interface anyway")
        for line in await self.footprint.remove_all():
            log.debug("teardown: %s", line)


async def clean_stale(state_dir: Path) -> list[str]:
    """For ``meshvpn down`` when no agent runs: undo a dead agent's footprint."""
    lock = StateLock(state_dir)
    lock.acquire()
    try:
        return await Footprint.load(state_dir).remove_all()
    finally:
        lock.release()


def resolve_local_endpoint(text: str) -> Endpoint:
    """Endpoint from 'host:port'; a name is resolved once, here, to one address."""
    try:
        return Endpoint.parse(text)
    except ValueError:
        pass
    host, _, port = text.rpartition(":")
    try:
        info = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)
    except (OSError, ValueError) as exc:
        raise LocalError(
            f"cannot resolve relay address {text!r}: {exc}", "give host:port"
        ) from None
    return Endpoint(ipaddress.ip_address(info[0][4][0]), int(port))
