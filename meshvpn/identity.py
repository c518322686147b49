"""Node identity: three keys in a state directory.

- ``identity.key``  Ed25519: signs announcements and receipts; the node id and
  the mesh address are derived from its public half.
- ``wireguard.key`` X25519: the WireGuard interface key (wg(8)'s base64 format).
- ``control.key``   X25519: Noise handshakes on the control plane, kept apart
  from the WireGuard key so neither protocol can be turned against the other.

Every file holds one line of base64 of 32 raw bytes. The directory is 0700 and
files are 0600; keys are created with O_EXCL and linked into place, so an
existing key is never overwritten, even by two racing ``init``s.

Private keys live in ``PrivateKey``, whose repr and str never show the key.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import ipaddress
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from meshvpn.errors import ConfigError, LocalError

KEY_LEN: Final = 32
SIGNATURE_LEN: Final = 64
DEFAULT_STATE_DIR: Final = Path("/var/lib/meshvpn")
KEY_FILES: Final = ("identity.key", "wireguard.key", "control.key")

_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NOENC = serialization.NoEncryption()


@dataclass(frozen=True, order=True)
class PublicKey:
    """32 public bytes; prints as standard base64 (wg(8) style)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise ValueError(f"a public key is {KEY_LEN} bytes, got {len(self.raw)}")

    @classmethod
    def from_b64(cls, text: str) -> PublicKey:
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except binascii.Error:
            # Not echoed: people paste the wrong key, and it may be a private one.
            raise ValueError(f"not base64 ({len(text.strip())} characters)") from None
        return cls(raw)

    @property
    def b64(self) -> str:
        return base64.b64encode(self.raw).decode()

    @property
    def hex(self) -> str:
        return self.raw.hex()

    def __str__(self) -> str:
        return self.b64

    def ed25519_verify(self, signature: bytes, data: bytes) -> None:
        """Raise InvalidSignature unless ``signature`` is this key's over ``data``.

        libsodium (PyNaCl), not OpenSSL: it verifies in half the time here
        (55 against 113 us), which is what bounds accounting's ingest, and it is
        the stricter of the two (small-order keys and points, non-canonical
        encodings are refused), so nothing OpenSSL would refuse gets through."""
        if len(signature) != SIGNATURE_LEN:
            raise InvalidSignature
        try:
            crypto_sign_open(signature + data, self.raw)
        except BadSignatureError:
            raise InvalidSignature from None


@dataclass(frozen=True)
class PrivateKey:
    """32 secret bytes that never show up in repr, str, logs or errors."""

    raw: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise ValueError(f"a private key is {KEY_LEN} bytes")

    def __repr__(self) -> str:
        return "PrivateKey(<redacted>)"

    __str__ = __repr__

    @property
    def hex(self) -> str:
        """For the WireGuard UAPI only; never log the result."""
        return self.raw.hex()

    # Key objects and public halves are derived once: each derivation is a scalar
    # multiplication, which made signing a receipt five times dearer than the
    # signature itself. (cached_property writes to __dict__, so this works on a
    # frozen dataclass and stays out of eq and repr.)
    @functools.cached_property
    def _ed25519(self) -> ed25519.Ed25519PrivateKey:
        return ed25519.Ed25519PrivateKey.from_private_bytes(self.raw)

    @functools.cached_property
    def _x25519_public(self) -> PublicKey:
        priv = x25519.X25519PrivateKey.from_private_bytes(self.raw)
        return PublicKey(priv.public_key().public_bytes(_RAW, _RAW_PUB))

    @functools.cached_property
    def _ed25519_public(self) -> PublicKey:
        return PublicKey(self._ed25519.public_key().public_bytes(_RAW, _RAW_PUB))

    def x25519_public(self) -> PublicKey:
        return self._x25519_public

    def ed25519_public(self) -> PublicKey:
        return self._ed25519_public

    def ed25519_sign(self, message: bytes) -> bytes:
        return self._ed25519.sign(message)


def new_x25519() -> PrivateKey:
    return PrivateKey(x25519.X25519PrivateKey.generate().private_bytes(_RAW, _RAW_PRIV, _NOENC))


def new_ed25519() -> PrivateKey:
    return PrivateKey(ed25519.Ed25519PrivateKey.generate().private_bytes(_RAW, _RAW_PRIV, _NOENC))


def node_id_of(identity_public: PublicKey) -> str:
    """Short, topic-safe node id: 'mv' + 26 base32 chars of a labelled hash."""
    digest = hashlib.sha256(b"meshvpn/v1/node-id\x00" + identity_public.raw).digest()
    return "mv" + base64.b32encode(digest[:16]).decode().rstrip("=").lower()


def mesh_address_of(identity_public: PublicKey) -> ipaddress.IPv6Address:
    """IPv6 ULA /128 from the identity key: fd + 120 bits of a labelled hash."""
    digest = hashlib.sha256(b"meshvpn/v1/mesh-address\x00" + identity_public.raw).digest()
    return ipaddress.IPv6Address(b"\xfd" + digest[:15])


