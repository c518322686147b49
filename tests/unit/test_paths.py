"""Multi-hop receipts: path statements, countersignatures collected in any order,
the witnesses' checks, and the ledger's split over a path. All pure."""

from __future__ import annotations

import contextlib
import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from accounting.exchange import (
    ClientSession,
    Counters,
    ReceiptCountersigned,
    ReceiptRejected,
    RelaySession,
    SendStatement,
    SignReceipt,
    Statement,
    StatementRefused,
    Terms,
    backed,
    tolerance,
)
from accounting.ledger import Ledger, Outcome, client_account, relay_account, split
from accounting.receipts import PartialBundle, Receipt, ReceiptBundle, sign_receipt
from meshvpn.identity import PrivateKey, PublicKey, client_mesh_address, mesh_address_of
from meshvpn.messages import MessageError
from relay.paths import (
    GIVE_UP_MS,
    RETRY_MS,
    Collector,
    CosignAnswer,
    CosignRefusal,
    CosignRequest,
    decode_answer,
    flow_counters,
    parse_flows,
    path_from_trace,
    witness,
)

VECTORS = Path(__file__).parent.parent / "vectors" / "paths.json"
CLIENT = PrivateKey(bytes([9]) * 32)
ENTRY, TRANSIT, EXIT = (PrivateKey(bytes([i]) * 32) for i in (1, 2, 3))
PATH = tuple(k.ed25519_public() for k in (ENTRY, TRANSIT, EXIT))
NOW = 1_795_000_000_000
MIB = 1 << 20
SESSION = bytes(range(16))
CLIENT_ADDR = client_mesh_address(
    mesh_address_of(ENTRY.ed25519_public()), ipaddress.IPv4Address("100.64.0.7")
)
EXIT_ADDR = mesh_address_of(EXIT.ed25519_public())


def terms() -> Terms:
    return Terms(SESSION, CLIENT.ed25519_public(), (PATH[-1],), 1_000_000, NOW)


def receipt(up: int = 1_000, down: int = 5 * MIB, seq: int = 1) -> bytes:
    r = Receipt(SESSION, CLIENT.ed25519_public(), PATH, up, down, 1_000_000, seq, NOW, NOW)
    return sign_receipt(r, CLIENT)


keys = st.sampled_from([PrivateKey(bytes([i]) * 32).ed25519_public() for i in range(1, 12)])


# ---- the statement's wire


