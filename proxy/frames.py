"""Client frames after the handshake: parse strictly, decide, fail closed.

Every browser message is parsed as one JSON object with a real parser (so `\\u0063onfig.patch`
is `config.patch`), duplicate keys anywhere are refused (parsers disagree on which one wins), and
only a well-formed `req` is ever forwarded. Anything else ends the connection with 1008: the
gateway's own schema is closed too, so a legitimate client never sends it.

Method policy (PRD §4.6, reference §2.8 and §6.6): methods that change the gateway's security
settings, manage devices and pairing, escape to the host, or bypass the HTTP block on
`/tools/invoke` never reach the VM; the browser gets a synthetic `FORBIDDEN` in the gateway's own
error shape. Names are compared case-insensitively and must look like method names at all.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BLOCKED_METHODS",
    "BLOCKED_PREFIXES",
    "FrameViolation",
    "Request",
    "forbidden_response",
    "is_blocked",
    "parse_client_frame",
    "parse_json_object",
    "rate_limited_response",
]

# Exact names (lower case).
BLOCKED_METHODS = frozenset(
    m.lower()
    for m in (
        # PRD §4.6: approvals of exec requests stay with the owner's policy, not the UI.
        "exec.approval.resolve",
        "approval.resolve",  # the kind-agnostic twin resolves exec approvals too (reference §2.4)
        # The WS twin of POST /tools/invoke (reference §3.3).
        "tools.invoke",
        # Host escape and control-plane ownership (reference §2.8 deny-list candidates).
        "plugins.install", "plugins.uninstall", "plugins.setEnabled", "plugins.reload", "plugins.refresh",
        "skills.install", "skills.update",
        "computer.invoke", "node.invoke", "fs.listDir", "sessions.files.reveal",
        "models.authLogin", "models.authLogout", "models.authOrderSet", "models.authRefresh",
        "models.authSetApiKey",
        "agents.create", "agents.delete", "agents.update", "agents.files.set",
        "channels.start", "channels.stop", "channels.logout",
        "cron.add", "cron.remove", "cron.run", "cron.update", "cron.scratch.set",
        "diagnostics.cpuProfile", "diagnostics.heapProfile",
        "users.setRole", "chat.inject", "nativeHook.invoke", "system-event", "set-heartbeats",
        "mcp.authLogin",
        # The handshake happens once; a second connect is handled as a violation before this.
        "connect",
    )
)
# Whole families (lower case, ending in "."): everything under them.
BLOCKED_PREFIXES: tuple[str, ...] = tuple(
    p.lower()
    for p in (
        "config.",  # PRD: config.* (reads too: the raw config names the host layout)
        "exec.approvals.",  # PRD
        "update.",  # PRD (update.run and friends)
        "device.scopes.",  # reference §6.6: a scope upgrade of the relay identity would be admin for all
        "device.pair.", "device.token.", "node.pair.",
        "terminal.",
        "secrets.",
        "skills.upload.",
        "environments.", "desktop.", "worker.desktop.",
        "wizard.", "openclaw.setup.",
        "gateway.restart.", "gateway.suspend.",
        "web.login.",
    )
)

_METHOD_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_REQ_KEYS = frozenset({"type", "id", "method", "params", "traceparent", "expectedProfileId"})
_MAX_ID_LEN = 256


class FrameViolation(ValueError):
    """The frame breaks the protocol: the connection is closed with 1008 and this reason."""


@dataclass(frozen=True)
class Request:
    id: str
    method: str


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def parse_json_object(data: bytes | str) -> dict[str, Any]:
    """One JSON object, strictly: UTF-8, no duplicate keys, no NaN/Infinity. Raises FrameViolation."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameViolation("text frame is not valid UTF-8") from None
    try:
        value = json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except _DuplicateKey:
        raise FrameViolation("duplicate key in frame") from None
    except (ValueError, RecursionError):
        raise FrameViolation("invalid JSON frame") from None
    if not isinstance(value, dict):
        raise FrameViolation("frame is not a JSON object")
    return value


def parse_client_frame(data: bytes | str) -> Request:
    """Validate a browser frame after hello-ok; return its id and method. Raises FrameViolation."""
    frame = parse_json_object(data)
    if frame.get("type") != "req":
        raise FrameViolation("only req frames are accepted from the client")
    unknown = set(frame) - _REQ_KEYS
    if unknown:
        raise FrameViolation("unexpected property in request frame")
    rid = frame.get("id")
    if not isinstance(rid, str) or not rid or len(rid) > _MAX_ID_LEN:
        raise FrameViolation("request id must be a non-empty string")
    method = frame.get("method")
    if not isinstance(method, str) or not method:
        raise FrameViolation("request method must be a non-empty string")
    params = frame.get("params")
    if params is not None and not isinstance(params, dict | list):
        raise FrameViolation("request params must be an object")
    return Request(id=rid, method=method)


def is_blocked(method: str) -> bool:
    """True for methods that never reach the VM (also for anything that is not a plain method name)."""
    if not _METHOD_RE.match(method):
        return True
    name = method.lower()
    return name in BLOCKED_METHODS or name.startswith(BLOCKED_PREFIXES)


def forbidden_response(request_id: str, method: str) -> dict[str, Any]:
    """The gateway's own `FORBIDDEN` shape (the UI handles it); `reason` tells it came from us."""
    shown = method if _METHOD_RE.match(method) else "(invalid method name)"
    return {
        "type": "res",
        "id": request_id,
        "ok": False,
        "error": {
            "code": "FORBIDDEN",
            "message": f"{shown} is not available through Slopbox",
            "details": {
                "code": "MISSING_SCOPE",
                "missingScope": "operator.admin",
                "requiredScopes": ["operator.admin"],
                "reason": "blocked-by-proxy",
            },
        },
    }


def rate_limited_response(request_id: str, method: str, retry_after_ms: int) -> dict[str, Any]:
    """The gateway's rate-limit shape (reference §1.6): UNAVAILABLE, retryable, retryAfterMs."""
    shown = method if _METHOD_RE.match(method) else "request"
    return {
        "type": "res",
        "id": request_id,
        "ok": False,
        "error": {
            "code": "UNAVAILABLE",
            "message": f"rate limit exceeded for {shown}; retry after {max(1, retry_after_ms // 1000)}s",
            "retryable": True,
            "retryAfterMs": retry_after_ms,
            "details": {"method": shown, "reason": "rate-limited-by-proxy"},
        },
    }
