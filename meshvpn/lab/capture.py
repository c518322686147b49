"""Packet capture for leak tests: ``python -m meshvpn.lab.capture --iface IF --out FILE``.

Run inside a lab namespace (``Lab.capture`` does that). Sniffs every frame on
IF in both directions, prints ``ready`` on stdout once the socket is open (the
caller waits for that line before generating traffic), and on SIGTERM or SIGINT
stops and writes what it saw to FILE as pcap, then exits 0.
"""

from __future__ import annotations

import argparse
import select
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import FrameType

DLT_EN10MB = 1  # veths carry Ethernet frames
SO_RCVBUFFORCE = 33  # <asm-generic/socket.h>; like SO_RCVBUF, but root may exceed rmem_max
RCVBUF = 64 * 1024 * 1024
DRAIN_WAIT = 0.05  # seconds a queued frame may take to reach us after the stop signal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshvpn.lab.capture")
    parser.add_argument("--iface", required=True)
    parser.add_argument("--out", required=True, help="pcap file written on exit")
    parser.add_argument("--filter", default=None, help="BPF filter (compiled by tcpdump)")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # scapy is slow to import; install the handlers first so an early SIGTERM still exits 0.
    # The layers register Ethernet, so frames are decoded and written as such.
    import scapy.layers.inet  # noqa: PLC0415
    import scapy.layers.inet6  # noqa: F401, PLC0415
    from scapy.arch.linux import L2ListenSocket  # noqa: PLC0415
    from scapy.error import Scapy_Exception  # noqa: PLC0415
    from scapy.sendrecv import AsyncSniffer  # noqa: PLC0415
    from scapy.utils import wrpcap  # noqa: PLC0415

    try:
        sock = L2ListenSocket(iface=args.iface, filter=args.filter)
    except (OSError, Scapy_Exception) as e:
        print(f"capture on {args.iface} failed: {e}", file=sys.stderr)
        return 1
    # scapy asks for a 64 KiB buffer: one GRO'd veth frame. Decoding in Python is
    # slower than a veth, so give the kernel room to queue rather than drop.
    sock.ins.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)

    started = threading.Event()

    def on_started() -> None:
        started.set()
        print("ready", flush=True)

    sniffer = AsyncSniffer(opened_socket=sock, store=True, started_callback=on_started)
    sniffer.start()
    # Wait for the sniffer to run (stopping earlier would raise), or for it to die.
    while not started.wait(0.05):
        if sniffer.thread is None or not sniffer.thread.is_alive():
            print(f"capture on {args.iface} failed: {sniffer.exception}", file=sys.stderr)
            return 1
    try:
        stop.wait()
    finally:
        sniffer.stop(join=True)
        packets = list(sniffer.results or [])
        # The sniffer quits at once on stop; what the kernel still queues was
        # seen before we were asked to stop, and a leak test must see it too.
        while select.select([sock.ins], [], [], DRAIN_WAIT)[0]:
            pkt = sock.recv()
            if pkt is not None:
                packets.append(pkt)
        sock.close()
        wrpcap(args.out, packets, linktype=DLT_EN10MB)
    return 0


if __name__ == "__main__":
    sys.exit(main())
