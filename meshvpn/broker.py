"""``meshvpn broker``: mosquitto with a configuration meshvpn writes.

The agents need plain MQTT 3.1.1 (retained messages, last will, QoS 1) over
TLS 1.3 with a client certificate, so any broker that maps a certificate's
common name to a username and has topic ACLs serves (EMQX and VerneMQ do);
this is the embedded default for one box.

Theory of operation
-------------------
The broker's state directory holds its own small CA (``ca.key``, ``ca.crt``),
its server key and certificate, the generated ``mosquitto.conf`` and ``acl``,
and mosquitto's persistence. ``meshvpn broker enroll`` signs a node's
identity key into a client certificate whose CN is the node id (see
``meshvpn.pki``). mosquitto refuses any connection without a certificate from
that CA (``require_certificate``), takes the CN as the username
(``use_identity_as_username``), and the ACL (``render_acl``) lets a node write
only its own announcement and receipt topics, read only its own session
requests and replies, and lets the accounting service read receipts. The
agents still verify every signature: the broker is trusted for delivery only,
and the ACLs keep one node from squatting on, or listening in on, another's
topics.

Limits are set so that one misbehaving client cannot exhaust the broker:
message size (our largest message is 4 KiB), queued and in-flight messages
per client, and persistence so retained announcements survive a restart.

The per-client queue must still hold what a new client is sent at once: on
subscribing to the announcements, every retained one (up to the directory's
``MAX_ENTRIES``), then the client's sync echo after them. mosquitto drops
QoS 0 messages past ``max_queued_messages``/``max_queued_bytes`` when the
client reads slower than the broker writes, as a client verifying signatures
does; with 1 MiB a new client saw fewer than 4,500 of 10,000 relays, and
lost its sync echo too (``bench/scale.py``). The messages themselves are
stored once and shared; a queue entry is a reference.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from meshvpn import pki
from meshvpn.directory import MAX_ENTRIES, TOPIC_ROOT
from meshvpn.errors import ConfigError, LocalError
from meshvpn.identity import (
    PrivateKey,
    PublicKey,
    check_private,
    ensure_state_dir,
    new_ed25519,
    read_key,
    write_new_key,
)

MAX_PAYLOAD: Final = 8192
DEFAULT_PORT: Final = 8883  # MQTT over TLS
CA_KEY: Final = "ca.key"
CA_CERT: Final = "ca.crt"
SERVER_KEY: Final = "server.key"
SERVER_CERT: Final = "server.crt"
ACL_FILE: Final = "acl"
RENEW_BEFORE: Final = dt.timedelta(days=30)
ANNOUNCEMENT_BUDGET: Final = 512  # bytes per queued announcement; a signed one is ~240
MAX_QUEUED: Final = MAX_ENTRIES + 1000  # the whole directory, and room for the rest


@dataclass(frozen=True)
class BrokerConfig:
    state_dir: Path
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int = DEFAULT_PORT
    # Names and addresses clients dial, for the server certificate. Empty: the
    # listen address, or the names of the certificate already there.
    names: tuple[str, ...] = ()
    # mosquitto drops to this user when started as root. The lab runs it as root in
    # a namespace; systemd runs it as a dynamic user, where this has no effect.
    user: str = "root"


def render_acl() -> str:
    """mosquitto's acl_file. Pure.

    ``pattern`` lines apply to every authenticated client, ``%u`` being its
    username (the certificate's CN: a node id, or ``ACCOUNTING_USER``);
    ``topic`` lines after ``user`` only to that user. (mosquitto warns at every
    start about patterns without ``%u``; ours are meant for everyone.) Anything
    not granted is denied: a publish is dropped (PUBACK "not authorized"), and a
    message on a topic one may not read is never delivered, whatever one
    subscribed to.
    """
    root = TOPIC_ROOT
    return f"""\
# Written by meshvpn; edits are overwritten at the next start.
# Every node (relay or client): username = node id.
# announcements: everyone reads, each node writes its own (and its last will)
pattern read {root}/announce/+
pattern write {root}/announce/%u
# session requests: anyone may ask a relay; only the relay reads them
pattern write {root}/session/+
pattern read {root}/session/%u
# grants: a relay answers any client; only that client reads them
pattern write {root}/reply/+/+
pattern read {root}/reply/%u/+
# a client's own echo topic (it learns when the retained messages are all in)
pattern readwrite {root}/sync/%u/+
# receipts: a relay hands in its own; only accounting reads them
pattern write {root}/receipts/%u
# what accounting publishes, signed with its own key: its acks to a relay for that
# relay; credit notices for the relays to act on; epoch statements and each relay's
# earnings report for anyone to check
pattern read {root}/booked/%u
pattern read {root}/credit/+
pattern read {root}/epochs/+
pattern read {root}/earnings/+

user {pki.ACCOUNTING_USER}
topic read {root}/receipts/+
topic write {root}/booked/+
topic write {root}/credit/+
topic write {root}/epochs/+
topic write {root}/earnings/+
"""


def render_config(cfg: BrokerConfig) -> str:
    """The mosquitto.conf for this broker. Pure."""
    d = cfg.state_dir
    return f"""\
# Written by meshvpn; edits are overwritten at the next start.
per_listener_settings false
user {cfg.user}
allow_anonymous false
acl_file {d / ACL_FILE}
listener {cfg.port} {cfg.address}
protocol mqtt
cafile {d / CA_CERT}
certfile {d / SERVER_CERT}
keyfile {d / SERVER_KEY}
tls_version tlsv1.3
require_certificate true
use_identity_as_username true
# Without it Nagle holds TLS 1.3's session ticket back behind the client's delayed
# ACK: 40 ms more for every connection (measured: 57 ms -> 3 ms to CONNACK on loopback).
set_tcp_nodelay true
max_connections 20000
max_packet_size {MAX_PAYLOAD + 512}
# QoS 1 messages sent to a client ahead of its acks: the accounting service acks a
# batch of 256 receipts once booked, with two batches in its pipeline
max_inflight_messages 1000
max_queued_messages {MAX_QUEUED}
max_queued_bytes {MAX_QUEUED * ANNOUNCEMENT_BUDGET}
max_keepalive 300
persistence true
persistence_location {d}/
autosave_interval 30
log_dest stderr
log_type error
log_type warning
log_type notice
connection_messages false
"""


# ---- the CA and the server certificate ----------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o644)
    tmp.replace(path)


def _write_pem_key(path: Path, key: PrivateKey) -> None:
    """A new PEM private key, 0600 from the first byte, never over an existing one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pki.private_pem(key))
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_ca(state_dir: Path) -> ConfigError:
    return ConfigError(
        f"no broker CA in {state_dir}",
        f"run `meshvpn broker init --state-dir {state_dir} --name HOST` on the broker first",
    )


