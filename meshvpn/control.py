"""The agent's local control API: one JSON request per line on a Unix socket.

The CLI and the dashboard are its only clients. Requests are small
``{"op": ..., ...}`` objects; answers are ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``. The socket is 0660 so a ``meshvpn`` group
can read status without root.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from meshvpn.errors import LocalError, MeshvpnError

SOCKET_NAME: Final = "control.sock"
MAX_REQUEST: Final = 64 * 1024
MAX_UNIX_PATH: Final = 107  # sun_path is 108 bytes with the NUL

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
log = logging.getLogger("meshvpn.control")


class ControlServer:
    def __init__(self, state_dir: Path, handlers: dict[str, Handler]) -> None:
        self.path = state_dir / SOCKET_NAME
        self.handlers = handlers
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=MAX_REQUEST
        )
        self.path.chmod(0o660)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            answer = await self._answer(line)
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError) as exc:
            log.debug("control connection dropped: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            return {"ok": False, "error": "bad request: one JSON object per line"}
        handler = self.handlers.get(str(request.get("op")))
        if handler is None:
            known = sorted(self.handlers)
            return {"ok": False, "error": f"unknown op {request.get('op')!r}; known: {known}"}
        try:
            return {"ok": True, **await handler(request)}
        except MeshvpnError as exc:
            return {"ok": False, "error": exc.one_line().removeprefix("error: ")}


def call(state_dir: Path, op: str, timeout: float = 10.0, **params: Any) -> dict[str, Any]:  # noqa: ANN401
    """Ask the agent owning ``state_dir``; LocalError if none answers."""
    path = state_dir / SOCKET_NAME
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
        sock.sendall(json.dumps({"op": op, **params}).encode() + b"\n")
        with sock.makefile("rb") as fh:
            line = fh.readline(16 * 1024 * 1024)
    except (FileNotFoundError, ConnectionRefusedError):
        raise LocalError(
            f"no meshvpn agent is running with state dir {state_dir}",
            "start one with `meshvpn relay` or `meshvpn connect`",
        ) from None
    except OSError as exc:
        raise LocalError(f"the agent at {path} did not answer: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        answer: dict[str, Any] = json.loads(line)
    except ValueError:
        raise LocalError(f"the agent at {path} answered garbage") from None
    if not answer.get("ok"):
        raise LocalError(str(answer.get("error", "the agent refused")))
    return answer


def agent_answers(state_dir: Path) -> bool:
    try:
        call(state_dir, "ping", timeout=2.0)
    except LocalError:
        return False
    return True


def notify_systemd(state: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.sendto(state.encode(), addr)
