from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshvpn.identity import PublicKey
from meshvpn.tunnel import full_tunnel
from relay.pool import AddressPool, PoolExhaustedError

keys = st.binary(min_size=32, max_size=32).map(PublicKey)


@given(st.lists(st.tuples(st.booleans(), keys), max_size=40), st.integers(24, 29))
def test_pool_leases_are_unique_stable_and_inside(
    ops: list[tuple[bool, PublicKey]], prefix: int
) -> None:
    pool = AddressPool(ipaddress.IPv4Network(f"100.64.0.0/{prefix}"))
    for admit, key in ops:
        if admit:
            try:
                addr = pool.lease(key)
            except PoolExhaustedError:
                assert len(pool.leases) == pool.network.num_addresses - 3
                continue
            assert pool.lease(key) == addr  # same key, same address
        else:
            pool.release(key)
        values = list(pool.leases.values())
        assert len(values) == len(set(values))
        for addr in values:
            assert addr in pool.network
            assert addr not in {
                pool.gateway,
                pool.network.network_address,
                pool.network.broadcast_address,
            }


def test_pool_must_be_cgnat_space() -> None:
    with pytest.raises(ValueError, match=r"100\.64\.0\.0/10"):
        AddressPool(ipaddress.IPv4Network("192.0.2.0/24"))
    with pytest.raises(ValueError, match="too small"):
        AddressPool(ipaddress.IPv4Network("100.64.0.0/31"))


def test_full_tunnel_is_wg_quick_shaped() -> None:
    plan = full_tunnel("wg0", 51820, ipv6=True)
    assert plan.table == 51820
    assert [str(r) for r in plan.routes] == ["0.0.0.0/0", "::/0"]
    for family in (socket.AF_INET, socket.AF_INET6):
        suppress, tunnel = (r for r in plan.rules if r.family == family)
        # main-without-default must be consulted before the tunnel table
        assert suppress.priority < tunnel.priority
        assert suppress.suppress_prefixlen == 0
        assert suppress.table == 254
        assert (tunnel.fwmark, tunnel.invert, tunnel.table) == (51820, True, 51820)
    assert len(full_tunnel("wg0", ipv6=False).rules) == 2
