"""The cut-off rules under loss, delay and stalls: an honest client is never cut,
a silent one is cut within the documented exposure (``accounting.exchange``).

Both parties in memory, one step per ``READ_INTERVAL_S``; the channel between
them drops or delays datagrams as each test says."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from accounting.exchange import (
    ALLOWANCE_CAP,
    ALLOWANCE_S,
    DEFAULT_GRACE_BYTES,
    DEFAULT_GRACE_S,
    RESEND_MAX_MS,
    RESEND_MS,
    Ack,
    ClientCutOff,
    ClientSession,
    Counters,
    ReceiptCountersigned,
    ReceiptRejected,
    RelaySession,
    RelayState,
    SendStatement,
    SignReceipt,
    Statement,
    StatementRefused,
    Terms,
)
from meshvpn.identity import PrivateKey

CLIENT = PrivateKey(bytes([7]) * 32)
RELAY = PrivateKey(bytes([1]) * 32)
ENTRY_A = PrivateKey(bytes([2]) * 32).ed25519_public()
ENTRY_B = PrivateKey(bytes([3]) * 32).ed25519_public()
NOW = 1_795_000_000_000
STEP_MS = 100
MIB = 1 << 20


def terms() -> Terms:
    return Terms(
        session_id=bytes(range(16)),
        client=CLIENT.ed25519_public(),
        path=(RELAY.ed25519_public(),),
        price_per_gib=1_000_000,
        started_ms=NOW,
    )


Drop = Callable[[int, str], bool]  # (step, "statement" | "receipt") -> lost?


@dataclass
class Wire:
    """Drives both sides step by step; datagrams in flight arrive ``delay`` steps
    later unless ``drop`` says they are lost."""

    relay: RelaySession = field(default_factory=lambda: RelaySession(terms()))
    client: ClientSession = field(default_factory=lambda: ClientSession(terms()))
    drop: Drop = lambda step, kind: False
    delay: int = 0
    answers: bool = True
    raw: Counters = field(default_factory=Counters)
    step: int = 0
    in_flight: list[tuple[int, str, bytes]] = field(default_factory=list)
    cuts: list[ClientCutOff] = field(default_factory=list)
    refused: list[StatementRefused] = field(default_factory=list)
    bad: list[ReceiptRejected] = field(default_factory=list)

    @property
    def now(self) -> int:
        return NOW + self.step * STEP_MS

    def run(self, traffic: list[int], *, relay_reads: Callable[[int], bool] | None = None) -> None:
        for down in traffic:
            self.step += 1
            self.raw = Counters(self.raw.up, self.raw.down + down)
            self.client.observe(self.raw)
            self._deliver()
            if relay_reads is None or relay_reads(self.step):
                for action in self.relay.observe(self.raw, self.now):
                    if isinstance(action, SendStatement):
                        self._send("statement", action.statement.encode())
                    elif isinstance(action, ClientCutOff):
                        self.cuts.append(action)
            self._deliver()

    def _send(self, kind: str, wire: bytes) -> None:
        if not self.drop(self.step, kind):
            self.in_flight.append((self.step + self.delay, kind, wire))

    def _deliver(self) -> None:
        while due := [m for m in self.in_flight if m[0] <= self.step]:
            self.in_flight = [m for m in self.in_flight if m[0] > self.step]
            self._handle(due)

    def _handle(self, due: list[tuple[int, str, bytes]]) -> None:
        for _, kind, wire in due:
            if kind == "statement" and self.answers:
                answer = self.client.on_statement(Statement.decode(wire), CLIENT, self.now)
                if isinstance(answer, SignReceipt):
                    self._send("receipt", answer.wire)
                else:
                    self.refused.append(answer)
            elif kind == "receipt":
                for result in self.relay.on_receipt(wire, RELAY, self.now):
                    if isinstance(result, ReceiptCountersigned):
                        self.client.on_ack(Ack.decode(result.ack.encode()))
                    elif isinstance(result, ReceiptRejected) and result.reason != "replayed":
                        self.bad.append(result)


def steps(seconds: float) -> int:
    return round(seconds * 1000 / STEP_MS)


# ---- honest clients are never cut


def test_one_lost_statement_at_the_end_of_a_transfer_is_sent_again() -> None:
    """Traffic stops right after a statement that is lost: the relay states no
    more bytes, but it sends the statement again, and the idle client pays."""
    wire = Wire(drop=lambda step, kind: step == 1 and kind == "statement")
    wire.run([9 * MIB] + [0] * steps(60))
    assert wire.relay.state is RelayState.ACTIVE
    assert wire.relay.unreceipted.total == 0
    assert wire.relay.resent >= 1


@settings(max_examples=60, deadline=None)
@given(
    rate=st.integers(1, 6 * MIB),  # per step: up to 60 MiB/s, about 500 Mbit/s
    outages=st.lists(
        st.tuples(st.integers(0, steps(5)), st.integers(1, steps(ALLOWANCE_S))),
        max_size=4,
    ),
    loss_pct=st.integers(0, 60),
    seed=st.integers(0, 2**32 - 1),
    delay=st.integers(0, 3),
)
def test_honest_client_through_lossy_bursts_is_never_cut(
    rate: int,
    outages: list[tuple[int, int]],
    loss_pct: int,
    seed: int,
    delay: int,
) -> None:
    """Full rate, every datagram of the channel lost in outages of up to
    ALLOWANCE_S less a statement interval, a round trip and a resend; random
    loss of receipts besides (up to 60 %, not within 2 s of an outage);
    datagrams delayed up to 0.3 s each way: the client is never cut, and it
    owes no more than the allowance at the end."""
    # The longest blackout an honest client survives at a steady rate: the allowance
    # (4 s of traffic) less the statement interval (at most 0.5 s where 8 MiB is
    # worth less than the floor), the round trip, the resend and a reading.
    longest = steps(ALLOWANCE_S) - steps(0.5) - 2 * delay - steps(RESEND_MS / 1000) - 1
    dark: set[int] = set()
    calm: set[int] = set()  # 2 s either side of an outage: no random loss (it would lengthen it)
    at = steps(2)
    for gap, n in outages:
        at += gap
        calm.update(range(at - steps(2), at))
        dark.update(range(at, at + min(n, longest)))
        at += min(n, longest)
        calm.update(range(at, at + steps(2)))
        at += steps(2)
    # Random loss, but never so long a run that it is an outage of its own.
    lost: set[int] = set()
    state, run = seed, 0
    for s in range(steps(25)):
        state = (state * 1103515245 + 12345) % 2**31
        if state % 100 < loss_pct and run < 3 and s not in calm:
            lost.add(s)
            run += 1
        else:
            run = 0

    def drop(step: int, kind: str) -> bool:
        return step in dark or (step in lost and kind == "receipt")

    wire = Wire(drop=drop, delay=delay)
    wire.run([rate] * steps(25))
    assert not wire.cuts, wire.cuts
    assert not wire.bad
    assert not wire.refused
    assert wire.relay.unreceipted.total <= wire.relay.allowance


@settings(max_examples=40, deadline=None)
@given(
    rate=st.integers(MIB // 10, 6 * MIB),
    stall_at=st.integers(5, steps(10)),
    stall=st.integers(1, steps(10)),
)
def test_a_stalled_relay_agent_does_not_count_its_stall_as_client_silence(
    rate: int, stall_at: int, stall: int
) -> None:
    """The relay's agent gets no CPU for up to 10 s while the data plane carries
    on: it comes back to a jump in its counters, states them, and the client,
    who answered everything it was sent, is not cut."""
    wire = Wire()
    wire.run([rate] * steps(20), relay_reads=lambda s: not stall_at <= s < stall_at + stall)
    assert not wire.cuts
    assert wire.relay.unreceipted.total <= wire.relay.terms.interval_bytes + rate


def test_multi_hop_exit_states_the_new_path_after_a_failover() -> None:
    """The client moves from entry A to entry B: the exit's pending statement
    names A, which the client no longer signs; the exit states afresh with B as
    soon as it has traced it, and the session goes on."""
    wire = Wire()
    exit_key = RELAY.ed25519_public()
    wire.relay.path = (ENTRY_A, exit_key)
    wire.client.entry = ENTRY_A
    wire.run([2 * MIB] * steps(3))
    assert wire.relay.receipted is not None
    assert wire.relay.receipted.path == (ENTRY_A, exit_key)
    # entry A dies: nothing gets through for 3 s, then the client is on B,
    # and the exit takes another 0.5 s to trace the new path
    wire.client.entry = ENTRY_B
    until = wire.step + steps(3)
    wire.drop = lambda step, kind: step < until
    # a statement goes out into the dead path, then TCP only retransmits
    wire.run([2 * MIB] * 5 + [MIB // 10] * (steps(3) - 5))
    assert wire.relay.waiting_since_ms
    wire.relay.path = ()
    wire.run([MIB // 10])  # the client is on B: the exit states afresh, at once
    assert wire.relay.recent[wire.relay.seq].path == ()
    assert wire.relay.receipted.path == (exit_key,)
    wire.run([MIB // 10] * steps(0.5))  # and starts again slowly: no statement due
    wire.relay.path = (ENTRY_B, exit_key)
    wire.run([MIB // 10] * steps(1))
    # answered since the move: for the exit alone (the path was not traced yet)
    assert wire.relay.receipted.path in {(exit_key,), (ENTRY_B, exit_key)}
    assert wire.relay.unreceipted.total <= steps(1.5) * MIB // 10  # since the move
    assert len(wire.refused) <= 1  # the old path, once at most
    wire.run([2 * MIB] * steps(5))
    assert not wire.cuts
    assert wire.relay.receipted.path == (ENTRY_B, exit_key)
    assert wire.relay.unreceipted.total <= wire.relay.terms.interval_bytes + 2 * MIB


# ---- silent clients are cut, within the documented exposure


@settings(max_examples=60, deadline=None)
@given(
    paid=st.integers(0, steps(10)),
    chunks=st.lists(st.integers(0, 8 * MIB), min_size=1, max_size=steps(40)),
)
def test_a_client_that_stops_answering_is_cut_within_the_exposure(
    paid: int, chunks: list[int]
) -> None:
    """Answers for a while, then never again: cut before it owes more than the
    allowance plus one reading (the allowance at most ALLOWANCE_CAP), and
    within grace_s of the first unanswered statement however little it takes."""
    wire = Wire()
    wire.run([MIB] * paid)
    wire.answers = False
    wire.run(chunks)
    biggest = max(chunks)
    if wire.cuts:
        (cut,) = wire.cuts
        assert cut.unreceipted.total <= max(DEFAULT_GRACE_BYTES, ALLOWANCE_CAP) + biggest
        # the allowance moves with the traffic: it may shrink by a slice of history
        assert cut.unreceipted.total <= wire.relay.allowance + 4 * biggest
        assert cut.abusive == ("allowance" in cut.reason)
    else:
        assert wire.relay.unreceipted.total <= wire.relay.allowance
        waited = wire.now - wire.relay.waiting_since_ms if wire.relay.waiting_since_ms else 0
        assert waited <= DEFAULT_GRACE_S * 1000 + RESEND_MS


def test_a_silent_client_at_full_rate_costs_about_allowance_s_of_traffic() -> None:
    rate = 4 * MIB  # 40 MiB/s
    wire = Wire()
    wire.run([rate] * steps(2))
    wire.answers = False
    wire.run([rate] * steps(30))
    (cut,) = wire.cuts
    assert cut.abusive
    # the allowance's history has a 0.25 s grain, and a reading overshoots
    assert ALLOWANCE_S * 10 * rate <= cut.unreceipted.total <= (ALLOWANCE_S * 10 + 5) * rate


def test_the_allowance_is_capped_at_any_rate() -> None:
    wire = Wire()
    wire.answers = False
    wire.run([100 * MIB] * steps(10))  # 1 GiB/s
    (cut,) = wire.cuts
    assert cut.unreceipted.total <= ALLOWANCE_CAP + 100 * MIB


def test_a_gone_client_gets_few_resends_before_its_quiet_cut_off() -> None:
    """It disconnected with a statement unanswered: the resends back off to one
    every RESEND_MAX_MS, and after grace_s it is cut, quietly (no ban)."""
    wire = Wire()
    wire.run([MIB] * steps(1))
    wire.answers = False
    wire.run([9 * MIB] + [0] * steps(DEFAULT_GRACE_S + 5))
    (cut,) = wire.cuts
    assert not cut.abusive
    assert "no receipt" in cut.reason
    doublings = (RESEND_MAX_MS // RESEND_MS).bit_length()
    assert wire.relay.resent <= DEFAULT_GRACE_S * 1000 // RESEND_MAX_MS + doublings
