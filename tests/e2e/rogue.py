"""Misbehaving agents built on the real protocol code, for the receipt tests.

    python rogue.py client MODE <meshvpn connect args...>   MODE: never-sign | under-sign | replay
    python rogue.py relay inflate <meshvpn relay args...>

Each runs the real agent in the foreground with one behaviour changed.
"""

from __future__ import annotations

import sys
from typing import Any

from accounting.exchange import Counters, Statement
from meshvpn.cli import main as main_cli
from meshvpn.client import _Duty
from relay.metering import ReceiptDesk

MIB = 1 << 20


class RogueDuty(_Duty):
    """The client's receipt duty (one per paid session), with one behaviour changed."""

    mode = ""
    first_wire = b""

    async def _on_channel(self, data: bytes, addr: tuple[str, int], transport: Any) -> None:
        if self.mode == "never-sign" and not data.startswith(b"MVK1"):
            return
        if self.mode == "under-sign" and data.startswith(b"MVS1"):
            s = Statement.decode(data)
            low = Counters(s.counters.up, s.counters.down // 2)  # far past any loss allowance
            data = Statement(s.session_id, s.seq, low, s.issued_ms).encode()
        if self.mode == "replay" and self.first_wire:
            transport.sendto(self.first_wire, addr)
            return
        await super()._on_channel(data, addr, transport)
        if self.mode == "replay" and self.session.signed_wire:
            self.first_wire = self.session.signed_wire


class InflatingDesk(ReceiptDesk):
    def _send(self, data: bytes, address: str) -> None:
        s = Statement.decode(data)
        more = Counters(s.counters.up, s.counters.down * 3 // 2 + 4 * MIB)
        super()._send(Statement(s.session_id, s.seq, more, s.issued_ms).encode(), address)


def main() -> int:
    """Swap one class in, then run the real CLI (same options, same lifecycle)."""
    role, mode, *argv = sys.argv[1:]
    if role == "client":
        import meshvpn.client  # noqa: PLC0415

        RogueDuty.mode = mode
        meshvpn.client._Duty = RogueDuty  # type: ignore[misc]
        return main_cli(["connect", "--foreground", *argv])
    import relay.agent  # noqa: PLC0415

    relay.agent.ReceiptDesk = InflatingDesk  # type: ignore[misc]
    return main_cli(["relay", *argv])


if __name__ == "__main__":
    sys.exit(main())
