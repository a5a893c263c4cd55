"""The WhatsApp pairing QR as inline SVG, redrawn on the server from the PNG the gateway hands out.

The API gives the QR only as `data:image/png;base64,...` (what OpenClaw's `web.login.start`
returns; the text it encodes never leaves the gateway), so there is no payload to re-encode. This
reads that PNG (8-bit greyscale/RGB/palette, with or without alpha, any filter, not interlaced),
finds the module size from the top-left finder pattern, samples each module's centre and draws the
dark ones as one SVG path: crisp at any size, no `data:` URL in the page, nothing a browser decodes
from untrusted bytes. A PNG this cannot read gives None; the caller then shows it as an image.
"""

from __future__ import annotations

import base64
import binascii
import struct
import zlib

PREFIX = "data:image/png;base64,"
MAX_PNG_BYTES = 64 * 1024  # the gateway's budget is 16 KiB; anything far larger is not a QR
MAX_SIDE = 2048
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def png_bytes(data_url: str | None) -> bytes | None:
    """The PNG inside a data URL, or None when it is not one (wrong type, bad base64, too large)."""
    if not data_url or not data_url.startswith(PREFIX) or len(data_url) > MAX_PNG_BYTES * 4 // 3 + 64:
        return None
    try:
        raw = base64.b64decode(data_url[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if raw.startswith(b"\x89PNG\r\n\x1a\n") else None


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def dark_pixels(png: bytes) -> list[list[bool]] | None:
    """Each pixel as dark (True) or light, or None for a PNG this reader does not handle."""
    pos, chunks, palette = 8, b"", b""
    header: tuple[int, ...] | None = None
    try:
        while pos + 8 <= len(png):
            length, kind = struct.unpack(">I4s", png[pos:pos + 8])
            data = png[pos + 8:pos + 8 + length]
            pos += 12 + length
            if kind == b"IHDR":
                header = struct.unpack(">IIBBBBB", data)
            elif kind == b"PLTE":
                palette = data
            elif kind == b"IDAT":
                chunks += data
            elif kind == b"IEND":
                break
        if header is None:
            return None
        width, height, depth, color, _comp, _filt, interlace = header
        if depth != 8 or color not in _CHANNELS or interlace or not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            return None
        bpp = _CHANNELS[color]
        stride = width * bpp
        raw = zlib.decompressobj().decompress(chunks, (stride + 1) * height + 1)
        if len(raw) < (stride + 1) * height:
            return None
    except (struct.error, zlib.error):
        return None
    rows: list[list[bool]] = []
    prev = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        ftype, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 0xFF
            elif ftype == 2:
                line[i] = (line[i] + b) & 0xFF
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif ftype == 4:
                line[i] = (line[i] + _paeth(a, b, c)) & 0xFF
            elif ftype != 0:
                return None
        rows.append([_dark(line, x * bpp, color, palette) for x in range(width)])
        prev = line
    return rows


def _dark(line: bytearray, i: int, color: int, palette: bytes) -> bool:
    if color == 3:
        j = line[i] * 3
        r, g, b = palette[j:j + 3] if j + 3 <= len(palette) else (255, 255, 255)
        return (r + g + b) < 384
    if color in (0, 4):
        return line[i] < 128 and (color == 0 or line[i + 1] >= 128)
    r, g, b = line[i], line[i + 1], line[i + 2]
    opaque = color == 2 or line[i + 3] >= 128
    return opaque and (r + g + b) < 384


def modules(pixels: list[list[bool]]) -> list[list[bool]] | None:
    """The QR's module grid: the finder's 7-module top edge gives the module size in pixels."""
    height, width = len(pixels), len(pixels[0])
    top = next((y for y in range(height) if any(pixels[y])), None)
    if top is None:
        return None
    left = pixels[top].index(True)
    run = 0
    while left + run < width and pixels[top][left + run]:
        run += 1
    if run < 7 or run % 7:
        return None
    scale = run // 7
    right = max(x for x in range(width) if pixels[top][x])
    count = (right - left + 1) // scale
    if count < 21 or count > 177 or (count - 17) % 4 or top + count * scale > height:
        return None
    half = scale // 2
    return [[pixels[top + r * scale + half][left + c * scale + half] for c in range(count)] for r in range(count)]


def qr_svg(data_url: str | None, title: str = "WhatsApp pairing QR code") -> str | None:
    """Inline SVG for the QR in `data_url`, or None when it cannot be read as one."""
    png = png_bytes(data_url)
    if png is None:
        return None
    pixels = dark_pixels(png)
    grid = modules(pixels) if pixels else None
    if grid is None:
        return None
    quiet, size = 4, len(grid)
    path = "".join(f"M{c + quiet} {r + quiet}h1v1h-1z" for r, row in enumerate(grid) for c, on in enumerate(row) if on)
    side = size + 2 * quiet
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {side} {side}" width="264" height="264" '
            f'role="img" aria-label="{title}" shape-rendering="crispEdges" class="qr">'
            f'<title>{title}</title><rect width="{side}" height="{side}" fill="#fff"/>'
            f'<path d="{path}" fill="#000"/></svg>')
