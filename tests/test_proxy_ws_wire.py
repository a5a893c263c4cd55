"""The relay's own RFC 6455 layer (`proxy.ws_wire`, `proxy.ws_relay`): faults a browser library
would never send, written byte by byte on a raw socket, plus the codec's edge cases and the
upstream certificate pin."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web
from yarl import URL

from gateway_simulator.tls import make_self_signed
from proxy.app import RunningProxy
from proxy.config import ProxyConfig
from proxy.ws_wire import (
    BINARY,
    CLOSE,
    CONT,
    PING,
    PONG,
    TEXT,
    Assembler,
    Control,
    PassThrough,
    WireError,
    encode,
    parse_close,
)
from settings import Settings
from tests.proxy_harness import TEST_CONFIG, Browser, FakeGateway, Seeded, running_proxy, seed_gateway_user

ASYNC = pytest.mark.asyncio(loop_scope="session")


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, rsv: int = 0) -> bytes:
    """A browser frame exactly as given: any flag, any mask (or none)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawSocket:
    """A WebSocket client on a bare TCP stream: sends whatever bytes the test wants."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, proxy: RunningProxy, browser: Browser, seeded: Seeded) -> RawSocket:
        url = URL(proxy.url)
        reader, writer = await asyncio.open_connection(url.host, url.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /agents/{seeded.agent_id}/gateway HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nOrigin: {proxy.url}\r\nCookie: {browser.headers['Cookie']}\r\n"
                      "\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 "), head
        return cls(reader, writer)

    async def handshake(self, browser: Browser) -> dict[str, Any]:
        op, challenge = await self.read()
        assert op == TEXT
        await self.send(frame(TEXT, json.dumps(browser.connect_frame(json.loads(challenge))).encode()))
        op, hello = await self.read()
        assert op == TEXT
        return json.loads(hello)  # type: ignore[no-any-return]

    async def send(self, data: bytes, *, byte_by_byte: bool = False) -> None:
        if not byte_by_byte:
            self.writer.write(data)
            await self.writer.drain()
            return
        for i in range(len(data)):
            self.writer.write(data[i:i + 1])
            await self.writer.drain()
            await asyncio.sleep(0.001)  # one TCP segment (one read on the proxy) per byte

    async def read(self, timeout: float = 10) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout):
            b0, b1 = await self.reader.readexactly(2)
            assert not b1 & 0x80, "server frames are never masked"
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.reader.readexactly(8), "big")
            return b0 & 0x0F, await self.reader.readexactly(n)

    async def response(self, rid: str) -> dict[str, Any]:
        while True:
            op, data = await self.read()
            if op in (PING, PONG):
                continue
            assert op == TEXT, (op, data)
            res = json.loads(data)
            if res.get("type") == "res" and res.get("id") == rid:
                return res  # type: ignore[no-any-return]

    async def close_code(self) -> tuple[int | None, bytes]:
        """Skip to the close frame; (code, reason)."""
        while True:
            op, data = await self.read()
            if op == CLOSE:
                return (int.from_bytes(data[:2], "big") if data else None), data[2:]

    def close(self) -> None:
        self.writer.close()


@asynccontextmanager
async def relayed(settings: Settings, sql: psycopg.Connection, config: ProxyConfig = TEST_CONFIG
                  ) -> AsyncIterator[tuple[FakeGateway, RawSocket, Browser]]:
    async with FakeGateway() as fake:
        seeded = seed_gateway_user(sql, settings, port=fake.port)
        async with running_proxy(settings, config=config) as proxy:
            browser = Browser(proxy.url, seeded.session)
            raw = await RawSocket.open(proxy, browser, seeded)
            try:
                hello = await raw.handshake(browser)
                assert hello["ok"] is True, hello
                yield fake, raw, browser
            finally:
                raw.close()
                await browser.close()


def req(rid: str, method: str, params: Any = None) -> bytes:
    return json.dumps({"type": "req", "id": rid, "method": method, "params": params or {}}).encode()


# -- through the proxy ----------------------------------------------------------------------------


@ASYNC
async def test_unmasked_browser_frame_closes_with_1002(settings: Settings, sql: psycopg.Connection) -> None:
    async with relayed(settings, sql) as (fake, raw, _):
        await raw.send(frame(TEXT, req("u1", "health"), masked=False))
        assert (await raw.close_code())[0] == 1002
        await asyncio.wait_for(fake.closed.wait(), 10)
    assert [f["method"] for f in fake.frames] == ["connect"]


@ASYNC
async def test_reserved_bits_close_with_1002(settings: Settings, sql: psycopg.Connection) -> None:
    async with relayed(settings, sql) as (fake, raw, _):
        await raw.send(frame(TEXT, req("r1", "health"), rsv=0x40))  # RSV1: no extension was negotiated
        assert (await raw.close_code())[0] == 1002
    assert [f["method"] for f in fake.frames] == ["connect"]


@ASYNC
async def test_fragmented_blocked_method_is_still_blocked(settings: Settings, sql: psycopg.Connection) -> None:
    """Split over continuation frames, with a ping in between and every byte its own TCP read."""
    async with relayed(settings, sql) as (fake, raw, _):
        blocked = req("f1", "config.patch", {"raw": "{}"})
        parts = [blocked[:7], blocked[7:30], blocked[30:]]
        data = (frame(TEXT, parts[0], fin=False) + frame(PING, b"mid-message") + frame(CONT, parts[1], fin=False)
                + frame(CONT, parts[2]))
        await raw.send(data, byte_by_byte=True)
        res = await raw.response("f1")
        assert res["error"]["code"] == "FORBIDDEN" and res["error"]["details"]["reason"] == "blocked-by-proxy"
        allowed = req("f2", "health")
        await raw.send(frame(TEXT, allowed[:10], fin=False) + frame(CONT, allowed[10:]))
        assert (await raw.response("f2"))["ok"] is True
    assert [f["method"] for f in fake.frames] == ["connect", "health"]


@ASYNC
async def test_frame_split_byte_by_byte_is_relayed_unchanged(settings: Settings, sql: psycopg.Connection) -> None:
    async with relayed(settings, sql) as (fake, raw, _):
        await raw.send(frame(TEXT, req("b1", "chat.send", {"message": "é" * 300})), byte_by_byte=True)
        res = await raw.response("b1")
        assert res["ok"] is True and res["payload"]["echo"] == {"message": "é" * 300}
    assert fake.frames[-1]["params"] == {"message": "é" * 300}


@ASYNC
async def test_oversized_fragmented_message_closes_with_1008(settings: Settings, sql: psycopg.Connection) -> None:
    cfg = ProxyConfig(**{**TEST_CONFIG.__dict__, "max_client_frame_bytes": 64 * 1024})
    async with relayed(settings, sql, cfg) as (fake, raw, _):
        chunk = b"x" * (40 * 1024)
        await raw.send(frame(TEXT, b'{"type":"req","id":"big","method":"chat.send","params":{"m":"' + chunk,
                             fin=False))
        await raw.send(frame(CONT, chunk, fin=False))  # 80 KiB so far: over the 64 KiB message cap
        code, reason = await raw.close_code()
        assert (code, reason) == (1008, b"frame too large")
    assert [f["method"] for f in fake.frames] == ["connect"]


@ASYNC
async def test_oversized_connect_is_refused_from_its_header(settings: Settings, sql: psycopg.Connection) -> None:
    """Before hello-ok a browser gets the connect frame's 64 KiB, not the 8 MiB of a signed-in socket."""
    async with FakeGateway() as fake:
        seeded = seed_gateway_user(sql, settings, port=fake.port)
        async with running_proxy(settings) as proxy:
            browser = Browser(proxy.url, seeded.session)
            raw = await RawSocket.open(proxy, browser, seeded)
            try:
                assert (await raw.read())[0] == TEXT  # our challenge
                header = frame(TEXT, b"x" * (1024 * 1024))[:14]  # announces 1 MiB; the body never comes
                await raw.send(header)
                assert await raw.close_code() == (1008, b"preauth payload too large")
            finally:
                raw.close()
                await browser.close()
        assert fake.frames == []


