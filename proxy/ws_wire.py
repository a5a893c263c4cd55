"""RFC 6455 framing for the relay: just enough codec to relay frames without aiohttp's per-socket state.

Two readers, both fed from `data_received`:

- `Assembler` (browser frames, and the gateway's frames during the handshake) parses complete
  frames out of a buffer and assembles messages up to a size limit, refusing what this relay never
  negotiates: unmasked client frames, RSV bits (no extension is negotiated), oversized or fragmented
  control frames, stray continuations. A message is returned unmasked, plus its original wire bytes
  when it was a single frame, so it can go upstream exactly as the browser masked it.
- `PassThrough` (gateway -> browser after the handshake) tracks frame boundaries only: data-frame
  bytes are handed back for forwarding as they arrive (never a whole message buffered), payload
  bytes are counted for metering, control frames are cut out and returned so close codes can be
  mapped and our own heartbeat pongs dropped.

Errors raise `WireError(code, reason)`: the relay closes the offending side with that code.
"""

from __future__ import annotations

import os
from typing import NamedTuple

__all__ = [
    "BINARY",
    "CLOSE",
    "CONT",
    "PING",
    "PONG",
    "TEXT",
    "Assembler",
    "Control",
    "Message",
    "PassThrough",
    "WireError",
    "accept_key",
    "close_payload",
    "encode",
    "mask",
    "parse_close",
]

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA = (CONT, TEXT, BINARY)
_CONTROL = (CLOSE, PING, PONG)
MAX_CONTROL = 125
_VALID_CLOSE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)) | frozenset(
    range(3000, 5000))

try:  # aiohttp's C helper (in place, on a bytearray): several times faster than Python on large frames
    from aiohttp._websocket.helpers import websocket_mask as _c_mask
except ImportError:  # pragma: no cover - aiohttp without its extensions
    _c_mask = None


class WireError(Exception):
    """The peer broke the protocol: close it with `code` (1002, 1007, 1008, 1009) and `reason`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def mask(key: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """XOR with the 4-byte key (masking and unmasking are the same operation)."""
    n = len(data)
    if not n:
        return b""
    if _c_mask is not None:
        buf = bytearray(data)
        _c_mask(key, buf)
        return bytes(buf)
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(n, "little")


def encode(opcode: int, payload: bytes = b"", *, masked: bool = False, fin: bool = True) -> bytes:
    """One frame. Server frames (to the browser) are unmasked; client frames (to the gateway) masked."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = bytes((first, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, bit | 127)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + mask(key, payload)


def close_payload(code: int | None, reason: bytes = b"") -> bytes:
    return b"" if code is None else code.to_bytes(2, "big") + reason[:MAX_CONTROL - 2]