def mesh_prefix_of(mesh_address: ipaddress.IPv6Address) -> ipaddress.IPv6Network:
    """The /64 a node originates in the mesh: its own address and its clients'."""
    return ipaddress.IPv6Network(f"{mesh_address}/64", strict=False)


def client_mesh_address(
    relay_mesh_address: ipaddress.IPv6Address, tunnel_address: ipaddress.IPv4Address
) -> ipaddress.IPv6Address:
    """A client's mesh address on its access link: the relay's /64 and the 32
    bits of its IPv4 tunnel address, so both sides derive it from the grant."""
    network = mesh_prefix_of(relay_mesh_address).network_address
    return ipaddress.IPv6Address(int(network) | int(tunnel_address))


@dataclass(frozen=True)
class Identity:
    identity_key: PrivateKey
    wireguard_key: PrivateKey
    control_key: PrivateKey

    @property
    def identity_public(self) -> PublicKey:
        return self.identity_key.ed25519_public()

    @property
    def wireguard_public(self) -> PublicKey:
        return self.wireguard_key.x25519_public()

    @property
    def control_public(self) -> PublicKey:
        return self.control_key.x25519_public()

    @property
    def node_id(self) -> str:
        return node_id_of(self.identity_public)

    @property
    def mesh_address(self) -> ipaddress.IPv6Address:
        return mesh_address_of(self.identity_public)

    def public_summary(self) -> dict[str, str]:
        return {
            "node_id": self.node_id,
            "identity_public_key": self.identity_public.b64,
            "wireguard_public_key": self.wireguard_public.b64,
            "control_public_key": self.control_public.b64,
            "mesh_address": str(self.mesh_address),
        }


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def ensure_state_dir(state_dir: Path) -> None:
    """Create the state directory 0700, or check that an existing one is private
    (its group may traverse it to reach the control socket, never list it)."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(state_dir.stat().st_mode)
        if mode & 0o067:  # group may traverse, no more (the control socket: meshvpn.control)
            state_dir.chmod(mode & 0o710)
        probe = state_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise LocalError(
            f"cannot use state directory {state_dir}: {_os_reason(exc)}",
            "pick a writable directory with --state-dir",
        ) from exc


def write_new_key(path: Path, key: PrivateKey) -> bool:
    """Write a key only if none exists; returns True if written."""
    if path.exists():
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, base64.b64encode(key.raw) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another init won the race: never overwrite
    except FileExistsError:
        return False
    finally:
        tmp.unlink()
    return True


def init_identity(state_dir: Path) -> tuple[Identity, list[str]]:
    """Create whatever keys are missing; return the identity and the files created."""
    ensure_state_dir(state_dir)
    makers = {"identity.key": new_ed25519, "wireguard.key": new_x25519, "control.key": new_x25519}
    created = []
    try:
        for name, make in makers.items():
            if write_new_key(state_dir / name, make()):
                created.append(name)
    except OSError as exc:
        raise LocalError(
            f"cannot write keys in {state_dir}: {_os_reason(exc)}",
            "pick a writable directory with --state-dir",
        ) from exc
    return load_identity(state_dir), created


def check_private(path: Path, st: os.stat_result) -> None:
    """Refuse a secret file that anyone but its owner may read or write."""
    if st.st_mode & 0o077:
        raise ConfigError(
            f"key file {path} is open to other users (mode {stat.S_IMODE(st.st_mode):04o})",
            f"run `chmod 600 {path}` and consider the key exposed",
        )


def read_key(path: Path, hint_missing: str = "") -> PrivateKey:
    """One key file in our format (one line of base64), refused unless it is private."""
    hint_init = hint_missing or f"run `meshvpn init --state-dir {path.parent}` first"
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"no key file {path}", hint_init) from None
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {_os_reason(exc)}") from exc
    check_private(path, st)
    data = path.read_bytes()
    try:
        raw = base64.b64decode(data.strip(), validate=True)
        return PrivateKey(raw)
    except (binascii.Error, ValueError):
        # Say nothing about the content: it may be a real key with a typo.
        raise ConfigError(
            f"key file {path} is corrupt (expected one line of base64 of {KEY_LEN} bytes)",
            "restore it from a backup, or move it away and run `meshvpn init` for a new key",
        ) from None


def load_identity(state_dir: Path) -> Identity:
    if not state_dir.is_dir():
        raise ConfigError(
            f"state directory {state_dir} does not exist",
            f"run `meshvpn init --state-dir {state_dir}` first",
        )
    return Identity(
        identity_key=read_key(state_dir / "identity.key"),
        wireguard_key=read_key(state_dir / "wireguard.key"),
        control_key=read_key(state_dir / "control.key"),
    )
