"""The owner's controls over sharing: what they are and what they decide. Pure.

Theory of operation
-------------------
``OperatorSettings`` is what an owner sets (config ``[sharing]`` or flags):
price, exit on/off, max sessions, a bandwidth cap, a monthly data cap, the
hours of the day it shares (in an explicit time zone), the exit policy. The
relay agent holds one at a time; a reload swaps it for a new one.

Every few seconds the agent feeds ``UsageMeter.observe`` the WireGuard
per-peer byte counters (both directions, clients' peers only: the owner's
own traffic never crosses the relay's WireGuard interface) and asks ``gate``
whether sharing is open now. The gate is closed outside the schedule's hours
and once the month's relayed bytes reach the cap (months are calendar months
in the settings' time zone). From the gate follow:

- ``admission``: a new session (or a renewal) is refused "full" with the
  reason when the gate is closed; a new one also when ``max_sessions`` are
  in use;
- ``announced_capacity``: 0 while closed, so the announcement says "full"
  (load >= capacity) and clients look elsewhere first;
- ``sessions_to_end``: a closed gate ends every running session (sharing
  stops at the end of the hours, and a cap that running sessions could run
  past forever would be no cap); otherwise the oldest ``max_sessions`` are
  kept and newer ones beyond that end (after a reload lowered it). So a
  reload keeps every session that still fits; a new price applies to new
  sessions only (a session keeps the price it was granted at).

The bandwidth cap is shaped with htb on the relay's own devices only, never on
the uplink the owner's traffic uses: egress of the WireGuard interface is what
clients download; what they upload enters on that interface and is redirected
(tc ingress + mirred) to an ifb device whose egress is shaped the same way.
So the cap holds for relayed traffic in each direction, the router's other
interfaces keep whatever qdisc the owner gave them (SQM, cake), and no
classification by address or mark is needed. ``shaping_batch`` renders the
``tc -batch`` text; the adapter (relay/controls.py) runs it.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from relay.exit import DEFAULT_EXIT_POLICY, ExitPolicy

S = TypeVar("S")

GIB: Final = 1 << 30
MIB: Final = 1 << 20
DAY_MINUTES: Final = 24 * 60
HTB_QUANTUM: Final = 1514  # one full frame per round: no "quantum is big" warnings at any rate
QUEUE_MS: Final = 200  # queue under the cap: enough for TCP to fill it, bounded delay
MIN_QUEUE_BYTES: Final = 64 * 1024


@dataclass(frozen=True)
class Schedule:
    """Hours of the day sharing is on, as [start, end) minutes of the local day.

    A window whose end is before its start runs over midnight ("22:00-06:00").
    """

    windows: tuple[tuple[int, int], ...]
    timezone: str

    def __post_init__(self) -> None:
        if not self.windows:
            raise ValueError("a schedule needs at least one window")
        for start, end in self.windows:
            if not (0 <= start < DAY_MINUTES and 0 <= end <= DAY_MINUTES and start != end):
                raise ValueError(f"bad window {start}-{end}")
        zoneinfo.ZoneInfo(self.timezone)  # raises for an unknown zone

    @classmethod
    def parse(cls, windows: Iterable[str], timezone: str) -> Schedule:
        """From "HH:MM-HH:MM" texts (checked by meshvpn.config)."""
        out = []
        for text in windows:
            a, b = text.split("-")
            out.append((_minutes(a), _minutes(b)))
        return cls(tuple(out), timezone)

    def local_minute(self, now_ms: int) -> int:
        local = dt.datetime.fromtimestamp(now_ms / 1000, zoneinfo.ZoneInfo(self.timezone))
        return local.hour * 60 + local.minute

    def is_open(self, now_ms: int) -> bool:
        minute = self.local_minute(now_ms)
        return any(
            start <= minute < end if start < end else (minute >= start or minute < end)
            for start, end in self.windows
        )

    def describe(self) -> str:
        spans = ", ".join(f"{_hhmm(a)}-{_hhmm(b)}" for a, b in self.windows)
        return f"{spans} {self.timezone}"


def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


@dataclass(frozen=True)
class OperatorSettings:
    price_per_gib: int = 1_000_000
    exit: bool = True
    max_sessions: int = 100
    bandwidth_kbit: int | None = None  # None: no cap
    monthly_cap_bytes: int | None = None  # None: no cap
    schedule: Schedule | None = None  # None: always
    timezone: str = "UTC"  # where months begin
    exit_policy: ExitPolicy = DEFAULT_EXIT_POLICY

    def __post_init__(self) -> None:
        if self.price_per_gib < 0 or self.max_sessions < 0:
            raise ValueError("price and max sessions are not negative")
        if self.bandwidth_kbit is not None and self.bandwidth_kbit < 8:
            raise ValueError("a bandwidth cap below 8 kbit/s cannot carry a packet")
        if self.monthly_cap_bytes is not None and self.monthly_cap_bytes <= 0:
            raise ValueError("a monthly cap is positive")
        zoneinfo.ZoneInfo(self.timezone)

    def changes(self, new: OperatorSettings) -> list[str]:
        """Names of the settings that differ, for the reload's answer and log."""
        return [
            name for name in self.__dataclass_fields__ if getattr(self, name) != getattr(new, name)
        ]

    def to_json(self) -> dict[str, object]:
        return {
            "price_per_gib": self.price_per_gib,
            "exit": self.exit,
            "max_sessions": self.max_sessions,
            "bandwidth_kbit": self.bandwidth_kbit,
            "monthly_cap_bytes": self.monthly_cap_bytes,
            "hours": self.schedule.describe() if self.schedule else None,
            "timezone": self.timezone,
        }


