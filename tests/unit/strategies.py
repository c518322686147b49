"""Hypothesis strategies for control messages, derived from their schemas."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import strategies as st

import accounting.epochs  # noqa: F401 - registers EpochStatement for any_message
from accounting.booked import BookedAck, SessionSeq
from accounting.credit import CREDIT_EXHAUSTED, CREDIT_OK, CreditNotice
from accounting.receipts import Receipt
from meshvpn.identity import PublicKey
from meshvpn.messages import (
    KNOWN_ROLES,
    STATUS_NAMES,
    Announcement,
    Bool,
    Endpoint,
    Field,
    Fixed,
    Key,
    LinkGrant,
    ListOf,
    Message,
    SessionGrant,
    Text,
    UInt,
)

keys = st.binary(min_size=32, max_size=32).map(PublicKey)


def for_field(spec: Field) -> st.SearchStrategy[Any]:
    if isinstance(spec, UInt):
        return st.integers(0, (1 << spec.bits) - 1)
    if isinstance(spec, Bool):
        return st.booleans()
    if isinstance(spec, Fixed):
        return st.binary(min_size=spec.length, max_size=spec.length)
    if isinstance(spec, Key):
        return keys
    if isinstance(spec, Text):
        chars = (
            st.sampled_from(spec.alphabet)
            if spec.alphabet is not None
            else st.characters(codec="utf-8")
        )
        return st.text(chars, max_size=spec.max_len // 4).filter(
            lambda t: len(t.encode()) <= spec.max_len
        )
    if isinstance(spec, Endpoint):
        addrs = st.one_of(
            st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
            st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
        )
        return st.tuples(addrs, st.integers(1, 65535))
    if isinstance(spec, SessionSeq):
        return st.tuples(st.binary(min_size=16, max_size=16), st.integers(0, 2**64 - 1))
    if isinstance(spec, ListOf):
        return st.lists(for_field(spec.item), max_size=spec.max_items).map(tuple)
    raise TypeError(spec)


@st.composite
def messages(draw: st.DrawFn, cls: type[Message]) -> Message:
    values = {name: draw(for_field(spec)) for name, spec in cls.FIELDS.items()}
    if cls is Announcement:
        values["roles"] = draw(st.integers(0, KNOWN_ROLES))
        values["endpoints"] = draw(
            st.lists(for_field(Endpoint()), min_size=1, max_size=4).map(tuple)
        )
        values["expires_ms"] = (
            draw(st.integers(values["issued_ms"] + 1, 2**64 - 1))
            if values["issued_ms"] < 2**64 - 1
            else 2**64 - 1
        )
        if values["issued_ms"] >= values["expires_ms"]:
            values["issued_ms"] = values["expires_ms"] - 1
    if cls is Receipt:
        values["path"] = tuple(draw(st.lists(keys, min_size=1, max_size=8, unique=True)))
    if cls is LinkGrant:
        values["status"] = draw(st.sampled_from(sorted(STATUS_NAMES)))
    if cls is SessionGrant:
        values["status"] = draw(st.sampled_from(sorted(STATUS_NAMES)))
        values["tunnel_prefix"] = draw(st.integers(0, 32))
    if cls is BookedAck:
        sessions = draw(
            st.dictionaries(
                st.binary(min_size=16, max_size=16), st.integers(0, 2**64 - 1), max_size=128
            )
        )
        values["sessions"] = tuple(sorted(sessions.items()))
    if cls is CreditNotice:
        values["status"] = draw(st.sampled_from([CREDIT_OK, CREDIT_EXHAUSTED]))
    return cls(**values)
