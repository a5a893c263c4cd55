"""Tunables of the proxy process, with the defaults production runs with.

Kept out of `settings.py` on purpose: none of them is a deployment secret or address, and tests
tighten a few (short re-check intervals, small limits) without touching the environment.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class ProxyConfig:
    # Browser sessions
    auth_cache_ttl_s: float = 1.0
    """How long one (session, agent) lookup is reused; a deleted session stops working after this."""
    session_recheck_s: float = 60.0
    """Open WebSockets re-check their session, ownership and VPS state this often."""

    # WebSocket relay
    max_client_frame_bytes: int = 16 * MIB
    """Largest browser message we buffer; also advertised to the UI as hello-ok policy.maxPayload."""
    max_upstream_frame_bytes: int = 32 * MIB
    max_connect_frame_bytes: int = 64 * 1024
    """Pre-auth cap, as on the gateway."""
    handshake_timeout_s: float = 15.0
    upstream_connect_timeout_s: float = 10.0
    heartbeat_s: float = 25.0
    close_timeout_s: float = 3.0
    """How long a close waits for the peer's close frame."""

    # HTTP
    max_rewritten_html_bytes: int = 4 * MIB

    # Per-user limits (per proxy process)
    http_rate_per_s: float = 50.0
    http_burst: int = 300
    ws_connections_per_user: int = 10
    ws_frame_rate_per_s: float = 50.0
    ws_frame_burst: int = 300
    forward_connections_per_user: int = 128
    forward_rate_per_s: float = 50.0
    forward_burst: int = 200

    # Metering and enforcement
    flush_interval_s: float = 5.0
    enforcement_cache_ttl_s: float = 5.0
    forward_credentials_ttl_s: float = 10.0
    denylist_refresh_s: float = 30.0

    # Forward proxy
    forward_head_timeout_s: float = 30.0
    forward_connect_timeout_s: float = 10.0
    forward_idle_timeout_s: float = 600.0
    max_forward_head_bytes: int = 64 * 1024

    # Forward proxy: plan enforcement on running tunnels (CONNECT and plain HTTP relays)
    forward_tunnel_byte_budget: int = 8 * MIB
    """Bytes one tunnel relays (both directions) before the plan is checked again; over the plan = cut."""
    forward_recheck_s: float = 30.0
    """Every open tunnel's user is re-checked this often, so usage counted elsewhere cuts it too."""