def settings_from(values: Mapping[str, Any]) -> OperatorSettings:
    """From config values by dotted key (``meshvpn.config``, flags merged in)."""
    mbit = values.get("sharing.bandwidth_mbit")
    cap_gib = values.get("sharing.monthly_cap_gib")
    hours = values.get("sharing.hours") or []
    timezone = values.get("sharing.timezone") or "UTC"
    return OperatorSettings(
        price_per_gib=int(values.get("sharing.price_per_gib", 1_000_000)),
        exit=bool(values.get("sharing.exit", True)),
        max_sessions=int(values.get("sharing.max_sessions", 100)),
        bandwidth_kbit=None if mbit is None else max(8, round(float(mbit) * 1000)),
        monthly_cap_bytes=None if cap_gib is None else max(1, round(float(cap_gib) * GIB)),
        schedule=Schedule.parse(hours, timezone) if hours else None,
        timezone=timezone,
        exit_policy=ExitPolicy.from_flags(
            allow=values.get("sharing.allow_networks", ()),
            deny=values.get("sharing.protected_networks", ()),
            block_ports=["none", *values.get("sharing.blocked_ports", ["tcp/25"])],
            dns=values.get("sharing.dns"),
        ),
    )


def month_of(now_ms: int, timezone: str) -> str:
    local = dt.datetime.fromtimestamp(now_ms / 1000, zoneinfo.ZoneInfo(timezone))
    return f"{local.year:04d}-{local.month:02d}"


def day_of(now_ms: int, timezone: str) -> str:
    local = dt.datetime.fromtimestamp(now_ms / 1000, zoneinfo.ZoneInfo(timezone))
    return f"{local.year:04d}-{local.month:02d}-{local.day:02d}"


@dataclass
class UsageMeter:
    """Bytes relayed this month, summed from per-peer counters that only grow.

    ``observe`` takes (received, sent) per WireGuard peer: what clients sent up
    and what they got down. A counter that went down belongs to a peer that was
    removed and added again (or a device that was recreated): it counts from
    zero again. ``up``/``down`` keep counting across months (for metrics).
    ``day_bytes`` is today's share of it (days in the same time zone).
    """

    month: str = ""
    used_bytes: int = 0
    day: str = ""
    day_bytes: int = 0
    up: int = 0
    down: int = 0
    last: dict[str, tuple[int, int]] = field(default_factory=dict)  # by WireGuard key

    def observe(self, now_ms: int, timezone: str, counters: Mapping[str, tuple[int, int]]) -> int:
        """Account the counters; return the bytes added."""
        month = month_of(now_ms, timezone)
        if month != self.month:
            self.month, self.used_bytes = month, 0
        day = day_of(now_ms, timezone)
        if day != self.day:
            self.day, self.day_bytes = day, 0
        added_up = added_down = 0
        for key, (rx, tx) in counters.items():
            last_rx, last_tx = self.last.get(key, (0, 0))
            added_up += rx - last_rx if rx >= last_rx else rx
            added_down += tx - last_tx if tx >= last_tx else tx
        self.last = dict(counters)
        self.up += added_up
        self.down += added_down
        self.used_bytes += added_up + added_down
        self.day_bytes += added_up + added_down
        return added_up + added_down


