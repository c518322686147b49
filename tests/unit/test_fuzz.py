"""A short fuzz of every network-reachable parser, in the normal suite.

The long run (>= 100,000 inputs) is ``python tests/fuzz/run.py``; this runs the
same targets and mutations with hypothesis's example counts, plus plain random
bytes, so a regression in any parser's error handling fails CI.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshvpn.wireguard.uapi import UapiError, decode_answer, parse_get
from tests.fuzz.targets import Target, build_targets, generate, random_pool, run_one

TARGETS = build_targets()
POOL = random_pool(TARGETS)


@pytest.mark.parametrize("target", TARGETS, ids=[t.name for t in TARGETS])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_parsers_raise_only_their_error_family(target: Target, data: st.DataObject) -> None:
    if data.draw(st.booleans()):
        wire = data.draw(st.binary(max_size=700))
    else:
        wire = generate(target, data.draw(st.randoms(use_true_random=False)), POOL)
    crash, _ = run_one(target, wire)
    assert crash is None, f"{target.name} crashed on {wire.hex()}: {crash!r}"


# Raw bytes where Noise message 2 is due can never pass: the answer belongs to
# another handshake. handshake.read_grant.sealed is the same parser behind Noise.
THROUGH = [t for t in TARGETS if t.name != "handshake.read_grant"]


@pytest.mark.parametrize("target", THROUGH, ids=[t.name for t in THROUGH])
def test_mutations_start_from_input_that_gets_all_the_way_through(target: Target) -> None:
    through = {
        "ok",
        "notices",
        "answered",
        "countersigned",
        "claim verified",
        "refused",
        "accepted",
    }
    outcomes = [run_one(target, seed) for seed in target.seeds]
    assert any(crash is None and how in through for crash, how in outcomes), outcomes


def test_the_harness_reports_what_is_outside_the_family() -> None:
    def parser(data: bytes) -> None:
        raise KeyError(data)

    crash, outcome = run_one(Target("t", parser, (ValueError,), (b"",)), b"x")
    assert isinstance(crash, KeyError)
    assert outcome == "crash"


def test_a_uapi_answer_that_is_not_text_is_a_uapi_error() -> None:
    # found by the fuzzer: UapiSocket decoded strictly, so a non-UTF-8 byte from the
    # socket raised UnicodeDecodeError out of device.state() into the agent's loops
    with pytest.raises(UapiError, match="not text"):
        parse_get(decode_answer(b"listen_port=1\nerrno=0\xff\n\n"))
