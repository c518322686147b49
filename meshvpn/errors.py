"""Error families.

Two families under one base, as h11 does it:

- ``LocalError``: the user or the host is not set up right (bad flag, missing
  binary, unwritable state dir, corrupt key). The CLI prints ``error: <what>``
  and, where we know it, ``<what to do>`` on the same line, and exits non-zero.
- ``RemoteError``: a peer misbehaved or did not answer (relay silent, bad
  message). Inside the agent these are counted and logged, never raised out.

Messages never contain secret material: callers pass public data only.
"""

from __future__ import annotations


class MeshvpnError(Exception):
    """Base of every error meshvpn raises on purpose."""

    exit_code = 1

    def __init__(self, what: str, hint: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.hint = hint

    def one_line(self) -> str:
        line = f"error: {self.what}"
        if self.hint:
            line += f"; {self.hint}"
        return line.replace("\n", " ")


class LocalError(MeshvpnError):
    """We (or the host we run on) are at fault."""

    exit_code = 1


class ConfigError(LocalError):
    """Configuration or state directory is invalid."""

    exit_code = 3


class AlreadyRunningError(LocalError):
    """Another agent owns this state directory."""

    exit_code = 4


class NoAgentError(LocalError):
    """No agent listens on the state directory's control socket (none runs, or it died)."""

    exit_code = 1


class RemoteError(MeshvpnError):
    """A peer misbehaved or did not answer."""

    exit_code = 5
