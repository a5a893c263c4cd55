"""Which headers cross the proxy, in each direction.

Both directions are allow-lists (fail closed): from the browser only content negotiation,
caching and body metadata go up; the browser's cookies, Authorization, forwarded headers and
any OpenClaw-specific header (`x-openclaw-scopes`, `x-openclaw-token`) never do. The gateway
token goes up as `Authorization: Bearer` and the client's real address as `X-Forwarded-*`,
overwritten, never appended (the gateway trusts exactly one proxy hop: us, reference §3.6).

From the gateway only content metadata, caching and security headers come back: no
Set-Cookie (it would land on our domain next to the session cookie), no Service-Worker-Allowed
(a worker could then control our whole origin), no Clear-Site-Data, no CORS grants.
"""

from __future__ import annotations

import ipaddress
import re

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "SECURITY_HEADERS",
    "OUR_CSP",
    "forwarded_for",
    "is_websocket_upgrade",
    "response_headers",
    "upstream_request_headers",
    "valid_host",
]

_REQUEST_ALLOW = frozenset(
    h.lower()
    for h in (
        "Accept", "Accept-Language", "Cache-Control", "Pragma", "Content-Type", "Content-Length",
        "Content-Encoding", "Content-Language", "Content-MD5", "If-Match", "If-None-Match", "If-Modified-Since",
        "If-Unmodified-Since", "If-Range", "Range", "User-Agent", "X-Requested-With", "DNT", "Last-Event-ID",
        "Sec-Fetch-Dest", "Sec-Fetch-Mode", "Sec-Fetch-Site", "Sec-Fetch-User", "Sec-CH-UA", "Sec-CH-UA-Mobile",
        "Sec-CH-UA-Platform", "traceparent", "tracestate",
    )
)
_RESPONSE_ALLOW = frozenset(
    h.lower()
    for h in (
        "Content-Type", "Content-Encoding", "Content-Language", "Content-Disposition", "Content-Range",
        "Content-Length", "Accept-Ranges", "Cache-Control", "Expires", "ETag", "Last-Modified", "Vary", "Pragma",
        "Retry-After", "WWW-Authenticate", "X-Content-Type-Options", "Referrer-Policy", "Permissions-Policy",
        "Content-Security-Policy", "Cross-Origin-Opener-Policy", "Cross-Origin-Embedder-Policy",
        "Cross-Origin-Resource-Policy", "X-Accel-Buffering",
    )
)

OUR_CSP = "frame-ancestors 'none'; object-src 'none'; base-uri 'self'; form-action 'self'"
"""Added next to the gateway's own policy: browsers enforce every CSP header, so this only narrows."""

SECURITY_HEADERS: dict[str, str] = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}

_HOST_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253})(?::[0-9]{1,5})?$")


def valid_host(host: str | None) -> bool:
    return bool(host) and bool(_HOST_RE.fullmatch(host or ""))


def is_websocket_upgrade(headers: CIMultiDictProxy[str]) -> bool:
    connection = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    return headers.get("Upgrade", "").lower() == "websocket" and "upgrade" in connection


def forwarded_for(client_ip: str | None) -> str | None:
    """The XFF value for this client, or None to send no forwarded headers at all.

    A loopback client (a browser on this very machine, i.e. development) gets none: the gateway
    rejects an XFF that resolves to loopback, and such a client is genuinely local anyway.
    """
    if not client_ip:
        return None
    try:
        addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return None if addr.is_loopback else str(addr)


def upstream_request_headers(incoming: CIMultiDictProxy[str], *, client_ip: str | None, scheme: str,
                             host: str, gateway_token: str | None) -> CIMultiDict[str]:
    """Headers for the gateway request: the allow-list, our credentials and forwarded headers."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() in _REQUEST_ALLOW:
            out.add(name, value)
    # Documents may be rewritten (base path), so ask for them uncompressed; the rest passes as is.
    accept = incoming.get("Accept", "")
    encoding = incoming.get("Accept-Encoding")
    if "text/html" in accept.lower():
        out["Accept-Encoding"] = "identity"
    elif encoding:
        out["Accept-Encoding"] = encoding
    out["Host"] = host
    if gateway_token:
        out["Authorization"] = f"Bearer {gateway_token}"
    xff = forwarded_for(client_ip)
    if xff is not None:
        out["X-Forwarded-For"] = xff
        out["X-Forwarded-Proto"] = scheme
        out["X-Forwarded-Host"] = host
    return out


def response_headers(upstream: CIMultiDictProxy[str], *, drop_length: bool = False) -> CIMultiDict[str]:
    """The gateway's response headers we pass on, plus ours (our CSP is added beside theirs)."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        low = name.lower()
        if low in _RESPONSE_ALLOW and not (drop_length and low == "content-length"):
            out.add(name, value)
    for name, value in SECURITY_HEADERS.items():
        out[name] = value
    out.add("Content-Security-Policy", OUR_CSP)
    return out