def load_ca(state_dir: Path) -> tuple[PrivateKey, bytes]:
    if not (state_dir / CA_CERT).exists():
        raise _no_ca(state_dir)
    key = read_key(state_dir / CA_KEY, "restore the broker CA's key, or start over with a new CA")
    try:
        return key, (state_dir / CA_CERT).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {state_dir / CA_CERT}: {exc.strerror}") from None


def ensure_ca(state_dir: Path, now: dt.datetime) -> bool:
    """Create the CA if there is none; True if created. An existing CA is never replaced."""
    ensure_state_dir(state_dir)
    if (state_dir / CA_CERT).exists():
        load_ca(state_dir)  # and refuse a key that others may read
        return False
    write_new_key(state_dir / CA_KEY, new_ed25519())
    key = read_key(state_dir / CA_KEY)
    _write_public(state_dir / CA_CERT, pki.make_ca(key, now))
    return True


def _server_key(state_dir: Path) -> PrivateKey:
    path = state_dir / SERVER_KEY
    if not path.exists():
        key = new_ed25519()
        _write_pem_key(path, key)
        return key
    check_private(path, path.stat())
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), None)
    except ValueError:
        loaded = None
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise ConfigError(
            f"key file {path} is corrupt (expected an Ed25519 PEM key)",
            "move it away; the next start makes a new one",
        )
    raw = loaded.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return PrivateKey(raw)


