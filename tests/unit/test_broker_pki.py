"""The broker's CA, certificates bound to identities, its ACL and its configuration. Pure."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import ssl
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning

from meshvpn import broker, pki
from meshvpn.errors import ConfigError, LocalError
from meshvpn.identity import PrivateKey, init_identity, new_ed25519, node_id_of
from meshvpn.mqtt import BrokerAddress, install_enrollment, load_credentials

VECTORS = Path(__file__).parent.parent / "vectors" / "broker_certs.json"
NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
CA_KEY = PrivateKey(bytes(range(32)))
CA_PEM = pki.make_ca(CA_KEY, NOW)
NODE_KEY = PrivateKey(bytes(range(32, 64)))
NODE = NODE_KEY.ed25519_public()


def client_cert(role: str = pki.ROLE_NODE, **kw: object) -> bytes:
    return pki.issue_client(CA_KEY, CA_PEM, NODE, role, now=NOW, **kw)  # type: ignore[arg-type]


# ---- certificates ------------------------------------------------------------------


def test_a_node_certificate_names_the_node_id_of_its_own_key() -> None:
    cert = x509.load_pem_x509_certificate(client_cert())
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == node_id_of(NODE)
    raw = cert.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert raw == NODE.raw  # the TLS key is the identity key itself
    enrollment = pki.check_client(client_cert(), CA_PEM, NODE, NOW)
    assert (enrollment.username, enrollment.role) == (node_id_of(NODE), pki.ROLE_NODE)
    assert (
        enrollment.ca_fingerprint
        == hashlib.sha256(
            x509.load_pem_x509_certificate(CA_PEM).public_bytes(serialization.Encoding.DER)
        ).hexdigest()
    )


def test_the_accounting_role_has_a_name_no_node_can_have() -> None:
    enrollment = pki.check_client(client_cert(pki.ROLE_ACCOUNTING), CA_PEM, NODE, NOW)
    assert enrollment.username == pki.ACCOUNTING_USER
    assert not pki.ACCOUNTING_USER.startswith("mv")
    with pytest.raises(pki.CertificateError, match="unknown role"):
        client_cert("admin")


def test_a_certificate_is_refused_for_another_key_ca_or_time() -> None:
    other = new_ed25519().ed25519_public()
    with pytest.raises(pki.CertificateError, match="not this node"):
        pki.check_client(client_cert(), CA_PEM, other, NOW)
    rogue_ca = pki.make_ca(new_ed25519(), NOW)
    with pytest.raises(pki.CertificateError, match="signature does not verify"):
        pki.check_client(client_cert(), rogue_ca, NODE, NOW)
    with pytest.raises(pki.CertificateError, match="expired"):
        pki.check_client(client_cert(days=1), CA_PEM, NODE, NOW + dt.timedelta(days=2))
    with pytest.raises(pki.CertificateError, match="not valid yet"):
        pki.check_client(client_cert(), CA_PEM, NODE, NOW - dt.timedelta(hours=1))
    with pytest.raises(pki.CertificateError, match="CA key does not belong"):
        pki.issue_client(new_ed25519(), CA_PEM, NODE, pki.ROLE_NODE, now=NOW)


def test_a_ca_with_the_same_name_but_another_key_is_caught() -> None:
    """Same subject, other key: the issuer name matches, the signature must not."""
    impostor_key = new_ed25519()
    impostor = pki.make_ca(impostor_key, NOW)
    forged = pki.issue_client(impostor_key, impostor, NODE, pki.ROLE_NODE, now=NOW)
    with pytest.raises(pki.CertificateError, match="signature does not verify"):
        pki.check_client(forged, CA_PEM, NODE, NOW)


def test_every_flipped_bit_in_the_certificate_fails() -> None:
    """All of them, not a sample: a certificate is a few hundred bytes."""
    der = x509.load_pem_x509_certificate(client_cert()).public_bytes(serialization.Encoding.DER)
    checked = 0
    for bit in range(len(der) * 8):
        mangled = bytearray(der)
        mangled[bit // 8] ^= 1 << (bit % 8)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                pem = x509.load_der_x509_certificate(bytes(mangled)).public_bytes(
                    serialization.Encoding.PEM
                )
        except (ValueError, x509.InvalidVersion):
            continue  # not even a certificate any more
        checked += 1
        with pytest.raises(pki.CertificateError):
            pki.check_client(pem, CA_PEM, NODE, NOW)
    assert checked > len(der) * 4  # most flips still parse, and are caught by the checks


def test_bundles_are_the_client_then_the_ca() -> None:
    bundle = client_cert() + CA_PEM
    leaf, ca, _ = pki.read_bundle(bundle, NODE, NOW)
    assert (leaf, ca) == (client_cert(), CA_PEM)
    for bad in (client_cert(), CA_PEM + client_cert() + CA_PEM, b"", b"junk"):
        with pytest.raises(pki.CertificateError):
            pki.read_bundle(bad, NODE, NOW)


def test_server_certificate_names() -> None:
    server = new_ed25519().ed25519_public()
    names = ["broker.example", "203.0.113.2", "2001:db8::2"]
    pem = pki.issue_server(CA_KEY, CA_PEM, server, names, now=NOW)
    assert sorted(pki.server_names(pem)) == sorted(names)
    for bad in ([], ["has space"], ["a/b"]):
        with pytest.raises(pki.CertificateError):
            pki.issue_server(CA_KEY, CA_PEM, server, bad, now=NOW)


def test_certificate_vectors() -> None:
    """Certificates are deterministic (Ed25519, serial from key and time): pinned here."""
    vectors = json.loads(VECTORS.read_text())
    assert len(vectors) >= 2
    for v in vectors:
        ca_key = PrivateKey(bytes.fromhex(v["ca_seed"]))
        node = PrivateKey(bytes.fromhex(v["identity_seed"])).ed25519_public()
        now = dt.datetime.fromisoformat(v["now"])
        ca = pki.make_ca(ca_key, now)
        cert = pki.issue_client(ca_key, ca, node, v["role"], now=now)
        assert ca.decode() == v["ca_pem"]
        assert cert.decode() == v["client_pem"]
        assert pki.check_client(cert, ca, node, now).username == v["username"]


# ---- the node's side -----------------------------------------------------------------


def test_enrollment_round_trip_and_tls_context(tmp_path: Path) -> None:
    identity, _ = init_identity(tmp_path / "node")
    with pytest.raises(ConfigError, match="not enrolled") as info:
        load_credentials(tmp_path / "node", identity)
    assert "meshvpn init --enroll" in info.value.one_line()
    bundle = pki.issue_client(
        CA_KEY, CA_PEM, identity.identity_public, pki.ROLE_NODE, now=dt.datetime.now(dt.UTC)
    )
    install_enrollment(tmp_path / "node", identity, bundle + CA_PEM)
    creds = load_credentials(tmp_path / "node", identity)
    assert creds.enrollment.username == identity.node_id
    assert identity.identity_key.raw.hex() not in repr(creds)
    ctx = creds.context("203.0.113.2")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    # the identity key went through memory only: no new file in the state dir
    assert sorted(p.name for p in (tmp_path / "node").iterdir()) == [
        "broker-ca.crt",
        "broker.crt",
        "control.key",
        "identity.key",
        "wireguard.key",
    ]


def test_someone_elses_bundle_is_refused(tmp_path: Path) -> None:
    identity, _ = init_identity(tmp_path / "node")
    with pytest.raises(ConfigError, match="not this node") as info:
        install_enrollment(tmp_path / "node", identity, client_cert() + CA_PEM)
    assert "\n" not in info.value.one_line()
    assert not (tmp_path / "node" / "broker.crt").exists()


def test_broker_address_keeps_the_name_to_check() -> None:
    assert BrokerAddress.parse("broker.example") == BrokerAddress("broker.example", 8883)
    assert BrokerAddress.parse("[2001:db8::2]:1883") == BrokerAddress("2001:db8::2", 1883)
    assert BrokerAddress.parse("[2001:db8::2]") == BrokerAddress("2001:db8::2", 8883)
    resolved = dataclasses.replace(BrokerAddress.parse("broker.example"), dial="203.0.113.2")
    assert str(resolved) == "broker.example:8883"
    with pytest.raises(LocalError):
        BrokerAddress.parse("host:0")


# ---- the broker's side ---------------------------------------------------------------


def test_broker_init_and_enroll(tmp_path: Path) -> None:
    d = tmp_path / "broker"
    assert broker.init_broker(d, ["203.0.113.2"], NOW) == ["203.0.113.2"]
    ca = (d / "ca.crt").read_bytes()
    for name in ("ca.key", "server.key"):
        assert (d / name).stat().st_mode & 0o777 == 0o600
    # again: the CA stays, the names stay unless new ones are given
    assert broker.init_broker(d, [], NOW) == ["203.0.113.2"]
    assert broker.init_broker(d, ["broker.example"], NOW) == ["broker.example"]
    assert (d / "ca.crt").read_bytes() == ca
    bundle = broker.enroll(d, NODE, now=NOW)
    assert pki.read_bundle(bundle, NODE, NOW)[2].username == node_id_of(NODE)
    # renewed when it runs out
    later = NOW + dt.timedelta(days=pki.SERVER_DAYS - 10)
    broker.init_broker(d, [], later)
    assert pki.not_after((d / "server.crt").read_bytes()) > later + dt.timedelta(days=300)


def test_broker_refuses_keys_open_to_others_and_missing_ca(tmp_path: Path) -> None:
    d = tmp_path / "broker"
    with pytest.raises(ConfigError, match="no broker CA"):
        broker.enroll(d, NODE)
    broker.init_broker(d, ["203.0.113.2"], NOW)
    for name in ("ca.key", "server.key"):
        os.chmod(d / name, 0o640)  # noqa: PTH101
        with pytest.raises(ConfigError, match=f"{name} is open to other users") as info:
            broker.init_broker(d, [], NOW)
        assert f"chmod 600 {d / name}" in info.value.one_line()
        os.chmod(d / name, 0o600)  # noqa: PTH101


def test_broker_without_a_name_says_which_flag(tmp_path: Path) -> None:
    anywhere = broker.ipaddress.ip_address("0.0.0.0")  # noqa: S104
    for names in ((), ("",)):  # "": MESHVPN_BROKER_NAME unset in the unit
        cfg = broker.BrokerConfig(tmp_path / "b", anywhere, names=names)
        with pytest.raises(LocalError) as info:
            broker.prepare(cfg, NOW)
        assert "--name HOST" in info.value.one_line()
    cfg = broker.BrokerConfig(tmp_path / "b", anywhere, names=("", "broker.example"))
    assert broker.prepare(cfg, NOW) == tmp_path / "b" / "mosquitto.conf"
    assert (tmp_path / "b" / "acl").read_text() == broker.render_acl()


def test_config_is_tls_only_with_client_certificates(tmp_path: Path) -> None:
    cfg = broker.BrokerConfig(tmp_path, broker.ipaddress.ip_address("203.0.113.2"))
    conf = dict(
        line.split(" ", 1) for line in broker.render_config(cfg).splitlines() if " " in line
    )
    assert conf["listener"] == "8883 203.0.113.2"
    assert conf["allow_anonymous"] == "false"
    assert conf["require_certificate"] == "true"
    assert conf["use_identity_as_username"] == "true"
    assert conf["tls_version"] == "tlsv1.3"
    assert conf["set_tcp_nodelay"] == "true"  # else 40 ms per TLS connection
    assert conf["acl_file"] == str(tmp_path / "acl")


# ---- the ACL, against a plain model of mosquitto's acl_file rules ------------------


def _matches(topic_filter: str, topic: str) -> bool:
    f, t = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return not topic.startswith("$")
        if i >= len(t) or (part not in ("+", t[i])):
            return False
    return len(f) == len(t) and not (topic.startswith("$") and f[0] in ("+", "#"))


def allowed(user: str, access: str, topic: str) -> bool:
    """mosquitto acl_file: `pattern` lines for every user (%u = username), `topic` lines
    for the user whose `user` section they are in. Deny unless a rule grants."""
    section = None
    for line in broker.render_acl().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "user":
            section = words[1]
            continue
        kind, grant, topic_filter = words
        if kind == "pattern":
            topic_filter = topic_filter.replace("%u", user)
        elif section != user:
            continue
        if access in grant and _matches(topic_filter, topic):
            return True
    return False


A, B, R = "mvaaaa", "mvbbbb", "mvrrrr"  # two clients and a relay
ACC = pki.ACCOUNTING_USER
V1 = "meshvpn/v1"
POLICY = [
    # who, may read or write, what topic: allowed?
    (R, "write", f"{V1}/announce/{R}", True),
    (A, "write", f"{V1}/announce/{R}", False),
    (R, "write", f"{V1}/announce/{R}/x", False),
    (A, "read", f"{V1}/announce/{R}", True),
    (A, "write", f"{V1}/session/{R}", True),
    (R, "read", f"{V1}/session/{R}", True),
    (A, "read", f"{V1}/session/{R}", False),
    (ACC, "read", f"{V1}/session/{R}", False),
    (R, "write", f"{V1}/reply/{A}/0123", True),
    (A, "read", f"{V1}/reply/{A}/0123", True),
    (B, "read", f"{V1}/reply/{A}/0123", False),
    (A, "read", f"{V1}/sync/{A}/0123", True),
    (A, "write", f"{V1}/sync/{A}/0123", True),
    (B, "read", f"{V1}/sync/{A}/0123", False),
    (B, "write", f"{V1}/sync/{A}/0123", False),
    (R, "write", f"{V1}/receipts/{R}", True),
    (A, "write", f"{V1}/receipts/{R}", False),
    (A, "read", f"{V1}/receipts/{R}", False),
    (R, "read", f"{V1}/receipts/{R}", False),
    (ACC, "read", f"{V1}/receipts/{R}", True),
    (ACC, "write", f"{V1}/booked/{R}", True),
    (R, "read", f"{V1}/booked/{R}", True),
    (A, "read", f"{V1}/booked/{R}", False),
    (R, "write", f"{V1}/booked/{R}", False),  # a relay cannot ack its own receipts
    (ACC, "write", f"{V1}/credit/{A}", True),
    (R, "read", f"{V1}/credit/{A}", True),
    (A, "write", f"{V1}/credit/{A}", False),  # nor a client grant itself credit
    (ACC, "write", f"{V1}/epochs/{ACC}", True),
    (A, "read", f"{V1}/epochs/{ACC}", True),
    (A, "write", f"{V1}/epochs/{A}", False),
    (ACC, "write", f"{V1}/earnings/{R}", True),
    (B, "read", f"{V1}/earnings/{R}", True),
    (R, "write", f"{V1}/earnings/{R}", False),
    (A, "write", "$SYS/broker/x", False),
    (A, "read", "$SYS/broker/uptime", False),
    (A, "write", "elsewhere", False),
]


@pytest.mark.parametrize(("user", "access", "topic", "expected"), POLICY)
def test_acl_policy(user: str, access: str, topic: str, expected: bool) -> None:
    assert allowed(user, access, topic) is expected


def test_acl_has_no_rule_the_model_does_not_know() -> None:
    for line in broker.render_acl().splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"(pattern|topic) (read|write|readwrite) \S+|user \S+", line), line
