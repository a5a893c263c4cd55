"""Browser paths under `/agents/{agent_id}/gateway` and what they become on the gateway.

The path is parsed from the raw request target, never from a decoded convenience value, so the
check and the forwarded path are one and the same thing: every segment is percent-decoded once,
dot segments are resolved inside the agent's prefix, empty segments collapse, and the path sent
upstream is re-encoded from those decoded segments. Anything ambiguous (encoded or literal
slashes and backslashes inside a segment, control characters, invalid escapes, `..` above the
prefix) is refused rather than guessed at, because the gateway (Node, WHATWG URL parsing) may
read it differently: WHATWG treats `\\` as `/` and `%2e` as `.` in http URLs.

`POST /tools/invoke` is a full-operator tool endpoint (reference §3.3), so any request whose
normalised path contains the segments `tools/invoke` (any case, any position, so under the
Control UI base path too) is refused with 403.

Beyond that, only the routes the Control UI needs are served (`control_ui_route`, an allow-list
read from openclaw 2026.9.6's router, reference §8): its document and deep links, static files,
its config, and the image/media/artifact reads it makes. Everything else under the base path
(approval and share pages, plugin routes, any other authenticated route, any method but GET and
HEAD) is refused with 403 before a byte reaches the VM.
"""

from __future__ import annotations

import functools
import re
import uuid
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import quote, unquote_to_bytes, urljoin, urlsplit

__all__ = [
    "PREFIX_SEGMENTS",
    "BadPath",
    "GatewayPath",
    "RouteKind",
    "control_ui_route",
    "parse_gateway_path",
    "rewrite_location",
]

PREFIX_SEGMENTS = ("agents", "{agent_id}", "gateway")
_PCHAR_SAFE = "!$&'()*+,;=:@-._~"
_BLOCKED_SEQUENCES: tuple[tuple[str, ...], ...] = (("tools", "invoke"),)
_HEX = frozenset("0123456789abcdefABCDEF")
_PLAIN_SEGMENT = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@-]*$")


