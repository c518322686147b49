"""Certificates for the broker: its CA, its server certificate, and client
certificates bound to node identities. Pure: keys, names and ``now`` come in,
PEM goes out; nothing here touches files, sockets or clocks.

Theory of operation
-------------------
The broker authenticates every MQTT connection with TLS 1.3 client
certificates, and its ACLs name topics after the certificate's common name
(mosquitto: ``use_identity_as_username``). So the CN must be something a node
cannot choose: for a node it is its node id, and the certificate's key *is*
the node's Ed25519 identity key. ``issue_client`` derives the CN from the key
it certifies, so the CA cannot be talked into certifying a node id for a
different key, and the TLS handshake (CertificateVerify) proves that the peer
holds the identity key itself: no second secret to lose or leak. TLS 1.3 signs
``64 spaces || "TLS 1.3, client CertificateVerify" || 0 || hash``, which can
never be one of our own signed messages (they start with ``meshvpn/v1/``), so
sharing the key across the two protocols is safe; that is also why both ends
insist on TLS 1.3.

Roles go into the OU. ``node`` (relays and clients alike: anyone may relay)
gets CN = node id. ``accounting`` (the service that reads every receipt and
publishes epoch statements) gets the fixed CN ``ACCOUNTING_USER``, which no
node id can equal (node ids are ``mv`` + base32), and which the broker's ACL
grants its extra rights to.

A bundle, what ``meshvpn broker enroll`` prints, is the client certificate
followed by the CA certificate; ``read_bundle`` splits and checks it on the
node.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID

from meshvpn.identity import PrivateKey, PublicKey, node_id_of

ROLE_NODE: Final = "node"
ROLE_ACCOUNTING: Final = "accounting"
ROLES: Final = (ROLE_NODE, ROLE_ACCOUNTING)
ACCOUNTING_USER: Final = "meshvpn-accounting"
CA_COMMON_NAME: Final = "meshvpn broker CA"
ORGANIZATION: Final = "meshvpn"
CLOCK_SKEW: Final = dt.timedelta(minutes=5)  # not-before is backdated this much
CA_DAYS: Final = 3650
SERVER_DAYS: Final = 365
CLIENT_DAYS: Final = 365

_PEM = serialization.Encoding.PEM


class CertificateError(ValueError):
    """A certificate or bundle is not what it must be; the message says what (no secrets)."""


@dataclass(frozen=True)
class Enrollment:
    """What a node's certificate says about it."""

    username: str  # the CN: what the broker's ACLs call this node
    role: str
    not_after: dt.datetime
    ca_fingerprint: str  # sha256 of the CA certificate's DER, hex


def username_for(identity_public: PublicKey, role: str) -> str:
    if role == ROLE_NODE:
        return node_id_of(identity_public)
    if role == ROLE_ACCOUNTING:
        return ACCOUNTING_USER
    raise CertificateError(f"unknown role {role!r} (one of {', '.join(ROLES)})")


def _ed25519(key: PrivateKey) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(key.raw)


def _public(key: PublicKey) -> ed25519.Ed25519PublicKey:
    return ed25519.Ed25519PublicKey.from_public_bytes(key.raw)


def _raw_public(cert: x509.Certificate) -> PublicKey | None:
    public = cert.public_key()
    if not isinstance(public, ed25519.Ed25519PublicKey):
        return None
    return PublicKey(
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def _name(common_name: str, unit: str | None = None) -> x509.Name:
    attrs = [
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ]
    if unit is not None:
        attrs.insert(1, x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    return x509.Name(attrs)


def _serial(public: PublicKey, now: dt.datetime) -> int:
    """Positive, under 2**159, unique per key and second; deterministic, so vectors hold."""
    digest = hashlib.sha256(public.raw + int(now.timestamp()).to_bytes(8, "big")).digest()
    return int.from_bytes(digest[:19], "big") | 1


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public: PublicKey,
    now: dt.datetime,
    days: int,
) -> x509.CertificateBuilder:
    if days < 1:
        raise CertificateError(f"a certificate must be valid for at least a day, not {days}")
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(_public(public))
        .serial_number(_serial(public, now))
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _leaf_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(ca_key: PrivateKey, now: dt.datetime, days: int = CA_DAYS) -> bytes:
    """A self-signed Ed25519 CA that may sign leaves only (path length 0)."""
    name = _name(CA_COMMON_NAME)
    public = ca_key.ed25519_public()
    cert = (
        _builder(name, name, public, now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(_public(public)), critical=False)
        .sign(_ed25519(ca_key), None)
    )
    return cert.public_bytes(_PEM)


def _load_ca(ca_key: PrivateKey, ca_pem: bytes) -> x509.Certificate:
    ca = load_certificate(ca_pem)
    if _raw_public(ca) != ca_key.ed25519_public():
        raise CertificateError("the CA key does not belong to the CA certificate")
    return ca


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name.strip("[]"))))
        except ValueError:
            if not name or any(c.isspace() or c in "/:@" for c in name):
                raise CertificateError(f"bad broker name {name!r}") from None
            entries.append(x509.DNSName(name.lower()))
    return x509.SubjectAlternativeName(entries)


