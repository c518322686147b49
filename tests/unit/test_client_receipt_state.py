"""The client's receipt state per role keeps the last few sessions: a relay renews
a session when the same key comes back, and states its counts since it began."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from accounting.exchange import Counters
from meshvpn.client import KEPT_SESSIONS, _Duty
from meshvpn.identity import PrivateKey


def chosen(session_id: bytes) -> Any:
    signer = PrivateKey(os.urandom(32)).ed25519_public()
    grant = SimpleNamespace(session_id=session_id, price_per_gib=1000)
    return SimpleNamespace(grant=grant, entry=SimpleNamespace(signer=signer))


def duty(tmp_path: Path, relay: Any) -> _Duty:
    identity = SimpleNamespace(identity_public=PrivateKey(bytes(32)).ed25519_public())
    agent = SimpleNamespace(identity=identity, opts=SimpleNamespace(state_dir=tmp_path))
    return _Duty(cast("Any", agent), "entry", relay, cast("Any", None), "x")


def test_a_renewed_session_goes_on_from_its_count_after_a_failover_and_a_reconnect(
    tmp_path: Path,
) -> None:
    """bench/mesh.py: the entry died, the client moved to its standby, reconnected
    later to the first entry (restarted), which renewed the old session and
    stated 85 MB; the client had kept only the standby's state, counted from
    zero and refused the statement as inflated."""
    first, standby = chosen(os.urandom(16)), chosen(os.urandom(16))
    d = duty(tmp_path, first)
    d.session.observe(Counters(2 * 10**6, 85 * 10**6))
    d.switch(standby)  # failover
    d.session.observe(Counters(10**6, 30 * 10**6))
    d._save()
    again = duty(tmp_path, first)  # disconnect, connect: the first entry renews
    assert again.session.counted == Counters(2 * 10**6, 85 * 10**6)
    again.switch(standby)
    assert again.session.counted == Counters(10**6, 30 * 10**6)


def test_the_state_file_is_bounded_and_reads_the_old_format(tmp_path: Path) -> None:
    old = chosen(os.urandom(16))
    (tmp_path / "receipts-entry.json").write_text(
        f'{{"session_id": "{old.grant.session_id.hex()}", "up": 5, "down": 7, "signed": ""}}'
    )
    d = duty(tmp_path, old)
    assert d.session.counted == Counters(5, 7)
    for _ in range(KEPT_SESSIONS + 3):
        d.switch(chosen(os.urandom(16)))
    d._save()
    assert len(duty(tmp_path, old)._kept) == KEPT_SESSIONS