class BadPath(ValueError):
    """A path we refuse: `status` 400 (ambiguous), 403 (blocked) or 404 (not a gateway path)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class GatewayPath:
    agent_id: uuid.UUID
    tail: tuple[str, ...]
    """Decoded segments after `/agents/{id}/gateway`, dot segments resolved, empty ones dropped."""
    trailing_slash: bool
    query: str
    """The raw query string (without `?`), forwarded as received."""

    @property
    def prefix(self) -> str:
        return f"/agents/{self.agent_id}/gateway"

    @property
    def is_prefix_root(self) -> bool:
        """`/agents/{id}/gateway` with no tail and no trailing slash."""
        return not self.tail and not self.trailing_slash

    def upstream(self, base_path: str) -> str:
        """Path and query on the gateway: the Control UI base path plus the re-encoded tail."""
        if len(self.query) > 256 or sum(map(len, self.tail)) > 512:  # the memo holds short ones only
            return _upstream_target(base_path, self.tail, self.trailing_slash, self.query)
        return _upstream_memo(base_path, self.tail, self.trailing_slash, self.query)


def _upstream_target(base_path: str, tail: tuple[str, ...], trailing_slash: bool, query: str) -> str:
    path = base_path.rstrip("/") + "/" + "/".join(quote(seg, safe=_PCHAR_SAFE) for seg in tail)
    if tail and trailing_slash:
        path += "/"
    return path + ("?" + query if query else "")


_upstream_memo = functools.lru_cache(maxsize=4096)(_upstream_target)
"""Per request, and every page load asks for the same paths again (a pure function)."""


def _decode_segment(raw: str) -> str:
    if _PLAIN_SEGMENT.fullmatch(raw):
        return raw  # nothing to decode, nothing to refuse (the common case)
    i = raw.find("%")
    while i != -1:
        if len(raw) < i + 3 or raw[i + 1] not in _HEX or raw[i + 2] not in _HEX:
            raise BadPath(400, "invalid percent-encoding")
        i = raw.find("%", i + 3)
    try:
        text = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath(400, "path is not UTF-8") from None
    if "/" in text or "\\" in text:
        raise BadPath(400, "encoded slash or backslash in a path segment")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise BadPath(400, "control character in the path")
    return text


def _blocked(tail: tuple[str, ...]) -> bool:
    # Compare case-insensitively and ignore `;params`: over-blocking a lookalike costs nothing.
    names = [seg.split(";", 1)[0].lower() for seg in tail]
    for seq in _BLOCKED_SEQUENCES:
        n = len(seq)
        if any(tuple(names[i : i + n]) == seq for i in range(len(names) - n + 1)):
            return True
    return False


_CACHED_TARGET_MAX = 512
"""Longer targets are parsed every time (the memo's size stays bounded whatever clients send)."""


def parse_gateway_path(raw_target: str) -> GatewayPath:
    """Parse `request.raw_path` (path + query as received). Raises BadPath.

    Memoised: a page load asks for the same few paths again and again, and parsing one (UUID,
    per-segment decoding, dot segments) was the largest of our per-request checks. Refusals are
    not memoised (an exception is never cached)."""
    if len(raw_target) <= _CACHED_TARGET_MAX:
        return _parse_cached(raw_target)
    return _parse(raw_target)


@functools.lru_cache(maxsize=4096)
def _parse_cached(raw_target: str) -> GatewayPath:
    return _parse(raw_target)


def _parse(raw_target: str) -> GatewayPath:
    path, _, query = raw_target.partition("?")
    if not path.startswith("/") or "\\" in path:
        raise BadPath(400, "malformed path")
    raw_segments = path.split("/")[1:]
    if len(raw_segments) < 3:
        raise BadPath(404, "not a gateway path")
    head = [_decode_segment(s) for s in raw_segments[:3]]
    if head[0] != "agents" or head[2] != "gateway":
        raise BadPath(404, "not a gateway path")
    try:
        agent_id = uuid.UUID(head[1])
    except ValueError:
        raise BadPath(404, "no such agent") from None
    rest = raw_segments[3:]
    trailing_slash = bool(rest) and rest[-1] == ""
    tail: list[str] = []
    for raw in rest:
        seg = _decode_segment(raw)
        if seg in ("", "."):
            continue
        if seg == "..":
            if not tail:
                raise BadPath(400, "path climbs above the gateway prefix")
            tail.pop()
            continue
        tail.append(seg)
    if rest and _decode_segment(rest[-1]) in (".", ".."):
        trailing_slash = True  # `a/b/..` names the directory `a/`, as a browser would resolve it
    result = GatewayPath(agent_id=agent_id, tail=tuple(tail), trailing_slash=trailing_slash, query=query)
    if _blocked(result.tail):
        raise BadPath(403, "POST /tools/invoke is not available through the gateway proxy")
    return result


class RouteKind(StrEnum):
    DOCUMENT = "document"
    """The Control UI's HTML (root and its deep links): rewritten, with our script-restricting CSP."""
    RESOURCE = "resource"
    """Anything else the UI loads (static files, config, images, media): never a trusted document."""


# Root public files (CONTROL_UI_ROOT_PUBLIC_ASSETS), also served under `__openclaw__/`.
_ROOT_FILES = frozenset({"apple-touch-icon.png", "favicon-32.png", "favicon.ico", "favicon.svg",
                         "manifest.webmanifest", "sw.js"})
# Static folders of dist/control-ui (reference §8).
_STATIC_DIRS = frozenset({"themes", "fonts", "provider-icons", "cloud-provider-icons", "file-icons", "app-art",
                          "community-art"})
# Image and media reads under `__openclaw__/` (CONTROL_UI_RESOURCE_ROUTES, assistant media).
_NAMESPACED_MEDIA = frozenset({"assistant-media", "media", "catalog-icon", "channel-avatar", "link-favicon",
                               "plugin-icon", "plugin-activity-icon", "plugin-theme-art", "workspace-icon"})
# The UI's own pages (history routes): a reload of one of them asks for the document.
_UI_PAGES = frozenset({"activity", "agents", "apps", "automations", "chat", "custodian", "dashboard", "dashboards",
                       "debug", "logs", "meetings", "memory-import", "new", "portals", "sessions", "settings",
                       "skills", "systems", "tasks", "usage", "workboard", "worktrees", "overview", "channels",
                       "instances", "cron", "nodes", "config"})
_READ_METHODS = frozenset({"GET", "HEAD"})


def control_ui_route(tail: tuple[str, ...], method: str, accept: str = "") -> RouteKind | None:
    """What the Control UI may fetch at this path; None = refused (403). Segments compare exactly."""
    if method not in _READ_METHODS:
        return None
    if not tail:
        return RouteKind.DOCUMENT
    head, n = tail[0], len(tail)
    if n == 1 and (head in _ROOT_FILES or head == "control-ui-config.json"):
        return RouteKind.RESOURCE
    if head == "assets" and n == 2:
        return RouteKind.RESOURCE
    if head in _STATIC_DIRS and n >= 2:
        return RouteKind.RESOURCE
    if head == "__openclaw__" and n >= 2 and (tail[1] in _NAMESPACED_MEDIA or (n == 2 and tail[1] in _ROOT_FILES)):
        return RouteKind.RESOURCE
    if tail == ("__openclaw", "control-ui-config.json"):
        return RouteKind.RESOURCE
    if head == "avatar" and n == 2:
        return RouteKind.RESOURCE
    if head == "api" and n >= 4 and (
        (n == 4 and tail[1] == "users" and tail[3] == "avatar")
        or (tail[1:4] == ("chat", "media", "outgoing") and n >= 5)
        or (tail[1:3] == ("artifacts", "download"))
    ):
        return RouteKind.RESOURCE
    if head in _UI_PAGES and "text/html" in accept.lower():
        return RouteKind.DOCUMENT
    return None


def rewrite_location(location: str, *, upstream_base: str, upstream_origin: str, prefix: str,
                     request_path: str = "/") -> str | None:
    """Map a redirect the gateway sends into our prefix; None = drop it.

    Only redirects that stay inside the gateway's Control UI survive, mapped under our prefix and
    checked like a browser request path (a hostile VM may answer `//127.0.0.1:5432/`,
    `http://localhost:8080/api/...`, `/\\evil.example` or `%2e%2e` climbs). Relative targets are
    resolved against the upstream request path first, as the browser would against ours.
    """
    if not location or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in location) or "\\" in location:
        return None
    origin = upstream_origin.rstrip("/")
    parts = urlsplit(urljoin(origin + (request_path or "/"), location))
    if f"{parts.scheme}://{parts.netloc}".lower() != origin.lower():
        return None
    base = upstream_base.rstrip("/")
    path = parts.path or "/"
    if base and not (path == base or path.startswith(base + "/")):
        return None
    mapped = prefix + path[len(base):] + ("?" + parts.query if parts.query else "")
    try:
        target = parse_gateway_path(mapped)
    except BadPath:
        return None
    return mapped if target.prefix == prefix else None