def default_names(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[str, ...]:
    return () if address.is_unspecified else (str(address),)


def ensure_server_cert(state_dir: Path, names: Sequence[str], now: dt.datetime) -> list[str]:
    """Issue the server certificate if it is missing, names other names or expires soon.

    Returns the names it is good for. ``names`` empty keeps the current ones."""
    ca_key, ca_pem = load_ca(state_dir)
    cert_path = state_dir / SERVER_CERT
    current: list[str] = []
    expires = now
    if cert_path.exists():
        pem = cert_path.read_bytes()
        try:
            current, expires = pki.server_names(pem), pki.not_after(pem)
        except pki.CertificateError:
            current = []
    wanted = list(dict.fromkeys(n for n in names if n)) or current  # "": unset in a unit file
    if not wanted:
        raise LocalError(
            "the broker's certificate needs the name or address clients dial",
            "give --name HOST (repeatable), e.g. --name broker.example --name 203.0.113.2",
        )
    fresh = expires - now > RENEW_BEFORE
    if sorted(wanted) == sorted(current) and fresh and _server_matches(state_dir, ca_pem):
        return current
    key = _server_key(state_dir)
    try:
        cert = pki.issue_server(ca_key, ca_pem, key.ed25519_public(), wanted, now=now)
    except pki.CertificateError as exc:
        raise LocalError(str(exc), "give --name HOST, e.g. --name broker.example") from None
    _write_public(cert_path, cert)
    return wanted


def _server_matches(state_dir: Path, ca_pem: bytes) -> bool:
    """The server certificate is for the server key and from this CA (not a leftover)."""
    try:
        key = _server_key(state_dir)
        cert = pki.load_certificate((state_dir / SERVER_CERT).read_bytes())
    except (OSError, pki.CertificateError):
        return False
    ca = pki.load_certificate(ca_pem)
    holder = cert.public_key()
    if not isinstance(holder, ed25519.Ed25519PublicKey):
        return False
    raw = holder.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return cert.issuer == ca.subject and raw == key.ed25519_public().raw


def init_broker(state_dir: Path, names: Sequence[str], now: dt.datetime) -> list[str]:
    """CA (if missing) and a server certificate for ``names``; returns the names."""
    try:
        ensure_ca(state_dir, now)
        return ensure_server_cert(state_dir, names, now)
    except OSError as exc:
        raise LocalError(
            f"cannot write broker state in {state_dir}: {exc.strerror}",
            "pick another --state-dir",
        ) from None


def enroll(
    state_dir: Path,
    identity_public: PublicKey,
    role: str = pki.ROLE_NODE,
    now: dt.datetime | None = None,
    days: int = pki.CLIENT_DAYS,
) -> bytes:
    """A bundle for the node: its client certificate, then the CA certificate."""
    ca_key, ca_pem = load_ca(state_dir)
    try:
        leaf = pki.issue_client(ca_key, ca_pem, identity_public, role, now=now or _now(), days=days)
    except pki.CertificateError as exc:
        raise LocalError(str(exc)) from None
    return leaf + ca_pem


# ---- running it -----------------------------------------------------------------


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )
    if found is None:
        raise LocalError(
            "mosquitto not found",
            "install it with `apt-get install --no-install-recommends mosquitto`",
        )
    return found


def prepare(cfg: BrokerConfig, now: dt.datetime) -> Path:
    """Make the CA and certificates if needed, write the configuration; return its path."""
    init_broker(cfg.state_dir, [n for n in cfg.names if n] or default_names(cfg.address), now)
    try:
        if cfg.user != "root":
            shutil.chown(cfg.state_dir, cfg.user)
        (cfg.state_dir / ACL_FILE).write_text(render_acl())
        conf = cfg.state_dir / "mosquitto.conf"
        conf.write_text(render_config(cfg))
    except OSError as exc:
        raise LocalError(
            f"cannot write broker state in {cfg.state_dir}: {exc.strerror}",
            "pick another --state-dir",
        ) from None
    return conf


def run_broker(cfg: BrokerConfig) -> NoReturn:
    """Write the configuration, then replace this process with mosquitto."""
    binary = mosquitto_binary()
    conf = prepare(cfg, _now())
    # Become mosquitto: signals, exit status and supervision (systemd, the lab)
    # then reach the broker itself, with no wrapper to orphan it.
    os.execv(binary, [binary, "-c", str(conf)])  # noqa: S606


def default_state_dir() -> Path:
    return Path(os.environ.get("MESHVPN_BROKER_DIR", "/var/lib/meshvpn/broker"))
