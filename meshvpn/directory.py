"""The directory of relays a node knows from announcements, and the choice
of the nearest. Pure: announcements, clocks and RTTs come in as arguments.

Every payload that arrives on an announcement topic is ``offer``-ed. It is
kept only if it verifies, is unexpired, is on its signer's own topic and is
newer than what we hold; otherwise the reason is counted (the adapter logs
each reason's first occurrence). An empty payload is the broker clearing a
retained announcement (a relay's last will, or its clean exit).

Choosing: candidates are filtered by the user's constraints, ordered by how
much of their geohash they share with ours (coarse location first), the best
few are probed, and the lowest RTT wins. RTTs within ``TIE_MS`` of each other
count as equal, and then price, then load, decide. Relays announcing themselves
full (load >= capacity) are kept, last: their refusal says why.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Final

from meshvpn.messages import Announcement, MessageError, Signed, verify_announcement

TOPIC_ROOT: Final = "meshvpn/v1"
ANNOUNCE_PREFIX: Final = f"{TOPIC_ROOT}/announce/"
TIE_MS: Final = 2.0
MAX_ENTRIES: Final = 100_000


def announce_topic(node_id: str) -> str:
    return ANNOUNCE_PREFIX + node_id


def session_topic(node_id: str) -> str:
    return f"{TOPIC_ROOT}/session/{node_id}"


def reply_topic(client_id: str, token: bytes) -> str:
    """Where a relay's grant goes: under the client's node id, so the broker's ACL
    lets only that client read it, and a fresh random token per request."""
    return f"{TOPIC_ROOT}/reply/{client_id}/{token.hex()}"


def sync_topic(node_id: str, token: bytes) -> str:
    """A client's own topic, to learn when the broker has sent all retained messages."""
    return f"{TOPIC_ROOT}/sync/{node_id}/{token.hex()}"


@dataclass(frozen=True)
class Entry:
    signed: Signed
    announcement: Announcement

    @property
    def node_id(self) -> str:
        return self.signed.node_id


@dataclass
class Directory:
    entries: dict[str, Entry] = field(default_factory=dict)
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    accepted: int = 0

    def offer(self, topic: str, payload: bytes, now_ms: int) -> str | None:
        """Take one message from an announcement topic; return why it was dropped, if it was."""
        node_id = topic.removeprefix(ANNOUNCE_PREFIX)
        if not topic.startswith(ANNOUNCE_PREFIX) or "/" in node_id:
            return self._reject("wrong-topic")
        if not payload:
            self.entries.pop(node_id, None)
            return None
        try:
            signed = verify_announcement(payload, now_ms)
        except MessageError as exc:
            return self._reject(exc.reason)
        if signed.node_id != node_id:
            return self._reject("wrong-topic")
        ann = signed.message
        assert isinstance(ann, Announcement)  # noqa: S101 - verify_announcement checked it
        held = self.entries.get(node_id)
        if held is not None:
            if held.signed.wire == payload:
                return None  # the same retained message again: harmless
            if ann.issued_ms <= held.announcement.issued_ms:
                return self._reject("stale")
        elif len(self.entries) >= MAX_ENTRIES:
            return self._reject("directory-full")
        self.entries[node_id] = Entry(signed, ann)
        self.accepted += 1
        return None

    def _reject(self, reason: str) -> str:
        self.rejected[reason] += 1
        return reason

    def expire(self, now_ms: int) -> list[str]:
        gone = [n for n, e in self.entries.items() if e.announcement.expires_ms <= now_ms]
        for node_id in gone:
            del self.entries[node_id]
        return gone

    def candidates(
        self,
        now_ms: int,
        *,
        near: str = "",
        exit_region: str = "",
        max_price: int | None = None,
        need_exit: bool = True,
        exclude: frozenset[str] = frozenset(),
    ) -> list[Entry]:
        """Usable relays, nearest by location first (ties: cheaper, less loaded, id).

        Relays that announce themselves full (load >= capacity; capacity 0 while the
        owner's controls stop sharing) come last: an announcement can be stale, and
        when only full ones are left, asking gets the client the relay's reason."""
        usable = [
            e
            for e in self.entries.values()
            if e.announcement.expires_ms > now_ms
            and e.node_id not in exclude
            and (not need_exit or e.announcement.is_exit)
            and e.announcement.geohash.startswith(exit_region)
            and (max_price is None or e.announcement.price_per_gib <= max_price)
        ]
        return sorted(
            usable,
            key=lambda e: (
                is_full(e.announcement),
                -_common_prefix(near, e.announcement.geohash),
                e.announcement.price_per_gib,
                _load_ratio(e.announcement),
                e.node_id,
            ),
        )


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def is_full(ann: Announcement) -> bool:
    return ann.load >= ann.capacity


def _load_ratio(ann: Announcement) -> float:
    return ann.load / ann.capacity if ann.capacity else 1.0


def choose(candidates: list[Entry], rtt_ms: dict[str, float]) -> list[Entry]:
    """Order the probed candidates best first; unanswered probes are dropped."""
    answered = [e for e in candidates if e.node_id in rtt_ms]
    return sorted(
        answered,
        key=lambda e: (
            is_full(e.announcement),
            int(rtt_ms[e.node_id] // TIE_MS),
            e.announcement.price_per_gib,
            _load_ratio(e.announcement),
            e.node_id,
        ),
    )
