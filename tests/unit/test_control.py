"""The control socket's permissions: a ``meshvpn`` group reads, only root changes.

A real socket and a real unprivileged process (uid/gid ``nobody``/``nogroup``
standing in for a member of the group), so the kernel's own checks decide.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest

from meshvpn.control import SOCKET_NAME, ControlServer

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


class Nobody:
    """A forked child that drops to nobody:nogroup (plus ``groups``) and asks the
    socket when told to. Forked before any event loop or thread exists."""

    def __init__(self, path: Path, ops: list[str], groups: list[int]) -> None:
        self.go_r, self.go_w = os.pipe()
        self.out_r, out_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            code = 0
            try:
                os.close(self.go_w)
                os.close(self.out_r)
                os.read(self.go_r, 1)
                uid, gid = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
                os.setgroups(groups)
                os.setgid(gid)
                os.setuid(uid)
                answers = [self._ask(path, op) for op in ops]
                os.write(out_w, json.dumps(answers).encode())
            except BaseException:  # noqa: BLE001 - the parent sees no answer and fails
                code = 1
            finally:
                os._exit(code)
        os.close(self.go_r)
        os.close(out_w)

    @staticmethod
    def _ask(path: Path, op: str) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(str(path))
            except OSError as exc:
                return {"connect_error": type(exc).__name__}
            sock.sendall(json.dumps({"op": op}).encode() + b"\n")
            return dict(json.loads(sock.makefile().readline()))

    async def answers(self) -> list[Any]:
        os.write(self.go_w, b"g")
        os.close(self.go_w)
        chunks = []
        while chunk := await asyncio.to_thread(os.read, self.out_r, 65536):
            chunks.append(chunk)
        os.close(self.out_r)
        await asyncio.to_thread(os.waitpid, self.pid, 0)
        return list(json.loads(b"".join(chunks)))


async def _ok(_req: dict[str, Any]) -> dict[str, Any]:
    return {"seen": True}


def _serve(state: Path, group: str, asker: Nobody) -> tuple[list[Any], dict[str, int]]:
    seen: dict[str, int] = {}

    async def main() -> list[Any]:
        server = ControlServer(state, {"status": _ok, "stop": _ok}, group=group)
        await server.start()
        sock = state / SOCKET_NAME
        for name, path in (("sock", sock), ("dir", state)):
            st = path.stat()
            seen[name], seen[f"{name}_gid"] = stat.S_IMODE(st.st_mode), st.st_gid
        try:
            return await asker.answers()
        finally:
            await server.close()

    return asyncio.run(main()), seen


def test_group_members_read_but_do_not_steer() -> None:
    gid = grp.getgrnam("nogroup").gr_gid
    state = Path(tempfile.mkdtemp(prefix="meshvpn-ctl-"))  # under /tmp: others may reach it
    try:
        asker = Nobody(state / SOCKET_NAME, ["status", "stop"], [gid])
        (status, stop), seen = _serve(state, "nogroup", asker)
    finally:
        state.rmdir()
    assert seen == {"sock": 0o660, "sock_gid": gid, "dir": 0o710, "dir_gid": gid}
    assert status == {"ok": True, "seen": True}
    assert stop["ok"] is False
    assert "only root may ask the agent to stop" in stop["error"]


def test_without_the_group_others_cannot_connect() -> None:
    state = Path(tempfile.mkdtemp(prefix="meshvpn-ctl-"))
    try:
        asker = Nobody(state / SOCKET_NAME, ["status"], [])
        answers, seen = _serve(state, "no-such-group-meshvpn-test", asker)
    finally:
        state.rmdir()
    assert seen["dir"] == 0o700
    assert answers == [{"connect_error": "PermissionError"}]