@given(
    st.binary(min_size=16, max_size=16),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.lists(keys, min_size=2, max_size=8, unique=True),
)
def test_path_statement_round_trips(
    session: bytes, seq: int, n: int, path: list[PublicKey]
) -> None:
    statement = Statement(session, seq, Counters(n, n // 2), n, tuple(path))
    wire = statement.encode()
    assert wire[:4] == b"MVS2"
    assert Statement.decode(wire) == statement


def test_statement_without_a_path_is_version_one_as_before() -> None:
    wire = Statement(SESSION, 3, Counters(1, 2), NOW).encode()
    assert wire[:4] == b"MVS1" and len(wire) == 52
    assert Statement.decode(wire).path == ()


@given(st.binary(max_size=400))
def test_garbage_statements_are_rejected_not_raised(junk: bytes) -> None:
    for wire in (junk, b"MVS2" + junk, Statement(SESSION, 1, Counters(), NOW, PATH).encode()[:-1]):
        with contextlib.suppress(MessageError):
            Statement.decode(wire)


def test_fixed_vectors() -> None:
    vectors = json.loads(VECTORS.read_text())
    statement = Statement(SESSION, 7, Counters(123_456, 98_765_432), NOW, PATH)
    assert statement.encode().hex() == vectors["statement_v2"]
    wire = receipt(123_456, 98_765_432, 7)
    assert wire.hex() == vectors["receipt"]
    assert CosignRequest(CLIENT_ADDR, wire).encode().hex() == vectors["cosign_request"]
    partial = PartialBundle.start(wire).sign(EXIT).sign(ENTRY).sign(TRANSIT)
    signature = partial.signatures[1]
    assert signature is not None
    assert CosignAnswer(SESSION, 7, signature).encode().hex() == vectors["cosign_answer"]
    assert partial.bundle().encode().hex() == vectors["bundle"]
    assert ReceiptBundle.decode(bytes.fromhex(vectors["bundle"])).complete


# ---- both parties over a path


def test_exit_states_the_path_client_signs_it_exit_countersigns_first() -> None:
    relay = RelaySession(terms(), path=PATH)
    client = ClientSession(terms(), entry=PATH[0])
    client.observe(Counters(1_000, 9 * MIB))
    [action] = relay.observe(Counters(1_000, 9 * MIB), NOW)
    assert isinstance(action, SendStatement)
    assert action.statement.path == PATH
    signed = client.on_statement(Statement.decode(action.statement.encode()), CLIENT, NOW)
    assert isinstance(signed, SignReceipt)
    assert signed.receipt.path == PATH
    [done] = relay.on_receipt(signed.wire, EXIT, NOW)
    assert isinstance(done, ReceiptCountersigned)
    assert not done.partial.complete
    assert done.partial.missing == PATH[:2]
    with pytest.raises(ValueError, match="missing"):
        _ = done.bundle


def test_single_hop_is_unchanged() -> None:
    relay = RelaySession(terms())
    client = ClientSession(terms())
    client.observe(Counters(0, 9 * MIB))
    [action] = relay.observe(Counters(0, 9 * MIB), NOW)
    assert isinstance(action, SendStatement)
    assert action.statement.path == ()
    signed = client.on_statement(action.statement, CLIENT, NOW)
    assert isinstance(signed, SignReceipt)
    [done] = relay.on_receipt(signed.wire, EXIT, NOW)
    assert isinstance(done, ReceiptCountersigned)
    assert done.bundle.complete


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ((PATH[0], PATH[1]), "not at our exit"),
        ((PATH[1], PATH[2]), "not at our entry"),
        ((PATH[0], PATH[1], PATH[0], PATH[2]), "twice"),
    ],
)
def test_client_refuses_a_path_that_is_not_its_own(path: tuple[PublicKey, ...], why: str) -> None:
    client = ClientSession(terms(), entry=PATH[0])
    client.observe(Counters(0, MIB))
    refused = client.on_statement(Statement(SESSION, 1, Counters(0, MIB), NOW, path), CLIENT, NOW)
    assert isinstance(refused, StatementRefused)
    assert why in refused.reason


def test_relay_rejects_a_receipt_for_another_path_than_it_stated() -> None:
    relay = RelaySession(terms(), path=PATH)
    [action] = relay.observe(Counters(0, 9 * MIB), NOW)
    assert isinstance(action, SendStatement)
    other = Receipt(
        SESSION, CLIENT.ed25519_public(), (PATH[2],), 0, 9 * MIB, 1_000_000, 1, NOW, NOW
    )
    [rejected] = relay.on_receipt(sign_receipt(other, CLIENT), EXIT, NOW)
    assert isinstance(rejected, ReceiptRejected)
    assert rejected.reason == "not the stated path"


# ---- countersignatures in any order


@given(st.permutations([ENTRY, TRANSIT, EXIT]))
def test_countersignatures_in_any_order_make_the_same_bundle(order: list[PrivateKey]) -> None:
    partial = PartialBundle.start(receipt())
    for key in order:
        assert not partial.complete
        partial = partial.sign(key)
    bundle = partial.bundle()
    in_order = ReceiptBundle.from_client(receipt())
    for key in (ENTRY, TRANSIT, EXIT):
        in_order = in_order.add_countersignature(key)
    assert bundle.encode() == in_order.encode()
    assert ReceiptBundle.decode(bundle.encode()).complete


def test_a_bad_or_foreign_countersignature_is_refused() -> None:
    partial = PartialBundle.start(receipt())
    with pytest.raises(MessageError, match="bad-countersignature"):
        partial.with_signature(PATH[0], bytes(64))
    with pytest.raises(MessageError, match="not-on-path"):
        partial.with_signature(CLIENT.ed25519_public(), bytes(64))


# ---- the witnesses


