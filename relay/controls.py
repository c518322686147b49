"""The owner's controls, carried out: usage, the sharing gate, shaping, reload.

Thin adapter around ``relay.operator`` (read that first). Every
``CHECK_INTERVAL_S`` (or at once on SIGHUP) it reads the WireGuard counters,
feeds the usage meter, asks the gate, and has the agent end the sessions that
no longer fit and announce a changed capacity. The month's usage is saved in
the state directory (``usage.json``), so a restart does not reset the cap.
Shaping is ``tc -batch`` on the relay's WireGuard interface and one ifb
device, which goes in the footprint before it is made.

Reload (SIGHUP, or ``meshvpn reload`` over the control socket) re-reads the
config through ``loader`` (the CLI's flags still win), swaps the settings and
applies them: price and max sessions to the session book (new sessions only
get the new price), the exit table, shaping, then one gate check. A config
with a problem changes nothing: the reload fails with the problem's line.
Settings that need a restart (interface, port, pool, broker...) are named in
the answer and the log, and otherwise left as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pyroute2.netlink.exceptions import NetlinkError

from meshvpn.clock import now_ms
from meshvpn.control import notify_systemd
from meshvpn.errors import LocalError, MeshvpnError
from meshvpn.footprint import Footprint
from meshvpn.netconf import Netlink
from relay.operator import (
    Gate,
    OperatorSettings,
    UsageMeter,
    announced_capacity,
    gate,
    ifb_name,
    sessions_to_end,
    shaping_batch,
    unshaping_batch,
)

if TYPE_CHECKING:
    from relay.agent import RelayAgent

log = logging.getLogger("meshvpn.operator")

CHECK_INTERVAL_S: Final = 2.0
USAGE_SAVE_S: Final = 10.0
USAGE_FILE: Final = "usage.json"

# () -> (settings, the values that only a restart changes)
Loader = Callable[[], tuple[OperatorSettings, Mapping[str, Any]]]


def run_tc_batch(batch: str, *, check: bool = True) -> None:
    try:
        proc = subprocess.run(
            ["tc", "-batch", "-"], input=batch.encode(), capture_output=True, check=False
        )
    except FileNotFoundError:
        raise LocalError("tc not found", "install iproute2") from None
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise LocalError(f"tc refused the bandwidth cap: {err[0] if err else proc.returncode}")


class OperatorControls:
    def __init__(
        self,
        settings: OperatorSettings,
        state_dir: Path,
        ifname: str,
        loader: Loader | None = None,
        fixed: Mapping[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.ifname = ifname
        self.loader = loader
        self.fixed = dict(fixed or {})
        self.usage_path = state_dir / USAGE_FILE
        self.usage = UsageMeter()
        self.gate = Gate(open=True)
        self.shaped_kbit: int | None = None
        self.reloads = 0
        self.ended = 0
        self.reload_requested = asyncio.Event()
        self._lock = asyncio.Lock()
        self._saved_at = 0.0
        self._load_usage()

    # ---- usage survives restarts

    def _load_usage(self) -> None:
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            data = json.loads(self.usage_path.read_text())
            self.usage.month = str(data["month"])
            self.usage.used_bytes = int(data["used_bytes"])
            self.usage.day = str(data.get("day", ""))
            self.usage.day_bytes = int(data.get("day_bytes", 0))

    def save_usage(self) -> None:
        tmp = self.usage_path.with_suffix(".tmp")
        u = self.usage
        saved = {
            "month": u.month,
            "used_bytes": u.used_bytes,
            "day": u.day,
            "day_bytes": u.day_bytes,
        }
        tmp.write_text(json.dumps(saved))
        tmp.replace(self.usage_path)
        self._saved_at = time.monotonic()

    # ---- shaping

    async def apply_shaping(self, footprint: Footprint) -> None:
        want = self.settings.bandwidth_kbit
        if want == self.shaped_kbit:
            return
        ifb = ifb_name(self.ifname)
        if want is None:
            run_tc_batch(unshaping_batch(self.ifname), check=False)
            async with Netlink() as nl:
                await nl.link_delete(ifb)
            log.info("bandwidth cap removed")
        elif self.shaped_kbit is None:
            footprint.will_create_link(ifb)
            async with Netlink() as nl:
                await nl.link_delete(ifb)  # a crashed predecessor's, if the footprint missed it
                try:
                    await nl.link_add(ifb, "ifb")
                except (OSError, NetlinkError) as exc:
                    raise LocalError(
                        f"cannot create the ifb device {ifb} for the upload cap: {exc}",
                        "load the ifb kernel module (modprobe ifb), or drop bandwidth_mbit",
                    ) from None
                await nl.link_up(ifb)
            run_tc_batch(shaping_batch(self.ifname, want, create=True))
            log.info("bandwidth cap: %d kbit/s each way for relayed traffic", want)
        else:
            run_tc_batch(shaping_batch(self.ifname, want, create=False))
            log.info("bandwidth cap now %d kbit/s each way", want)
        self.shaped_kbit = want

    # ---- the gate

    @property
    def capacity(self) -> int:
        return announced_capacity(self.settings, self.gate)

    async def check(self, agent: RelayAgent) -> None:
        """One round: count, decide, end what no longer fits, announce a change."""
        if agent.device is None:
            return
        state = await agent.device.state()
        now = now_ms()
        self.usage.observe(
            now,
            self.settings.timezone,
            {key.b64: (p.rx_bytes, p.tx_bytes) for key, p in state.peers.items()},
        )
        new = gate(self.settings, now, self.usage.used_bytes)
        changed = new != self.gate
        if changed:
            self.gate = new
            agent.book.gate = new
            log.warning("sharing %s", "open again" if new.open else f"stopped: {new.reason}")
        ending = sessions_to_end(
            self.settings, new, {k: s.granted_ms for k, s in agent.book.sessions.items()}
        )
        if ending:
            self.ended += len(ending)
            why = new.reason if not new.open else "more sessions than max_sessions"
            await agent.end_sessions(ending, why)
        elif changed:
            await agent.announce_now()
        if changed or time.monotonic() - self._saved_at > USAGE_SAVE_S:
            self.save_usage()

    async def watch(self, agent: RelayAgent) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.reload_requested.wait(), CHECK_INTERVAL_S)
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                try:
                    await self.reload(agent)
                except MeshvpnError as exc:
                    log.error("reload failed, settings unchanged: %s", exc.one_line())  # noqa: TRY400
            async with self._lock:
                await self.check(agent)

    # ---- reload

    async def reload(self, agent: RelayAgent) -> dict[str, Any]:
        if self.loader is None:
            raise LocalError("this relay was started without a config loader; nothing to reload")
        async with self._lock:
            notify_systemd(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                return await self._reload(agent, self.loader)
            finally:
                notify_systemd("READY=1")

    async def _reload(self, agent: RelayAgent, loader: Loader) -> dict[str, Any]:
        settings, fixed = loader()  # ConfigError: nothing changes
        old = self.settings
        changed = old.changes(settings)
        restart = sorted(k for k, v in fixed.items() if self.fixed.get(k) != v)
        self.settings = settings
        agent.book.price_per_gib = settings.price_per_gib
        agent.book.capacity = settings.max_sessions
        try:
            if old.exit != settings.exit or old.exit_policy != settings.exit_policy:
                await agent.apply_exit()
            await self.apply_shaping(agent.footprint)
        except MeshvpnError:
            self.settings = old
            agent.book.price_per_gib = old.price_per_gib
            agent.book.capacity = old.max_sessions
            with contextlib.suppress(MeshvpnError):
                await agent.apply_exit()
                await self.apply_shaping(agent.footprint)
            raise
        self.reloads += 1
        ended_before = self.ended
        await self.check(agent)
        await agent.announce_now()
        log.info(
            "reloaded: %s%s",
            ", ".join(changed) or "nothing changed",
            f"; needs a restart: {', '.join(restart)}" if restart else "",
        )
        return {
            "changed": changed,
            "restart_needed": restart,
            "ended_sessions": self.ended - ended_before,
            "sharing": self.status(),
        }

    def status(self) -> dict[str, Any]:
        return {
            "open": self.gate.open,
            "reason": self.gate.reason,
            "month": self.usage.month,
            "used_bytes": self.usage.used_bytes,
            "day": self.usage.day,
            "day_bytes": self.usage.day_bytes,
            "monthly_cap_bytes": self.settings.monthly_cap_bytes,
            "capacity": self.capacity,
            "bandwidth_kbit": self.shaped_kbit,
            "reloads": self.reloads,
            "ended_sessions": self.ended,
            "settings": self.settings.to_json(),
        }
