"""The strict browser-frame parse (`proxy.frames.parse_json_object`) has two ways to find duplicate
keys: a small frame (too small to exceed a bound) goes through the per-object hook; a larger one is
scanned for its bounds and the scan's `:` count is compared with the keys the dicts hold, the hook
only deciding when they differ. Every case runs both ways (padded past the small-frame size for the
second). These cases would pass through a wrong count (a colon inside a string or behind an escaped
quote, a key spelled with an escape, a duplicate nested in an array, an array's length counted as
keys), and a property test checks both against a plain reference decoder that refuses a repeated
key in any object."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openclaw.methods import METHOD_SCOPES
from proxy.frames import FrameViolation, parse_client_frame, parse_json_object
from proxy.json_limits import check_json_bounds, too_small_to_exceed
from proxy.methods import ALLOWED_ANY_PARAMS, ALLOWED_METHODS, check_method


class _Dup(ValueError):
    pass


def _reference(text: str) -> dict[str, Any] | None:
    """What the strict parse must answer: the object, or None for any refusal (independent code:
    the standard library with its own duplicate check per object, NaN/Infinity refused)."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        if len(set(keys)) != len(keys):
            raise _Dup
        return dict(items)

    def constant(name: str) -> Any:
        raise ValueError(name)

    try:
        value = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _ours(text: str | bytes) -> dict[str, Any] | None:
    try:
        return parse_json_object(text)
    except FrameViolation:
        return None


_PAD = "x" * 25_000


def _padded(text: str) -> str:
    """`text` inside a frame too large for the small-frame path (same verdict: the padding adds
    two distinct keys at a new top level)."""
    return '{"pad":"' + _PAD + '","v":' + text + "}"


def _both(text: str) -> list[str]:
    assert too_small_to_exceed(text) and not too_small_to_exceed(_padded(text))
    return [text, _padded(text)]


REFUSED_DUPLICATES = [
    '{"a":1,"a":2}',
    '{"a":1,"\\u0061":2}',  # the same key, one spelled with an escape
    '{"\\u0061":1,"a":2}',
    '{"type":"req","id":"1","method":"a","params":{"x":[{"k":1,"k":2}]}}',  # inside an array
    '{"p":[[[{"k":1,"k":2}]]]}',
    '[{"k":1},{"k":1,"k":2}]',
    '{"p":{"q":{"r":{"k":{},"k":[]}}}}',
    '{"p":[1],"k":1,"k":2}',  # an array of one: wrong if array lengths were counted as keys
    '{"p":{"":1},"k":1,"k":2,"":3,"":4}',
    '{"a:b":1,"a:b":2}',  # colons inside the keys
    '{"k":"x:y:z","k":"::"}',
    '{"k\\"":1,"k\\"":2}',  # an escaped quote inside the key
    '{"k\\":":1,"k\\":":2}',  # an escaped quote followed by a colon inside the key
    '{"k\\\\":1,"b":"\\\\","k\\\\":3}',  # strings ending in an escaped backslash
    '{"k\\\\\\"":1,"k\\\\\\"":2}',  # backslash, quote
    '{"\\ud83d\\ude00":1,"\U0001f600":2}',  # an escaped surrogate pair and the raw character
    '{"a":{"b":1,"b":1},"c":{"b":1}}',
    ' {"a":1,"a":1} ',
]

ACCEPTED = [
    '{"a":1,"b":2}',
    '{"a":"x:y:z","b":"::","c":":"}',  # colons in strings: counted by nobody
    '{"k\\":":1,"b":"\\":"}',
    '{"a":{"k":1},"b":[{"k":1},{"k":2}],"k":{"k":{"k":1}}}',  # the same key in different objects
    '{"a\\\\":1,"a":2}',  # "a\" and "a" differ
    '{"\\u0061b":1,"a":2}',
    '{"p":[1,2,3],"q":[]}',
    '{"x":{},"y":[{}],"z":[[]]}',
    ' \t\n{"a":1}\r\n',
]


@pytest.mark.parametrize("text", REFUSED_DUPLICATES)
def test_duplicate_keys_are_refused_anywhere(text: str) -> None:
    for frame in _both(text):
        with pytest.raises(FrameViolation, match="duplicate key"):
            parse_json_object(frame)
        with pytest.raises(FrameViolation, match="duplicate key"):
            parse_json_object(frame.encode())


@pytest.mark.parametrize("text", ACCEPTED)
def test_repeated_names_in_different_objects_and_colons_in_strings_pass(text: str) -> None:
    for frame in _both(text):
        assert parse_json_object(frame) == json.loads(frame)
        assert parse_json_object(frame.encode()) == json.loads(frame)


@pytest.mark.parametrize("text", ['{"a":NaN}', '{"a":[1,Infinity]}', '{"a":-Infinity}', '{"a":1} x',
                                  '{"a":1}{"b":2}', '\x0c{"a":1}', '\u00a0{"a":1}', '{"a":1', '',
                                  '{"a":"\x01"}', '"a:b"', "[1,2]", "null", '{"a":1,}'])