def flows(up: int, down: int) -> dict[tuple[str, str], int]:
    return {(str(CLIENT_ADDR), str(EXIT_ADDR)): up, (str(EXIT_ADDR), str(CLIENT_ADDR)): down}


def test_witness_signs_what_its_flow_counters_back() -> None:
    request = CosignRequest(CLIENT_ADDR, receipt(1_000, 5 * MIB))
    ok = witness(request, PATH[1], EXIT_ADDR, flows(2_000, 5 * MIB + 48 * 4000))
    assert isinstance(ok, Receipt)
    assert witness(request, PATH[0], EXIT_ADDR, flows(2_000, 5 * MIB)) == ok


@pytest.mark.parametrize(
    ("me", "source", "counted", "why"),
    [
        (PATH[1], EXIT_ADDR, (2_000, 4 * MIB), "this relay carried"),
        (PATH[2], EXIT_ADDR, (2_000, 9 * MIB), "not on the path"),
        (CLIENT.ed25519_public(), EXIT_ADDR, (2_000, 9 * MIB), "not on the path"),
        (PATH[1], CLIENT_ADDR, (2_000, 9 * MIB), "not asked by the path's exit"),
    ],
)
def test_witness_refuses(
    me: PublicKey, source: ipaddress.IPv6Address, counted: tuple[int, int], why: str
) -> None:
    verdict = witness(CosignRequest(CLIENT_ADDR, receipt()), me, source, flows(*counted))
    assert isinstance(verdict, str)
    assert why in verdict


def test_witness_refuses_a_client_address_off_the_entry() -> None:
    elsewhere = client_mesh_address(EXIT_ADDR, ipaddress.IPv4Address("100.64.0.7"))
    verdict = witness(CosignRequest(elsewhere, receipt()), PATH[1], EXIT_ADDR, flows(10**9, 10**9))
    assert verdict == "client address not behind the path's entry"


@given(st.integers(0, 2**40), st.integers(0, 2**40), st.integers(0, 2**40), st.integers(0, 2**40))
def test_backed_is_own_count_plus_tolerance(up: int, down: int, own_up: int, own_down: int) -> None:
    ok = backed(up, down, Counters(own_up, own_down))
    assert ok == (up <= own_up + tolerance(own_up) and down <= own_down + tolerance(own_down))


def test_flows_from_nft_json() -> None:
    text = json.dumps(
        {
            "nftables": [
                {"metainfo": {}},
                {
                    "set": {
                        "name": "mesh_flows",
                        "elem": [
                            {
                                "elem": {
                                    "val": {"concat": [str(CLIENT_ADDR), str(EXIT_ADDR)]},
                                    "counter": {"packets": 2, "bytes": 300},
                                }
                            }
                        ],
                    }
                },
            ]
        }
    )
    parsed = parse_flows(text)
    assert flow_counters(parsed, CLIENT_ADDR, EXIT_ADDR) == Counters(300, 0)
    assert parse_flows("") == {}
    assert parse_flows('{"nftables": [{"set": {"elem": [{"elem": 5}]}}]}') == {}


# ---- the exit's collector


def answer(key: PrivateKey, wire: bytes, seq: int = 1) -> CosignAnswer:
    signature = PartialBundle.start(wire).sign(key).signatures[PATH.index(key.ed25519_public())]
    assert signature is not None
    return CosignAnswer(SESSION, seq, signature)


def test_collector_asks_the_others_and_assembles_the_bundle() -> None:
    collector = Collector()
    wire = receipt()
    sends = collector.add(PartialBundle.start(wire).sign(EXIT), CLIENT_ADDR, NOW)
    assert [s.relay for s in sends] == list(PATH[:2])
    assert CosignRequest.decode(sends[0].wire) == CosignRequest(CLIENT_ADDR, wire)
    assert collector.on_answer(answer(TRANSIT, wire), mesh_address_of(PATH[1])) is None
    # unanswered ones are asked again, then given up
    [again] = collector.due(NOW + RETRY_MS)
    assert again.relay == PATH[0]
    done = collector.on_answer(
        decode_answer(answer(ENTRY, wire).encode()), mesh_address_of(PATH[0])
    )
    assert isinstance(done, ReceiptBundle)
    assert ReceiptBundle.decode(done.encode()).complete
    assert collector.waiting == {}


