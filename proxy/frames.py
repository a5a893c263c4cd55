"""Client frames after the handshake: parse strictly, decide, fail closed.

Every browser message is parsed as one JSON object with a real parser (so `\\u0063onfig.patch`
is `config.patch`), duplicate keys anywhere are refused (parsers disagree on which one wins: by the
hook on small frames, by counting on large ones, see `parse_json_object`), and
only a well-formed `req` is ever forwarded. Anything else ends the connection with 1008: the
gateway's own schema is closed too, so a legitimate client never sends it.

Method policy (PRD §4.6, reference §2.8 and §6.6) is an allow-list (`proxy.methods`): only
methods the UI-relay identity's scopes cover, minus explicit denies, reach the VM; anything else,
unknown names included, gets a synthetic `FORBIDDEN` in the gateway's own error shape, marked
`details.reason = "blocked-by-proxy"` so the UI and the logs can tell it from the gateway's.
Every pattern here is matched in full (`re.fullmatch`): `$` would also match before a final newline.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

from proxy.json_limits import JsonTooComplex, check_json_bounds, too_small_to_exceed
from proxy.methods import Refusal, check_method

__all__ = [
    "FrameViolation",
    "Request",
    "blocked",
    "forbidden_response",
    "parse_client_frame",
    "parse_json_object",
    "rate_limited_response",
]

_METHOD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_REQ_KEYS = frozenset({"type", "id", "method", "params", "traceparent", "expectedProfileId"})
_MAX_ID_LEN = 256


class FrameViolation(ValueError):
    """The frame breaks the protocol: the connection is closed with 1008 and this reason."""


class Request(NamedTuple):
    """A checked browser request (a tuple: built once per relayed frame, cheaper than a dataclass)."""

    id: str
    method: str
    params: Any = None


_new_request = tuple.__new__
"""Builds a Request without the Python-level `__new__` a NamedTuple has (once per relayed frame)."""


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


_STRICT = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
"""A Python hook per object that refuses a repeated key: for small frames, and the fallback."""
_STRICT_SCAN = _STRICT.scan_once
_SCAN = json.JSONDecoder(parse_constant=_reject_constant).scan_once
"""The C scanner without a hook (dicts built in C). Both scanners are called directly (`decode`
and `raw_decode` are two Python frames and two regex matches around them) and built once
(`json.loads` with arguments would build a decoder and its scanner per call)."""
_JSON_SPACE = " \t\n\r"


def _keys_built(value: Any) -> int:
    """How many keys the dicts in `value` hold, nested ones included (objects inside arrays too)."""
    keys = 0
    stack = [value]
    while stack:
        container = stack.pop()
        kind = type(container)
        if kind is dict:
            keys += len(container)
            items = container.values()
        elif kind is list:
            items = container
        else:
            continue
        for item in items:
            kind = type(item)
            if kind is dict or kind is list:
                stack.append(item)
    return keys


def parse_json_object(data: bytes | str) -> dict[str, Any]:
    """One JSON object, strictly: UTF-8, no duplicate keys, no NaN/Infinity, bounded depth and size
    (`proxy.json_limits`, known before the parser builds anything). Raises FrameViolation.

    A frame too small to exceed a limit (`too_small_to_exceed`: the usual one) is parsed with the
    duplicate-key hook. A larger one is scanned first (`check_json_bounds`) and parsed without a
    hook: outside strings a `:` only ever separates a member's name from its value, so in valid
    JSON the scan's colon count is the number of members of all objects; each object becomes a
    dict holding its distinct keys, so the dicts hold as many keys in total exactly when no object
    repeats one (`{"a":1,"\\u0061":2}` included: one key, two colons). Any other count goes
    through the hook, which names the duplicate."""
    if too_small_to_exceed(data):
        members = -1
    else:
        try:
            members = check_json_bounds(data)
        except JsonTooComplex as exc:
            raise FrameViolation(str(exc)) from None
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameViolation("text frame is not valid UTF-8") from None
    text = data.strip(_JSON_SPACE)  # JSON's whitespace only, as `JSONDecoder.decode` skips it
    try:
        value, end = (_STRICT_SCAN if members < 0 else _SCAN)(text, 0)
        if end != len(text):
            raise ValueError("extra data")
        if members >= 0 and _keys_built(value) != members:
            value = _STRICT.decode(text)
    except _DuplicateKey:
        raise FrameViolation("duplicate key in frame") from None
    except (ValueError, RecursionError, StopIteration):
        raise FrameViolation("invalid JSON frame") from None
    if type(value) is not dict:
        raise FrameViolation("frame is not a JSON object")
    return value


def parse_client_frame(data: bytes | str) -> Request:
    """Validate a browser frame after hello-ok; return its id and method. Raises FrameViolation."""
    frame = parse_json_object(data)
    if frame.get("type") != "req":
        raise FrameViolation("only req frames are accepted from the client")
    if not frame.keys() <= _REQ_KEYS:
        raise FrameViolation("unexpected property in request frame")
    rid = frame.get("id")
    if type(rid) is not str or not rid or len(rid) > _MAX_ID_LEN:
        raise FrameViolation("request id must be a non-empty string")
    method = frame.get("method")
    if type(method) is not str or not method:
        raise FrameViolation("request method must be a non-empty string")
    params = frame.get("params")
    if params is not None and type(params) is not dict and type(params) is not list:
        raise FrameViolation("request params must be an object")
    return _new_request(Request, (rid, method, params))


def blocked(req: Request) -> Refusal | None:
    """Why the proxy refuses this request (None: it may go to the VM). Fails closed on unknown names."""
    return check_method(req.method, req.params)


def _shown(method: str) -> str | None:
    return method if _METHOD_RE.fullmatch(method) else None


def forbidden_response(request_id: str, method: str, refusal: Refusal | None = None) -> dict[str, Any]:
    """The gateway's own `FORBIDDEN` shape (the UI handles it); `reason` tells it came from us."""
    shown = _shown(method) or "(invalid method name)"
    scope = refusal.required_scope if refusal is not None else "operator.admin"
    return {
        "type": "res",
        "id": request_id,
        "ok": False,
        "error": {
            "code": "FORBIDDEN",
            "message": f"{shown} is not available through Slopbox",
            "details": {
                "code": "MISSING_SCOPE",
                "missingScope": scope,
                "requiredScopes": [scope],
                "reason": "blocked-by-proxy",
                "rule": refusal.rule if refusal is not None else "denied",
            },
        },
    }


def rate_limited_response(request_id: str, method: str, retry_after_ms: int) -> dict[str, Any]:
    """The gateway's rate-limit shape (reference §1.6): UNAVAILABLE, retryable, retryAfterMs."""
    shown = _shown(method) or "request"
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
