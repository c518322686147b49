"""The agent's local control API: one JSON request per line on a Unix socket.

The CLI and the dashboard are its only clients. Requests are small
``{"op": ..., ...}`` objects; answers are ``{"ok": true, ...}`` or
``{"ok": false, "error": "..."}``.

Who may ask. The socket lives in the state directory. When a group named
``meshvpn`` exists, the agent hands it the socket (0660) and lets it traverse
the state directory (0710: no listing, and the keys stay 0600 root's), so a
user in that group runs ``meshvpn status``, ``peers``, ``earnings``, ``ping``
and ``dashboard`` without root. Connecting is all a Unix socket checks, so the
agent also asks the kernel who is on the other end (``SO_PEERCRED``): anyone
else than root or the agent's own user gets only the read ops (``READ_OPS``);
``stop``, ``admit``, ``release`` and ``reload`` stay root's.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Final

from meshvpn.errors import LocalError, MeshvpnError, NoAgentError

SOCKET_NAME: Final = "control.sock"
MAX_REQUEST: Final = 64 * 1024
MAX_UNIX_PATH: Final = 107  # sun_path is 108 bytes with the NUL
GROUP: Final = "meshvpn"
READ_OPS: Final = frozenset({"ping", "status", "earnings", "mesh_ping"})

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
log = logging.getLogger("meshvpn.control")


@contextlib.contextmanager
def reachable(path: Path) -> Iterator[str]:
    """``path`` as an AF_UNIX address. sun_path holds 107 bytes, and a state dir
    may well be deeper than that (a CI temp dir, a long --state-dir); then the
    socket is reached through an open descriptor of its directory,
    ``/proc/self/fd/N/control.sock``, which names the same directory entry."""
    if len(os.fsencode(path)) <= MAX_UNIX_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)  # no directory: FileNotFoundError
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class ControlServer:
    def __init__(self, state_dir: Path, handlers: dict[str, Handler], group: str = GROUP) -> None:
        self.path = state_dir / SOCKET_NAME
        self.handlers = handlers
        self.group = group
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        with reachable(self.path) as address:
            self._server = await asyncio.start_unix_server(
                self._serve, path=address, limit=MAX_REQUEST
            )
        self.path.chmod(0o660)
        share_with_group(self.path, self.group)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            answer = await self._answer(line, may_change=_peer_is_privileged(writer))
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError) as exc:
            log.debug("control connection dropped: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, line: bytes, *, may_change: bool = True) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        if not isinstance(request, dict):
            return {"ok": False, "error": "bad request: one JSON object per line"}
        op = str(request.get("op"))
        handler = self.handlers.get(op)
        if handler is None:
            known = sorted(self.handlers)
            return {"ok": False, "error": f"unknown op {request.get('op')!r}; known: {known}"}
        if not may_change and op not in READ_OPS:
            return {"ok": False, "error": f"only root may ask the agent to {op}; use sudo"}
        try:
            return {"ok": True, **await handler(request)}
        except MeshvpnError as exc:
            return {"ok": False, "error": exc.one_line().removeprefix("error: ")}


def share_with_group(path: Path, group: str = GROUP) -> int | None:
    """Give ``group`` (if it exists) the socket and a way to it: chgrp the socket
    and its directory, and let the group traverse (not list) the directory.
    Returns the group's gid, or None when there is no such group."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return None
    directory = path.parent
    try:
        os.chown(path, -1, gid)
        os.chown(directory, -1, gid)
        mode = stat.S_IMODE(directory.stat().st_mode)
        directory.chmod((mode & 0o700) | 0o010)
    except OSError as exc:
        log.warning(
            "cannot open the control socket to group %s: %s; only root can read the agent",
            group,
            exc.strerror or exc,
        )
        return None
    return gid


def _peer_is_privileged(writer: asyncio.StreamWriter) -> bool:
    """Root or the agent's own user: may use every op. Others only read."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in {0, os.geteuid()}


def call(state_dir: Path, op: str, timeout: float = 10.0, **params: Any) -> dict[str, Any]:  # noqa: ANN401
    """Ask the agent owning ``state_dir``; LocalError if none answers."""
    path = state_dir / SOCKET_NAME
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with reachable(path) as address:
            sock.connect(address)
        sock.sendall(json.dumps({"op": op, **params}).encode() + b"\n")
        with sock.makefile("rb") as fh:
            line = fh.readline(16 * 1024 * 1024)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NoAgentError(
            f"no meshvpn agent is running with state dir {state_dir}",
            "start one with `meshvpn relay` or `meshvpn connect`",
        ) from None
    except PermissionError:
        raise LocalError(
            f"not allowed to read the agent's socket {path}",
            f"run as root, or as a member of group {GROUP} (see README, Local control API)",
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
