"""Tunables of the proxy process, with the defaults production runs with.

Kept out of `settings.py` on purpose: none of them is a deployment secret or address, and tests
tighten a few (short re-check intervals, small limits) without touching the environment.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024
FRAME_OVERHEAD = 64 * 1024
"""What a `chat.send` frame holds besides its base64 attachment (message text, ids, data-URL prefix)."""


def attachment_limit(max_frame_bytes: int) -> int:
    """The largest file whose base64 form (4/3 of it) still fits one frame of `max_frame_bytes`."""
    return max(0, (max_frame_bytes - FRAME_OVERHEAD) * 3 // 4)


@dataclass(frozen=True)
class ProxyConfig:
    # Browser sessions
    auth_cache_ttl_s: float = 1.0
    """How long one (session, agent) lookup is reused; a deleted session stops working after this."""
    session_recheck_s: float = 60.0
    """Open WebSockets re-check their session, ownership and VPS state this often."""
    session_sweep_s: float = 2.0
    """Open WebSockets whose session was deleted (logout) or expired are closed within this long:
    one batched query per sweep for all of them (proxy.session_watch)."""

    # Before login (proxy.preauth): what a stranger's cookie may cost
    preauth_rate_per_s: float = 5.0
    """Session lookups per second per source address (IPv6 /64) for pairs not seen valid recently."""
    preauth_burst: int = 30
    negative_session_ttl_s: float = 5.0
    """An unknown or expired session token is answered 401 from memory this long."""
    negative_session_max: int = 10_000
    known_pair_ttl_s: float = 60.0
    """A (session, agent) pair that resolved is not charged to its address's bucket for this long."""
    known_pair_max: int = 50_000

    # WebSocket relay
    max_client_frame_bytes: int = 8 * MIB + FRAME_OVERHEAD
    """Largest browser message we buffer; advertised to the UI as hello-ok policy.maxPayload, which the
    Control UI checks before it sends. The UI sends attachments base64-encoded inside `chat.send`
    (FileReader.readAsDataURL), so we also advertise `policy.attachments.maxBytes/maxImageBytes` at
    6 MiB (the gateway's own image limit): 6 MiB is 8 MiB in base64, plus 64 KiB for the rest of the
    frame. Larger files are refused by the UI itself ("too large") instead of reaching us."""
    ws_byte_rate_per_s: float = 1.0 * MIB
    """Browser frame bytes per second per user, charged before a frame is parsed (the socket is
    paused until the bucket allows it, so the UI only sees a delay)."""
    ws_byte_burst: int = 24 * MIB
    """At least one maximal frame (a larger frame could never pass): a few attachments at once."""
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
    max_cached_asset_bytes: int = 4 * MIB
    """Largest Control UI asset kept in the asset cache (2026.9.6's largest is 3.4 MiB uncompressed)."""
    upstream_max_connections: int = 128
    """Open HTTP connections to one gateway at most (proxy.upstream_http); more requests wait."""
    upstream_max_idle: int = 32
    """Kept-alive idle HTTP connections to one gateway at most."""
    upstream_idle_s: float = 30.0
    fast_http: bool = True
    """Plain Control UI GETs served below aiohttp's server (proxy.http_fast); False: all through aiohttp."""

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
    forward_head_timeout_s: float = 10.0
    forward_connect_timeout_s: float = 10.0
    forward_idle_timeout_s: float = 600.0
    max_forward_head_bytes: int = 64 * 1024

    # Forward proxy: plan enforcement on running tunnels (CONNECT and plain HTTP relays)
    forward_tunnel_byte_budget: int = 8 * MIB
    """Bytes one tunnel relays (both directions) before the plan is checked again; over the plan = cut."""
    forward_recheck_s: float = 30.0
    """Every open tunnel's user is re-checked this often, so usage counted elsewhere cuts it too."""
