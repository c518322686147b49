"""``meshvpn broker``: mosquitto with a configuration meshvpn writes.

The agents only need plain MQTT 3.1.1 (retained messages, last will, QoS 1),
so any broker works; this is the embedded default for one box. Limits are
set so that one misbehaving client cannot exhaust the broker: message size
(our largest message is 4 KiB), queued and in-flight messages per client,
and persistence so retained announcements survive a broker restart.

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

import ipaddress
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NoReturn

from meshvpn.directory import MAX_ENTRIES
from meshvpn.errors import LocalError

MAX_PAYLOAD: Final = 8192
ANNOUNCEMENT_BUDGET: Final = 512  # bytes per queued announcement; a signed one is ~240
MAX_QUEUED: Final = MAX_ENTRIES + 1000  # the whole directory, and room for the rest


@dataclass(frozen=True)
class BrokerConfig:
    state_dir: Path
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int = 1883
    # mosquitto drops to this user when started as root. The lab runs it as root in
    # a namespace; systemd runs it as a dynamic user, where this has no effect.
    user: str = "root"


def render_config(cfg: BrokerConfig) -> str:
    """The mosquitto.conf for this broker. Pure."""
    return f"""\
# Written by meshvpn; edits are overwritten at the next start.
per_listener_settings false
user {cfg.user}
listener {cfg.port} {cfg.address}
allow_anonymous true
protocol mqtt
max_connections 20000
max_packet_size {MAX_PAYLOAD + 512}
max_inflight_messages 100
max_queued_messages {MAX_QUEUED}
max_queued_bytes {MAX_QUEUED * ANNOUNCEMENT_BUDGET}
max_keepalive 300
persistence true
persistence_location {cfg.state_dir}/
autosave_interval 30
log_dest stderr
log_type error
log_type warning
log_type notice
connection_messages false
"""


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


def run_broker(cfg: BrokerConfig) -> NoReturn:
    """Write the configuration, then replace this process with mosquitto."""
    binary = mosquitto_binary()
    try:
        cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if cfg.user != "root":
            shutil.chown(cfg.state_dir, cfg.user)
        conf = cfg.state_dir / "mosquitto.conf"
        conf.write_text(render_config(cfg))
    except OSError as exc:
        raise LocalError(
            f"cannot write broker state in {cfg.state_dir}: {exc.strerror}",
            "pick another --state-dir",
        ) from None
    # Become mosquitto: signals, exit status and supervision (systemd, the lab)
    # then reach the broker itself, with no wrapper to orphan it.
    os.execv(binary, [binary, "-c", str(conf)])  # noqa: S606


def default_state_dir() -> Path:
    return Path(os.environ.get("MESHVPN_BROKER_DIR", "/var/lib/meshvpn/broker"))
