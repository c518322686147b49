"""Reconcile plan and UAPI codec: checked against a naive model of a device."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshvpn.identity import PrivateKey, PublicKey
from meshvpn.wireguard.model import Endpoint, PeerPlan, PeerSpec, PeerState, plan_peers
from meshvpn.wireguard.uapi import UapiError, encode_set, parse_get, parse_set_answer

keys = st.binary(min_size=32, max_size=32).map(PublicKey)
v4nets = st.builds(
    lambda a, p: ipaddress.ip_network(f"{ipaddress.IPv4Address(a)}/{p}", strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
v6nets = st.builds(
    lambda a, p: ipaddress.ip_network(f"{ipaddress.IPv6Address(a)}/{p}", strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)
endpoints = st.builds(
    Endpoint,
    st.one_of(
        st.integers(1, 2**32 - 1).map(ipaddress.IPv4Address),
        st.integers(1, 2**128 - 1).map(ipaddress.IPv6Address),
    ),
    st.integers(1, 65535),
)


@st.composite
def specs(draw: st.DrawFn, key: PublicKey | None = None) -> PeerSpec:
    return PeerSpec(
        public_key=key if key is not None else draw(keys),
        allowed_ips=tuple(draw(st.lists(st.one_of(v4nets, v6nets), max_size=4))),
        endpoint=draw(st.none() | endpoints),
        keepalive=draw(st.integers(0, 65535)),
    )


@st.composite
def device_maps(draw: st.DrawFn) -> dict[PublicKey, PeerSpec]:
    ks = draw(st.lists(keys, max_size=6, unique=True))
    return {k: draw(specs(k)) for k in ks}


def naive_apply(actual: dict[PublicKey, PeerSpec], plan: PeerPlan) -> dict[PublicKey, PeerSpec]:
    """What a device holds after a plan: the reference for plan_peers."""
    result = dict(actual)
    for key in plan.remove:
        del result[key]
    for spec in (*plan.update, *plan.add):
        old = result.get(spec.public_key)
        endpoint = spec.endpoint if spec.endpoint is not None else (old.endpoint if old else None)
        result[spec.public_key] = PeerSpec(
            spec.public_key, spec.allowed_ips, endpoint, spec.keepalive
        )
    return result


def states(specs_by_key: dict[PublicKey, PeerSpec]) -> dict[PublicKey, PeerState]:
    return {k: PeerState(s, rx_bytes=7, tx_bytes=9) for k, s in specs_by_key.items()}


@given(device_maps(), device_maps())
def test_plan_converges_to_desired(
    desired: dict[PublicKey, PeerSpec], actual: dict[PublicKey, PeerSpec]
) -> None:
    plan = plan_peers(desired, states(actual))
    after = naive_apply(actual, plan)
    assert set(after) == set(desired)
    for key, want in desired.items():
        have = after[key]
        assert have.allowed_ips == want.allowed_ips
        assert have.keepalive == want.keepalive
        if want.endpoint is not None:
            assert have.endpoint == want.endpoint
    # and a second round has nothing left to do
    assert plan_peers(desired, states(after)).empty


@given(device_maps())
def test_plan_leaves_matching_peers_alone(desired: dict[PublicKey, PeerSpec]) -> None:
    assert plan_peers(desired, states(desired)).empty


def test_learned_endpoint_is_not_a_difference() -> None:
    key = PublicKey(b"\x01" * 32)
    want = PeerSpec(key, (ipaddress.ip_network("100.64.0.2/32"),))
    have = PeerSpec(key, want.allowed_ips, Endpoint.parse("192.0.2.2:40000"))
    assert plan_peers({key: want}, {key: PeerState(have)}).empty


def render_get(
    specs_by_key: dict[PublicKey, PeerSpec], counters: list[tuple[int, int, int]]
) -> str:
    """A get=1 answer the way wireguard-go writes it."""
    lines = [f"private_key={'11' * 32}", "listen_port=51820", "fwmark=0"]
    for (key, spec), (rx, tx, hs) in zip(specs_by_key.items(), counters, strict=True):
        lines += [
            f"public_key={key.hex}",
            f"preshared_key={'00' * 32}",
            "protocol_version=1",
        ]
        if spec.endpoint is not None:
            lines.append(f"endpoint={spec.endpoint}")
        lines += [
            f"last_handshake_time_sec={hs}",
            "last_handshake_time_nsec=500000000",
            f"tx_bytes={tx}",
            f"rx_bytes={rx}",
            f"persistent_keepalive_interval={spec.keepalive}",
        ]
        lines += [f"allowed_ip={net}" for net in spec.allowed_ips]
    lines.append("errno=0")
    return "\n".join(lines) + "\n\n"


@given(st.data())
def test_parse_get_reads_what_wireguard_go_writes(data: st.DataObject) -> None:
    device = data.draw(device_maps())
    counters = data.draw(
        st.lists(
            st.tuples(st.integers(0, 2**63), st.integers(0, 2**63), st.integers(0, 2**40)),
            min_size=len(device),
            max_size=len(device),
        )
    )
    state = parse_get(render_get(device, counters))
    assert state.listen_port == 51820
    assert state.public_key == PrivateKey(bytes.fromhex("11" * 32)).x25519_public()
    assert {k: p.spec for k, p in state.peers.items()} == device
    for (key, _), (rx, tx, hs) in zip(device.items(), counters, strict=True):
        peer = state.peers[key]
        assert (peer.rx_bytes, peer.tx_bytes) == (rx, tx)
        assert peer.last_handshake == (hs + 0.5 if hs else None)


@given(st.text(max_size=300))
def test_parse_get_rejects_garbage_with_uapi_error(text: str) -> None:
    with contextlib.suppress(UapiError):
        parse_get(text)


def test_parse_get_requires_errno_and_zero() -> None:
    for bad in ("listen_port=1\n\n", "errno=22\n\n", "public_key=zz\nerrno=0\n\n"):
        try:
            parse_get(bad)
        except UapiError:
            continue
        raise AssertionError(f"accepted {bad!r}")


def test_encode_set_touches_only_named_peers() -> None:
    a, b, c = (PublicKey(bytes([i]) * 32) for i in (1, 2, 3))
    plan = PeerPlan(
        add=(
            PeerSpec(
                a, (ipaddress.ip_network("100.64.0.2/32"),), Endpoint.parse("[fd00::1]:51820"), 25
            ),
        ),
        update=(PeerSpec(b, (ipaddress.ip_network("100.64.0.3/32"),)),),
        remove=(c,),
    )
    text = encode_set(plan).decode()
    assert "replace_peers" not in text
    assert text.endswith("\n\n")
    assert text.rstrip("\n").splitlines() == [
        "set=1",
        f"public_key={c.hex}",
        "remove=true",
        f"public_key={b.hex}",
        "update_only=true",
        "persistent_keepalive_interval=0",
        "replace_allowed_ips=true",
        "allowed_ip=100.64.0.3/32",
        f"public_key={a.hex}",
        "endpoint=[fd00::1]:51820",
        "persistent_keepalive_interval=25",
        "replace_allowed_ips=true",
        "allowed_ip=100.64.0.2/32",
    ]


def test_set_answer() -> None:
    parse_set_answer("errno=0\n\n")
    with pytest.raises(UapiError, match="errno=1"):
        parse_set_answer("errno=1\n\n")


def test_encode_set_never_shows_private_key_in_repr() -> None:
    key = PrivateKey(b"\x42" * 32)
    assert "42" not in repr(key) and "42" not in str(key)
    assert f"private_key={'42' * 32}" in encode_set(PeerPlan(), private_key=key).decode()
