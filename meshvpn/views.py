"""What the CLI and the dashboard show, from the agent's two data sources.

There are exactly two: ``read_status`` (what ``meshvpn status --json``
prints) and ``read_earnings`` (what ``meshvpn earnings --json`` prints on a
relay), both asked over the agent's control socket (meshvpn.control). The
dashboard renders from the very same two functions, so a figure on its
screen is a figure of those commands. Everything else here is pure: data
in, data or text out (``peers_of``, the formatters), and unit-tested.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from meshvpn.control import call

SHORT_ID: Final = 10  # "mvAbCdEfGh": enough to tell a handful of nodes apart


def read_status(state_dir: Path) -> dict[str, Any]:
    """The running agent's status (``meshvpn status --json``); LocalError if none answers."""
    answer = call(state_dir, "status")
    answer.pop("ok", None)
    answer["running"] = True
    return answer


def read_earnings(state_dir: Path) -> tuple[dict[str, Any], bytes]:
    """The relay's newest verified earnings report (``meshvpn earnings --json``) and its
    signed wire form (what ``meshvpn earnings verify`` checks); LocalError if none."""
    answer = call(state_dir, "earnings")
    return dict(answer["report"]), str(answer["wire"]).encode()


# ---- pure views


def short_id(node_id: str | None) -> str:
    return "-" if not node_id else node_id[:SHORT_ID]


def fmt_bytes(n: int | None) -> str:
    """Binary units, two decimals: what the dashboard and the CLI print for a byte count."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def fmt_rate(bytes_per_s: int | None) -> str:
    return "-" if bytes_per_s is None else f"{fmt_bytes(bytes_per_s)}/s"


def fmt_units(n: int | None) -> str:
    """Token units: exact integers, grouped by thousands (money is never rounded)."""
    return "-" if n is None else f"{n:,}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s >= 86_400:
        return f"{s // 86_400}d{s % 86_400 // 3600:02d}h"
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}:{s % 60:02d}"


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def receipted_share(receipts: dict[str, Any] | None) -> float | None:
    """How much of what the relay counted the client has signed for, 0..1."""
    if not receipts:
        return None
    counted = int(receipts.get("bytes_counted") or 0)
    if counted == 0:
        return None
    return min(1.0, int(receipts.get("bytes_receipted") or 0) / counted)


def fmt_share(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.0f}%"


def sessions_of(status: dict[str, Any]) -> list[dict[str, Any]]:
    """A relay's client sessions (peers with a session), as the dashboard lists them."""
    out = []
    for peer in status.get("peers") or []:
        if not peer.get("session_id"):
            continue
        receipts = peer.get("receipts") or {}
        out.append(
            {
                "client": peer.get("client_node_id"),
                "role": peer.get("role"),
                "duration_s": peer.get("duration_s"),
                "bytes": (peer.get("rx_bytes") or 0) + (peer.get("tx_bytes") or 0),
                "receipted_share": receipted_share(receipts),
                "revenue": receipts.get("revenue"),
                "address": peer.get("address"),
            }
        )
    return out


def peers_of(status: dict[str, Any]) -> dict[str, Any]:
    """``meshvpn peers``: a relay's mesh neighbours and client sessions; a client's path."""
    if status.get("role") == "relay":
        mesh = status.get("mesh") or {}
        return {
            "role": "relay",
            "node_id": status.get("node_id"),
            "neighbours": [
                {
                    "node_id": link.get("node_id"),
                    "interface": link.get("interface"),
                    "mesh_address": link.get("mesh_address"),
                    "state": link.get("state"),
                    "rtt_ms": link.get("rtt_ms"),
                    "rx_bytes": link.get("rx_bytes"),
                    "tx_bytes": link.get("tx_bytes"),
                }
                for link in mesh.get("links") or []
            ],
            "sessions": sessions_of(status),
        }
    path = status.get("path")
    relay = status.get("relay") or {}
    hops: list[dict[str, Any]]
    if path:
        hops = [
            {
                "role": "entry",
                "node_id": path.get("entry"),
                "rtt_ms": path.get("entry_echo_rtt_ms") or path.get("entry_rtt_ms"),
            },
            {"role": "exit", "node_id": path.get("exit"), "rtt_ms": path.get("exit_rtt_ms")},
        ]
    else:
        hops = [
            {"role": "entry+exit", "node_id": relay.get("node_id"), "rtt_ms": relay.get("rtt_ms")}
        ]
    return {
        "role": "client",
        "node_id": status.get("node_id"),
        "endpoint": relay.get("endpoint"),
        "path": hops,
        "standby_entry": (path or {}).get("standby_entry"),
        "standby_exit": (path or {}).get("standby_exit"),
    }


def peers_text(view: dict[str, Any]) -> list[str]:
    """``meshvpn peers`` without --json."""
    if view["role"] == "relay":
        lines = [f"mesh neighbours of {view['node_id']}:"]
        lines += [
            f"  {n['node_id']}  {n['interface'] or '-':<12} {n['state'] or '-':<8}"
            f" rtt {fmt_ms(n['rtt_ms']):>9}  rx {fmt_bytes(n['rx_bytes'])}"
            f"  tx {fmt_bytes(n['tx_bytes'])}"
            for n in view["neighbours"]
        ] or ["  none (not in a mesh, or no link yet)"]
        lines.append(f"client sessions ({len(view['sessions'])}):")
        lines += [
            f"  {short_id(s['client'])}  {s['role'] or '-':<5} {fmt_duration(s['duration_s']):>7}"
            f"  {fmt_bytes(s['bytes']):>11}  receipted {fmt_share(s['receipted_share']):>4}"
            f"  revenue {fmt_units(s['revenue'])}"
            for s in view["sessions"]
        ]
        return lines
    lines = [f"path of client {view['node_id']} (tunnel to {view['endpoint'] or '-'}):"]
    lines += [
        f"  {h['role']:<10} {h['node_id'] or '-'}  rtt {fmt_ms(h['rtt_ms'])}" for h in view["path"]
    ]
    if view["standby_entry"] or view["standby_exit"]:
        lines.append(
            f"  standby: entry {view['standby_entry'] or '-'}, exit {view['standby_exit'] or '-'}"
        )
    return lines
