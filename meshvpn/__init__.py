"""meshvpn: a bandwidth-sharing mesh VPN over WireGuard."""

__version__ = "0.1.0"
