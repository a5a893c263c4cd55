"""A QR-looking PNG for the simulated WhatsApp login.

It is *not* a scannable QR code (that would need an encoder dependency for no test value); it has
the three finder squares and a data pattern derived from the login secret, so each rotation gives a
different, valid PNG data URL under the real 16 KiB budget.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib

_MODULES = 33
_SCALE = 6
_QUIET = 4


def _finder(grid: list[list[bool]], top: int, left: int) -> None:
    for r in range(7):
        for c in range(7):
            edge = r in (0, 6) or c in (0, 6)
            core = 2 <= r <= 4 and 2 <= c <= 4
            grid[top + r][left + c] = edge or core


def _modules(secret: str) -> list[list[bool]]:
    bits = b""
    counter = 0
    while len(bits) * 8 < _MODULES * _MODULES:
        bits += hashlib.sha256(f"{secret}:{counter}".encode()).digest()
        counter += 1
    grid = [
        [bool(bits[(r * _MODULES + c) // 8] >> ((r * _MODULES + c) % 8) & 1) for c in range(_MODULES)]
        for r in range(_MODULES)
    ]
    for top, left in ((0, 0), (0, _MODULES - 7), (_MODULES - 7, 0)):
        for r in range(-1, 8):
            for c in range(-1, 8):
                if 0 <= top + r < _MODULES and 0 <= left + c < _MODULES:
                    grid[top + r][left + c] = False
        _finder(grid, top, left)
    return grid


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def qr_png(secret: str) -> bytes:
    grid = _modules(secret)
    size = (_MODULES + 2 * _QUIET) * _SCALE
    rows = []
    for y in range(size):
        r = y // _SCALE - _QUIET
        row = bytearray([0])  # filter type 0
        for x in range(size):
            c = x // _SCALE - _QUIET
            dark = 0 <= r < _MODULES and 0 <= c < _MODULES and grid[r][c]
            row.append(0 if dark else 255)
        rows.append(bytes(row))
    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
        + _chunk(b"IEND", b"")
    )


def qr_data_url(secret: str) -> str:
    return "data:image/png;base64," + base64.b64encode(qr_png(secret)).decode("ascii")
