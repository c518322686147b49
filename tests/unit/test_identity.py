from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature

from meshvpn.errors import ConfigError, LocalError
from meshvpn.identity import (
    PrivateKey,
    PublicKey,
    init_identity,
    load_identity,
    mesh_address_of,
    node_id_of,
)

VECTORS = Path(__file__).parent.parent / "vectors" / "identity.json"


def test_init_creates_private_files_and_is_idempotent(tmp_path: Path) -> None:
    state = tmp_path / "state"
    identity, created = init_identity(state)
    assert sorted(created) == ["control.key", "identity.key", "wireguard.key"]
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in created:
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600
    before = {n: (state / n).read_bytes() for n in created}
    again, created_again = init_identity(state)
    assert created_again == []
    assert again.public_summary() == identity.public_summary()
    assert {n: (state / n).read_bytes() for n in created} == before


def test_init_fills_in_only_missing_keys(tmp_path: Path) -> None:
    identity, _ = init_identity(tmp_path)
    (tmp_path / "control.key").unlink()
    again, created = init_identity(tmp_path)
    assert created == ["control.key"]
    assert again.node_id == identity.node_id
    assert again.wireguard_public == identity.wireguard_public
    assert again.control_public != identity.control_public


def test_keys_are_distinct_and_well_formed(tmp_path: Path) -> None:
    identity, _ = init_identity(tmp_path)
    pubs = {identity.identity_public, identity.wireguard_public, identity.control_public}
    assert len(pubs) == 3
    # wireguard.key is in wg(8)'s format: one line of base64
    raw = base64.b64decode((tmp_path / "wireguard.key").read_text().strip(), validate=True)
    assert PrivateKey(raw).x25519_public() == identity.wireguard_public


@pytest.mark.parametrize("content", [b"", b"not base64!!\n", base64.b64encode(b"short") + b"\n"])
def test_corrupt_key_is_a_config_error_without_the_content(tmp_path: Path, content: bytes) -> None:
    init_identity(tmp_path)
    (tmp_path / "identity.key").write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_identity(tmp_path)
    line = info.value.one_line()
    assert "identity.key is corrupt" in line
    assert "meshvpn init" in line
    if content:
        assert content.decode(errors="replace").strip() not in line
    assert "\n" not in line


def test_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    init_identity(tmp_path)
    os.chmod(tmp_path / "wireguard.key", 0o644)  # noqa: PTH101
    with pytest.raises(ConfigError, match="open to other users"):
        load_identity(tmp_path)


def test_unusable_state_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LocalError, match="cannot use state directory") as info:
        init_identity(blocker / "state")
    assert "--state-dir" in info.value.one_line()


def test_missing_state_dir_says_run_init(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_identity(tmp_path / "nope")
    assert "does not exist" in info.value.one_line()
    assert "meshvpn init" in info.value.one_line()


def test_private_keys_never_show(tmp_path: Path) -> None:
    identity, _ = init_identity(tmp_path)
    text = repr(identity) + str(identity) + json.dumps(identity.public_summary())
    for key in (identity.identity_key, identity.wireguard_key, identity.control_key):
        assert key.hex not in text
        assert base64.b64encode(key.raw).decode() not in text


def test_derivation_vectors() -> None:
    """Node ids and mesh addresses are a wire format: pinned by fixed vectors."""
    vectors = json.loads(VECTORS.read_text())
    assert len(vectors) >= 3
    for v in vectors:
        pub = PrivateKey(bytes.fromhex(v["identity_seed"])).ed25519_public()
        assert pub.hex == v["identity_public"]
        assert node_id_of(pub) == v["node_id"]
        assert str(mesh_address_of(pub)) == v["mesh_address"]


def test_public_key_parsing() -> None:
    key = PublicKey(bytes(range(32)))
    assert PublicKey.from_b64(key.b64) == key
    for bad in ("", "abc", "!!!!", base64.b64encode(b"x" * 31).decode()):
        with pytest.raises(ValueError):
            PublicKey.from_b64(bad)
    secret = base64.b64encode(bytes(range(32))).decode()
    with pytest.raises(ValueError) as info:
        PublicKey.from_b64(secret[:-2] + "!=")  # a mistyped private key is not echoed
    assert secret[:8] not in str(info.value)


def test_ed25519_verify_accepts_only_the_signers_signature() -> None:
    key = PrivateKey(bytes(range(32)))
    public = key.ed25519_public()
    signature = key.ed25519_sign(b"receipt")
    public.ed25519_verify(signature, b"receipt")
    other = PrivateKey(bytes(range(1, 33))).ed25519_public()
    bad = [
        (public, signature, b"receipt!"),
        (other, signature, b"receipt"),
        (public, signature[:-1], b"receipt"),
        (public, signature[:5] + bytes([signature[5] ^ 1]) + signature[6:], b"receipt"),
    ]
    for signer, sig, data in bad:
        with pytest.raises(InvalidSignature):
            signer.ed25519_verify(sig, data)


def test_ed25519_verify_refuses_small_order_keys() -> None:
    # The identity point as a key, with R = identity and S = 0, "verifies" any
    # message under RFC 8032's cofactorless check (OpenSSL accepts it): a party
    # announcing such a key would let anyone sign in its name.
    identity_point = PublicKey(bytes([1]) + bytes(31))
    with pytest.raises(InvalidSignature):
        identity_point.ed25519_verify(identity_point.raw + bytes(32), b"any message")