def test_malformed_frames_are_refused(text: str) -> None:
    with pytest.raises(FrameViolation):
        parse_json_object(text)


@pytest.mark.parametrize("text", ['{"a":NaN}', '{"a":[1,Infinity]}', '{"a":-Infinity}', '{"a":1', '{"a":"\x01"}',
                                  '{"a":1,}'])
def test_malformed_large_frames_are_refused(text: str) -> None:
    with pytest.raises(FrameViolation):
        parse_json_object(_padded(text))
    for frame in (f'{{"pad":"{_PAD}"}} x', f'{{"pad":"{_PAD}"}}{{"b":2}}', f'[{{"pad":"{_PAD}"}}]',
                  f'\x0c{{"pad":"{_PAD}"}}'):
        with pytest.raises(FrameViolation):
            parse_json_object(frame)


def test_small_frames_skip_the_scan_only_when_no_bound_can_be_reached() -> None:
    assert too_small_to_exceed('{"a":[[[]]]}')
    assert not too_small_to_exceed("[" * 65) and too_small_to_exceed("[" * 64)
    assert not too_small_to_exceed('{"a":"' + "{" * 65 + '"}')  # brackets in strings count too: a bound
    assert not too_small_to_exceed(b"1" * 20_001) and too_small_to_exceed(b"1" * 20_000)
    with pytest.raises(FrameViolation, match="nested too deeply"):
        parse_json_object("[" * 65 + "]" * 65)
    with pytest.raises(FrameViolation, match="too many"):
        parse_json_object("[" + ",".join(["{}"] * 20_001) + "]")


def test_escaped_method_is_seen_unescaped() -> None:
    req = parse_client_frame('{"type":"req","id":"1","method":"\\u0063onfig.patch","params":{"a":"b:c"}}')
    assert req.method == "config.patch" and req.params == {"a": "b:c"}


def test_colon_count_is_the_member_count() -> None:
    assert check_json_bounds('{"a":"x:y","b\\":":{"c":[{"d":1}]}}') == 4
    assert check_json_bounds(b"[1,2]") == 0


# -- property: the counting parse answers exactly what the reference answers ----------------------

_KEY_CHARS = st.sampled_from(["a", "b", ":", '"', "\\", "k", "\u00e9", "\U0001f600", " ", ","])


def _spell(text: str, escapes: list[bool]) -> str:
    """A JSON string literal for `text`, some characters written as \\u escapes."""
    out = []
    for i, ch in enumerate(text):
        if escapes[i % len(escapes)] and ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


@st.composite
def _json_text(draw: st.DrawFn, depth: int = 0) -> str:
    kind = draw(st.sampled_from(["object", "object", "array", "string", "number"] if depth < 4
                                else ["string", "number"]))
    escapes = draw(st.lists(st.booleans(), min_size=1, max_size=4))
    if kind == "string":
        return _spell(draw(st.text(_KEY_CHARS, max_size=4)), escapes)
    if kind == "number":
        return draw(st.sampled_from(["0", "-1", "2.5", "1e3", "true", "false", "null"]))
    if kind == "array":
        return "[" + ",".join(draw(st.lists(_json_text(depth + 1), max_size=3))) + "]"
    keys = draw(st.lists(st.text(_KEY_CHARS, max_size=3), max_size=4))
    if keys and draw(st.booleans()):  # a repeated key, maybe spelled differently
        keys.append(draw(st.sampled_from(keys)))
    members = [f"{_spell(k, escapes)}:{draw(_json_text(depth + 1))}" for k in keys]
    space = draw(st.sampled_from(["", " ", "\n"]))
    return "{" + ("," + space).join(members) + "}"


@settings(max_examples=600, deadline=None)
@given(_json_text())
def test_counting_parse_matches_the_reference(text: str) -> None:
    for frame in _both(text):
        expected = _reference(frame)
        assert _ours(frame) == expected
        assert _ours(frame.encode()) == expected


def test_methods_allowed_whatever_their_params() -> None:
    """The relay's one-lookup pass: exactly the allowed methods no param rule looks at, and none
    of them is a spelling of connect (the relay refuses a second connect by its lower-cased name)."""
    assert ALLOWED_ANY_PARAMS == ALLOWED_METHODS - {"sessions.patch", "sessions.patchMany", "sessions.create"}
    assert {"sessions.patch", "sessions.patchMany", "sessions.create"} <= ALLOWED_METHODS
    assert not any(name.lower() == "connect" for name in ALLOWED_ANY_PARAMS)
    for name in METHOD_SCOPES:
        assert (check_method(name, {"permissionMode": "full", "sandboxMode": "off", "incognito": True,
                                    "patch": {"permissionMode": "full"}}) is None) is (name in ALLOWED_ANY_PARAMS)
