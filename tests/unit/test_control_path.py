"""A control socket in a state directory deeper than an AF_UNIX address holds.

sun_path takes 107 bytes; CI's temporary directories plus a lab's node path
were 108, and the agent died binding its socket after the tunnel was up.
"""

from __future__ import annotations

import asyncio
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest

from meshvpn.control import MAX_UNIX_PATH, SOCKET_NAME, ControlServer, call
from meshvpn.errors import NoAgentError


def deep_dir(root: Path, length: int) -> Path:
    """A directory under ``root`` whose control socket path is ``length`` bytes."""
    need = length - len(str(root)) - len(SOCKET_NAME) - 2
    parts, left = [], need
    while left > 0:
        part = "d" * min(left, 60)
        parts.append(part)
        left -= len(part) + 1
    path = root.joinpath(*parts)
    path.mkdir(parents=True)
    return path


async def ask_in_thread(state_dir: Path) -> dict[str, Any]:
    return await asyncio.to_thread(call, state_dir, "ping")


@pytest.mark.parametrize("length", [MAX_UNIX_PATH, MAX_UNIX_PATH + 1, 200, 400])
def test_an_agent_answers_whatever_the_depth_of_its_state_dir(length: int) -> None:
    with tempfile.TemporaryDirectory(prefix="ctl") as tmp:
        state_dir = deep_dir(Path(tmp), length)
        socket_path = state_dir / SOCKET_NAME
        assert len(str(socket_path)) in (length, length + 1)

        async def pong(_req: dict[str, Any]) -> dict[str, Any]:
            return {"pong": True}

        async def run() -> dict[str, Any]:
            server = ControlServer(state_dir, {"ping": pong}, group="no-such-group-here")
            await server.start()
            try:
                # where the CLI looks for it: in the state dir itself
                assert stat.S_ISSOCK(socket_path.stat().st_mode)
                return await ask_in_thread(state_dir)
            finally:
                await server.close()

        assert asyncio.run(run()) == {"ok": True, "pong": True}
        assert not socket_path.exists()


def test_no_agent_behind_a_deep_state_dir_says_so() -> None:
    with tempfile.TemporaryDirectory(prefix="ctl") as tmp:
        state_dir = deep_dir(Path(tmp), 300)
        with pytest.raises(NoAgentError):
            call(state_dir, "ping")
        with pytest.raises(NoAgentError):
            call(state_dir / "not-made", "ping")
