"""The lab's web server: ``python -m meshvpn.lab.httpserver --bind ADDR --port N``.

Runs in the internet namespace. ``GET /ip`` answers the address the request
came from (so a test sees whose NAT it went through); ``GET /bytes/N`` streams
exactly N bytes of a fixed pattern (``bytes(range(256))`` repeated) so a test
can check both length and content. Anything else is 404.

Prints one ``listening on ADDR:PORT`` line on stdout once bound (the lab waits
for it), logs nothing per request, and exits 0 on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import socket
    from types import FrameType

CHUNK = 64 * 1024
MAX_BYTES = 2 * 1024**3
PATTERN_CHUNK = bytes(range(256)) * (CHUNK // 256)


def pattern(n: int) -> bytes:
    """The first ``n`` bytes ``/bytes/n`` sends (for checking a download)."""
    whole, rest = divmod(n, 256)
    return bytes(range(256)) * whole + bytes(range(rest))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "meshvpn-lab"
    sys_version = ""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base class signature
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/ip":
            self._send(HTTPStatus.OK, self.client_address[0].encode())
        elif path.startswith("/bytes/"):
            self._bytes(path.removeprefix("/bytes/"))
        else:
            self._send(HTTPStatus.NOT_FOUND, b"not found")

    def _send(self, status: HTTPStatus, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _bytes(self, arg: str) -> None:
        if not (arg.isascii() and arg.isdigit()) or int(arg) > MAX_BYTES:
            self._send(HTTPStatus.BAD_REQUEST, f"want /bytes/N with 0 <= N <= {MAX_BYTES}".encode())
            return
        n = int(arg)
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        try:
            while n > 0:
                # CHUNK is a multiple of 256, so every chunk starts the pattern afresh.
                piece = PATTERN_CHUNK if n >= CHUNK else PATTERN_CHUNK[:n]
                self.wfile.write(piece)
                n -= len(piece)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: tuple[str, int]
    ) -> None:
        # A client hanging up mid-response is routine in tests; stay quiet.
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshvpn.lab.httpserver")
    parser.add_argument("--bind", required=True, help="address to listen on")
    parser.add_argument("--port", type=int, default=80)
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server = Server((args.bind, args.port), Handler)
    serving = threading.Thread(target=server.serve_forever, name="serve", daemon=True)
    serving.start()
    print(f"listening on {args.bind}:{args.port}", flush=True)
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
