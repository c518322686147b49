"""The dashboard's pure part: data from `status --json`/`earnings --json` in, screen out.

Renders fixed status and earnings data at 80x24 and larger, and checks that
every figure shown is the data's own (formatted by the same functions), that
nothing runs past the screen, and that lists give way when there is no room.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from rich.console import Console

from meshvpn.dashboard import alerts_of, bar_chart, earnings_rows, render, sparkline
from meshvpn.views import (
    fmt_bytes,
    fmt_duration,
    fmt_units,
    peers_of,
    peers_text,
    receipted_share,
    sessions_of,
)

NOW = 1_750_000_000_000
ME = "mvRELAYoneAAAAAAAAAAAAAAAAAA"
C1 = "mvCLIENToneBBBBBBBBBBBBBBBBB"
C2 = "mvCLIENTtwoCCCCCCCCCCCCCCCCC"
N2 = "mvRELAYtwoDDDDDDDDDDDDDDDDDD"
N5 = "mvRELAYfiveEEEEEEEEEEEEEEEEE"


def _peer(
    client: str, role: str, rx: int, tx: int, *, receipted: int, revenue: int
) -> dict[str, Any]:
    return {
        "wireguard_key": "k" * 44,
        "address": "100.64.0.2",
        "session_id": "ab" * 16,
        "client_id": "c" * 44,
        "client_node_id": client,
        "role": role,
        "granted_ms": NOW - 754_000,
        "duration_s": 754,
        "endpoint": "192.0.2.2:40000",
        "rx_bytes": rx,
        "tx_bytes": tx,
        "last_handshake": 0,
        "price_per_gib": 1_000_000,
        "receipts": {"bytes_counted": rx + tx, "bytes_receipted": receipted, "revenue": revenue},
    }


def relay_status() -> dict[str, Any]:
    return {
        "role": "relay",
        "running": True,
        "node_id": ME,
        "pid": 4242,
        "uptime_s": 3725.4,
        "roles": ["entry", "exit", "mesh"],
        "broker": {"address": "203.0.113.2:1883", "connected": True, "outages": 0},
        "accounting": {
            "state": "ok",
            "pinned": True,
            "accounting_node_id": "mvACCOUNT",
            "next_close_ms": NOW + 42_000,
            "counters": {"reports": 9},
        },
        "peers": [
            _peer(C1, "entry", 12_345_678, 987_654_321, receipted=990_000_000, revenue=921),
            _peer(C2, "exit", 5_000, 70_000_000, receipted=60_000_000, revenue=55),
        ],
        "mesh": {
            "links": [
                {
                    "node_id": N2,
                    "interface": "r1m0",
                    "state": "up",
                    "rtt_ms": 1.27,
                    "rx_bytes": 123_456_789,
                    "tx_bytes": 98_765_432,
                },
                {
                    "node_id": N5,
                    "interface": "r1m1",
                    "state": "up",
                    "rtt_ms": 0.81,
                    "rx_bytes": 4_567,
                    "tx_bytes": 8_901,
                },
            ],
            "routes": {"fd01::/64": {}, "fd02::/64": {}, "fd03::/64": {}, "fd04::/64": {}},
        },
        "throughput": {
            "up_bps": 131_072,
            "down_bps": 5_767_168,
            "bucket_s": 5.0,
            "history": [[i * 1000, i * 50_000] for i in range(60)],
        },
        "sharing": {
            "open": True,
            "day_bytes": 1_288_490_189,
            "used_bytes": 13_958_643_712,
            "monthly_cap_bytes": 536_870_912_000,
        },
        "receipts": {
            "pending_delivery": 2,
            "cut_offs": [{"reason": "no receipt for 30 s"}],
            "receipt-rejected:stale": 1,
        },
        "counters": {"rejected:bad-signature": 3, "announcements": 10},
    }


def earnings_report() -> dict[str, Any]:
    return {
        "node_id": ME,
        "balance": 3_456_789,
        "pending": {"epoch": 7, "start_ms": NOW - 18_000, "gross": 120_000, "fee": 12_000,
                    "net": 108_000, "paid_bytes": 1},
        "epochs": [
            {"epoch": e, "gross": 500_000 + e, "fee": 50_000, "emission": 40_000 + e,
             "net": 490_000 + 2 * e, "paid_bytes": 1, "cumulative": 0}
            for e in range(1, 7)
        ],
        "claim": {"epoch": 6, "cumulative": 3_348_789, "proof": [], "statement": ""},
    }  # fmt: skip


def screen(status: dict[str, Any], earnings: Any, width: int = 80, height: int = 24) -> list[str]:
    console = Console(width=width, height=height, record=True, color_system=None)
    console.print(render(status, earnings, NOW, width, height))
    lines = console.export_text().rstrip("\n").split("\n")
    for line in lines:
        assert console.measure(line).maximum <= width, line
    return lines


def line_with(lines: list[str], start: str) -> str:
    found = [x for x in lines if x.lstrip().startswith(start)]
    assert len(found) == 1, (start, lines)
    return found[0]


@pytest.mark.parametrize(("width", "height"), [(80, 24), (120, 40), (200, 60)])
def test_relay_screen_fits_and_shows_the_datas_own_figures(width: int, height: int) -> None:
    status, report = relay_status(), earnings_report()
    lines = screen(status, report, width, height)
    assert len(lines) <= height
    text = "\n".join(lines)
    assert ME in lines[0]
    assert "entry exit mesh" in lines[0]
    assert f"up {fmt_duration(3725.4)}" in lines[0]
    assert "broker ✓ 203.0.113.2:1883" in lines[1]
    assert "accounting ✓ ok" in lines[1]
    assert "epoch closes in 0:42" in lines[1]
    # earnings: this epoch so far, closed, total; each column the report's own
    assert line_with(lines, "epoch 7 so far").split()[4:8] == ["120,000", "12,000", "-", "108,000"]
    closed = [
        f"{sum(e[k] for e in report['epochs']):,}" for k in ("gross", "fee", "emission", "net")
    ]
    assert line_with(lines, "closed (6)").split()[2:6] == closed
    assert line_with(lines, "total").split()[1:5] == [
        f"{120_000 + 3_000_021:,}", f"{12_000 + 300_000:,}", closed[2], f"{108_000 + 2_940_042:,}"
    ]  # fmt: skip
    assert "pending 108,000 · closed 2,940,042 · claimable 3,348,789 · balance 3,456,789" in text
    # traffic and data shared against the cap
    assert "↑  128.00 KiB/s" in text
    assert "↓    5.50 MiB/s" in text
    assert f"today {fmt_bytes(1_288_490_189)}" in text
    assert f"month {fmt_bytes(13_958_643_712)} of {fmt_bytes(536_870_912_000)} cap" in text
    # sessions: short id, role, time, bytes, receipted share, revenue
    row = line_with(lines, C1[:10]).split()
    assert row[:3] == [C1[:10], "entry", fmt_duration(754)]
    assert " ".join(row[3:5]) == fmt_bytes(12_345_678 + 987_654_321)
    assert row[5:] == ["99%", "921"]
    assert line_with(lines, C2[:10]).split()[1] == "exit"
    # mesh neighbours: rtt, state, bytes
    row = line_with(lines, N2[:10]).split()
    assert row[1:4] == ["up", "1.3", "ms"]
    assert " ".join(row[4:6]) == fmt_bytes(123_456_789)
    assert "routes to 4 relays" in text
    # alerts
    assert line_with(lines, "alerts:").startswith(
        "alerts: cut-offs 1 · receipts pending delivery 2 · rejected messages 4"
    )


def test_lists_give_way_on_a_small_screen() -> None:
    status = relay_status()
    status["peers"] = [copy.deepcopy(status["peers"][0]) for _ in range(30)]
    lines = screen(status, earnings_report(), 80, 24)
    assert len(lines) <= 24
    assert any("more" in x and x.lstrip().startswith("+") for x in lines)
    assert "sessions (30)" in "\n".join(lines)
    big = screen(status, earnings_report(), 120, 60)
    assert sum(C1[:10] in x for x in big) > sum(C1[:10] in x for x in lines)


def test_relay_without_report_mesh_or_broker() -> None:
    status = relay_status()
    status["mesh"] = None
    status["broker"] = {"address": None, "connected": False}
    status["accounting"] = {"state": "no word yet", "counters": {}}
    lines = screen(status, "this relay has no earnings report (no broker)")
    text = "\n".join(lines)
    assert "broker ✗ none" in text
    assert "accounting ✗ no word yet" in text
    assert "no earnings report: this relay has no earnings report (no broker)" in text
    assert "not in a mesh" in text


def client_status(multihop: bool) -> dict[str, Any]:
    return {
        "role": "client",
        "node_id": C1,
        "uptime_s": 61,
        "address": "100.64.0.2/32",
        "broker": {"address": "203.0.113.2:1883", "connected": True},
        "lockdown": True,
        "relay": {"node_id": N2, "endpoint": "198.51.100.2:51820", "rtt_ms": 0.93},
        "session": {"bytes_used": 75_000_000, "bytes_receipted": 70_000_000, "cost": 65,
                    "price_per_gib": 1_000_000},
        "path": {"entry": N2, "entry_rtt_ms": 0.9, "entry_echo_rtt_ms": 1.44, "exit": N5,
                 "exit_rtt_ms": 3.21, "standby_entry": None, "standby_exit": None, "cost": 130}
        if multihop else None,
        "throughput": {"up_bps": 1024, "down_bps": 2_097_152, "bucket_s": 5.0,
                       "history": [[0, 0]] * 60},
        "credit": {"status": "ok", "credit": 999_999_870, "issued_ms": NOW},
    }  # fmt: skip


@pytest.mark.parametrize("multihop", [True, False])
def test_client_screen(multihop: bool) -> None:
    lines = screen(client_status(multihop), None)
    assert len(lines) <= 24
    text = "\n".join(lines)
    if multihop:
        assert line_with(lines, "entry").split()[1:] == [N2, "rtt", "1.4", "ms"]
        assert line_with(lines, "exit").split()[1:] == [N5, "rtt", "3.2", "ms"]
        assert "cost so far 130" in text  # both receipts: entry and exit
    else:
        assert line_with(lines, "entry+exit").split()[1:] == [N2, "rtt", "0.9", "ms"]
        assert "cost so far 65" in text
    assert f"bytes used {fmt_bytes(75_000_000)}" in text
    assert "credit left 999,999,870 (ok)" in text
    assert "↓    2.00 MiB/s" in text


def test_earnings_rows_add_up() -> None:
    rows = earnings_rows(earnings_report())
    for key in ("gross", "fee", "net"):
        assert rows["total"][key] == (rows["now"][key] or 0) + (rows["closed"][key] or 0)
    assert rows["now"]["emission"] is None


def test_sparkline_and_chart() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7], 8) == "▁▂▃▄▅▆▇█"
    assert sparkline([5, 5, 5], 2) == "██"
    assert sparkline([0, 0], 4) == "▁▁"
    assert bar_chart([0, 4, 8, 16], 2) == ["   █", " ▄██"]
    assert bar_chart([1, 1000], 1) == ["▁█"]  # a small non-zero value stays visible


def test_alerts_count_every_kind_of_rejection() -> None:
    assert alerts_of(relay_status()) == {"cut_offs": 1, "pending_delivery": 2, "rejected": 4}


def test_peers_view() -> None:
    status = relay_status()
    view = peers_of(status)
    assert [n["node_id"] for n in view["neighbours"]] == [N2, N5]
    assert [s["client"] for s in view["sessions"]] == [C1, C2]
    assert view["sessions"] == sessions_of(status)
    text = "\n".join(peers_text(view))
    assert N2 in text
    assert fmt_units(921) in text
    client = peers_of(client_status(multihop=True))
    assert [(h["role"], h["node_id"], h["rtt_ms"]) for h in client["path"]] == [
        ("entry", N2, 1.44),
        ("exit", N5, 3.21),
    ]
    assert "exit" in "\n".join(peers_text(client))
    assert receipted_share({"bytes_counted": 0}) is None
