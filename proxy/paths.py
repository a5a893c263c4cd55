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
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes, urlsplit

__all__ = ["PREFIX_SEGMENTS", "BadPath", "GatewayPath", "parse_gateway_path", "rewrite_location"]

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
        path = base_path.rstrip("/") + "/" + "/".join(quote(seg, safe=_PCHAR_SAFE) for seg in self.tail)
        if self.tail and self.trailing_slash:
            path += "/"
        return path + ("?" + self.query if self.query else "")


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


def parse_gateway_path(raw_target: str) -> GatewayPath:
    """Parse `request.raw_path` (path + query as received). Raises BadPath."""
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


def rewrite_location(location: str, *, upstream_base: str, upstream_origin: str, prefix: str) -> str | None:
    """Map a redirect the gateway sends into our prefix; None = drop it (points at the VM itself).

    Redirects to other sites pass unchanged; anything that would reveal the VM's address does not.
    """
    base = upstream_base.rstrip("/")
    parts = urlsplit(location)
    if parts.scheme or parts.netloc:
        if f"{parts.scheme}://{parts.netloc}".lower() != upstream_origin.lower():
            return location
        path = parts.path or "/"
        rest = path + ("?" + parts.query if parts.query else "")
    else:
        if not location.startswith("/"):
            return location  # relative: resolves against the browser URL, already under our prefix
        rest = location
    if base and (rest == base or rest.startswith((base + "/", base + "?"))):
        return prefix + rest[len(base) :]
    if parts.scheme or parts.netloc:
        return None
    return location if not base else None