def parse_close(payload: bytes) -> tuple[int | None, bytes]:
    """(code, reason) of a close frame; None when it carried no code. Malformed: WireError 1002/1007."""
    if not payload:
        return None, b""
    if len(payload) == 1:
        raise WireError(1002, "invalid close frame")
    code = int.from_bytes(payload[:2], "big")
    if code not in _VALID_CLOSE:
        raise WireError(1002, "invalid close code")
    reason = payload[2:]
    try:
        reason.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(1007, "invalid close reason") from None
    return code, reason


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key."""
    import base64
    import hashlib

    digest = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()  # noqa: S324 - RFC 6455
    return base64.b64encode(digest).decode()


def _header(buf: bytes | bytearray, pos: int, end: int) -> tuple[int, int, int, bytes | None, int] | None:
    """(first byte, opcode, payload length, mask key, header length) at `pos`, None if incomplete."""
    if end - pos < 2:
        return None
    b0 = buf[pos]
    b1 = buf[pos + 1]
    n = b1 & 0x7F
    hlen = 2
    if n == 126:
        if end - pos < 4:
            return None
        n = int.from_bytes(buf[pos + 2:pos + 4], "big")
        hlen = 4
    elif n == 127:
        if end - pos < 10:
            return None
        n = int.from_bytes(buf[pos + 2:pos + 10], "big")
        hlen = 10
    key = None
    if b1 & 0x80:
        if end - pos < hlen + 4:
            return None
        key = bytes(buf[pos + hlen:pos + hlen + 4])
        hlen += 4
    return b0, b0 & 0x0F, n, key, hlen


def _check(b0: int, opcode: int, n: int) -> None:
    if b0 & 0x70:
        raise WireError(1002, "reserved bits set")
    if opcode in _CONTROL:
        if n > MAX_CONTROL:
            raise WireError(1002, "control frame too long")
        if not b0 & 0x80:
            raise WireError(1002, "fragmented control frame")
    elif opcode not in _DATA:
        raise WireError(1002, "unknown opcode")


class Message(NamedTuple):
    """A complete data message (unmasked) or control frame; `raw` is the wire frame when it was one."""

    opcode: int
    payload: bytes
    raw: bytes | None


class Assembler:
    """Complete messages out of a byte stream, bounded by `max_message` (then `too_large`)."""

    __slots__ = ("_frag_op", "_frags", "_size", "buf", "max_message", "pos", "require_mask", "too_large")

    def __init__(self, *, require_mask: bool, max_message: int, too_large: tuple[int, str]) -> None:
        self.require_mask = require_mask
        self.max_message = max_message
        self.too_large = too_large
        self.buf = bytearray()
        self.pos = 0
        self._frags: list[bytes] | None = None
        self._frag_op = 0
        self._size = 0

    def feed(self, data: bytes) -> None:
        if self.pos and self.pos == len(self.buf):
            self.buf.clear()
            self.pos = 0
        self.buf += data

    def rest(self) -> bytes:
        """Unparsed bytes (at a message boundary): handed to the next reader."""
        out = bytes(self.buf[self.pos:])
        self.buf.clear()
        self.pos = 0
        return out

    def whole(self, data: bytes) -> Message | None:
        """`data` as a message when it is exactly one complete, final, masked text frame within the
        limit and nothing is buffered or half-assembled (the usual browser read); None otherwise,
        and `feed` + `next` decide (the same checks: this only skips the buffer)."""
        if self._frags is not None or self.pos != len(self.buf) or not self.require_mask:
            return None
        end = len(data)
        if end < 6 or data[0] != 0x81:  # FIN, no RSV bit, text
            return None
        n = data[1] ^ 0x80  # >= 128: no mask bit
        if n < 126:
            hlen = 6
        elif n == 126 and end >= 8:
            n = (data[2] << 8) | data[3]
            hlen = 8
        else:
            return None
        if hlen + n != end or n > self.max_message:
            return None
        if _c_mask is not None:
            buf = bytearray(memoryview(data)[hlen:])
            _c_mask(data[hlen - 4:hlen], buf)
            return Message(TEXT, bytes(buf), data)
        return Message(TEXT, mask(data[hlen - 4:hlen], data[hlen:]), data)

    def next(self) -> Message | None:
        """The next message or control frame, None until one is complete. Raises WireError."""
        buf = self.buf
        while True:
            end = len(buf)
            head = _header(buf, self.pos, end)
            if head is None:
                self._compact()
                return None
            b0, opcode, n, key, hlen = head
            _check(b0, opcode, n)
            if (key is None) is self.require_mask:
                raise WireError(1002, "unmasked client frame" if self.require_mask else "masked server frame")
            if opcode in _DATA:
                if opcode == CONT and self._frags is None:
                    raise WireError(1002, "continuation without a message")
                if opcode != CONT and self._frags is not None:
                    raise WireError(1002, "new message inside a fragmented one")
                if self._size + n > self.max_message:
                    raise WireError(*self.too_large)
            start = self.pos
            stop = start + hlen + n
            if stop > end:
                self._compact()
                return None
            self.pos = stop
            body = buf[start + hlen:stop]
            payload = mask(key, body) if key is not None else bytes(body)
            fin = b0 & 0x80
            if opcode in _CONTROL:
                return Message(opcode, payload, bytes(buf[start:stop]))
            if opcode != CONT and fin:
                return Message(opcode, payload, bytes(buf[start:stop]))
            if opcode != CONT:
                self._frags = [payload]
                self._frag_op = opcode
                self._size = n
                continue
            assert self._frags is not None
            self._frags.append(payload)
            self._size += n
            if fin:
                whole = b"".join(self._frags)
                self._frags = None
                self._size = 0
                return Message(self._frag_op, whole, None)

    def _compact(self) -> None:
        if self.pos:
            del self.buf[:self.pos]
            self.pos = 0


class Control(NamedTuple):
    opcode: int
    payload: bytes


class PassThrough:
    """Server frames streamed through: forwardable bytes out, control frames cut out, payload counted."""

    __slots__ = ("_ctl", "_ctl_op", "_head", "_in_message", "_left", "_msg_size", "_state", "max_message")

    _HEAD, _DATA_PAYLOAD, _CTL_PAYLOAD = 0, 1, 2

    def __init__(self, *, max_message: int) -> None:
        self.max_message = max_message
        self._state = self._HEAD
        self._head = b""
        self._left = 0
        self._ctl = bytearray()
        self._ctl_op = 0
        self._in_message = False
        self._msg_size = 0

    def whole(self, data: bytes) -> int:
        """The payload length when `data` is exactly one complete, final, unmasked text or binary
        frame within the limit and the stream is between messages (the usual gateway read); -1
        otherwise, and `feed` decides (the same checks: this only skips the state machine)."""
        if self._state or self._head or self._in_message:  # _HEAD is 0
            return -1
        end = len(data)
        if end < 2 or (data[0] != 0x81 and data[0] != 0x82):  # FIN, no RSV bit, text or binary
            return -1
        n = data[1]  # >= 128: masked
        if n < 126:
            hlen = 2
        elif n == 126 and end >= 4:
            n = (data[2] << 8) | data[3]
            hlen = 4
        else:
            return -1
        if hlen + n != end or n > self.max_message:
            return -1
        return n

    def feed(self, data: bytes, out: list[bytes], controls: list[Control]) -> int:
        """Appends bytes to forward to `out` and complete control frames to `controls` (reading
        stops after a close); returns the data payload bytes seen. Raises WireError."""
        if self._head:
            data = self._head + data
            self._head = b""
        end = len(data)
        pos = 0
        run = 0  # where the current run of forwardable bytes began
        counted = 0
        while pos < end:
            state = self._state
            if state == self._DATA_PAYLOAD:
                take = min(self._left, end - pos)
                pos += take
                counted += take
                self._left -= take
                if not self._left:
                    self._state = self._HEAD
                continue
            if state == self._CTL_PAYLOAD:
                take = min(self._left, end - pos)
                self._ctl += data[pos:pos + take]
                pos += take
                run = pos
                self._left -= take
                if self._left:
                    continue
                self._state = self._HEAD
                controls.append(Control(self._ctl_op, bytes(self._ctl)))
                if self._ctl_op == CLOSE:
                    return counted
                continue
            head = _header(data, pos, end)
            if head is None:
                self._head = data[pos:]
                end = pos
                break
            b0, opcode, n, key, hlen = head
            _check(b0, opcode, n)
            if key is not None:
                raise WireError(1002, "masked server frame")
            if opcode in _CONTROL:
                if pos > run:
                    out.append(data[run:pos])
                self._ctl = bytearray()
                self._ctl_op = opcode
                self._left = n
                pos += hlen
                run = pos
                if n:
                    self._state = self._CTL_PAYLOAD
                else:
                    controls.append(Control(opcode, b""))
                    if opcode == CLOSE:
                        return counted
                continue
            if opcode == CONT:
                if not self._in_message:
                    raise WireError(1002, "continuation without a message")
                self._msg_size += n
            else:
                if self._in_message:
                    raise WireError(1002, "new message inside a fragmented one")
                self._msg_size = n
            if self._msg_size > self.max_message:
                raise WireError(1009, "message too big")
            self._in_message = not (b0 & 0x80)
            pos += hlen
            if n:
                self._left = n
                self._state = self._DATA_PAYLOAD
        if end > run:
            out.append(data[run:end] if run or end < len(data) else data)
        return counted
