"""The relay role: client sessions, the exit (forwarding and NAT), metering."""
