"""Ports for listeners that bind a moment after the port is chosen (dev stack services, local VMs'
gateways, test servers).

A port the kernel hands out for `bind(0)` comes from its ephemeral range, the range every outgoing
connection also takes its source port from: between choosing and binding, a connection to
PostgreSQL or Temporal can take it, and the listener fails with "address already in use". So the
port is chosen at random below that range, where the kernel never assigns one by itself.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Collection
from pathlib import Path

_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    try:
        return int(_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def unused_port(host: str = "127.0.0.1", avoid: Collection[int] = ()) -> int:
    """A port nothing is bound to now, outside the ephemeral range (and not in `avoid`)."""
    low = _ephemeral_low()
    floor = 10_000 if low > 12_000 else 1024
    for _ in range(200):
        port = floor + secrets.randbelow(low - floor)
        if port in avoid:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    raise OSError(f"no unused port on {host} below {low}")
