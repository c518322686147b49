"""``meshvpn dashboard``: the agent's state, live in the terminal.

Theory of operation
-------------------
Twice a second the loop (``run``) reads the agent's two data sources,
``views.read_status`` and, on a relay, ``views.read_earnings``: the same
functions behind ``meshvpn status --json`` and ``meshvpn earnings --json``,
so every figure on screen is one of theirs. It hands them to ``render``,
which is pure (data, the time and the terminal's size in; a rich renderable
out) and tested on its own, and shows the result with rich's ``Live`` on the
alternate screen, which gives the terminal back as it was on the way out.

Ctrl-C ends it with exit code 0. When the agent goes away (its socket is
gone or refuses), it ends with one line saying so and exit code 1.

Layout: one column of sections, each as tall as it must be; sections that
list things (sessions, mesh neighbours) get the rows left over, so 80x24
shows everything with a few rows each, and a larger terminal shows more.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from meshvpn.errors import LocalError, NoAgentError
from meshvpn.views import (
    fmt_bytes,
    fmt_duration,
    fmt_ms,
    fmt_rate,
    fmt_share,
    fmt_units,
    read_earnings,
    read_status,
    sessions_of,
    short_id,
)

REFRESH_S: Final = 0.5
SPARK: Final = "▁▂▃▄▅▆▇█"
BARS: Final = " ▁▂▃▄▅▆▇█"
CHART_ROWS: Final = 4  # the per-epoch chart sits beside the earnings table, as tall as it
CHART_EPOCHS: Final = 12
MIN_LIST_ROWS: Final = 1

# ---- small pure pieces


def sparkline(values: Sequence[int], width: int) -> str:
    """The last ``width`` values as block characters, scaled to their maximum."""
    shown = list(values)[-width:] if width > 0 else []
    top = max(shown, default=0)
    if top <= 0:
        return SPARK[0] * len(shown)
    return "".join(SPARK[min(len(SPARK) - 1, v * (len(SPARK) - 1) // top)] for v in shown)


def bar_chart(values: Sequence[int], rows: int) -> list[str]:
    """A column chart, one character per value, ``rows`` tall (top row first)."""
    top = max(values, default=0)
    steps = rows * (len(BARS) - 1)
    heights = [0 if top <= 0 else max(1 if v > 0 else 0, v * steps // top) for v in values]
    lines = []
    for row in range(rows - 1, -1, -1):
        base = row * (len(BARS) - 1)
        lines.append("".join(BARS[max(0, min(len(BARS) - 1, h - base))] for h in heights))
    return lines


def earnings_rows(report: dict[str, Any]) -> dict[str, dict[str, int | None]]:
    """This epoch so far, the closed epochs in the report, and their total."""
    pending = report["pending"]
    epochs = report.get("epochs") or []
    now: dict[str, int | None] = {
        "gross": int(pending["gross"]),
        "fee": int(pending["fee"]),
        "emission": None,
        "net": int(pending["net"]),
    }
    closed = {k: sum(int(e[k]) for e in epochs) for k in ("gross", "fee", "emission", "net")}
    total: dict[str, int | None] = {
        "gross": int(pending["gross"]) + closed["gross"],
        "fee": int(pending["fee"]) + closed["fee"],
        "emission": closed["emission"],
        "net": int(pending["net"]) + closed["net"],
    }
    return {"now": now, "closed": dict(closed), "total": total}


def _section(title: str) -> Rule:
    return Rule(Text(title, style="bold"), align="left", style="dim", characters="─")


def _yes(ok: bool) -> Text:
    return Text("✓", style="green") if ok else Text("✗", style="bold red")


# ---- the relay


def _relay_header(status: dict[str, Any], now_ms: int) -> list[RenderableType]:
    roles = " ".join(status.get("roles") or ["entry"])
    line1 = Text.assemble(
        ("relay ", "bold"),
        (str(status.get("node_id")), "bold cyan"),
        f" · {roles} · up {fmt_duration(status.get('uptime_s'))}",
    )
    broker = status.get("broker") or {}
    acct = status.get("accounting") or {}
    state = acct.get("state") or "-"
    line2 = Text.assemble(
        "broker ",
        _yes(bool(broker.get("connected"))),
        f" {broker.get('address') or 'none'} · accounting ",
        _yes(state == "ok"),
        f" {state}",
    )
    next_close = acct.get("next_close_ms")
    if next_close is not None:
        line2.append(f" · epoch closes in {fmt_duration((next_close - now_ms) / 1000)}")
    if not acct.get("pinned") and acct.get("accounting_node_id"):
        line2.append(" · key unpinned", style="yellow")
    return [line1, line2]


def _earnings(report: dict[str, Any] | str | None) -> list[RenderableType]:
    out: list[RenderableType] = [_section("earnings (token units)")]
    if not isinstance(report, dict):
        out.append(Text(f"no earnings report: {report or 'none yet'}", style="yellow"))
        return out
    rows = earnings_rows(report)
    epoch = report["pending"]["epoch"]
    table = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False)
    table.add_column("", no_wrap=True)
    for name in ("gross", "fees", "emission", "net"):
        table.add_column(name, justify="right", no_wrap=True)
    labels = {
        "now": f"epoch {epoch} so far",
        "closed": f"closed ({len(report.get('epochs') or [])})",
        "total": "total",
    }
    for key, label in labels.items():
        r = rows[key]
        table.add_row(
            label,
            fmt_units(r["gross"]),
            fmt_units(r["fee"]),
            fmt_units(r["emission"]),
            Text(fmt_units(r["net"]), style="bold" if key == "total" else ""),
        )
    nets = [int(e["net"]) for e in (report.get("epochs") or [])][-(CHART_EPOCHS - 1) :]
    chart = Text("\n".join(bar_chart([*nets, int(rows["now"]["net"] or 0)], CHART_ROWS)))
    chart.stylize("green")
    grid = Table.grid(padding=(0, 2))
    grid.add_column()
    grid.add_column(no_wrap=True)
    grid.add_row(table, chart)
    out.append(grid)
    claim = report.get("claim") or {}
    out.append(
        Text(
            f"pending {fmt_units(rows['now']['net'])} · closed {fmt_units(rows['closed']['net'])}"
            f" · claimable {fmt_units(claim.get('cumulative', 0))}"
            f" · balance {fmt_units(report.get('balance'))}",
            no_wrap=True,
            overflow="ellipsis",
        )
    )
    return out


def _traffic(status: dict[str, Any], width: int) -> list[RenderableType]:
    t = status.get("throughput") or {}
    history = t.get("history") or []
    sharing = status.get("sharing") or {}
    cap = sharing.get("monthly_cap_bytes")
    used = int(sharing.get("used_bytes") or 0)
    right = [
        f"today {fmt_bytes(sharing.get('day_bytes'))}",
        f"month {fmt_bytes(used)}" + (f" of {fmt_bytes(cap)} cap" if cap else " (no cap)"),
    ]
    if cap:
        filled = min(10, used * 10 // cap)
        right[1] += " " + "█" * filled + "░" * (10 - filled)
    if not sharing.get("open", True):
        right[0] += f" · stopped: {sharing.get('reason')}"
    spark_width = max(8, width - 16 - max(len(r) for r in right) - 4)
    minutes = len(history) * float(t.get("bucket_s") or 5) / 60
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True, overflow="ellipsis")
    grid.add_row(
        f"↑ {fmt_rate(t.get('up_bps')):>13}",
        Text(sparkline([h[0] for h in history], spark_width), style="cyan"),
        right[0],
    )
    grid.add_row(
        f"↓ {fmt_rate(t.get('down_bps')):>13}",
        Text(sparkline([h[1] for h in history], spark_width), style="magenta"),
        right[1],
    )
    return [_section(f"traffic (last {minutes:.0f} min) and data shared"), grid]


def _sessions(status: dict[str, Any], rows: int) -> list[RenderableType]:
    sessions = sessions_of(status)
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False)
    for name, justify in (
        ("client", "left"), ("role", "left"), ("time", "right"), ("bytes", "right"),
        ("receipted", "right"), ("revenue", "right"),
    ):  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    shown = sessions if len(sessions) <= rows else sessions[: max(0, rows - 1)]
    for s in shown:
        table.add_row(
            short_id(s["client"]),
            s["role"] or "-",
            fmt_duration(s["duration_s"]),
            fmt_bytes(s["bytes"]),
            fmt_share(s["receipted_share"]),
            fmt_units(s["revenue"]),
        )
    if len(shown) < len(sessions):
        table.add_row(f"+{len(sessions) - len(shown)} more", "", "", "", "", "")
    out: list[RenderableType] = [_section(f"sessions ({len(sessions)})")]
    out.append(table if sessions else Text("no client sessions", style="dim"))
    return out


def _mesh(status: dict[str, Any], rows: int) -> list[RenderableType]:
    mesh = status.get("mesh")
    if mesh is None:
        return [_section("mesh"), Text("not in a mesh (start with --mesh)", style="dim")]
    links = mesh.get("links") or []
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, show_edge=False)
    for name, justify in (
        ("neighbour", "left"), ("link", "left"), ("rtt", "right"), ("rx", "right"),
        ("tx", "right"),
    ):  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    shown = links if len(links) <= rows else links[: max(0, rows - 1)]
    for link in shown:
        state = link.get("state") or "-"
        table.add_row(
            short_id(link.get("node_id")),
            Text(state, style="green" if state == "up" else "yellow"),
            fmt_ms(link.get("rtt_ms")),
            fmt_bytes(link.get("rx_bytes")),
            fmt_bytes(link.get("tx_bytes")),
        )
    if len(shown) < len(links):
        table.add_row(f"+{len(links) - len(shown)} more", "", "", "", "")
    routes = len(mesh.get("routes") or {})
    title = f"mesh neighbours ({len(links)}; routes to {routes} relays)"
    return [_section(title), table if links else Text("no links yet", style="dim")]


def alerts_of(status: dict[str, Any]) -> dict[str, int]:
    receipts = status.get("receipts") or {}
    counters = status.get("counters") or {}
    rejected = sum(v for k, v in counters.items() if k.startswith("rejected:"))
    rejected += sum(v for k, v in receipts.items() if k.startswith("receipt-rejected:"))
    credit = status.get("credit") or {}
    rejected += sum(v for k, v in credit.items() if k.startswith("notice-dropped:"))
    feed = (status.get("accounting") or {}).get("counters") or {}
    rejected += sum(v for k, v in feed.items() if k.startswith("dropped:"))
    return {
        "cut_offs": len(receipts.get("cut_offs") or []),
        "pending_delivery": int(receipts.get("pending_delivery") or 0),
        "rejected": rejected,
    }


def _alerts(status: dict[str, Any]) -> RenderableType:
    a = alerts_of(status)
    text = Text("alerts: ", style="bold")
    parts = [
        ("cut-offs", a["cut_offs"]),
        ("receipts pending delivery", a["pending_delivery"]),
        ("rejected messages", a["rejected"]),
    ]
    for i, (name, n) in enumerate(parts):
        text.append(("" if i == 0 else " · ") + f"{name} {n}", style="bold red" if n else "")
    cut_offs = (status.get("receipts") or {}).get("cut_offs") or []
    if cut_offs:
        text.append(f" · last: {cut_offs[-1].get('reason')}", style="red")
    text.no_wrap, text.overflow = True, "ellipsis"
    return text


def render_relay(
    status: dict[str, Any],
    earnings: dict[str, Any] | str | None,
    now_ms: int,
    width: int,
    height: int,
) -> RenderableType:
    top = [*_relay_header(status, now_ms), *_earnings(earnings), *_traffic(status, width)]
    fixed = sum(_height(r, width) for r in top) + 1  # + the alerts line
    # each list: a rule, a header and its separator line, then rows
    left = max(2 * MIN_LIST_ROWS, height - fixed - 2 * 3)
    links = len((status.get("mesh") or {}).get("links") or [])
    mesh_rows = max(MIN_LIST_ROWS, min(links, left // 2))
    session_rows = max(MIN_LIST_ROWS, left - mesh_rows)
    body = [
        *top,
        *_sessions(status, session_rows),
        *_mesh(status, mesh_rows),
        _alerts(status),
    ]
    return Group(*body)


def _height(renderable: RenderableType, width: int) -> int:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    return len(console.render_lines(renderable, console.options.update(width=width), pad=False))


# ---- the client


def render_client(status: dict[str, Any], now_ms: int, width: int, _height: int) -> RenderableType:
    del now_ms
    broker = status.get("broker") or {}
    lines: list[RenderableType] = [
        Text.assemble(
            ("client ", "bold"),
            (str(status.get("node_id")), "bold cyan"),
            f" · up {fmt_duration(status.get('uptime_s'))} · tunnel {status.get('address')}",
        ),
        Text.assemble(
            "broker ",
            _yes(bool(broker.get("connected"))),
            f" {broker.get('address') or 'none'} · lockdown ",
            _yes(bool(status.get("lockdown"))),
        ),
        _section("path"),
    ]
    relay = status.get("relay") or {}
    path = status.get("path")
    table = Table(box=None, padding=(0, 1), pad_edge=False, show_header=False)
    for _ in range(3):
        table.add_column(no_wrap=True)
    if path:
        entry_rtt = path.get("entry_echo_rtt_ms") or path.get("entry_rtt_ms")
        table.add_row("entry", str(path.get("entry")), f"rtt {fmt_ms(entry_rtt)}")
        table.add_row("exit", str(path.get("exit")), f"rtt {fmt_ms(path.get('exit_rtt_ms'))}")
        if path.get("standby_entry") or path.get("standby_exit"):
            table.add_row(
                "standby",
                f"entry {short_id(path.get('standby_entry'))}"
                f" exit {short_id(path.get('standby_exit'))}",
                "",
            )
    else:
        table.add_row("entry+exit", str(relay.get("node_id") or relay.get("endpoint")),
                      f"rtt {fmt_ms(relay.get('rtt_ms'))}")  # fmt: skip
    lines.append(table)
    t = status.get("throughput") or {}
    history = t.get("history") or []
    spark_width = max(8, width - 20)
    lines += [
        _section("traffic"),
        Text.assemble(
            f"↑ {fmt_rate(t.get('up_bps')):>13} ",
            (sparkline([h[0] for h in history], spark_width), "cyan"),
        ),
        Text.assemble(
            f"↓ {fmt_rate(t.get('down_bps')):>13} ",
            (sparkline([h[1] for h in history], spark_width), "magenta"),
        ),
        _section("usage"),
    ]
    session = status.get("session") or {}
    credit = status.get("credit")
    cost = (path or {}).get("cost", session.get("cost"))
    lines.append(
        Text(
            f"bytes used {fmt_bytes(session.get('bytes_used'))}"
            f" · receipted {fmt_bytes(session.get('bytes_receipted'))}"
            f" · price {fmt_units(session.get('price_per_gib'))}/GiB",
            no_wrap=True,
            overflow="ellipsis",
        )
    )
    credit_text = (
        "credit left: no word from the accounting service"
        if credit is None
        else f"credit left {fmt_units(credit.get('credit'))} ({credit.get('status')})"
    )
    lines.append(Text(f"cost so far {fmt_units(cost)} · {credit_text}", no_wrap=True))
    return Group(*lines)


def render(
    status: dict[str, Any],
    earnings: dict[str, Any] | str | None,
    now_ms: int,
    width: int,
    height: int,
) -> RenderableType:
    """The whole screen for one moment: pure."""
    if status.get("role") == "relay":
        return render_relay(status, earnings, now_ms, width, height)
    return render_client(status, now_ms, width, height)


# ---- the loop


def _earnings_or_why(state_dir: Path) -> dict[str, Any] | str:
    try:
        return read_earnings(state_dir)[0]
    except NoAgentError:
        raise
    except LocalError as exc:
        return exc.what


def run(state_dir: Path, refresh_s: float = REFRESH_S) -> int:
    status = read_status(state_dir)  # no agent: one line and exit 1, from the CLI
    pid = status.get("pid")
    console = Console()
    try:
        with Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False) as live:
            while True:
                started = time.monotonic()
                try:
                    status = read_status(state_dir)
                    earnings = (
                        _earnings_or_why(state_dir) if status.get("role") == "relay" else None
                    )
                except NoAgentError:
                    break
                except LocalError as exc:  # alive but slow: say so, keep trying
                    live.update(Text(f"the agent does not answer: {exc.what}"), refresh=True)
                    time.sleep(refresh_s)
                    continue
                width, height = console.size
                live.update(
                    render(status, earnings, int(time.time() * 1000), width, height), refresh=True
                )
                time.sleep(max(0.0, refresh_s - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0
    raise NoAgentError(
        f"the {status.get('role', 'agent')} agent (pid {pid}) at {state_dir} went away;"
        " dashboard closed",
        "start the agent again, then `meshvpn dashboard`",
    )