def issue_server(
    ca_key: PrivateKey,
    ca_pem: bytes,
    server_public: PublicKey,
    names: Sequence[str],
    *,
    now: dt.datetime,
    days: int = SERVER_DAYS,
) -> bytes:
    """The broker's certificate, for the host names and addresses clients dial."""
    if not names:
        raise CertificateError("the broker's certificate needs at least one name or address")
    ca = _load_ca(ca_key, ca_pem)
    cert = (
        _builder(_name(names[0], "broker"), ca.subject, server_public, now, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(names), critical=False)
        .sign(_ed25519(ca_key), None)
    )
    return cert.public_bytes(_PEM)


def issue_client(
    ca_key: PrivateKey,
    ca_pem: bytes,
    identity_public: PublicKey,
    role: str,
    *,
    now: dt.datetime,
    days: int = CLIENT_DAYS,
) -> bytes:
    """A client certificate for ``identity_public``: CN from the key and role, never chosen."""
    ca = _load_ca(ca_key, ca_pem)
    cert = (
        _builder(
            _name(username_for(identity_public, role), role), ca.subject, identity_public, now, days
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(_ed25519(ca_key), None)
    )
    return cert.public_bytes(_PEM)


def load_certificate(pem: bytes) -> x509.Certificate:
    try:
        with warnings.catch_warnings():
            # what cryptography only warns about (a serial <= 0, ...) is refused here
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            return x509.load_pem_x509_certificate(pem)
    except (ValueError, x509.InvalidVersion, CryptographyDeprecationWarning):
        raise CertificateError("not a well-formed PEM certificate") from None


def split_pem(text: bytes) -> list[bytes]:
    """Every PEM certificate block in ``text``, in order."""
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    blocks = []
    rest = text
    while (start := rest.find(begin)) >= 0:
        stop = rest.find(end, start)
        if stop < 0:
            break
        blocks.append(rest[start : stop + len(end)] + b"\n")
        rest = rest[stop + len(end) :]
    return blocks


def fingerprint(pem: bytes) -> str:
    return hashlib.sha256(
        load_certificate(pem).public_bytes(serialization.Encoding.DER)
    ).hexdigest()


def _attr(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if len(values) == 1 else ""


def check_client(
    leaf_pem: bytes, ca_pem: bytes, identity_public: PublicKey, now: dt.datetime
) -> Enrollment:
    """Is ``leaf_pem`` this identity's valid certificate from that CA? CertificateError if not."""
    try:
        return _check_client(leaf_pem, ca_pem, identity_public, now)
    except (ValueError, UnsupportedAlgorithm) as exc:  # parsed lazily: malformed inside
        if isinstance(exc, CertificateError):
            raise
        raise CertificateError("malformed certificate") from None


def _check_client(
    leaf_pem: bytes, ca_pem: bytes, identity_public: PublicKey, now: dt.datetime
) -> Enrollment:
    leaf, ca = load_certificate(leaf_pem), load_certificate(ca_pem)
    holder = _raw_public(leaf)
    if holder != identity_public:
        whose = f"node {node_id_of(holder)}" if holder is not None else "a non-Ed25519 key"
        raise CertificateError(
            f"the certificate is for {whose}, not this node ({node_id_of(identity_public)})"
        )
    if leaf.signature_algorithm_oid != SignatureAlgorithmOID.ED25519:
        raise CertificateError("the certificate is not signed with Ed25519")
    ca_public = _raw_public(ca)
    if ca_public is None or leaf.issuer != ca.subject:
        raise CertificateError("the certificate was not issued by the CA that came with it")
    try:
        _public(ca_public).verify(leaf.signature, leaf.tbs_certificate_bytes)
    except InvalidSignature:
        raise CertificateError("the certificate's signature does not verify") from None
    role = _attr(leaf.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    username = _attr(leaf.subject, NameOID.COMMON_NAME)
    if role not in ROLES or username != username_for(identity_public, role):
        raise CertificateError(f"the certificate names {username!r} in role {role!r}")
    if now >= leaf.not_valid_after_utc:
        raise CertificateError(f"the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    if now < leaf.not_valid_before_utc:
        raise CertificateError("the certificate is not valid yet (is this host's clock right?)")
    return Enrollment(username, role, leaf.not_valid_after_utc, fingerprint(ca_pem))


def read_bundle(
    text: bytes, identity_public: PublicKey, now: dt.datetime
) -> tuple[bytes, bytes, Enrollment]:
    """Split what ``meshvpn broker enroll`` printed into (client cert, CA cert) and check it."""
    blocks = split_pem(text)
    if len(blocks) != 2:
        raise CertificateError(
            f"expected two certificates (this node's, then the broker CA's), found {len(blocks)}"
        )
    leaf_pem, ca_pem = blocks
    return leaf_pem, ca_pem, check_client(leaf_pem, ca_pem, identity_public, now)


def server_names(pem: bytes) -> list[str]:
    """The names and addresses a server certificate is good for."""
    try:
        san = load_certificate(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    names = [str(n) for n in san.value.get_values_for_type(x509.IPAddress)]
    return [*san.value.get_values_for_type(x509.DNSName), *names]


def not_after(pem: bytes) -> dt.datetime:
    return load_certificate(pem).not_valid_after_utc


def private_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM of an Ed25519 key, for OpenSSL. A secret: never log or keep it."""
    return _ed25519(key).private_bytes(
        _PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
