"""The directory of relays a node knows from announcements, and the choice
of the nearest. Pure: announcements, clocks and RTTs come in as arguments.

Every payload that arrives on an announcement topic is ``offer``-ed. It is
kept only if it verifies, is unexpired, is on its signer's own topic and is
newer than what we hold; otherwise the reason is counted (the adapter logs
each reason's first occurrence). An empty payload is the broker clearing a
retained announcement (a relay's last will, or its clean exit).

A client's directory (``lazy=True``) checks signatures lazily. A new client
is sent every retained announcement at once, and checking 10,000 Ed25519
signatures takes longer than the second it has to choose (``bench/scale.py``),
while it only ever looks at the few nearest. So a relay seen for the first
time goes to ``pending`` after every check but the signature's
(``peek_announcement``), and ``candidates`` checks the signature of each one
it is about to return, moving it to ``entries`` or dropping (and counting)
it, until it has as many as asked for. A message that would replace a known
relay's is verified at once, and so is a pending one it would replace: a
forgery never displaces a genuine announcement, nor does a forged "newest"
one make the genuine one look stale. ``entries`` only ever holds verified
announcements, lazy or not; only ``candidates`` looks at ``pending``.

Choosing: candidates are filtered by the user's constraints, ordered by how
much of their geohash they share with ours (coarse location first), the best
few are probed, and the lowest RTT wins. RTTs within ``TIE_MS`` of each other
count as equal, and then price, then load, decide. Relays announcing themselves
full (load >= capacity) are kept, last: their refusal says why.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from meshvpn.identity import PublicKey, node_id_of
from meshvpn.messages import (
    Announcement,
    MessageError,
    Signed,
    Unverified,
    peek_announcement,
    verify_announcement,
    verify_signature,
)

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
    """A relay's newest announcement. ``verified`` is False only inside the directory."""

    node_id: str
    signer: PublicKey
    announcement: Announcement
    wire: bytes
    verified: bool

    @classmethod
    def of(cls, node_id: str, msg: Signed | Unverified) -> Entry:
        ann = msg.message
        assert isinstance(ann, Announcement)  # noqa: S101 - *_announcement() checked it
        return cls(node_id, msg.signer, ann, msg.wire, isinstance(msg, Signed))


@dataclass
class Directory:
    entries: dict[str, Entry] = field(default_factory=dict)  # verified
    pending: dict[str, Entry] = field(default_factory=dict)  # lazy: signature not checked yet
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    accepted: int = 0
    lazy: bool = False

    def __len__(self) -> int:
        return len(self.entries) + len(self.pending)

    def offer(self, topic: str, payload: bytes, now_ms: int) -> str | None:
        """Take one message from an announcement topic; return why it was dropped, if it was."""
        node_id = topic.removeprefix(ANNOUNCE_PREFIX)
        if not topic.startswith(ANNOUNCE_PREFIX) or "/" in node_id:
            return self._reject("wrong-topic")
        if not payload:
            self.entries.pop(node_id, None)
            self.pending.pop(node_id, None)
            return None
        held = self.entries.get(node_id) or self.pending.get(node_id)
        if held is not None and held.wire == payload:
            return None  # the same retained message again: harmless
        if held is not None and not held.verified:
            held = self._verify(held)  # before it decides what is stale
        try:
            msg: Signed | Unverified = (
                peek_announcement(payload, now_ms)
                if held is None and self.lazy
                else verify_announcement(payload, now_ms)
            )
        except MessageError as exc:
            return self._reject(exc.reason)
        if node_id_of(msg.signer) != node_id:
            return self._reject("wrong-topic")
        entry = Entry.of(node_id, msg)
        if held is not None:
            if entry.announcement.issued_ms <= held.announcement.issued_ms:
                return self._reject("stale")
        elif len(self) >= MAX_ENTRIES:
            return self._reject("directory-full")
        (self.entries if entry.verified else self.pending)[node_id] = entry
        self.accepted += 1
        return None

    def _verify(self, entry: Entry) -> Entry | None:
        """The entry with its signature checked, or None (dropped, counted) if it fails."""
        if entry.verified:
            return entry
        del self.pending[entry.node_id]
        try:
            signed = verify_signature(Unverified(entry.announcement, entry.signer, entry.wire))
        except MessageError as exc:
            self._reject(exc.reason)
            return None
        checked = Entry.of(entry.node_id, signed)
        self.entries[entry.node_id] = checked
        return checked

    def _reject(self, reason: str) -> str:
        self.rejected[reason] += 1
        return reason

    def expire(self, now_ms: int) -> list[str]:
        """Drop the expired; return the node ids of the verified ones dropped."""
        for held in (self.pending, self.entries):
            gone = [n for n, e in held.items() if e.announcement.expires_ms <= now_ms]
            for node_id in gone:
                del held[node_id]
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
        where: Callable[[Entry], bool] | None = None,
        limit: int | None = None,
    ) -> list[Entry]:
        """Usable relays, nearest by location first (ties: cheaper, less loaded, id).

        Relays that announce themselves full (load >= capacity; capacity 0 while the
        owner's controls stop sharing) come last: an announcement can be stale, and
        when only full ones are left, asking gets the client the relay's reason.
        ``where`` filters further. At most ``limit``, each with its signature
        checked (see the module comment), so filter here rather than after."""
        usable = [
            e
            for e in itertools.chain(self.entries.values(), self.pending.values())
            if e.announcement.expires_ms > now_ms
            and e.node_id not in exclude
            and (not need_exit or e.announcement.is_exit)
            and e.announcement.geohash.startswith(exit_region)
            and (max_price is None or e.announcement.price_per_gib <= max_price)
            and (where is None or where(e))
        ]
        usable.sort(
            key=lambda e: (
                is_full(e.announcement),
                -_common_prefix(near, e.announcement.geohash),
                e.announcement.price_per_gib,
                _load_ratio(e.announcement),
                e.node_id,
            ),
        )
        chosen: list[Entry] = []
        for entry in usable:
            if limit is not None and len(chosen) >= limit:
                break
            checked = self._verify(entry)
            if checked is not None:
                chosen.append(checked)
        return chosen


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
