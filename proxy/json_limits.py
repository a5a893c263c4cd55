"""A cheap structural scan that bounds what `json.loads` would build, run before it.

Why: a browser frame was parsed whole before anything else; one 16 MiB frame of `[{},{},...]`
cost 0.74 s of event loop and 380 MiB. Python objects are 10-50x the bytes that spell them, so the
frame size alone does not bound memory. The scan works on bytes with C-speed operations only:

1. drop every backslash escape pair (`\\\\` first, then `\\"`), so strings hold no quote or backslash;
2. drop every string (the odd pieces between quotes, once their number is bounded); an odd
   number of quotes means the JSON is malformed;
3. count what remains: containers (`{` `[`), separators (`,` `:`), then the nesting depth over
   the bracket characters only (bounded by the container count before it is walked).

The `:` count it returns is, for valid JSON, exactly the number of object members (a colon
outside a string is only ever a name separator): `proxy.frames` uses it to detect duplicate keys.

It is exact for valid JSON and an upper bound up to the first syntax error for anything else
(json.loads stops there), so a frame that passes cannot make the parser build more than the
limits allow: at most MAX_CONTAINERS objects/arrays, MAX_VALUES values, MAX_DEPTH levels.
"""

from __future__ import annotations

__all__ = ["MAX_CONTAINERS", "MAX_DEPTH", "MAX_VALUES", "JsonTooComplex", "check_json_bounds", "too_small_to_exceed"]

MAX_DEPTH = 64
"""The Control UI's requests are a few levels deep (`chat.send` with attachments: 4); json.loads recurses."""
MAX_CONTAINERS = 20_000
"""Objects + arrays in one frame: each costs ~100-200 bytes once parsed."""
MAX_VALUES = 100_000
"""Separators (`,` and `:`) in one frame, which bounds the number of parsed values."""

_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class JsonTooComplex(ValueError):
    """The frame would parse into more than the limits allow (or is malformed); `str` says which."""


_SMALL = min(MAX_CONTAINERS, MAX_VALUES)


def too_small_to_exceed(data: bytes | str) -> bool:
    """True when `data` cannot exceed any limit, so the scan can be skipped: every container and
    separator is a byte (or character) of its own, so at most `len(data)` of each, and the depth is
    at most the number of `[` and `{` anywhere (inside strings too). Most frames are like that."""
    if len(data) > _SMALL:
        return False
    if isinstance(data, str):
        return data.count("[") + data.count("{") <= MAX_DEPTH
    return data.count(b"[") + data.count(b"{") <= MAX_DEPTH


def check_json_bounds(data: bytes | str, *, max_depth: int = MAX_DEPTH, max_containers: int = MAX_CONTAINERS,
                      max_values: int = MAX_VALUES) -> int:
    """Raises JsonTooComplex past a limit; returns the number of `:` outside strings, which for
    valid JSON is exactly the number of members of all its objects (`proxy.frames` compares it with
    the keys the parser built to find a duplicate key without a Python hook per object)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if b"\\" in raw:  # no backslash: nothing to drop (a frame usually has none)
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    quotes = raw.count(b'"')
    if quotes & 1:
        raise JsonTooComplex("invalid JSON frame")
    if quotes // 2 > max_values + 1:  # every string is a key or a value
        raise JsonTooComplex("frame has too many values")
    rest = b"".join(raw.split(b'"')[::2]) if quotes else raw
    colons = rest.count(b":")
    if len(rest) <= max_depth and len(rest) <= max_containers and len(rest) <= max_values:
        return colons  # fewer structural bytes than any limit: none can be exceeded (a usual frame)
    containers = rest.count(b"{") + rest.count(b"[")
    if containers > max_containers:
        raise JsonTooComplex("frame has too many objects or arrays")
    if rest.count(b",") + colons > max_values:
        raise JsonTooComplex("frame has too many values")
    if containers <= max_depth:
        return colons  # cannot nest deeper than it has containers
    brackets = rest.translate(None, _NOT_BRACKETS)
    if len(brackets) > 2 * containers + 2:
        raise JsonTooComplex("invalid JSON frame")  # more closers than openers can match
    depth = 0
    for byte in brackets:
        if byte in b"[{":
            depth += 1
            if depth > max_depth:
                raise JsonTooComplex("frame is nested too deeply")
        else:
            depth -= 1
    return colons
