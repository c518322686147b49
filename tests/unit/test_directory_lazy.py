"""The directory checks signatures lazily, and that changes nothing it hands out.

Checked against a naive model that verifies every announcement as it arrives.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshvpn.directory import Directory, Entry
from meshvpn.identity import PrivateKey, new_ed25519
from meshvpn.messages import MessageError, sign, verify_announcement
from tests.unit.test_directory_probe import NOW, announce, topic_of

KEYS = [new_ed25519() for _ in range(3)]


def forged(wire: bytes) -> bytes:
    """The same message with one bit of its signature flipped."""
    return wire[:-1] + bytes([wire[-1] ^ 1])


def signed(key: PrivateKey, issued: int = 0, **changes: object) -> bytes:
    ann = announce(key, issued_ms=NOW + issued, expires_ms=NOW + issued + 60_000, **changes)
    return sign(ann, key)


def test_forged_first_sighting_is_held_but_never_handed_out() -> None:
    d = Directory(lazy=True)
    good, bad = KEYS[0], KEYS[1]
    assert d.offer(topic_of(good), signed(good), NOW) is None
    # a forged one that would sort first (cheapest): kept unchecked, dropped when it comes up
    assert d.offer(topic_of(bad), forged(signed(bad, price_per_gib=1)), NOW) is None
    assert not d.rejected
    got = d.candidates(NOW, limit=1)
    assert [e.signer for e in got] == [good.ed25519_public()]
    assert all(e.verified for e in got)
    assert d.rejected == {"bad-signature": 1}
    assert len(d) == 1


def test_only_what_is_handed_out_is_checked() -> None:
    d = Directory(lazy=True)
    for i, key in enumerate(KEYS):
        d.offer(topic_of(key), signed(key, price_per_gib=1000 + i), NOW)
    assert (len(d.entries), len(d.pending), len(d)) == (0, 3, 3)
    first = d.candidates(NOW, limit=1)
    assert (len(d.entries), len(d.pending)) == (1, 2)
    assert first == list(d.entries.values())
    assert first[0].verified


def test_a_forgery_never_displaces_a_genuine_announcement() -> None:
    d = Directory(lazy=True)
    key = KEYS[0]
    genuine = signed(key)
    assert d.offer(topic_of(key), genuine, NOW) is None
    assert d.offer(topic_of(key), forged(signed(key, issued=5)), NOW) == "bad-signature"
    assert d.entries[topic_of(key).rsplit("/", 1)[1]].wire == genuine
    assert d.entries[topic_of(key).rsplit("/", 1)[1]].verified


def test_a_forged_newest_does_not_make_the_genuine_one_stale() -> None:
    d = Directory(lazy=True)
    key = KEYS[0]
    assert d.offer(topic_of(key), forged(signed(key, issued=50_000)), NOW) is None
    genuine = signed(key)
    assert d.offer(topic_of(key), genuine, NOW) is None  # the forgery is checked and dropped
    assert d.rejected == {"bad-signature": 1}
    assert [e.wire for e in d.candidates(NOW)] == [genuine]


class EagerModel:
    """What the directory did before: verify every message on arrival."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def offer(self, topic: str, payload: bytes, now: int) -> None:
        node_id = topic.rsplit("/", 1)[1]
        if not payload:
            self.entries.pop(node_id, None)
            return
        try:
            s = verify_announcement(payload, now)
        except MessageError:
            return
        if s.node_id != node_id:
            return
        held = self.entries.get(node_id)
        entry = Entry.of(node_id, s)
        if held is None or entry.announcement.issued_ms > held.announcement.issued_ms:
            self.entries[node_id] = entry


def ranked(entries: list[Entry]) -> list[tuple[str, bytes]]:
    return [(e.node_id, e.wire) for e in entries]


offers = st.lists(
    st.tuples(
        st.integers(0, len(KEYS) - 1),  # whose topic
        st.integers(0, len(KEYS) - 1),  # who signed
        st.integers(0, 5),  # issued offset, ms
        st.integers(1, 4),  # price
        st.sampled_from(["genuine", "forged", "cleared"]),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(offers, st.integers(1, 3))
def test_lazy_directory_hands_out_what_an_eager_one_would(
    sequence: list[tuple[int, int, int, int, str]], limit: int
) -> None:
    lazy, eager, plain = Directory(lazy=True), EagerModel(), Directory()
    for topic_key, signer, issued, price, kind in sequence:
        topic = topic_of(KEYS[topic_key])
        payload = b""
        if kind != "cleared":
            payload = signed(KEYS[signer], issued, price_per_gib=price)
            if kind == "forged":
                payload = forged(payload)
        lazy.offer(topic, payload, NOW)
        eager.offer(topic, payload, NOW)
        plain.offer(topic, payload, NOW)
        # interleave queries: checking some entries early must not change the outcome
        if issued % 2:
            lazy.candidates(NOW, limit=1)
    model = Directory(entries=dict(eager.entries))
    assert ranked(lazy.candidates(NOW, limit=limit)) == ranked(model.candidates(NOW, limit=limit))
    assert ranked(lazy.candidates(NOW)) == ranked(model.candidates(NOW))
    assert ranked(plain.candidates(NOW)) == ranked(model.candidates(NOW))
    assert not plain.pending  # not lazy: everything verified on arrival
    assert all(e.verified for e in lazy.entries.values())


def test_entry_of_keeps_what_the_client_needs() -> None:
    key = KEYS[0]
    d = Directory(lazy=True)
    d.offer(topic_of(key), signed(key), NOW)
    (entry,) = d.candidates(NOW)
    assert entry.signer == key.ed25519_public()
    assert entry.node_id == topic_of(key).rsplit("/", 1)[1]