@dataclass(frozen=True)
class Gate:
    open: bool
    reason: str = ""  # why it is closed


def gate(settings: OperatorSettings, now_ms: int, used_bytes: int) -> Gate:
    cap = settings.monthly_cap_bytes
    if cap is not None and used_bytes >= cap:
        return Gate(
            open=False,
            reason=f"monthly data cap of {fmt_bytes(cap)} reached; try another relay",
        )
    if settings.schedule is not None and not settings.schedule.is_open(now_ms):
        return Gate(
            open=False,
            reason=f"outside sharing hours ({settings.schedule.describe()}); try another relay",
        )
    return Gate(open=True)


def admission(the_gate: Gate, in_use: int, max_sessions: int, *, renewal: bool) -> str | None:
    """Why a session request must be refused "full", or None to go on."""
    if not the_gate.open:
        return the_gate.reason
    if not renewal and in_use >= max_sessions:
        return (
            f"relay is full: {in_use} of {max_sessions} sessions in use"
            " (the owner's max_sessions); try another relay"
        )
    return None


def announced_capacity(settings: OperatorSettings, the_gate: Gate) -> int:
    return settings.max_sessions if the_gate.open else 0


def sessions_to_end(
    settings: OperatorSettings, the_gate: Gate, granted_ms: Mapping[S, int]
) -> list[S]:
    """Which running sessions no longer fit: all when closed, else the newest beyond max."""
    if not the_gate.open:
        return list(granted_ms)
    by_age = sorted(granted_ms, key=lambda s: granted_ms[s])
    return by_age[settings.max_sessions :]


def fmt_bytes(n: int) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.1f} MiB"


# ---- shaping


def ifb_name(wg_ifname: str) -> str:
    """The ifb device that carries the clients' uploads: ``<wg>-up``, within 15 bytes."""
    return f"{wg_ifname[:12]}-up"


def shaping_batch(wg_ifname: str, kbit: int, *, create: bool) -> str:
    """``tc -batch`` text that shapes both directions of ``wg_ifname`` to ``kbit``.

    ``create`` sets up the qdiscs and the redirect (the ifb device exists and
    is up by then); without it only the rates change, so queued packets and
    the redirect stay as they are.
    """
    ifb = ifb_name(wg_ifname)
    rate = f"rate {kbit}kbit ceil {kbit}kbit quantum {HTB_QUANTUM}"
    lines = []
    if create:
        lines += [
            f"qdisc replace dev {wg_ifname} root handle 1: htb default 10",
            f"qdisc replace dev {ifb} root handle 1: htb default 10",
        ]
    lines += [
        f"class replace dev {wg_ifname} parent 1: classid 1:10 htb {rate}",
        f"class replace dev {ifb} parent 1: classid 1:10 htb {rate}",
    ]
    if create:
        # A byte fifo of QUEUE_S at the cap under each class: the ifb device's default
        # leaf (a 32-packet fifo) drops too early and TCP stays well under the cap.
        # bfifo, not fq_codel: every kernel has it (this lab's has no fq_codel).
        limit = max(MIN_QUEUE_BYTES, kbit * 1000 // 8 * QUEUE_MS // 1000)
        lines += [
            f"qdisc replace dev {dev} parent 1:10 handle 10: bfifo limit {limit}"
            for dev in (wg_ifname, ifb)
        ]
        lines += [
            f"qdisc replace dev {wg_ifname} handle ffff: ingress",
            (
                f"filter add dev {wg_ifname} parent ffff: protocol all prio 1"
                f" u32 match u32 0 0 action mirred egress redirect dev {ifb}"
            ),
        ]
    return "\n".join(lines) + "\n"


def unshaping_batch(wg_ifname: str) -> str:
    """Remove the qdiscs from the WireGuard interface (the ifb device is deleted apart)."""
    return f"qdisc del dev {wg_ifname} root\nqdisc del dev {wg_ifname} ingress\n"
