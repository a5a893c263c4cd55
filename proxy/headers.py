"""Which headers cross the proxy, in each direction.

Both directions are allow-lists (fail closed): from the browser only content negotiation,
caching and body metadata go up; the browser's cookies, Authorization, forwarded headers and
any OpenClaw-specific header (`x-openclaw-scopes`, `x-openclaw-token`) never do. The UI-relay
identity's device token (relay scopes, never the owner-level gateway token) goes up as
`Authorization: Bearer` and the client's real address as `X-Forwarded-*`, overwritten, never
appended (the gateway trusts exactly one proxy hop: us, reference §3.6). `Accept-Encoding` is
always set by us (aiohttp would otherwise ask for gzip on the client's behalf).

From the gateway only content metadata, caching and security headers come back: no
Set-Cookie (it would land on our domain next to the session cookie), no Service-Worker-Allowed
(a worker could then control our whole origin), no Clear-Site-Data, no CORS grants, and not
the gateway's CSP: exactly one CSP goes out, ours (`document_csp` for the Control UI document,
with script hashes we compute from the body we serve; `RESOURCE_CSP`, sandboxed and script-free,
for everything else, so HTML or SVG a VM serves at any other path cannot run script on our origin).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import re

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.upstream_http import encode_fields

__all__ = [
    "OUR_CSP",
    "RESOURCE_CSP",
    "SCRIPT_CSP",
    "SECURITY_HEADERS",
    "accepted_encodings",
    "document_csp",
    "forwarded_for",
    "is_websocket_upgrade",
    "response_headers",
    "upstream_request_head",
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
        "Cross-Origin-Opener-Policy", "Cross-Origin-Embedder-Policy",
        "Cross-Origin-Resource-Policy", "X-Accel-Buffering",
    )
)

RESOURCE_CSP = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; font-src 'self'; "
                "sandbox; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
"""Anything that is not the Control UI document: opened directly, HTML or SVG is a sandboxed,
script-free page (CSP on images, styles, fonts and JSON fetched by the UI has no effect)."""

OUR_CSP = RESOURCE_CSP
"""Our own answers (problem+json) are resources too."""

SCRIPT_CSP = "default-src 'self'; frame-ancestors 'none'; object-src 'none'; base-uri 'none'"
"""JavaScript responses: a worker script (`sw.js`) runs under its own response's CSP, so it must
still be able to fetch from our origin."""

_INLINE_SCRIPT_RE = re.compile(r"<script(\s[^>]*)?>(.*?)</script>", re.IGNORECASE | re.DOTALL)
_SRC_ATTR_RE = re.compile(r"""\ssrc\s*=""", re.IGNORECASE)


def document_csp(html: str) -> str:
    """The Control UI document's policy, computed by us (the gateway's is not trusted): scripts only
    from our origin plus the inline scripts of the body we serve, by SHA-256 (as the gateway does)."""
    hashes = []
    for match in _INLINE_SCRIPT_RE.finditer(html):
        attrs, content = match.group(1) or "", match.group(2)
        if content and not _SRC_ATTR_RE.search(" " + attrs):
            digest = base64.b64encode(hashlib.sha256(content.encode("utf-8")).digest()).decode()
            hashes.append(f"'sha256-{digest}'")
    return "; ".join([
        "default-src 'self'", "base-uri 'none'", "object-src 'none'", "frame-ancestors 'none'", "form-action 'self'",
        "frame-src 'self' http: https:", "script-src " + " ".join(["'self'", *hashes]),
        "style-src 'self' 'unsafe-inline' https://fonts.googleapis.com", "img-src 'self' data: blob: https:",
        "media-src 'self' data: blob:", "font-src 'self' https://fonts.gstatic.com", "worker-src 'self'",
        "connect-src 'self' ws: wss: data: https://api.openai.com https://tweakcn.com",
    ])


_ENCODINGS = frozenset({"gzip", "br", "deflate", "zstd", "identity"})


@functools.lru_cache(maxsize=512)  # per request; browsers send a handful of distinct values
def accepted_encodings(header: str | None) -> frozenset[str]:
    """Content codings the client accepts (q > 0), lower case; `identity` unless refused."""
    out: set[str] = set()
    refused: set[str] = set()
    for item in (header or "").split(","):
        token, _, params = item.strip().partition(";")
        token = token.strip().lower()
        q = params.strip().lower()
        if q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"):
            refused.add(token)
        elif token:
            out.add(token)
    if "*" in out:
        out |= _ENCODINGS - refused
    if "identity" not in refused and "*" not in refused:
        out.add("identity")
    return frozenset(out & _ENCODINGS)


SECURITY_HEADERS: dict[str, str] = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}

_HOST_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]{1,253})(?::[0-9]{1,5})?$")


@functools.lru_cache(maxsize=512)  # per request; a browser sends the same Host every time
def valid_host(host: str | None) -> bool:
    return bool(host) and bool(_HOST_RE.fullmatch(host or ""))


def is_websocket_upgrade(headers: CIMultiDictProxy[str]) -> bool:
    connection = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    return headers.get("Upgrade", "").lower() == "websocket" and "upgrade" in connection


@functools.lru_cache(maxsize=4096)  # per request; addresses repeat
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
                             host: str, bearer: str | None, identity_only: bool = False) -> CIMultiDictProxy[str]:
    """Headers for the gateway request: the allow-list, our credentials and forwarded headers.

    `bearer` is the UI-relay identity's device token; `identity_only` asks for an uncompressed body
    (a document we rewrite and hash). Otherwise only codings the client itself accepts are asked for.
    """
    return _upstream_request_headers(tuple(incoming.items()), client_ip, scheme, host, bearer, identity_only)


def upstream_request_head(incoming: CIMultiDictProxy[str], *, client_ip: str | None, scheme: str, host: str,
                          bearer: str | None, identity_only: bool = False) -> tuple[CIMultiDictProxy[str], bytes]:
    """`upstream_request_headers` and their encoded lines (`upstream_http.encode_fields`, for a
    request without a body), from one memo: one lookup per request instead of two."""
    return _upstream_request_head(tuple(incoming.items()), client_ip, scheme, host, bearer, identity_only)


@functools.lru_cache(maxsize=512)
def _upstream_request_head(incoming: tuple[tuple[str, str], ...], client_ip: str | None, scheme: str, host: str,
                           bearer: str | None, identity_only: bool) -> tuple[CIMultiDictProxy[str], bytes]:
    headers = _upstream_request_headers(incoming, client_ip, scheme, host, bearer, identity_only)
    return headers, encode_fields(tuple(headers.items()))


@functools.lru_cache(maxsize=512)
def _upstream_request_headers(incoming: tuple[tuple[str, str], ...], client_ip: str | None, scheme: str,
                              host: str, bearer: str | None, identity_only: bool) -> CIMultiDictProxy[str]:
    """Memoised: a pure function of its arguments, and a browser sends the same headers on request
    after request (the result is read-only, so requests can share it)."""
    out: CIMultiDict[str] = CIMultiDict()
    accept_encoding = None
    for name, value in incoming:
        low = name.lower()
        if low in _REQUEST_ALLOW:
            out.add(name, value)
        if low == "accept-encoding" and accept_encoding is None:
            accept_encoding = value
    codings = accepted_encodings(accept_encoding) - {"identity"}
    out["Accept-Encoding"] = "identity" if identity_only or not codings else ", ".join(sorted(codings))
    out["Host"] = host
    if bearer:
        out["Authorization"] = f"Bearer {bearer}"
    xff = forwarded_for(client_ip)
    if xff is not None:
        out["X-Forwarded-For"] = xff
        out["X-Forwarded-Proto"] = scheme
        out["X-Forwarded-Host"] = host
    return CIMultiDictProxy(out)


def response_headers(upstream: CIMultiDictProxy[str] | CIMultiDict[str], *, csp: str, drop_length: bool = False,
                     memo: bool = False) -> CIMultiDictProxy[str]:
    """The gateway's response headers we pass on, plus ours, with exactly one CSP: `csp`.

    Read-only (copy to add one). `memo`: memoised per (fields, csp), as a gateway answers the same
    fields again and again (only `Date`, which we drop, moves once a second); only for fields
    known to be small (`UpstreamResponse.small_head`) and a short CSP, so a memo never holds a
    VM's large head."""
    fields = tuple(upstream.items())
    if memo:
        return _response_headers(fields, csp, drop_length)
    return _response_headers.__wrapped__(fields, csp, drop_length)


@functools.lru_cache(maxsize=1024)
def _response_headers(fields: tuple[tuple[str, str], ...], csp: str, drop_length: bool) -> CIMultiDictProxy[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in fields:
        low = name.lower()
        if low in _RESPONSE_ALLOW and not (drop_length and low == "content-length"):
            out.add(name, value)
    for name, value in SECURITY_HEADERS.items():
        out[name] = value
    out["Content-Security-Policy"] = csp
    return CIMultiDictProxy(out)