def test_collector_refusals_forgeries_and_giving_up() -> None:
    collector = Collector()
    wire = receipt()
    collector.add(PartialBundle.start(wire).sign(EXIT), CLIENT_ADDR, NOW)
    refusal = decode_answer(CosignRefusal(SESSION, 1, "too many bytes").encode())
    assert "refused: too many bytes" in str(collector.on_answer(refusal, mesh_address_of(PATH[1])))
    # the transit's signature sent from the entry's address is not the entry's
    forged = collector.on_answer(answer(TRANSIT, wire), mesh_address_of(PATH[0]))
    assert forged == "bad-countersignature"
    assert (
        collector.on_answer(answer(TRANSIT, wire), CLIENT_ADDR)
        == "answer from a relay off the path"
    )
    # a newer receipt supersedes; answers for the old one are stale
    newer = receipt(2_000, 6 * MIB, 2)
    assert collector.add(PartialBundle.start(wire).sign(EXIT), CLIENT_ADDR, NOW) == []
    assert len(collector.add(PartialBundle.start(newer).sign(EXIT), CLIENT_ADDR, NOW)) == 2
    assert collector.on_answer(answer(TRANSIT, wire), mesh_address_of(PATH[1])) is None
    assert collector.due(NOW + GIVE_UP_MS) == []
    assert collector.waiting == {}
    assert collector.counters["gave-up"] == 1


def test_path_from_trace() -> None:
    addr = {str(mesh_address_of(k)): k for k in PATH}
    hops = [str(mesh_address_of(PATH[1])), str(mesh_address_of(PATH[0]))]
    assert path_from_trace(PATH[2], PATH[0], hops, addr.get) == PATH
    assert path_from_trace(PATH[2], PATH[0], [hops[0], None, hops[1]], addr.get) is None
    assert path_from_trace(PATH[2], PATH[0], hops[:1], addr.get) is None
    assert path_from_trace(PATH[2], PATH[0], ["fd00::1", hops[1]], addr.get) is None


# ---- what the ledger makes of it


def test_entry_witnesses_for_free_transit_and_exit_share() -> None:
    shares = split(900, PATH)
    assert shares == {PATH[0]: 0, PATH[1]: 300, PATH[2]: 600}
    assert split(900, (PATH[0], PATH[2])) == {PATH[0]: 0, PATH[2]: 900}


def test_a_path_change_books_only_the_increase_on_the_new_path() -> None:
    ledger = Ledger()
    client = CLIENT.ed25519_public()
    ledger.deposit(client_account(client), 10**15)
    relays = (*PATH, PrivateKey(bytes([4]) * 32).ed25519_public())

    def book(path: tuple[PublicKey, ...], down: int, seq: int) -> Outcome:
        r = Receipt(SESSION, client, path, 0, down, 1 << 30, seq, NOW, NOW)
        wire = sign_receipt(r, CLIENT)
        partial = PartialBundle.start(wire)
        for key in (ENTRY, TRANSIT, EXIT, PrivateKey(bytes([4]) * 32)):
            if key.ed25519_public() in path:
                partial = partial.sign(key)
        return ledger.book_bundle(partial.bundle(), lambda _k: True).outcome

    assert book((PATH[2],), 1_000, 1) is Outcome.BOOKED  # before the trace: the exit alone
    assert book(PATH, 4_000, 2) is Outcome.BOOKED
    assert book((PATH[0], relays[3], PATH[2]), 7_000, 3) is Outcome.BOOKED  # routed around
    balance = {k: ledger.balances.get(relay_account(k), 0) for k in relays}
    assert balance[PATH[0]] == 0
    assert balance[PATH[1]] > 0 and balance[relays[3]] > 0
    relay_postings = [
        p.amount for e in ledger.entries for p in e.postings if p.account.startswith("relay:")
    ]
    assert min(relay_postings) > 0, "no relay is ever debited, also when the path changes"
    assert sum(ledger.balances.values()) == 0