@ASYNC
@pytest.mark.parametrize("payload", [b"\x03", (999).to_bytes(2, "big"), (1005).to_bytes(2, "big"),
                                     (1000).to_bytes(2, "big") + b"\xff\xfe"])
async def test_malformed_close_frame_is_refused(settings: Settings, sql: psycopg.Connection, payload: bytes) -> None:
    async with relayed(settings, sql) as (fake, raw, _):
        await raw.send(frame(CLOSE, payload))
        code, _ = await raw.close_code()
        assert code in (1002, 1007)  # 1007: a close reason that is not UTF-8
        await asyncio.wait_for(fake.closed.wait(), 10)
        assert fake.close_code == 1011  # the gateway learns the browser side failed


@ASYNC
async def test_pings_pass_through_end_to_end(settings: Settings, sql: psycopg.Connection) -> None:
    async with relayed(settings, sql) as (_, raw, _browser):
        await raw.send(frame(PING, b"are you there"))
        assert await raw.read() == (PONG, b"are you there")  # answered by the gateway, not the proxy


@ASYNC
async def test_silent_browser_is_dropped_by_the_heartbeat(settings: Settings, sql: psycopg.Connection) -> None:
    """A browser that never answers our pings is closed, and the gateway told (1001), within ~1.5 periods."""
    cfg = ProxyConfig(**{**TEST_CONFIG.__dict__, "heartbeat_s": 0.4})
    async with relayed(settings, sql, cfg) as (fake, raw, _):
        op, payload = await raw.read(timeout=5)
        assert op == PING  # from the proxy; this client never answers
        await asyncio.wait_for(fake.closed.wait(), 5)
        assert fake.close_code == 1001
        assert await raw.reader.read() == b""  # and the browser's socket is gone


@ASYNC
async def test_wrong_upstream_certificate_never_receives_the_upgrade(settings: Settings, sql: psycopg.Connection,
                                                                     tmp_path: Path) -> None:
    """A pinned (cloud) gateway presenting another certificate: 502, and not one byte after TLS."""
    make_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    received: list[bytes] = []
    handshakes: list[bool] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handshakes.append(True)
        try:
            received.append(await reader.read(65536))
        except (OSError, ssl.SSLError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        seeded = seed_gateway_user(sql, settings, port=port)
        sql.execute("UPDATE vpses SET gateway_url = %s, gateway_cert_sha256 = %s WHERE id = %s",
                    (f"https://127.0.0.1:{port}", "ab" * 32, seeded.vps_id))
        async with running_proxy(settings) as proxy:
            browser = Browser(proxy.url, seeded.session)
            try:
                async with browser.http.get(browser.ws_url(seeded.agent_id), headers={
                        **browser.headers, "Upgrade": "websocket", "Connection": "Upgrade",
                        "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
                }) as resp:
                    assert resp.status == 502
            finally:
                await browser.close()
        for _ in range(50):
            if received:
                break
            await asyncio.sleep(0.05)
        assert handshakes, "the proxy never connected"
        assert received in ([], [b""]), received  # TLS done, then closed: no upgrade request, no token
    finally:
        server.close()
        await server.wait_closed()


@ASYNC
async def test_slow_browser_stops_the_proxy_reading_the_gateway(settings: Settings, sql: psycopg.Connection) -> None:
    """Flow control: a browser that reads nothing makes the gateway's writes stall; nothing piles up."""
    flood_size, count = 64 * 1024, 2000  # 128 MiB offered
    async with FakeGateway() as fake:
        seeded = seed_gateway_user(sql, settings, port=fake.port)

        async def flood(gw_ws: web.WebSocketResponse) -> None:
            data = "y" * flood_size
            for _ in range(count):
                await gw_ws.send_str(data)
                fake.flood_progress += 1

        fake.on_hello = flood
        async with running_proxy(settings) as proxy:
            browser = Browser(proxy.url, seeded.session)
            raw = await RawSocket.open(proxy, browser, seeded)
            try:
                await raw.handshake(browser)
                last, still = -1, 0
                while still < 10:
                    await asyncio.sleep(0.1)
                    still = still + 1 if fake.flood_progress == last else 0
                    last = fake.flood_progress
                stalled = fake.flood_progress
                assert stalled < count // 4, stalled
                (relay_conn,) = proxy.gateway.open_relays
                transport = relay_conn.browser.transport
                assert transport is not None and transport.get_write_buffer_size() < 8 * 1024 * 1024
                got = 0
                while got < count:  # reading again lets everything through, in order
                    op, payload = await raw.read(timeout=30)
                    if op == TEXT:
                        assert len(payload) == flood_size
                        got += 1
            finally:
                raw.close()
                await browser.close()


# -- the codec --------------------------------------------------------------------------------------


def test_assembler_byte_by_byte() -> None:
    wire = frame(TEXT, b"hello ", fin=False) + frame(PING, b"p") + frame(CONT, b"world") + frame(TEXT, b"!")
    asm = Assembler(require_mask=True, max_message=1024, too_large=(1008, "frame too large"))
    got = []
    for i in range(len(wire)):
        asm.feed(wire[i:i + 1])
        while (msg := asm.next()) is not None:
            got.append((msg.opcode, msg.payload, msg.raw is not None))
    assert got == [(PING, b"p", True), (TEXT, b"hello world", False), (TEXT, b"!", True)]


def test_single_frame_keeps_its_masked_bytes() -> None:
    wire = frame(TEXT, b"x" * 70_000)
    asm = Assembler(require_mask=True, max_message=1 << 20, too_large=(1008, "frame too large"))
    asm.feed(wire)
    msg = asm.next()
    assert msg is not None and msg.payload == b"x" * 70_000 and msg.raw == wire


@pytest.mark.parametrize(("wire", "code"), [
    (frame(TEXT, b"a", masked=False), 1002),
    (frame(TEXT, b"a", rsv=0x10), 1002),
    (frame(CONT, b"a"), 1002),
    (frame(TEXT, b"a", fin=False) + frame(TEXT, b"b"), 1002),
    (frame(PING, b"p", fin=False), 1002),
    (frame(PING, b"p" * 126), 1002),
    (frame(0x3, b"?"), 1002),
    (frame(TEXT, b"a" * 2000), 1008),
], ids=["unmasked", "rsv-bit", "continuation-first", "text-inside-fragment", "fragmented-ping",
        "long-ping", "unknown-opcode", "too-large"])  # frames carry random masks: fixed ids for xdist
def test_assembler_refuses(wire: bytes, code: int) -> None:
    asm = Assembler(require_mask=True, max_message=1024, too_large=(1008, "frame too large"))
    asm.feed(wire[:14])  # the header alone decides
    with pytest.raises(WireError) as err:
        while asm.next() is not None:
            pass
        asm.feed(wire[14:])
        while asm.next() is not None:
            pass
    assert err.value.code == code


def test_passthrough_forwards_data_and_cuts_out_controls() -> None:
    data = [encode(TEXT, b"a" * 300), encode(TEXT, b"part", fin=False), encode(PING, b"hb"),
            encode(CONT, b"-rest"), encode(PONG, b"x"), encode(TEXT, b"z")]
    wire = b"".join(data)
    for step in (1, 3, 7, len(wire)):
        stream = PassThrough(max_message=1 << 20)
        out: list[bytes] = []
        controls: list[Control] = []
        counted = 0
        for i in range(0, len(wire), step):
            counted += stream.feed(wire[i:i + step], out, controls)
        assert b"".join(out) == data[0] + data[1] + data[3] + data[5]
        assert controls == [Control(PING, b"hb"), Control(PONG, b"x")]
        assert counted == 300 + 4 + 5 + 1


def test_passthrough_stops_at_close_and_limits_messages() -> None:
    stream = PassThrough(max_message=100)
    out: list[bytes] = []
    controls: list[Control] = []
    stream.feed(encode(CLOSE, (4001).to_bytes(2, "big") + b"bye") + encode(TEXT, b"after"), out, controls)
    assert controls == [Control(CLOSE, (4001).to_bytes(2, "big") + b"bye")] and out == []
    with pytest.raises(WireError) as err:
        PassThrough(max_message=100).feed(encode(TEXT, b"x" * 101), [], [])
    assert err.value.code == 1009
    with pytest.raises(WireError):
        PassThrough(max_message=100).feed(encode(TEXT, b"x", masked=True), [], [])  # servers never mask


_READS = [
    frame(TEXT, b'{"a":1}'), frame(TEXT, b"x" * 125), frame(TEXT, b"x" * 126), frame(TEXT, b"x" * 1024),
    frame(TEXT, b"x" * 1025), frame(TEXT, b"x" * 70_000), frame(TEXT, b""), frame(BINARY, b"b"),
    frame(TEXT, b"a", masked=False), frame(TEXT, b"a", rsv=0x40), frame(TEXT, b"a", fin=False),
    frame(PING, b"p"), frame(CONT, b"a"), frame(TEXT, b"a") + frame(TEXT, b"b"), frame(TEXT, b"abc")[:-1],
    frame(TEXT, b"x" * 300)[:3],
]


@pytest.mark.parametrize("wire", _READS, ids=range(len(_READS)))  # random masks: fixed ids for xdist
def test_whole_frame_reads_match_the_assembler(wire: bytes) -> None:
    """The browser side's shortcut for a read that is one whole text frame gives exactly what
    feed + next give, and declines everything else (those then take the general path)."""
    fast = Assembler(require_mask=True, max_message=1024, too_large=(1008, "frame too large"))
    msg = fast.whole(wire)
    general = Assembler(require_mask=True, max_message=1024, too_large=(1008, "frame too large"))
    general.feed(wire)
    try:
        expected = general.next()
        rest_complete = general.next() is None and general.pos == len(general.buf)
    except WireError:
        expected, rest_complete = None, False
    if msg is not None:
        assert msg == expected and msg.opcode == TEXT and msg.raw == wire and rest_complete
    else:  # declined: never a read the shortcut should have taken
        assert not (expected is not None and expected.opcode == TEXT and expected.raw == wire and rest_complete)
    half = Assembler(require_mask=True, max_message=1024, too_large=(1008, "frame too large"))
    half.feed(frame(TEXT, b"first", fin=False))
    assert half.next() is None and half.whole(frame(TEXT, b"x")) is None  # inside a fragmented message
    buffered = Assembler(require_mask=True, max_message=1024, too_large=(1008, "frame too large"))
    buffered.feed(frame(TEXT, b"x")[:2])
    assert buffered.next() is None and buffered.whole(frame(TEXT, b"y")) is None  # bytes already waiting


@pytest.mark.parametrize("wire", [encode(TEXT, b'{"a":1}'), encode(TEXT, b"x" * 126), encode(BINARY, b"x" * 1000),
                                  encode(TEXT, b"x" * 1001), encode(TEXT, b"x" * 70_000), encode(TEXT, b""),
                                  encode(TEXT, b"a", masked=True), encode(TEXT, b"a", fin=False), encode(PING, b"p"),
                                  encode(CLOSE, b""), encode(TEXT, b"a") + encode(TEXT, b"b"),
                                  encode(TEXT, b"abc")[:-1], bytes([0xC1, 1]) + b"a"],
                         ids=range(13))  # one has a random mask: fixed ids for xdist
def test_whole_gateway_frames_match_the_stream(wire: bytes) -> None:
    """The gateway side's shortcut: a read that is one whole unmasked data frame is forwarded as
    is and its payload counted, exactly as the general stream would; anything else is declined."""
    n = PassThrough(max_message=1000).whole(wire)
    out: list[bytes] = []
    controls: list[Control] = []
    try:
        counted = PassThrough(max_message=1000).feed(wire, out, controls)
    except WireError:
        counted = None
    if n >= 0:
        assert counted == n and out == [wire] and not controls
        assert n == len(wire) - (2 if n < 126 else 4)
    half = PassThrough(max_message=1000)
    half.feed(encode(TEXT, b"part", fin=False), [], [])
    assert half.whole(encode(TEXT, b"x")) == -1  # a new message inside a fragmented one: the stream refuses it


def test_parse_close() -> None:
    assert parse_close(b"") == (None, b"")
    assert parse_close((4002).to_bytes(2, "big") + b"tab closed") == (4002, b"tab closed")
    for bad, code in ((b"\x03", 1002), ((1006).to_bytes(2, "big"), 1002), ((2999).to_bytes(2, "big"), 1002),
                      ((1000).to_bytes(2, "big") + b"\xc3", 1007)):
        with pytest.raises(WireError) as err:
            parse_close(bad)
        assert err.value.code == code


@ASYNC
async def test_closed_relays_leave_nothing_behind(settings: Settings, sql: psycopg.Connection) -> None:
    """Taking sockets over from aiohttp must not leak its handlers or our sockets: after 16 relays
    opened and closed, none of either is left (what the memory per socket would otherwise grow by)."""
    import gc

    from aiohttp.web_protocol import RequestHandler

    from proxy.ws_relay import Relay

    def alive(kind: type) -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, kind)
                   and (kind is not Relay or o.ctx.open_relays is proxy.gateway.open_relays))

    async with FakeGateway() as fake:
        seeded = seed_gateway_user(sql, settings, port=fake.port)
        async with running_proxy(settings) as proxy:
            browser = Browser(proxy.url, seeded.session)
            try:
                handlers_before = alive(RequestHandler)
                for _ in range(2):  # 2 x 8: the per-user cap is 10, so the slots must come back too
                    sockets = [(await browser.handshake(seeded.agent_id))[0] for _ in range(8)]
                    assert len(proxy.gateway.open_relays) == 8
                    for ws in sockets:
                        await ws.close()
                    for _ in range(100):
                        if not proxy.gateway.open_relays:
                            break
                        await asyncio.sleep(0.05)
                    assert not proxy.gateway.open_relays
                assert proxy.gateway.ws_connections.open_count(seeded.user_id) == 0
                assert alive(Relay) == 0
                assert alive(RequestHandler) <= handlers_before
            finally:
                await browser.close()
